"""Early stopping on the validation holdout's GAUC, the number the models are judged by.

The validation loss and the eval split's GAUC can disagree on which epoch is best. On food-kitchen
(README, "The validation holdout") DACDR's seed 2's validation loss rose by 0.002 from epoch 1 to 2
and it stopped at epoch 1, while its other two seeds, at epoch 2, scored 0.03 GAUC more on the eval
split. `GAUCMonitor` scores the held-out rows (the latest rows of the train split, the same time
cut as the Trainer's validation loss, `preprocess.validation_cut`) with the served ctr after every
epoch and adds their GAUC (per-user AUC, `components.evaluation.metrics.gauc`, by the raw user
ids, not hashed ones) and AUC to the epoch's logs as `val_gauc` and `val_auc`, so that Keras'
`EarlyStopping(monitor="val_gauc", mode="max")` selects the epoch by it. Measured (README, "Early
stopping on the validation GAUC"): it picks the same epoch as the loss or a later one; DACDR's seed
2 then scores 0.5592 instead of 0.5320, and the default stays the loss.

GAUC needs rows of both labels: it is for the pointwise (CTR) objective; a ranking objective
reads click rows only and is refused.
"""

from __future__ import annotations

import logging

import keras
import numpy as np
import tensorflow as tf

from components.evaluation import metrics
from components.trainer import preprocess
from models.config import InputConfig
from xdctr import features as F

VAL_LOSS, VAL_GAUC = "val_loss", "val_gauc"
MONITORS = (VAL_LOSS, VAL_GAUC)  # what early stopping may watch; the loss is lower-is-better
VAL_AUC = "val_auc"  # logged next to val_gauc
BATCH = 4096

logger = logging.getLogger(__name__)


def check_monitor(monitor: str, objective: str = "pointwise") -> None:
    """Raises ValueError for an unknown `monitor`, or `val_gauc` under a ranking objective."""
    if monitor not in MONITORS:
        raise ValueError(f"the early-stopping monitor must be one of {MONITORS}. Received: {monitor!r}")
    if monitor == VAL_GAUC and objective != "pointwise":
        raise ValueError(f"{VAL_GAUC} needs clicks and non-clicks; the {objective!r} objective reads click rows only "
                         f"(watch {VAL_LOSS})")


def mode(monitor: str) -> str:
    """`EarlyStopping`'s mode for `monitor`: "min" for the loss, "max" for GAUC."""
    return "min" if monitor == VAL_LOSS else "max"


def holdout_dataset(files, config: InputConfig, cut: int, only_domain: str = "",
                    batch_size: int = BATCH) -> tf.data.Dataset:
    """(model inputs, labels, raw user ids) batches of the rows at or after `cut` in `files`
    (restricted to `only_domain` when given), in file order: the Trainer's validation rows."""
    return preprocess.dataset(files, config, batch_size, only_domain=only_domain, holdout="validation",
                              validation_cut_ts=cut, with_user_ids=True)


class GAUCMonitor(keras.callbacks.Callback):
    """Adds `val_gauc` and `val_auc` of the held-out rows to every epoch's logs (see the module
    docstring). Put it before the `EarlyStopping` that watches them; `history` keeps the values."""

    def __init__(self, dataset: tf.data.Dataset):
        super().__init__()
        self.dataset = dataset
        self.history: list = []

    def evaluate(self) -> dict:
        users, labels, scores = [], [], []
        for inputs, label, user in self.dataset:
            out = self.model(inputs, training=False)[F.SERVING_OUTPUT]
            scores.append(np.reshape(keras.ops.convert_to_numpy(out), -1).astype(np.float64))
            users.append(user.numpy())
            labels.append(label.numpy())
        if not scores:
            raise ValueError("the validation holdout has no rows: nothing to compute val_gauc on")
        users, labels, scores = np.concatenate(users), np.concatenate(labels), np.concatenate(scores)
        gauc, counted, skipped = metrics.gauc(users, labels, scores)
        if gauc is None:
            raise ValueError(f"no user of the validation holdout has both a click and a non-click ({len(labels)} "
                             f"rows, {skipped} users): val_gauc is undefined; watch {VAL_LOSS}")
        return {VAL_GAUC: gauc, VAL_AUC: metrics.auc(labels, scores), "users": counted, "rows": int(len(labels))}

    def on_epoch_end(self, epoch, logs=None):
        result = self.evaluate()
        self.history.append(result)
        if logs is not None:
            logs[VAL_GAUC] = result[VAL_GAUC]
            if result[VAL_AUC] is not None:
                logs[VAL_AUC] = result[VAL_AUC]
        logger.info("epoch %d: validation GAUC %.5f over %d users (%d rows), AUC %s", epoch + 1, result[VAL_GAUC],
                    result["users"], result["rows"],
                    "n/a" if result[VAL_AUC] is None else f"{result[VAL_AUC]:.5f}")
