"""Masked dot-product attention and the Transformer blocks built on it (SASRec, encoders, decoders).

One masking path for every attention in `models/`: an explicit boolean mask, masked logits set to
the dtype's minimum, and the softmax weights multiplied by the mask afterwards, so that a query
whose keys are all padding attends to nothing (zero output) instead of averaging the padding.
"""

import keras
from keras import ops

from models.layers.masking import masked_softmax


@keras.saving.register_keras_serializable(package="xdctr")
class MultiHeadAttention(keras.layers.Layer):
    """Scaled dot-product attention, Atten(Q, K, V) = softmax(Q K^T / sqrt(d_head)) V (MAN eq. 8-9).

    Q = query W^Q, K = value W^K, V = value W^V with bias-free (dim x dim) projections, split into
    `num_heads` heads of size dim / num_heads and concatenated again; no output projection (as in
    SASRec and MAN eq. 8). With one head this is exactly MAN's cross-attention CA(Q-side, KV-side).

    Args:
      num_heads: number of heads; must divide the input dimension.
      dropout: dropout rate on the attention weights, in [0, 1).
      kernel_initializer: initializer of W^Q, W^K, W^V.

    Call args:
      query: (batch, q_len, dim).
      value: (batch, k_len, dim): keys and values.
      attention_mask: (batch, q_len, k_len) bool or broadcastable to it; True where query i may
        attend to key j. None attends everywhere.
    Returns:
      (batch, q_len, dim); rows whose keys are all masked are zeros.
    """

    def __init__(self, num_heads=1, dropout=0.0, kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        if num_heads <= 0:
            raise ValueError(f"`num_heads` must be positive. Received: num_heads={num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.kernel_initializer = kernel_initializer
        self.attention_dropout = keras.layers.Dropout(dropout)

    def build(self, query_shape, value_shape):
        dim = query_shape[-1]
        if dim % self.num_heads:
            raise ValueError(f"`num_heads` must divide the input dimension {dim}. Received: num_heads={self.num_heads}")
        self.dim = dim
        self.query_dense, self.key_dense, self.value_dense = (
            keras.layers.Dense(dim, use_bias=False, kernel_initializer=self.kernel_initializer, name=name)
            for name in ("query", "key", "value")
        )
        self.query_dense.build(query_shape)
        self.key_dense.build(value_shape)
        self.value_dense.build(value_shape)

    def _split_heads(self, x):
        head_dim = self.dim // self.num_heads
        x = ops.reshape(x, (ops.shape(x)[0], -1, self.num_heads, head_dim))  # (batch, len, heads, head_dim)
        return ops.transpose(x, (0, 2, 1, 3))  # (batch, heads, len, head_dim)

    def call(self, query, value, attention_mask=None, training=False):
        head_dim = self.dim // self.num_heads
        q = self._split_heads(self.query_dense(query))  # (batch, heads, q_len, head_dim)
        k = self._split_heads(self.key_dense(value))  # (batch, heads, k_len, head_dim)
        v = self._split_heads(self.value_dense(value))  # (batch, heads, k_len, head_dim)
        logits = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2)))  # (batch, heads, q_len, k_len)
        logits = logits / ops.cast(head_dim**0.5, logits.dtype)
        if attention_mask is None:
            weights = ops.softmax(logits, axis=-1)
        else:
            mask = ops.expand_dims(attention_mask, 1)  # (batch, 1, q_len, k_len)
            weights = masked_softmax(logits, mask, axis=-1)
        weights = self.attention_dropout(weights, training=training)
        out = ops.matmul(weights, v)  # (batch, heads, q_len, head_dim)
        out = ops.transpose(out, (0, 2, 1, 3))  # (batch, q_len, heads, head_dim)
        return ops.reshape(out, (ops.shape(out)[0], -1, self.dim))  # (batch, q_len, dim)

    def compute_output_shape(self, query_shape, value_shape):
        return tuple(query_shape)

    def get_config(self):
        config = super().get_config()
        config.update(num_heads=self.num_heads, dropout=self.dropout, kernel_initializer=self.kernel_initializer)
        return config


MEMORY_ATTENTION = ("attention", "projection")


def _check_memory_attention(memory_attention):
    if memory_attention not in MEMORY_ATTENTION:
        raise ValueError(f"`memory_attention` must be one of {MEMORY_ATTENTION}. "
                         f"Received: memory_attention={memory_attention!r}")


@keras.saving.register_keras_serializable(package="xdctr")
class TransformerBlock(keras.layers.Layer):
    """One pre-layer-norm Transformer block: SASRec's (Kang & McAuley 2018), optionally with memory.

        h = x + Dropout(SelfAttention(LN(x)))            # causal and/or padding mask
        h = h + Dropout(CrossAttention(LN(h), memory))   # with_memory, memory_attention="attention"
        h = h + Dropout(MaskedMean(memory) W^V)          # with_memory, memory_attention="projection"
        y = (h + Dropout(FFN(LN(h)))) * mask              # FFN(z) = W2 Dropout(ReLU(W1 z + b1)) + b2

    The point-wise FFN keeps the width (dim -> dim -> dim, as SASRec's 1x1 convolutions); padded
    steps are zeroed on output. With `with_memory` the block is a decoder block (RecGURU sec. 3.3
    and supplement 6.1.1: "another multi-head attention layer over the user representation right
    after the self-attention layer"); the memory is used as it comes and has the sequence's width.
    A fully masked memory adds nothing.

    `memory_attention="projection"` is for a memory with one real entry (RecGURU's decoders read
    the one vector h^d): attention over one key has softmax weight 1, so it equals the value
    projection of that entry, and W^Q, W^K and the query's layer norm would never get a gradient.
    The projection form computes that value directly (the mean of the real entries' W^V
    projections, the same as attention whenever one entry is real) and has no dead weights.

    Args:
      num_heads: attention heads; must divide dim.
      dropout: rate of every dropout, in [0, 1).
      kernel_initializer: initializer of every kernel.
      with_memory: add the cross-attention over `memory`.
      memory_attention: "attention" (multi-head cross-attention) or "projection" (the masked mean
        of the memory's W^V projections, for a memory with one real entry).

    Call args:
      inputs: (batch, seq_len, dim).
      mask: (batch, seq_len) bool, True for real steps.
      attention_mask: (batch, seq_len, seq_len) bool; True where step i may attend to step j.
      memory: (batch, mem_len, dim), with_memory only.
      memory_mask: (batch, mem_len) bool, True for real memory entries, with_memory only.
    Returns:
      (batch, seq_len, dim).
    """

    def __init__(self, num_heads=1, dropout=0.0, kernel_initializer="glorot_uniform", with_memory=False,
                 memory_attention="attention", **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout}")
        _check_memory_attention(memory_attention)
        self.num_heads = num_heads
        self.dropout = dropout
        self.kernel_initializer = kernel_initializer
        self.with_memory = with_memory
        self.memory_attention = memory_attention
        self.attention = MultiHeadAttention(num_heads, dropout=dropout, kernel_initializer=kernel_initializer,
                                            name="attention")
        self.attention_norm = keras.layers.LayerNormalization(epsilon=1e-6, name="attention_norm")
        self.ffn_norm = keras.layers.LayerNormalization(epsilon=1e-6, name="ffn_norm")
        self.attention_dropout = keras.layers.Dropout(dropout)
        self.ffn_dropout = keras.layers.Dropout(dropout)
        self.ffn_inner_dropout = keras.layers.Dropout(dropout)
        if with_memory and memory_attention == "attention":
            self.cross_attention = MultiHeadAttention(num_heads, dropout=dropout, kernel_initializer=kernel_initializer,
                                                      name="cross_attention")
            self.cross_attention_norm = keras.layers.LayerNormalization(epsilon=1e-6, name="cross_attention_norm")
        if with_memory:
            self.cross_attention_dropout = keras.layers.Dropout(dropout)

    def build(self, input_shape):
        dim = input_shape[-1]
        self.ffn_inner = keras.layers.Dense(dim, activation="relu", kernel_initializer=self.kernel_initializer,
                                            name="ffn_inner")
        self.ffn_outer = keras.layers.Dense(dim, kernel_initializer=self.kernel_initializer, name="ffn_outer")
        self.attention_norm.build(input_shape)
        self.ffn_norm.build(input_shape)
        self.attention.build(input_shape, input_shape)
        if self.with_memory and self.memory_attention == "attention":
            self.cross_attention_norm.build(input_shape)
            self.cross_attention.build(input_shape, input_shape)
        elif self.with_memory:
            self.memory_projection = keras.layers.Dense(dim, use_bias=False, kernel_initializer=self.kernel_initializer,
                                                        name="memory_projection")
            self.memory_projection.build(input_shape)
        self.ffn_inner.build(input_shape)
        self.ffn_outer.build(input_shape)

    def call(self, inputs, mask, attention_mask, memory=None, memory_mask=None, training=False):
        h = self.attention_norm(inputs)  # (batch, seq_len, dim)
        attended = self.attention(h, h, attention_mask=attention_mask, training=training)  # (batch, seq_len, dim)
        x = inputs + self.attention_dropout(attended, training=training)
        if self.with_memory and self.memory_attention == "attention":
            cross_mask = ops.expand_dims(ops.cast(memory_mask, "bool"), 1)  # (batch, 1, mem_len)
            crossed = self.cross_attention(self.cross_attention_norm(x), memory, attention_mask=cross_mask,
                                           training=training)  # (batch, seq_len, dim)
            x = x + self.cross_attention_dropout(crossed, training=training)
        elif self.with_memory:
            weights = ops.expand_dims(ops.cast(memory_mask, x.dtype), -1)  # (batch, mem_len, 1)
            pooled = ops.sum(ops.cast(memory, x.dtype) * weights, axis=1, keepdims=True)  # (batch, 1, dim)
            pooled = pooled / ops.maximum(ops.sum(weights, axis=1, keepdims=True), 1.0)  # (batch, 1, dim)
            crossed = self.memory_projection(pooled)  # (batch, 1, dim), broadcast over seq_len
            x = x + self.cross_attention_dropout(crossed, training=training)
        h = self.ffn_inner_dropout(self.ffn_inner(self.ffn_norm(x)), training=training)  # (batch, seq_len, dim)
        x = x + self.ffn_dropout(self.ffn_outer(h), training=training)
        return x * ops.expand_dims(ops.cast(mask, x.dtype), -1)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(num_heads=self.num_heads, dropout=self.dropout, kernel_initializer=self.kernel_initializer,
                      with_memory=self.with_memory, memory_attention=self.memory_attention)
        return config


@keras.saving.register_keras_serializable(package="xdctr")
class TransformerEncoder(keras.layers.Layer):
    """Transformer encoder: dropout, `num_layers` `TransformerBlock`s, final layer norm.

    With `causal`, step i attends to the real steps j <= i (SASRec; MAN eq. 3-4, SyNCRec's
    experts); without, to every real step, earlier or later (RecGURU eq. 4). With `with_memory`,
    every block also attends to `memory` (a decoder: RecGURU eq. 4-5 and CDSRec, eq. 10).
    Histories are left-padded, so the last step is the most recent click. Positional embeddings
    are added by the caller. Padded steps of the output are zeros; a fully padded sequence gives
    all zeros.

    Args:
      num_layers: number of blocks, positive.
      num_heads: attention heads per block; must divide dim.
      dropout: rate of every dropout, in [0, 1).
      kernel_initializer: initializer of every kernel.
      causal: mask later steps out of every step's attention.
      with_memory: blocks with cross-attention over `memory`.
      memory_attention: how blocks read the memory, "attention" or "projection" (see
        `TransformerBlock`).

    Call args:
      inputs: (batch, seq_len, dim) item embeddings plus positions.
      mask: (batch, seq_len) bool, True for real steps.
      memory: (batch, mem_len, dim), with_memory only.
      memory_mask: (batch, mem_len) bool, with_memory only.
    Returns:
      (batch, seq_len, dim).
    """

    def __init__(self, num_layers=1, num_heads=1, dropout=0.0, kernel_initializer="glorot_uniform", causal=False,
                 with_memory=False, memory_attention="attention", **kwargs):
        super().__init__(**kwargs)
        _check_memory_attention(memory_attention)
        if num_layers <= 0:
            raise ValueError(f"`num_layers` must be positive. Received: num_layers={num_layers}")
        if num_heads <= 0:
            raise ValueError(f"`num_heads` must be positive. Received: num_heads={num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout}")
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.dropout = dropout
        self.kernel_initializer = kernel_initializer
        self.causal = causal
        self.with_memory = with_memory
        self.memory_attention = memory_attention
        self.input_dropout = keras.layers.Dropout(dropout)
        self.blocks = [
            TransformerBlock(num_heads, dropout=dropout, kernel_initializer=kernel_initializer, with_memory=with_memory,
                             memory_attention=memory_attention, name=f"block_{i}")
            for i in range(num_layers)
        ]
        self.output_norm = keras.layers.LayerNormalization(epsilon=1e-6, name="output_norm")

    def build(self, input_shape):
        for block in self.blocks:
            block.build(input_shape)
        self.output_norm.build(input_shape)

    def call(self, inputs, mask, memory=None, memory_mask=None, training=False):
        mask = ops.cast(mask, "bool")
        attention_mask = ops.expand_dims(mask, 1)  # (batch, 1, seq_len): the key is real
        if self.causal:
            steps = ops.arange(inputs.shape[1])
            causal = ops.expand_dims(steps, 1) >= ops.expand_dims(steps, 0)  # (seq_len, seq_len): key j <= query i
            attention_mask = ops.logical_and(ops.expand_dims(causal, 0), attention_mask)  # (batch, seq_len, seq_len)
        weights = ops.expand_dims(ops.cast(mask, inputs.dtype), -1)  # (batch, seq_len, 1)
        x = self.input_dropout(inputs, training=training) * weights
        for block in self.blocks:
            x = block(x, mask, attention_mask, memory, memory_mask, training=training)
        return self.output_norm(x) * weights

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(num_layers=self.num_layers, num_heads=self.num_heads, dropout=self.dropout,
                      kernel_initializer=self.kernel_initializer, causal=self.causal, with_memory=self.with_memory,
                      memory_attention=self.memory_attention)
        return config


@keras.saving.register_keras_serializable(package="xdctr")
class SASRecEncoder(TransformerEncoder):
    """The causal `TransformerEncoder` (SASRec): step i attends to the real steps j <= i."""

    def __init__(self, num_layers=1, num_heads=1, dropout=0.0, kernel_initializer="glorot_uniform", **kwargs):
        kwargs.pop("causal", None)
        kwargs.pop("with_memory", None)
        kwargs.pop("memory_attention", None)
        super().__init__(num_layers, num_heads, dropout, kernel_initializer, causal=True, **kwargs)


@keras.saving.register_keras_serializable(package="xdctr")
class TransformerDecoder(TransformerEncoder):
    """The causal `TransformerEncoder` with memory (RecGURU's decoders and CDSRec, eq. 4-5, 10).

    Step i attends to the real steps j <= i and reads the real memory entries (by attention, or
    by `memory_attention="projection"`); a fully masked memory contributes nothing.
    """

    def __init__(self, num_layers=1, num_heads=1, dropout=0.0, kernel_initializer="glorot_uniform", **kwargs):
        kwargs.pop("causal", None)
        kwargs.pop("with_memory", None)
        super().__init__(num_layers, num_heads, dropout, kernel_initializer, causal=True, with_memory=True, **kwargs)
