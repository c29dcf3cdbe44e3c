"""DACDR: Domain-Aware Cross-Attention for Cross-Domain Recommendation (Luo et al., JD.com).

Also the paper's deployment tools (sec. 3.5): `finetune_variables` freezes everything but a new
domain's features, the target item embeddings and the cross-attention projections, and
`expand_domains` grows a trained D-domain model into a (D+k)-domain one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import keras
from keras import ops

from models import layers
from models.base import CTRModel, dummy_inputs
from models.config import InputConfig, override
from models.layers.cross_attention import AttentionAllocation, CrossAttention
from models.registry import register
from xdctr import features as F

SOURCE_SEQUENCES = ("mixed", "per_domain")
QUERIES = ("target", "sequence")
HISTORY_SCOPES = ("all", "source")


@dataclasses.dataclass(frozen=True)
class DACDRConfig:
    """Config of `DACDR`.

    Attributes:
      inputs: input sizes shared by every model; needs at least 2 domains.
      embedding_dim: size k of every embedding and of the cross-attention outputs.
      num_heads: cross-attention heads; must divide `embedding_dim` (head size k / heads).
      num_domain_tokens: learnable feature tokens per domain, part of the target-domain features
        E_t of the domain-level step.
      num_item_tokens: learnable item-side tokens shared by all items, keys of the item-level step
        (`query="sequence"` only: with target-item queries there is nothing to add them to).
      query: what the queries of eq. 3-4 are: "target" (default; the target domain's features
        query the behaviour sequence, then the target item refines that allocation, as the
        paper's text describes) or "sequence" (the behaviour sequence queries the target-side
        tokens, eq. 3-4's symbols read literally; the earlier form of this model).
      history_scope: which behaviour entries are attended: "all" (default; the whole history,
        target-domain entries included, weighted by the attention like any other) or "source"
        (only the entries of the other domains, the paper's cold-start reading).
      source_sequence: the behaviour sequence: "mixed" = HISTORY_ITEM_IDS; "per_domain" = the
        DOMAIN_HISTORY_ITEM_IDS rows of every domain, flattened.
      encoder_units: layer sizes of the domain encoder g (eq. 6); the last is the size of the
        transferred user embedding.
      hidden_units: layer sizes of the prediction head h (eq. 7) before the output unit.
      dropout: dropout rate in g and h.
      use_domain_attention: False drops the domain-level step (eq. 3).
      use_item_attention: False drops the item-level step (eq. 4).
    """

    inputs: InputConfig = dataclasses.field(default_factory=InputConfig)
    embedding_dim: int = 16
    num_heads: int = 2
    num_domain_tokens: int = 2
    num_item_tokens: int = 2
    query: str = "target"
    history_scope: str = "all"
    source_sequence: str = "mixed"
    encoder_units: tuple = (32, 16)
    hidden_units: tuple = (64, 32)
    dropout: float = 0.0
    use_domain_attention: bool = True
    use_item_attention: bool = True


@keras.saving.register_keras_serializable(package="xdctr")
class PerDomainVariables(keras.layers.Layer):
    """`num_tokens` vectors per domain, each domain in a separate variable, gathered by index.

    One variable per domain rather than one (D, ...) table, so that fine-tuning (DACDR sec. 3.5)
    can train one domain's features and freeze the others' (Keras freezes whole variables, not
    rows), and a model can grow new domains without touching the old ones' values.

    Args:
      num_domains: D, positive.
      num_tokens: T, vectors per domain, positive.
      dim: size of each vector, positive.
      initializer: initializer of every variable.

    Call args:
      domain: (...) int in [0, D).
    Returns:
      (..., T, dim): the tokens of each domain.
    """

    def __init__(self, num_domains, num_tokens, dim, initializer="uniform", **kwargs):
        super().__init__(**kwargs)
        for name, value in (("num_domains", num_domains), ("num_tokens", num_tokens), ("dim", dim)):
            if value <= 0:
                raise ValueError(f"`{name}` must be positive. Received: {name}={value}")
        self.num_domains = int(num_domains)
        self.num_tokens = int(num_tokens)
        self.dim = int(dim)
        self.initializer = initializer

    def build(self, input_shape=None):
        self.tables = [
            self.add_weight(shape=(self.num_tokens, self.dim), initializer=keras.initializers.get(self.initializer),
                            name=f"domain_{d}")
            for d in range(self.num_domains)
        ]

    def call(self, domain):
        stacked = ops.concatenate([ops.expand_dims(table, 0) for table in self.tables], axis=0)  # (D, T, dim)
        return ops.take(stacked, ops.cast(domain, "int32"), axis=0)  # (..., T, dim)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape) + (self.num_tokens, self.dim)

    def get_config(self):
        config = super().get_config()
        config.update(num_domains=self.num_domains, num_tokens=self.num_tokens, dim=self.dim,
                      initializer=self.initializer)
        return config


def _one_hot_select(values, domain, num_domains):
    """(B, D, ...) values and (B,) domains -> (B, ...): each row's slice of its domain."""
    one_hot = ops.one_hot(domain, num_domains, dtype=values.dtype)  # (B, D)
    if len(values.shape) == 2:
        return ops.sum(values * one_hot, axis=1)  # (B,)
    return ops.einsum("bd,bdk->bk", one_hot, values)  # (B, k)


SEQUENCES = ("sequence", "side")  # the two z of eq. 3-4: behaviours and their side info


@register("dacdr", DACDRConfig)
@keras.saving.register_keras_serializable(package="xdctr")
class DACDR(CTRModel):
    """DACDR (Luo et al., "Domain-Aware Cross-Attention for Cross-Domain Recommendation").

    For a row with target item v in target domain t, with k = `embedding_dim`, the two-step
    domain-aware cross-attention (eq. 1-4) runs separately (own weights) on z = seq, the
    behaviour sequence X (history item embeddings), and on z = side, its side-info sequence
    (embedding of each entry's domain + embedding of its HISTORY_TIME_GAPS bucket). With
    `query="target"` (default), the paper's text ("the first step involves a coarse-grained
    allocation of attention to the source domain's behavior sequence using the features of the
    target domain, and the second step refines the attention allocation by using the target
    domain item embeddings with the output of the first step"):

      Domain level (eq. 3): the target domain's features E_t (M tokens, below) are the queries,
        the sequence the keys; each head's allocation over the steps l is the mean over the
        queries of softmax_l(E_t W_1^Q (z_l W_1^K)^T / sqrt(k/H))          a_1: (B, H, Ls)
      Item level (eq. 4): the target item is the query; its attention over the same steps
        refines a_1:  a_2 ∝ a_1 * softmax_l(e_v W_2^Q (z_l W_2^K)^T / sqrt(k/H)), and
        e_z = concat_h(sum_l a_2 z_l W_2^V) W_2^O                          (B, k)
      so every history entry is weighted by its relevance to the candidate (item level) within
      the domain-level allocation; e_z in R^k as the paper states, with no pooling step.
      Domain encoder (eq. 6):  u^ = g(concat[e_seq, e_side, e_t])
      Prediction (eq. 7):      y^ = sigmoid(h(concat[u^, e_user, e_seq, e_side, e_v, e_t]))
      trained end to end with the BCE of eq. 8 (the compiled loss; no auxiliary losses).

    `query="sequence"` reads eq. 3-4's symbols literally instead: Q from the sequence, K and V
    from E_t (step 1) and from E_v = [e_v, e_t, `num_item_tokens` learned item-side tokens]
    (step 2), each residual (out = X + CA(...) W^O, CrossViT); e_z is the masked mean of the
    item-level output over the steps. There a single key per step would make the softmax
    constant, hence the extra tokens; the candidate only enters through the mixture of the key
    values, never as a weight on the history (the form this model had before; kept for
    comparison).

    Choices where the paper is vague:
    - Target-domain features E_t (queries of step 1, or keys with `query="sequence"`):
      M = num_domain_tokens + 3 tokens: (1) the domain embedding e_t; (2) `num_domain_tokens`
      learnable tokens of domain t; (3) a statistics token
      Dense([log1p(n_t), log1p(n_other), log1p(n_total)]), n_t / n_other the user's per-domain
      history lengths (DOMAIN_HISTORY_MASK counts, capped at Ld) in t / in the other domains,
      n_total = TARGET_DOMAIN_CLICKS + OTHER_DOMAIN_CLICKS; (4) the masked mean of the user's
      target-domain history (DOMAIN_HISTORY_ITEM_IDS row t), left out when that row is empty.
      TARGET_DOMAIN_CLICKS and OTHER_DOMAIN_CLICKS are not used one by one: they count relative
      to the example's own domain, which `score_candidates` ignores (its candidates may be in
      any domain); their sum is the same for every domain.
    - Which behaviours are attended (`history_scope`): the paper's X is "the behavior sequence
      of user u_i", in its cold-start setting only source-domain clicks. "all" (default) keeps
      the target-domain entries too, so the domain-level step decides how much each domain's
      entries count and a user without other-domain clicks is still scored from their
      target-domain history; "source" masks the entries whose domain is t (a user without
      other-domain clicks then gets e_z = 0). The side-info sequence always comes from the mixed
      history (the only one with time gaps), masked the same way. For any D >= 2.
    - Item embeddings: separate tables for history items (e^s_v) and target items (e^t_v), as the
      paper's notation separates them; fine-tuning then trains only the target table. e_user
      (USER_ID embedding) enters h as the paper's "user-side auxiliary features fed into the
      final FC layers" (sec. 3.3). e_t embeds both the target domain and, in the side-info
      sequence, each history entry's domain.
    - The domain-level step contributes its allocation, not values (step 2 reads the values), so
      it has W_1^Q and W_1^K only (`layers.AttentionAllocation`).
    - Ablations (paper Table 2), `query="target"`: without domain-level attention a_1 is uniform
      over the real steps; without item-level attention e_z = mean_h sum_l a_1 z_l; with neither,
      e_z is the masked mean of the sequence. `query="sequence"`: without domain-level
      attention e_1 is the masked mean of the sequence, one step (B, 1, k); without item-level
      attention e_z is the masked mean of e_1. Weights of a disabled step are not created.
    - Split for `score_candidates`: `encode_context` embeds the sequences and projects their
      keys and values (the candidate-independent side); `score` builds the candidate domain's
      E_t and the candidate's query and attends, since candidates may be in different domains.

    Fine-tuning and new domains (sec. 3.5): the domain embeddings and domain tokens are separate
    variables per domain (`PerDomainVariables`); see `finetune_variables` and `expand_domains`.

    Inputs: see `models.base.CTRModel`; uses every model input.
    """

    def __init__(self, config: DACDRConfig, **kwargs):
        super().__init__(**kwargs)
        if isinstance(config, Mapping):
            config = override(DACDRConfig(), config)
        _validate(config)
        self.config = config
        k, num_domains = config.embedding_dim, config.inputs.num_domains
        target_queries = config.query == "target"
        self.user_embedding = keras.layers.Embedding(config.inputs.user_buckets, k, name="user_embedding")
        self.history_item_embedding = keras.layers.Embedding(config.inputs.item_buckets, k, name="history_item_embedding")
        self.target_item_embedding = keras.layers.Embedding(config.inputs.item_buckets, k, name="target_item_embedding")
        self.time_gap_embedding = keras.layers.Embedding(F.NUM_TIME_GAP_BUCKETS, k, name="time_gap_embedding")
        self.domain_embedding = PerDomainVariables(num_domains, 1, k, name="domain_embedding")
        self.pooling = layers.MaskedMeanPooling()
        key_dim = k // config.num_heads
        self.domain_tokens = self.statistics = self.seq_domain_attention = self.side_domain_attention = None
        if config.use_domain_attention:
            if config.num_domain_tokens:
                self.domain_tokens = PerDomainVariables(num_domains, config.num_domain_tokens, k, name="domain_tokens")
            self.statistics = keras.layers.Dense(k, name="domain_statistics")
            step = AttentionAllocation if target_queries else CrossAttention
            self.seq_domain_attention = step(config.num_heads, key_dim, name="seq_domain_attention")
            self.side_domain_attention = step(config.num_heads, key_dim, name="side_domain_attention")
        self.item_tokens = self.seq_item_attention = self.side_item_attention = None
        if config.use_item_attention:
            if config.num_item_tokens and not target_queries:
                self.item_tokens = keras.layers.Embedding(config.num_item_tokens, k, name="item_tokens")
            residual = not target_queries
            self.seq_item_attention = CrossAttention(config.num_heads, key_dim, residual, name="seq_item_attention")
            self.side_item_attention = CrossAttention(config.num_heads, key_dim, residual, name="side_item_attention")
        with keras.name_scope(self.name):  # built here, as `encode_context` projects before any call
            self.pooling.build((None, None, k))  # no weights; not every configuration calls it
            for attention in self.attention_layers():
                attention.build((None, None, k), (None, None, k))
        self.domain_encoder = layers.MLP(config.encoder_units, dropout=config.dropout, name="domain_encoder")
        self.head = layers.MLP(config.hidden_units, dropout=config.dropout, name="head")
        self.logit = keras.layers.Dense(1, name="logit")

    def attention_layers(self) -> list:
        """The cross-attention layers (their W^Q, W^K and, where they have them, W^V, W^O)."""
        candidates = [self.seq_domain_attention, self.side_domain_attention, self.seq_item_attention,
                      self.side_item_attention]
        return [layer for layer in candidates if layer is not None]

    def per_domain_layers(self) -> list:
        """Layers holding one variable per domain (`PerDomainVariables`)."""
        return [self.domain_embedding] + ([self.domain_tokens] if self.domain_tokens is not None else [])

    def _steps(self, name):
        """(domain-level, item-level) attention layers of sequence `name` ("sequence" or "side")."""
        prefix = "seq" if name == "sequence" else "side"
        return getattr(self, f"{prefix}_domain_attention"), getattr(self, f"{prefix}_item_attention")

    def encode_context(self, inputs, training=False):
        config = self.config
        num_domains, ld = config.inputs.num_domains, config.inputs.domain_history_length
        k = config.embedding_dim
        domain_items = self.history_item_embedding(inputs[F.DOMAIN_HISTORY_ITEM_IDS])  # (B, D, Ld, k)
        domain_mask = inputs[F.DOMAIN_HISTORY_MASK]  # (B, D, Ld)
        history_mask = inputs[F.HISTORY_MASK]  # (B, L)
        history_domains = inputs[F.HISTORY_DOMAINS]  # (B, L)
        side = (ops.squeeze(self.domain_embedding(history_domains), axis=2)
                + self.time_gap_embedding(inputs[F.HISTORY_TIME_GAPS]))  # (B, L, k)
        if config.source_sequence == "mixed":
            sequence = self.history_item_embedding(inputs[F.HISTORY_ITEM_IDS])  # (B, L, k)
            sequence_mask, sequence_domains = history_mask, history_domains  # (B, L) each
        else:
            sequence = ops.reshape(domain_items, (-1, num_domains * ld, k))  # (B, D*Ld, k)
            sequence_mask = ops.reshape(domain_mask, (-1, num_domains * ld))  # (B, D*Ld)
            rows = ops.repeat(ops.arange(num_domains, dtype="int32"), ld)  # (D*Ld,): domain of each step
            sequence_domains = ops.zeros_like(ops.cast(sequence_mask, "int32")) + rows  # (B, D*Ld)
        context = {
            "user": self.user_embedding(inputs[F.USER_ID]),  # (B, k)
            "sequence": sequence, "sequence_mask": sequence_mask, "sequence_domains": sequence_domains,
            "side": side, "side_mask": history_mask, "side_domains": history_domains,
        }
        if config.use_domain_attention:
            weights = ops.cast(domain_mask, sequence.dtype)  # (B, D, Ld)
            counts = ops.sum(weights, axis=-1)  # (B, D)
            means = (ops.sum(domain_items * ops.expand_dims(weights, -1), axis=2)
                     / ops.expand_dims(ops.maximum(counts, 1.0), -1))  # (B, D, k)
            total = ops.cast(inputs[F.TARGET_DOMAIN_CLICKS] + inputs[F.OTHER_DOMAIN_CLICKS], sequence.dtype)  # (B,)
            context.update(domain_history=means, domain_history_counts=counts, total_clicks=total)
        for name in SEQUENCES:  # the candidate-independent projections
            domain_step, item_step = self._steps(name)
            if config.query == "sequence":
                if domain_step is not None:
                    context[f"{name}_query"] = domain_step.project_query(context[name])  # (B, Ls, H, k/H)
                continue
            if domain_step is not None:
                context[f"{name}_domain_keys"] = domain_step.project_context(context[name])  # (B, Ls, H, k/H)
            if item_step is not None:
                keys, values = item_step.project_context(context[name])  # (B, Ls, H, k/H) each
                context.update({f"{name}_item_keys": keys, f"{name}_item_values": values})
        return context

    def _domain_features(self, context, domain, e_d):
        """E_t: (B, M, k) tokens of each row's target domain and their (B, M) mask."""
        num_domains = self.config.inputs.num_domains
        counts = context["domain_history_counts"]  # (B, D)
        own = _one_hot_select(counts, domain, num_domains)  # (B,)
        statistics = ops.log1p(ops.stack([own, ops.sum(counts, axis=1) - own, context["total_clicks"]], axis=1))  # (B, 3)
        history = _one_hot_select(context["domain_history"], domain, num_domains)  # (B, k)
        tokens = [ops.expand_dims(e_d, 1)]
        if self.domain_tokens is not None:
            tokens.append(self.domain_tokens(domain))  # (B, T, k)
        tokens += [ops.expand_dims(self.statistics(statistics), 1), ops.expand_dims(history, 1)]
        tokens = ops.concatenate(tokens, axis=1)  # (B, M, k)
        always = ops.ones((ops.shape(own)[0], tokens.shape[1] - 1), dtype="bool")  # (B, M-1)
        mask = ops.concatenate([always, ops.expand_dims(own > 0, 1)], axis=1)  # (B, M): history token if any
        return tokens, mask

    def _item_keys(self, e_v, e_d):
        """E_v of eq. 4 (`query="sequence"`): (B, 2 + num_item_tokens, k) = [e_v, e_t, learned item-side tokens]."""
        tokens = [ops.expand_dims(e_v, 1), ops.expand_dims(e_d, 1)]
        if self.item_tokens is not None:
            learned = self.item_tokens(ops.arange(self.config.num_item_tokens, dtype="int32"))  # (T2, k)
            tokens.append(ops.zeros_like(e_v)[:, None, :] + learned[None])  # (B, T2, k)
        return ops.concatenate(tokens, axis=1)

    def _masks(self, context, domain):
        """The attended steps of each sequence: {name: (B, Ls) bool}, per `history_scope`."""
        masks = {}
        for name in SEQUENCES:
            mask = context[f"{name}_mask"]
            if self.config.history_scope == "source":
                target = ops.expand_dims(ops.cast(domain, context[f"{name}_domains"].dtype), 1)  # (B, 1)
                mask = ops.logical_and(mask, context[f"{name}_domains"] != target)
            masks[name] = mask
        return masks

    def _domain_allocation(self, context, name, mask, features, feature_mask):
        """a_1 of sequence `name`: (B, H, Ls), or None without the domain-level step."""
        domain_step, _ = self._steps(name)
        if domain_step is None:
            return None
        return domain_step(features, context[name], mask, query_mask=feature_mask,
                           projected_context=context[f"{name}_domain_keys"])

    def history_weights(self, context, item, domain):
        """The final allocation a_2 over each sequence's steps (`query="target"`): {name: (B, H, Ls)}.

        Sums to 1 over the attended steps of each head, 0 elsewhere (all 0 when none is attended).
        Without the item-level step it is a_1 (uniform when both steps are off).
        """
        if self.config.query != "target":
            raise ValueError(f"`history_weights` needs query='target'. Received: query={self.config.query!r}")
        e_d = ops.squeeze(self.domain_embedding(domain), axis=1)  # (B, k)
        e_v = self.target_item_embedding(item)  # (B, k)
        features = feature_mask = None
        if self.config.use_domain_attention:
            features, feature_mask = self._domain_features(context, domain, e_d)
        heads = self.config.num_heads
        result = {}
        for name, mask in self._masks(context, domain).items():
            prior = self._domain_allocation(context, name, mask, features, feature_mask)
            _, item_step = self._steps(name)
            if item_step is not None:
                result[name] = item_step.attention_weights(ops.expand_dims(e_v, 1), context[f"{name}_item_keys"], mask,
                                                           prior=prior)[:, :, 0]  # (B, H, Ls)
            elif prior is not None:
                result[name] = prior
            else:
                uniform = ops.cast(mask, context[name].dtype)  # (B, Ls)
                uniform = uniform / ops.maximum(ops.sum(uniform, axis=1, keepdims=True), 1.0)
                result[name] = ops.repeat(ops.expand_dims(uniform, 1), heads, axis=1)  # (B, H, Ls)
        return result

    def _attend_target(self, context, name, mask, features, feature_mask, e_v):
        """Eq. 3-4 with target-side queries on sequence `name` -> e_z (B, k)."""
        values = context[name]  # (B, Ls, k)
        prior = self._domain_allocation(context, name, mask, features, feature_mask)  # (B, H, Ls) or None
        _, item_step = self._steps(name)
        if item_step is not None:
            projected = (context[f"{name}_item_keys"], context[f"{name}_item_values"])
            return item_step(ops.expand_dims(e_v, 1), values, mask, projected_context=projected, prior=prior)[:, 0]
        if prior is not None:
            return ops.einsum("bhl,blk->bk", prior, values) / float(self.config.num_heads)  # (B, k)
        return self.pooling(values, mask)  # (B, k)

    def _attend_sequence(self, context, name, mask, domain_keys, domain_mask, item_keys):
        """Eq. 3-4 with sequence queries (`query="sequence"`) on sequence `name` -> e_z (B, k)."""
        values = context[name]  # (B, Ls, k)
        domain_step, item_step = self._steps(name)
        if domain_step is not None:
            e_1 = domain_step(values, domain_keys, domain_mask, projected_query=context[f"{name}_query"])  # (B, Ls, k)
            e_1_mask = mask
        else:
            e_1 = ops.expand_dims(self.pooling(values, mask), 1)  # (B, 1, k)
            e_1_mask = ops.any(mask, axis=1, keepdims=True)  # (B, 1)
        e_2 = item_step(e_1, item_keys) if item_step is not None else e_1  # (B, Ls or 1, k)
        return self.pooling(e_2, e_1_mask)  # (B, k)

    def score(self, context, item, domain, training=False):
        config = self.config
        e_d = ops.squeeze(self.domain_embedding(domain), axis=1)  # (B, k)
        e_v = self.target_item_embedding(item)  # (B, k)
        masks = self._masks(context, domain)
        features = feature_mask = None
        if config.use_domain_attention:
            features, feature_mask = self._domain_features(context, domain, e_d)  # (B, M, k), (B, M)
        if config.query == "target":
            e_z = [self._attend_target(context, name, masks[name], features, feature_mask, e_v) for name in SEQUENCES]
        else:
            item_keys = self._item_keys(e_v, e_d) if config.use_item_attention else None
            e_z = [self._attend_sequence(context, name, masks[name], features, feature_mask, item_keys)
                   for name in SEQUENCES]
        e_seq, e_side = e_z  # (B, k) each
        user = self.domain_encoder(ops.concatenate([e_seq, e_side, e_d], axis=-1), training=training)  # (B, u)  eq. 6
        features = ops.concatenate([user, context["user"], e_seq, e_side, e_v, e_d], axis=-1)  # eq. 7
        return ops.squeeze(self.logit(self.head(features, training=training)), axis=-1)  # (B,)

    def get_config(self):
        return {"config": dataclasses.asdict(self.config)}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _validate(config: DACDRConfig) -> None:
    checks = [
        ("embedding_dim", config.embedding_dim > 0, "must be positive"),
        ("num_heads", config.num_heads > 0, "must be positive"),
        ("num_domain_tokens", config.num_domain_tokens >= 0, "must be >= 0"),
        ("num_item_tokens", config.num_item_tokens >= 0, "must be >= 0"),
        ("source_sequence", config.source_sequence in SOURCE_SEQUENCES, f"must be one of {SOURCE_SEQUENCES}"),
        ("query", config.query in QUERIES, f"must be one of {QUERIES}"),
        ("history_scope", config.history_scope in HISTORY_SCOPES, f"must be one of {HISTORY_SCOPES}"),
        ("inputs.domains", config.inputs.num_domains >= 2, "must hold at least 2 domains (a target and a source)"),
    ]
    for name, ok, rule in checks:
        if not ok:
            value = config.inputs.domains if name == "inputs.domains" else getattr(config, name)
            raise ValueError(f"`{name}` {rule}. Received: {name}={value!r}")
    if config.embedding_dim % config.num_heads:
        raise ValueError(f"`num_heads` must divide `embedding_dim`. Received: num_heads={config.num_heads}, "
                         f"embedding_dim={config.embedding_dim}")


def _ensure_built(model: DACDR) -> None:
    if not model.built or not model.domain_embedding.built:
        model(dummy_inputs(model.config.inputs))


def finetune_variables(model: DACDR, new_domain_index: int) -> list:
    """Freezes all but the new domain's parts, as DACDR sec. 3.5 fine-tunes a new domain.

    Left trainable: domain `new_domain_index`'s variables in every `PerDomainVariables` layer
    (its embedding e_t and its domain tokens), the whole target item embedding table e^t_v
    (Keras freezes whole variables; rows of items never seen in fine-tuning get no gradient) and
    every cross-attention layer's W^Q, W^K, W^V, W^O (with `query="target"` the domain-level
    step has W^Q and W^K only). Everything else (user and history item embeddings, time-gap
    embeddings, the other domains' variables, the statistics projection, the learnable
    item-side tokens, g and h) gets `trainable = False`.

    Builds the model if needed and changes it in place; compile it afterwards, since a compiled
    train step keeps the variable list it was traced with. Returns the trainable variables.
    """
    if not isinstance(model, DACDR):
        raise ValueError(f"`model` must be a DACDR. Received: model={type(model).__name__}")
    num_domains = model.config.inputs.num_domains
    if not 0 <= new_domain_index < num_domains:
        raise ValueError(f"`new_domain_index` must be in [0, {num_domains}). Received: new_domain_index={new_domain_index}")
    _ensure_built(model)
    keep = [layer.tables[new_domain_index] for layer in model.per_domain_layers()]
    keep += list(model.target_item_embedding.weights)
    for attention in model.attention_layers():
        keep += list(attention.weights)
    keep_ids = {id(v) for v in keep}
    for variable in model.weights:
        variable.trainable = id(variable) in keep_ids
    return list(model.trainable_variables)


def expand_domains(model: DACDR, new_config: DACDRConfig) -> DACDR:
    """A new DACDR for `new_config`, whose domains extend `model`'s, with `model`'s weights copied.

    `new_config` must equal `model.config` except that `inputs.domains` appends domains to the
    old list (old indices keep their meaning). Every weight is copied; the new domains'
    `PerDomainVariables` slots keep their fresh initialisation. No weight's shape depends on D,
    so rows whose target and history domains are all old score as before.
    """
    old = model.config
    old_domains, new_domains = tuple(old.inputs.domains), tuple(new_config.inputs.domains)
    if new_domains[: len(old_domains)] != old_domains or len(new_domains) <= len(old_domains):
        raise ValueError(f"`new_config.inputs.domains` must extend the model's domains {list(old_domains)}. "
                         f"Received: domains={list(new_domains)}")
    same = dataclasses.replace(new_config, inputs=dataclasses.replace(new_config.inputs, domains=old_domains))
    if same != old:
        raise ValueError(f"`new_config` must equal the model's config except for `inputs.domains`. "
                         f"Received: new_config={new_config}, model config={old}")
    _ensure_built(model)
    expanded = DACDR(new_config)
    _ensure_built(expanded)
    old_slots = {id(v) for layer in model.per_domain_layers() for v in layer.weights}
    new_slots = {id(v) for layer in expanded.per_domain_layers() for v in layer.weights}
    shared_old = [v for v in model.weights if id(v) not in old_slots]
    shared_new = [v for v in expanded.weights if id(v) not in new_slots]
    for source, target in zip(shared_old, shared_new, strict=True):
        if tuple(source.shape) != tuple(target.shape):
            raise ValueError(f"weight shapes differ: {source.path} {source.shape} vs {target.path} {target.shape}")
        target.assign(source)
    for old_layer, new_layer in zip(model.per_domain_layers(), expanded.per_domain_layers(), strict=True):
        for d, table in enumerate(old_layer.tables):
            new_layer.tables[d].assign(table)
    return expanded
