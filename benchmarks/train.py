"""`xdctr benchmark train`: training speed and quality of every registered model, over seeds.

One generated log (planted cross-domain structure, cold-start users; its data seed fixed by
`data_seed`) is ingested once, or an ingestion output is given (`examples`). Each model is trained
for each training seed the way the Trainer's `run_fn` trains it (`components/trainer/task.py`):
the latest `validation_fraction` of the train split's rows (the Trainer's time cut,
`preprocess.validation_cut`) is held out, `task.fit` runs the model's phases with validation
after every epoch of the last one, and Keras' `EarlyStopping` on the validation loss (`patience`
epochs) picks the best epoch, up to `epochs`; then, by default, a fresh model with the same seed
trains that many epochs on every train row (`refit`). The eval split is only scored at the end.

examples/s is steady-state training throughput: train steps after `warmup` steps, timed from the
start to the end of each step (validation excluded), times the rows a step trains on (the batch
size times 1 - `validation_fraction`, since the holdout is filtered out of each batch).

Quality on the eval split: AUC, GAUC, per domain, and for cold-start rows (no earlier click in the
target domain, some elsewhere), next to the AUC of the true click probability (the oracle, the
ceiling) on generated logs. Prints one line per run and a table of mean ± sample std over seeds
per model; writes JSON with every run (its `seed`, best epoch and validation losses) and the
per-model summary.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import List, Sequence

import keras
import numpy as np
import tensorflow as tf

import models
from components.evaluation import metrics
from components.ingest import beam_pipeline, generator
from components.trainer import preprocess, task, validation as holdout
from xdctr import features as F

VALIDATION_BATCH = 4096
logger = logging.getLogger(__name__)


class _StepTimer(keras.callbacks.Callback):
    """Seconds spent inside train steps after the first `warmup` of them (validation excluded)."""

    def __init__(self, warmup: int):
        super().__init__()
        self.warmup, self.step, self.timed_steps, self.elapsed, self._began = warmup, 0, 0, 0.0, None

    def on_train_batch_begin(self, batch, logs=None):
        self._began = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step > self.warmup and self._began is not None:
            self.elapsed += time.perf_counter() - self._began
            self.timed_steps += 1

    def seconds(self):
        return self.elapsed if self.timed_steps else float("nan")


class _EpochLog(keras.callbacks.Callback):
    """Logs each epoch's losses and time (progress of long runs)."""

    def __init__(self, label: str):
        super().__init__()
        self.label, self._began = label, None

    def on_epoch_begin(self, epoch, logs=None):
        self._began = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        validation = f", val_loss {logs['val_loss']:.5f}" if "val_loss" in logs else ""  # none in a refit
        if holdout.VAL_GAUC in logs:
            validation += f", val_gauc {logs[holdout.VAL_GAUC]:.5f}"
        logger.info("%s: epoch %d: loss %.5f%s, %.0f s", self.label, epoch + 1, logs.get("loss", float("nan")),
                    validation, time.monotonic() - (self._began or time.monotonic()))


def prepare_data(workdir: str, users: int, seed: int) -> str:
    examples = os.path.join(workdir, f"examples-{users}-{seed}")
    if not os.path.exists(os.path.join(examples, beam_pipeline.SUMMARY_FILE)):
        os.makedirs(workdir, exist_ok=True)
        log = os.path.join(workdir, f"logs-{users}-{seed}.jsonl.gz")
        generator.generate_file(generator.GeneratorConfig(num_users=users, seed=seed), log)
        beam_pipeline.run(beam_pipeline.IngestConfig(input_patterns=(log,)), examples)
    return examples


def _eval_rows(pattern: str) -> dict:
    spec = {F.USER_ID: tf.io.FixedLenFeature([], tf.string), F.DOMAIN: tf.io.FixedLenFeature([], tf.string),
            F.LABEL: tf.io.FixedLenFeature([], tf.int64),
            F.TARGET_DOMAIN_CLICKS: tf.io.FixedLenFeature([], tf.int64),
            F.OTHER_DOMAIN_CLICKS: tf.io.FixedLenFeature([], tf.int64),
            F.ORACLE_CTR: tf.io.FixedLenFeature([], tf.float32, default_value=-1.0)}
    ds = tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(pattern)), compression_type="GZIP").batch(4096)
    parts = [tf.io.parse_example(batch, spec) for batch in ds]
    return {k: np.concatenate([p[k].numpy() for p in parts]) for k in spec}


def _quality(rows: dict, scores: np.ndarray, domains) -> dict:
    users, labels = rows[F.USER_ID], rows[F.LABEL]
    cold = (rows[F.TARGET_DOMAIN_CLICKS] == 0) & (rows[F.OTHER_DOMAIN_CLICKS] > 0)
    result = {"overall": metrics.summary(users, labels, scores)}
    for domain in domains:
        mask = rows[F.DOMAIN] == domain.encode()
        result[f"domain={domain}"] = metrics.summary(users[mask], labels[mask], scores[mask])
    result["cold_start"] = metrics.summary(users[cold], labels[cold], scores[cold])
    return result


def _with_label_dict(inputs, label):
    return inputs, {F.SERVING_OUTPUT: label}


def train_model(name: str, overrides: dict, contract: F.Contract, train_files: Sequence[str], train_rows: int, *,
                seed: int, epochs: int, batch_size: int = 256, patience: int = 1, validation_fraction: float = 0.1,
                learning_rate: float = 1e-3, callbacks=(), objective: str = task.POINTWISE,
                ranking_negatives: int = task.TrainingConfig.ranking_negatives, monitor: str = "val_loss",
                callbacks_for=None, refit: bool = True) -> tuple:
    """Trains registered model `name` as the Trainer does, with early stopping on the holdout.

    `train_rows` is the number of rows in `train_files` (one epoch = train_rows // batch_size
    steps, so an epoch passes once over the non-held-out rows). Returns (model, its config,
    {"epochs_run", "best_epoch", "val_loss", "item_hashing"}). Item buckets are sized from
    `train_files` as the Trainer sizes them (`task.resolve_model_config`) unless `overrides` name a
    number; "item_hashing" holds `task.item_hashing`'s collision stats for the size used.
    `objective` and `ranking_negatives` as in `task.TrainingConfig`; under a ranking objective
    ("sampled_softmax", "full_softmax") only click rows are read, and an epoch passes once over
    the clicks (counted here). Early stopping watches `monitor`: "val_loss" (lower is better),
    "val_gauc" (the holdout's GAUC, `components/trainer/validation.py`, pointwise objective only), or
    a higher-is-better quantity a callback adds to the epoch logs (e.g.
    `ranking.validation_ranking_callback`'s); `callbacks_for(model, config)` builds such
    callbacks once the model exists (they run before early stopping). "best_epoch" is the epoch
    of the best `monitor` ("monitored" lists its values). With `refit` (the Trainer's default) the
    returned model is a fresh one, same seed, trained on every train row for the best epoch's number
    of epochs ("refit_epochs"); `callbacks` and `callbacks_for` watch only the first run.
    """
    training = task.TrainingConfig(batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                                   validation_fraction=validation_fraction, objective=objective,
                                   ranking_negatives=ranking_negatives)
    ranking = objective in task.RANKING_OBJECTIVES
    if monitor in holdout.MONITORS:
        holdout.check_monitor(monitor, objective)
    keras.utils.set_random_seed(seed)
    config = task.resolve_model_config(name, overrides, contract, train_files=train_files)
    hashing = task.item_hashing(train_files, contract, config.inputs)
    cut = preprocess.validation_cut(train_files, validation_fraction)
    data = dict(config=config.inputs, only_domain=getattr(config, "domain", ""), validation_cut_ts=cut,
                clicks_only=ranking)
    train = preprocess.dataset(train_files, batch_size=batch_size, shuffle=True, seed=seed, holdout="train",
                               repeat=True, **data)
    # Not repeated, validation_steps None: every epoch's validation loss is over the whole holdout once.
    validation = preprocess.dataset(train_files, batch_size=VALIDATION_BATCH, holdout="validation", **data)
    model = models.build(name, config)
    task.compile_model(model, training, train_files, contract, metrics=False)
    lower = monitor == "val_loss"
    stopping = keras.callbacks.EarlyStopping(monitor=monitor, mode="min" if lower else "max", patience=patience,
                                             restore_best_weights=True)
    callbacks = list(callbacks) + (list(callbacks_for(model, config)) if callbacks_for else [])
    # The GAUC monitor runs in the last phase only, as validation does, and before early stopping.
    monitors = [holdout.GAUCMonitor(holdout.holdout_dataset(train_files, config.inputs, cut, data["only_domain"],
                                                            VALIDATION_BATCH))] if monitor == holdout.VAL_GAUC else []
    if ranking:
        train_rows = preprocess.count_clicks(train_files)
    steps_per_epoch = max(1, train_rows // batch_size)
    history = task.fit(model, train.map(_with_label_dict), steps=steps_per_epoch * epochs, epochs=epochs,
                       validation_data=validation.map(_with_label_dict),
                       validation_steps=None,
                       callbacks=list(callbacks),
                       final_callbacks=[*monitors, stopping, _EpochLog(f"{name} seed {seed}")],
                       verbose=0)
    val_loss = [float(v) for v in history.history.get("val_loss", [])]
    watched = [float(v) for v in history.history.get(monitor, [])]
    best = (int(np.argmin(watched)) if lower else int(np.argmax(watched))) + 1 if watched else None
    info = {"epochs_run": len(val_loss), "best_epoch": best, "val_loss": [round(v, 6) for v in val_loss],
            "item_hashing": hashing, "objective": objective, "validation_cut_ts": cut}
    if refit and best:
        keras.utils.set_random_seed(seed)
        model = models.build(name, config)
        task.compile_model(model, training, train_files, contract, metrics=False)
        everything = preprocess.dataset(train_files, batch_size=batch_size, shuffle=True, seed=seed, holdout="all",
                                        repeat=True, **data)
        task.fit(model, everything.map(_with_label_dict), steps=steps_per_epoch * epochs, epochs=epochs,
                 last_phase_epochs=best, final_callbacks=[_EpochLog(f"{name} seed {seed} refit")], verbose=0)
        info["refit_epochs"] = best
    model.clear_ranking_objective()
    if not lower:
        info.update(monitor=monitor, monitored=[round(v, 6) for v in watched])
    if ranking:
        info.update(train_clicks=train_rows)
    if objective == task.SAMPLED_SOFTMAX:
        info.update(ranking_negatives=ranking_negatives)
    return model, config, info


def score(model, config, pattern: str) -> np.ndarray:
    """The model's served ctr on every example matching `pattern`, in file order."""
    return np.concatenate([
        keras.ops.convert_to_numpy(model(x, training=False)[F.SERVING_OUTPUT])
        for x, _ in preprocess.dataset(pattern, config.inputs, 4096)
    ])


def summary_slices(domains) -> list:
    return ["overall", *(f"domain={d}" for d in domains), "cold_start"]


def aggregate(runs: Sequence[dict], slices: Sequence[str]) -> dict:
    """Mean and sample std (n - 1; 0 for one value) over `runs` of AUC and GAUC per slice and of
    examples/s: {"seeds", "<slice>": {"auc": [mean, std, k], "gauc": [...]}, ...}; k is the number
    of runs that have the metric (a slice of one class has no AUC), None when none has."""
    def mean_std(values):
        values = [v for v in values if v is not None]
        if not values:
            return None
        return [float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, len(values)]

    result = {"seeds": [r.get("seed") for r in runs]}
    for s in slices:
        result[s] = {m: mean_std([(r["quality"].get(s) or {}).get(m) for r in runs]) for m in ("auc", "gauc")}
    result["examples_per_second"] = mean_std([r.get("examples_per_second") for r in runs])
    result["best_epoch"] = [r.get("best_epoch") for r in runs]
    return result


def _line(name: str, cells: Sequence[str]) -> str:
    return f"{name:>28} " + " ".join(f"{c:>17}" for c in cells)


def run_suffix(overrides: dict) -> str:
    """`[key=value,...]` of config overrides (nested ones as `outer.inner=value`), "" without any."""
    def flat(values, prefix=""):
        for key, value in sorted(values.items()):
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}={value}"

    return "[" + ",".join(flat(overrides)) + "]" if overrides else ""


def run(model_names: List[str], workdir: str, out: str, users: int = 2000, epochs: int = 10,
        batch_size: int = 256, seeds: Sequence[int] = (0,), warmup: int = 20, examples: str = "", overrides=None,
        patience: int = 1, validation_fraction: float = 0.1, data_seed: int = 0, learning_rate: float = 1e-3,
        refit: bool = True, select: str = holdout.VAL_LOSS) -> list:
    """`examples`: an ingestion output to use instead of a generated log (e.g. imported real data).

    `epochs` is the most a run trains; early stopping usually ends it sooner. `overrides`
    (config field -> value) apply to every model; runs are then named `model[key=value,...]`, so
    `xdctr compare` keeps ablations apart from the defaults. `select` is what early stopping
    watches (`validation.MONITORS`): the validation loss, or "val_gauc" (runs named
    `model[select=val_gauc]`).
    """
    holdout.check_monitor(select)
    overrides = dict(overrides or {})
    seeds = list(seeds)
    suffix = run_suffix({**overrides, **({"select": select} if select != holdout.VAL_LOSS else {})})
    os.makedirs(workdir, exist_ok=True)
    generated = not examples
    examples = examples or prepare_data(workdir, users, data_seed)
    contract = beam_pipeline.read_contract(examples)
    summary = beam_pipeline.read_summary(examples)
    train_files = sorted(tf.io.gfile.glob(os.path.join(examples, "Split-train", "*.gz")))
    eval_pattern = os.path.join(examples, "Split-eval", "*.gz")
    rows = _eval_rows(eval_pattern)
    slices = summary_slices(contract.domains)
    has_oracle = bool(np.all(rows[F.ORACLE_CTR] >= 0))
    results, table = [], []
    print(_line("model (seed)", ["examples/s", "best/run epochs", "AUC", "GAUC", "cold AUC"]))
    if has_oracle:  # generated logs carry the true click probability: the ceiling
        oracle = _quality(rows, rows[F.ORACLE_CTR], contract.domains)
        results.append({"model": "oracle", "seed": data_seed, "quality": oracle})  # depends on the data only
        table.append(("oracle", aggregate([{"quality": oracle}], slices), None))
        print(_line("oracle", ["", "", f"{oracle['overall']['auc']:.4f}", f"{oracle['overall']['gauc']:.4f}",
                               f"{oracle['cold_start']['auc']:.4f}"]), flush=True)
    for name in model_names:
        runs = []
        for seed in seeds:
            timer = _StepTimer(warmup)
            model, config, info = train_model(name, overrides, contract, train_files, summary["rows"][F.TRAIN_SPLIT],
                                              seed=seed, epochs=epochs, batch_size=batch_size, patience=patience,
                                              validation_fraction=validation_fraction, learning_rate=learning_rate,
                                              callbacks=[timer], refit=refit, monitor=select)
            examples_per_second = timer.timed_steps * batch_size * (1 - validation_fraction) / timer.seconds()
            quality = _quality(rows, score(model, config, eval_pattern), contract.domains)
            result = {"model": name + suffix, "seed": seed, "examples_per_second": round(examples_per_second),
                      "max_epochs": epochs, **info, "batch_size": batch_size, "params": int(model.count_params()),
                      "quality": quality, "backend": keras.backend.backend(), "device": "cpu",
                      "cpu_count": os.cpu_count(), "load_average": [round(v, 2) for v in os.getloadavg()]}
            runs.append(result)
            print(_line(f"{name + suffix} ({seed})", [
                f"{examples_per_second:.0f}", f"{info['best_epoch']}/{info['epochs_run']}",
                f"{quality['overall']['auc']:.4f}", f"{quality['overall']['gauc']:.4f}",
                f"{quality['cold_start']['auc']:.4f}"]), flush=True)
        results += runs
        table.append((name + suffix, aggregate(runs, slices), runs[0]["params"]))
    print()
    print(markdown_table(table, slices))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"data": {"examples": examples, "users": users if generated else None,
                            "data_seed": data_seed if generated else None, "seeds": seeds, "max_epochs": epochs,
                            "patience": patience, "validation_fraction": validation_fraction, "refit": refit,
                            "select": select,
                            "learning_rate": learning_rate,
                            "rows": summary["rows"], "domains": list(contract.domains)},
                   "results": results,
                   "summary": [{"model": name, "params": params, **agg} for name, agg, params in table]}, f, indent=2)
    print(f"wrote {out}")
    return results


def format_mean_std(value, runs: int = 1) -> str:
    """[mean, std, k] of `runs` runs -> 'mean ± std' (4 decimals; the mean alone from one value),
    with '(k/runs)' when only k of the runs have it; None -> n/a."""
    if value is None:
        return "n/a"
    mean, std, present = value
    text = f"{mean:.4f}" if present == 1 else f"{mean:.4f} ± {std:.4f}"
    return text + (f" ({present}/{runs})" if present < runs else "")


def markdown_table(table: Sequence[tuple], slices: Sequence[str]) -> str:
    """(name, `aggregate` result, params) rows -> Markdown: seeds, best epochs, AUC and GAUC of
    `overall`, GAUC per domain, AUC and GAUC of `cold_start`, examples/s, params."""
    domains = [s for s in slices if s.startswith("domain=")]
    header = (["model", "seeds", "best epochs", "AUC", "GAUC"] + [f"GAUC {d[len('domain='):]}" for d in domains]
              + ["cold-start AUC", "cold-start GAUC", "examples/s", "params"])
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for name, agg, params in table:
        seeds = agg["seeds"]
        speed = agg.get("examples_per_second")
        cell = lambda value: format_mean_std(value, len(seeds))  # noqa: E731
        cells = [name, str(len(seeds)) if seeds != [None] else "",
                 ", ".join(str(e) for e in agg.get("best_epoch", []) if e is not None),
                 cell(agg["overall"]["auc"]), cell(agg["overall"]["gauc"])]
        cells += [cell(agg[d]["gauc"]) for d in domains]
        cells += [cell(agg["cold_start"]["auc"]), cell(agg["cold_start"]["gauc"]),
                  f"{speed[0]:,.0f}" if speed else "", f"{params:,}" if params else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
