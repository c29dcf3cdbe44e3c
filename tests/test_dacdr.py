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
from models.layers.cross_attention import CrossAttention
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
    config = _config(num_domain_tokens=3, source_sequence="per_domain", use_item_attention=False)
    assert (config.num_domain_tokens, config.source_sequence, config.use_item_attention) == (3, "per_domain", False)
    assert registry.resolve_config("dacdr", config_lib.to_dict(config)) == config
    model = dacdr.DACDR(config)
    assert dacdr.DACDR.from_config(model.get_config()).config == config
    with pytest.raises(ValueError, match="source_sequence='both'"):
        registry.build("dacdr", _config(source_sequence="both"))
    with pytest.raises(ValueError, match="num_heads=3"):
        registry.build("dacdr", _config(num_heads=3))  # 3 does not divide embedding_dim 8
    with pytest.raises(ValueError, match="inputs.domains"):
        registry.build("dacdr", _config(domains=("a",)))
    with pytest.raises(ValueError, match="expects bool"):
        _config(use_domain_attention="yes")


# --- model ------------------------------------------------------------------------------------


@pytest.mark.parametrize("source_sequence", ["mixed", "per_domain"])
def test_fully_padded_histories_give_finite_ctr(source_sequence):
    config = _config(source_sequence=source_sequence)
    inputs = dacdr.dummy_inputs(config.inputs, batch=2)
    inputs[F.USER_ID] = tf.constant([3, 4])
    inputs[F.ITEM_ID] = tf.constant([5, 6])
    inputs[F.DOMAIN] = tf.constant([0, 1])
    ctr = _ctr(_model(config), inputs)
    assert ctr.shape == (2,) and np.all(np.isfinite(ctr)) and np.all((ctr > 0) & (ctr < 1))


def test_target_domain_entries_of_the_mixed_history_are_ignored():
    inputs, _, _ = _batch(("a", "b"))
    model = _model(_config())
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


def test_every_weight_gets_a_gradient():
    inputs, labels, _ = _batch(("a", "b"))
    model = _model(_config())
    with tf.GradientTape() as tape:
        outputs = model(inputs, training=True)
        loss = keras.losses.BinaryCrossentropy()(labels, outputs[F.SERVING_OUTPUT])
        loss += sum(model.auxiliary_losses(inputs, outputs, training=True).values())
    grads = tape.gradient(loss, model.trainable_variables)
    assert len(model.trainable_variables) == 33
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
    # 2 x 4 attention kernels; without item-level attention: the item-side tokens and 2 x 4 kernels.
    removed = 12 * (not flags.get("use_domain_attention", True)) + 9 * (not flags.get("use_item_attention", True))
    assert len(model.weights) == len(full.weights) - removed


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
                           + [f"{layer}_attention/{kernel}_kernel" for layer in ("seq_domain", "side_domain",
                                                                                 "seq_item", "side_item")
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
    assert len(dacdr.finetune_variables(expanded, 2)) == 19

    with pytest.raises(ValueError, match="must extend"):
        dacdr.expand_domains(model, _config(("b", "a", "c")))
    with pytest.raises(ValueError, match="except for `inputs.domains`"):
        dacdr.expand_domains(model, dataclasses.replace(new_config, num_item_tokens=1))


def test_runs_on_the_tensorflow_backend():
    assert keras.backend.backend() == "tensorflow"
