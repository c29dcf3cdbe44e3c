"""Multi-gate mixture of sequential experts with per-task stop-gradients (SyNCRec's ACMoE, eq. 2-7).

Three blocks, composed by the model:

    experts = SequentialExperts(K)(E, mask)              # (N, K, T, dim): f_TRM^1..K(E)
    gates = SequenceGates(tasks, K)(E_tasks, mask_tasks)  # (N, tasks, K): g^t(E) = softmax(W_g^t vec(E))
    mixed = mix_experts(experts_at_steps, gates_t, stop_gradient=(True, False, ...))
    out = TaskTowers(tasks)(mixed_tasks)                  # h^t: feed-forward network + layer norm

`mix_experts` is where the "asymmetric" part lives: the experts flagged in `stop_gradient` pass
their output forward unchanged but send no gradient back from that task.
"""

from __future__ import annotations

import keras
from keras import ops

from models.layers.transformer import SASRecEncoder


@keras.saving.register_keras_serializable(package="xdctr")
class SequentialExperts(keras.layers.Layer):
    """K separate Transformer sequence experts run on the same input (SyNCRec eq. 5-7, f_TRM^k).

    Each expert is its own `SASRecEncoder` with its own weights (causal, padding-masked
    self-attention blocks and a point-wise FFN; padded steps of the output are zeros).

    Args:
      num_experts: K, positive.
      num_layers: Transformer blocks per expert, positive.
      num_heads: attention heads per block; must divide the input dimension.
      dropout: rate of every dropout inside the experts, in [0, 1).
      kernel_initializer: initializer of every kernel.

    Call args:
      inputs: (batch, seq_len, dim) embeddings (positions included).
      mask: (batch, seq_len) bool, True for real steps.
    Returns:
      (batch, K, seq_len, dim): expert k's output in row k.
    """

    def __init__(self, num_experts, num_layers=1, num_heads=1, dropout=0.0, kernel_initializer="glorot_uniform",
                 **kwargs):
        super().__init__(**kwargs)
        if num_experts <= 0:
            raise ValueError(f"`num_experts` must be positive. Received: num_experts={num_experts}")
        self.num_experts = int(num_experts)
        self.num_layers = int(num_layers)
        self.num_heads = int(num_heads)
        self.dropout = dropout
        self.kernel_initializer = kernel_initializer
        self.experts = [
            SASRecEncoder(num_layers, num_heads, dropout=dropout, kernel_initializer=kernel_initializer,
                          name=f"expert_{k}")
            for k in range(self.num_experts)
        ]

    def build(self, inputs_shape, mask_shape=None):
        for expert in self.experts:
            expert.build(inputs_shape)

    def call(self, inputs, mask, training=False):
        outputs = [expert(inputs, mask, training=training) for expert in self.experts]  # K x (batch, seq_len, dim)
        return ops.stack(outputs, axis=1)  # (batch, K, seq_len, dim)

    def compute_output_shape(self, inputs_shape, mask_shape=None):
        return (inputs_shape[0], self.num_experts) + tuple(inputs_shape[1:])

    def get_config(self):
        config = super().get_config()
        config.update(num_experts=self.num_experts, num_layers=self.num_layers, num_heads=self.num_heads,
                      dropout=self.dropout, kernel_initializer=self.kernel_initializer)
        return config


@keras.saving.register_keras_serializable(package="xdctr")
class SequenceGates(keras.layers.Layer):
    """One softmax gate per task over K experts, from the whole flattened sequence (SyNCRec eq. 3).

        g^t(E) = softmax(W_g^t vec(E)),   W_g^t in R^{K x (T dim)}

    one weight distribution per sequence (not per step), as eq. 3's shape of W_g says. Padded
    steps are zeroed before the flattening, so ids under a False mask never matter. No bias, as
    in eq. 3.

    Args:
      num_tasks: number of tasks (gates), positive.
      num_experts: K, positive.
      kernel_initializer: initializer of the (num_tasks, T * dim, K) kernel.

    Call args:
      inputs: (batch, num_tasks, seq_len, dim): task t's sequence in row t.
      mask: (batch, num_tasks, seq_len) bool.
    Returns:
      (batch, num_tasks, K), rows summing to 1.
    """

    def __init__(self, num_tasks, num_experts, kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        for name, value in (("num_tasks", num_tasks), ("num_experts", num_experts)):
            if value <= 0:
                raise ValueError(f"`{name}` must be positive. Received: {name}={value}")
        self.num_tasks = int(num_tasks)
        self.num_experts = int(num_experts)
        self.kernel_initializer = kernel_initializer

    def build(self, inputs_shape, mask_shape=None):
        tasks, seq_len, dim = inputs_shape[1], inputs_shape[2], inputs_shape[3]
        if tasks != self.num_tasks:
            raise ValueError(f"`inputs` must have num_tasks={self.num_tasks} rows on axis 1. "
                             f"Received: inputs.shape={tuple(inputs_shape)}")
        self.seq_len, self.dim = int(seq_len), int(dim)
        self.kernel = self.add_weight(shape=(self.num_tasks, self.seq_len * self.dim, self.num_experts),
                                      initializer=keras.initializers.get(self.kernel_initializer), name="kernel")

    def call(self, inputs, mask):
        x = inputs * ops.expand_dims(ops.cast(mask, inputs.dtype), -1)  # (batch, tasks, seq_len, dim), padding 0
        flat = ops.reshape(x, (-1, self.num_tasks, self.seq_len * self.dim))  # (batch, tasks, seq_len * dim)
        logits = ops.einsum("btf,tfk->btk", flat, ops.cast(self.kernel, flat.dtype))  # (batch, tasks, K)
        return ops.softmax(logits, axis=-1)

    def compute_output_shape(self, inputs_shape, mask_shape=None):
        return (inputs_shape[0], self.num_tasks, self.num_experts)

    def get_config(self):
        config = super().get_config()
        config.update(num_tasks=self.num_tasks, num_experts=self.num_experts,
                      kernel_initializer=self.kernel_initializer)
        return config


def mix_experts(expert_outputs, gates, stop_gradient):
    """Gate-weighted sum of expert outputs with a stop-gradient on some experts (SyNCRec eq. 2, 4).

        f(E) = sum_k g_k SG_k(f_TRM^k(E)),   SG_k = stop-gradient if stop_gradient[k] else identity

    The forward value does not depend on `stop_gradient`; the backward pass sends no gradient to
    the flagged experts' outputs (the gates still get theirs from every expert).

    Args:
      expert_outputs: (batch, K, ...) float.
      gates: (batch, K) weights.
      stop_gradient: K Python bools (static), True for the experts this task must not train.
    Returns:
      (batch, ...).
    """
    flags = tuple(bool(flag) for flag in stop_gradient)
    num_experts = expert_outputs.shape[1]
    if len(flags) != num_experts:
        raise ValueError(f"`stop_gradient` must have one flag per expert ({num_experts}). "
                         f"Received: stop_gradient={flags}")
    trailing = (1,) * (len(expert_outputs.shape) - 2)
    if any(flags):
        blocked = ops.reshape(ops.convert_to_tensor(flags), (1, num_experts) + trailing)  # (1, K, 1, ...)
        expert_outputs = ops.where(blocked, ops.stop_gradient(expert_outputs), expert_outputs)
    weights = ops.reshape(ops.cast(gates, expert_outputs.dtype), (-1, num_experts) + trailing)  # (batch, K, 1, ...)
    return ops.sum(weights * expert_outputs, axis=1)


TOWER_NORMS = ("post", "pre")


@keras.saving.register_keras_serializable(package="xdctr")
class TaskTowers(keras.layers.Layer):
    """One tower per task: a feed-forward network with layer normalization (SyNCRec eq. 2, 4: h^d, h^cross).

        norm="post":  h^t(x) = LayerNorm_t(x + W2_t GELU(W1_t x + b1_t) + b2_t)
        norm="pre":   h^t(x) = x + W2_t GELU(W1_t LayerNorm_t(x) + b1_t) + b2_t
                      W1_t, W2_t in R^{dim x dim}; LayerNorm_t with a per-task scale and shift

    The paper only says "a feed-forward network with layer normalization"; the residual keeps
    the mixed expert output reachable (and the output width equal to the item embeddings', for
    the dot-product scores). Where the norm sits matters when the output is dotted with item
    embeddings: after the residual ("post") every output has the same norm before the scale and
    shift, so a user's scores spread as widely over the items whatever the evidence behind them;
    before the FFN ("pre") the output's length is free. All towers run in one einsum over the
    task axis.

    Args:
      num_tasks: number of towers, positive.
      kernel_initializer: initializer of W1 and W2.
      epsilon: layer-norm epsilon.
      norm: "post" or "pre" (see above).

    Call args:
      inputs: (..., num_tasks, dim): task t's input in row t.
    Returns:
      (..., num_tasks, dim).
    """

    def __init__(self, num_tasks, kernel_initializer="glorot_uniform", epsilon=1e-6, norm="post", **kwargs):
        super().__init__(**kwargs)
        if num_tasks <= 0:
            raise ValueError(f"`num_tasks` must be positive. Received: num_tasks={num_tasks}")
        if norm not in TOWER_NORMS:
            raise ValueError(f"`norm` must be one of {TOWER_NORMS}. Received: norm={norm!r}")
        self.num_tasks = int(num_tasks)
        self.norm = norm
        self.kernel_initializer = kernel_initializer
        self.epsilon = epsilon

    def build(self, input_shape):
        if input_shape[-2] != self.num_tasks:
            raise ValueError(f"`inputs` must have num_tasks={self.num_tasks} rows on axis -2. "
                             f"Received: inputs.shape={tuple(input_shape)}")
        dim = int(input_shape[-1])
        tasks = self.num_tasks
        init = keras.initializers.get(self.kernel_initializer)
        self.inner_kernel = self.add_weight(shape=(tasks, dim, dim), initializer=init, name="inner_kernel")
        self.inner_bias = self.add_weight(shape=(tasks, dim), initializer="zeros", name="inner_bias")
        self.outer_kernel = self.add_weight(shape=(tasks, dim, dim), initializer=init, name="outer_kernel")
        self.outer_bias = self.add_weight(shape=(tasks, dim), initializer="zeros", name="outer_bias")
        self.gamma = self.add_weight(shape=(tasks, dim), initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=(tasks, dim), initializer="zeros", name="beta")

    def _layer_norm(self, x):
        """Layer norm over dim, statistics in float32 (mixed precision), per-task scale and shift."""
        x32 = ops.cast(x, "float32")
        mean = ops.mean(x32, axis=-1, keepdims=True)  # (..., tasks, 1)
        variance = ops.mean(ops.square(x32 - mean), axis=-1, keepdims=True)  # (..., tasks, 1)
        normed = (x32 - mean) * ops.rsqrt(variance + self.epsilon)
        return ops.cast(normed * ops.cast(self.gamma, "float32") + ops.cast(self.beta, "float32"), x.dtype)

    def call(self, inputs):
        dtype = inputs.dtype
        cast = lambda w: ops.cast(w, dtype)  # noqa: E731
        ffn_input = self._layer_norm(inputs) if self.norm == "pre" else inputs
        hidden = ops.einsum("...tr,trs->...ts", ffn_input, cast(self.inner_kernel)) + cast(self.inner_bias)
        hidden = keras.activations.gelu(hidden, approximate=False)  # (..., tasks, dim)
        x = inputs + ops.einsum("...tr,trs->...ts", hidden, cast(self.outer_kernel)) + cast(self.outer_bias)
        return x if self.norm == "pre" else self._layer_norm(x)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(num_tasks=self.num_tasks, kernel_initializer=self.kernel_initializer, epsilon=self.epsilon,
                      norm=self.norm)
        return config
