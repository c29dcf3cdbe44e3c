"""Sampled softmax cross-entropy over a tied embedding table (RecGURU supplement 6.1.3).

The reconstruction loss -log p(v_t | v_<t, h) (RecGURU eq. 5 / 14) is a softmax over the whole
item vocabulary. With hundreds of thousands of items the paper samples `neg_softmax` negatives
and takes the softmax over the true item and the sampled ones. Here the logits are dot products
with the rows of an embedding table (the item table, tied), the negatives are drawn with
`keras.random` (backend-agnostic), and every logit is corrected by -log Q(class) (Bengio &
Senecal 2008; Jean et al. 2015), so the sampled softmax is an unbiased-in-the-limit estimate of
the full one. With `num_sampled=0` the full softmax is computed instead.

Hashed ids leave most rows of a table empty (no item hashes there), so negatives drawn over all
classes are mostly trivial; the "in_batch" sampler draws them from the call's own true classes
instead (the items that really occur), with their in-batch frequency as Q.
"""

import math

import keras
import ml_dtypes
from keras import ops

SAMPLERS = ("in_batch", "uniform", "log_uniform")


def log_uniform_log_prob(offsets, num_classes):
    """log Q(k) of the log-uniform (Zipfian) sampler over k in [0, num_classes).

    Q(k) = log((k + 2) / (k + 1)) / log(num_classes + 1): the probabilities sum to 1 (the sum
    telescopes) and fall with k, as for classes sorted by decreasing frequency.

    Args:
      offsets: int tensor of k.
      num_classes: the sampler's range.
    Returns:
      float32 tensor shaped like `offsets`.
    """
    k = ops.cast(offsets, "float32")
    return ops.log(ops.log((k + 2.0) / (k + 1.0)) / math.log(num_classes + 1.0))


@keras.saving.register_keras_serializable(package="xdctr")
class SampledSoftmaxLoss(keras.layers.Layer):
    """Per-position cross-entropy of the true class against sampled negatives or all classes.

    The classes are the rows `offset + first_class .. offset + num_classes - 1` of `table` (class
    c is row `offset + c`; classes below `first_class`, e.g. padding 0, never occur). For hidden
    state x and class embedding e_c:

        sampled (num_sampled = S > 0): S classes s_1..s_S are drawn with replacement from Q,
          shared by every position of the call; logits z_0 = x.e_y - log Q(y) for the true class y
          and z_i = x.e_{s_i} - log Q(s_i), with z_i = -inf where s_i = y (an "accidental hit"
          is not a negative); loss = -log softmax(z)_0.
        full (S = 0): loss = -log softmax(x.e_c over every class c)_y.

    Samplers: "in_batch" draws S of the call's own real (masked-in) positions uniformly and
    takes their labels, so every negative is a class that occurs in the batch and
    Q(c) = (positions labelled c) / (real positions); "uniform" (Q constant, the correction
    cancels) and "log_uniform" (Zipfian, for vocabularies indexed by decreasing frequency, not
    hashed ids) draw over all real classes.

    Args:
      num_classes: number of classes including those below `first_class`.
      num_sampled: negatives per call, >= 0; 0 (or >= the number of real classes) is the full
        softmax.
      sampler: "in_batch", "uniform" or "log_uniform".
      first_class: the smallest real class (1 when 0 is padding).
      seed: seed of the sampler (None: drawn from Keras's global seed).

    Call args:
      hidden: (batch, ..., dim) float.
      labels: (batch, ...) int classes; anything where `mask` is False.
      mask: (batch, ...) bool, True where the loss counts.
      table: (rows, dim) embedding table (a variable or tensor).
      offset: int added to every class to find its row (a Python int).
      sampled: optional (S,) int classes to use instead of drawing (tests, reuse).
    Returns:
      (batch, ...) float32 cross-entropies, 0 where `mask` is False.
    """

    def __init__(self, num_classes, num_sampled=0, sampler="uniform", first_class=1, seed=None, **kwargs):
        super().__init__(**kwargs)
        if num_sampled < 0:
            raise ValueError(f"`num_sampled` must be non-negative. Received: num_sampled={num_sampled}")
        if sampler not in SAMPLERS:
            raise ValueError(f"`sampler` must be one of {SAMPLERS}. Received: sampler={sampler!r}")
        if not 0 <= first_class < num_classes - 1:
            raise ValueError(f"`first_class` must leave at least two classes below num_classes={num_classes}. "
                             f"Received: first_class={first_class}")
        self.num_classes = num_classes
        self.num_sampled = num_sampled
        self.sampler = sampler
        self.first_class = first_class
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    @property
    def full(self):
        """True when the full softmax is computed (no sampling)."""
        return self.num_sampled == 0 or self.num_sampled >= self.num_classes - self.first_class

    def sample(self, labels=None, mask=None):
        """(num_sampled,) int32 classes drawn from Q; "in_batch" draws from `labels` where `mask`."""
        real = self.num_classes - self.first_class
        if self.sampler == "in_batch":
            labels, mask = self._batch_classes(labels, mask)  # (N,) each
            minimum = float(ml_dtypes.finfo("float32").min)
            logits = ops.where(mask, 0.0, minimum)  # (N,): uniform over the real positions
            positions = keras.random.categorical(ops.expand_dims(logits, 0), self.num_sampled, dtype="int32",
                                                 seed=self.seed_generator)[0]  # (S,)
            return ops.take(labels, positions, axis=0)
        if self.sampler == "uniform":
            k = keras.random.randint((self.num_sampled,), 0, real, seed=self.seed_generator)
        else:
            # Inverse CDF of the log-uniform sampler: k = floor(exp(u log(real + 1))) - 1.
            u = keras.random.uniform((self.num_sampled,), seed=self.seed_generator)
            k = ops.floor(ops.exp(u * math.log(real + 1.0))) - 1.0
            k = ops.clip(ops.cast(k, "int32"), 0, real - 1)
        return ops.cast(k, "int32") + self.first_class

    def _batch_classes(self, labels, mask):
        """Flat (N,) int32 labels and (N,) bool mask of a call, for the "in_batch" sampler."""
        if labels is None or mask is None:
            raise ValueError("the 'in_batch' sampler needs the call's `labels` and `mask`")
        return ops.reshape(ops.cast(labels, "int32"), (-1,)), ops.reshape(ops.cast(mask, "bool"), (-1,))

    def log_q(self, classes, labels=None, mask=None):
        """log Q(class) of the sampler, float32, shaped like `classes` ("in_batch": of `labels` where `mask`)."""
        real = self.num_classes - self.first_class
        offsets = ops.cast(classes, "int32") - self.first_class
        if self.sampler == "in_batch":
            labels, mask = self._batch_classes(labels, mask)  # (N,) each
            weights = ops.cast(mask, "float32")
            counts = ops.bincount(ops.where(mask, labels, 0), weights=weights, minlength=self.num_classes)  # (C,)
            counts = ops.take(counts, ops.cast(classes, "int32"), axis=0)  # shaped like classes
            # A class absent from the batch is never drawn; the floor of 1 keeps its log finite.
            return ops.log(ops.maximum(counts, 1.0)) - ops.log(ops.maximum(ops.sum(weights), 1.0))
        if self.sampler == "uniform":
            return ops.zeros_like(ops.cast(offsets, "float32")) - math.log(real)
        return log_uniform_log_prob(offsets, real)

    def call(self, hidden, labels, mask, table, offset=0, sampled=None):
        labels = ops.cast(labels, "int32")
        mask = ops.cast(mask, "bool")
        hidden = ops.cast(hidden, "float32")
        minimum = float(ml_dtypes.finfo("float32").min)
        if self.full and sampled is None:
            rows = ops.cast(ops.convert_to_tensor(table)[offset + self.first_class:offset + self.num_classes],
                            "float32")  # (classes, dim)
            logits = ops.matmul(hidden, ops.transpose(rows))  # (batch, ..., classes)
            target = ops.one_hot(ops.maximum(labels - self.first_class, 0), self.num_classes - self.first_class,
                                 dtype="float32")  # (batch, ..., classes)
            log_probs = ops.log_softmax(logits, axis=-1)
            loss = -ops.sum(target * log_probs, axis=-1)  # (batch, ...)
        else:
            sampled = self.sample(labels, mask) if sampled is None else ops.cast(sampled, "int32")  # (S,)
            true_embeddings = ops.cast(ops.take(table, labels + offset, axis=0), "float32")  # (batch, ..., dim)
            sampled_embeddings = ops.cast(ops.take(table, sampled + offset, axis=0), "float32")  # (S, dim)
            true_logits = ops.sum(hidden * true_embeddings, axis=-1) - self.log_q(labels, labels, mask)  # (batch, ...)
            sampled_logits = (ops.matmul(hidden, ops.transpose(sampled_embeddings))
                              - self.log_q(sampled, labels, mask))  # (batch, ..., S)
            hits = ops.equal(ops.expand_dims(labels, -1), sampled)  # (batch, ..., S): accidental hits
            sampled_logits = ops.where(hits, minimum, sampled_logits)
            logits = ops.concatenate([ops.expand_dims(true_logits, -1), sampled_logits], axis=-1)  # (batch, ..., 1+S)
            loss = -ops.log_softmax(logits, axis=-1)[..., 0]  # (batch, ...)
        return ops.where(mask, loss, ops.zeros_like(loss))

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, num_sampled=self.num_sampled, sampler=self.sampler,
                      first_class=self.first_class, seed=self.seed)
        return config
