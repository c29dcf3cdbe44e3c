"""The TFX Trainer's `run_fn`: trains a registered model and exports it for serving.

`custom_config` keys: `model` (registry name), `model_config` (overrides of its config), and any
field of `TrainingConfig`. The model's inputs (domains, history lengths) come from the
ingestion's contract; the number of item hash buckets from the train split's distinct item ids
unless the config names one (`resolve_model_config`), and the resulting collisions are written
next to the model (`ITEM_HASHING_FILE`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os

import keras
import numpy as np
import tensorflow as tf

import models
import models.base
from components.ingest import beam_pipeline
from components.trainer import export, preprocess, validation
from models import config as config_lib
from xdctr import features as F


POINTWISE, SAMPLED_SOFTMAX, FULL_SOFTMAX = "pointwise", "sampled_softmax", "full_softmax"
OBJECTIVES = (POINTWISE, SAMPLED_SOFTMAX, FULL_SOFTMAX)
RANKING_OBJECTIVES = (SAMPLED_SOFTMAX, FULL_SOFTMAX)  # read click rows only


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """How a model is trained.

    Attributes:
      batch_size, learning_rate (Adam), epochs, seed.
      validation_fraction: the latest rows of the train split, held out for validation and early
        stopping (`preprocess.validation_cut`: a time cut, so that no trained-on row's history shows
        a held-out click), so the eval split stays untouched for the Evaluator.
      early_stopping_patience: epochs without a better validation loss (or GAUC) before training
        stops (the best weights are restored); 0 disables early stopping.
      early_stopping_monitor: what early stopping watches: "val_loss", or "val_gauc", the held-out
        rows' GAUC from the served ctr after every epoch (`components/trainer/validation.py`; the
        number the Evaluator blesses by; pointwise objective only).
      objective: "pointwise" (binary cross-entropy of every row's label, the CTR task) or
        "sampled_softmax" (a ranking objective for next-item protocols such as leave-one-out:
        only click rows are read, each contrasted with `ranking_negatives` items drawn uniformly
        from the train split's items of its domain; `models/base.py`). Early stopping watches
        the validation loss of the objective trained. SyNCRec and RecGURU train their own
        objectives and refuse "sampled_softmax"), or "full_softmax" (the same with every train
        item of the click's domain as a negative, no sampling; for models with a batched scorer,
        `CTRModel.score_items`: sasrec and bilinear_recency; the others refuse it).
      ranking_negatives: sampled items per click under "sampled_softmax" (unused otherwise).
      mixed_precision: train with the `mixed_float16` policy (float32 variables and outputs).
      jit_compile: compile the train step with XLA.
      refit: after early stopping has picked the best epoch on the held-out latest rows, train a
        fresh model (same seed) on every train row for that many epochs and export it. Without
        early stopping, or with one epoch (nothing to choose), the Trainer trains once, on every
        row, whatever `refit` says. False exports the early-stopped model, which
        never saw the latest `validation_fraction` of the rows: on food-kitchen that cost about
        0.03 AUC on the eval split (README, "The validation holdout").
    """

    batch_size: int = 256
    learning_rate: float = 1e-3
    epochs: int = 1
    seed: int = 0
    validation_fraction: float = 0.1
    early_stopping_patience: int = 2
    objective: str = "pointwise"
    ranking_negatives: int = 32
    mixed_precision: bool = False
    jit_compile: bool = False
    refit: bool = True
    early_stopping_monitor: str = "val_loss"

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"`objective` must be one of {OBJECTIVES}. Received: objective={self.objective!r}")
        if self.ranking_negatives <= 0:
            raise ValueError(f"`ranking_negatives` must be positive. Received: {self.ranking_negatives}")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"`validation_fraction` must be in (0, 1). Received: {self.validation_fraction}")
        validation.check_monitor(self.early_stopping_monitor, self.objective)
        for name in ("batch_size", "epochs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive. Received: {name}={getattr(self, name)}")


def _with_label_dict(inputs, label):
    return inputs, {F.SERVING_OUTPUT: label}


AUTO = "auto"
# auto: the next power of two >= 8 x the distinct items, so at most 1 - exp(-1/8) = 11.8% of the items
# share a bucket. More buckets collide less but cost train time: Adam updates every row of a table
# each step (DACDR's step took 2x as long at 2^18 buckets and 3.9x at 2^19 as at 2^15).
ITEM_BUCKET_FACTOR = 8
# vocabulary: the train split's distinct item ids are looked up (row k + 1 for the k-th), no two
# share a row, and the table has n + 1 + ceil(n / VOCABULARY_OOV_DIVISOR) rows: the last ones take
# the ids outside the vocabulary (items first seen after training), hashed, never trained.
VOCABULARY = "vocabulary"
VOCABULARY_OOV_DIVISOR = 8
COLLISION_WARNING = 0.15  # warn when clearly more of the items share a bucket than auto gives (<= 11.8% expected)
ITEM_HASHING_FILE = "item_hashing.json"


@functools.lru_cache(maxsize=4)
def _distinct_item_ids(train_files: tuple, contract: F.Contract):
    return preprocess.distinct_item_ids(train_files, contract)


def resolve_model_config(model_name: str, model_overrides: dict, contract: F.Contract, train_files=()):
    """The model's config with overrides applied and its inputs taken from the ingestion contract.

    `item_buckets` (under `inputs`, or at the top level as a shortcut: `--set item_buckets=N`) is
    kept when it is a number. When it is "auto" or absent and `train_files` are given, it is
    `preprocess.auto_item_buckets(distinct item ids of train_files, ITEM_BUCKET_FACTOR)`: about
    1 - exp(-n / B), 6-12% of the items, then share a bucket. Without `train_files` the
    `InputConfig` default applies. "vocabulary" (needs `train_files`) sets `item_vocabulary` to
    the n distinct item ids of train_files, and `item_buckets` to n + 1 + ceil(n / 8).
    """
    overrides, inputs = _split_inputs(model_overrides)
    if inputs.get("item_buckets") == VOCABULARY:
        if not train_files:
            raise ValueError("item_buckets=vocabulary needs the train split to take the item ids from")
        vocabulary = tuple(item.decode() for item in _distinct_item_ids(tuple(train_files), contract))
        inputs["item_vocabulary"] = vocabulary
        inputs["item_buckets"] = vocabulary_buckets(len(vocabulary))
    if inputs.get("item_buckets", AUTO) == AUTO:
        inputs.pop("item_buckets", None)
        if train_files:
            distinct = len(_distinct_item_ids(tuple(train_files), contract))
            inputs["item_buckets"] = preprocess.auto_item_buckets(distinct, ITEM_BUCKET_FACTOR)
    inputs.update(domains=list(contract.domains), history_length=contract.history_length,
                  domain_history_length=contract.domain_history_length)
    return models.resolve_config(model_name, {**overrides, "inputs": inputs})


def vocabulary_buckets(num_items: int) -> int:
    """Rows of an item table with a vocabulary of `num_items`: padding, the vocabulary, and
    ceil(num_items / VOCABULARY_OOV_DIVISOR) (at least 1) for the ids outside it."""
    return num_items + 1 + max(1, -(-num_items // VOCABULARY_OOV_DIVISOR))


def _split_inputs(model_overrides: dict) -> tuple:
    """(overrides without `inputs`, the `inputs` overrides with a top-level `item_buckets` moved in)."""
    overrides = dict(model_overrides or {})
    inputs = dict(overrides.pop("inputs", {}) or {})
    if "item_buckets" in overrides:
        inputs["item_buckets"] = overrides.pop("item_buckets")
    return overrides, inputs


def check_model_config(model_name: str, model_overrides: dict):
    """Raises ValueError where `resolve_model_config` would, before any data exists (the CLI's early
    check): the same `item_buckets` shortcut, "auto" and "vocabulary" are accepted."""
    overrides, inputs = _split_inputs(model_overrides)
    if inputs.get("item_buckets") in (AUTO, VOCABULARY):
        inputs.pop("item_buckets")
    models.resolve_config(model_name, {**overrides, "inputs": inputs})


def item_hashing(train_files, contract: F.Contract, input_config) -> dict:
    """`preprocess.hashing_stats` of the train split's item ids under `input_config`'s item table;
    logs a warning above COLLISION_WARNING."""
    stats = preprocess.hashing_stats(_distinct_item_ids(tuple(train_files), contract), input_config)
    buckets = input_config.item_buckets
    if stats["colliding_item_fraction"] > COLLISION_WARNING:
        suggested = preprocess.auto_item_buckets(stats["distinct_items"], ITEM_BUCKET_FACTOR)
        logging.warning("item hashing: %.1f%% of the %d distinct item ids share one of the %d buckets with another "
                        "item (%.1f%% merged away); set item_buckets=vocabulary (none share), item_buckets=auto "
                        "(%d here) or larger",
                        100 * stats["colliding_item_fraction"], stats["distinct_items"], buckets,
                        100 * stats["merged_item_fraction"], suggested)
    elif input_config.item_vocabulary:
        logging.info("item vocabulary: %d ids looked up, %d rows for other ids; of the train split's %d distinct "
                     "item ids %.1f%% share a row", len(input_config.item_vocabulary),
                     buckets - 1 - len(input_config.item_vocabulary), stats["distinct_items"],
                     100 * stats["colliding_item_fraction"])
    else:
        logging.info("item hashing: %d distinct item ids in %d buckets, %.1f%% share a bucket",
                     stats["distinct_items"], buckets, 100 * stats["colliding_item_fraction"])
    return stats


def save_item_hashing(stats: dict, model_dir: str) -> str:
    """Writes `stats` as `<model_dir>/item_hashing.json`; returns the path."""
    path = os.path.join(model_dir, ITEM_HASHING_FILE)
    tf.io.gfile.makedirs(model_dir)
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(json.dumps(stats, indent=2, sort_keys=True))
    return path


def ranking_items(train_files, contract: F.Contract, input_config) -> list:
    """Per contract domain, the distinct hashed indices of the train split's target items: the
    pool the sampled-softmax objective draws negatives from, and the full softmax's catalogue
    (hash collisions merge items)."""
    items = preprocess.domain_item_ids(tuple(train_files), contract)
    pools = []
    for domain in input_config.domains:
        ids = list(items.get(domain, ()))
        hashed = preprocess.item_indices(tf.constant(ids, tf.string), input_config).numpy() if ids else []
        pools.append(np.unique(hashed).astype(np.int32))
    return pools


def compile_model(model, training: TrainingConfig, train_files=(), contract: F.Contract = None,
                  metrics: bool = True) -> None:
    """Compiles `model` for `training.objective`; under a ranking objective also sets the model's
    sampler (or, for the full softmax, its catalogue) from `train_files` (the compiled loss is
    then unused and AUC, undefined on clicks alone, is not tracked)."""
    ranking = training.objective in RANKING_OBJECTIVES
    if ranking:
        negatives = training.ranking_negatives if training.objective == SAMPLED_SOFTMAX else None
        model.set_ranking_objective(ranking_items(train_files, contract, model.config.inputs), negatives,
                                    seed=training.seed)
    model.compile(
        optimizer=keras.optimizers.Adam(training.learning_rate),
        loss={F.SERVING_OUTPUT: keras.losses.BinaryCrossentropy()},
        metrics={F.SERVING_OUTPUT: [keras.metrics.AUC(name="auc")]} if metrics and not ranking else None,
        jit_compile=training.jit_compile,
    )


def distribution_strategy() -> tf.distribute.Strategy:
    """MirroredStrategy over all GPUs when there are several, else the default strategy."""
    gpus = tf.config.list_physical_devices("GPU")
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()


def phase_steps(phases, steps: int) -> list:
    """Splits `steps` over `phases` ((name, share), ...) by share; every phase gets at least 1."""
    total = sum(share for _, share in phases)
    if total <= 0 or any(share < 0 for _, share in phases):
        raise ValueError(f"phase shares must be non-negative with a positive sum. Received: {phases}")
    return [max(1, round(steps * share / total)) for _, share in phases]


def fit(model, train_ds, *, steps: int, epochs: int = 1, validation_data=None, validation_steps: int = 1,
        callbacks=(), final_callbacks=(), verbose=2, last_phase_epochs: int | None = None):
    """Runs the model's training phases in order; returns the last phase's `History`.

    Phases before the last run their share of `steps` as one epoch, without validation; the last
    phase runs its share over `epochs` epochs with validation and `final_callbacks` (early
    stopping). A model with one phase trains exactly as `model.fit(steps_per_epoch=steps //
    epochs)` would. `last_phase_epochs` (a refit to the best epoch) runs only that many of the
    last phase's epochs, each as long as before.
    """
    phases = model.training_phases()
    budgets = phase_steps(phases, steps)
    history = None
    for index, ((name, _), budget) in enumerate(zip(phases, budgets)):
        last = index == len(phases) - 1
        model.set_phase(name)
        if len(phases) > 1:
            logging.info("%s: training phase %d/%d `%s`, %d steps", model.name, index + 1, len(phases), name, budget)
        if last:
            history = model.fit(train_ds, epochs=last_phase_epochs or epochs, steps_per_epoch=max(1, budget // epochs),
                                validation_data=validation_data,
                                validation_steps=validation_steps if validation_data is not None else None,
                                callbacks=list(callbacks) + list(final_callbacks), verbose=verbose)
        else:
            model.fit(train_ds, epochs=1, steps_per_epoch=budget, callbacks=list(callbacks), verbose=verbose)
    return history


def _build_and_compile(model_name, model_config, training, train_files, contract):
    with distribution_strategy().scope():
        model = models.build(model_name, model_config)
        compile_model(model, training, train_files, contract)
    return model


def train_and_export(model_name: str, model_overrides: dict, contract: F.Contract, train_files, *,
                     serving_model_dir: str, log_dir: str, train_steps: int, validation_steps: int,
                     training: TrainingConfig = TrainingConfig()):
    """Trains `model_name` on gzip TFRecords and exports a SavedModel; returns the Keras model.

    `train_steps` is the total number of steps over `training.epochs` epochs; validation runs
    `validation_steps` batches of the held-out rows (the latest `training.validation_fraction`)
    after each epoch, and early stopping picks the best epoch; then, with `training.refit`, a
    fresh model trains on every row for that many epochs (see `TrainingConfig`).
    """
    keras.utils.set_random_seed(training.seed)
    if training.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model_config = resolve_model_config(model_name, model_overrides, contract, train_files=train_files)
        hashing = item_hashing(train_files, contract, model_config.inputs)
        # Single-domain baselines name the one domain they are trained and validated on.
        only_domain = getattr(model_config, "domain", "")
        data = dict(config=model_config.inputs, batch_size=training.batch_size, only_domain=only_domain,
                    repeat=True, clicks_only=training.objective in RANKING_OBJECTIVES)
        callbacks = [keras.callbacks.TensorBoard(log_dir=log_dir)]
        train_ds = lambda holdout: preprocess.dataset(train_files, shuffle=True, seed=training.seed,  # noqa: E731
                                                      holdout=holdout, **data).map(_with_label_dict)
        refit_epochs = training.epochs
        # Early stopping chooses among epochs; with one epoch there is no choice to make, and no
        # rows are held out (nor their time cut read).
        select = training.early_stopping_patience and training.epochs > 1
        if select:
            cut = preprocess.validation_cut(train_files, training.validation_fraction)
            logging.info("validation: the train rows at or after ts %d (the latest %.0f%%)", cut,
                         100 * training.validation_fraction)
            data.update(validation_cut_ts=cut)
            validation_ds = preprocess.dataset(train_files, holdout="validation", **data)
            monitor = training.early_stopping_monitor
            stopping = keras.callbacks.EarlyStopping(monitor=monitor, mode=validation.mode(monitor),
                                                     restore_best_weights=True,
                                                     patience=training.early_stopping_patience)
            # The GAUC monitor scores every held-out row, not `validation_steps` batches of them.
            monitors = [validation.GAUCMonitor(validation.holdout_dataset(train_files, model_config.inputs, cut,
                                                                          only_domain))
                        ] if monitor == validation.VAL_GAUC else []
            model = _build_and_compile(model_name, model_config, training, train_files, contract)
            fit(model, train_ds("train"), steps=train_steps, epochs=training.epochs,
                validation_data=validation_ds.map(_with_label_dict), validation_steps=max(1, validation_steps),
                callbacks=callbacks, final_callbacks=[*monitors, stopping], verbose=2)
            refit_epochs = stopping.best_epoch + 1
        if training.refit or not select:
            if select:
                logging.info("refit: a fresh %s on every train row for the best %d epoch(s)", model_name, refit_epochs)
            keras.utils.set_random_seed(training.seed)
            model = _build_and_compile(model_name, model_config, training, train_files, contract)
            fit(model, train_ds("all"), steps=train_steps, epochs=training.epochs, last_phase_epochs=refit_epochs,
                callbacks=callbacks, verbose=2)
        model.clear_ranking_objective()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    export.export(model, model_config.inputs, serving_model_dir)
    # A few real requests that the scoring service replays at load, before taking traffic.
    warmup = [r.numpy() for r in tf.data.TFRecordDataset(train_files[:1], compression_type="GZIP").take(WARMUP_EXAMPLES)]
    export.write_warmup_requests(serving_model_dir, model_name, warmup)
    config_lib.save(model_config, model_name, serving_model_dir)
    save_item_hashing(hashing, serving_model_dir)
    save_keras_weights(model, serving_model_dir)
    logging.info("exported %s to %s", model_name, serving_model_dir)
    return model


WARMUP_EXAMPLES = 8
KERAS_WEIGHTS = "keras/model.weights.h5"  # next to the SavedModel, for fine-tuning


def save_keras_weights(model, model_dir: str) -> str:
    """Writes the Keras weights under `model_dir` (any filesystem tf.io.gfile reaches)."""
    import tempfile

    path = os.path.join(model_dir, KERAS_WEIGHTS)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(KERAS_WEIGHTS))
        model.save_weights(local)
        tf.io.gfile.makedirs(os.path.dirname(path))
        tf.io.gfile.copy(local, path, overwrite=True)
    return path


def load_trained_model(model_dir: str):
    """(model name, config, Keras model with its trained weights) from an exported model dir."""
    import tempfile

    with tf.io.gfile.GFile(os.path.join(model_dir, config_lib.CONFIG_FILE)) as f:
        saved = json.load(f)
    config = models.resolve_config(saved["model"], saved["config"])
    model = models.build(saved["model"], config)
    model(models.base.dummy_inputs(config.inputs), training=False)  # create the weights
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(KERAS_WEIGHTS))
        tf.io.gfile.copy(os.path.join(model_dir, KERAS_WEIGHTS), local)
        model.load_weights(local)
    return saved["model"], config, model


def _glob(patterns):
    """fn_args' split patterns (e.g. `<uri>/Split-train/*`) -> sorted file list."""
    return sorted(f for pattern in patterns for f in tf.io.gfile.glob(pattern))


def run_fn(fn_args):
    """Entry point of `tfx.components.Trainer(run_fn=...)`."""
    custom = dict(fn_args.custom_config or {})
    if "model" not in custom:
        raise ValueError("Trainer custom_config must name a `model`; known: " + ", ".join(models.names()))
    model_name = custom.pop("model")
    model_overrides = custom.pop("model_config", {}) or {}
    training = config_lib.override(TrainingConfig(), custom)
    train_files = _glob(fn_args.train_files)
    if not train_files:
        raise ValueError(f"no training files match {fn_args.train_files}")
    # <examples uri>/Split-train/<file>: the ingestion's summary sits at the examples uri.
    contract = beam_pipeline.read_contract(os.path.dirname(os.path.dirname(train_files[0])))
    train_and_export(model_name, model_overrides, contract, train_files, serving_model_dir=fn_args.serving_model_dir,
                     log_dir=fn_args.model_run_dir, train_steps=fn_args.train_steps, validation_steps=fn_args.eval_steps,
                     training=training)
