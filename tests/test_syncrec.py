"""SyNCRec: ACMoE layers, SC-MIM and LC-NTG by hand, stop-gradients, losses, ablations, export, JAX."""

import json
import logging
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import models.base
import models.syncrec  # noqa: F401  (registers "syncrec")
from components.ingest import sequences
from components.ingest.records import Impression
from components.trainer import export, preprocess
from models import config as config_lib
from models import registry
from models.layers.contrastive import BilinearInfoNCE
from models.layers.moe import SequenceGates, SequentialExperts, TaskTowers, mix_experts
from models.syncrec import NegativeTransferWeights, SyNCRecConfig, cross_expert_count
from xdctr import features as F

from modelkit import labels as _labels, model_inputs as _inputs, served_ctr as _ctr, to_numpy as _np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HISTORY, DOMAIN_HISTORY = 4, 3


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _softplus(x):
    return math.log1p(math.exp(x))


def _gelu(x):
    return 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))


def _layer_norm(x, eps=1e-6):
    x = np.asarray(x, "float64")
    return (x - x.mean()) / np.sqrt(x.var() + eps)


# ---------------------------------------------------------------- layers, by hand


def test_task_towers_by_hand():
    # dim 3, two tasks. Task 0 keeps the "ones" kernels: W1 x and W2 h are the same in every
    # component, so the FFN adds one constant and h^0(x) = LN(x): [1, 2, 3] -> [-1.2247, 0, 1.2247].
    # Task 1: W1 = I, W2 = e0 e0^T, x = [1, 0, -1]: GELU(x) = [0.8413, 0, -0.1587], only its first
    # component reaches output 0: LN([1 + 0.8413, 0, -1]) = [1.3264, -0.2383, -1.0881].
    layer = TaskTowers(2, kernel_initializer="ones")
    layer.build((None, 2, 3))
    inner, outer = np.ones((2, 3, 3), "float32"), np.ones((2, 3, 3), "float32")
    inner[1], outer[1] = np.eye(3), np.diag([1.0, 0.0, 0.0])
    layer.inner_kernel.assign(inner)
    layer.outer_kernel.assign(outer)
    x = np.array([[[1.0, 2.0, 3.0], [1.0, 0.0, -1.0]]], "float32")  # (1, tasks, dim)
    out = _np(layer(x))
    np.testing.assert_allclose(out[0, 0], _layer_norm([1, 2, 3]), rtol=1e-5)
    np.testing.assert_allclose(out[0, 0], [-1.2247, 0.0, 1.2247], atol=1e-4)
    np.testing.assert_allclose(out[0, 1], _layer_norm([1 + _gelu(1.0), 0.0, -1.0]), rtol=1e-5)
    np.testing.assert_allclose(out[0, 1], [1.3264, -0.2383, -1.0881], atol=1e-4)
    # gamma and beta per task: task 1 scaled by 2 and shifted by 1.
    layer.gamma.assign([[1.0] * 3, [2.0] * 3])
    layer.beta.assign([[0.0] * 3, [1.0] * 3])
    np.testing.assert_allclose(_np(layer(x))[0, 1], 2 * out[0, 1] + 1, rtol=1e-5)
    assert TaskTowers.from_config(layer.get_config()).num_tasks == 2
    with pytest.raises(ValueError, match="num_tasks=0"):
        TaskTowers(0)


def test_pre_norm_task_towers_by_hand_and_their_output_length_is_free():
    # norm="pre": h(x) = x + W2 GELU(W1 LN(x) + b1) + b2. W1 = I, W2 = e0 e0^T, x = [1, 0, -1]:
    # LN(x) = [1.2247, 0, -1.2247], GELU of it [1.0896, 0, -0.1351]; only component 0 reaches the
    # output: [1 + 1.0896, 0, -1].
    layer = TaskTowers(1, norm="pre")
    layer.build((None, 1, 3))
    layer.inner_kernel.assign(np.eye(3, dtype="float32")[None])
    layer.outer_kernel.assign(np.diag([1.0, 0.0, 0.0]).astype("float32")[None])
    x = np.array([[[1.0, 0.0, -1.0]]], "float32")
    normed = _layer_norm([1.0, 0.0, -1.0])
    np.testing.assert_allclose(_np(layer(x))[0, 0], [1 + _gelu(normed[0]), 0.0, -1.0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(layer(x))[0, 0], [2.0896, 0.0, -1.0], atol=1e-4)
    # The FFN reads the normed input, so scaling x scales the residual part only: the output's
    # length follows x's. After the residual ("post") it cannot: every output has the same length.
    post = TaskTowers(1, norm="post")
    post.build((None, 1, 3))
    for tower, lengths_differ in ((layer, True), (post, False)):
        small, large = (np.linalg.norm(_np(tower(scale * x))) for scale in (0.5, 4.0))
        assert bool(large - small > 1.0) == lengths_differ
    assert TaskTowers.from_config(layer.get_config()).norm == "pre"
    with pytest.raises(ValueError, match="norm='mid'"):
        TaskTowers(1, norm="mid")


def test_sequence_gates_by_hand():
    # One task, K = 2, T = 2, dim = 1, W = [[1, 0], [2, 0]]: logits = [x_1 + 2 x_2, 0].
    # x = [0.5, 0.25] -> softmax([1, 0]) = [e, 1] / (e + 1); step 1 padded -> softmax([0.5, 0]).
    layer = SequenceGates(1, 2)
    layer.build((None, 1, 2, 1))
    layer.kernel.assign([[[1.0, 0.0], [2.0, 0.0]]])
    x = np.array([[[[0.5], [0.25]]]], "float32")  # (1, tasks, T, dim)
    e = math.e
    np.testing.assert_allclose(_np(layer(x, np.array([[[True, True]]])))[0, 0], [e / (e + 1), 1 / (e + 1)], rtol=1e-6)
    half = math.exp(0.5)
    np.testing.assert_allclose(_np(layer(x, np.array([[[False, True]]])))[0, 0], [half / (half + 1), 1 / (half + 1)],
                               rtol=1e-6)
    assert SequenceGates.from_config(layer.get_config()).num_experts == 2
    with pytest.raises(ValueError, match="num_tasks=2"):
        SequenceGates(2, 2)(x, np.ones((1, 1, 2), bool))


def test_mix_experts_by_hand_and_its_stop_gradient():
    # Outputs [2], [4] with gates [0.25, 0.75] -> 0.5 + 3 = 3.5 whatever the flags. d/d outputs:
    # the gates [0.25, 0.75], except 0 for a flagged expert; d/d gates: the outputs [2, 4] always.
    outputs = tf.Variable([[[2.0], [4.0]]])  # (batch, K, dim)
    gates = tf.Variable([[0.25, 0.75]])
    for flags, expected in [((False, False), [0.25, 0.75]), ((True, False), [0.0, 0.75]), ((False, True), [0.25, 0.0])]:
        with tf.GradientTape() as tape:
            mixed = mix_experts(outputs, gates, flags)
        d_outputs, d_gates = tape.gradient(mixed, [outputs, gates])
        np.testing.assert_allclose(_np(mixed), [[3.5]])
        np.testing.assert_allclose(_np(d_outputs)[0, :, 0], expected)
        np.testing.assert_allclose(_np(d_gates), [[2.0, 4.0]])
    with pytest.raises(ValueError, match=r"stop_gradient=\(True,\)"):
        mix_experts(outputs, gates, (True,))


def test_sequential_experts_are_separate_modules():
    keras.utils.set_random_seed(2)
    layer = SequentialExperts(3, num_heads=2)
    x = np.random.default_rng(0).normal(size=(2, 4, 4)).astype("float32")
    mask = np.array([[True] * 4, [False, False, True, True]])
    out = _np(layer(x, mask))
    assert out.shape == (2, 3, 4, 4)
    for k, expert in enumerate(layer.experts):  # row k is expert k's own output ...
        np.testing.assert_allclose(out[:, k], _np(expert(x, mask)), rtol=1e-6)
    assert np.abs(out[:, 0] - out[:, 1]).max() > 1e-3  # ... and the experts differ
    paths = [w.path for w in layer.weights]
    assert len(paths) == len(set(paths)) == 3 * len(layer.experts[0].weights)  # no weight shared
    np.testing.assert_allclose(out[1, :, :2], 0.0, rtol=0, atol=1e-6)  # padded steps are zeros
    assert SequentialExperts.from_config(layer.get_config()).num_experts == 3
    with pytest.raises(ValueError, match="num_experts=0"):
        SequentialExperts(0)


def test_bilinear_infonce_by_hand():
    # dim 1, W = [[1]]: rho(u, v) = sigmoid(u v). Group 0: U = [1, 2, 9], V = [1, -1, 9], row 2 masked.
    # Anchor 0 (v = 1): rho = [s(1), s(2)] -> loss = -s(1) + log(e^s(1) + e^s(2)).
    # Anchor 1 (v = -1): rho = [s(-1), s(-2)] -> loss = -s(-2) + log(e^s(-1) + e^s(-2)). Row 2: 0.
    # Group 1 is fully masked: zeros.
    layer = BilinearInfoNCE(kernel_initializer="ones")
    u = np.array([[[1.0], [5.0]], [[2.0], [5.0]], [[9.0], [5.0]]], "float32")  # (batch, groups, dim)
    v = np.array([[[1.0], [5.0]], [[-1.0], [5.0]], [[9.0], [5.0]]], "float32")
    mask = np.array([[True, False], [True, False], [False, False]])
    s = _sigmoid
    expected = [-s(1) + math.log(math.exp(s(1)) + math.exp(s(2))), -s(-2) + math.log(math.exp(s(-1)) + math.exp(s(-2)))]
    out = _np(layer(u, v, mask))
    np.testing.assert_allclose(out[:2, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(out[2, 0], 0.0, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out[:, 1], 0.0, rtol=0, atol=1e-6)
    # W scales the critic: W = [[2]] -> rho(u, v) = sigmoid(2 u v).
    layer.kernel.assign([[2.0]])
    np.testing.assert_allclose(_np(layer(u, v, mask))[0, 0],
                               -s(2) + math.log(math.exp(s(2)) + math.exp(s(4))), rtol=1e-6)


def test_negative_transfer_weights_by_hand():
    # Eq. 11 with alpha = beta = delta = 1 from uniform lambda and phi = [-0.5, 0, 0.5]:
    # softmax([1/3 - 0.5, 1/3, 1/3 + 0.5]) = softmax([-0.5, 0, 0.5]) = [0.1863, 0.3072, 0.5065].
    # phi_0 < 0 (single beats cross: negative transfer) -> lambda_0 drops below 1/3 (the paper's
    # "lower weight for domains with significant negative transfer").
    for learned in (False, True):
        layer = NegativeTransferWeights(3, alpha=1.0, beta=1.0, temperature=1.0, learned=learned)
        layer.build()
        alpha, beta = layer.coefficients()
        np.testing.assert_allclose([float(alpha), float(beta)], [1.0, 1.0], rtol=1e-6)
        np.testing.assert_allclose(_np(layer.lambdas), [1 / 3] * 3, rtol=1e-6)
        out = _np(layer(np.array([-0.5, 0.0, 0.5], "float32"), np.array([True, True, True])))
        np.testing.assert_allclose(out, [0.1863, 0.3072, 0.5065], atol=1e-4)
        np.testing.assert_allclose(out.sum(), 1.0, rtol=1e-6)
        # Domain 2 absent: it keeps its 1/3, the others share 2/3 as softmax([-0.5, 0]) -> [0.2517, 0.4150].
        out = _np(layer(np.array([-0.5, 0.0, 9.0], "float32"), np.array([True, True, False])))
        np.testing.assert_allclose(out, [0.2517, 0.4150, 1 / 3], atol=1e-4)
        np.testing.assert_allclose(_np(layer.lambdas), [1 / 3] * 3, rtol=1e-6)  # the caller assigns, not call()
    # Memory: lambda_old = [0.6, 0.2, 0.2], phi = 0, alpha 1.5, delta 1 -> softmax(1.5 lambda_old).
    layer = NegativeTransferWeights(3, alpha=1.5, beta=1.0, learned=True)
    layer.build()
    layer.lambdas.assign([0.6, 0.2, 0.2])
    expected = np.exp([0.9, 0.3, 0.3]) / np.exp([0.9, 0.3, 0.3]).sum()
    np.testing.assert_allclose(_np(layer(np.zeros(3, "float32"), np.ones(3, bool))), expected, rtol=1e-5)
    assert {w.name for w in layer.trainable_weights} == {"alpha_logit", "log_beta"}
    assert NegativeTransferWeights.from_config(layer.get_config()).alpha == pytest.approx(1.5)
    for kwargs, match in [({"alpha": 2.0}, "alpha=2.0"), ({"beta": 0.0}, "beta=0.0"),
                          ({"temperature": -1.0}, "temperature=-1.0"), ({"num_domains": 0}, "num_domains=0")]:
        with pytest.raises(ValueError, match=match):
            NegativeTransferWeights(**{"num_domains": 3, **kwargs})


# ---------------------------------------------------------------- model helpers


def _events(domains):
    a, b, c = domains[0], domains[1], domains[-1]
    return {
        "u1": [Impression(1, "u1", a, "x1", 1), Impression(2, "u1", b, "y1", 1), Impression(3, "u1", a, "x2", 1),
               Impression(4, "u1", b, "y2", 0), Impression(5, "u1", a, "x3", 1), Impression(6, "u1", b, "y3", 1),
               Impression(7, "u1", c, "z4", 0), Impression(8, "u1", b, "y4", 1), Impression(9, "u1", c, "z1", 1),
               Impression(10, "u1", a, "x5", 0)],
        "u2": [Impression(1, "u2", b, "y2", 1), Impression(2, "u2", a, "x3", 1), Impression(3, "u2", c, "z3", 1),
               Impression(4, "u2", a, "x1", 0), Impression(5, "u2", b, "y5", 1), Impression(6, "u2", c, "z2", 0)],
    }


def _rows(domains=("a", "b")):
    contract = F.Contract(domains, HISTORY, DOMAIN_HISTORY)
    return [row for user, events in _events(domains).items() for row in sequences.user_examples(user, events, contract)]


def _config(domains=("a", "b"), **overrides):
    values = {"embedding_dim": 8, "num_experts": 3, "num_heads": 2,
              "inputs": {"domains": list(domains), "history_length": HISTORY, "domain_history_length": DOMAIN_HISTORY,
                         "item_buckets": 64, "user_buckets": 64}}
    values.update(overrides)
    return registry.resolve_config("syncrec", values)


def _model(domains=("a", "b"), seed=1, **overrides):
    keras.utils.set_random_seed(seed)
    config = _config(domains, **overrides)
    return registry.build("syncrec", config), config


def _with_target(row, item, domain):
    return {**row, F.ITEM_ID: item, F.DOMAIN: domain}


def _compile(model, learning_rate=1e-2, run_eagerly=True):
    # Eager is much faster than tracing for a few steps; the graph path runs in the training test.
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss={F.SERVING_OUTPUT: keras.losses.BinaryCrossentropy()},
                  metrics={F.SERVING_OUTPUT: [keras.metrics.AUC(name="auc")]}, run_eagerly=run_eagerly)


def _training_loss(model, inputs, labels):
    """Eq. 18 on the batch, without updating lambda."""
    outputs = model(inputs, training=True)
    return float(model.compute_loss(x=inputs, y={F.SERVING_OUTPUT: labels}, y_pred=outputs, training=False))


def _lambdas(model):
    return _np(model.ntg.lambdas)


# ---------------------------------------------------------------- config


def test_config_round_trip_and_bad_values(tmp_path):
    config = _config(objective="bpr", num_experts=4, num_cross_experts=3, ntg_coefficients="fixed", use_sc_mim=False,
                     item_bias=True, tower_norm="pre")
    assert (config.objective, config.num_cross_experts, config.ntg_coefficients, config.use_sc_mim) == (
        "bpr", 3, "fixed", False)
    assert (config.item_bias, config.tower_norm) == (True, "pre")
    assert registry.resolve_config("syncrec", config_lib.to_dict(config)) == config
    path = config_lib.save(config, "syncrec", str(tmp_path))
    assert registry.resolve_config("syncrec", json.loads(open(path).read())["config"]) == config
    model = registry.build("syncrec", config)
    assert type(model).from_config(model.get_config()).config == config
    defaults = registry.default_config("syncrec")
    assert (defaults.embedding_dim, defaults.num_experts, defaults.num_layers, defaults.objective) == (16, 5, 1, "bce")
    assert (defaults.use_lc_ntg, defaults.use_sc_mim, defaults.use_acmoe, defaults.ntg_coefficients) == (
        True, True, True, "learned")
    assert (defaults.item_bias, defaults.tower_norm) == (False, "post")
    # j defaults to round(0.2 K) within [1, K - 1] (sec. 4.2.1).
    for experts, expected in [(5, 1), (10, 2), (2, 1), (13, 3)]:
        assert cross_expert_count(SyNCRecConfig(num_experts=experts)) == expected
    assert cross_expert_count(config) == 3
    for bad, match in [({"objective": "ce"}, "objective='ce'"), ({"num_experts": 1}, "num_experts=1"),
                       ({"num_cross_experts": 3}, "num_cross_experts=3"), ({"num_heads": 3}, "num_heads=3"),
                       ({"harmonic_factor": 0.0}, "harmonic_factor=0.0"), ({"ntg_alpha": 2.0}, "ntg_alpha=2.0"),
                       ({"ntg_beta": 0.0}, "ntg_beta=0.0"), ({"ntg_temperature": 0.0}, "ntg_temperature=0.0"),
                       ({"ntg_coefficients": "frozen"}, "ntg_coefficients='frozen'"), ({"dropout": 1.0}, "dropout=1.0"),
                       ({"embedding_dim": 0}, "embedding_dim=0"), ({"num_cross_experts": -1}, "num_cross_experts=-1"),
                       ({"tower_norm": "mid"}, "tower_norm='mid'")]:
        with pytest.raises(ValueError, match=match):
            registry.build("syncrec", _config(**bad))
    with pytest.raises(ValueError, match=r"domains=\('a',\)"):
        registry.build("syncrec", _config(domains=("a",)))
    with pytest.raises(ValueError, match="expects bool"):
        _config(use_acmoe="no")


# ---------------------------------------------------------------- model behaviour


def test_fully_padded_histories_give_finite_ctr_and_losses():
    model, config = _model()
    batch, d = 4, config.inputs.num_domains
    inputs = {
        F.USER_ID: np.array([1, 2, 3, 4], "int32"), F.ITEM_ID: np.array([5, 7, 9, 11], "int32"),
        F.DOMAIN: np.array([0, 1, 0, 1], "int32"),
        F.HISTORY_ITEM_IDS: np.zeros((batch, HISTORY), "int32"), F.HISTORY_DOMAINS: np.zeros((batch, HISTORY), "int32"),
        F.HISTORY_MASK: np.zeros((batch, HISTORY), bool), F.HISTORY_TIME_GAPS: np.zeros((batch, HISTORY), "int32"),
        F.DOMAIN_HISTORY_ITEM_IDS: np.zeros((batch, d, DOMAIN_HISTORY), "int32"),
        F.DOMAIN_HISTORY_MASK: np.zeros((batch, d, DOMAIN_HISTORY), bool),
        F.TARGET_DOMAIN_CLICKS: np.zeros((batch,), "int32"), F.OTHER_DOMAIN_CLICKS: np.zeros((batch,), "int32"),
    }
    ctr = _ctr(model, inputs)
    assert ctr.shape == (batch,) and np.all(np.isfinite(ctr)) and np.all((ctr > 0) & (ctr < 1))
    # Empty histories are (SOS) alone: the same user representation for every row.
    users = _np(model.encode_context(inputs)["user"])
    np.testing.assert_allclose(users, np.repeat(users[:1], batch, axis=0), atol=1e-6)
    # Ids under a False mask are never read: the same rows with junk ids score the same.
    junk = {**inputs, F.HISTORY_ITEM_IDS: np.full((batch, HISTORY), 9, "int32"),
            F.HISTORY_DOMAINS: np.ones((batch, HISTORY), "int32"),
            F.DOMAIN_HISTORY_ITEM_IDS: np.full((batch, d, DOMAIN_HISTORY), 11, "int32")}
    np.testing.assert_allclose(_ctr(model, junk), ctr, rtol=1e-6)
    # Training outputs and every loss stay finite; no SC-MIM pair exists, so its loss is 0.
    labels = np.array([1, 0, 0, 1], "float32")
    outputs = model(inputs, training=True)
    losses = model.task_losses(inputs, labels, outputs)
    np.testing.assert_allclose(_np(losses["sc_mim"]), [0.0, 0.0], rtol=0, atol=1e-6)
    assert np.isfinite(_training_loss(model, inputs, labels))
    np.testing.assert_allclose(_np(outputs[F.SERVING_OUTPUT]), ctr, rtol=1e-6)


def test_served_ctr_is_the_cross_domain_task():
    # call(training=False) runs only encode_context/score (the cross-domain task, eq. 19); the
    # training outputs' ctr, computed next to the single-domain tasks, is the same number.
    model, config = _model()
    rows = _rows()
    inputs = _inputs(rows, config)
    served = _ctr(model, inputs)
    outputs = model(inputs, training=True)
    np.testing.assert_allclose(_np(outputs[F.SERVING_OUTPUT]), served, rtol=1e-5)
    np.testing.assert_allclose(_np(keras.ops.sigmoid(outputs["cross_logit"])), served, rtol=1e-5)
    assert np.abs(_np(outputs["single_logit"]) - _np(outputs["cross_logit"])).max() > 1e-4
    assert set(model(inputs, training=False)) == {F.SERVING_OUTPUT}


def test_sc_mim_pairs_the_same_click_in_both_views():
    # Mixed history (oldest first) [pad, a, b, a]: the last step is domain a's most recent click, so
    # the cross view of a is u itself; b's is an earlier step; the row has no domain-2 click: invalid.
    model, config = _model(("a", "b", "c"))
    # The second row is empty: no view is valid.
    inputs = {
        F.ITEM_ID: np.array([3, 4], "int32"), F.DOMAIN: np.array([0, 1], "int32"),
        F.HISTORY_ITEM_IDS: np.array([[0, 5, 6, 7], [0] * 4], "int32"),
        F.HISTORY_DOMAINS: np.array([[0, 0, 1, 0], [0] * 4], "int32"),
        F.HISTORY_MASK: np.array([[False, True, True, True], [False] * 4]),
        F.DOMAIN_HISTORY_ITEM_IDS: np.array([[[0, 5, 7], [0, 0, 6], [0, 0, 0]], [[0] * 3] * 3], "int32"),
        F.DOMAIN_HISTORY_MASK: np.array([[[False, True, True], [False, False, True], [False] * 3], [[False] * 3] * 3]),
    }
    user, views, valid = model.cross_representations(inputs, per_domain=True)
    np.testing.assert_array_equal(_np(valid), [[True, True, False], [False, False, False]])
    np.testing.assert_allclose(_np(views)[0, 0], _np(user)[0], rtol=1e-6)
    assert np.abs(_np(views)[0, 1] - _np(user)[0]).max() > 1e-4
    outputs = model(inputs, training=True)
    np.testing.assert_array_equal(_np(outputs["sc_mim_mask"]), [[True, True, False], [False, False, False]])


def test_sc_mim_does_not_dominate_the_default_loss():
    # A batch of 64 rows with clicks in both domains, at initialisation: every prediction loss is
    # about log 2 (eq. 18's prediction part ~ 4 log 2 for 2 domains) while each InfoNCE is about
    # log 64 (~4.2, uniform over the batch). At eta = 0.8 SC-MIM took ~43% of the loss (50% at the
    # Trainer's batch of 256), so the served cross-domain task got half the gradient; the default
    # keeps its share under a quarter.
    model, config = _model()
    rng = np.random.default_rng(0)
    batch, d = 64, config.inputs.num_domains
    inputs = {
        F.USER_ID: rng.integers(1, 64, batch).astype("int32"), F.ITEM_ID: rng.integers(1, 64, batch).astype("int32"),
        F.DOMAIN: np.arange(batch, dtype="int32") % d,
        F.HISTORY_ITEM_IDS: rng.integers(1, 64, (batch, HISTORY)).astype("int32"),
        F.HISTORY_DOMAINS: np.tile(np.arange(HISTORY, dtype="int32") % d, (batch, 1)),
        F.HISTORY_MASK: np.ones((batch, HISTORY), bool), F.HISTORY_TIME_GAPS: np.ones((batch, HISTORY), "int32"),
        F.DOMAIN_HISTORY_ITEM_IDS: rng.integers(1, 64, (batch, d, DOMAIN_HISTORY)).astype("int32"),
        F.DOMAIN_HISTORY_MASK: np.ones((batch, d, DOMAIN_HISTORY), bool),
        F.TARGET_DOMAIN_CLICKS: np.full((batch,), 2, "int32"), F.OTHER_DOMAIN_CLICKS: np.full((batch,), 2, "int32"),
    }
    labels = (rng.random(batch) < 0.3).astype("float32")
    outputs = model(inputs, training=True)
    losses = model.task_losses(inputs, labels, outputs)
    assert np.all(_np(losses["sc_mim"]) > 3.0)  # ~ log 64
    total = _training_loss(model, inputs, labels)
    mim_term = (1.0 - config.harmonic_factor) * float(np.sum(_np(losses["sc_mim"])))
    assert mim_term / total < 0.25


def test_every_weight_gets_a_gradient():
    # From the training loss (eq. 18). alpha only gets a gradient once lambda is not uniform (alpha
    # lambda is then a constant shift that the softmax ignores), so lambda starts off-uniform here.
    model, config = _model()
    rows = _rows()
    inputs, labels = _inputs(rows, config), _labels(rows)
    model.ntg.lambdas.assign([0.7, 0.3])
    with tf.GradientTape() as tape:
        outputs = model(inputs, training=True)
        loss = model.compute_loss(x=inputs, y={F.SERVING_OUTPUT: labels}, y_pred=outputs, training=True)
    grads = tape.gradient(loss, model.trainable_variables)
    assert len(grads) == len(model.trainable_variables) > 0
    for variable, grad in zip(model.trainable_variables, grads):
        assert grad is not None, variable.path
        assert float(tf.reduce_sum(tf.abs(tf.convert_to_tensor(grad)))) > 0, variable.path
    np.testing.assert_allclose(_lambdas(model).sum(), 1.0, rtol=1e-6)
    assert np.abs(_lambdas(model) - [0.7, 0.3]).max() > 1e-3  # the training step moved lambda


def test_bpr_objective_by_hand_and_its_gradients():
    # Rows: (domain 0, item 5, clicked), (domain 0, item 6, not clicked), (domain 1, item 7, clicked).
    # Pairs: only (0, 1) (same domain, other item, anchor clicked); domain 1 has none, so it is
    # absent: no loss and lambda_1 kept. L^0 = softplus(s_01 - s_00) = softplus(0.5 - 2) = 0.2014.
    model, config = _model(objective="bpr", use_sc_mim=False, ntg_beta=1.0)
    inputs = {F.DOMAIN: np.array([0, 0, 1], "int32"), F.ITEM_ID: np.array([5, 6, 7], "int32")}
    labels = np.array([1.0, 0.0, 1.0], "float32")
    scores = np.array([[2.0, 0.5, 9.0], [1.0, 1.0, 1.0], [3.0, 3.0, 3.0]], "float32")
    outputs = {"cross_scores": scores, "single_scores": scores - 1.0}  # equal differences: equal pair losses
    losses = model.task_losses(inputs, labels, outputs)
    np.testing.assert_allclose(_np(losses["cross"]), [_softplus(-1.5), 0.0], rtol=1e-6)
    np.testing.assert_allclose(_np(losses["single"]), [_softplus(-1.5), 0.0], rtol=1e-6)
    np.testing.assert_array_equal(_np(losses["present"]), [True, False])
    model.ntg.lambdas.assign([0.4, 0.6])
    model.compute_loss(x=inputs, y={F.SERVING_OUTPUT: labels}, y_pred={**outputs, "cross_logit": labels}, training=True)
    np.testing.assert_allclose(_lambdas(model), [0.4, 0.6], rtol=1e-6)  # only domain 0 present: its share is all of 0.4
    # On the model: every weight gets a gradient; there are no per-domain biases (they would cancel).
    assert not any(w.name in ("single_bias", "cross_bias") for w in model.weights)
    rows = _rows()
    real_inputs, real_labels = _inputs(rows, config), _labels(rows)
    with tf.GradientTape() as tape:
        loss = model.compute_loss(x=real_inputs, y={F.SERVING_OUTPUT: real_labels},
                                  y_pred=model(real_inputs, training=True), training=True)
    for variable, grad in zip(model.trainable_variables, tape.gradient(loss, model.trainable_variables)):
        assert grad is not None, variable.path  # lambda is [0.4, 0.6] by now, so alpha learns too
        assert float(tf.reduce_sum(tf.abs(tf.convert_to_tensor(grad)))) > 0, variable.path
    _compile(model, 3e-3)
    before = _training_loss(model, real_inputs, real_labels)
    model.train_on_batch(real_inputs, {F.SERVING_OUTPUT: real_labels})
    assert _training_loss(model, real_inputs, real_labels) < before


def test_sampled_softmax_replaces_the_task_losses_and_keeps_ntg_and_sc_mim(caplog):
    model, config = _model(ntg_beta=1.0)
    rows = _rows()
    inputs, labels = _inputs(rows, config), _labels(rows)
    domain_items = [np.arange(1, 20, dtype="int32"), np.arange(30, 50, dtype="int32")]
    with caplog.at_level(logging.WARNING, logger="models.syncrec"):
        model.set_ranking_objective(domain_items, 6, seed=3)
    assert "use_lc_ntg=false" in caplog.text  # LC-NTG starved a domain under this objective
    caplog.clear()
    without, _ = _model(use_lc_ntg=False)
    with caplog.at_level(logging.WARNING, logger="models.syncrec"):
        without.set_ranking_objective(domain_items, 6, seed=3)
    assert "LC-NTG" not in caplog.text
    outputs = model(inputs, training=True)
    cross, single = _np(outputs["cross_ranking_logits"]), _np(outputs["single_ranking_logits"])
    assert cross.shape == single.shape == (len(rows), 7)
    np.testing.assert_allclose(cross[:, 0], _np(outputs["cross_logit"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(single[:, 0], _np(outputs["single_logit"]), rtol=1e-5, atol=1e-6)
    assert np.abs(cross[:, 1:] - single[:, 1:]).max() > 1e-3  # two users (and two draws) per row
    # By hand: L^d = mean over domain d's click rows of logsumexp(logits) - logits[0]; non-clicks add nothing.
    losses = model.task_losses(inputs, labels, outputs)
    domain = _np(inputs[F.DOMAIN])
    clicked = _np(labels).reshape(-1) > 0.5
    for task, logits in (("cross", cross), ("single", single)):
        per_row = np.log(np.exp(logits.astype("float64")).sum(axis=1)) - logits[:, 0]
        expected = [per_row[clicked & (domain == d)].mean() for d in range(2)]
        np.testing.assert_allclose(_np(losses[task]), expected, rtol=1e-4)
    assert _np(losses["present"]).tolist() == [bool((clicked & (domain == d)).any()) for d in range(2)]
    assert np.all(_np(losses["sc_mim"]) > 0)  # SC-MIM stays in eq. 18
    # LC-NTG reads the gaps on the log loss's scale: phi * log 2 / log(1 + 6 negatives).
    model.ntg.lambdas.assign([0.5, 0.5])
    scaled = (_np(losses["single"]) - _np(losses["cross"])) * math.log(2) / math.log(7)
    expected = _np(model.ntg(tf.constant(scaled, tf.float32), losses["present"]))
    unscaled = _np(model.ntg(tf.constant(scaled * math.log(7) / math.log(2), tf.float32), losses["present"]))
    model.compute_loss(x=inputs, y={F.SERVING_OUTPUT: labels}, y_pred=outputs, training=True)
    np.testing.assert_allclose(_lambdas(model), expected, rtol=1e-5)
    assert np.abs(expected - unscaled).max() > 1e-4  # the scale does change lambda here
    # The non-click rows do not move the loss: relabelling them changes nothing.
    flipped = model.task_losses(inputs, np.where(clicked, 1.0, 0.0).astype("float32"), outputs)
    np.testing.assert_allclose(_np(flipped["cross"]), _np(losses["cross"]), rtol=1e-6)
    # Training lowers eq. 18 and moves lambda; validation reads the served task's sampled softmax.
    _compile(model, 3e-3)
    before = _training_loss(model, inputs, labels)
    for _ in range(3):
        model.train_on_batch(inputs, {F.SERVING_OUTPUT: labels})
    assert _training_loss(model, inputs, labels) < before
    assert abs(_lambdas(model) - 0.5).max() > 1e-4
    served = model(inputs, training=False)
    assert set(served) == {F.SERVING_OUTPUT, models.base.RANKING_LOGITS}
    model.clear_ranking_objective()
    assert set(model(inputs, training=True)) >= {"cross_logit", "single_logit"}
    assert "cross_ranking_logits" not in model(inputs, training=True)


@pytest.mark.parametrize("use_acmoe", [True, False])
def test_stop_gradients_split_the_experts_between_the_tasks(use_acmoe):
    # K = 4, j = 2: experts 0, 1 learn from the cross-domain task only, experts 2, 3 from the
    # single-domain tasks only (eq. 2, 4). Without ACMoE every expert learns from both.
    domains = ("a", "b", "c")
    model, config = _model(domains, num_experts=4, num_cross_experts=2, use_acmoe=use_acmoe)
    rows = _rows(domains)
    inputs, labels = _inputs(rows, config), _labels(rows)
    with tf.GradientTape(persistent=True) as tape:
        losses = model.task_losses(inputs, labels, model(inputs, training=True))
        task_losses = {f"single_{d}": losses["single"][d] for d in range(3)}
        task_losses["cross"] = tf.reduce_sum(losses["cross"])
    assert _np(losses["present"]).all()

    def norm(loss, expert):
        grads = tape.gradient(loss, expert.trainable_variables)
        return sum(0.0 if g is None else float(tf.reduce_sum(tf.abs(tf.convert_to_tensor(g)))) for g in grads)

    for k, expert in enumerate(model.experts.experts):
        for task, loss in task_losses.items():
            trained = (task == "cross") == (k < 2) or not use_acmoe
            assert (norm(loss, expert) > 1e-8) == trained, (k, task)  # untrained: no gradient path at all


def test_lambda_follows_the_negative_transfer_gap():
    # Two domains, rows (domain, label): (0, 1), (0, 0), (1, 1), (1, 0). Domain 0: single logits +-3
    # (L_single = softplus(-3) = 0.0486), cross logits 0 (L_cross = log 2): phi_0 = -0.6446, the
    # single task beats the cross one (negative transfer). Domain 1: single 0 (log 2), cross +-1
    # (softplus(-1) = 0.3133): phi_1 = +0.3799. Eq. 11 from uniform lambda, alpha = beta = delta = 1:
    # lambda = softmax([0.5 - 0.6446, 0.5 + 0.3799]) = [0.2642, 0.7358]: the domain with negative
    # transfer loses weight, and lambda sums to 1.
    model, config = _model(ntg_beta=1.0, use_sc_mim=False)
    inputs = {F.DOMAIN: np.array([0, 0, 1, 1], "int32"), F.ITEM_ID: np.array([1, 2, 3, 4], "int32")}
    labels = np.array([1.0, 0.0, 1.0, 0.0], "float32")
    y_pred = {"single_logit": np.array([3.0, -3.0, 0.0, 0.0], "float32"),
              "cross_logit": np.array([0.0, 0.0, 1.0, -1.0], "float32")}
    y_pred[F.SERVING_OUTPUT] = keras.ops.sigmoid(y_pred["cross_logit"])
    y = {F.SERVING_OUTPUT: labels}
    single, cross = np.array([_softplus(-3), math.log(2)]), np.array([math.log(2), _softplus(-1)])
    phi = single - cross
    np.testing.assert_allclose(phi, [-0.6446, 0.3799], atol=1e-4)
    expected = np.exp(0.5 + phi) / np.exp(0.5 + phi).sum()
    np.testing.assert_allclose(expected, [0.2642, 0.7358], atol=1e-4)

    loss = model.compute_loss(x=inputs, y=y, y_pred=y_pred, training=False)
    np.testing.assert_allclose(_lambdas(model), [0.5, 0.5])  # evaluation never moves lambda
    model.compute_loss(x=inputs, y=y, y_pred=y_pred, training=True)
    np.testing.assert_allclose(_lambdas(model), expected, rtol=1e-5)
    # Eq. 18 without SC-MIM: sum_d L_single + D sum_d lambda_d L_cross.
    np.testing.assert_allclose(float(loss), single.sum() + 2 * (expected * cross).sum(), rtol=1e-5)
    # The next batch starts from the new lambda (alpha lambda_old): softmax(lambda + phi).
    model.compute_loss(x=inputs, y=y, y_pred=y_pred, training=True)
    again = np.exp(expected + phi) / np.exp(expected + phi).sum()
    np.testing.assert_allclose(_lambdas(model), again, rtol=1e-5)
    assert again[0] < expected[0]  # persistent negative transfer keeps lowering the weight


def test_alpha_and_beta_learn_through_the_weighted_cross_loss():
    # With phi fixed, d L^lc / d beta = (D / delta) sum_d lambda_d (phi_d - phi_bar) L_cross_d, and
    # log-beta's gradient is beta times that. In the batch of test_lambda_follows_the_negative_transfer_gap
    # the domain with the larger gap (1) also has the lower cross loss, so the covariance is negative
    # and descent raises beta (sharper down-weighting of the negative-transfer domain).
    # alpha = 2 delta sigmoid(a): d alpha / d a = 0.5 at alpha = 1, and its gradient is the same
    # sum with lambda_old in place of phi: zero while lambda_old is uniform.
    model, config = _model(ntg_beta=1.0, use_sc_mim=False)
    inputs = {F.DOMAIN: np.array([0, 0, 1, 1], "int32"), F.ITEM_ID: np.array([1, 2, 3, 4], "int32")}
    labels = np.array([1.0, 0.0, 1.0, 0.0], "float32")
    y_pred = {"single_logit": np.array([3.0, -3.0, 0.0, 0.0], "float32"),
              "cross_logit": np.array([0.0, 0.0, 1.0, -1.0], "float32")}
    cross = np.array([math.log(2), _softplus(-1)])
    phi = np.array([_softplus(-3), math.log(2)]) - cross
    for old in ([0.5, 0.5], [0.8, 0.2]):
        model.ntg.lambdas.assign(old)
        old = np.array(old)
        lam = np.exp(old + phi) / np.exp(old + phi).sum()
        with tf.GradientTape() as tape:
            loss = model.compute_loss(x=inputs, y={F.SERVING_OUTPUT: labels}, y_pred=y_pred, training=False)
        d_alpha, d_beta = tape.gradient(loss, [model.ntg.alpha_logit, model.ntg.log_beta])
        expected_beta = 2 * (lam * (phi - lam @ phi) * cross).sum()
        expected_alpha = 0.5 * 2 * (lam * (old - lam @ old) * cross).sum()
        np.testing.assert_allclose(float(d_beta), expected_beta, rtol=1e-4)
        np.testing.assert_allclose(float(d_alpha), expected_alpha, rtol=1e-4, atol=1e-7)
        assert float(d_beta) < 0
    assert abs(expected_alpha) > 1e-3  # off-uniform lambda: alpha learns too
    # "fixed" keeps them constant: no such weights.
    fixed, _ = _model(ntg_coefficients="fixed")
    assert not [w for w in fixed.trainable_weights if "ntg" in w.path]


def test_training_lowers_the_loss_on_a_fixed_batch():
    model, config = _model()
    rows = _rows()
    inputs, labels = _inputs(rows, config), _labels(rows)
    _compile(model, 3e-3, run_eagerly=False)
    y = {F.SERVING_OUTPUT: labels}
    before, before_total = model.evaluate(inputs, y, verbose=0)[0], _training_loss(model, inputs, labels)
    beta = float(_np(model.ntg.log_beta))
    for _ in range(2):
        logs = model.train_on_batch(inputs, y, return_dict=True)
    assert set(logs) == {"loss", "auc"} and np.isfinite(logs["loss"])
    after, after_total = model.evaluate(inputs, y, verbose=0)[0], _training_loss(model, inputs, labels)
    assert np.isfinite(before) and after < before  # the served log loss (what validation reads)
    assert after_total < before_total  # eq. 18
    assert abs(_lambdas(model) - 0.5).max() > 1e-4 and float(_np(model.ntg.log_beta)) != beta


def test_each_ablation_builds_trains_and_changes_the_output():
    # Same seed, same batch, same steps: the ablations start from the full model's weights and
    # forward pass (they change training only) and end elsewhere.
    rows = _rows()
    full, config = _model()
    inputs, labels = _inputs(rows, config), _labels(rows)
    y = {F.SERVING_OUTPUT: labels}
    initial = _ctr(full, inputs)
    _compile(full)
    for _ in range(2):
        full.train_on_batch(inputs, y)
    trained = _ctr(full, inputs)
    for flag in ("use_lc_ntg", "use_sc_mim", "use_acmoe"):
        ablated, _ = _model(**{flag: False})
        np.testing.assert_allclose(_ctr(ablated, inputs), initial, rtol=1e-6)
        paths = {w.path for w in ablated.weights}
        assert any("ntg" in p for p in paths) == (flag != "use_lc_ntg")
        assert any("sc_mim" in p for p in paths) == (flag != "use_sc_mim")
        assert ablated.stop_gradient_flags("single") == ((False,) * 3 if flag == "use_acmoe" else (True, False, False))
        _compile(ablated)
        before = ablated.evaluate(inputs, y, verbose=0)[0]
        for _ in range(2):
            ablated.train_on_batch(inputs, y)
        assert ablated.evaluate(inputs, y, verbose=0)[0] < before, flag
        assert np.abs(_ctr(ablated, inputs) - trained).max() > 1e-5, flag


def test_score_selects_each_candidates_domain():
    # encode_context once, score candidates of both domains: equals call() on rows whose target is
    # each candidate. The same item in two domains differs by the domains' biases.
    rows = _rows()
    context_row = rows[9]
    candidates = [(b"x1", b"a"), (b"x1", b"b"), (b"y9", b"b"), (b"x4", b"a")]
    model, config = _model()
    model.cross_bias.assign([0.3, -0.2])
    expected = _ctr(model, _inputs([_with_target(context_row, i, d) for i, d in candidates], config))
    context = model.encode_context(_inputs([context_row], config))
    context = {k: keras.ops.repeat(v, len(candidates), axis=0) for k, v in context.items()}
    items = preprocess.hash_ids(tf.constant([i for i, _ in candidates]), config.inputs.item_buckets)
    domains = tf.constant([0, 1, 1, 0], tf.int32)
    logits = _np(model.score(context, items, domains))
    np.testing.assert_allclose(_np(keras.ops.sigmoid(logits)), expected, rtol=1e-5)
    np.testing.assert_allclose(logits[0] - logits[1], 0.5, rtol=1e-5)
    assert len(set(np.round(expected, 6))) == len(candidates)


def test_item_bias_adds_one_learned_bias_per_item_to_both_tasks():
    rows = _rows()
    context_row = rows[9]
    assert _model()[0].item_bias is None  # off by default: eq. 19 has no item bias
    model, config = _model(item_bias=True)
    inputs = _inputs([_with_target(context_row, b"x1", b"a"), _with_target(context_row, b"y9", b"b")], config)
    before_training, before_served = model(inputs, training=True), _ctr(model, inputs)
    items = _np(inputs[F.ITEM_ID])
    table = np.zeros((config.inputs.item_buckets, 1), "float32")
    table[items] = [[0.75], [-1.25]]
    model.item_bias.embeddings.assign(table)
    outputs = model(inputs, training=True)
    for name in ("cross_logit", "single_logit"):
        np.testing.assert_allclose(_np(outputs[name]) - _np(before_training[name]), [0.75, -1.25], rtol=1e-5, atol=1e-5)
    served = _ctr(model, inputs)
    np.testing.assert_allclose(np.log(served / (1 - served)) - np.log(before_served / (1 - before_served)),
                               [0.75, -1.25], rtol=1e-4, atol=1e-4)
    # score_items (the full softmax) adds the same bias to each column.
    context = model.encode_context(inputs)
    by_items = _np(model.score_items(context, inputs[F.ITEM_ID], inputs[F.DOMAIN]))  # (2, 2)
    np.testing.assert_allclose(np.diag(by_items), _np(outputs["cross_logit"]), rtol=1e-5, atol=1e-5)
    # Under "bpr", row i against row j's target gets b of j's target.
    bpr, bpr_config = _model(objective="bpr", item_bias=True)
    bpr_inputs = _inputs(rows[:3], bpr_config)
    plain = _np(bpr(bpr_inputs, training=True)["cross_scores"])
    bpr.item_bias.embeddings.assign(np.full((bpr_config.inputs.item_buckets, 1), 0.5, "float32"))
    np.testing.assert_allclose(_np(bpr(bpr_inputs, training=True)["cross_scores"]) - plain, 0.5, rtol=1e-5, atol=1e-5)


def test_three_domains():
    domains = ("a", "b", "c")
    rows = _rows(domains)
    model, config = _model(domains)
    inputs, labels = _inputs(rows, config), _labels(rows)
    assert tuple(inputs[F.DOMAIN_HISTORY_ITEM_IDS].shape) == (len(rows), 3, DOMAIN_HISTORY)
    assert tuple(model.single_representations(inputs).shape) == (len(rows), 3, 8)
    outputs = model(inputs, training=True)
    assert tuple(outputs["sc_mim"].shape) == (len(rows), 3)
    assert _np(outputs["sc_mim_mask"]).sum(axis=0).min() >= 2  # every domain has SC-MIM negatives
    losses = model.task_losses(inputs, labels, outputs)
    assert _np(losses["present"]).all() and (_np(losses["sc_mim"]) > 0).all()
    _compile(model)
    before = model.evaluate(inputs, {F.SERVING_OUTPUT: labels}, verbose=0)[0]
    model.train_on_batch(inputs, {F.SERVING_OUTPUT: labels})
    assert model.evaluate(inputs, {F.SERVING_OUTPUT: labels}, verbose=0)[0] < before
    assert _lambdas(model).shape == (3,)
    np.testing.assert_allclose(_lambdas(model).sum(), 1.0, rtol=1e-6)
    assert np.all(np.isfinite(_ctr(model, inputs)))


def test_saved_model_serves_what_the_model_computes(tmp_path):
    model, config = _model()
    rows = _rows()
    inputs, labels = _inputs(rows, config), _labels(rows)
    _compile(model)
    model.train_on_batch(inputs, {F.SERVING_OUTPUT: labels})
    serialized = [sequences.serialize_example(r) for r in rows]
    expected = _ctr(model, inputs)
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


JAX_CHILD = r"""
import json, keras, numpy as np
import models.syncrec  # noqa: F401
from models import registry
from models.base import dummy_inputs
from xdctr import features as F
assert keras.backend.backend() == "jax"
keras.utils.set_random_seed(0)
config = registry.resolve_config("syncrec", {"embedding_dim": 8, "num_experts": 2, "inputs": {
    "domains": ["a", "b", "c"], "history_length": 4, "domain_history_length": 3, "item_buckets": 64}})
model = registry.build("syncrec", config)
rng = np.random.default_rng(0)
x = {k: keras.ops.convert_to_numpy(v) for k, v in dummy_inputs(config.inputs, batch=8).items()}
x[F.ITEM_ID] = rng.integers(1, 64, size=8).astype("int32")
x[F.DOMAIN] = np.arange(8).astype("int32") % 3
x[F.HISTORY_ITEM_IDS] = rng.integers(1, 64, size=(8, 4)).astype("int32")
x[F.HISTORY_DOMAINS] = rng.integers(0, 3, size=(8, 4)).astype("int32")
x[F.HISTORY_MASK] = np.ones((8, 4), bool)
x[F.DOMAIN_HISTORY_ITEM_IDS] = rng.integers(1, 64, size=(8, 3, 3)).astype("int32")
x[F.DOMAIN_HISTORY_MASK] = np.ones((8, 3, 3), bool)
y = {F.SERVING_OUTPUT: (np.arange(8) % 2).astype("float32")}
model.compile(optimizer=keras.optimizers.Adam(1e-2), loss={F.SERVING_OUTPUT: keras.losses.BinaryCrossentropy()})
logs = model.train_on_batch(x, y, return_dict=True)
print(json.dumps({"lambdas": keras.ops.convert_to_numpy(model.ntg.lambdas).tolist(),
                  "log_beta": float(keras.ops.convert_to_numpy(model.ntg.log_beta)), "loss": float(logs["loss"])}))
"""


def test_lambda_is_updated_under_the_jax_backend():
    # Keras's JAX trainer runs compute_loss inside a StatelessScope; Keras 3.15 reads the
    # non-trainable variables back from that scope, so the assign of lambda is kept, not dropped.
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, "-c", JAX_CHILD], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert np.isfinite(out["loss"])
    np.testing.assert_allclose(sum(out["lambdas"]), 1.0, rtol=1e-5)
    assert max(abs(v - 1 / 3) for v in out["lambdas"]) > 1e-4  # moved from uniform
    assert out["log_beta"] != pytest.approx(math.log(10.0), abs=1e-6)  # beta learned


def test_runs_on_the_tensorflow_backend():
    assert keras.backend.backend() == "tensorflow"
