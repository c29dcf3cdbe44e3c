"""How much of a validation holdout training can see: held-out clicks in trained-on histories.

The ingestion writes each click into the histories of the same user's later rows. A holdout
leaks when a held-out row's click (user, item, ts) is in the history of a row that is trained
on: a model that learns from history items (RecGURU's reconstruction, a next-item objective)
then sees held-out labels. For one ingestion output's train split this compares

  time: the Trainer's holdout, the rows at or after `preprocess.validation_cut`;
  random rows: the holdout the Trainer used before, a hash of (user, item, ts) below the fraction;

and prints, for each, the held-out rows and clicks and the share of those clicks that some
trained-on row's history shows; writes the same as JSON.

  scripts/runtime python -m benchmarks.holdout --examples outputs/benchmark/quality/food-kitchen/examples \\
      --out outputs/benchmark/holdout-food-kitchen.json
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import tensorflow as tf

from components.ingest import beam_pipeline
from components.trainer import preprocess
from xdctr import features as F

HASH_BUCKETS = 1 << 62  # click keys are compared by a 62-bit hash of (user, item, ts)


def _click_keys(users, items, times):
    key = tf.strings.join([users, items, tf.strings.as_string(times)], separator="\x1f")
    return tf.strings.to_hash_bucket_fast(key, HASH_BUCKETS)


def random_rows_holdout(raw: dict, fraction: float) -> tf.Tensor:
    """(batch,) bool: the Trainer's former holdout, a hash of (user, item, ts) below `fraction`."""
    key = tf.strings.join([raw[F.USER_ID], raw[F.ITEM_ID], tf.strings.as_string(raw[F.TIMESTAMP])], separator="\x1f")
    return tf.strings.to_hash_bucket_fast(key, 10_000) < int(round(fraction * 10_000))


def measure(files, contract: F.Contract, fraction: float, batch_size: int = 8192) -> list:
    """One dict per holdout: its name, held-out rows and clicks, and clicks a trained-on history shows."""
    cut = preprocess.validation_cut(files, fraction)
    spec = contract.feature_spec()
    holdouts = {"time": lambda raw: preprocess.in_validation(raw, cut),
                "random rows": lambda raw: random_rows_holdout(raw, fraction)}
    held_clicks = {name: [] for name in holdouts}
    shown = {name: [] for name in holdouts}
    rows = {name: 0 for name in holdouts}
    for serialized in tf.data.TFRecordDataset(sorted(files), compression_type="GZIP").batch(batch_size):
        raw = tf.io.parse_example(serialized, spec)
        users = raw[F.USER_ID]
        history_users = tf.broadcast_to(users[:, None], tf.shape(raw[F.HISTORY_ITEM_IDS]))
        history_keys = _click_keys(history_users, raw[F.HISTORY_ITEM_IDS], raw[F.HISTORY_TIMESTAMPS])
        real = tf.not_equal(raw[F.HISTORY_ITEM_IDS], F.PAD_ID)
        clicks = tf.equal(raw[F.LABEL], 1)
        keys = _click_keys(users, raw[F.ITEM_ID], raw[F.TIMESTAMP])
        for name, holdout in holdouts.items():
            held = holdout(raw)
            rows[name] += int(tf.reduce_sum(tf.cast(held, tf.int64)))
            held_clicks[name].append(tf.boolean_mask(keys, tf.logical_and(held, clicks)).numpy())
            trained = tf.logical_and(real, tf.logical_not(held)[:, None])
            shown[name].append(np.unique(tf.boolean_mask(history_keys, trained).numpy()))
    results = []
    for name in holdouts:
        clicks = np.concatenate(held_clicks[name])
        seen = np.isin(clicks, np.unique(np.concatenate(shown[name])))
        results.append({"holdout": name, "held_out_rows": rows[name], "held_out_clicks": int(clicks.size),
                        "clicks_shown_to_training": int(seen.sum()),
                        "share_shown": float(seen.mean()) if clicks.size else 0.0})
    return results


def markdown(results) -> str:
    lines = ["| holdout | held-out rows | held-out clicks | in a trained-on history | share |",
             "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['holdout']} | {r['held_out_rows']:,} | {r['held_out_clicks']:,} | "
              f"{r['clicks_shown_to_training']:,} | {r['share_shown']:.1%} |" for r in results]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", required=True, help="an ingestion output (its Split-train files are read)")
    parser.add_argument("--validation-fraction", type=float, default=0.1)
    parser.add_argument("--out", required=True, help="JSON results")
    args = parser.parse_args(argv)
    files = sorted(tf.io.gfile.glob(os.path.join(args.examples, f"Split-{F.TRAIN_SPLIT}", "*.gz")))
    if not files:
        parser.error(f"no train files under {args.examples}/Split-{F.TRAIN_SPLIT}")
    results = measure(files, beam_pipeline.read_contract(args.examples), args.validation_fraction)
    print(markdown(results))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"examples": args.examples, "validation_fraction": args.validation_fraction, "results": results},
                  f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
