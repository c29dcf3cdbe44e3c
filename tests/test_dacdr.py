"""DACDR: the cross-attention layer, the model, its SavedModel export, fine-tuning and new domains."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

import models.dacdr as dacdr
from components.ingest import sequences
from components.ingest.records import Impression
from components.trainer import export, preprocess
from models import config as config_lib
from models import registry
from models.layers.cross_attention import AttentionAllocation, CrossAttention
from xdctr import features as F

HISTORY, DOMAIN_HISTORY, BUCKETS = 4, 3, 53
# (minute, domain, item, clicked) per user; minutes apart so the time-gap buckets differ.
EVENTS = {
    "u1": [(1, "a", "x1", 1), (3, "b", "y1", 1), (8, "a", "x2", 1), (20, "b", "y2", 0), (50, "a", "x3", 0),
           (90, "b", "y3", 1)],
    "u2": [(1, "b", "y2", 1), (2, "b", "y1", 0), (9, "a", "x1", 1), (30, "a", "x2", 1)],
}
NEW_DOMAIN_EVENTS = {
    "u3": [(1, "a", "x1", 1), (4, "b", "y1", 1), (9, "c", "z1", 1), (16, "c", "z2", 0), (40, "c", "z3", 1)],
}


def _batch(domains, events=EVENTS):
    """(model inputs, labels, serialized examples) of every impression in `events`."""
    contract = F.Contract(domains, HISTORY, DOMAIN_HISTORY)
    rows = []
    for user, entries in events.items():
        impressions = [Impression(60 * minute, user, domain, item, clicked) for minute, domain, item, clicked in entries]
        rows += list(sequences.user_examples(user, impressions, contract))
    serialized = [sequences.to_tf_example(row).SerializeToString() for row in rows]
    input_config = _config(domains).inputs
    inputs = preprocess.to_model_inputs(preprocess.parse(tf.constant(serialized), input_config), input_config)
    return inputs, np.array([row[F.LABEL] for row in rows], "float32"), serialized


def _config(domains=("a", "b"), **overrides):
    values = {"embedding_dim": 8, "num_heads": 2, "encoder_units": [8], "hidden_units": [8],
              "inputs": {"domains": list(domains), "history_length": HISTORY, "domain_history_length": DOMAIN_HISTORY,
                         "item_buckets": BUCKETS, "user_buckets": BUCKETS}}
    values.update(overrides)
    return registry.resolve_config("dacdr", values)


def _model(config, seed=1):
    keras.utils.set_random_seed(seed)
    return registry.build("dacdr", config)


def _ctr(model, inputs):
    return keras.ops.convert_to_numpy(model(inputs)[F.SERVING_OUTPUT])


def _compile(model):
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss={F.SERVING_OUTPUT: keras.losses.BinaryCrossentropy()})


def _loss(model, inputs, labels):
    return float(keras.losses.BinaryCrossentropy()(labels, model(inputs)[F.SERVING_OUTPUT]))


def _select(inputs, rows):
    return {name: tf.gather(value, rows) for name, value in inputs.items()}


# --- layers -----------------------------------------------------------------------------------


def test_cross_attention_by_hand():
    # H = 1, key_dim = 2, all kernels ones. Query x = [1, 0] -> q = [1, 1].
    # Context c1 = [1, 0] -> k1 = v1 = [1, 1]; c2 = [0, 0] -> k2 = v2 = [0, 0].
    # Scores q.k / sqrt(2) = [sqrt(2), 0]; w1 = e^sqrt(2) / (e^sqrt(2) + 1) ~= 0.8044.
    # Attended w1 * [1, 1]; W^O ones sums it: 2 * w1 per output unit; residual adds x:
    # out = [1 + 2 w1, 2 w1].
    layer = CrossAttention(num_heads=1, key_dim=2, kernel_initializer="ones")
    query = np.array([[[1.0, 0.0]]], "float32")  # (1, 1, 2)
    context = np.array([[[1.0, 0.0], [0.0, 0.0]]], "float32")  # (1, 2, 2)
    w1 = np.exp(np.sqrt(2.0)) / (np.exp(np.sqrt(2.0)) + 1.0)
    out = keras.ops.convert_to_numpy(layer(query, context))
    np.testing.assert_allclose(out, [[[1.0 + 2.0 * w1, 2.0 * w1]]], rtol=1e-6)
    # Masking c1 leaves weight 1 on c2, whose value is 0: the query comes back unchanged; so does
    # a fully masked context (weights zeroed, no NaN).
    for mask in ([[False, True]], [[False, False]]):
        out = keras.ops.convert_to_numpy(layer(query, context, np.array(mask)))
        np.testing.assert_allclose(out, query)
    # A precomputed query projection gives the same output.
    projected = layer.project_query(query)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(projected), [[[[1.0, 1.0]]]])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(query, context, projected_query=projected)),
                               [[[1.0 + 2.0 * w1, 2.0 * w1]]], rtol=1e-6)
    assert CrossAttention.from_config(layer.get_config()).key_dim == 2


def test_cross_attention_rejects_bad_args():
    with pytest.raises(ValueError, match="num_heads=0"):
        CrossAttention(num_heads=0, key_dim=2)
    with pytest.raises(ValueError, match="key_dim=-1"):
        CrossAttention(num_heads=1, key_dim=-1)


def test_cross_attention_prior_refines_the_weights_by_hand():
    # As above (H = 1, key_dim = 2, ones kernels): the plain weights are w1 = e^sqrt(2) / (e^sqrt(2) + 1)
    # on c1 and 1 - w1 on c2. A prior P = [0.25, 0.75] refines them to
    # r1 = 0.25 e^sqrt(2) / (0.25 e^sqrt(2) + 0.75) on c1; without the residual the output is the
    # attended value summed by W^O: [2 r1, 2 r1].
    layer = CrossAttention(num_heads=1, key_dim=2, residual=False, kernel_initializer="ones")
    query = np.array([[[1.0, 0.0]]], "float32")  # (1, 1, 2)
    context = np.array([[[1.0, 0.0], [0.0, 0.0]]], "float32")  # (1, 2, 2)
    r1 = 0.25 * np.exp(np.sqrt(2.0)) / (0.25 * np.exp(np.sqrt(2.0)) + 0.75)
    prior = np.array([[[0.25, 0.75]]], "float32")  # (1, H, 2)
    out = keras.ops.convert_to_numpy(layer(query, context, prior=prior))
    np.testing.assert_allclose(out, [[[2.0 * r1, 2.0 * r1]]], rtol=1e-6)
    keys = layer.project_context(context)[0]
    weights = keras.ops.convert_to_numpy(layer.attention_weights(query, keys, prior=prior))  # (1, 1, 1, 2)
    np.testing.assert_allclose(weights, [[[[r1, 1.0 - r1]]]], rtol=1e-6)
    # A prior of 0 on c1 leaves only c2, whose value is 0; a prior of 0 everywhere attends to nothing.
    for zero_on in ([[[0.0, 1.0]]], [[[0.0, 0.0]]]):
        out = keras.ops.convert_to_numpy(layer(query, context, prior=np.array(zero_on, "float32")))
        np.testing.assert_allclose(out, [[[0.0, 0.0]]], atol=1e-7)
    assert CrossAttention.from_config(layer.get_config()).residual is False


def test_attention_allocation_by_hand():
    # H = 1, key_dim = 2, ones kernels. Queries x1 = [1, 0] -> q1 = [1, 1] and x2 = [0, 0] -> q2 = 0;
    # context c1 = [1, 0] -> k1 = [1, 1], c2 = 0 -> k2 = 0. q1 allocates [w1, 1 - w1] with
    # w1 = e^sqrt(2) / (e^sqrt(2) + 1); q2 scores both 0: [0.5, 0.5]. The output is their mean.
    layer = AttentionAllocation(num_heads=1, key_dim=2, kernel_initializer="ones")
    query = np.array([[[1.0, 0.0], [0.0, 0.0]]], "float32")  # (1, 2, 2)
    context = np.array([[[1.0, 0.0], [0.0, 0.0]]], "float32")  # (1, 2, 2)
    w1 = np.exp(np.sqrt(2.0)) / (np.exp(np.sqrt(2.0)) + 1.0)
    out = keras.ops.convert_to_numpy(layer(query, context))  # (1, H, 2)
    np.testing.assert_allclose(out, [[[(w1 + 0.5) / 2, (1.5 - w1) / 2]]], rtol=1e-6)
    # Only q1 takes part; c2 masked leaves all weight on c1; nothing real gives zeros.
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(query, context, query_mask=np.array([[True, False]]))),
                               [[[w1, 1.0 - w1]]], rtol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(query, context, np.array([[True, False]]))),
                               [[[1.0, 0.0]]], rtol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(query, context, np.array([[False, False]]))),
                               [[[0.0, 0.0]]], atol=0)
    assert AttentionAllocation.from_config(layer.get_config()).num_heads == 1
    with pytest.raises(ValueError, match="key_dim=0"):
        AttentionAllocation(num_heads=1, key_dim=0)


def test_per_domain_variables_gathers_each_domain():
    layer = dacdr.PerDomainVariables(num_domains=2, num_tokens=1, dim=2)
    layer.build()
    layer.tables[0].assign([[1.0, 2.0]])
    layer.tables[1].assign([[3.0, 4.0]])
    out = keras.ops.convert_to_numpy(layer(np.array([[1, 0, 1]], "int32")))  # (1, 3, 1, 2)
    np.testing.assert_allclose(out, [[[[3.0, 4.0]], [[1.0, 2.0]], [[3.0, 4.0]]]])
    with pytest.raises(ValueError, match="num_tokens=0"):
        dacdr.PerDomainVariables(num_domains=2, num_tokens=0, dim=2)


# --- config -----------------------------------------------------------------------------------


def test_config_round_trip_and_errors():
    assert (_config().query, _config().history_scope) == ("target", "all")  # the defaults
    config = _config(num_domain_tokens=3, source_sequence="per_domain", use_item_attention=False, query="sequence",
                     history_scope="source")
    assert (config.num_domain_tokens, config.source_sequence, config.use_item_attention) == (3, "per_domain", False)
    assert (config.query, config.history_scope) == ("sequence", "source")
    assert registry.resolve_config("dacdr", config_lib.to_dict(config)) == config
    model = dacdr.DACDR(config)
    assert dacdr.DACDR.from_config(model.get_config()).config == config
    with pytest.raises(ValueError, match="source_sequence='both'"):
        registry.build("dacdr", _config(source_sequence="both"))
    with pytest.raises(ValueError, match="query='item'"):
        registry.build("dacdr", _config(query="item"))
    with pytest.raises(ValueError, match="history_scope='target'"):
        registry.build("dacdr", _config(history_scope="target"))
    with pytest.raises(ValueError, match="num_heads=3"):
        registry.build("dacdr", _config(num_heads=3))  # 3 does not divide embedding_dim 8
    with pytest.raises(ValueError, match="inputs.domains"):
        registry.build("dacdr", _config(domains=("a",)))
    with pytest.raises(ValueError, match="expects bool"):
        _config(use_domain_attention="yes")


# --- model ------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [{}, {"source_sequence": "per_domain"}, {"query": "sequence"},
                                   {"history_scope": "source"}])
def test_fully_padded_histories_give_finite_ctr(flags):
    config = _config(**flags)
    inputs = dacdr.dummy_inputs(config.inputs, batch=2)
    inputs[F.USER_ID] = tf.constant([3, 4])
    inputs[F.ITEM_ID] = tf.constant([5, 6])
    inputs[F.DOMAIN] = tf.constant([0, 1])
    ctr = _ctr(_model(config), inputs)
    assert ctr.shape == (2,) and np.all(np.isfinite(ctr)) and np.all((ctr > 0) & (ctr < 1))


@pytest.mark.parametrize("query", ["target", "sequence"])
def test_source_scope_ignores_the_target_domain_entries(query):
    inputs, _, _ = _batch(("a", "b"))
    model = _model(_config(history_scope="source", query=query))
    before = _ctr(model, inputs)
    items = inputs[F.HISTORY_ITEM_IDS].numpy()
    in_target = inputs[F.HISTORY_DOMAINS].numpy() == inputs[F.DOMAIN].numpy()[:, None]
    real = inputs[F.HISTORY_MASK].numpy()
    assert np.any(real & in_target) and np.any(real & ~in_target)
    # Target-domain entries are not source-domain behaviour: replacing them changes nothing.
    same = dict(inputs, **{F.HISTORY_ITEM_IDS: tf.constant(np.where(in_target, 7, items), tf.int32)})
    np.testing.assert_allclose(_ctr(model, same), before, rtol=0, atol=1e-6)
    # Source-domain entries are: replacing them changes the rows that have some.
    other = dict(inputs, **{F.HISTORY_ITEM_IDS: tf.constant(np.where(~in_target & real, 7, items), tf.int32)})
    changed = np.abs(_ctr(model, other) - before) > 1e-7
    np.testing.assert_array_equal(changed, np.any(real & ~in_target & (items != 7), axis=1))


def test_all_scope_reads_the_target_domain_entries():
    inputs, _, _ = _batch(("a", "b"))
    model = _model(_config())  # history_scope="all"
    before = _ctr(model, inputs)
    items = inputs[F.HISTORY_ITEM_IDS].numpy()
    in_target = (inputs[F.HISTORY_DOMAINS].numpy() == inputs[F.DOMAIN].numpy()[:, None]) & inputs[F.HISTORY_MASK].numpy()
    same_domain = dict(inputs, **{F.HISTORY_ITEM_IDS: tf.constant(np.where(in_target, 7, items), tf.int32)})
    changed = np.abs(_ctr(model, same_domain) - before) > 1e-7
    np.testing.assert_array_equal(changed, np.any(in_target & (items != 7), axis=1))


SINGLE_DOMAIN_USER = {"u4": [(1, "a", "x1", 1), (3, "a", "x2", 1), (8, "a", "x3", 0)]}


@pytest.mark.parametrize("query", ["target", "sequence"])
def test_without_other_domain_clicks_the_target_history_counts(query):
    # u4 never clicked outside domain a: its last impression's history is x1, x2, both in a.
    inputs, _, _ = _batch(("a", "b"), SINGLE_DOMAIN_USER)
    last = _select(inputs, [2])
    assert int(last[F.OTHER_DOMAIN_CLICKS][0]) == 0 and int(last[F.TARGET_DOMAIN_CLICKS][0]) == 2
    other = dict(last, **{name: tf.where(last[mask], 11, last[name]) for name, mask in (
        (F.HISTORY_ITEM_IDS, F.HISTORY_MASK), (F.DOMAIN_HISTORY_ITEM_IDS, F.DOMAIN_HISTORY_MASK))})
    # Default scope: other target-domain clicks (same counts) score differently.
    model = _model(_config(query=query))
    assert abs(float(_ctr(model, other)[0]) - float(_ctr(model, last)[0])) > 1e-5
    # The cold-start reading ("source") ignores them: only the click counts remain.
    model = _model(_config(query=query, history_scope="source"))
    np.testing.assert_allclose(_ctr(model, other), _ctr(model, last), rtol=0, atol=1e-7)


def test_history_is_weighted_by_relevance_to_the_candidate_by_hand():
    # One head of size 8. The domain level's W_1^Q = 0 gives a uniform a_1 over the real steps; the
    # item level's W_2^Q = W_2^K = I. History (mixed): A then B with history embeddings 3 e_0 and
    # 3 e_1; the candidates' target embeddings are the same vectors. Candidate A scores the steps
    # [A.A, A.B] / sqrt(8) = [9 / sqrt(8), 0]: weight e^s / (e^s + 1) on A, s = 9 / sqrt(8); B mirrors.
    events = {"u5": [(1, "a", "A", 1), (2, "b", "B", 1), (3, "a", "C", 0)]}
    inputs, _, _ = _batch(("a", "b"), events)
    row = _select(inputs, [2])
    a, b = (int(i) for i in preprocess.hash_ids(tf.constant([b"A", b"B"]), BUCKETS).numpy())
    assert a != b and list(row[F.HISTORY_ITEM_IDS].numpy()[0, -2:]) == [a, b]
    model = _model(_config(num_heads=1))
    model(row)
    model.seq_domain_attention.query_kernel.assign(np.zeros((8, 1, 8), "float32"))
    model.seq_item_attention.query_kernel.assign(np.eye(8, dtype="float32")[:, None, :])
    model.seq_item_attention.key_kernel.assign(np.eye(8, dtype="float32")[:, None, :])
    for table in (model.history_item_embedding, model.target_item_embedding):
        values = table.embeddings.numpy()
        values[a], values[b] = 3.0 * np.eye(8)[0], 3.0 * np.eye(8)[1]
        table.embeddings.assign(values)
    context = model.encode_context(row)
    s = 9.0 / np.sqrt(8.0)
    relevant = np.exp(s) / (np.exp(s) + 1.0)
    for candidate, expected in ((a, [relevant, 1.0 - relevant]), (b, [1.0 - relevant, relevant])):
        weights = model.history_weights(context, tf.constant([candidate]), tf.constant([0]))["sequence"]
        weights = keras.ops.convert_to_numpy(weights)[0, 0]  # (L,): padding first, A, B last
        np.testing.assert_allclose(weights[-2:], expected, rtol=1e-5)
        np.testing.assert_allclose(weights[:-2], 0.0, atol=0)
    with pytest.raises(ValueError, match="query='sequence'"):
        _model(_config(query="sequence")).history_weights(context, tf.constant([a]), tf.constant([0]))


def test_every_weight_gets_a_gradient():
    inputs, labels, _ = _batch(("a", "b"))
    model = _model(_config())
    with tf.GradientTape() as tape:
        outputs = model(inputs, training=True)
        loss = keras.losses.BinaryCrossentropy()(labels, outputs[F.SERVING_OUTPUT])
        loss += sum(model.auxiliary_losses(inputs, outputs, training=True).values())
    grads = tape.gradient(loss, model.trainable_variables)
    # 4 embedding tables, 2 + 2 per-domain tables, the statistics Dense (2), the domain-level W^Q, W^K
    # (2 x 2), the item-level W^Q, W^K, W^V, W^O (2 x 4), g, h and the logit (2 each).
    assert len(model.trainable_variables) == 28
    for variable, grad in zip(model.trainable_variables, grads):
        assert grad is not None, variable.path
        assert float(tf.reduce_sum(tf.abs(tf.convert_to_tensor(grad)))) > 0, variable.path


def test_one_training_step_lowers_the_loss():
    inputs, labels, _ = _batch(("a", "b"))
    model = _model(_config())
    _compile(model)
    before = _loss(model, inputs, labels)
    model.train_on_batch(inputs, {F.SERVING_OUTPUT: labels})
    assert _loss(model, inputs, labels) < before


def test_saved_model_serves_what_the_model_computes(tmp_path):
    inputs, labels, serialized = _batch(("a", "b"))
    config = _config()
    model = _model(config)
    _compile(model)
    model.train_on_batch(inputs, {F.SERVING_OUTPUT: labels})
    export.export(model, config.inputs, str(tmp_path / "1"))
    loaded = tf.saved_model.load(str(tmp_path / "1"))

    served = loaded.signatures[F.SERVING_SIGNATURE](**{F.SERVING_INPUT: tf.constant(serialized)})[F.SERVING_OUTPUT]
    np.testing.assert_allclose(served.numpy(), _ctr(model, inputs), rtol=1e-5)

    # Row 5 (u1's last impression) has history in both domains; candidates in both domains.
    candidates, domains = [b"x1", b"y2", b"q9"], [b"a", b"b", b"a"]
    scored = loaded.signatures[F.SCORE_CANDIDATES_SIGNATURE](**{
        F.SERVING_INPUT: tf.constant(serialized[5:6]), F.CANDIDATE_ITEM_IDS: tf.constant(candidates),
        F.CANDIDATE_DOMAINS: tf.constant(domains)})[F.SERVING_OUTPUT].numpy()
    rows = _select(inputs, [5, 5, 5])
    rows[F.ITEM_ID] = preprocess.hash_ids(tf.constant(candidates), BUCKETS)
    rows[F.DOMAIN] = tf.constant([0, 1, 0], tf.int32)
    expected = _ctr(model, rows)
    np.testing.assert_allclose(scored, expected, rtol=1e-5)
    assert len(set(np.round(scored, 6))) == 3


@pytest.mark.parametrize("flags", [
    {"use_domain_attention": False}, {"use_item_attention": False},
    {"use_domain_attention": False, "use_item_attention": False}, {"source_sequence": "per_domain"},
    {"history_scope": "source"}, {"query": "sequence"}, {"query": "sequence", "use_domain_attention": False},
    {"query": "sequence", "use_item_attention": False},
])
def test_ablations_build_train_and_change_the_model(flags):
    inputs, labels, _ = _batch(("a", "b"))
    full = _model(_config())
    model = _model(_config(**flags))
    _compile(model)
    before = _loss(model, inputs, labels)
    model.train_on_batch(inputs, {F.SERVING_OUTPUT: labels})
    assert _loss(model, inputs, labels) < before
    assert np.max(np.abs(_ctr(model, inputs) - _ctr(full, inputs))) > 1e-4
    # Without domain-level attention: 2 domain-token tables, the statistics Dense (kernel, bias) and
    # 2 x 2 allocation kernels (2 x 4 cross-attention kernels with query="sequence"); without
    # item-level attention: 2 x 4 kernels (and the item-side tokens with query="sequence").
    sequence_queries = flags.get("query") == "sequence"
    base = _model(_config(**{k: v for k, v in flags.items() if k == "query"}))
    base(inputs)
    removed = ((12 if sequence_queries else 8) * (not flags.get("use_domain_attention", True))
               + (9 if sequence_queries else 8) * (not flags.get("use_item_attention", True)))
    assert len(model.weights) == len(base.weights) - removed


def test_three_domains():
    inputs, labels, _ = _batch(("a", "b", "c"), {**EVENTS, **NEW_DOMAIN_EVENTS})
    assert set(inputs[F.DOMAIN].numpy()) == {0, 1, 2}
    model = _model(_config(("a", "b", "c")))
    _compile(model)
    before = _loss(model, inputs, labels)
    model.train_on_batch(inputs, {F.SERVING_OUTPUT: labels})
    assert _loss(model, inputs, labels) < before
    assert len(model.domain_embedding.tables) == len(model.domain_tokens.tables) == 3


# --- fine-tuning and new domains (sec. 3.5) ---------------------------------------------------


def test_finetune_trains_only_the_new_domain_items_and_attention():
    inputs, labels, _ = _batch(("a", "b", "c"), {**EVENTS, **NEW_DOMAIN_EVENTS})
    rows = np.flatnonzero(inputs[F.DOMAIN].numpy() == 2)  # target domain c, histories in a, b (and c)
    inputs, labels = _select(inputs, rows), labels[rows]
    model = _model(_config(("a", "b", "c")))
    trainable = dacdr.finetune_variables(model, 2)
    names = sorted(v.path.split("/", 1)[1] for v in trainable)
    assert names == sorted(["target_item_embedding/embeddings", "domain_embedding/domain_2", "domain_tokens/domain_2"]
                           + [f"{layer}_attention/{kernel}_kernel" for layer in ("seq_domain", "side_domain")
                              for kernel in ("query", "key")]
                           + [f"{layer}_attention/{kernel}_kernel" for layer in ("seq_item", "side_item")
                              for kernel in ("query", "key", "value", "output")])
    before = {id(v): np.array(v.numpy()) for v in model.weights}
    _compile(model)
    for _ in range(3):
        model.train_on_batch(inputs, {F.SERVING_OUTPUT: labels})
    trainable_ids = {id(v) for v in trainable}
    for variable in model.weights:
        if id(variable) in trainable_ids:
            assert not np.array_equal(variable.numpy(), before[id(variable)]), variable.path
        else:
            np.testing.assert_allclose(variable.numpy(), before[id(variable)], err_msg=variable.path, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="new_domain_index=3"):
        dacdr.finetune_variables(model, 3)


def test_expand_domains_keeps_old_domain_predictions():
    old_config = _config()
    old_inputs, labels, _ = _batch(("a", "b"))
    model = _model(old_config)
    _compile(model)
    model.train_on_batch(old_inputs, {F.SERVING_OUTPUT: labels})  # weights away from their initial values

    new_config = _config(("a", "b", "c"))
    expanded = dacdr.expand_domains(model, new_config)
    assert expanded.config == new_config and len(expanded.domain_embedding.tables) == 3
    # Same impressions (all in a and b) under the 3-domain contract: one more, empty, domain history row.
    new_inputs, _, _ = _batch(("a", "b", "c"))
    assert new_inputs[F.DOMAIN_HISTORY_MASK].shape[1] == 3
    np.testing.assert_allclose(_ctr(expanded, new_inputs), _ctr(model, old_inputs), rtol=1e-6)
    # The new domain scores (with its fresh slots) and can then be fine-tuned.
    c_inputs, _, _ = _batch(("a", "b", "c"), NEW_DOMAIN_EVENTS)
    assert np.all(np.isfinite(_ctr(expanded, c_inputs)))
    assert len(dacdr.finetune_variables(expanded, 2)) == 15

    with pytest.raises(ValueError, match="must extend"):
        dacdr.expand_domains(model, _config(("b", "a", "c")))
    with pytest.raises(ValueError, match="except for `inputs.domains`"):
        dacdr.expand_domains(model, dataclasses.replace(new_config, num_item_tokens=1))


def test_runs_on_the_tensorflow_backend():
    assert keras.backend.backend() == "tensorflow"
