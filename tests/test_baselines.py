"""The honest baselines (models/baselines.py, models/bilinear.py, models/sasrec.py) and the DIN target attention layer."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import models
import models.baselines  # noqa: F401  (registers the baselines)
from components.ingest import sequences
from components.ingest.records import Impression
from components.trainer import export, preprocess
from models import config as config_lib
from models.layers.target_attention import TargetAttention
from xdctr import features as F

NAMES = ["single_domain_dnn", "single_domain_din", "dnn_multi", "shared_bottom", "bilinear_recency", "sasrec"]
SINGLE_DOMAIN = ["single_domain_dnn", "single_domain_din"]
# Every model, plus the DIN's softmax ablation, the bilinear model's time-gap recency and sum pooling
# and SASRec's item bias and domain queries.
VARIANTS = [(name, {}) for name in NAMES] + [("single_domain_din", {"softmax": True}),
                                             ("bilinear_recency", {"recency": "time_gap"}),
                                             ("bilinear_recency", {"pooling": "sum"}),
                                             ("sasrec", {"item_bias": True}), ("sasrec", {"domain_query": True})]
VARIANT_IDS = NAMES + ["single_domain_din-softmax", "bilinear_recency-time_gap", "bilinear_recency-sum", "sasrec-item_bias",
                       "sasrec-domain_query"]
HISTORY, DOMAIN_HISTORY, BUCKETS, BATCH = 4, 3, 50, 8


def _config(name, domains=("a", "b"), **overrides):
    small = {
        "single_domain_dnn": {"embedding_dim": 4, "hidden_units": [8]},
        "single_domain_din": {"embedding_dim": 4, "hidden_units": [8], "attention_units": [4]},
        "dnn_multi": {"embedding_dim": 4, "domain_embedding_dim": 2, "hidden_units": [8]},
        "shared_bottom": {"embedding_dim": 4, "domain_embedding_dim": 2, "bottom_units": [8], "tower_units": [4]},
        "bilinear_recency": {"embedding_dim": 4},
        "sasrec": {"embedding_dim": 4, "num_layers": 1, "num_heads": 2},
    }[name]
    small.update(overrides)
    small["inputs"] = {"domains": list(domains), "history_length": HISTORY,
                       "domain_history_length": DOMAIN_HISTORY, "item_buckets": BUCKETS, "user_buckets": BUCKETS}
    return models.resolve_config(name, small)


def _build(name, domains=("a", "b"), seed=1, **overrides):
    keras.utils.set_random_seed(seed)
    return models.build(name, _config(name, domains, **overrides))


def _left_padded(rng, shape):
    """Random ids (..., length) with 1..length real entries each, left-padded with 0."""
    length = shape[-1]
    lengths = rng.integers(1, length + 1, size=shape[:-1])
    mask = np.arange(length) >= (length - lengths[..., None])
    return np.where(mask, rng.integers(1, BUCKETS, shape), 0).astype("int32"), mask


def _inputs(num_domains=2, batch=BATCH, seed=0, domain=None):
    """A fixed synthetic batch; row b is in domain b % D unless `domain` is given."""
    rng = np.random.default_rng(seed)
    history, history_mask = _left_padded(rng, (batch, HISTORY))
    domain_history, domain_mask = _left_padded(rng, (batch, num_domains, DOMAIN_HISTORY))
    domains = np.arange(batch) % num_domains if domain is None else np.full(batch, domain)
    return {
        F.USER_ID: rng.integers(1, BUCKETS, batch).astype("int32"),
        F.ITEM_ID: rng.integers(1, BUCKETS, batch).astype("int32"),
        F.DOMAIN: domains.astype("int32"),
        F.HISTORY_ITEM_IDS: history,
        F.HISTORY_DOMAINS: np.where(history_mask, rng.integers(0, num_domains, history.shape), 0).astype("int32"),
        F.HISTORY_MASK: history_mask,
        F.HISTORY_TIME_GAPS: np.where(history_mask, rng.integers(1, F.NUM_TIME_GAP_BUCKETS, history.shape), 0).astype("int32"),
        F.DOMAIN_HISTORY_ITEM_IDS: domain_history,
        F.DOMAIN_HISTORY_MASK: domain_mask,
        F.TARGET_DOMAIN_CLICKS: domain_mask.sum(axis=(1, 2)).astype("int32"),
        F.OTHER_DOMAIN_CLICKS: history_mask.sum(axis=1).astype("int32"),
    }


LABELS = np.array([1, 0, 0, 1, 1, 0, 1, 0], "float32")


def _ctr(model, inputs):
    return keras.ops.convert_to_numpy(model(inputs)[F.SERVING_OUTPUT])


def _compile(model, learning_rate=0.05):
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss={F.SERVING_OUTPUT: keras.losses.BinaryCrossentropy()})


# ----------------------------------------------------------------------------------------------
# TargetAttention


def _attention_case():
    # history steps h1 = [1, 0], h2 = [0, 2] and a padded step [5, 5]; target t = [1, 1].
    history = np.array([[[5.0, 5.0], [1.0, 0.0], [0.0, 2.0]]], "float32")
    target = np.array([[1.0, 1.0]], "float32")
    mask = np.array([[False, True, True]])
    return history, target, mask


def test_target_attention_by_hand():
    # ones kernels, zero biases, one hidden unit, linear activation: a(h, t) is the sum of
    # [h, t, h - t, h * t] = 2 * sum(h) + h . t, times 1 (output unit).
    # a(h1) = 2 * 1 + 1 = 3; a(h2) = 2 * 2 + 2 = 6; no softmax (DIN eq. 3):
    # v = 3 * [1, 0] + 6 * [0, 2] = [3, 12]; the padded step is ignored.
    layer = TargetAttention([1], activation="linear", kernel_initializer="ones")
    out = keras.ops.convert_to_numpy(layer(*_attention_case()))
    np.testing.assert_allclose(out, [[3.0, 12.0]], rtol=1e-6)


def test_target_attention_softmax_by_hand():
    # Same scores 3 and 6, normalised over the two real steps: w = [e^3, e^6] / (e^3 + e^6)
    # = [0.0474259, 0.9525741]; v = w1 * [1, 0] + w2 * [0, 2] = [0.0474259, 1.9051482].
    layer = TargetAttention([1], activation="linear", softmax=True, kernel_initializer="ones")
    out = keras.ops.convert_to_numpy(layer(*_attention_case()))
    np.testing.assert_allclose(out, [[0.0474259, 1.9051482]], rtol=1e-5)


def test_target_attention_prelu_by_hand():
    # PReLU starts with slope 0, i.e. ReLU: with kernel ones the hidden unit is relu(3) = 3 and
    # relu(6) = 6 as above; with kernel -ones it is relu(-3) = relu(-6) = 0, so the weights are 0.
    history, target, mask = _attention_case()
    out = keras.ops.convert_to_numpy(TargetAttention([1], kernel_initializer="ones")(history, target, mask))
    np.testing.assert_allclose(out, [[3.0, 12.0]], rtol=1e-6)
    negative = TargetAttention([1], kernel_initializer=keras.initializers.Constant(-1.0))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(negative(history, target, mask)), [[0.0, 0.0]])


@pytest.mark.parametrize("softmax", [False, True])
def test_target_attention_fully_padded_history_gives_zeros(softmax):
    # Row 0 is fully padded: zeros. Row 1 has one real step h = [7, 7], t = [1, 1]; with ones
    # kernels each of the 2 hidden units is 2 * 14 + 14 = 42 and the score is 84: without softmax
    # v = 84 * [7, 7] = [588, 588]; with softmax the single real step has weight 1: v = [7, 7].
    history = np.full((2, 3, 2), 7.0, "float32")
    target = np.ones((2, 2), "float32")
    mask = np.array([[False, False, False], [False, False, True]])
    layer = TargetAttention([2], softmax=softmax, kernel_initializer="ones")
    out = keras.ops.convert_to_numpy(layer(history, target, mask))
    np.testing.assert_allclose(out[0], [0.0, 0.0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(out[1], [7.0, 7.0] if softmax else [588.0, 588.0], rtol=1e-6)


def test_target_attention_config_and_errors():
    layer = TargetAttention([3, 2], activation="sigmoid", softmax=True)
    clone = TargetAttention.from_config(layer.get_config())
    assert (clone.hidden_units, clone.activation, clone.softmax) == ((3, 2), "sigmoid", True)
    with pytest.raises(ValueError, match=r"hidden_units=\(4, 0\)"):
        TargetAttention([4, 0])
    with pytest.raises(ValueError, match="activation='nope'"):
        TargetAttention([4], activation="nope")
    with pytest.raises(ValueError, match="same embedding size"):
        TargetAttention([4])(np.ones((1, 2, 3), "float32"), np.ones((1, 2), "float32"), np.ones((1, 2), bool))


# ----------------------------------------------------------------------------------------------
# Models


def test_all_baselines_are_registered():
    assert set(NAMES) <= set(models.names())


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip_and_bad_values(name):
    config = _config(name, embedding_dim=6)
    assert config.embedding_dim == 6 and config.inputs.history_length == HISTORY
    assert models.resolve_config(name, config_lib.to_dict(config)) == config
    model = models.build(name, config)
    assert type(model).from_config(model.get_config()).config == config
    with pytest.raises(ValueError, match="embedding_dim=0"):
        models.build(name, _config(name, embedding_dim=0))


@pytest.mark.parametrize("name", SINGLE_DOMAIN)
def test_single_domain_config_names_a_known_domain(name):
    assert models.default_config(name).domain == ""
    assert models.build(name, _config(name, domain="b")).config.domain == "b"
    with pytest.raises(ValueError, match="domain='zz'"):
        models.build(name, _config(name, domain="zz"))


@pytest.mark.parametrize("name,overrides", VARIANTS, ids=VARIANT_IDS)
def test_fully_padded_histories_give_finite_ctr(name, overrides):
    model = _build(name, **overrides)
    inputs = _inputs()
    for ids, mask in ((F.HISTORY_ITEM_IDS, F.HISTORY_MASK), (F.DOMAIN_HISTORY_ITEM_IDS, F.DOMAIN_HISTORY_MASK)):
        inputs[ids] = np.zeros_like(inputs[ids])
        inputs[mask] = np.zeros_like(inputs[mask])
    ctr = _ctr(model, inputs)
    assert ctr.shape == (BATCH,)
    assert np.all(np.isfinite(ctr)) and np.all((ctr > 0) & (ctr < 1))


@pytest.mark.parametrize("name,overrides", VARIANTS, ids=VARIANT_IDS)
def test_every_weight_gets_a_gradient(name, overrides):
    model = _build(name, **overrides)
    inputs = _inputs()
    with tf.GradientTape() as tape:
        outputs = model(inputs, training=True)
        loss = keras.losses.BinaryCrossentropy()(LABELS, outputs[F.SERVING_OUTPUT])
        for value in model.auxiliary_losses(inputs, outputs, training=True).values():
            loss += value
    grads = tape.gradient(loss, model.trainable_variables)
    assert len(grads) == len(model.trainable_variables) > 0
    for variable, grad in zip(model.trainable_variables, grads):
        assert grad is not None, variable.path
        assert float(tf.reduce_sum(tf.abs(tf.convert_to_tensor(grad)))) > 0, variable.path


@pytest.mark.parametrize("name,overrides", VARIANTS, ids=VARIANT_IDS)
def test_one_training_step_lowers_the_loss(name, overrides):
    model = _build(name, **overrides)
    inputs = _inputs()
    _compile(model)
    before = model.evaluate(inputs, {F.SERVING_OUTPUT: LABELS}, verbose=0)
    model.train_on_batch(inputs, {F.SERVING_OUTPUT: LABELS})
    after = model.evaluate(inputs, {F.SERVING_OUTPUT: LABELS}, verbose=0)
    assert after < before


def _domain_weights(model, domain):
    """Every parameter of one domain in a single-domain model: its block of the item table and
    the weights of its attention unit, tower and output unit."""
    table = keras.ops.convert_to_numpy(model.item_embedding.embeddings)
    block = table[domain * BUCKETS:(domain + 1) * BUCKETS]
    per_domain = [model.towers[domain], model.logits[domain]] + (
        [model.attentions[domain]] if hasattr(model, "attentions") else [])
    return [block] + [keras.ops.convert_to_numpy(w) for layer in per_domain for w in layer.weights]


@pytest.mark.parametrize("name", SINGLE_DOMAIN)
def test_single_domain_models_leave_other_domains_bit_identical(name):
    # One Adam step on rows of domain 0 only: domain 1's parameters must not move at all, so
    # training on all domains at once is training independent per-domain models.
    model = _build(name)
    inputs = _inputs(domain=0)
    model(inputs)
    before = {d: _domain_weights(model, d) for d in (0, 1)}
    assert sum(w.size for w in before[1]) == sum(w.size for w in before[0]) > 0
    _compile(model)
    model.train_on_batch(inputs, {F.SERVING_OUTPUT: LABELS})
    after = {d: _domain_weights(model, d) for d in (0, 1)}
    for old, new in zip(before[1], after[1]):
        np.testing.assert_allclose(old, new, rtol=0, atol=1e-6)
    assert all(not np.array_equal(old, new) for old, new in zip(before[0], after[0]))


@pytest.mark.parametrize("name", SINGLE_DOMAIN)
def test_single_domain_models_read_only_the_target_domain_history(name):
    model = _build(name)
    inputs = _inputs()
    expected = _ctr(model, inputs)
    other = dict(inputs)  # every row is in domain b % 2: change the other domain's rows and the mixed history
    other_row = (1 - inputs[F.DOMAIN])[:, None]  # (batch, 1)
    rows = np.arange(DOMAIN_HISTORY)[None, :]
    domain_history = inputs[F.DOMAIN_HISTORY_ITEM_IDS].copy()
    domain_history[np.arange(BATCH)[:, None], other_row, rows] = 7
    other[F.DOMAIN_HISTORY_ITEM_IDS] = domain_history
    other[F.HISTORY_ITEM_IDS] = np.full_like(inputs[F.HISTORY_ITEM_IDS], 9)
    np.testing.assert_allclose(_ctr(model, other), expected, rtol=0, atol=1e-6)
    own = dict(inputs)
    own[F.DOMAIN_HISTORY_ITEM_IDS] = np.where(domain_history == 7, inputs[F.DOMAIN_HISTORY_ITEM_IDS], 7)
    assert np.all(_ctr(model, own) != expected)


@pytest.mark.parametrize("name", ["dnn_multi", "shared_bottom", "bilinear_recency"])
def test_multi_domain_models_depend_on_the_domain(name):
    model = _build(name)
    inputs = _inputs()
    if name == "bilinear_recency":  # its domain bias starts at 0
        model(inputs)
        model.domain_bias.embeddings.assign([[0.5], [-0.5]])
    flipped = dict(inputs, **{F.DOMAIN: (1 - inputs[F.DOMAIN]).astype("int32")})
    assert np.all(_ctr(model, flipped) != _ctr(model, inputs))


def test_din_softmax_ablation_changes_the_output():
    plain, normalised = _build("single_domain_din"), _build("single_domain_din", softmax=True)
    inputs = _inputs()
    plain(inputs)
    normalised(inputs)
    normalised.set_weights(plain.get_weights())
    assert not np.allclose(_ctr(plain, inputs), _ctr(normalised, inputs))


@pytest.mark.parametrize("name", NAMES)
def test_three_domains(name):
    model = _build(name, domains=("a", "b", "c"))
    inputs = _inputs(num_domains=3)
    _compile(model)
    before = model.evaluate(inputs, {F.SERVING_OUTPUT: LABELS}, verbose=0)
    model.train_on_batch(inputs, {F.SERVING_OUTPUT: LABELS})
    assert model.evaluate(inputs, {F.SERVING_OUTPUT: LABELS}, verbose=0) < before
    ctr = _ctr(model, inputs)
    assert ctr.shape == (BATCH,) and np.all(np.isfinite(ctr))


# ----------------------------------------------------------------------------------------------
# SavedModel


def _serialized_rows():
    contract = F.Contract(("a", "b"), HISTORY, DOMAIN_HISTORY)
    events = [Impression(1, "u1", "a", "x1", 1), Impression(2, "u1", "b", "y1", 1),
              Impression(3, "u1", "a", "x2", 0), Impression(4, "u1", "b", "y2", 1),
              Impression(5, "u1", "a", "x3", 1), Impression(1, "u2", "b", "y2", 0), Impression(2, "u2", "b", "y1", 1)]
    rows = list(sequences.user_examples("u1", events[:5], contract)) + list(sequences.user_examples("u2", events[5:], contract))
    return [sequences.to_tf_example(r).SerializeToString() for r in rows]


@pytest.mark.parametrize("name", NAMES)
def test_saved_model_serves_what_the_model_computes(name, tmp_path):
    model = _build(name)
    config = model.config.inputs
    serialized = _serialized_rows()
    inputs = preprocess.to_model_inputs(preprocess.parse(tf.constant(serialized), config), config)
    expected = _ctr(model, inputs)
    export.export(model, config, str(tmp_path / "1"))
    loaded = tf.saved_model.load(str(tmp_path / "1"))
    served = loaded.signatures[F.SERVING_SIGNATURE](**{F.SERVING_INPUT: tf.constant(serialized)})[F.SERVING_OUTPUT]
    np.testing.assert_allclose(served.numpy(), expected, rtol=1e-5)

    # score_candidates: the context of row 4 (u1 before its 5th event) against three candidates
    # in both domains equals the model on copies of row 4 whose target is each candidate.
    items, domains = [b"x1", b"y2", b"z9"], [b"a", b"b", b"b"]
    candidates = {key: tf.repeat(value[4:5], 3, axis=0) for key, value in inputs.items()}
    candidates[F.ITEM_ID] = preprocess.hash_ids(tf.constant(items), config.item_buckets)
    candidates[F.DOMAIN] = preprocess.domain_index(tf.constant(domains), config.domains)[0]
    scored = loaded.signatures[F.SCORE_CANDIDATES_SIGNATURE](**{
        F.SERVING_INPUT: tf.constant(serialized[4:5]), F.CANDIDATE_ITEM_IDS: tf.constant(items),
        F.CANDIDATE_DOMAINS: tf.constant(domains)})[F.SERVING_OUTPUT]
    np.testing.assert_allclose(scored.numpy(), _ctr(model, candidates), rtol=1e-5)
    assert len(set(np.round(scored.numpy(), 7))) == 3


# ----------------------------------------------------------------------------------------------
# bilinear_recency


def _bilinear_by_hand(recency="position", pooling="mean"):
    """A 2-step history, dim 2, set weights; returns (model, inputs)."""
    model = _build("bilinear_recency", embedding_dim=2, recency=recency, pooling=pooling)
    inputs = _inputs(batch=2)
    # Row 0: history [pad, pad, item 1, item 2] (item 2 is the latest), target item 3, domain 0.
    # Row 1: no history at all, target item 3, domain 1.
    inputs[F.HISTORY_ITEM_IDS] = np.array([[0, 0, 1, 2], [0, 0, 0, 0]], "int32")
    inputs[F.HISTORY_MASK] = inputs[F.HISTORY_ITEM_IDS] > 0
    inputs[F.HISTORY_TIME_GAPS] = np.array([[0, 0, 5, 1], [0, 0, 0, 0]], "int32")
    inputs[F.ITEM_ID] = np.array([3, 3], "int32")
    inputs[F.DOMAIN] = np.array([0, 1], "int32")
    model(inputs)
    table = np.zeros((BUCKETS, 2), "float32")
    table[1], table[2], table[3] = [1.0, 0.0], [0.0, 2.0], [1.0, 1.0]
    model.item_embedding.embeddings.assign(table)
    bias = np.zeros((BUCKETS, 1), "float32")
    bias[3] = 0.25
    model.item_bias.embeddings.assign(bias)
    model.domain_bias.embeddings.assign([[0.5], [-1.0]])
    model.bilinear.assign([[1.0, 0.0], [0.0, 3.0]])  # M = diag(1, 3)
    return model, inputs


def _logit(p):
    return np.log(p / (1 - p))


def test_bilinear_recency_by_hand_position_weights():
    model, inputs = _bilinear_by_hand()
    # Recency logits by position: a_2 = 0 (item 1), a_3 = ln 3 (item 2, the latest): w = [1/4, 3/4].
    model.recency_logits.assign([5.0, 5.0, 0.0, np.log(3.0)])  # positions 0, 1 are padding: no weight
    # u = 1/4 [1, 0] + 3/4 [0, 2] = [0.25, 1.5]; M u = [0.25, 4.5]; E[3] . M u = 4.75;
    # + b_item 0.25 + b_domain 0.5 = 5.5. Row 1 has no history: u = 0, logit = 0.25 - 1.0 = -0.75.
    np.testing.assert_allclose(_logit(_ctr(model, inputs)), [5.5, -0.75], rtol=1e-4)


def test_bilinear_recency_by_hand_time_gap_weights():
    model, inputs = _bilinear_by_hand(recency="time_gap")
    logits = np.zeros(F.NUM_TIME_GAP_BUCKETS, "float32")
    logits[1], logits[5] = np.log(4.0), 0.0  # gap bucket 1 (item 2) weighs 4x bucket 5 (item 1)
    model.recency_logits.assign(logits)
    # w = [1/5, 4/5]; u = [0.2, 1.6]; M u = [0.2, 4.8]; E[3] . M u = 5.0; + 0.25 + 0.5 = 5.75.
    np.testing.assert_allclose(_logit(_ctr(model, inputs)), [5.75, -0.75], rtol=1e-4)


def test_bilinear_recency_by_hand_sum_pooling():
    model, inputs = _bilinear_by_hand(pooling="sum")
    # Unnormalised: w = [1/2, 1/4] (a softmax would make them [2/3, 1/3]).
    model.recency_logits.assign([5.0, 5.0, np.log(0.5), np.log(0.25)])
    # u = 1/2 [1, 0] + 1/4 [0, 2] = [0.5, 0.5]; M u = [0.5, 1.5]; E[3] . M u = 2; + 0.25 + 0.5 = 2.75.
    np.testing.assert_allclose(_logit(_ctr(model, inputs)), [2.75, -0.75], rtol=1e-4)
    # A click more before the same two adds its own weight and leaves theirs: the sum grows by
    # exp(a_1) E[item 4] (here a_1 = 0 and E[4] = [0.5, 0], so E[3] . M [0.5, 0] = 0.5).
    table = model.item_embedding.embeddings.numpy()
    table[4] = [0.5, 0.0]
    model.item_embedding.embeddings.assign(table)
    model.recency_logits.assign([5.0, 0.0, np.log(0.5), np.log(0.25)])
    longer = dict(inputs, **{F.HISTORY_ITEM_IDS: np.array([[0, 4, 1, 2], [0, 0, 0, 0]], "int32")})
    longer[F.HISTORY_MASK] = longer[F.HISTORY_ITEM_IDS] > 0
    np.testing.assert_allclose(_logit(_ctr(model, longer)), [3.25, -0.75], rtol=1e-4)


def test_bilinear_recency_sum_pooling_starts_as_the_mean_of_a_full_history():
    mean, summed = _build("bilinear_recency", pooling="mean"), _build("bilinear_recency", pooling="sum")
    np.testing.assert_allclose(mean.recency_logits.numpy(), np.zeros(HISTORY))
    np.testing.assert_allclose(summed.recency_logits.numpy(), np.full(HISTORY, -np.log(HISTORY)), rtol=1e-6)
    inputs = _inputs()
    mean(inputs), summed(inputs)
    for name in ("item_embedding", "item_bias", "domain_bias"):
        getattr(summed, name).set_weights(getattr(mean, name).get_weights())
    summed.bilinear.assign(mean.bilinear.numpy())
    full = dict(inputs, **{F.HISTORY_ITEM_IDS: np.full_like(inputs[F.HISTORY_ITEM_IDS], 5),
                           F.HISTORY_MASK: np.ones_like(inputs[F.HISTORY_MASK])})
    np.testing.assert_allclose(_ctr(summed, full), _ctr(mean, full), atol=1e-6)


def test_bilinear_recency_reads_only_the_mixed_history():
    model = _build("bilinear_recency")
    inputs = _inputs()
    expected = _ctr(model, inputs)
    other = dict(inputs, **{F.DOMAIN_HISTORY_ITEM_IDS: np.full_like(inputs[F.DOMAIN_HISTORY_ITEM_IDS], 7),
                            F.HISTORY_DOMAINS: np.zeros_like(inputs[F.HISTORY_DOMAINS])})
    np.testing.assert_allclose(_ctr(model, other), expected, rtol=0, atol=1e-6)
    changed = dict(inputs, **{F.HISTORY_ITEM_IDS: np.where(inputs[F.HISTORY_MASK], 9, 0).astype("int32")})
    # Rows whose history was item 9 throughout stay as they were; every other row moves.
    differs = [np.any(row[mask] != 9) for row, mask in zip(inputs[F.HISTORY_ITEM_IDS], inputs[F.HISTORY_MASK])]
    assert any(differs) and np.all((_ctr(model, changed) != expected) == np.array(differs))


def test_bilinear_recency_config_errors():
    with pytest.raises(ValueError, match="recency='newest'"):
        models.build("bilinear_recency", _config("bilinear_recency", recency="newest"))
    with pytest.raises(ValueError, match="pooling='max'"):
        models.build("bilinear_recency", _config("bilinear_recency", pooling="max"))
    model = models.build("bilinear_recency", _config("bilinear_recency"))
    assert tuple(model.recency_logits.shape) == (HISTORY,)
    assert tuple(models.build("bilinear_recency", _config("bilinear_recency", recency="time_gap"))
                 .recency_logits.shape) == (F.NUM_TIME_GAP_BUCKETS,)
