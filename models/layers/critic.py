"""Domain critic for adversarial alignment of user representations across D domains.

RecGURU (Li et al., WSDM 2022) trains a domain discriminator f against the shared encoder so that
user representations of different domains become indistinguishable (eq. 8, 13), and implements it
as an improved Wasserstein GAN critic with a gradient penalty (sec. 4.2, supplement 6.1.3;
Gulrajani et al. 2017). The paper has two domains; for D >= 2 this module uses one critic head per
domain and one-vs-rest Wasserstein estimates (see `one_vs_rest_wasserstein`).

Only the pieces that are plain tensor algebra live here (backend-agnostic `keras.ops`); taking the
gradient of the critic with respect to its input for the penalty is the caller's job (RecGURU does
it with `tf.GradientTape` in its TensorFlow train step).
"""

import keras
from keras import ops

from models.layers.mlp import MLP


@keras.saving.register_keras_serializable(package="xdctr")
class DomainCritic(keras.layers.Layer):
    """f(h) = W_o MLP(h): one unbounded critic score per domain.

    RecGURU supplement 6.1.1: "four fully connected layers" with middle width twice the latent
    size; here `hidden_units` hidden layers plus the linear output layer. The hidden activation is
    leaky ReLU (the paper does not say; it keeps every unit's gradient alive, which the
    input-gradient penalty needs). The output layer has no bias: a constant added to a head
    cancels in every Wasserstein estimate and in the penalty, so it would never be trained.

    Args:
      num_domains: D, the number of heads; at least 2.
      hidden_units: hidden layer sizes, non-empty, positive.
      activation: hidden activation.
      kernel_initializer: initializer of every kernel.

    Call args:
      inputs: (batch, ..., dim) user representations.
    Returns:
      (batch, ..., D) scores: [..., k] is head k's score f_k.
    """

    def __init__(self, num_domains, hidden_units=(64, 64, 64), activation="leaky_relu",
                 kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        if num_domains < 2:
            raise ValueError(f"`num_domains` must be at least 2. Received: num_domains={num_domains}")
        self.num_domains = num_domains
        self.hidden_units = tuple(int(u) for u in hidden_units)
        self.activation = activation
        self.kernel_initializer = kernel_initializer
        self.mlp = MLP(self.hidden_units, activation=activation, kernel_initializer=kernel_initializer, name="mlp")
        self.head = keras.layers.Dense(num_domains, use_bias=False, kernel_initializer=kernel_initializer, name="head")

    def build(self, input_shape):
        self.mlp.build(input_shape)
        self.head.build(self.mlp.compute_output_shape(input_shape))

    def call(self, inputs):
        return self.head(self.mlp(inputs))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.num_domains,)

    def get_config(self):
        config = super().get_config()
        config.update(num_domains=self.num_domains, hidden_units=list(self.hidden_units), activation=self.activation,
                      kernel_initializer=self.kernel_initializer)
        return config


def one_vs_rest_wasserstein(scores, present):
    """Mean over domains k of W_k = E[f_k(h) | h from domain k] - E[f_k(h) | h from another domain].

    Each expectation is the mean over the present representations of the batch. A domain with no
    present representation on either side in the batch is left out of the mean (0 when none is
    left). For D = 2 the two heads act as one critic f_0 - f_1 between the two domains (the paper's
    setting).

    Args:
      scores: (batch, D, D) float; scores[b, j, k] = f_k(h[b, j]), head k on row b's domain-j
        representation.
      present: (batch, D) bool; True where row b has a representation in domain j.
    Returns:
      scalar float32: the critic maximises it, the encoder minimises it.
    """
    scores = ops.cast(scores, "float32")
    num_domains = scores.shape[-1]
    weights = ops.cast(present, "float32")  # (batch, D)
    eye = ops.eye(num_domains, dtype="float32")  # (D, D)
    own = ops.sum(scores * eye, axis=-1)  # (batch, D): f_k(h[b, k])
    own_count = ops.sum(weights, axis=0)  # (D,)
    inside = ops.sum(weights * own, axis=0) / ops.maximum(own_count, 1.0)  # (D,)
    rest = ops.expand_dims(weights, -1) * (1.0 - eye)  # (batch, D, D): row b's domain j != head k, present
    rest_count = ops.sum(rest, axis=(0, 1))  # (D,)
    outside = ops.sum(rest * scores, axis=(0, 1)) / ops.maximum(rest_count, 1.0)  # (D,)
    valid = ops.cast(ops.logical_and(own_count > 0, rest_count > 0), "float32")  # (D,)
    return ops.sum(valid * (inside - outside)) / ops.maximum(ops.sum(valid), 1.0)


def cross_domain_interpolates(representations, present, seed_generator):
    """Random points between representations of different domains, for the gradient penalty.

    Position (b, k) pairs h[b, k] with h[b', j], where b' = (b + s) mod batch for one random shift
    s in [1, batch) per call (the row itself when batch = 1) and j != k is a random other domain
    per position; x = eps h[b, k] + (1 - eps) h[b', j] with eps ~ U(0, 1) per position. The pair
    is valid when both representations are present. Head k's gradient at x[b, k] is the one to
    penalise (the line runs from domain k to another domain, as WGAN-GP's lines run between the
    two distributions).

    Args:
      representations: (batch, D, dim) float.
      present: (batch, D) bool.
      seed_generator: a `keras.random.SeedGenerator`.
    Returns:
      (interpolates (batch, D, dim), valid (batch, D) bool).
    """
    num_domains = representations.shape[1]
    batch = ops.shape(representations)[0]
    present = ops.cast(present, "bool")
    draws = keras.random.uniform(ops.shape(ops.cast(present, "float32")), seed=seed_generator)  # (batch, D)
    # A shift in [1, batch - 1]: floor(u (batch - 1)) + 1, with u taken from the first draw.
    batch_f = ops.cast(batch, "float32")
    shift = ops.cast(ops.floor(draws[0, 0] * (batch_f - 1.0)), "int32") + 1
    rows = ops.mod(ops.arange(batch, dtype="int32") + shift, ops.cast(batch, "int32"))  # (batch,)
    partner_rows = ops.take(representations, rows, axis=0)  # (batch, D, dim)
    partner_present = ops.take(ops.cast(present, "float32"), rows, axis=0)  # (batch, D)
    offsets = ops.minimum(ops.cast(ops.floor(draws * (num_domains - 1)), "int32"), num_domains - 2) + 1  # (batch, D)
    other = ops.mod(ops.arange(num_domains, dtype="int32") + offsets, num_domains)  # (batch, D): j != k
    choose = ops.one_hot(other, num_domains, dtype=representations.dtype)  # (batch, D, D): [b, k, j]
    partners = ops.einsum("bkj,bjd->bkd", choose, partner_rows)  # (batch, D, dim)
    partner_ok = ops.sum(ops.cast(choose, "float32") * ops.expand_dims(partner_present, 1), axis=-1) > 0  # (batch, D)
    eps = keras.random.uniform(ops.shape(ops.cast(present, "float32")), seed=seed_generator)  # (batch, D)
    eps = ops.cast(ops.expand_dims(eps, -1), representations.dtype)  # (batch, D, 1)
    interpolates = eps * representations + (1.0 - eps) * partners
    return interpolates, ops.logical_and(present, partner_ok)


def gradient_penalty(gradients, valid):
    """WGAN-GP penalty: mean over valid positions of (||g||_2 - 1)^2.

    Args:
      gradients: (batch, D, dim) float, head k's input gradient at interpolate [b, k].
      valid: (batch, D) bool.
    Returns:
      scalar float32 (0 when nothing is valid).
    """
    gradients = ops.cast(gradients, "float32")
    norms = ops.sqrt(ops.sum(ops.square(gradients), axis=-1) + 1e-12)  # (batch, D); finite gradient at 0
    weights = ops.cast(valid, "float32")
    return ops.sum(weights * ops.square(norms - 1.0)) / ops.maximum(ops.sum(weights), 1.0)
