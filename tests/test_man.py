"""MAN (Mixed Attention Network): its layers by hand, masks, config, training, ablations, export."""

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import models
import models.man  # noqa: F401  (registers "man")
from components.ingest import sequences
from components.ingest.records import Impression
from components.trainer import export, preprocess
from models import config as config_lib
from models.layers.mixed_attention import (
    GroupPrototypeAttention,
    ItemSimilarityAttention,
    SequenceFusionAttention,
    prototype_disentanglement_loss,
)
from models.layers.masking import masked_softmax
from models.layers.transformer import MultiHeadAttention, SASRecEncoder
from xdctr import features as F

from modelkit import labels as _labels, model_inputs as _inputs, served_ctr as _ctr, to_numpy as _np

HISTORY, DOMAIN_HISTORY = 4, 3


def _softmax(x):
    e = np.exp(np.asarray(x, "float64") - np.max(x))
    return e / e.sum()


# ---------------------------------------------------------------- layers, by hand


def test_masked_softmax_by_hand():
    # Row 0: softmax over logits 1 and 3 only -> [1, e^2] / (1 + e^2); the masked 2 gets exactly 0.
    # Row 1: fully masked -> zeros, not a uniform average of padding and not NaN.
    logits = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], "float32")
    mask = np.array([[True, False, True], [False, False, False]])
    out = _np(masked_softmax(logits, mask))
    e2 = math.exp(2.0)
    np.testing.assert_allclose(out, [[1 / (1 + e2), 0.0, e2 / (1 + e2)], [0.0, 0.0, 0.0]], rtol=1e-6)


def test_attention_by_hand():
    # W^Q = W^K = W^V = ones(2, 2): q = [1, 1]; keys/values [1, 0] -> [1, 1], [0, 2] -> [2, 2].
    # Logits q.k / sqrt(2) = [sqrt(2), 2 sqrt(2)]; output = w1 * 1 + w2 * 2 in both components.
    layer = MultiHeadAttention(kernel_initializer="ones")
    query = np.array([[[1.0, 0.0]]], "float32")  # (1, 1, 2)
    value = np.array([[[1.0, 0.0], [0.0, 2.0]]], "float32")  # (1, 2, 2)
    w = _softmax([math.sqrt(2), 2 * math.sqrt(2)])
    np.testing.assert_allclose(_np(layer(query, value)), [[[w[0] + 2 * w[1]] * 2]], rtol=1e-5)
    # Second key masked: all weight on [1, 1]. All keys masked: zeros.
    np.testing.assert_allclose(_np(layer(query, value, attention_mask=np.array([[[True, False]]]))), [[[1.0, 1.0]]],
                               rtol=1e-6)
    np.testing.assert_allclose(_np(layer(query, value, attention_mask=np.array([[[False, False]]]))), [[[0.0, 0.0]]])
    assert MultiHeadAttention.from_config(layer.get_config()).num_heads == 1


def test_attention_rejects_bad_heads():
    with pytest.raises(ValueError, match="num_heads=0"):
        MultiHeadAttention(num_heads=0)
    with pytest.raises(ValueError, match="num_heads=3"):
        MultiHeadAttention(num_heads=3)(np.zeros((1, 2, 4), "float32"), np.zeros((1, 2, 4), "float32"))


def test_sasrec_encoder_is_causal_and_ignores_padding():
    keras.utils.set_random_seed(3)
    encoder = SASRecEncoder(num_layers=2, num_heads=2)
    x = np.random.default_rng(0).normal(size=(2, 4, 4)).astype("float32")
    mask = np.array([[True, True, True, True], [False, False, True, True]])
    out = _np(encoder(x, mask))
    later = x.copy()
    later[:, 3] = [[3.0, -1.0, 0.0, 2.0], [-2.0, 0.5, 1.0, 0.0]]  # a later step never changes earlier outputs
    np.testing.assert_allclose(_np(encoder(later, mask))[:, :3], out[:, :3], rtol=1e-5, atol=1e-6)
    assert np.abs(_np(encoder(later, mask))[:, 3] - out[:, 3]).max() > 1e-3
    padded = x.copy()
    padded[1, :2] = 100.0  # values under padding never matter
    np.testing.assert_allclose(_np(encoder(padded, mask)), out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[1, :2], 0.0, rtol=0, atol=1e-6)  # padded steps are zeros
    empty = _np(encoder(x, np.zeros((2, 4), bool)))
    np.testing.assert_allclose(empty, 0.0, rtol=0, atol=1e-6)  # fully padded: zeros, finite
    assert SASRecEncoder.from_config(encoder.get_config()).num_layers == 2
    with pytest.raises(ValueError, match="num_layers=0"):
        SASRecEncoder(num_layers=0)


def test_item_similarity_attention_by_hand():
    # MLP with one ReLU unit and a linear unit, ones kernels, zero biases: F_t = relu(sum(target) + sum(X_t)).
    # target = [0, 0]; X = [[5, 5] (padding), [1, 0], [2, 1]] -> F = [-, 1, 3];
    # e = (e^1 [1, 0] + e^3 [2, 1]) / (e^1 + e^3).
    layer = ItemSimilarityAttention(hidden_units=(1,), kernel_initializer="ones")
    target = np.array([[0.0, 0.0]], "float32")
    sequence = np.array([[[5.0, 5.0], [1.0, 0.0], [2.0, 1.0]]], "float32")
    out = _np(layer(target, sequence, np.array([[False, True, True]])))
    w = _softmax([1.0, 3.0])
    np.testing.assert_allclose(out, [[w[0] * 1 + w[1] * 2, w[1] * 1]], rtol=1e-5)
    np.testing.assert_allclose(_np(layer(target, sequence, np.zeros((1, 3), bool))), [[0.0, 0.0]], rtol=0, atol=1e-6)
    assert ItemSimilarityAttention.from_config(layer.get_config()).hidden_units == (1,)


def test_sequence_fusion_attention_by_hand():
    # CA([1, 0] over [[1, 0], [0, 2]]) = [c, c] with c = w1 + 2 w2 (see test_attention_by_hand);
    # + residual [1, 0] -> [1 + c, c]; MLP: relu(1 + 2c) -> output Dense(2, ones) -> [1 + 2c, 1 + 2c].
    layer = SequenceFusionAttention(hidden_units=(1,), kernel_initializer="ones")
    local = np.array([[[1.0, 0.0]]], "float32")
    global_ = np.array([[[1.0, 0.0], [0.0, 2.0]]], "float32")
    w = _softmax([math.sqrt(2), 2 * math.sqrt(2)])
    c = w[0] + 2 * w[1]
    np.testing.assert_allclose(_np(layer(local, global_, np.array([[True, True]]))), [[[1 + 2 * c] * 2]], rtol=1e-5)
    # Second global step masked: CA = [1, 1]; [2, 1] -> relu(3) -> [3, 3].
    np.testing.assert_allclose(_np(layer(local, global_, np.array([[True, False]]))), [[[3.0, 3.0]]], rtol=1e-6)


def test_group_prototype_attention_by_hand():
    # Ones kernels, W^P = ones(2, 2), S = [[1, 0], [0, 2]], G = [[1, 0], [0, 0]].
    # W^P S = [[1, 2], [1, 2]] -> both relevances relu(3) = 3 -> softmax [1/2, 1/2].
    # G_1 queries [1, 1]: CA = [c, c] (as in test_attention_by_hand) -> relu(2c) -> [2c, 2c].
    # G_2 queries [0, 0]: uniform over the steps -> [1.5, 1.5] -> relu(3) -> [3, 3].
    layer = GroupPrototypeAttention(2, hidden_units=(1,), kernel_initializer="ones")
    sequence = np.array([[[1.0, 0.0], [0.0, 2.0]]], "float32")
    prototypes = np.array([[1.0, 0.0], [0.0, 0.0]], "float32")
    w = _softmax([math.sqrt(2), 2 * math.sqrt(2)])
    c = w[0] + 2 * w[1]
    out = _np(layer(sequence, np.array([[True, True]]), prototypes))
    np.testing.assert_allclose(out, [[0.5 * 2 * c + 0.5 * 3] * 2], rtol=1e-5)
    # First step padded: it is zeroed before W^P and masked in CA, so both groups read [2, 2] only:
    # relu(4) -> [4, 4] each.
    np.testing.assert_allclose(_np(layer(sequence, np.array([[False, True]]), prototypes)), [[4.0, 4.0]], rtol=1e-6)
    # W^P = [[1, 0], [0, 0]]: relevances relu(1) = 1 and 0 -> weights softmax([1, 0]).
    layer.pooling.assign(np.array([[1.0, 0.0], [0.0, 0.0]], "float32"))
    g = _softmax([1.0, 0.0])
    np.testing.assert_allclose(_np(layer(sequence, np.array([[True, True]]), prototypes)),
                               [[g[0] * 2 * c + g[1] * 3] * 2], rtol=1e-5)
    assert GroupPrototypeAttention.from_config(layer.get_config()).num_groups == 2
    with pytest.raises(ValueError, match="num_groups=0"):
        GroupPrototypeAttention(0)


def test_prototype_disentanglement_loss_by_hand():
    # Pairs of [1, 0], [0, 1], [1, 1]: cosines 0, 1/sqrt(2), 1/sqrt(2) -> mean sqrt(2) / 3.
    prototypes = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], "float32")
    np.testing.assert_allclose(_np(prototype_disentanglement_loss(prototypes)), math.sqrt(2) / 3, rtol=1e-6)
    # Scale invariant (eq. 13 as written would reward the larger norms), bounded: opposite -> -1.
    np.testing.assert_allclose(_np(prototype_disentanglement_loss(10 * prototypes)), math.sqrt(2) / 3, rtol=1e-6)
    opposite = np.array([[1.0, 0.0], [-2.0, 0.0]], "float32")
    np.testing.assert_allclose(_np(prototype_disentanglement_loss(opposite)), -1.0)
    assert float(_np(prototype_disentanglement_loss(np.ones((1, 2), "float32")))) == pytest.approx(0.0, abs=1e-7)


# ---------------------------------------------------------------- model helpers


def _events(domains):
    a, b = domains[0], domains[1]
    c = domains[-1]
    return {
        "u1": [Impression(1, "u1", a, "x1", 1), Impression(2, "u1", b, "y1", 1), Impression(3, "u1", a, "x2", 1),
               Impression(4, "u1", b, "y2", 0), Impression(5, "u1", a, "x3", 1), Impression(6, "u1", b, "y3", 1),
               Impression(7, "u1", c, "x4", 0), Impression(8, "u1", b, "y4", 1), Impression(9, "u1", c, "x1", 1),
               Impression(10, "u1", a, "y1", 0)],
        "u2": [Impression(1, "u2", b, "y2", 1), Impression(2, "u2", c, "y3", 0), Impression(3, "u2", a, "x3", 1)],
    }


def _rows(domains=("a", "b")):
    contract = F.Contract(domains, HISTORY, DOMAIN_HISTORY)
    return [row for user, events in _events(domains).items() for row in sequences.user_examples(user, events, contract)]


def _config(domains=("a", "b"), **overrides):
    values = {"embedding_dim": 4, "num_groups": 3, "attention_hidden_units": [4], "hidden_units": [8],
              "inputs": {"domains": list(domains), "history_length": HISTORY,
                         "domain_history_length": DOMAIN_HISTORY, "item_buckets": 53}}
    values.update(overrides)
    return models.resolve_config("man", values)


def _model(domains=("a", "b"), seed=1, **overrides):
    keras.utils.set_random_seed(seed)
    config = _config(domains, **overrides)
    return models.build("man", config), config


def _train_step_lowers_loss(model, inputs, labels, run_eagerly=True):
    # Adam's first step moves every weight by about the learning rate; the embeddings start within
    # +-0.05 and the encoders layer-normalise them, so 0.05 overshoots on this tiny model, 3e-3 does not.
    # Eager is ~6x faster than tracing for one step; the graph path runs in the main training test.
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss={F.SERVING_OUTPUT: keras.losses.BinaryCrossentropy()},
                  run_eagerly=run_eagerly)
    y = {F.SERVING_OUTPUT: labels}
    before = model.evaluate(inputs, y, verbose=0)
    model.train_on_batch(inputs, y)
    after = model.evaluate(inputs, y, verbose=0)
    assert np.isfinite(before) and after < before


def _with_target(row, item, domain):
    return {**row, F.ITEM_ID: item, F.DOMAIN: domain}


# ---------------------------------------------------------------- config


def test_config_round_trip_and_bad_values(tmp_path):
    config = _config(encoder="gru", global_sequence="local", use_gpa=False, disentangle_weight=0.5)
    assert (config.encoder, config.global_sequence, config.use_gpa, config.attention_hidden_units) == (
        "gru", "local", False, (4,))
    assert models.resolve_config("man", config_lib.to_dict(config)) == config
    path = config_lib.save(config, "man", str(tmp_path))
    assert models.resolve_config("man", json.loads(open(path).read())["config"]) == config
    model = models.build("man", config)
    assert type(model).from_config(model.get_config()).config == config
    defaults = models.default_config("man")
    assert (defaults.encoder, defaults.global_sequence, defaults.use_isa, defaults.use_sfa, defaults.use_gpa) == (
        "sasrec", "mixed", True, True, True)
    for bad, match in [({"encoder": "lstm"}, "encoder='lstm'"), ({"global_sequence": "both"}, "global_sequence='both'"),
                       ({"num_groups": 0}, "num_groups=0"), ({"num_heads": 3}, "num_heads=3"),
                       ({"disentangle_weight": -1.0}, "disentangle_weight=-1.0"), ({"dropout": 1.0}, "dropout=1.0")]:
        with pytest.raises(ValueError, match=match):
            models.build("man", _config(**bad))
    with pytest.raises(ValueError, match="expects bool"):
        _config(use_isa="no")


# ---------------------------------------------------------------- model behaviour


def test_fully_padded_histories_give_finite_ctr():
    model, config = _model()
    batch, d = 2, config.inputs.num_domains
    inputs = {
        F.USER_ID: np.array([1, 2], "int32"), F.ITEM_ID: np.array([5, 7], "int32"), F.DOMAIN: np.array([0, 1], "int32"),
        F.HISTORY_ITEM_IDS: np.zeros((batch, HISTORY), "int32"), F.HISTORY_DOMAINS: np.zeros((batch, HISTORY), "int32"),
        F.HISTORY_MASK: np.zeros((batch, HISTORY), bool), F.HISTORY_TIME_GAPS: np.zeros((batch, HISTORY), "int32"),
        F.DOMAIN_HISTORY_ITEM_IDS: np.zeros((batch, d, DOMAIN_HISTORY), "int32"),
        F.DOMAIN_HISTORY_MASK: np.zeros((batch, d, DOMAIN_HISTORY), bool),
        F.TARGET_DOMAIN_CLICKS: np.zeros((batch,), "int32"), F.OTHER_DOMAIN_CLICKS: np.zeros((batch,), "int32"),
    }
    ctr = _ctr(model, inputs)
    assert ctr.shape == (batch,) and np.all(np.isfinite(ctr)) and np.all((ctr > 0) & (ctr < 1))
    # Ids under a False mask are never read: the same rows with junk ids score the same.
    junk = {**inputs, F.HISTORY_ITEM_IDS: np.full((batch, HISTORY), 9, "int32"),
            F.DOMAIN_HISTORY_ITEM_IDS: np.full((batch, d, DOMAIN_HISTORY), 11, "int32")}
    np.testing.assert_allclose(_ctr(model, junk), ctr, rtol=1e-6)
    # The first impression of a user (empty history) from real examples is finite too.
    rows = _rows()
    assert np.all(np.isfinite(_ctr(model, _inputs(rows[:1], config))))


@pytest.mark.parametrize("overrides", [{}, {"encoder": "gru", "global_sequence": "local"}])
def test_every_weight_gets_a_gradient(overrides):
    model, config = _model(**overrides)
    rows = _rows()
    inputs, labels = _inputs(rows, config), _labels(rows)
    with tf.GradientTape() as tape:
        outputs = model(inputs, training=True)
        loss = keras.losses.BinaryCrossentropy()(labels, outputs[F.SERVING_OUTPUT])
        aux = model.auxiliary_losses(inputs, outputs, training=True)
        assert set(aux) == {"prototype_disentanglement"}
        loss = loss + sum(aux.values())
    grads = tape.gradient(loss, model.trainable_variables)
    assert len(grads) == len(model.trainable_variables) > 0
    for variable, grad in zip(model.trainable_variables, grads):
        assert grad is not None, variable.path
        assert float(tf.reduce_sum(tf.abs(tf.convert_to_tensor(grad)))) > 0, variable.path


def test_one_training_step_lowers_the_loss_on_a_fixed_batch():
    model, config = _model()
    rows = _rows()
    _train_step_lowers_loss(model, _inputs(rows, config), _labels(rows), run_eagerly=False)


def test_l2_penalty_is_an_auxiliary_loss():
    model, config = _model(l2_weight=0.5, use_gpa=False)
    inputs = _inputs(_rows()[:2], config)
    outputs = model(inputs)
    aux = model.auxiliary_losses(inputs, outputs)
    assert set(aux) == {"l2"}  # no prototypes without GPA, so no disentanglement loss
    expected = 0.5 * sum(float(np.sum(np.square(_np(w)))) for w in model.trainable_weights)
    np.testing.assert_allclose(_np(aux["l2"]), expected, rtol=1e-5)


@pytest.mark.parametrize("flag,layer_prefix", [("use_isa", "item_similarity"), ("use_sfa", "sequence_fusion"),
                                               ("use_gpa", "group_prototype")])
def test_each_ablation_builds_trains_and_changes_the_output(flag, layer_prefix):
    rows = _rows()
    full, config = _model()
    ablated, _ = _model(**{flag: False})
    inputs, labels = _inputs(rows, config), _labels(rows)
    full_ctr, ablated_ctr = _ctr(full, inputs), _ctr(ablated, inputs)
    assert any(layer_prefix in w.path for w in full.weights)
    assert not any(layer_prefix in w.path for w in ablated.weights)
    assert np.abs(full_ctr - ablated_ctr).max() > 1e-4
    _train_step_lowers_loss(ablated, inputs, labels)


def test_score_selects_each_candidates_domain():
    # encode_context once, score candidates of both domains: equals call() on rows whose target is
    # each candidate (what the export's score_candidates relies on), in both global_sequence modes.
    rows = _rows()
    context_row = rows[9]
    candidates = [(b"x1", b"a"), (b"y9", b"b"), (b"x4", b"a"), (b"y2", b"b")]
    for overrides in ({}, {"global_sequence": "local", "encoder": "gru"}):
        model, config = _model(**overrides)
        expected = _ctr(model, _inputs([_with_target(context_row, i, d) for i, d in candidates], config))
        context = model.encode_context(_inputs([context_row], config))
        context = {k: keras.ops.repeat(v, len(candidates), axis=0) for k, v in context.items()}
        items = preprocess.hash_ids(tf.constant([i for i, _ in candidates]), config.inputs.item_buckets)
        domains = tf.constant([0, 1, 0, 1], tf.int32)
        scored = _np(keras.ops.sigmoid(model.score(context, items, domains)))
        np.testing.assert_allclose(scored, expected, rtol=1e-5)
        assert len(set(np.round(expected, 6))) == len(candidates)


def test_three_domains():
    domains = ("a", "b", "c")
    rows = _rows(domains)
    model, config = _model(domains)
    inputs = _inputs(rows, config)
    assert tuple(inputs[F.DOMAIN_HISTORY_ITEM_IDS].shape) == (len(rows), 3, DOMAIN_HISTORY)
    context = model.encode_context(inputs)
    assert tuple(context["groups"].shape) == (len(rows), 3, 4) and tuple(context["fused"].shape) == (len(rows), 3, 4)
    ctr = _ctr(model, inputs)
    assert np.all(np.isfinite(ctr))
    # Each row's score comes from its own domain's local branch: the same row scored as another
    # domain differs.
    row = rows[-1]
    per_domain = _ctr(model, _inputs([_with_target(row, b"x3", d.encode()) for d in domains], config))
    assert len(set(np.round(per_domain, 6))) == 3
    _train_step_lowers_loss(model, inputs, _labels(rows))


def test_saved_model_serves_what_the_model_computes(tmp_path):
    # global_sequence="local" differs only in context shapes; test_score_selects_each_candidates_domain
    # checks its encode_context/score split in memory.
    model, config = _model()
    rows = _rows()
    serialized = [sequences.serialize_example(r) for r in rows]
    expected = _ctr(model, _inputs(rows, config))
    export.export(model, config.inputs, str(tmp_path / "1"))
    loaded = tf.saved_model.load(str(tmp_path / "1"))

    served = loaded.signatures[F.SERVING_SIGNATURE](**{F.SERVING_INPUT: tf.constant(serialized)})[F.SERVING_OUTPUT]
    np.testing.assert_allclose(served.numpy(), expected, rtol=1e-5)

    context_row = rows[9]
    candidates = [(b"x1", b"a"), (b"y9", b"b"), (b"x3", b"a")]
    scored = loaded.signatures[F.SCORE_CANDIDATES_SIGNATURE](**{
        F.SERVING_INPUT: tf.constant([sequences.serialize_example(context_row)]),
        F.CANDIDATE_ITEM_IDS: tf.constant([i for i, _ in candidates]),
        F.CANDIDATE_DOMAINS: tf.constant([d for _, d in candidates]),
    })[F.SERVING_OUTPUT].numpy()
    per_candidate = _ctr(model, _inputs([_with_target(context_row, i, d) for i, d in candidates], config))
    np.testing.assert_allclose(scored, per_candidate, rtol=1e-5)


def test_runs_on_the_tensorflow_backend():
    assert keras.backend.backend() == "tensorflow"
