"""Transformer decoder (causal, with cross-attention) for sequence autoencoders.

RecGURU (Li et al., WSDM 2022) encodes a behaviour sequence with bidirectional self-attention
(`transformer.TransformerEncoder`) and reconstructs it with a decoder whose blocks insert "another multi-head attention layer over the
user representation right after the self-attention layer" (sec. 3.3, eq. 4); its recommender
(CDSRec, supplement 6.1.2) has the decoder's structure. Both reuse `transformer.py`'s
`MultiHeadAttention` and `TransformerBlock`, so every attention goes through the one masking path
(`masking.masked_softmax`).
"""

import keras
from keras import ops

from models.layers.transformer import MultiHeadAttention, TransformerBlock


def _check(num_layers=1, num_heads=1, dropout=0.0):
    if num_layers <= 0:
        raise ValueError(f"`num_layers` must be positive. Received: num_layers={num_layers}")
    if num_heads <= 0:
        raise ValueError(f"`num_heads` must be positive. Received: num_heads={num_heads}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout}")


@keras.saving.register_keras_serializable(package="xdctr")
class TransformerDecoderBlock(keras.layers.Layer):
    """One decoder block (RecGURU sec. 3.3 and supplement 6.1.1), pre-layer-norm like `TransformerBlock`.

        h = x + Dropout(SelfAttention(LN(x)))                 # causal + padding mask
        h = h + Dropout(CrossAttention(LN(h), memory))        # memory mask
        y = (h + Dropout(FFN(LN(h)))) * mask                  # FFN(z) = W2 Dropout(ReLU(W1 z + b1)) + b2

    The cross-attention attends over `memory` (RecGURU: the user representation h, one vector, or
    the generalised representations of several domains); the memory is used as it comes (it is
    the encoder's layer-normalised output). The FFN keeps the width, as in `TransformerBlock`.

    Args:
      num_heads: attention heads of both attentions; must divide dim.
      dropout: rate of every dropout, in [0, 1).
      kernel_initializer: initializer of every kernel.

    Call args:
      inputs: (batch, seq_len, dim).
      mask: (batch, seq_len) bool, True for real steps.
      attention_mask: (batch, seq_len, seq_len) bool; True where step i may attend to step j.
      memory: (batch, mem_len, dim).
      memory_mask: (batch, mem_len) bool, True for real memory entries.
    Returns:
      (batch, seq_len, dim); padded steps are zeros.
    """

    def __init__(self, num_heads=1, dropout=0.0, kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        _check(num_heads=num_heads, dropout=dropout)
        self.num_heads = num_heads
        self.dropout = dropout
        self.kernel_initializer = kernel_initializer
        self.self_attention = MultiHeadAttention(num_heads, dropout=dropout, kernel_initializer=kernel_initializer,
                                                 name="self_attention")
        self.cross_attention = MultiHeadAttention(num_heads, dropout=dropout, kernel_initializer=kernel_initializer,
                                                  name="cross_attention")
        self.self_attention_norm = keras.layers.LayerNormalization(epsilon=1e-6, name="self_attention_norm")
        self.cross_attention_norm = keras.layers.LayerNormalization(epsilon=1e-6, name="cross_attention_norm")
        self.ffn_norm = keras.layers.LayerNormalization(epsilon=1e-6, name="ffn_norm")
        self.self_attention_dropout = keras.layers.Dropout(dropout)
        self.cross_attention_dropout = keras.layers.Dropout(dropout)
        self.ffn_inner_dropout = keras.layers.Dropout(dropout)
        self.ffn_dropout = keras.layers.Dropout(dropout)

    def build(self, input_shape):
        dim = input_shape[-1]
        self.ffn_inner = keras.layers.Dense(dim, activation="relu", kernel_initializer=self.kernel_initializer,
                                            name="ffn_inner")
        self.ffn_outer = keras.layers.Dense(dim, kernel_initializer=self.kernel_initializer, name="ffn_outer")
        for norm in (self.self_attention_norm, self.cross_attention_norm, self.ffn_norm):
            norm.build(input_shape)
        # The memory has the same width as the sequence.
        self.self_attention.build(input_shape, input_shape)
        self.cross_attention.build(input_shape, input_shape)
        self.ffn_inner.build(input_shape)
        self.ffn_outer.build(input_shape)

    def call(self, inputs, mask, attention_mask, memory, memory_mask, training=False):
        h = self.self_attention_norm(inputs)  # (batch, seq_len, dim)
        attended = self.self_attention(h, h, attention_mask=attention_mask, training=training)
        x = inputs + self.self_attention_dropout(attended, training=training)
        cross_mask = ops.expand_dims(ops.cast(memory_mask, "bool"), 1)  # (batch, 1, mem_len)
        crossed = self.cross_attention(self.cross_attention_norm(x), memory, attention_mask=cross_mask,
                                       training=training)  # (batch, seq_len, dim)
        x = x + self.cross_attention_dropout(crossed, training=training)
        h = self.ffn_inner_dropout(self.ffn_inner(self.ffn_norm(x)), training=training)  # (batch, seq_len, dim)
        x = x + self.ffn_dropout(self.ffn_outer(h), training=training)
        return x * ops.expand_dims(ops.cast(mask, x.dtype), -1)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(num_heads=self.num_heads, dropout=self.dropout, kernel_initializer=self.kernel_initializer)
        return config


@keras.saving.register_keras_serializable(package="xdctr")
class TransformerDecoder(keras.layers.Layer):
    """Causal Transformer decoder: dropout, `num_layers` `TransformerDecoderBlock`s, final layer norm.

    RecGURU eq. 4-5 (reconstruction p(v_t | v_<t, h)) and eq. 10 (CDSRec). Step i attends to the
    real steps j <= i and to the real memory entries. Positional embeddings are added by the
    caller. Padded steps of the output are zeros; a fully padded sequence gives all zeros, and a
    fully masked memory contributes nothing (the cross-attention output is zero).

    Args:
      num_layers: number of blocks, positive.
      num_heads: attention heads per block; must divide dim.
      dropout: rate of every dropout, in [0, 1).
      kernel_initializer: initializer of every kernel.

    Call args:
      inputs: (batch, seq_len, dim).
      mask: (batch, seq_len) bool, True for real steps.
      memory: (batch, mem_len, dim).
      memory_mask: (batch, mem_len) bool.
    Returns:
      (batch, seq_len, dim).
    """

    def __init__(self, num_layers=1, num_heads=1, dropout=0.0, kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        _check(num_layers, num_heads, dropout)
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.dropout = dropout
        self.kernel_initializer = kernel_initializer
        self.input_dropout = keras.layers.Dropout(dropout)
        self.blocks = [
            TransformerDecoderBlock(num_heads, dropout=dropout, kernel_initializer=kernel_initializer,
                                    name=f"block_{i}")
            for i in range(num_layers)
        ]
        self.output_norm = keras.layers.LayerNormalization(epsilon=1e-6, name="output_norm")

    def build(self, input_shape):
        for block in self.blocks:
            block.build(input_shape)
        self.output_norm.build(input_shape)

    def call(self, inputs, mask, memory, memory_mask, training=False):
        seq_len = inputs.shape[1]
        steps = ops.arange(seq_len)
        causal = ops.expand_dims(steps, 1) >= ops.expand_dims(steps, 0)  # (seq_len, seq_len): key j <= query i
        mask = ops.cast(mask, "bool")
        # (batch, seq_len, seq_len): causal AND the key is real.
        attention_mask = ops.logical_and(ops.expand_dims(causal, 0), ops.expand_dims(mask, 1))
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
                      kernel_initializer=self.kernel_initializer)
        return config
