"""`bilinear_recency`: a tiny reference model, target x recency-weighted mixed history + biases.

Not from a paper: the smallest model that reads what the generated logs plant (a taste shared
across domains, drifting with recent clicks) and what item popularity gives, kept as a baseline
the cross-domain models have to beat.
"""

from __future__ import annotations

import dataclasses
import math

import keras
from keras import ops

from models.baselines import _ConfiguredModel, _check_positive
from models.config import InputConfig
from models.layers.masking import masked_softmax
from models.registry import register
from xdctr import features as F

RECENCY = ("position", "time_gap")
POOLING = ("mean", "sum")


@dataclasses.dataclass(frozen=True)
class BilinearRecencyConfig:
    """Config of `BilinearRecency`.

    Attributes:
      inputs: input sizes shared by every model.
      embedding_dim: size of the item embeddings (one table for targets and history).
      recency: what the learned recency weights are indexed by: "position" (steps back from the
        latest click of the mixed history, L weights) or "time_gap" (the log2 time-gap bucket of
        each history click before the target's time, `F.NUM_TIME_GAP_BUCKETS` weights).
      pooling: how the recency weights pool the history: "mean" (a masked softmax: the weights
        sum to 1 whatever the history's length) or "sum" (each click weighs exp(a_r) on its own,
        so the user vector grows with the clicks, as a decayed sum of recent clicks does).
    """

    inputs: InputConfig = dataclasses.field(default_factory=InputConfig)
    embedding_dim: int = 32
    recency: str = "position"
    pooling: str = "mean"


@register("bilinear_recency", BilinearRecencyConfig)
@keras.saving.register_keras_serializable(package="xdctr")
class BilinearRecency(_ConfiguredModel):
    """Bilinear score of the target against a recency-weighted mean (or sum) of the mixed history.

    With E the item table (item_buckets, dim), the mixed history h_1..h_L (left-padded,
    chronological, mask m_j) and a learned recency logit a_r per recency index r_j (position j
    of the left-padded history, i.e. L - 1 - j steps back from the latest click, or the time-gap
    bucket of h_j):

        w_j = m_j exp(a_{r_j}) / sum_k m_k exp(a_{r_k})       (pooling "mean": a masked softmax; all 0
                                                               if no history)
        w_j = m_j exp(a_{r_j})                                 (pooling "sum")
        u = sum_j w_j E[h_j]                                   (batch, dim)
        logit = E[t]^T M u + b_item[t] + b_domain[d]           M (dim, dim), starts as the identity
        ctr = sigmoid(logit)

    a starts at 0 (u = the plain mean of the history) with "mean" and at -log L with "sum" (the same
    u for a full history of L clicks; a shorter one sums to less), b_item and b_domain at 0.
    "mean" is the default, the form this baseline was first measured with; "sum" can weigh
    the latest clicks the same whatever came before them, as the generated logs' drift does (a
    decayed sum of the recent clicks' item vectors; the README measures both on them). The history's
    domains are not read: the target's domain enters through b_domain only, so everything a user
    clicked in any domain scores every domain's items through one table (the transfer the
    generated logs' shared taste rewards). Any D >= 1.

    encode_context gives q = M u (batch, dim), so score is one dot product and two lookups per
    candidate, and `score_items` one matrix product for a batch against N items (the
    full-softmax objective).

    Inputs: see `models.base.CTRModel`; uses ITEM_ID, DOMAIN, HISTORY_ITEM_IDS, HISTORY_MASK and,
    with recency="time_gap", HISTORY_TIME_GAPS.
    """

    config_class = BilinearRecencyConfig

    def __init__(self, config: BilinearRecencyConfig, **kwargs):
        super().__init__(**kwargs)
        _check_positive("embedding_dim", config.embedding_dim)
        if config.recency not in RECENCY:
            raise ValueError(f"`recency` must be one of {list(RECENCY)}. Received: recency={config.recency!r}")
        if config.pooling not in POOLING:
            raise ValueError(f"`pooling` must be one of {list(POOLING)}. Received: pooling={config.pooling!r}")
        self.config = config
        inputs = config.inputs
        self.item_embedding = keras.layers.Embedding(inputs.item_buckets, config.embedding_dim, name="item_embedding")
        self.item_bias = keras.layers.Embedding(inputs.item_buckets, 1, embeddings_initializer="zeros", name="item_bias")
        self.domain_bias = keras.layers.Embedding(inputs.num_domains, 1, embeddings_initializer="zeros",
                                                  name="domain_bias")
        recency_size = inputs.history_length if config.recency == "position" else F.NUM_TIME_GAP_BUCKETS
        dim = config.embedding_dim
        self.bilinear = self.add_weight(shape=(dim, dim), initializer="identity", name="bilinear")
        start = 0.0 if config.pooling == "mean" else -math.log(inputs.history_length)
        self.recency_logits = self.add_weight(shape=(recency_size,), initializer=keras.initializers.Constant(start),
                                              name="recency_logits")

    def encode_context(self, inputs, training=False):
        if self.config.recency == "position":
            logits = ops.expand_dims(self.recency_logits, 0)  # (1, L): position j of the left-padded history
        else:
            logits = ops.take(self.recency_logits, ops.cast(inputs[F.HISTORY_TIME_GAPS], "int32"), axis=0)  # (batch, L)
        if self.config.pooling == "mean":
            weights = masked_softmax(logits, inputs[F.HISTORY_MASK])  # (batch, L)
        else:
            weights = ops.exp(logits) * ops.cast(inputs[F.HISTORY_MASK], logits.dtype)  # (batch, L)
        history = self.item_embedding(inputs[F.HISTORY_ITEM_IDS])  # (batch, L, dim)
        user = ops.sum(history * ops.expand_dims(ops.cast(weights, history.dtype), -1), axis=1)  # (batch, dim)
        return {"query": ops.matmul(user, ops.transpose(ops.cast(self.bilinear, user.dtype)))}  # (batch, dim): M u

    def score(self, context, item, domain, training=False):
        target = self.item_embedding(item)  # (batch, dim)
        bias = self.item_bias(item) + self.domain_bias(domain)  # (batch, 1)
        return ops.sum(target * context["query"], axis=-1) + ops.squeeze(bias, -1)  # (batch,)

    def score_items(self, context, items, domains, training=False):
        targets = self.item_embedding(items)  # (N, dim)
        bias = ops.squeeze(self.item_bias(items) + self.domain_bias(domains), -1)  # (N,)
        return ops.matmul(context["query"], ops.transpose(ops.cast(targets, context["query"].dtype))) + bias  # (batch, N)
