"""`CTRModel`: the interface every xdctr model implements.

A CTR model splits its work in two, so that the export's `score_candidates` signature can run
the candidate-independent part (sequence encoders) once per request and only the rest per
candidate:

    context = model.encode_context(inputs)            # dict of (batch, ...) tensors
    logits = model.score(context, item, domain)       # (batch,)

`call()` composes the two and returns what is served: `{SERVING_OUTPUT: ctr}` plus any named
outputs a model wants to expose. Training losses beyond the CTR log loss (regularisers,
auxiliary objectives) live in `auxiliary_losses()`, outside `call()`; the training task adds them.

Two training objectives (`TrainingConfig.objective`, set by the Trainer):
  pointwise: the compiled log loss of each row's label (the CTR task; the default).
  sampled_softmax: a ranking objective for next-item protocols. Each click row's candidate is
    contrasted with `negatives` items drawn uniformly, with replacement, from the distinct train
    items of the row's domain (`set_ranking_objective`); the loss is the softmax cross-entropy
    of the click against them. The context is encoded once per row and `score` runs on the
    negatives with it, so any model built on `encode_context`/`score` supports it. A sampled
    item equal to the click is not a negative (its logit is masked). The served output stays
    sigmoid(logit): a ranking score, not a calibrated click probability, under this objective.
  full_softmax: the same loss with every distinct train item of the click's domain as a negative
    (no sampling: the exact softmax over the domain's catalogue, as the leave-one-out protocol's
    ranking is within the domain). Scoring every row against ~10^4 items through `score` would
    repeat the context per item, so only models with a batched scorer (`score_items`, e.g. a dot
    product with an item table: one matrix product per batch) support it; the others refuse it.
"""

from __future__ import annotations

from collections.abc import Mapping

import keras
from keras import ops

from models.config import InputConfig
from xdctr import features as F


DEFAULT_PHASE = "ctr"
RANKING_LOGITS = "ranking_logits"  # training output under the sampled-softmax objective: (B, 1 + negatives)
_MASKED_LOGIT = -1e9


def _num_replicas() -> int:
    """Replicas of the TensorFlow distribution strategy (1 on other backends)."""
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync


class _RankingSampler:
    """Uniform negatives per domain from a flat table of item indices (not a Keras layer: its
    tables are not weights and are not saved)."""

    def __init__(self, domain_items, negatives: int, seed: int):
        if negatives <= 0:
            raise ValueError(f"`negatives` must be positive. Received: negatives={negatives}")
        counts = [len(items) for items in domain_items]
        if not any(counts):
            raise ValueError("the sampled-softmax objective needs items in at least one domain; every domain is empty")
        flat = [int(i) for items in domain_items for i in items]
        offsets = [sum(counts[:d]) for d in range(len(counts))]
        self.negatives = int(negatives)
        self.items = ops.convert_to_tensor(flat, dtype="int32")  # (sum of counts,)
        self.offsets = ops.convert_to_tensor(offsets, dtype="int32")  # (D,)
        self.counts = ops.convert_to_tensor(counts, dtype="int32")  # (D,)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def sample(self, domain):
        """(B,) domain indices -> ((B, N) item indices, (B,) bool: the domain has items)."""
        domain = ops.cast(domain, "int32")
        counts = ops.take(self.counts, domain)  # (B,)
        draws = keras.random.uniform((ops.shape(domain)[0], self.negatives), seed=self.seed_generator)
        index = ops.cast(ops.floor(draws * ops.cast(ops.expand_dims(counts, -1), "float32")), "int32")
        index = ops.minimum(index, ops.maximum(ops.expand_dims(counts, -1) - 1, 0))  # draws of exactly 1.0
        flat = ops.expand_dims(ops.take(self.offsets, domain), -1) + index  # (B, N)
        return ops.take(self.items, ops.minimum(flat, ops.shape(self.items)[0] - 1)), counts > 0


class _DomainCatalogue:
    """Every item of every domain, flat, with each item's domain index (for the full softmax)."""

    def __init__(self, domain_items):
        counts = [len(items) for items in domain_items]
        if not any(counts):
            raise ValueError("the full-softmax objective needs items in at least one domain; every domain is empty")
        self.items = ops.convert_to_tensor([int(i) for items in domain_items for i in items], dtype="int32")  # (V,)
        self.domains = ops.convert_to_tensor([d for d, n in enumerate(counts) for _ in range(n)], dtype="int32")  # (V,)


def dummy_inputs(input_config: InputConfig, batch: int = 1) -> dict:
    """All-padding model inputs of the right shapes, to build a model's weights."""
    length, num_domains, ld = input_config.history_length, input_config.num_domains, input_config.domain_history_length
    zeros = lambda *shape: ops.zeros((batch,) + shape, dtype="int32")  # noqa: E731
    return {
        F.USER_ID: zeros(), F.ITEM_ID: zeros(), F.DOMAIN: zeros(),
        F.HISTORY_ITEM_IDS: zeros(length), F.HISTORY_DOMAINS: zeros(length),
        F.HISTORY_MASK: ops.zeros((batch, length), dtype="bool"), F.HISTORY_TIME_GAPS: zeros(length),
        F.DOMAIN_HISTORY_ITEM_IDS: zeros(num_domains, ld),
        F.DOMAIN_HISTORY_MASK: ops.zeros((batch, num_domains, ld), dtype="bool"),
        F.TARGET_DOMAIN_CLICKS: zeros(), F.OTHER_DOMAIN_CLICKS: zeros(),
    }


class CTRModel(keras.Model):
    """Base class: subclasses implement `encode_context` and `score`.

    Inputs (dict, after `components/trainer/preprocess.py`), with B = batch, L = history
    length, D = number of domains, Ld = per-domain history length:
      USER_ID (B,) int; ITEM_ID (B,) int; DOMAIN (B,) int in [0, D);
      HISTORY_ITEM_IDS (B, L) int; HISTORY_DOMAINS (B, L) int; HISTORY_MASK (B, L) bool;
      HISTORY_TIME_GAPS (B, L) int; DOMAIN_HISTORY_ITEM_IDS (B, D, Ld) int;
      DOMAIN_HISTORY_MASK (B, D, Ld) bool; TARGET_DOMAIN_CLICKS, OTHER_DOMAIN_CLICKS (B,) int.
    Outputs:
      {SERVING_OUTPUT: (B,) float32 in (0, 1), ...}.
    """

    phase = DEFAULT_PHASE
    supports_ranking_objective = True  # False for models whose own objective replaces the CTR loss
    _ranking = None

    @property
    def supports_full_softmax(self) -> bool:
        """Whether the model has a batched scorer (`score_items` overridden) for the full softmax."""
        return self.supports_ranking_objective and type(self).score_items is not CTRModel.score_items

    def set_ranking_objective(self, domain_items, negatives: int = None, seed: int = 0) -> None:
        """Trains with a ranking objective (module docstring) until `clear_ranking_objective`:
        the sampled softmax over `negatives` uniform items of the click's domain, or with
        `negatives=None` the full softmax over all of `domain_items` of the click's domain.

        `domain_items`: one sequence of item indices (hashed, as the model sees them) per domain,
        in the config's domain order: the items negatives are drawn from.
        """
        if not self.supports_ranking_objective:
            raise ValueError(f"{type(self).__name__} trains its own objective; the ranking objectives are not "
                             "available for it (use objective=pointwise)")
        if negatives is None and not self.supports_full_softmax:
            raise ValueError(f"{type(self).__name__} has no batched scorer (`score_items`) for the full-softmax "
                             "objective: scoring every item through `score` would repeat each row's context per item "
                             "(use objective=sampled_softmax)")
        if len(domain_items) != self.config.inputs.num_domains:
            raise ValueError(f"`domain_items` must have one entry per domain ({self.config.inputs.num_domains}). "
                             f"Received: {len(domain_items)}")
        self.clear_ranking_objective()
        self._ranking = _DomainCatalogue(domain_items) if negatives is None else _RankingSampler(domain_items, negatives,
                                                                                                 seed)
        if isinstance(self._ranking, _RankingSampler):
            self._track_state(self._ranking.seed_generator)
        self.train_function = self.test_function = None  # the steps change: make `fit` retrace them

    def _track_state(self, seed_generator, track: bool = True) -> None:
        """Adds (or removes) the sampler's seed generator to the model's non-trainable state.

        Keras's JAX trainer runs stateless steps over the model's tracked variables only: an
        untracked generator's state would be read as a constant and its advance dropped, so every
        step would draw the same negatives. Tracking it makes the state advance on every backend.
        The model is built (its tracker locked) by now, hence the unlock."""
        locked = self._tracker.locked
        self._tracker.unlock()
        try:
            if track:
                self._tracker.track(seed_generator)
            else:
                self._tracker.untrack(seed_generator)
        finally:
            if locked:
                self._tracker.lock()

    def clear_ranking_objective(self) -> None:
        """Back to the pointwise objective (before export: the served graph has no sampler)."""
        if isinstance(self._ranking, _RankingSampler):
            self._track_state(self._ranking.seed_generator, track=False)
        self._ranking = None
        self.train_function = self.test_function = self.predict_function = None

    def ranking_logits(self, context: dict, logits, inputs, training=False):
        """(B, 1 + N) logits: each row's candidate first, then N sampled items of its domain.

        The context is repeated N times per row (row-major, matching the (B, N) negatives).
        Negatives equal to the candidate, and all of them for a domain without items, get
        `_MASKED_LOGIT`. Under the full softmax N is the whole catalogue (V items, every
        domain), scored once per batch by `score_items`; items of other domains and the candidate
        itself get `_MASKED_LOGIT`.
        """
        sampler = self._ranking
        item, domain = inputs[F.ITEM_ID], ops.cast(inputs[F.DOMAIN], "int32")
        if isinstance(sampler, _DomainCatalogue):
            all_logits = ops.cast(self.score_items(context, sampler.items, sampler.domains, training=training), "float32")  # (B, V)
            real = ops.logical_and(ops.expand_dims(sampler.domains, 0) == ops.expand_dims(domain, -1),
                                   ops.expand_dims(sampler.items, 0) != ops.expand_dims(ops.cast(item, "int32"), -1))
            all_logits = ops.where(real, all_logits, _MASKED_LOGIT)
            return ops.concatenate([ops.expand_dims(ops.cast(logits, "float32"), -1), all_logits], axis=-1)
        negatives, present = sampler.sample(domain)  # (B, N), (B,)
        n = sampler.negatives
        tiled = {name: ops.repeat(value, n, axis=0) for name, value in context.items()}
        negative_logits = self.score(tiled, ops.reshape(negatives, (-1,)), ops.repeat(domain, n, axis=0),
                                     training=training)
        negative_logits = ops.reshape(ops.cast(negative_logits, "float32"), (-1, n))  # (B, N)
        real = ops.logical_and(negatives != ops.expand_dims(ops.cast(item, "int32"), -1), ops.expand_dims(present, -1))
        negative_logits = ops.where(real, negative_logits, _MASKED_LOGIT)
        return ops.concatenate([ops.expand_dims(ops.cast(logits, "float32"), -1), negative_logits], axis=-1)

    def encode_context(self, inputs, training=False) -> dict:
        """Candidate-independent tensors of each row (user, histories); (B, ...) each."""
        raise NotImplementedError

    def score(self, context: dict, item, domain, training=False):
        """Logits (B,) of `item` (B,) in `domain` (B,) given `context` from `encode_context`."""
        raise NotImplementedError

    def score_items(self, context: dict, items, domains, training=False):
        """Logits (B, N) of every row's context against the same N `items` (N,) of `domains` (N,):
        models whose score is cheap to batch (a dot product with an item table) override this; it
        enables the full-softmax objective. Must equal `score(context, items[n], domains[n])` for
        every row and item."""
        raise NotImplementedError(f"{type(self).__name__} has no batched scorer")

    def auxiliary_losses(self, inputs, outputs, training=False) -> dict:
        """Named scalar losses added to the CTR loss during training (none by default)."""
        return {}

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        """The compiled metrics see only the served output.

        `call` may return extra named outputs while training (for a model's own losses); the
        Trainer's metrics are compiled for `SERVING_OUTPUT` alone.
        """
        if isinstance(y_pred, Mapping):
            y_pred = {F.SERVING_OUTPUT: y_pred[F.SERVING_OUTPUT]}
        return super().compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def training_phases(self) -> tuple:
        """((name, share of the training steps), ...) in the order training runs them.

        The Trainer (`components/trainer/task.py:fit`) calls `set_phase(name)` before each phase
        and runs `fit` for its share of the steps; early stopping and validation apply to the last
        phase. Most models have one phase; multi-stage schemes (e.g. RecGURU's Algorithm 1)
        override this and read `self.phase` in `train_step`/`compute_loss`.
        """
        return ((DEFAULT_PHASE, 1.0),)

    def set_phase(self, name: str) -> None:
        """Switches to training phase `name`; the next `fit` traces a new train step."""
        known = [phase for phase, _ in self.training_phases()]
        if name not in known:
            raise ValueError(f"unknown training phase `{name}` for {type(self).__name__}; known: {known}")
        self.phase = name
        self.train_function = None  # the step may depend on the phase: make `fit` rebuild it

    def call(self, inputs, training=False):
        context = self.encode_context(inputs, training=training)
        logits = self.score(context, inputs[F.ITEM_ID], inputs[F.DOMAIN], training=training)
        outputs = {F.SERVING_OUTPUT: ops.sigmoid(ops.cast(logits, "float32"))}
        if self._ranking is not None:
            outputs[RANKING_LOGITS] = self.ranking_logits(context, logits, inputs, training=training)
        return outputs

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The compiled CTR loss plus `auxiliary_losses` (Keras calls this in `fit`).

        Under the sampled-softmax objective (`RANKING_LOGITS` in the outputs) the first term is
        instead the mean over click rows of -log softmax(ranking logits)[0]; rows labelled 0 add
        nothing (the Trainer feeds only clicks then).
        """
        if isinstance(y_pred, Mapping) and RANKING_LOGITS in y_pred:
            labels = y[F.SERVING_OUTPUT] if isinstance(y, Mapping) else y
            loss = sampled_softmax_loss(y_pred[RANKING_LOGITS], labels) / _num_replicas()
        else:
            loss = super().compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training)
        for value in self.auxiliary_losses(x, y_pred, training=training).values():
            loss = loss + ops.cast(value, loss.dtype)
        return loss


def sampled_softmax_loss(ranking_logits, labels):
    """Mean over rows with label 1 of -log softmax(ranking_logits)[:, 0]; 0 without such rows."""
    ranking_logits = ops.cast(ranking_logits, "float32")
    weights = ops.cast(ops.reshape(labels, (-1,)) > 0.5, "float32")  # (B,)
    per_row = ops.logsumexp(ranking_logits, axis=-1) - ranking_logits[:, 0]
    return ops.sum(weights * per_row) / ops.maximum(ops.sum(weights), 1.0)
