"""DASL: orthogonal maps, dual attention, the model, its ablations and its SavedModel export."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import models.dasl  # noqa: F401  (registers "dasl")
from components.ingest import sequences
from components.ingest.records import Impression
from components.trainer import export, preprocess
from models import config as config_lib
from models import registry
from models.layers.dual_attention import DualAttention, DualAttentionMemory
from models.layers.orthogonal import OrthogonalMap
from xdctr import features as F

HISTORY, DOMAIN_HISTORY = 3, 2
BCE = keras.losses.BinaryCrossentropy()


# ---------------------------------------------------------------------------- layers


def test_cayley_map_by_hand():
    # K = [[0, .5], [0, 0]] -> S = K - K^T = [[0, .5], [-.5, 0]];
    # (I - S)^-1 = 0.8 [[1, .5], [-.5, 1]], (I + S) = [[1, .5], [-.5, 1]]
    # X = 0.8 [[.75, 1], [-1, .75]] = [[.6, .8], [-.8, .6]], a rotation.
    layer = OrthogonalMap(2)
    layer.build()
    layer.kernel.assign([[0.0, 0.5], [0.0, 0.0]])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.matrix()), [[0.6, 0.8], [-0.8, 0.6]], atol=1e-6)
    u = np.array([[1.0, 0.0]], "float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(u)), [[0.6, -0.8]], atol=1e-6)  # X u
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(u, transpose=True)), [[0.6, 0.8]], atol=1e-6)  # X^T u
    assert float(layer.orthogonality_penalty()) < 1e-10


def test_cayley_map_starts_as_identity_and_penalty_map_by_hand():
    u = np.array([[1.0, 2.0]], "float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(OrthogonalMap(2)(u)), u, atol=1e-6)
    # penalty mode: X = K = 2I -> X u = 2u; X^T X - I = 3I -> ||.||_F^2 = 9 + 9 = 18.
    layer = OrthogonalMap(2, "penalty")
    layer.build()
    layer.kernel.assign(2.0 * np.eye(2))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(u)), [[2.0, 4.0]])
    np.testing.assert_allclose(float(layer.orthogonality_penalty()), 18.0)
    assert OrthogonalMap.from_config(layer.get_config()).parametrization == "penalty"


def test_orthogonal_map_rejects_bad_args():
    with pytest.raises(ValueError, match="parametrization='qr'"):
        OrthogonalMap(2, "qr")
    with pytest.raises(ValueError, match="dim=0"):
        OrthogonalMap(0)


def test_dual_attention_memory_by_hand():
    # ones kernels (dim 2 -> 1 unit): key = value = e_1 + e_2; domains laid out one after another.
    histories = np.array([[[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [0.0, 0.0]]]], "float32")  # (1, D=2, Ld=2, 2)
    mask = np.array([[[True, True], [True, False]]])
    keys, values, flat_mask = DualAttentionMemory(2, 1, kernel_initializer="ones")(histories, mask)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(keys), [[[3.0], [7.0], [11.0], [0.0]]])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(values), [[[3.0], [7.0], [11.0], [0.0]]])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(flat_mask), [[True, True, True, False]])


def test_dual_attention_by_hand():
    # dim = units = 1, ones kernels: q = query, k = v = the entries, sqrt(d_k) = 1.
    # Entries, domain-major: domain 0 [9 (padding), 1], domain 1 [2, 3]; query 1.
    # joint, target 0: softmax([1, 2, 3]) . [1, 2, 3] = (e + 2e^2 + 3e^3) / (e + e^2 + e^3).
    # within domain 0 (DASL-DA): only the entry 1 -> 1.
    # within domain 1: (2e^2 + 3e^3) / (e^2 + e^3); a fully padded row -> 0, not NaN.
    e = math.e
    entries = np.array([[9.0, 1.0, 2.0, 3.0]] * 3, "float32")[..., None]  # (3, 4, 1)
    mask = np.array([[False, True, True, True]] * 2 + [[False] * 4])
    query = np.ones((3, 1), "float32")
    domain = np.array([0, 1, 0], "int32")
    joint = DualAttention(2, 1, kernel_initializer="ones")(query, domain, entries, entries, mask)
    within = DualAttention(2, 1, joint=False, kernel_initializer="ones")(query, domain, entries, entries, mask)
    full = (e + 2 * e**2 + 3 * e**3) / (e + e**2 + e**3)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(joint)[:, 0], [full, full, 0.0], rtol=1e-6)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(within)[:, 0], [1.0, (2 * e**2 + 3 * e**3) / (e**2 + e**3), 0.0], rtol=1e-6
    )


# ---------------------------------------------------------------------------- model helpers


def _events(domains):
    a, b = domains[0], domains[1]
    events = [
        Impression(1, "u1", a, "x1", 1), Impression(2, "u1", b, "y1", 1), Impression(3, "u1", a, "x2", 0),
        Impression(4, "u1", b, "y2", 1), Impression(5, "u1", a, "x3", 1), Impression(6, "u1", b, "y3", 0),
        Impression(1, "u2", b, "y2", 0), Impression(2, "u2", b, "y1", 1), Impression(3, "u2", a, "x1", 1),
        Impression(4, "u2", a, "x4", 0),
    ]
    if len(domains) > 2:
        c = domains[2]
        events += [Impression(7, "u1", c, "z1", 1), Impression(8, "u1", c, "z2", 0), Impression(5, "u2", c, "z1", 1)]
    return events


def _batch(domains=("a", "b")):
    """Serialized tf.Examples and labels of a few users; some rows have history in every domain."""
    contract = F.Contract(domains, HISTORY, DOMAIN_HISTORY)
    rows = []
    events = _events(domains)
    for user in ("u1", "u2"):
        rows += list(sequences.user_examples(user, [e for e in events if e.user_id == user], contract))
    serialized = [sequences.to_tf_example(r).SerializeToString() for r in rows]
    return serialized, np.array([r[F.LABEL] for r in rows], "float32")


def _config(domains=("a", "b"), **overrides):
    values = {"embedding_dim": 4, "gru_units": 4, "attention_units": 4, "hidden_units": [8],
              "inputs": {"domains": list(domains), "history_length": HISTORY, "domain_history_length": DOMAIN_HISTORY,
                         "item_buckets": 53, "user_buckets": 13}}
    values.update(overrides)
    return registry.resolve_config("dasl", values)


def _model(domains=("a", "b"), seed=1, **overrides):
    keras.utils.set_random_seed(seed)
    config = _config(domains, **overrides)
    return registry.build("dasl", config), config


def _inputs(serialized, config):
    return preprocess.to_model_inputs(preprocess.parse(tf.constant(serialized), config.inputs), config.inputs)


def _ctr(model, inputs):
    return keras.ops.convert_to_numpy(model(inputs)[F.SERVING_OUTPUT])


def _compile(model, learning_rate=0.05):
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss={F.SERVING_OUTPUT: BCE}, jit_compile=False)


def _total_loss(model, inputs, labels):
    """CTR log loss plus the model's auxiliary losses, as `compute_loss` adds them in fit."""
    outputs = model(inputs)
    loss = BCE(labels, outputs[F.SERVING_OUTPUT])
    for value in model.auxiliary_losses(inputs, outputs).values():
        loss = loss + value
    return float(loss)


# ---------------------------------------------------------------------------- model


def test_batch_has_overlap_users():
    serialized, labels = _batch()
    inputs = _inputs(serialized, _config())
    present = inputs[F.DOMAIN_HISTORY_MASK].numpy().any(-1)  # (batch, D)
    assert present.all(-1).sum() >= 2 and 0 < labels.mean() < 1


def test_config_round_trip_and_bad_values():
    config = _config(orthogonal="penalty", use_dual_attention=False)
    assert registry.resolve_config("dasl", config_lib.to_dict(config)) == config
    assert (config.orthogonal, config.use_dual_attention, config.hidden_units) == ("penalty", False, (8,))
    defaults = registry.default_config("dasl")
    assert (defaults.embedding_dim, defaults.orthogonal, defaults.use_dual_embedding) == (16, "cayley", True)
    with pytest.raises(ValueError, match="orthogonal='qr'"):
        registry.build("dasl", _config(orthogonal="qr"))
    with pytest.raises(ValueError, match="embedding_dim=0"):
        registry.build("dasl", _config(embedding_dim=0))
    with pytest.raises(ValueError, match="domains=\\('a',\\)"):
        registry.build("dasl", _config(domains=("a",)))


def test_fully_padded_histories_give_finite_ctr():
    model, config = _model()
    inputs = dict(_inputs(_batch()[0], config))
    inputs[F.DOMAIN_HISTORY_MASK] = tf.zeros_like(inputs[F.DOMAIN_HISTORY_MASK])
    inputs[F.DOMAIN_HISTORY_ITEM_IDS] = tf.zeros_like(inputs[F.DOMAIN_HISTORY_ITEM_IDS])
    ctr = _ctr(model, inputs)
    assert np.all(np.isfinite(ctr)) and np.all((ctr > 0) & (ctr < 1))
    # No overlap rows: the dual-embedding loss is 0, not NaN.
    assert float(model.dual_embedding_loss(inputs)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("orthogonal", ["cayley", "penalty"])
def test_every_weight_gets_a_gradient(orthogonal):
    model, config = _model(orthogonal=orthogonal)
    serialized, labels = _batch()
    inputs = _inputs(serialized, config)
    model(inputs)
    if orthogonal == "penalty":  # start off-orthogonal, so the penalty has a gradient
        model.maps[0].kernel.assign(1.5 * np.eye(4))
    with tf.GradientTape() as tape:
        outputs = model(inputs)
        loss = BCE(labels, outputs[F.SERVING_OUTPUT]) + sum(model.auxiliary_losses(inputs, outputs).values())
    grads = tape.gradient(loss, model.trainable_variables)
    assert len(grads) == len(model.trainable_variables) > 0
    for variable, grad in zip(model.trainable_variables, grads):
        assert grad is not None, variable.path
        assert float(tf.reduce_sum(tf.abs(tf.convert_to_tensor(grad)))) > 0, variable.path


def test_one_training_step_lowers_the_loss():
    model, config = _model()
    serialized, labels = _batch()
    inputs = _inputs(serialized, config)
    _compile(model)
    before = _total_loss(model, inputs, labels)
    model.train_on_batch(inputs, {F.SERVING_OUTPUT: labels})
    assert _total_loss(model, inputs, labels) < before


def test_cayley_map_stays_orthogonal_after_training():
    model, config = _model(dual_loss_weight=1.0)
    serialized, labels = _batch()
    inputs = _inputs(serialized, config)
    _compile(model, 0.1)
    for _ in range(5):
        model.train_on_batch(inputs, {F.SERVING_OUTPUT: labels})
    x = keras.ops.convert_to_numpy(model.maps[0].matrix())
    assert np.abs(x - np.eye(4)).max() > 1e-2  # it moved away from the identity ...
    np.testing.assert_allclose(x.T @ x, np.eye(4), atol=1e-4)  # ... and stayed orthogonal
    assert "orthogonality" not in model.auxiliary_losses(inputs, None)


def test_penalty_is_in_the_loss_and_decreases_with_training():
    model, config = _model(orthogonal="penalty", dual_loss_weight=0.0)
    serialized, labels = _batch()
    inputs = _inputs(serialized, config)
    model(inputs)
    model.maps[0].kernel.assign(1.3 * np.eye(4))  # X^T X - I = 0.69 I -> penalty 4 * 0.69^2
    penalty = float(model.orthogonality_penalty())
    np.testing.assert_allclose(penalty, 4 * 0.69**2, rtol=1e-5)
    _compile(model)
    outputs = model(inputs)
    ctr_only = float(BCE(labels, outputs[F.SERVING_OUTPUT]))
    total = float(model.compute_loss(x=inputs, y={F.SERVING_OUTPUT: labels}, y_pred=outputs, training=True))
    np.testing.assert_allclose(total - ctr_only, penalty, rtol=1e-4)  # weight 1.0
    for _ in range(5):
        model.train_on_batch(inputs, {F.SERVING_OUTPUT: labels})
    assert float(model.orthogonality_penalty()) < 0.5 * penalty


def test_saved_model_serves_what_the_model_computes(tmp_path):
    model, config = _model()
    serialized, labels = _batch()
    inputs = _inputs(serialized, config)
    _compile(model)
    model.train_on_batch(inputs, {F.SERVING_OUTPUT: labels})
    expected = _ctr(model, inputs)
    export.export(model, config.inputs, str(tmp_path / "1"))
    loaded = tf.saved_model.load(str(tmp_path / "1"))
    served = loaded.signatures[F.SERVING_SIGNATURE](**{F.SERVING_INPUT: tf.constant(serialized)})[F.SERVING_OUTPUT]
    np.testing.assert_allclose(served.numpy(), expected, rtol=1e-5)

    row = len(serialized) - 1  # the last row has history in both domains
    candidates, domains = [b"x1", b"x9", b"y2"], [b"a", b"a", b"b"]
    scored = loaded.signatures[F.SCORE_CANDIDATES_SIGNATURE](**{
        F.SERVING_INPUT: tf.constant(serialized[row:row + 1]),
        F.CANDIDATE_ITEM_IDS: tf.constant(candidates), F.CANDIDATE_DOMAINS: tf.constant(domains),
    })[F.SERVING_OUTPUT].numpy()
    rows = {name: tf.repeat(value[row:row + 1], len(candidates), axis=0) for name, value in inputs.items()}
    rows[F.ITEM_ID] = preprocess.hash_ids(tf.constant(candidates), config.inputs.item_buckets)
    rows[F.DOMAIN] = preprocess.domain_index(tf.constant(domains), config.inputs.domains)[0]
    np.testing.assert_allclose(scored, _ctr(model, rows), rtol=1e-5)
    assert len(set(np.round(scored, 6))) == 3


def test_ablations_build_train_and_change_the_output():
    serialized, labels = _batch()
    full, config = _model()
    inputs = _inputs(serialized, config)
    reference = _ctr(full, inputs)
    # DASL-DE: no maps, no metric loss, u_t only.
    no_embedding, _ = _model(use_dual_embedding=False)
    assert not no_embedding.maps and no_embedding.auxiliary_losses(inputs, None) == {}
    assert not np.allclose(_ctr(no_embedding, inputs), reference)
    # DASL-DA: same weights as the full model, attention restricted to the target domain.
    no_attention, _ = _model(use_dual_attention=False)
    no_attention(inputs)
    no_attention.set_weights(full.get_weights())
    assert not np.allclose(_ctr(no_attention, inputs), reference)
    for model in (no_embedding, no_attention):
        _compile(model)
        before = _total_loss(model, inputs, labels)
        model.train_on_batch(inputs, {F.SERVING_OUTPUT: labels})
        assert _total_loss(model, inputs, labels) < before


def test_three_domains():
    domains = ("a", "b", "c")
    model, config = _model(domains)
    serialized, labels = _batch(domains)
    inputs = _inputs(serialized, config)
    assert len(model.maps) == 3  # pairs (0, 1), (0, 2), (1, 2)
    assert inputs[F.DOMAIN_HISTORY_MASK].numpy().any(-1).all(-1).any()  # a row with history in all 3
    context = model.encode_context(inputs)
    assert tuple(context["users"].shape) == (len(serialized), 3, 3, 4)
    # users[:, t, s] = X_{s->t} u_s; X_{2->0} = X_02^T, so mapping it back with X_02 gives u_2.
    back = model.maps[1](context["users"][:, 0, 2])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(back), keras.ops.convert_to_numpy(context["users"][:, 2, 2]),
                               atol=1e-5)
    _compile(model)
    before = _total_loss(model, inputs, labels)
    model.train_on_batch(inputs, {F.SERVING_OUTPUT: labels})
    assert _total_loss(model, inputs, labels) < before
    assert np.all(np.isfinite(_ctr(model, inputs)))


def test_runs_on_the_tensorflow_backend():
    assert keras.backend.backend() == "tensorflow"
