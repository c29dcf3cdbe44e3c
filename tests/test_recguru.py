"""RecGURU: its layers by hand, the critic and its penalty, the three training phases, ablations, export."""

import json
import logging
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import models
import models.recguru  # noqa: F401  (registers "recguru")
from components.ingest import sequences
from components.ingest.records import Impression
from components.trainer import export, preprocess, task
from models import config as config_lib
from models.layers.critic import DomainCritic, cross_domain_interpolates, gradient_penalty, one_vs_rest_wasserstein
from models.layers.sampled_softmax import SampledSoftmaxLoss, log_uniform_log_prob
from models.layers.transformer import TransformerBlock, TransformerDecoder, TransformerEncoder
from models.recguru import overlap_alignment_loss
from xdctr import features as F

from modelkit import labels as _labels, model_inputs as _inputs, served_ctr as _ctr, to_numpy as _np

HISTORY, DOMAIN_HISTORY, BUCKETS = 4, 3, 64
BCE = keras.losses.BinaryCrossentropy()


# ---------------------------------------------------------------- layers, by hand


@pytest.mark.parametrize("memory_attention", ["attention", "projection"])
def test_decoder_block_by_hand(memory_attention):
    # dim 2, ones kernels: a layer-normalised 2-vector is [a, -a], so every projection of it with a
    # ones kernel is 0. Self-attention: V = 0 -> 0. Cross-attention: Q = 0 -> uniform weights over
    # the real memory entries, V = memory . ones = [m0 + m1] * 2 (the memory is not normalised);
    # the projection form takes the mean of the real entries, then W^V: the same numbers.
    # FFN: relu(0) -> 0. So y = x + mean over real memory of [m0 + m1, m0 + m1], zeroed where padded.
    # x = [[1, 0], [0, 2]], memory [[1, 2], [3, 4]] -> V = [3, 3], [7, 7] -> mean [5, 5].
    block = TransformerBlock(num_heads=1, kernel_initializer="ones", with_memory=True,
                             memory_attention=memory_attention)
    x = np.array([[[1.0, 0.0], [0.0, 2.0]]], "float32")
    memory = np.array([[[1.0, 2.0], [3.0, 4.0]]], "float32")
    causal = np.array([[[True, False], [True, True]]])
    out = _np(block(x, np.array([[True, True]]), causal, memory, np.array([[True, True]])))
    np.testing.assert_allclose(out, [[[6.0, 5.0], [5.0, 7.0]]], rtol=1e-5)
    # Second memory entry masked: + [3, 3]. All masked: the cross-attention adds nothing.
    out = _np(block(x, np.array([[True, True]]), causal, memory, np.array([[True, False]])))
    np.testing.assert_allclose(out, [[[4.0, 3.0], [3.0, 5.0]]], rtol=1e-5)
    out = _np(block(x, np.array([[True, True]]), causal, memory, np.array([[False, False]])))
    np.testing.assert_allclose(out, x, rtol=1e-5)
    # A padded step is zero.
    out = _np(block(x, np.array([[False, True]]), causal, memory, np.array([[True, True]])))
    np.testing.assert_allclose(out, [[[0.0, 0.0], [5.0, 7.0]]], rtol=1e-5)
    restored = TransformerBlock.from_config(block.get_config())
    assert (restored.num_heads, restored.memory_attention) == (1, memory_attention)


def test_memory_projection_equals_attention_over_one_real_entry():
    # With one real memory entry the softmax weight is 1, so attention returns that entry's W^V
    # projection: the projection form with the same W^V gives the same block output.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3, 4)).astype("float32")
    memory = rng.normal(size=(2, 2, 4)).astype("float32")
    mask, attention_mask = np.ones((2, 3), bool), np.ones((2, 3, 3), bool)
    memory_mask = np.array([[True, False], [False, True]])
    attention = TransformerBlock(num_heads=2, with_memory=True, memory_attention="attention")
    projection = TransformerBlock(num_heads=2, with_memory=True, memory_attention="projection")
    expected = _np(attention(x, mask, attention_mask, memory, memory_mask))
    projection(x, mask, attention_mask, memory, memory_mask)
    for name in ("attention", "attention_norm", "ffn_norm", "ffn_inner", "ffn_outer"):
        getattr(projection, name).set_weights(getattr(attention, name).get_weights())
    projection.memory_projection.set_weights(attention.cross_attention.value_dense.get_weights())
    np.testing.assert_allclose(_np(projection(x, mask, attention_mask, memory, memory_mask)), expected,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="memory_attention='softmax'"):
        TransformerBlock(with_memory=True, memory_attention="softmax")


def test_decoder_by_hand_is_causal_and_reads_the_memory():
    # The ones-kernel block above, then the final layer norm: [6, 5] -> [1, -1], [5, 7] -> [-1, 1].
    decoder = TransformerDecoder(num_layers=1, num_heads=1, kernel_initializer="ones")
    x = np.array([[[1.0, 0.0], [0.0, 2.0]]], "float32")
    memory = np.array([[[1.0, 2.0], [3.0, 4.0]]], "float32")
    out = _np(decoder(x, np.array([[True, True]]), memory, np.array([[True, True]])))
    np.testing.assert_allclose(out, [[[1.0, -1.0], [-1.0, 1.0]]], atol=1e-5)

    keras.utils.set_random_seed(2)
    decoder = TransformerDecoder(num_layers=2, num_heads=2)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 4)).astype("float32")
    memory = rng.normal(size=(2, 2, 4)).astype("float32")
    mask, memory_mask = np.array([[True, True, True], [False, True, True]]), np.array([[True, True], [True, False]])
    out = _np(decoder(x, mask, memory, memory_mask))
    later = x.copy()
    later[:, 2] = [[3.0, -1.0, 0.0, 2.0], [-2.0, 0.5, 1.0, 0.0]]  # a later step never changes earlier outputs
    changed = _np(decoder(later, mask, memory, memory_mask))
    np.testing.assert_allclose(changed[:, :2], out[:, :2], rtol=1e-5, atol=1e-6)
    assert np.abs(changed[:, 2] - out[:, 2]).max() > 1e-3
    other_memory = memory.copy()
    other_memory[0, 1] = [1.0, -2.0, 0.5, 0.0]
    assert np.abs(_np(decoder(x, mask, other_memory, memory_mask))[0] - out[0]).max() > 1e-3
    other_memory[1, 1] += 100.0  # masked memory never matters
    np.testing.assert_allclose(_np(decoder(x, mask, other_memory, memory_mask))[1], out[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[1, 0], 0.0, rtol=0, atol=1e-6)
    empty = _np(decoder(x, np.zeros((2, 3), bool), memory, np.zeros((2, 2), bool)))
    np.testing.assert_allclose(empty, 0.0, rtol=0, atol=1e-6)  # fully padded: zeros, finite
    with pytest.raises(ValueError, match="num_layers=0"):
        TransformerDecoder(num_layers=0)


def test_encoder_is_bidirectional_and_ignores_padding():
    # Ones kernels: attention and FFN add 0 (see the decoder block), so the output is LN(x):
    # [1, 0] -> [1, -1], [0, 3] -> [-1, 1].
    encoder = TransformerEncoder(num_layers=1, num_heads=1, kernel_initializer="ones")
    out = _np(encoder(np.array([[[1.0, 0.0], [0.0, 3.0]]], "float32"), np.array([[True, True]])))
    np.testing.assert_allclose(out, [[[1.0, -1.0], [-1.0, 1.0]]], atol=1e-5)

    keras.utils.set_random_seed(3)
    encoder = TransformerEncoder(num_layers=2, num_heads=2)
    x = np.random.default_rng(1).normal(size=(2, 3, 4)).astype("float32")
    mask = np.array([[True, True, True], [False, True, True]])
    out = _np(encoder(x, mask))
    later = x.copy()
    later[:, 2] = [[3.0, -1.0, 0.0, 2.0], [-2.0, 0.5, 1.0, 0.0]]  # bidirectional: earlier outputs change
    assert np.abs(_np(encoder(later, mask))[:, :2] - out[:, :2]).max() > 1e-3
    padded = x.copy()
    padded[1, 0] = 100.0
    np.testing.assert_allclose(_np(encoder(padded, mask)), out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[1, 0], 0.0, rtol=0, atol=1e-6)
    np.testing.assert_allclose(_np(encoder(x, np.zeros((2, 3), bool))), 0.0, rtol=0, atol=1e-6)
    assert TransformerEncoder.from_config(encoder.get_config()).num_layers == 2
    with pytest.raises(ValueError, match="dropout=1.0"):
        TransformerEncoder(dropout=1.0)


TABLE = np.array([[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.0]], "float32")  # row 0: padding


def test_sampled_softmax_full_by_hand():
    # h = [1, 0]: logits of classes 1..3 = [1, 0, 2]; CE(y) = logsumexp - logit_y.
    layer = SampledSoftmaxLoss(num_classes=4, num_sampled=0)
    assert layer.full
    hidden = np.array([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]], "float32")  # (1, 3, 2)
    out = _np(layer(hidden, np.array([[3, 1, 0]]), np.array([[True, True, False]]), table=TABLE))
    lse = math.log(math.e + 1.0 + math.e**2)
    np.testing.assert_allclose(out, [[lse - 2.0, lse - 1.0, 0.0]], rtol=1e-6)
    # `offset` reads another block of the table: rows 4..7 hold classes 0..3 of a second domain.
    stacked = np.concatenate([np.zeros_like(TABLE), TABLE])
    np.testing.assert_allclose(_np(layer(hidden, np.array([[3, 1, 0]]), np.array([[True, True, False]]),
                                         table=stacked, offset=4)), out, rtol=1e-6)


def test_sampled_softmax_with_given_negatives_by_hand():
    hidden = np.array([[1.0, 0.0]], "float32")  # (1, 2)
    # Uniform: log Q is the same for every class and cancels. y = 1 against [2, 3, 3]:
    # logits [1; 0, 2, 2] -> CE = log(e + 1 + 2 e^2) - 1.
    layer = SampledSoftmaxLoss(num_classes=4, num_sampled=3)
    out = _np(layer(hidden, np.array([1]), np.array([True]), table=TABLE, sampled=np.array([2, 3, 3])))
    np.testing.assert_allclose(out, [math.log(math.e + 1 + 2 * math.e**2) - 1.0], rtol=1e-6)
    # An accidental hit (a sampled class equal to y) is not a negative: y = 3 against [2, 3]:
    # logits [2; 0, -inf] -> CE = log(e^2 + 1) - 2.
    out = _np(layer(hidden, np.array([3]), np.array([True]), table=TABLE, sampled=np.array([2, 3])))
    np.testing.assert_allclose(out, [math.log(math.e**2 + 1.0) - 2.0], rtol=1e-6)
    # Log-uniform over the 3 real classes (k = class - 1): Q(k) = log((k + 2) / (k + 1)) / log(4),
    # Q = [1/2, log(3/2)/log 4, log(4/3)/log 4] (sums to 1). y = 1 against [2, 3]:
    # logits [1 - log Q0; 0 - log Q1, 2 - log Q2].
    q = [math.log((k + 2) / (k + 1)) / math.log(4) for k in range(3)]
    assert abs(sum(q) - 1) < 1e-12
    np.testing.assert_allclose(_np(log_uniform_log_prob(np.array([0, 1, 2]), 3)), np.log(q), rtol=1e-6)
    layer = SampledSoftmaxLoss(num_classes=4, num_sampled=2, sampler="log_uniform")
    z = [1 - math.log(q[0]), 0 - math.log(q[1]), 2 - math.log(q[2])]
    expected = math.log(sum(math.exp(v) for v in z)) - z[0]
    out = _np(layer(hidden, np.array([1]), np.array([True]), table=TABLE, sampled=np.array([2, 3])))
    np.testing.assert_allclose(out, [expected], rtol=1e-6)


def test_samplers_draw_real_classes():
    keras.utils.set_random_seed(0)
    assert SampledSoftmaxLoss(num_classes=11, num_sampled=10).full  # as many draws as real classes: full softmax
    uniform = SampledSoftmaxLoss(num_classes=101, num_sampled=4000)
    draws = _np(uniform.sample())
    assert draws.min() >= 1 and draws.max() <= 100 and len(set(draws.tolist())) > 90
    zipf = SampledSoftmaxLoss(num_classes=101, num_sampled=4000, sampler="log_uniform")
    draws = _np(zipf.sample())
    assert draws.min() >= 1 and draws.max() <= 100
    # Class 1 (k = 0) has probability log(2) / log(101) ~ 0.150; class 100 ~ 0.002.
    assert abs(np.mean(draws == 1) - math.log(2) / math.log(101)) < 0.03
    assert np.mean(draws == 100) < 0.01
    with pytest.raises(ValueError, match="num_sampled=-1"):
        SampledSoftmaxLoss(4, num_sampled=-1)
    with pytest.raises(ValueError, match="sampler='zipf'"):
        SampledSoftmaxLoss(4, sampler="zipf")
    with pytest.raises(ValueError, match="first_class=3"):
        SampledSoftmaxLoss(4, first_class=3)


def test_in_batch_sampler_draws_the_calls_real_classes_with_log_q_by_hand():
    # Labels [[1, 1, 2, 3]] with the last position padded: the real classes are 1 (twice) and 2, so
    # Q(1) = 2/3, Q(2) = 1/3, and class 3 (padding) is never drawn.
    keras.utils.set_random_seed(0)
    layer = SampledSoftmaxLoss(num_classes=4, num_sampled=200, sampler="in_batch")
    labels, mask = np.array([[1, 1, 2, 3]]), np.array([[True, True, True, False]])
    draws = _np(layer.sample(labels, mask))
    assert set(draws.tolist()) == {1, 2} and abs(np.mean(draws == 1) - 2 / 3) < 0.1
    np.testing.assert_allclose(_np(layer.log_q(np.array([1, 2]), labels, mask)), np.log([2 / 3, 1 / 3]), rtol=1e-6)
    # h = [1, 0] at every position; y = 1 against the given negative 2:
    # logits [1 - log(2/3); 0 - log(1/3)] -> CE = log(e^z0 + e^z1) - z0. y = 2 against 2 is a hit: CE = 0.
    hidden = np.array([[[1.0, 0.0]] * 4], "float32")  # (1, 4, 2)
    z = [1.0 - math.log(2 / 3), 0.0 - math.log(1 / 3)]
    expected = math.log(math.exp(z[0]) + math.exp(z[1])) - z[0]
    out = _np(layer(hidden, labels, mask, table=TABLE, sampled=np.array([2])))
    np.testing.assert_allclose(out, [[expected, expected, 0.0, 0.0]], rtol=1e-6)
    assert np.all(np.isfinite(_np(layer(hidden, labels, mask, table=TABLE))))
    with pytest.raises(ValueError, match="needs the call's `labels`"):
        layer.sample()


def test_domain_critic_by_hand():
    # Ones kernels, zero biases, one hidden unit: f_k(x) = leaky_relu(sum x) for every head k
    # (slope 0.2 below 0): [1, 2] -> [3, 3]; [-1, -2] -> [-0.6, -0.6].
    critic = DomainCritic(2, hidden_units=(1,), kernel_initializer="ones")
    out = _np(critic(np.array([[1.0, 2.0], [-1.0, -2.0]], "float32")))
    np.testing.assert_allclose(out, [[3.0, 3.0], [-0.6, -0.6]], rtol=1e-6)
    assert DomainCritic.from_config(critic.get_config()).hidden_units == (1,)
    with pytest.raises(ValueError, match="num_domains=1"):
        DomainCritic(1)


def test_one_vs_rest_wasserstein_by_hand():
    # scores[b, j, k] = f_k(h[b, j]); row 1 has no domain-1 representation.
    scores = np.array([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 10.0], [7.0, 8.0]]], "float32")
    present = np.array([[True, True], [True, False]])
    # Head 0: mean f_0 over domain 0 = (1 + 5) / 2 = 3, over domain 1 = 3 -> W_0 = 0.
    # Head 1: mean f_1 over domain 1 = 4, over domain 0 = (2 + 10) / 2 = 6 -> W_1 = -2. Mean -1.
    np.testing.assert_allclose(_np(one_vs_rest_wasserstein(scores, present)), -1.0)
    # Nobody in domain 1: neither head has both sides, so the estimate is 0 (not NaN).
    np.testing.assert_allclose(_np(one_vs_rest_wasserstein(scores, np.array([[True, False], [True, False]]))), 0.0)
    # D = 3, one row per domain, head k scores k + 1 on its own domain and 0 elsewhere:
    # W_k = (k + 1) - 0 -> mean (1 + 2 + 3) / 3 = 2.
    scores3 = np.zeros((3, 3, 3), "float32")
    for k in range(3):
        scores3[k, k, k] = k + 1
    present3 = np.eye(3, dtype=bool)
    np.testing.assert_allclose(_np(one_vs_rest_wasserstein(scores3, present3)), 2.0)


def _segment_partner(point, start, candidates):
    """Index of the candidate c with point on the segment [start, c], or None."""
    for i, c in enumerate(candidates):
        eps = (point[0] - c[0]) / (start[0] - c[0])
        if -1e-6 <= eps <= 1 + 1e-6 and np.allclose(point, eps * start + (1 - eps) * c, atol=1e-5):
            return i
    return None


def test_cross_domain_interpolates_pair_other_domains():
    rng = np.random.default_rng(0)
    generator = keras.random.SeedGenerator(7)
    # D = 2, batch 3: (b, k) is paired with (b + s mod 3, 1 - k) for one shift s in {1, 2}.
    h = rng.normal(size=(3, 2, 2)).astype("float32")
    present = np.array([[True, True], [True, False], [False, True]])
    points, valid = (_np(t) for t in cross_domain_interpolates(h, present, generator))
    shifts = set()
    for b in range(3):
        for k in range(2):
            partner = _segment_partner(points[b, k], h[b, k], [h[(b + s) % 3, 1 - k] for s in (1, 2)])
            assert partner is not None
            shifts.add(partner + 1)
            np.testing.assert_equal(valid[b, k], present[b, k] and present[(b + partner + 1) % 3, 1 - k])
    assert len(shifts) == 1
    # Batch 1: the partner is the row's own other-domain representation.
    points, valid = (_np(t) for t in cross_domain_interpolates(h[:1], present[:1], generator))
    assert _segment_partner(points[0, 0], h[0, 0], [h[0, 1]]) == 0 and valid.all()
    # D = 3: the partner domain is never the position's own domain.
    h3 = rng.normal(size=(2, 3, 2)).astype("float32")
    points, _ = (_np(t) for t in cross_domain_interpolates(h3, np.ones((2, 3), bool), generator))
    for b in range(2):
        for k in range(3):
            others = [h3[(b + 1) % 2, j] for j in range(3) if j != k]
            assert _segment_partner(points[b, k], h3[b, k], others) is not None


def test_gradient_penalty_by_hand():
    # Norms 5 and 1 -> (5 - 1)^2 = 16 and 0.
    gradients = np.array([[[3.0, 4.0], [0.0, 1.0]]], "float32")
    np.testing.assert_allclose(_np(gradient_penalty(gradients, np.array([[True, True]]))), 8.0, rtol=1e-6)
    np.testing.assert_allclose(_np(gradient_penalty(gradients, np.array([[True, False]]))), 16.0, rtol=1e-6)
    np.testing.assert_allclose(_np(gradient_penalty(gradients, np.array([[False, False]]))), 0.0)
    assert np.isfinite(_np(gradient_penalty(np.zeros((1, 2, 2), "float32"), np.array([[True, True]]))))


def test_overlap_alignment_by_hand():
    # Row 0 (all three domains): pairs (0,1) = 5, (0,2) = 0, (1,2) = 5 -> 10/3.
    # Row 1: one domain, not an overlapped user. Row 2: domains 0 and 2, distance 1.
    h = np.array([[[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]],
                  [[1.0, 1.0], [5.0, 5.0], [9.0, 9.0]],
                  [[1.0, 0.0], [7.0, 7.0], [1.0, 1.0]]], "float32")
    present = np.array([[True, True, True], [True, False, False], [True, False, True]])
    np.testing.assert_allclose(_np(overlap_alignment_loss(h, present)), (10 / 3 + 1) / 2, rtol=1e-5)
    np.testing.assert_allclose(_np(overlap_alignment_loss(h, np.eye(3, dtype=bool))), 0.0)


# ---------------------------------------------------------------- model helpers


def _events(domains):
    a, b = domains[0], domains[1]
    events = [
        Impression(1, "u1", a, "x1", 1), Impression(2, "u1", b, "y1", 1), Impression(3, "u1", a, "x2", 0),
        Impression(4, "u1", b, "y2", 1), Impression(5, "u1", a, "x3", 1), Impression(6, "u1", b, "y3", 0),
        Impression(7, "u1", a, "x4", 1), Impression(8, "u1", b, "y4", 1),
        # u2 is cold in `a` at ts 3 (history in `b` only).
        Impression(1, "u2", b, "y2", 1), Impression(2, "u2", b, "y1", 1), Impression(3, "u2", a, "x1", 1),
        Impression(4, "u2", a, "x4", 0),
        Impression(1, "u3", a, "x2", 1), Impression(2, "u3", a, "x5", 0),  # one domain only
    ]
    if len(domains) > 2:
        c = domains[2]
        events += [Impression(9, "u1", c, "z1", 1), Impression(10, "u1", c, "z2", 0), Impression(5, "u2", c, "z1", 1)]
    return events


def _rows(domains=("a", "b")):
    contract = F.Contract(domains, HISTORY, DOMAIN_HISTORY)
    events = _events(domains)
    return [row for user in ("u1", "u2", "u3")
            for row in sequences.user_examples(user, [e for e in events if e.user_id == user], contract)]


def _config(domains=("a", "b"), **overrides):
    values = {"embedding_dim": 8, "num_heads": 2, "critic_hidden_units": [8], "softmax_negatives": 0,
              "bpr_negatives": 5,
              "inputs": {"domains": list(domains), "history_length": HISTORY, "domain_history_length": DOMAIN_HISTORY,
                         "item_buckets": BUCKETS, "user_buckets": BUCKETS}}
    values.update(overrides)
    return models.resolve_config("recguru", values)


def _model(domains=("a", "b"), seed=1, **overrides):
    keras.utils.set_random_seed(seed)
    config = _config(domains, **overrides)
    return models.build("recguru", config), config


def _compile(model, learning_rate=3e-3, run_eagerly=True):
    # Eager steps avoid tracing a graph per phase; the traced path runs in the phase test and the Trainer.
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss={F.SERVING_OUTPUT: BCE},
                  run_eagerly=run_eagerly)


def _with_target(row, item, domain):
    return {**row, F.ITEM_ID: item, F.DOMAIN: domain}


def _values(variables):
    return [np.array(_np(v)) for v in variables]


def _changed(before, variables):
    return [not np.allclose(b, _np(v)) for b, v in zip(before, variables)]


def test_batch_has_overlapped_single_domain_and_cold_rows():
    rows = _rows()
    inputs = _inputs(rows, _config())
    present = _np(inputs[F.DOMAIN_HISTORY_MASK]).any(-1)  # (batch, D)
    assert present.all(-1).sum() >= 3 and (present.sum(-1) == 1).sum() >= 2
    assert any(r[F.COLD_START] for r in rows) and 0 < _labels(rows).mean() < 1


# ---------------------------------------------------------------- config


def test_config_round_trip_and_bad_values(tmp_path):
    config = _config(gur_source="target_domain", objective="bce+bpr", use_alignment=False, critic_iters=2,
                     critic_hidden_units=[4, 4])
    assert (config.gur_source, config.objective, config.use_alignment, config.critic_hidden_units) == (
        "target_domain", "bce+bpr", False, (4, 4))
    assert models.resolve_config("recguru", config_lib.to_dict(config)) == config
    path = config_lib.save(config, "recguru", str(tmp_path))
    assert models.resolve_config("recguru", json.loads(open(path).read())["config"]) == config
    model = models.build("recguru", config)
    assert type(model).from_config(model.get_config()).config == config
    defaults = models.default_config("recguru")
    assert (defaults.critic_iters, defaults.use_adversarial, defaults.use_alignment, defaults.objective) == (
        5, True, True, "bce")
    assert [name for name, _ in model.training_phases()] == ["autoencoder", "adversarial", "recommender"]
    assert [name for name, _ in models.build("recguru", _config(autoencoder_share=0.0)).training_phases()] == [
        "adversarial", "recommender"]
    for bad, match in [({"num_heads": 3}, "num_heads=3"), ({"embedding_dim": 0}, "embedding_dim=0"),
                       ({"gur_source": "mixed"}, "gur_source='mixed'"), ({"objective": "mse"}, "objective='mse'"),
                       ({"negative_sampler": "zipf"}, "negative_sampler='zipf'"),
                       ({"short_term_length": 4}, "short_term_length=4"),
                       ({"softmax_negatives": -1}, "softmax_negatives=-1"), ({"critic_iters": 0}, "critic_iters=0"),
                       ({"critic_hidden_units": []}, "critic_hidden_units=()"),
                       ({"critic_learning_rate": 0.0}, "critic_learning_rate=0.0"),
                       ({"critic_beta_1": 1.0}, "critic_beta_1=1.0"),
                       ({"gradient_penalty_weight": -1.0}, "gradient_penalty_weight=-1.0"),
                       ({"recommender_share": 0.0}, "recommender_share=0.0"), ({"dropout": 1.0}, "dropout=1.0")]:
        with pytest.raises(ValueError, match=match):
            models.build("recguru", _config(**bad))
    with pytest.raises(ValueError, match="at least 2 domains"):
        models.build("recguru", _config(domains=("a",)))
    with pytest.raises(ValueError, match="expects bool"):
        _config(use_adversarial="no")
    with pytest.raises(ValueError, match="unknown training phase `ctr`"):
        model.set_phase("ctr")


# ---------------------------------------------------------------- model behaviour


def test_reconstruction_negatives_are_real_items_of_the_domain():
    # Domain histories over a 1000-bucket table: each domain's few real items. Every negative the
    # default sampler draws for domain d is one of domain d's clicks in the batch.
    keras.utils.set_random_seed(0)
    config = _config(softmax_negatives=20, inputs={"domains": ["a", "b"], "history_length": HISTORY,
                                                   "domain_history_length": DOMAIN_HISTORY, "item_buckets": 1000,
                                                   "user_buckets": BUCKETS})
    assert config.negative_sampler == "in_batch"
    model = models.build("recguru", config)
    ids = np.array([[[0, 11, 12], [0, 0, 501]], [[13, 11, 11], [0, 502, 503]]], "int32")  # (B, D, Ld)
    mask = ids > 0
    for d, real in ((0, {11, 12, 13}), (1, {501, 502, 503})):
        draws = _np(model.reconstruction_softmax.sample(ids[:, d], mask[:, d]))
        assert draws.shape == (20,) and set(draws.tolist()) <= real


def test_the_served_phase_gets_most_of_the_steps():
    model, _ = _model()
    assert task.phase_steps(model.training_phases(), 100) == [10, 20, 70]


def _padded_inputs(config, batch=2):
    d = config.inputs.num_domains
    return {
        F.USER_ID: np.array([1, 2], "int32"), F.ITEM_ID: np.array([5, 7], "int32"), F.DOMAIN: np.array([0, 1], "int32"),
        F.HISTORY_ITEM_IDS: np.zeros((batch, HISTORY), "int32"), F.HISTORY_DOMAINS: np.zeros((batch, HISTORY), "int32"),
        F.HISTORY_MASK: np.zeros((batch, HISTORY), bool), F.HISTORY_TIME_GAPS: np.zeros((batch, HISTORY), "int32"),
        F.DOMAIN_HISTORY_ITEM_IDS: np.zeros((batch, d, DOMAIN_HISTORY), "int32"),
        F.DOMAIN_HISTORY_MASK: np.zeros((batch, d, DOMAIN_HISTORY), bool),
        F.TARGET_DOMAIN_CLICKS: np.zeros((batch,), "int32"), F.OTHER_DOMAIN_CLICKS: np.zeros((batch,), "int32"),
    }


def test_fully_padded_histories_give_finite_ctr_and_losses():
    model, config = _model()
    inputs = _padded_inputs(config)
    ctr = _ctr(model, inputs)
    assert ctr.shape == (2,) and np.all(np.isfinite(ctr)) and np.all((ctr > 0) & (ctr < 1))
    # Ids under a False mask are never read.
    junk = {**inputs, F.DOMAIN_HISTORY_ITEM_IDS: np.full((2, 2, DOMAIN_HISTORY), 11, "int32")}
    np.testing.assert_allclose(_ctr(model, junk), ctr, rtol=1e-6)
    # The GURU losses of users without history are finite (zero: nothing to reconstruct or align).
    model.set_phase("adversarial")
    guru = model.generalised_representations(inputs)
    assert float(model.reconstruction_loss(guru)) == pytest.approx(0.0, abs=1e-7)
    assert float(overlap_alignment_loss(guru["h"], guru["present"])) == pytest.approx(0.0, abs=1e-7)
    assert np.all(np.isfinite(_ctr(model, _inputs(_rows()[:1], config))))  # a user's first impression


def test_the_phases_partition_the_weights_and_each_loss_reaches_its_weights():
    model, config = _model()
    rows = _rows()
    inputs, labels = _inputs(rows, config), _labels(rows)
    guru, recommender, critic = model.guru_variables(), model.recommender_variables(), model.critic_variables()
    paths = lambda vs: {v.path for v in vs}  # noqa: E731
    assert paths(guru) | paths(recommender) | paths(critic) == paths(model.trainable_variables)
    # Shared by phases 1-3: the item tables, positions, [eos] and the encoder. Phase 1-2 only: decoders,
    # [bos]. Phase 3 only: CDSRec, query tokens, domain biases. Critic steps only: the critic.
    assert paths(guru) & paths(recommender) == paths(
        model.item_embedding.trainable_variables + [model.positions, model.eos_tokens]
        + model.encoder.trainable_variables)
    assert not paths(critic) & (paths(guru) | paths(recommender))

    # No weight is dead: the decoders read their one memory entry h^d by projection (attention over
    # one key would leave W^Q, W^K and the query's layer norm without a gradient, ever).
    assert not any("cross_attention" in v.path for d in model.decoders for v in d.trainable_variables)

    def check(loss_fn, reached, unreached):
        with tf.GradientTape() as tape:
            loss = loss_fn()
        grads = tape.gradient(loss, model.trainable_variables)
        by_path = {v.path: g for v, g in zip(model.trainable_variables, grads)}
        for v in reached:
            assert by_path[v.path] is not None, v.path
            # Reached means a gradient well above float noise (a dead weight gets 0 or ~1e-12).
            total = float(tf.reduce_sum(tf.abs(tf.convert_to_tensor(by_path[v.path]))))
            assert total > 1e-6, (v.path, total)
        for path in unreached:
            assert by_path[path] is None, path

    # Recommender phase: the CTR log loss reaches every recommender weight; the decoders, [bos] and the
    # critic are not in it (they only serve the GURU losses).
    check(lambda: BCE(labels, model(inputs, training=True)[F.SERVING_OUTPUT]), recommender,
          (paths(guru) - paths(recommender)) | paths(critic))
    # Phase 1: L_rec reaches every GURU weight, none of CDSRec's.
    model.set_phase("autoencoder")
    check(lambda: model.guru_objective(inputs, training=True)[0], guru,
          (paths(recommender) - paths(guru)) | paths(critic))
    # Phase 2 generator: L_rec + W + L_l2 reaches the GURU weights (and the critic, which the generator
    # step does not update: its variable list is `guru_variables`).
    model.set_phase("adversarial")

    def generator_loss():
        loss, g = model.guru_objective(inputs, training=True)
        return loss + one_vs_rest_wasserstein(model.critic(g["h"]), g["present"])

    check(generator_loss, guru + critic, paths(recommender) - paths(guru))


def test_one_training_step_lowers_the_loss_on_a_fixed_batch():
    model, config = _model()
    rows = _rows()
    inputs, y = _inputs(rows, config), {F.SERVING_OUTPUT: _labels(rows)}
    _compile(model, run_eagerly=False)  # the traced step of the default phase ("ctr", the recommender)
    before = model.evaluate(inputs, y, verbose=0)
    model.train_on_batch(inputs, y)
    assert np.isfinite(before) and model.evaluate(inputs, y, verbose=0) < before
    # Phase 1 lowers the reconstruction loss (full softmax: deterministic).
    model.set_phase("autoencoder")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss={F.SERVING_OUTPUT: BCE}, run_eagerly=True)
    before = model.evaluate(inputs, y, verbose=0, return_dict=True)
    assert set(before) == {"loss", "reconstruction_loss"}
    for _ in range(2):
        model.train_on_batch(inputs, y)
    assert model.evaluate(inputs, y, verbose=0, return_dict=True)["loss"] < before["loss"]


def _positive_critic(model, head):
    """Critic weights: one hidden unit summing the input (ones kernel), head kernel `head`, zero biases."""
    mlp_dense, head_dense = model.critic.mlp.dense_layers[0], model.critic.head
    mlp_dense.kernel.assign(np.ones(mlp_dense.kernel.shape, "float32"))
    mlp_dense.bias.assign(np.zeros(mlp_dense.bias.shape, "float32"))
    head_dense.kernel.assign(np.array([head], "float32"))


def test_critic_step_by_hand():
    # Critic f_k(x) = head_k * leaky_relu(sum x) with head = [1, 2]; every representation below is
    # positive, and so is every interpolate, so grad_x f_k = head_k * ones(4), norm 2 head_k.
    # h (batch 2, D 2, dim 4): sums 4 and 8 in row 0, 16 in row 1 domain 0; row 1 has no domain 1.
    #   W_0 = mean f_0 over domain 0 - over domain 1 = (4 + 16) / 2 - 8 = 2
    #   W_1 = 2 * (8 - 10) = -4                      -> W = (2 - 4) / 2 = -1
    # Penalty pairs (batch 2: the partner row is the other row; D 2: the other domain):
    #   (0, 0) with (1, 1): absent; (0, 1) with (1, 0): head 1, (4 - 1)^2 = 9;
    #   (1, 0) with (0, 1): head 0, (2 - 1)^2 = 1; (1, 1): absent    -> GP = 5.
    # Critic loss = -W + 10 GP = 51.
    model, _ = _model(embedding_dim=4, critic_hidden_units=[1], gradient_penalty_weight=10.0)
    _positive_critic(model, [1.0, 2.0])
    h = np.array([[[1.0] * 4, [2.0] * 4], [[4.0] * 4, [0.0] * 4]], "float32")
    present = np.array([[True, True], [True, False]])
    loss, distance, penalty = (float(v) for v in model.critic_step(tf.constant(h), tf.constant(present)))
    np.testing.assert_allclose([loss, distance, penalty], [51.0, -1.0, 5.0], rtol=1e-5)
    assert int(model.critic_optimizer.iterations) == 1
    # The critic ascends W - 10 GP: after the step the critic's weights moved.
    assert not np.allclose(_np(model.critic.head.kernel), [[1.0, 2.0]])


def test_adversarial_step_alternates_critic_and_encoder():
    model, config = _model(critic_iters=3, adversarial_weight=1.0)
    rows = _rows()
    inputs, y = _inputs(rows, config), {F.SERVING_OUTPUT: _labels(rows)}
    _compile(model)
    model.set_phase("adversarial")
    critic, encoder = model.critic_variables(), model.encoder.trainable_variables
    cdsrec = [v for r in model.recommenders for v in r.trainable_variables] + [model.query_tokens, model.domain_bias]
    snapshots = [_values(vs) for vs in (critic, encoder, cdsrec)]
    calls = []
    original = model.critic_step
    model.critic_step = lambda *args: calls.append(1) or original(*args)
    logs = [model.train_on_batch(inputs, y, return_dict=True) for _ in range(2)]
    del model.critic_step
    # CRITIC_ITERS critic updates per generator step, counted twice: by the calls and by the critic's
    # own optimizer; the compiled optimizer made one update per step.
    assert len(calls) == 2 * 3 and int(model.critic_optimizer.iterations) == 2 * 3
    assert int(model.optimizer.iterations) == 2
    assert all(_changed(snapshots[0], critic)) and any(_changed(snapshots[1], encoder))
    assert not any(_changed(snapshots[2], cdsrec))  # CDSRec waits for the recommender phase
    assert set(logs[-1]) == {"loss", "reconstruction_loss", "alignment_loss", "critic_loss", "wasserstein_distance",
                             "gradient_penalty"}
    assert all(np.isfinite(v) for v in logs[-1].values()) and logs[-1]["gradient_penalty"] >= 0


def test_phases_run_in_order_through_the_trainer_and_each_optimises_its_part(caplog):
    # The sampled softmax; shares 0.2 / 0.3 / 0.5 so that 10 steps give every phase several.
    model, config = _model(critic_iters=2, softmax_negatives=20, autoencoder_share=0.2, adversarial_share=0.3,
                           recommender_share=0.5)
    rows = _rows()
    inputs, labels = _inputs(rows, config), _labels(rows)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss={F.SERVING_OUTPUT: BCE},
                  metrics={F.SERVING_OUTPUT: [keras.metrics.AUC(name="auc")]})
    groups = {
        "decoders": [v for d in model.decoders for v in d.trainable_variables] + [model.bos_tokens],
        "encoder": model.encoder.trainable_variables + [model.eos_tokens],
        "cdsrec": [v for r in model.recommenders for v in r.trainable_variables] + [model.query_tokens,
                                                                                    model.domain_bias],
        "critic": model.critic_variables(),
    }

    class Record(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.steps, self.changed, self.logs, self.critic_iterations = [], {}, {}, {}

        def on_train_begin(self, logs=None):
            self.before = {name: _values(vs) for name, vs in groups.items()}
            self.critic_start = int(self.model.critic_optimizer.iterations)

        def on_train_batch_end(self, batch, logs=None):
            self.steps.append(self.model.phase)

        def on_epoch_end(self, epoch, logs=None):
            self.logs[self.model.phase] = dict(logs)

        def on_train_end(self, logs=None):
            phase = self.model.phase
            self.changed[phase] = {name: any(_changed(self.before[name], groups[name])) for name in groups}
            self.critic_iterations[phase] = int(self.model.critic_optimizer.iterations) - self.critic_start

    data = tf.data.Dataset.from_tensors((inputs, {F.SERVING_OUTPUT: labels})).repeat()
    record = Record()
    with caplog.at_level(logging.INFO):
        task.fit(model, data, steps=10, callbacks=[record], verbose=0)
    assert record.steps == ["autoencoder"] * 2 + ["adversarial"] * 3 + ["recommender"] * 5
    assert record.changed == {
        "autoencoder": {"decoders": True, "encoder": True, "cdsrec": False, "critic": False},
        "adversarial": {"decoders": True, "encoder": True, "cdsrec": False, "critic": True},
        "recommender": {"decoders": False, "encoder": True, "cdsrec": True, "critic": False},
    }
    assert record.critic_iterations == {"autoencoder": 0, "adversarial": 3 * 2, "recommender": 0}
    assert set(record.logs["autoencoder"]) == {"loss", "reconstruction_loss"}
    assert set(record.logs["adversarial"]) == {"loss", "reconstruction_loss", "alignment_loss", "critic_loss",
                                               "wasserstein_distance", "gradient_penalty"}
    assert set(record.logs["recommender"]) == {"loss", "auc"}
    assert all(np.isfinite(v) for logs in record.logs.values() for v in logs.values())
    text = caplog.text
    assert "phase `autoencoder` optimises L_rec" in text and "training phase 2/3 `adversarial`, 3 steps" in text
    assert "2 critic steps (-W + 10 * GP), then L_rec + 1 * W (critic fixed) + 1 * L_l2" in text
    assert text.index("`autoencoder`") < text.index("`adversarial`") < text.index("`recommender`")


def test_score_selects_each_candidates_domain():
    # encode_context once, score candidates of both domains: equals call() on rows whose target is
    # each candidate (what the export's score_candidates relies on), for both GUR sources.
    rows = _rows()
    context_row = rows[7]
    candidates = [(b"x1", b"a"), (b"y9", b"b"), (b"x4", b"a"), (b"y2", b"b")]
    for overrides in ({}, {"gur_source": "target_domain"}):
        model, config = _model(**overrides)
        expected = _ctr(model, _inputs([_with_target(context_row, i, d) for i, d in candidates], config))
        context = model.encode_context(_inputs([context_row], config))
        assert tuple(context["preference"].shape) == (1, 2, 8)
        context = {k: keras.ops.repeat(v, len(candidates), axis=0) for k, v in context.items()}
        items = preprocess.hash_ids(tf.constant([i for i, _ in candidates]), config.inputs.item_buckets)
        scored = _np(keras.ops.sigmoid(model.score(context, items, tf.constant([0, 1, 0, 1], tf.int32))))
        np.testing.assert_allclose(scored, expected, rtol=1e-5)
        assert len(set(np.round(expected, 6))) == len(candidates)
        # The same item id scored in the other domain uses that domain's preference and table.
        swapped = _np(keras.ops.sigmoid(model.score(context, items, tf.constant([1, 0, 1, 0], tf.int32))))
        assert np.abs(swapped - scored).min() > 1e-6


def test_cold_user_reads_the_other_domains_only_with_all_domains():
    # u2's impression of x1 in `a` at ts 3: no history in `a`, two clicks in `b`. With the default
    # "all_domains" GUR source, changing the `b` history changes the `a` score; with
    # "target_domain" (eq. 10 literally) the cold user gets nothing from `b`.
    rows = _rows()
    cold = next(r for r in rows if r[F.USER_ID] == b"u2" and r[F.COLD_START])
    assert cold[F.DOMAIN] == b"a"
    other = {**cold, F.DOMAIN_HISTORY_ITEM_IDS: [b"", b"", b"", b"", b"y7", b"y8"]}  # (D * Ld,): `b` changed
    for source, differs in (("all_domains", True), ("target_domain", False)):
        model, config = _model(gur_source=source)
        ctr = _ctr(model, _inputs([cold, other], config))
        assert (abs(ctr[0] - ctr[1]) > 1e-6) == differs, source


def test_three_domains():
    domains = ("a", "b", "c")
    rows = _rows(domains)
    model, config = _model(domains, critic_iters=1)
    inputs, y = _inputs(rows, config), {F.SERVING_OUTPUT: _labels(rows)}
    assert tuple(inputs[F.DOMAIN_HISTORY_ITEM_IDS].shape) == (len(rows), 3, DOMAIN_HISTORY)
    assert tuple(model.encode_context(inputs)["preference"].shape) == (len(rows), 3, 8)
    assert tuple(model.critic(np.zeros((1, 3, 8), "float32")).shape) == (1, 3, 3)  # one head per domain
    per_domain = _ctr(model, _inputs([_with_target(rows[-1], b"x3", d.encode()) for d in domains], config))
    assert len(set(np.round(per_domain, 6))) == 3
    _compile(model)
    for phase in ("autoencoder", "adversarial", "recommender"):
        model.set_phase(phase)
        logs = model.train_on_batch(inputs, y, return_dict=True)
        assert all(np.isfinite(v) for v in logs.values()), (phase, logs)
    before = model.evaluate(inputs, y, verbose=0)
    model.train_on_batch(inputs, y)
    assert model.evaluate(inputs, y, verbose=0) < before


def test_saved_model_serves_what_the_model_computes(tmp_path):
    model, config = _model()
    rows = _rows()
    serialized = [sequences.serialize_example(r) for r in rows]
    expected = _ctr(model, _inputs(rows, config))
    export.export(model, config.inputs, str(tmp_path / "1"))
    loaded = tf.saved_model.load(str(tmp_path / "1"))

    served = loaded.signatures[F.SERVING_SIGNATURE](**{F.SERVING_INPUT: tf.constant(serialized)})[F.SERVING_OUTPUT]
    np.testing.assert_allclose(served.numpy(), expected, rtol=1e-5)

    context_row = rows[7]
    candidates = [(b"x1", b"a"), (b"y9", b"b"), (b"x3", b"a")]
    scored = loaded.signatures[F.SCORE_CANDIDATES_SIGNATURE](**{
        F.SERVING_INPUT: tf.constant([sequences.serialize_example(context_row)]),
        F.CANDIDATE_ITEM_IDS: tf.constant([i for i, _ in candidates]),
        F.CANDIDATE_DOMAINS: tf.constant([d for _, d in candidates]),
    })[F.SERVING_OUTPUT].numpy()
    per_candidate = _ctr(model, _inputs([_with_target(context_row, i, d) for i, d in candidates], config))
    np.testing.assert_allclose(scored, per_candidate, rtol=1e-5)


@pytest.mark.parametrize("flag", ["use_adversarial", "use_alignment"])
def test_each_ablation_builds_trains_and_changes_the_output(flag):
    # The ablations change only what phase 2 optimises, not the served network: with the same seed
    # the untrained models agree; after the same phase-2 steps they differ.
    rows = _rows()
    full, config = _model(critic_iters=2)
    ablated, _ = _model(critic_iters=2, **{flag: False})
    inputs, y = _inputs(rows, config), {F.SERVING_OUTPUT: _labels(rows)}
    np.testing.assert_allclose(_ctr(ablated, inputs), _ctr(full, inputs), rtol=1e-6)
    assert (ablated.config.use_adversarial, hasattr(ablated, "critic")) == (flag != "use_adversarial",) * 2
    logs = {}
    for name, model in (("full", full), ("ablated", ablated)):
        _compile(model, learning_rate=1e-2)
        model.set_phase("adversarial")
        for _ in range(2):
            logs[name] = model.train_on_batch(inputs, y, return_dict=True)
    removed = {"use_adversarial": {"critic_loss", "wasserstein_distance", "gradient_penalty"},
               "use_alignment": {"alignment_loss"}}[flag]
    assert set(logs["full"]) - set(logs["ablated"]) == removed
    assert np.abs(_ctr(full, inputs) - _ctr(ablated, inputs)).max() > 1e-5
    ablated.set_phase("recommender")
    before = ablated.evaluate(inputs, y, verbose=0)
    ablated.train_on_batch(inputs, y)
    assert ablated.evaluate(inputs, y, verbose=0) < before


def test_bpr_objective_is_eq_12_on_clicked_rows():
    model, config = _model(objective="bpr")
    rows = _rows()
    inputs, labels = _inputs(rows, config), _labels(rows)
    _compile(model)
    outputs = model(inputs, training=True)
    assert tuple(outputs["negative_logits"].shape) == (len(rows), 5) and set(outputs) == {"ctr", "logit",
                                                                                           "negative_logits"}
    assert set(model(inputs)) == {F.SERVING_OUTPUT}  # served: ctr only
    # -log sigmoid(z_v) - log(1 - sigmoid(mean z_v')), averaged over the clicked rows.
    z, mean_negative = _np(outputs["logit"]), _np(outputs["negative_logits"]).mean(-1)
    per_row = np.log1p(np.exp(-z)) + np.log1p(np.exp(mean_negative))
    loss = model.compute_loss(inputs, {F.SERVING_OUTPUT: labels}, outputs)
    np.testing.assert_allclose(float(loss), (labels * per_row).sum() / labels.sum(), rtol=1e-5)
    logs = model.train_on_batch(inputs, {F.SERVING_OUTPUT: labels}, return_dict=True)
    assert set(logs) == {"loss", "ctr_loss", "bpr_loss"} and np.isfinite(logs["bpr_loss"])


def test_runs_on_the_tensorflow_backend():
    assert keras.backend.backend() == "tensorflow"
