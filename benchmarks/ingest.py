"""`xdctr benchmark ingest`: throughput and peak memory of the Beam ingestion on generated logs.

For each event count, a log is generated once (cached next to the results) and ingested with the
DirectRunner in each running mode, `repeat` times, in a child process whose peak resident memory
(the process and its workers) is sampled and whose CPU time is counted (events per CPU second
depend less than events per second on other load of a shared machine). A run that loses records fails the ingestion's
`records_read` check and is recorded as failed. Prints a table and writes JSON.
"""

from __future__ import annotations

import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from typing import List, Sequence

import psutil

from components.ingest import generator

MEAN_EVENTS_PER_USER = 30.0


def _log_for(events: int, workdir: str, suffix: str = "jsonl.gz") -> str:
    path = os.path.join(workdir, f"logs-{events}.{suffix}")
    if not os.path.exists(path) and suffix == "jsonl" and os.path.exists(path + ".gz"):
        with gzip.open(path + ".gz", "rb") as source, open(path + ".partial", "wb") as target:
            shutil.copyfileobj(source, target, 1 << 24)
        os.replace(path + ".partial", path)
    if not os.path.exists(path):
        config = generator.GeneratorConfig(
            num_users=max(1, int(events / MEAN_EVENTS_PER_USER)), mean_events_per_user=MEAN_EVENTS_PER_USER,
            items_per_domain=5000, num_days=90, seed=0,
        )
        partial = path + f".partial.{suffix}"
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


def _run_one(log: str, out_dir: str, mode: str, workers: int, spill: bool = True) -> dict:
    code = (
        "import sys, json; from components.ingest import beam_pipeline as b;"
        "s = b.run(b.IngestConfig(input_patterns=(sys.argv[1],), spill_pieces=sys.argv[3] == 'on'), sys.argv[2], "
        "sys.argv[4:]);"
        "print(json.dumps(s))"
    )
    args = [sys.executable, "-c", code, log, out_dir, "on" if spill else "off",
            f"--direct_running_mode={mode}", f"--direct_num_workers={workers}"]
    started, cpu_before = time.time(), _children_cpu()
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
    return {"seconds": seconds, "cpu_seconds": _children_cpu() - cpu_before, "peak_rss_mb": peak[0] / 2**20,
            "summary": summary}


def _children_cpu() -> float:
    """User + system CPU seconds of the finished children (the ingestion and its Beam workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(events: List[int], modes: List[str], workers: int, workdir: str, out: str, repeat: int = 1,
        log_format: str = "jsonl.gz", spill: Sequence[str] = ("on",)) -> list:
    os.makedirs(workdir, exist_ok=True)
    results = []
    print(f"{'events':>10} {'mode':>16} {'workers':>7} {'spill':>5} {'run':>3} {'seconds':>9} {'events/s':>10} "
          f"{'cpu s':>8} {'events/cpu s':>12} {'peak MB':>9} {'load':>5}")
    for n in events:
        started = time.time()
        log = _log_for(n, workdir, log_format)
        gen_seconds = time.time() - started
        for mode, spill_mode in [(m, s) for m in modes for s in spill]:
            for run_index in range(1, repeat + 1):
                out_dir = os.path.join(workdir, f"out-{n}-{mode}")
                subprocess.run(["rm", "-rf", out_dir], check=True)
                base = {"mode": mode, "workers": workers, "spill": spill_mode, "run": run_index, "format": log_format,
                        "log_generation_seconds": round(gen_seconds, 1), "cpu_count": os.cpu_count(),
                        "load_average": [round(x, 2) for x in os.getloadavg()]}
                try:
                    r = _run_one(log, out_dir, mode, workers, spill_mode == "on")
                except IngestionFailed as e:  # recorded, so the other runs go on and the JSON says why
                    row = {"events": None, **base, "seconds": round(e.seconds, 2), "error": e.reason}
                    results.append(row)
                    print(f"{'-':>10} {mode:>16} {workers:>7} {spill_mode:>5} {run_index:>3} {row['seconds']:>9}  "
                          f"FAILED: {e.reason}",
                          flush=True)
                    continue
                total = r["summary"]["records_read"]
                row = {"events": total, **base, "seconds": round(r["seconds"], 2),
                       "events_per_second": round(total / r["seconds"]), "cpu_seconds": round(r["cpu_seconds"], 1),
                       "events_per_cpu_second": round(total / r["cpu_seconds"]), "peak_rss_mb": round(r["peak_rss_mb"]),
                       "examples": r["summary"]["good_records"]}
                results.append(row)
                print(f"{total:>10} {mode:>16} {workers:>7} {spill_mode:>5} {run_index:>3} {row['seconds']:>9} "
                      f"{row['events_per_second']:>10} {row['cpu_seconds']:>8} {row['events_per_cpu_second']:>12} "
                      f"{row['peak_rss_mb']:>9} {base['load_average'][0]:>5}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {out}")
    return results
