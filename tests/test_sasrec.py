"""The SASRec baseline (models/sasrec.py): its score, what it reads, and that it learns a sequence."""

import keras
import numpy as np
import pytest

import models
from xdctr import features as F

HISTORY, BUCKETS = 4, 40


def _build(seed=1, **overrides):
    keras.utils.set_random_seed(seed)
    config = {"embedding_dim": 8, "num_layers": 1, "num_heads": 2, "dropout": 0.0, **overrides,
              "inputs": {"domains": ["a", "b"], "history_length": HISTORY, "domain_history_length": 2,
                         "item_buckets": BUCKETS, "user_buckets": BUCKETS}}
    return models.build("sasrec", models.resolve_config("sasrec", config))


def _inputs(history, items, domains=None):
    history = np.asarray(history, "int32")
    batch = len(history)
    return {
        F.USER_ID: np.ones(batch, "int32"), F.ITEM_ID: np.asarray(items, "int32"),
        F.DOMAIN: np.zeros(batch, "int32") if domains is None else np.asarray(domains, "int32"),
        F.HISTORY_ITEM_IDS: history, F.HISTORY_MASK: history > 0,
        F.HISTORY_DOMAINS: np.zeros_like(history), F.HISTORY_TIME_GAPS: np.where(history > 0, 1, 0).astype("int32"),
        F.DOMAIN_HISTORY_ITEM_IDS: np.zeros((batch, 2, 2), "int32"),
        F.DOMAIN_HISTORY_MASK: np.zeros((batch, 2, 2), bool),
        F.TARGET_DOMAIN_CLICKS: np.zeros(batch, "int32"), F.OTHER_DOMAIN_CLICKS: np.zeros(batch, "int32"),
    }


def _logits(model, inputs):
    ctr = keras.ops.convert_to_numpy(model(inputs)[F.SERVING_OUTPUT]).astype("float64")
    return np.log(ctr / (1 - ctr))


def _with_item_bias(history, biases):
    """A model with item_bias on, items 9 and 11 given `biases`; returns (model, inputs)."""
    model = _build(item_bias=True)
    inputs = _inputs(history, [9, 11])
    model(inputs)
    bias = np.zeros((BUCKETS, 1), "float32")
    bias[9], bias[11] = biases
    model.item_bias.embeddings.assign(bias)
    return model, inputs


def test_the_logit_is_the_latest_state_dotted_with_the_target_embedding():
    model, inputs = _with_item_bias([[0, 3, 5, 7], [0, 0, 0, 2]], (0.5, -0.25))
    state = keras.ops.convert_to_numpy(model.encode_context(inputs)["state"])  # (2, 8)
    table = keras.ops.convert_to_numpy(model.item_embedding.embeddings)
    expected = np.sum(state * table[[9, 11]], axis=-1) + [0.5, -0.25]
    np.testing.assert_allclose(_logits(model, inputs), expected, rtol=1e-4, atol=1e-4)
    assert np.all(np.abs(state) > 0)


def test_no_history_scores_only_the_bias():
    model, inputs = _with_item_bias([[0, 0, 0, 0], [0, 0, 0, 0]], (1.5, -0.75))
    np.testing.assert_allclose(_logits(model, inputs), [1.5, -0.75], atol=1e-4)


def test_padding_does_not_count_and_order_does():
    model = _build()
    inputs = _inputs([[0, 3, 5, 7]], [9])
    expected = _logits(model, inputs)
    # The padded step's id is not read.
    np.testing.assert_allclose(_logits(model, dict(inputs, **{F.HISTORY_ITEM_IDS: np.array([[13, 3, 5, 7]], "int32")})),
                               expected, atol=1e-6)
    # Domains, per-domain histories and the target's domain are not read either.
    other = dict(inputs, **{F.DOMAIN: np.ones(1, "int32"), F.HISTORY_DOMAINS: np.ones((1, HISTORY), "int32")})
    np.testing.assert_allclose(_logits(model, other), expected, atol=1e-6)
    # The same clicks in another order give another state (positions and the causal encoder).
    state = keras.ops.convert_to_numpy(model.encode_context(inputs)["state"])
    reordered = keras.ops.convert_to_numpy(model.encode_context(_inputs([[0, 7, 5, 3]], [9]))["state"])
    assert np.linalg.norm(reordered - state) > 0.1 * np.linalg.norm(state)


def test_learns_which_item_follows_the_latest_click():
    # Item i (1..10) is always followed by item i + 10; the earlier clicks are noise. After
    # training with one random non-click per click, the follower outranks every other item.
    rng = np.random.default_rng(0)
    n = 2_000
    latest = rng.integers(1, 11, n)
    history = np.concatenate([rng.integers(1, 21, (n, HISTORY - 1)), latest[:, None]], axis=1)
    negatives = rng.integers(11, 21, n)
    negatives = np.where(negatives == latest + 10, 11 + (negatives - 10) % 10, negatives)
    inputs = _inputs(np.concatenate([history, history]), np.concatenate([latest + 10, negatives]))
    labels = np.concatenate([np.ones(n), np.zeros(n)]).astype("float32")
    model = _build(seed=3)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss={F.SERVING_OUTPUT: keras.losses.BinaryCrossentropy()})
    model.fit(inputs, {F.SERVING_OUTPUT: labels}, batch_size=200, epochs=8, verbose=0)

    test_history = np.concatenate([rng.integers(1, 21, (10, HISTORY - 1)), np.arange(1, 11)[:, None]], axis=1)
    candidates = np.arange(11, 21)
    scores = np.stack([_logits(model, _inputs(test_history, np.full(10, c))) for c in candidates], axis=1)  # (10, 10)
    assert np.all(np.argmax(scores, axis=1) == np.arange(10))


def test_domain_query_scores_with_the_query_token_of_the_candidates_domain():
    model = _build(domain_query=True)
    inputs = _inputs([[0, 3, 5, 7], [0, 0, 0, 0]], [9, 11], domains=[0, 1])
    model(inputs)
    states = keras.ops.convert_to_numpy(model.encode_context(inputs)["states"])  # (2, D=2, 8)
    assert states.shape == (2, 2, 8)
    # By hand: the encoder on the scaled history plus positions, then Q_k as one more real step.
    table = keras.ops.convert_to_numpy(model.item_embedding.embeddings)
    positions = keras.ops.convert_to_numpy(model.positions)
    queries = keras.ops.convert_to_numpy(model.domain_queries)
    history, mask = inputs[F.HISTORY_ITEM_IDS], inputs[F.HISTORY_MASK]
    x = (table[history] * np.sqrt(8) + positions) * mask[..., None]
    for k in range(2):
        steps = np.concatenate([x, np.broadcast_to(queries[k], (2, 1, 8))], axis=1).astype("float32")
        steps_mask = np.concatenate([mask, np.ones((2, 1), bool)], axis=1)
        by_hand = keras.ops.convert_to_numpy(model.encoder(steps, steps_mask))[:, -1]
        np.testing.assert_allclose(states[:, k], by_hand, rtol=1e-4, atol=1e-5)
    assert np.all(np.linalg.norm(states[1], axis=-1) > 0.1)  # no history: the queries' own states, not 0
    assert np.linalg.norm(states[0, 0] - states[0, 1]) > 0.1 * np.linalg.norm(states[0, 0])
    # Each candidate is scored with its own domain's state.
    expected = [states[0, 0] @ table[9], states[1, 1] @ table[11]]
    np.testing.assert_allclose(_logits(model, inputs), expected, rtol=1e-4, atol=1e-4)
    swapped = _logits(model, dict(inputs, **{F.DOMAIN: np.array([1, 0], "int32")}))
    np.testing.assert_allclose(swapped, [states[0, 1] @ table[9], states[1, 0] @ table[11]], rtol=1e-4, atol=1e-4)
    # The batched scorer agrees: every row against items 9 (domain a) and 11 (domain b).
    context = model.encode_context(inputs)
    batched = keras.ops.convert_to_numpy(model.score_items(context, np.array([9, 11], "int32"), np.array([0, 1], "int32")))
    np.testing.assert_allclose(batched, [[states[r, 0] @ table[9], states[r, 1] @ table[11]] for r in range(2)],
                               rtol=1e-4, atol=1e-4)


def test_config_errors():
    with pytest.raises(ValueError, match="num_heads=3"):
        _build(num_heads=3)
    with pytest.raises(ValueError, match="dropout=1.0"):
        _build(dropout=1.0)
    with pytest.raises(ValueError, match="num_layers=0"):
        _build(num_layers=0)
    assert models.build("sasrec", models.resolve_config("sasrec", {})).item_bias is None
