"""Multi-head cross-attention (DACDR eq. 1-2, CrossViT style) and attention allocations over a context."""

import keras
from keras import ops

from models.layers.masking import masked_softmax


def _check_heads(num_heads, key_dim):
    if num_heads <= 0:
        raise ValueError(f"`num_heads` must be positive. Received: num_heads={num_heads}")
    if key_dim <= 0:
        raise ValueError(f"`key_dim` must be positive. Received: key_dim={key_dim}")


def _check_dims(query_shape, context_shape):
    if query_shape[-1] is None or context_shape[-1] is None:
        raise ValueError(f"the last axis of query and context must be known. Received: "
                         f"query_shape={query_shape}, context_shape={context_shape}")


def _scores(q, k):
    """(batch, q_len, H, key_dim) x (batch, c_len, H, key_dim) -> (batch, H, q_len, c_len) scaled dot products."""
    return ops.einsum("bqhk,bchk->bhqc", q, k) / ops.sqrt(ops.cast(q.shape[-1], q.dtype))


def _context_weights(scores, context_mask):
    """Softmax of (batch, H, q_len, c_len) scores over the real context steps; 0 if none is real."""
    if context_mask is None:
        return ops.softmax(scores, axis=-1)
    keep = ops.expand_dims(ops.expand_dims(context_mask, 1), 1)  # (batch, 1, 1, c_len)
    return masked_softmax(scores, keep, axis=-1)


@keras.saving.register_keras_serializable(package="xdctr")
class CrossAttention(keras.layers.Layer):
    """Cross-attention of a query sequence over a context sequence, optionally added to the query.

    DACDR eq. 1-2 (Chen et al.'s CrossViT, the paper's ref. [12], for the residual):

        Q_h = X W^Q_h,  K_h = C W^K_h,  V_h = C W^V_h                      (eq. 2)
        A_h = softmax(Q_h K_h^T / sqrt(key_dim))  over the unmasked context steps   (eq. 1)
        out = X + concat_h(A_h V_h) W^O          (residual=True)
        out = concat_h(A_h V_h) W^O              (residual=False)

    With a `prior` P_h over the context steps (another attention's allocation, e.g.
    `AttentionAllocation`), the weights are refined by it: A_h = P_h * softmax(...) renormalised
    over the context, i.e. softmax(Q_h K_h^T / sqrt(key_dim) + log P_h); steps with prior 0 get
    weight 0.

    Every query step attends independently, so the output keeps the query's length. Masked
    context steps get the dtype's minimum before the softmax and weight 0 after it; a query
    whose context is fully masked (or whose prior is all 0) attends to nothing: the output is the
    query (residual) or zeros, finite either way. The projections have no bias, as in eq. 2.

    The query projection can be computed ahead (`project_query`) and passed back through
    `projected_query`, and so can the context's keys and values (`project_context`,
    `projected_context`), so a model can project the candidate-independent side once per request
    and attend per candidate.

    Args:
      num_heads: number of heads H, positive.
      key_dim: size d_k of each head's queries, keys and values, positive.
      residual: add the query to the output (CrossViT) or not (plain eq. 1).
      kernel_initializer: initializer of W^Q, W^K, W^V and W^O.

    Call args:
      query: (batch, query_len, query_dim) float.
      context: (batch, context_len, context_dim) float.
      context_mask: optional (batch, context_len) bool, True for real context steps.
      projected_query: optional (batch, query_len, H, key_dim), `project_query(query)`.
      projected_context: optional pair of (batch, context_len, H, key_dim), `project_context(context)`.
      prior: optional (batch, H, context_len) or (batch, H, query_len, context_len) non-negative
        weights over the context.
    Returns:
      (batch, query_len, query_dim).
    """

    def __init__(self, num_heads, key_dim, residual=True, kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        _check_heads(num_heads, key_dim)
        self.num_heads = int(num_heads)
        self.key_dim = int(key_dim)
        self.residual = bool(residual)
        self.kernel_initializer = kernel_initializer

    def build(self, query_shape, context_shape):
        _check_dims(query_shape, context_shape)
        query_dim, context_dim = query_shape[-1], context_shape[-1]
        init = keras.initializers.get(self.kernel_initializer)
        heads = (self.num_heads, self.key_dim)
        self.query_kernel = self.add_weight(shape=(query_dim,) + heads, initializer=init, name="query_kernel")
        self.key_kernel = self.add_weight(shape=(context_dim,) + heads, initializer=init, name="key_kernel")
        self.value_kernel = self.add_weight(shape=(context_dim,) + heads, initializer=init, name="value_kernel")
        self.output_kernel = self.add_weight(shape=heads + (query_dim,), initializer=init, name="output_kernel")

    def project_query(self, query):
        """(batch, query_len, query_dim) -> (batch, query_len, H, key_dim): X W^Q."""
        return ops.einsum("bqd,dhk->bqhk", query, self.query_kernel)

    def project_context(self, context):
        """(batch, context_len, context_dim) -> keys C W^K and values C W^V, (batch, context_len, H, key_dim) each."""
        return (ops.einsum("bcd,dhk->bchk", context, self.key_kernel),
                ops.einsum("bcd,dhk->bchk", context, self.value_kernel))

    def attention_weights(self, query, keys, context_mask=None, projected_query=None, prior=None):
        """A_h of eq. 1 (refined by `prior`): (batch, H, query_len, context_len); `keys` is C W^K."""
        q = self.project_query(query) if projected_query is None else projected_query  # (batch, q_len, H, key_dim)
        weights = _context_weights(_scores(q, keys), context_mask)  # (batch, H, q_len, c_len)
        if prior is None:
            return weights
        if len(prior.shape) == 3:
            prior = ops.expand_dims(prior, 2)  # (batch, H, 1, c_len)
        weights = weights * ops.cast(prior, weights.dtype)
        total = ops.sum(weights, axis=-1, keepdims=True)  # (batch, H, q_len, 1)
        return ops.where(total > 0, weights / ops.where(total > 0, total, ops.ones_like(total)), ops.zeros_like(weights))

    def call(self, query, context, context_mask=None, projected_query=None, projected_context=None, prior=None):
        k, v = self.project_context(context) if projected_context is None else projected_context  # (batch, c_len, H, key_dim)
        weights = self.attention_weights(query, k, context_mask, projected_query, prior)  # (batch, H, q_len, c_len)
        attended = ops.einsum("bhqc,bchk->bqhk", weights, v)  # (batch, q_len, H, key_dim)
        out = ops.einsum("bqhk,hkd->bqd", attended, self.output_kernel)  # (batch, q_len, query_dim)
        return query + out if self.residual else out

    def compute_output_shape(self, query_shape, context_shape):
        return tuple(query_shape)

    def get_config(self):
        config = super().get_config()
        config.update(num_heads=self.num_heads, key_dim=self.key_dim, residual=self.residual,
                      kernel_initializer=self.kernel_initializer)
        return config


@keras.saving.register_keras_serializable(package="xdctr")
class AttentionAllocation(keras.layers.Layer):
    """How several queries together allocate attention over a context: eq. 1's weights, pooled.

        A_h[m] = softmax(q_m W^Q_h (c W^K_h)^T / sqrt(key_dim))  over the real context steps
        out_h = mean over the real queries m of A_h[m]                     (batch, H, context_len)

    Each head's output is a distribution over the context steps (sums to 1 over the real steps,
    0 on padding; all 0 when no context step or no query is real). Used as the coarse,
    domain-level allocation of DACDR's two-step attention, which `CrossAttention(prior=...)`
    then refines; it has no value or output projection since it returns weights, not values.

    Args:
      num_heads: number of heads H, positive.
      key_dim: size d_k of each head's queries and keys, positive.
      kernel_initializer: initializer of W^Q and W^K.

    Call args:
      query: (batch, query_len, query_dim) float.
      context: (batch, context_len, context_dim) float.
      context_mask: optional (batch, context_len) bool, True for real context steps.
      query_mask: optional (batch, query_len) bool, True for the queries that take part.
      projected_context: optional (batch, context_len, H, key_dim) keys, `project_context(context)`.
    Returns:
      (batch, H, context_len).
    """

    def __init__(self, num_heads, key_dim, kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        _check_heads(num_heads, key_dim)
        self.num_heads = int(num_heads)
        self.key_dim = int(key_dim)
        self.kernel_initializer = kernel_initializer

    def build(self, query_shape, context_shape):
        _check_dims(query_shape, context_shape)
        init = keras.initializers.get(self.kernel_initializer)
        heads = (self.num_heads, self.key_dim)
        self.query_kernel = self.add_weight(shape=(query_shape[-1],) + heads, initializer=init, name="query_kernel")
        self.key_kernel = self.add_weight(shape=(context_shape[-1],) + heads, initializer=init, name="key_kernel")

    def project_context(self, context):
        """(batch, context_len, context_dim) -> keys C W^K, (batch, context_len, H, key_dim)."""
        return ops.einsum("bcd,dhk->bchk", context, self.key_kernel)

    def call(self, query, context, context_mask=None, query_mask=None, projected_context=None):
        q = ops.einsum("bqd,dhk->bqhk", query, self.query_kernel)  # (batch, q_len, H, key_dim)
        k = self.project_context(context) if projected_context is None else projected_context
        weights = _context_weights(_scores(q, k), context_mask)  # (batch, H, q_len, c_len)
        if query_mask is None:
            return ops.mean(weights, axis=2)  # (batch, H, c_len)
        taking = ops.cast(query_mask, weights.dtype)  # (batch, q_len)
        count = ops.maximum(ops.sum(taking, axis=1), 1.0)  # (batch,)
        pooled = ops.einsum("bhqc,bq->bhc", weights, taking)  # (batch, H, c_len)
        return pooled / ops.reshape(count, (-1, 1, 1))

    def compute_output_shape(self, query_shape, context_shape):
        return (query_shape[0], self.num_heads, context_shape[1])

    def get_config(self):
        config = super().get_config()
        config.update(num_heads=self.num_heads, key_dim=self.key_dim, kernel_initializer=self.kernel_initializer)
        return config
