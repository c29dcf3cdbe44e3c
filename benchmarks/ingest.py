"""`xdctr benchmark ingest`: throughput and peak memory of the Beam ingestion on generated logs.

For each event count, a log is generated once (cached next to the results) and ingested with the
DirectRunner in each running mode, in a child process whose peak resident memory (the process
and its workers) is sampled. Prints a table and writes JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import List

import psutil

from components.ingest import generator

MEAN_EVENTS_PER_USER = 30.0


def _log_for(events: int, workdir: str) -> str:
    path = os.path.join(workdir, f"logs-{events}.jsonl.gz")
    if not os.path.exists(path):
        config = generator.GeneratorConfig(
            num_users=max(1, int(events / MEAN_EVENTS_PER_USER)), mean_events_per_user=MEAN_EVENTS_PER_USER,
            items_per_domain=5000, num_days=90, seed=0,
        )
        partial = path + ".partial.jsonl.gz"
        generator.generate_file(config, partial)
        os.replace(partial, path)
    return path


def _peak_rss(process: psutil.Process, stop: threading.Event, result: list) -> None:
    peak = 0
    while not stop.is_set():
        try:
            procs = [process] + process.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        stop.wait(0.2)
    result.append(peak)


class IngestionFailed(Exception):
    """The ingestion child failed: `reason` is its last stderr line (e.g. the IngestError)."""

    def __init__(self, reason: str, seconds: float):
        super().__init__(reason)
        self.reason, self.seconds = reason, seconds


def _run_one(log: str, out_dir: str, mode: str, workers: int) -> dict:
    code = (
        "import sys, json; from components.ingest import beam_pipeline as b;"
        "s = b.run(b.IngestConfig(input_patterns=(sys.argv[1],)), sys.argv[2], sys.argv[3:]);"
        "print(json.dumps(s))"
    )
    args = [sys.executable, "-c", code, log, out_dir, f"--direct_running_mode={mode}", f"--direct_num_workers={workers}"]
    started = time.time()
    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop, peak = threading.Event(), []
    sampler = threading.Thread(target=_peak_rss, args=(psutil.Process(child.pid), stop, peak))
    sampler.start()
    stdout, stderr = child.communicate()
    seconds = time.time() - started
    stop.set()
    sampler.join()
    if child.returncode != 0:
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        raise IngestionFailed(lines[-1] if lines else f"exit status {child.returncode}", seconds)
    summary = json.loads(stdout.strip().splitlines()[-1])
    return {"seconds": seconds, "peak_rss_mb": peak[0] / 2**20, "summary": summary}


def run(events: List[int], modes: List[str], workers: int, workdir: str, out: str) -> list:
    os.makedirs(workdir, exist_ok=True)
    results = []
    print(f"{'events':>10} {'mode':>16} {'workers':>7} {'seconds':>9} {'events/s':>10} {'peak MB':>9}")
    for n in events:
        started = time.time()
        log = _log_for(n, workdir)
        gen_seconds = time.time() - started
        for mode in modes:
            out_dir = os.path.join(workdir, f"out-{n}-{mode}")
            subprocess.run(["rm", "-rf", out_dir], check=True)
            try:
                r = _run_one(log, out_dir, mode, workers)
            except IngestionFailed as e:  # recorded, so the other modes still run and the JSON says why
                row = {"events": None, "mode": mode, "workers": workers, "seconds": round(e.seconds, 2),
                       "error": e.reason, "log_generation_seconds": round(gen_seconds, 1), "cpu_count": os.cpu_count()}
                results.append(row)
                print(f"{'-':>10} {mode:>16} {workers:>7} {row['seconds']:>9}  FAILED: {e.reason}", flush=True)
                continue
            total = r["summary"]["records_read"]
            row = {"events": total, "mode": mode, "workers": workers, "seconds": round(r["seconds"], 2),
                   "events_per_second": round(total / r["seconds"]), "peak_rss_mb": round(r["peak_rss_mb"]),
                   "log_generation_seconds": round(gen_seconds, 1), "cpu_count": os.cpu_count()}
            results.append(row)
            print(f"{total:>10} {mode:>16} {workers:>7} {row['seconds']:>9} {row['events_per_second']:>10} {row['peak_rss_mb']:>9}",
                  flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {out}")
    return results
