"""A Beam-only reproduction of records lost by the DirectRunner in multi_processing mode.

No project code: `--seeds` elements (default one) are reshuffled, a ParDo fans them out into
`--records` records of `--record-bytes` bytes in all (with one seed, one bundle emits them all, as
the ingestion's one-bundle-per-file reader did), a Map reads a side input built from the same PCollection, and a GroupByKey groups
the result. The records that come out of the GroupByKey are counted and compared with the records
that went in; each run prints one line and the script exits 1 when any run lost records.

  scripts/runtime python scripts/beam_data_loss.py --records 400000 --record-bytes 3000 --runs 4
  scripts/runtime python scripts/beam_data_loss.py --side-input none ...   # the same without it

`--side-input dict` (the default) is an AsDict side input of a small keyed PCollection derived
from the records, read by a Map fed by the fan-out itself (the ingestion's old
`AsDict(heavy_users)`); `after-group` reads the same side input in a Map after the GroupByKey (the
shape of the ingestion now, whose side inputs, the eval cutoff and the contract, are read after
its GroupByKey); `none` leaves the side input out.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions


class _FanOut(beam.DoFn):
    """seed -> its share of `count` (key, payload) records; keys cycle through `keys` values."""

    def __init__(self, count: int, seeds: int, record_bytes: int, keys: int):
        self._count, self._seeds, self._record_bytes, self._keys = count, seeds, record_bytes, keys

    def process(self, seed):
        payload = b"x" * self._record_bytes
        for i in range(seed, self._count, self._seeds):
            yield f"k{i % self._keys}", payload


def _tag(kv, side):
    key, payload = kv
    return key, (len(payload), side.get(key, 0))


def _group_sizes(kv, side=None):
    key, values = kv
    return sum(1 for _ in values) + 0 * (side or {}).get(key, 0)


def run_once(records: int, seeds: int, record_bytes: int, keys: int, side_input: str, pipeline_args, out_dir: str) -> int:
    """One pipeline run; returns the number of records that came out of the GroupByKey."""
    with beam.Pipeline(options=PipelineOptions(pipeline_args)) as p:
        emitted = (
            p
            | "Seeds" >> beam.Create(list(range(seeds)))
            | "Reshuffle" >> beam.Reshuffle()
            | "FanOut" >> beam.ParDo(_FanOut(records, seeds, record_bytes, keys))
        )
        counts = emitted | "Ones" >> beam.Map(lambda kv: (kv[0], 1)) | "PerKey" >> beam.CombinePerKey(sum)
        side = beam.pvalue.AsDict(counts)
        tagged = emitted | "Tag" >> beam.Map(_tag, side=side if side_input == "dict" else {})
        (
            tagged
            | "Group" >> beam.GroupByKey()
            | "Sizes" >> beam.Map(_group_sizes, side=side if side_input == "after-group" else {})
            | "Total" >> beam.CombineGlobally(sum)
            | "Json" >> beam.Map(json.dumps)
            | "Write" >> beam.io.WriteToText(os.path.join(out_dir, "count"), shard_name_template="")
        )
    with open(os.path.join(out_dir, "count"), encoding="utf-8") as f:
        return json.loads(f.read())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=400_000)
    parser.add_argument("--record-bytes", type=int, default=3_000)
    parser.add_argument("--seeds", type=int, default=1, help="elements the records are fanned out from")
    parser.add_argument("--keys", type=int, default=10_000, help="distinct keys of the records")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--side-input", choices=["dict", "after-group", "none"], default="dict")
    parser.add_argument("--mode", default="multi_processing", help="--direct_running_mode")
    parser.add_argument("--workers", type=int, default=2, help="--direct_num_workers")
    parser.add_argument("--out", default="", help="also write the runs as JSON here")
    args = parser.parse_args(argv)
    pipeline_args = ["--runner=DirectRunner", f"--direct_running_mode={args.mode}", f"--direct_num_workers={args.workers}"]
    print(f"beam {beam.__version__}, {args.mode}, {args.workers} workers, {args.records} records of "
          f"{args.record_bytes} bytes from {args.seeds} seed(s), side input: {args.side_input}", flush=True)
    runs = []
    for run in range(1, args.runs + 1):
        with tempfile.TemporaryDirectory() as out_dir:
            started = time.time()
            out = run_once(args.records, args.seeds, args.record_bytes, args.keys, args.side_input, pipeline_args, out_dir)
            seconds = time.time() - started
        runs.append({"run": run, "records_in": args.records, "records_out": out, "lost": args.records - out,
                     "seconds": round(seconds, 1)})
        print(f"run {run}: records in {args.records}, out {out}, lost {args.records - out} ({seconds:.0f} s)", flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "beam": beam.__version__, "runs": runs}, f, indent=2)
    lost = [r for r in runs if r["lost"]]
    print(f"{len(lost)} of {len(runs)} runs lost records" if lost else f"no records lost in {len(runs)} runs")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
