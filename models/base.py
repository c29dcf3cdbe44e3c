"""`CTRModel`: the interface every xdctr model implements.

A CTR model splits its work in two, so that the export's `score_candidates` signature can run
the candidate-independent part (sequence encoders) once per request and only the rest per
candidate:

    context = model.encode_context(inputs)            # dict of (batch, ...) tensors
    logits = model.score(context, item, domain)       # (batch,)

`call()` composes the two and returns what is served: `{SERVING_OUTPUT: ctr}` plus any named
outputs a model wants to expose. Training losses beyond the CTR log loss (regularisers,
auxiliary objectives) live in `auxiliary_losses()`, outside `call()`; the training task adds them.
"""

from __future__ import annotations

from collections.abc import Mapping

import keras
from keras import ops

from models.config import InputConfig
from xdctr import features as F


DEFAULT_PHASE = "ctr"


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

    def encode_context(self, inputs, training=False) -> dict:
        """Candidate-independent tensors of each row (user, histories); (B, ...) each."""
        raise NotImplementedError

    def score(self, context: dict, item, domain, training=False):
        """Logits (B,) of `item` (B,) in `domain` (B,) given `context` from `encode_context`."""
        raise NotImplementedError

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
        return {F.SERVING_OUTPUT: ops.sigmoid(ops.cast(logits, "float32"))}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The compiled CTR loss plus `auxiliary_losses` (Keras calls this in `fit`)."""
        loss = super().compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training)
        for value in self.auxiliary_losses(x, y_pred, training=training).values():
            loss = loss + ops.cast(value, loss.dtype)
        return loss
