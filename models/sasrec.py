"""`sasrec`: SASRec (Kang & McAuley, ICDM 2018) on the mixed-domain history, a single-sequence baseline.

The usual single-sequence baseline of cross-domain sequential recommendation: one causal
self-attention encoder over the user's clicks of every domain in time order, the latest step's
output scored against the candidate's embedding in the same item table. It knows nothing of
domains beyond what the item ids carry, so a cross-domain model that does not beat it has not
shown its transfer.
"""

from __future__ import annotations

import dataclasses

import keras
from keras import ops

from models.baselines import _ConfiguredModel, _check_positive
from models.config import InputConfig
from models.layers.transformer import SASRecEncoder
from models.registry import register
from xdctr import features as F


@dataclasses.dataclass(frozen=True)
class SASRecConfig:
    """Config of `SASRec`.

    Attributes:
      inputs: input sizes shared by every model.
      embedding_dim: width d of the item and position embeddings and of the encoder.
      num_layers: self-attention blocks (the paper's b; 2 in its experiments).
      num_heads: attention heads; must divide `embedding_dim` (the paper uses 1).
      dropout: rate of the embedding, attention, FFN and residual dropouts (0.1: the best of 0.1,
        0.2 and 0.5 on food-kitchen leave-one-out, one seed; 0.5 cost 0.06 HR@10 there).
      item_bias: add a learned per-item bias to the dot product (not in the paper, which scores
        with the dot product alone; off by default).
      domain_query: end the sequence with a learned token of the candidate's domain and score
        with that token's output instead of the latest click's (not in the paper; off by default;
        see the model's docstring).
    """

    inputs: InputConfig = dataclasses.field(default_factory=InputConfig)
    embedding_dim: int = 64
    num_layers: int = 2
    num_heads: int = 1
    dropout: float = 0.1
    item_bias: bool = False
    domain_query: bool = False


@register("sasrec", SASRecConfig)
@keras.saving.register_keras_serializable(package="xdctr")
class SASRec(_ConfiguredModel):
    """Causal self-attention over the mixed history; the last step's state dotted with the target.

    With E the item table (item_buckets, d), P a learned position table (L, d) and the mixed
    history h_1..h_L (left-padded, chronological, mask m_j):

        x_j = (sqrt(d) E[h_j] + P_j) m_j                       (item + position; sqrt(d) as in the authors' code)
        F = SASRecEncoder(x, m)                                (b pre-norm blocks, causal, final LN)
        logit = F_L . E[t]  (+ b_item[t] with item_bias)       (the paper's shared item embedding)
        ctr = sigmoid(logit)

    Choices where the paper is not about this setting: the paper trains every position of the
    sequence against one sampled negative with binary cross-entropy; here the history comes as
    one row per click (every position of the user's sequence is a row) and the loss is the
    Trainer's (the pointwise CTR log loss, or the sampled-softmax ranking objective). Left padding
    keeps the latest click at step L, so F_L is the latest real click's state; a user with no
    history gets F_L = 0 and scores 0 (+ the item bias). Position rows count from the latest
    click (P_L is always the latest), as the history is left-padded. The target's domain is not
    read: items carry their domain, and the table is shared by all domains.

    encode_context gives F_L (batch, d); score is one lookup and one dot product per candidate,
    and `score_items` one matrix product for a batch against N items (the full-softmax objective).

    `domain_query` (off by default; not in the paper): SASRec's query is the latest click, whatever
    domain the next item is asked for, so the state that ranks a Kitchen item is the same as the one
    that ranks a Food item. With it, the sequence of every row is encoded once per domain k with one
    more step at the end, a learned query token Q_k (D, d), and the candidate is scored with that
    step's output:

        F^k = SASRecEncoder([x_1 .. x_L, Q_k], [m, 1])        (causal: Q_k attends to the whole history)
        logit = F^k_{L+1} . E[t]    for a candidate of domain k

    so attention can pick the history steps that matter for the asked domain (its latest clicks
    there, or the other domain's that transfer). encode_context gives (batch, D, d), D times the
    encoder's work; a user without history still gets Q_k's state (a per-domain prior), not 0.

    Inputs: see `models.base.CTRModel`; uses ITEM_ID, HISTORY_ITEM_IDS and HISTORY_MASK.
    """

    config_class = SASRecConfig

    def __init__(self, config: SASRecConfig, **kwargs):
        super().__init__(**kwargs)
        _check_positive("embedding_dim", config.embedding_dim)
        _check_positive("num_layers", config.num_layers)
        _check_positive("num_heads", config.num_heads)
        if config.embedding_dim % config.num_heads:
            raise ValueError(f"`num_heads` must divide `embedding_dim`. Received: num_heads={config.num_heads}, "
                             f"embedding_dim={config.embedding_dim}")
        if not 0.0 <= config.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={config.dropout}")
        self.config = config
        inputs, dim = config.inputs, config.embedding_dim
        self.item_embedding = keras.layers.Embedding(inputs.item_buckets, dim, name="item_embedding")
        self.positions = self.add_weight(shape=(inputs.history_length, dim), initializer="glorot_uniform",
                                         name="positions")
        self.encoder = SASRecEncoder(config.num_layers, config.num_heads, dropout=config.dropout, name="encoder")
        self.item_bias = (keras.layers.Embedding(inputs.item_buckets, 1, embeddings_initializer="zeros",
                                                 name="item_bias") if config.item_bias else None)
        self.domain_queries = (self.add_weight(shape=(inputs.num_domains, dim), initializer="glorot_uniform",
                                               name="domain_queries") if config.domain_query else None)

    def encode_context(self, inputs, training=False):
        mask = ops.cast(inputs[F.HISTORY_MASK], "bool")  # (batch, L)
        history = self.item_embedding(inputs[F.HISTORY_ITEM_IDS])  # (batch, L, d)
        scale = ops.sqrt(ops.cast(self.config.embedding_dim, history.dtype))
        x = (history * scale + ops.cast(self.positions, history.dtype)) * ops.expand_dims(ops.cast(mask, history.dtype), -1)
        if self.domain_queries is None:
            states = self.encoder(x, mask, training=training)  # (batch, L, d); padded steps 0
            return {"state": states[:, -1]}  # (batch, d): the latest click's state
        batch, length, dim = ops.shape(x)[0], self.config.inputs.history_length, self.config.embedding_dim
        domains = self.config.inputs.num_domains
        queries = ops.broadcast_to(ops.cast(self.domain_queries, x.dtype)[None, :, None, :], (batch, domains, 1, dim))
        steps = ops.concatenate([ops.broadcast_to(x[:, None], (batch, domains, length, dim)), queries], axis=2)
        steps_mask = ops.concatenate([ops.broadcast_to(mask[:, None], (batch, domains, length)),
                                      ops.ones((batch, domains, 1), dtype="bool")], axis=2)
        states = self.encoder(ops.reshape(steps, (-1, length + 1, dim)), ops.reshape(steps_mask, (-1, length + 1)),
                              training=training)  # (batch * D, L + 1, d)
        return {"states": ops.reshape(states[:, -1], (batch, domains, dim))}  # (batch, D, d): each domain's query

    def _query(self, context, domain):
        """(batch, d): the state that scores a candidate of `domain` (batch,)."""
        if "state" in context:
            return context["state"]
        states = context["states"]  # (batch, D, d)
        pick = ops.one_hot(ops.cast(domain, "int32"), self.config.inputs.num_domains, dtype=states.dtype)  # (batch, D)
        return ops.sum(states * ops.expand_dims(pick, -1), axis=1)

    def score(self, context, item, domain, training=False):
        logit = ops.sum(self.item_embedding(item) * self._query(context, domain), axis=-1)  # (batch,)
        if self.item_bias is not None:
            logit = logit + ops.squeeze(self.item_bias(item), -1)
        return logit

    def score_items(self, context, items, domains, training=False):
        if "state" in context:
            state = context["state"]  # (batch, d)
            logits = ops.matmul(state, ops.transpose(ops.cast(self.item_embedding(items), state.dtype)))  # (batch, N)
        else:
            states = context["states"]  # (batch, D, d)
            targets = ops.cast(self.item_embedding(items), states.dtype)  # (N, d)
            every = ops.einsum("bkd,nd->bkn", states, targets)  # (batch, D, N): each domain's query x each item
            pick = ops.one_hot(ops.cast(domains, "int32"), self.config.inputs.num_domains, dtype=states.dtype)  # (N, D)
            logits = ops.einsum("bkn,nk->bn", every, pick)  # each item against its own domain's query
        if self.item_bias is not None:
            logits = logits + ops.squeeze(self.item_bias(items), -1)
        return logits
