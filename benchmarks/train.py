"""`xdctr benchmark train`: training speed and quality of every registered model on generated logs.

One generated log (planted cross-domain structure, cold-start users) is ingested once. Each model
is trained with the same loop, batch size and seed as the Trainer's `run_fn`; examples/s is
measured over the steady-state steps after a warm-up. Quality on the eval split: AUC, GAUC,
per domain, and for cold-start rows (no earlier click in the target domain, some elsewhere),
next to the AUC of the true click probability (the oracle, the ceiling). Prints a table and
writes JSON.
"""

from __future__ import annotations

import json
import os
import time
from typing import List

import keras
import numpy as np
import tensorflow as tf

import models
from components.evaluation import metrics
from components.ingest import beam_pipeline, generator
from components.trainer import preprocess, task
from xdctr import features as F


class _StepTimer(keras.callbacks.Callback):
    def __init__(self, warmup: int):
        super().__init__()
        self.warmup, self.step, self.started, self.timed_steps = warmup, 0, None, 0

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step == self.warmup:
            self.started = time.perf_counter()
        elif self.step > self.warmup:
            self.timed_steps += 1

    def seconds(self):
        return time.perf_counter() - self.started if self.started else float("nan")


def prepare_data(workdir: str, users: int, seed: int) -> str:
    examples = os.path.join(workdir, f"examples-{users}-{seed}")
    if not os.path.exists(os.path.join(examples, beam_pipeline.SUMMARY_FILE)):
        log = os.path.join(workdir, f"logs-{users}-{seed}.jsonl.gz")
        generator.generate_file(generator.GeneratorConfig(num_users=users, seed=seed), log)
        beam_pipeline.run(beam_pipeline.IngestConfig(input_patterns=(log,)), examples)
    return examples


def _eval_rows(pattern: str, contract: F.Contract) -> dict:
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


def run(model_names: List[str], workdir: str, out: str, users: int = 2000, epochs: int = 2,
        batch_size: int = 256, seed: int = 0, warmup: int = 20, examples: str = "", overrides=None) -> list:
    """`examples`: an ingestion output to use instead of a generated log (e.g. imported real data).

    `overrides` (config field -> value) apply to every model; runs are then named
    `model[key=value,...]`, so `xdctr compare` keeps ablations apart from the defaults.
    """
    overrides = dict(overrides or {})
    suffix = "[" + ",".join(f"{k}={v}" for k, v in sorted(overrides.items())) + "]" if overrides else ""
    os.makedirs(workdir, exist_ok=True)
    generated = not examples
    examples = examples or prepare_data(workdir, users, seed)
    contract = beam_pipeline.read_contract(examples)
    summary = beam_pipeline.read_summary(examples)
    train_files = sorted(tf.io.gfile.glob(os.path.join(examples, "Split-train", "*.gz")))
    eval_pattern = os.path.join(examples, "Split-eval", "*.gz")
    rows = _eval_rows(eval_pattern, contract)
    has_oracle = bool(np.all(rows[F.ORACLE_CTR] >= 0))
    steps_per_epoch = summary["rows"][F.TRAIN_SPLIT] // batch_size
    results = []
    print(f"{'model':>18} {'examples/s':>11} {'AUC':>7} {'GAUC':>7} {'cold AUC':>9} {'params':>9}")
    if has_oracle:  # generated logs carry the true click probability: the ceiling
        oracle = _quality(rows, rows[F.ORACLE_CTR], contract.domains)
        results.append({"model": "oracle", "quality": oracle})
        print(f"{'oracle':>18} {'':>11} {oracle['overall']['auc']:7.4f} {oracle['overall']['gauc']:7.4f} "
              f"{oracle['cold_start']['auc']:9.4f} {'':>9}", flush=True)
    for name in model_names:
        keras.utils.set_random_seed(seed)
        config = task.resolve_model_config(name, overrides, contract)
        model = models.build(name, config)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss={F.SERVING_OUTPUT: keras.losses.BinaryCrossentropy()},
                      jit_compile=False)
        train = preprocess.dataset(train_files, config.inputs, batch_size, shuffle=True, repeat=True, seed=seed)
        train = train.map(lambda x, y: (x, {F.SERVING_OUTPUT: y}))
        timer = _StepTimer(warmup)
        task.fit(model, train, steps=steps_per_epoch * epochs, epochs=epochs, callbacks=[timer], verbose=0)
        examples_per_second = timer.timed_steps * batch_size / timer.seconds()
        scores = np.concatenate([
            keras.ops.convert_to_numpy(model(x, training=False)[F.SERVING_OUTPUT])
            for x, _ in preprocess.dataset(eval_pattern, config.inputs, 4096)
        ])
        quality = _quality(rows, scores, contract.domains)
        result = {"model": name + suffix, "examples_per_second": round(examples_per_second), "epochs": epochs,
                  "batch_size": batch_size, "params": int(model.count_params()), "quality": quality,
                  "backend": keras.backend.backend(), "device": "cpu", "cpu_count": os.cpu_count()}
        results.append(result)
        print(f"{name + suffix:>18} {examples_per_second:11.0f} {quality['overall']['auc']:7.4f} {quality['overall']['gauc']:7.4f} "
              f"{quality['cold_start']['auc']:9.4f} {result['params']:9d}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"data": {"examples": examples, "users": users if generated else None, "seed": seed,
                            "epochs": epochs, "rows": summary["rows"], "domains": list(contract.domains)},
                   "results": results}, f, indent=2)
    print(f"wrote {out}")
    return results
