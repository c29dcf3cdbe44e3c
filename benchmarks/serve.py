"""`xdctr benchmark serve`: where the time of one scoring request goes, on one exported model.

Scenarios, each bounded by `--requests` and `--duration` seconds, on the same SavedModel and the
same payloads (built by `serving.loadtest.build_requests` from the eval split's tf.Examples):

- `in-process`: the signature called directly in Python, one call at a time, with the batch of
  one request (`--batch` rows), and with the rows of every in-flight request merged into one
  call (`--concurrency` x `--batch`: what dynamic batching can reach at best). The ceiling.
- `serve`: `xdctr serve` without batching; `serving.loadtest` closed loop, `--concurrency` clients,
  `--batch` rows per request.
- `serve+batching`: the same load on `xdctr serve --enable-batching --processes 2` (knobs below).
- `serve+batching at 50% load`: open loop (`--rate`) at `--half-load` x the QPS just measured, with
  twice the clients to hold the rate; latency counts from each request's due time.
- `route`: the same load through `xdctr route` (a 2-arm experiment, 50/50, both arms on the
  non-batching server; user ids hashed from the request's tf.Example; assignment log on, as in
  an experiment), in front of the non-batching server.
- candidates: one user and `--candidates` candidate items scored three ways, each by a client
  waiting for its answer (`--candidates-concurrency`, 1 by default: the unloaded latency an ad
  server sees): `score_candidates` (the user's context encoded once), one `serving_default`
  request of `--candidates` rows (the context parsed and encoded per row), and single-row
  `serving_default` requests (the client needs `--candidates` of them per ad request). The first
  two also in process.

Servers and the router run in their own processes (`serving.server.start`,
`serving.router.start_router`), as in production, so the load generator's Python threads do not
share a GIL with the service. Besides QPS, rows/s and the client's latency percentiles, each row
says where the time went: the mean time inside the model server's Predict handler and the mean
rows per signature run (from the server's Prometheus histograms, so a merged batch shows; for
`score_candidates` the server counts the rows of the signature's first input), and
the CPU time per request of the service processes and of this process (on a machine with few
cores the client's own cost is part of the picture). CPU times and server metrics include the
uncounted warmup requests, and the client's includes building the requests before the clock:
small next to the thousands measured, but not zero.

Batching knobs (TF Serving's, `serving.batching`): `max_batch_size` = concurrency x batch (every
request in flight fits in one batch, so none waits for a second); `num_batch_threads` = 1 (on 2
cores one thread keeps one core on the model while the other serves gRPC and the client; two
threads split the waiting requests into two smaller batches, more model calls for the same rows);
`batch_timeout_micros` = 1000 (a batch waits at most 1 ms for more requests; 0 would merge
requests only while the batch thread is busy); `max_enqueued_batches` = 10 (TF Serving's default;
a closed loop never fills it).

Server processes (`--server-processes`, 2): the batching server runs as that many processes on one
port (`serving.processes`), as one Python process serves on about one core (its event loop,
decoding and batch assembly share one GIL); the plain `serve` and the router keep one process.
The clients (`--concurrency`, 16) each hold their own connection, so the kernel spreads them over
the processes; 16 keeps two processes' batches full where 8 left the server waiting on its
clients (8: 1,813 QPS at 0.59 ms of server CPU a request, most of two cores unused).

TensorFlow's thread pools (`--tensorflow-intra-op-parallelism`, `--tensorflow-inter-op-parallelism`,
TF Serving's flags): 1 each, in the servers and for the in-process calls alike (the ceiling is
measured with the same setting). For a model this small a call's ops are too short to share
among threads: one thread per call spends about half the CPU of TensorFlow's default pools.

The summary line gives the issue's targets: serve+batching QPS over in-process QPS at the same
rows per request (>= 0.7) and the p99 at half load (<= 20 ms), each the median over
`--target-rounds` rounds (the main table's, then rounds of half the duration that measure the
in-process ceiling, the batching server and its half load back to back: on a machine shared with
other jobs, a neighbour's load then hits both sides of the ratio alike); the JSON has them, with
every round, under `targets`.

The model: `--model-dir` (a SavedModel directory, or a TF Serving base path of version
directories) with `--examples`; by default a `dnn_multi` trained briefly on a generated log,
cached under `--workdir`. Prints a table and writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import select
import subprocess
import sys
import time
import urllib.request
from typing import Optional, Sequence

from xdctr import features as F

MODEL_NAME = "xdctr"
DEFAULT_WORKDIR = "outputs/benchmark/serve"
DEFAULT_OUT = "outputs/benchmark/serve.json"
DEFAULT_MODEL = "dnn_multi"
DEFAULT_USERS = 400
DEFAULT_TRAIN_STEPS = 100
DEFAULT_REQUESTS = 5000
DEFAULT_DURATION_S = 12.0
DEFAULT_CONCURRENCY = 16  # enough clients in flight to keep two batching server processes busy
DEFAULT_BATCH = 4
DEFAULT_CANDIDATES = 100
DEFAULT_CANDIDATES_CONCURRENCY = 1
DEFAULT_WARMUP = 20
DEFAULT_BATCH_TIMEOUT_MICROS = 1000
DEFAULT_MAX_ENQUEUED_BATCHES = 10
DEFAULT_NUM_BATCH_THREADS = 1
DEFAULT_SERVER_PROCESSES = 2  # the batching server's processes (`xdctr serve --processes`): one per core
DEFAULT_TF_THREADS = 1  # TensorFlow's intra- and inter-op threads, in the servers and the in-process calls
DEFAULT_HALF_LOAD = 0.5  # the latency scenario's rate, as a fraction of the batching server's max QPS
DEFAULT_TARGET_ROUNDS = 3  # the main table's numbers, then 2 more rounds of ceiling + batching server
TARGET_QPS_RATIO = 0.7  # serve+batching QPS / in-process QPS at the same rows per request
TARGET_P99_MS = 20.0  # p99 of serve+batching at half of its max load
MAX_EXAMPLES = 1000  # tf.Examples read from --examples and cycled through
SERVICE_START_TIMEOUT_S = 300.0  # TensorFlow import, model load and warmup, on a busy machine
SERVICE_STOP_TIMEOUT_S = 20.0
PERCENTILES = (50, 95, 99)
CHILD_FLAG = "--service-process"
SCRAPE_TIMEOUT_S = 10.0
REQUEST_SECONDS = "xdctr_serving_request_latency_seconds"  # serving.monitoring's histograms
BATCH_ROWS = "xdctr_serving_batch_size"

IN_PROCESS, SERVE, SERVE_BATCHING, ROUTE = "in-process", "serve", "serve+batching", "route"  # result "path"
LOAD, CANDIDATES = "load", "candidates"  # result "group": the concurrent load, or one user's candidates


@dataclasses.dataclass(frozen=True)
class Settings:
    """The load of every scenario (see the module docstring)."""

    requests: int = DEFAULT_REQUESTS
    duration_s: float = DEFAULT_DURATION_S
    concurrency: int = DEFAULT_CONCURRENCY
    batch: int = DEFAULT_BATCH
    candidates: int = DEFAULT_CANDIDATES
    candidates_concurrency: int = DEFAULT_CANDIDATES_CONCURRENCY
    warmup: int = DEFAULT_WARMUP
    batch_timeout_micros: int = DEFAULT_BATCH_TIMEOUT_MICROS
    num_batch_threads: int = DEFAULT_NUM_BATCH_THREADS
    server_processes: int = DEFAULT_SERVER_PROCESSES
    tensorflow_intra_op_parallelism: int = DEFAULT_TF_THREADS
    tensorflow_inter_op_parallelism: int = DEFAULT_TF_THREADS
    half_load: float = DEFAULT_HALF_LOAD
    target_rounds: int = DEFAULT_TARGET_ROUNDS

    def __post_init__(self):
        for name in ("requests", "concurrency", "batch", "candidates", "candidates_concurrency", "num_batch_threads",
                     "target_rounds", "server_processes"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1. Received: {name}={getattr(self, name)}")
        if not 0 < self.half_load < 1:
            raise ValueError(f"`half_load` must be in (0, 1). Received: half_load={self.half_load}")
        for name in ("warmup", "batch_timeout_micros", "tensorflow_intra_op_parallelism",
                     "tensorflow_inter_op_parallelism"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0. Received: {name}={getattr(self, name)}")
        if not 0 < self.duration_s < float("inf"):
            raise ValueError(
                f"`duration_s` must be a positive number of seconds. Received: duration_s={self.duration_s}")

    def batching(self) -> dict:
        """The `serving.batching.BatchingOptions` fields of the batching server."""
        return {"max_batch_size": self.concurrency * self.batch, "batch_timeout_micros": self.batch_timeout_micros,
                "num_batch_threads": self.num_batch_threads, "max_enqueued_batches": DEFAULT_MAX_ENQUEUED_BATCHES}


# ----------------------------------------------------------------------------------------------
# The model


def prepare_model(workdir: str, model: str = DEFAULT_MODEL, users: int = DEFAULT_USERS,
                  train_steps: int = DEFAULT_TRAIN_STEPS, seed: int = 0) -> tuple[str, str]:
    """Trains `model` briefly on a generated log (cached under `workdir`).

    Returns (TF Serving base path holding version 1, eval-split TFRecord pattern).
    """
    from components.ingest import beam_pipeline, generator
    from components.trainer import task

    root = os.path.join(workdir, f"{model}-{users}users-{train_steps}steps-seed{seed}")
    examples = os.path.join(root, "examples")
    base_path = os.path.join(root, "serving", MODEL_NAME)
    version_dir = os.path.join(base_path, "1")
    if not os.path.exists(os.path.join(examples, beam_pipeline.SUMMARY_FILE)):
        log = os.path.join(root, "logs.jsonl.gz")
        os.makedirs(root, exist_ok=True)
        generator.generate_file(generator.GeneratorConfig(num_users=users, seed=seed), log)
        beam_pipeline.run(beam_pipeline.IngestConfig(input_patterns=(log,)), examples)
    if not os.path.exists(os.path.join(version_dir, "saved_model.pb")):
        import tensorflow as tf

        partial = os.path.join(root, "export.partial")
        subprocess.run(["rm", "-rf", partial], check=True)
        train_files = sorted(tf.io.gfile.glob(os.path.join(examples, f"Split-{F.TRAIN_SPLIT}", "*.gz")))
        task.train_and_export(model, {}, beam_pipeline.read_contract(examples), train_files,
                              serving_model_dir=partial, log_dir=os.path.join(root, "train-logs"),
                              train_steps=train_steps, validation_steps=1,
                              training=task.TrainingConfig(seed=seed, early_stopping_patience=0))
        os.makedirs(base_path, exist_ok=True)
        os.replace(partial, version_dir)  # the server never sees a half-written version
    return base_path, os.path.join(examples, f"Split-{F.EVAL_SPLIT}", "*.gz")


def serving_base_path(model_dir: str, workdir: str) -> str:
    """A TF Serving base path for `model_dir`: itself when it holds version directories, else a
    base path under `workdir` whose version 1 links to the SavedModel directory `model_dir`."""
    model_dir = os.path.abspath(model_dir)
    if os.path.isfile(os.path.join(model_dir, "saved_model.pb")):
        base_path = os.path.join(os.path.abspath(workdir), "model-dir", MODEL_NAME)
        link = os.path.join(base_path, "1")
        os.makedirs(base_path, exist_ok=True)
        if os.path.islink(link):
            os.remove(link)
        os.symlink(model_dir, link)
        return base_path
    versions = [name for name in os.listdir(model_dir) if name.isdigit()] if os.path.isdir(model_dir) else []
    if not any(os.path.isfile(os.path.join(model_dir, v, "saved_model.pb")) for v in versions):
        raise ValueError(f"--model-dir {model_dir}: expected a SavedModel directory (with saved_model.pb) or a "
                         "TF Serving base path (<dir>/<version>/saved_model.pb)")
    return model_dir


def latest_version_dir(base_path: str) -> tuple[int, str]:
    """(version, directory) of the highest version under a TF Serving base path."""
    versions = [int(name) for name in os.listdir(base_path)
                if name.isdigit() and os.path.isfile(os.path.join(base_path, name, "saved_model.pb"))]
    version = max(versions)
    return version, os.path.join(base_path, str(version))


# ----------------------------------------------------------------------------------------------
# Service processes


class ServiceProcess:
    """`xdctr serve` or `xdctr route` in a child process (this module run with CHILD_FLAG).

    The child prints `{"port": N}` once it serves and stops when its stdin closes (so it also stops
    when this process dies). Its stderr goes to `log_path`.
    """

    def __init__(self, name: str, spec: dict, log_path: str):
        import psutil

        self.name = name
        self.log_path = log_path
        self.port: Optional[int] = None
        self.monitoring_ports: list[int] = []
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        self._log = open(log_path, "w")
        self._unread = b""  # child stdout read but not yet split into lines
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.serve", CHILD_FLAG, json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env, cwd=root,
        )
        self._psutil = psutil.Process(self.process.pid)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float) -> None:
        """Waits for the child's announcement; RuntimeError with its log's tail if it fails or is late."""
        deadline = time.monotonic() + timeout_s
        while self.port is None:
            remaining = deadline - time.monotonic()
            if self.process.poll() is not None or remaining <= 0:
                self.stop()
                state = (f"exited with code {self.process.returncode}" if remaining > 0
                         else f"was not ready within {timeout_s:g} s")
                raise RuntimeError(f"{self.name} {state}; last lines of {self.log_path}:\n{self._log_tail()}")
            ready, _, _ = select.select([self.process.stdout], [], [], min(remaining, 1.0))
            if not ready:
                continue
            chunk = os.read(self.process.stdout.fileno(), 65536)
            if not chunk:  # the child closed its stdout: it is exiting
                self.process.wait(timeout=SERVICE_STOP_TIMEOUT_S)
                continue
            *lines, self._unread = (self._unread + chunk).split(b"\n")
            for line in lines:
                if line.startswith(b"{"):
                    announced = json.loads(line)
                    self.port, self.monitoring_ports = announced["port"], announced.get("monitoring_ports", [])

    def cpu_seconds(self) -> float:
        """CPU seconds of the service: this child and its own children (the processes of a group)."""
        import psutil

        total = 0.0
        for process in [self._psutil] + self._psutil.children(recursive=True):
            try:
                times = process.cpu_times()
            except psutil.Error:  # a child that just ended
                continue
            total += times.user + times.system
        return total

    def server_totals(self) -> dict:
        """Sums and counts of the server's request-latency and batch-size histograms, over all labels."""
        from prometheus_client.parser import text_string_to_metric_families

        from serving.monitoring import METRICS_PATH

        totals = {f"{name}_{part}": 0.0 for name in (REQUEST_SECONDS, BATCH_ROWS) for part in ("sum", "count")}
        for port in self.monitoring_ports:  # one per server process
            url = f"http://127.0.0.1:{port}{METRICS_PATH}"
            with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
                text = response.read().decode()
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name in totals:
                        totals[sample.name] += sample.value
        return totals

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.close()
                self.process.wait(timeout=SERVICE_STOP_TIMEOUT_S)
            except (subprocess.TimeoutExpired, BrokenPipeError):
                self.process.kill()
                self.process.wait(timeout=SERVICE_STOP_TIMEOUT_S)
        self.process.stdout.close()
        self._log.close()

    def _log_tail(self, lines: int = 20) -> str:
        self._log.flush()
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])


def _service_main(spec: dict) -> int:
    """The child process: start the service, announce its port, serve until stdin closes."""
    announce, sys.stdout = sys.stdout, sys.stderr  # stdout carries the announcement only
    if spec["kind"] == "serve":
        from serving import server
        from serving.batching import BatchingOptions
        from serving.config import ServerOptions

        batching = spec["batching"]
        options = ServerOptions(
            model_name=spec["model_name"], model_base_path=spec["base_path"], file_system_poll_wait_seconds=0,
            enable_batching=batching is not None, batching=BatchingOptions(**batching) if batching else None,
            max_workers=spec["max_workers"], monitoring_port=0,
            tensorflow_intra_op_parallelism=spec.get("intra_op", 0),
            tensorflow_inter_op_parallelism=spec.get("inter_op", 0), processes=spec.get("processes", 1),
        )
        if options.processes > 1:
            from serving import processes

            running = processes.start_processes(options)
            announced = {"port": running.port, "monitoring_ports": running.monitoring_ports}
        else:
            running = server.start(options)
            announced = {"port": running.port, "monitoring_ports": [running.monitoring_port]}
    else:
        from serving import router

        running = router.start_router(spec["config"], port=0, assignment_log=spec["assignment_log"],
                                      poll_seconds=60.0, max_workers=spec["max_workers"])
        announced = {"port": running.port}
    print(json.dumps(announced), file=announce, flush=True)
    sys.stdin.read()  # until the parent closes stdin or exits
    running.stop(grace=1.0)
    return 0


def _router_config(path: str, backend: str) -> str:
    import yaml

    arms = [{"name": name, "backend": backend, "model_name": MODEL_NAME, "weight": 0.5} for name in ("a", "b")]
    with open(path, "w") as f:
        yaml.safe_dump({"salt": "benchmark", "arms": arms, "deadline_seconds": 30.0}, f)
    return path


# ----------------------------------------------------------------------------------------------
# Measurements


def _latency_summary(latencies_s: Sequence[float]) -> dict:
    import numpy as np

    if not latencies_s:
        return {f"p{p}": None for p in PERCENTILES} | {"max": None, "mean": None}
    ms = np.asarray(latencies_s) * 1000.0
    return ({f"p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(ms, PERCENTILES))}
            | {"max": float(ms.max()), "mean": float(ms.mean())})


def _payloads(examples: Sequence[bytes], signature: str, rows: int, count: int) -> list[dict]:
    """The loadtest's request payloads as tensors: the in-process calls get the same inputs."""
    import tensorflow as tf

    from serving import loadtest

    requests = loadtest.build_requests(MODEL_NAME, examples, signature, rows, rows, count)
    return [{name: tf.constant(tf.make_ndarray(proto)) for name, proto in request.inputs.items()}
            for request in requests]


def in_process(function, payloads: Sequence[dict], requests: int, duration_s: float, warmup: int) -> dict:
    """Calls a loaded signature one call at a time, bounded like the loadtest; a result like `served`'s.

    `rows_per_request` and `rows_per_signature_run` are the scores returned per call.
    """
    for k in range(warmup):
        function(**payloads[k % len(payloads)])
    latencies, rows = [], 0
    cpu_start, start = time.process_time(), time.monotonic()
    deadline = start + duration_s
    while len(latencies) < requests and time.monotonic() < deadline:
        t = time.monotonic()
        rows = len(function(**payloads[len(latencies) % len(payloads)])[F.SERVING_OUTPUT].numpy())  # (rows,)
        latencies.append(time.monotonic() - t)
    elapsed, cpu = time.monotonic() - start, time.process_time() - cpu_start
    ok = len(latencies)
    return {"rows_per_request": rows, "concurrency": 1, "rate_qps": None, "sent": ok, "ok": ok, "errors": {},
            "unfinished": 0, "call_latency_ms": _latency_summary(latencies),
            "elapsed_s": elapsed, "qps": ok / elapsed, "rows_per_s": ok * rows / elapsed,
            "latency_ms": _latency_summary(latencies), "stopped_by": "requests" if ok >= requests else "time",
            "server_handler_ms_mean": None, "rows_per_signature_run": float(rows),
            "service_cpu_ms_per_request": 1000.0 * cpu / max(ok, 1), "client_cpu_ms_per_request": None}


def served(target: str, services: Sequence[ServiceProcess], examples: Sequence[bytes], settings: Settings,
           signature: str, rows: int, concurrency: int, rate_qps: Optional[float] = None) -> dict:
    """One `serving.loadtest.run` against `target` (closed loop, or open loop at `rate_qps`), plus where the time went.

    `services`: the processes that answer (the router first, if any; the model server last, whose
    metrics give the time inside its handler and the rows per signature run). CPU times and
    server metrics include the uncounted warmup requests, few next to the measured ones.
    """
    from serving import loadtest

    server = services[-1]
    totals = server.server_totals()
    service_cpu, client_cpu = sum(s.cpu_seconds() for s in services), time.process_time()
    result = loadtest.run(target, MODEL_NAME, examples, settings.requests, settings.duration_s, concurrency,
                          signature, batch=rows, candidates=rows, warmup=settings.warmup, rate_qps=rate_qps)
    service_cpu = sum(s.cpu_seconds() for s in services) - service_cpu
    client_cpu = time.process_time() - client_cpu
    delta = {name: value - totals[name] for name, value in server.server_totals().items()}
    ok = max(result["ok"], 1)
    keep = ("rows_per_request", "concurrency", "rate_qps", "sent", "ok", "errors", "error_details", "unfinished",
            "elapsed_s", "qps", "rows_per_s", "latency_ms", "call_latency_ms", "stopped_by")
    return {k: result[k] for k in keep} | {
        "server_handler_ms_mean": _ratio(1000.0 * delta[f"{REQUEST_SECONDS}_sum"], delta[f"{REQUEST_SECONDS}_count"]),
        "rows_per_signature_run": _ratio(delta[f"{BATCH_ROWS}_sum"], delta[f"{BATCH_ROWS}_count"]),
        "service_cpu_ms_per_request": 1000.0 * service_cpu / ok,
        "client_cpu_ms_per_request": 1000.0 * client_cpu / ok,
    }


def _configure_tensorflow_threads(settings: Settings) -> dict:
    """This process's TensorFlow threads as the servers' (for the in-process calls); the ones in force.

    TensorFlow fixes its pools when it first runs an op: a process that already ran one (a test,
    or training the model here) keeps its own, and the JSON records which.
    """
    import tensorflow as tf

    from serving import server

    try:
        server.configure_tensorflow_threads(settings.tensorflow_intra_op_parallelism,
                                            settings.tensorflow_inter_op_parallelism)
    except ValueError as e:
        print(f"note: in-process calls keep this process's TensorFlow threads ({e})")
    return {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads()}


def target_round(rows: Sequence[dict], settings: Settings) -> dict:
    """One round's numbers for the issue's targets: QPS ratio (same rows per request) and p99 at half load."""
    by_scenario = {row["scenario"]: row for row in rows}
    ceiling = by_scenario[f"in-process, batch {settings.batch}"]["qps"]
    batching = by_scenario["serve+batching"]["qps"]
    return {"in_process_qps": ceiling, "serve_batching_qps": batching,
            "qps_ratio": batching / ceiling if ceiling else None,
            "p99_at_half_load_ms": by_scenario[f"serve+batching at {settings.half_load:.0%} load"]["latency_ms"]["p99"],
            "call_p99_at_half_load_ms":
                by_scenario[f"serve+batching at {settings.half_load:.0%} load"]["call_latency_ms"]["p99"],
            "load_average": os.getloadavg()[0]}


def targets(rounds: Sequence[dict]) -> dict:
    """The medians over the rounds (each round measures the ceiling and the server back to back,
    so a neighbour's load on a shared machine hits both alike) against the issue's targets."""
    import numpy as np

    def median(key):
        values = [r[key] for r in rounds if r[key] is not None]
        return float(np.median(values)) if values else None

    ratio, p99 = median("qps_ratio"), median("p99_at_half_load_ms")
    return {"rounds": list(rounds), "qps_ratio": ratio, "qps_ratio_target": TARGET_QPS_RATIO,
            "p99_at_half_load_ms": p99, "call_p99_at_half_load_ms": median("call_p99_at_half_load_ms"),
            "p99_target_ms": TARGET_P99_MS,
            "met": bool(ratio is not None and ratio >= TARGET_QPS_RATIO and p99 is not None and p99 <= TARGET_P99_MS)}


def _ratio(total: float, count: float) -> Optional[float]:
    return total / count if count else None


# ----------------------------------------------------------------------------------------------
# The benchmark


def _distinct(examples: Sequence[bytes], rows: int) -> int:
    """Distinct payloads of `rows` rows: as many as the loadtest prebuilds."""
    from serving import loadtest

    return max(1, min(loadtest.MAX_DISTINCT_REQUESTS, -(-len(examples) // rows)))


def _fmt(value, digits=1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


TABLE_HEADER = (f"{'scenario':<31} {'rows/req':>8} {'conc':>4} {'QPS':>7} {'rows/s':>7} {'p50 ms':>6} {'p95 ms':>6} "
                f"{'p99 ms':>6} {'errors':>6} {'cut':>3} {'srv ms':>6} {'rows/run':>8} {'svc cpu':>7} {'cli cpu':>7}")
TABLE_LEGEND = (
    "conc: client threads (closed loop); errors: failed requests; cut: calls stopped by the time bound; "
    "srv ms: mean time in the model server's handler; rows/run: mean rows per signature run; "
    "svc cpu / cli cpu: CPU ms per request of the service processes (server, router) / of the client"
)


def format_row(row: dict) -> str:
    latency = row["latency_ms"]
    return (f"{row['scenario']:<31} {row['rows_per_request']:>8} {row['concurrency']:>4} {row['qps']:>7.0f} "
            f"{row['rows_per_s']:>7.0f} {_fmt(latency['p50'], 2):>6} {_fmt(latency['p95'], 2):>6} "
            f"{_fmt(latency['p99'], 2):>6} {sum(row['errors'].values()):>6} {row['unfinished']:>3} "
            f"{_fmt(row['server_handler_ms_mean'], 2):>6} {_fmt(row['rows_per_signature_run'], 1):>8} "
            f"{_fmt(row['service_cpu_ms_per_request'], 2):>7} {_fmt(row['client_cpu_ms_per_request'], 2):>7}")


def run(base_path: str, examples_pattern: str, workdir: str, out: str, settings: Settings = Settings(),
        model_info: Optional[dict] = None) -> dict:
    """Runs every scenario on the latest version under `base_path`; prints the table, writes JSON."""
    import tensorflow as tf

    from serving import loadtest

    in_process_threads = _configure_tensorflow_threads(settings)
    base_path, workdir = os.path.abspath(base_path), os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    examples = loadtest.read_examples(examples_pattern, MAX_EXAMPLES)
    version, version_dir = latest_version_dir(base_path)
    load_before = os.getloadavg()
    max_workers = max(16, 4 * max(settings.concurrency, settings.candidates_concurrency))
    threads = {"intra_op": settings.tensorflow_intra_op_parallelism,
               "inter_op": settings.tensorflow_inter_op_parallelism}
    specs = {
        SERVE: {"kind": "serve", "model_name": MODEL_NAME, "base_path": base_path, "batching": None,
                "max_workers": max_workers} | threads,
        SERVE_BATCHING: {"kind": "serve", "model_name": MODEL_NAME, "base_path": base_path,
                         "batching": settings.batching(), "max_workers": max_workers,
                         "processes": settings.server_processes} | threads,
    }
    assignment_log = os.path.join(workdir, "router-assignments.jsonl")
    if os.path.exists(assignment_log):
        os.remove(assignment_log)
    services: dict[str, ServiceProcess] = {}
    try:
        # Start both servers at once (TensorFlow import and model load dominate), then the router.
        for name, spec in specs.items():
            services[name] = ServiceProcess(name, spec, os.path.join(workdir, f"{name}.log"))
        loaded = tf.saved_model.load(version_dir)  # the in-process model, while the servers start
        for name in specs:
            services[name].wait_ready(SERVICE_START_TIMEOUT_S)
        config = _router_config(os.path.join(workdir, "router.yaml"), services[SERVE].target)
        services[ROUTE] = ServiceProcess(ROUTE, {"kind": "route", "config": config, "assignment_log": assignment_log,
                                                 "max_workers": max_workers}, os.path.join(workdir, "route.log"))
        services[ROUTE].wait_ready(SERVICE_START_TIMEOUT_S)

        s, c, b, n = settings, settings.concurrency, settings.batch, settings.candidates
        serve_fn = loaded.signatures[F.SERVING_SIGNATURE]
        candidates_fn = loaded.signatures[F.SCORE_CANDIDATES_SIGNATURE]
        distinct = functools.partial(_distinct, examples)
        rows = []

        def add(scenario, path, signature, measure, group=LOAD):
            row = {"scenario": scenario, "group": group, "path": path, "signature": signature} | measure()
            rows.append(row)
            print(format_row(row), flush=True)

        print(f"model {version_dir} (version {version}); {len(examples)} examples; "
              f"{os.cpu_count()} CPUs, load average {load_before[0]:.2f}")
        print(TABLE_LEGEND)
        print(TABLE_HEADER)

        def ceiling_and_batching(settings_now: Settings, add_row) -> None:
            """In-process calls, then the batching server closed loop, then at half its QPS."""
            add_row(f"in-process, batch {b}", IN_PROCESS, F.SERVING_SIGNATURE,
                    lambda: in_process(serve_fn, _payloads(examples, F.SERVING_SIGNATURE, b, distinct(b)),
                                       settings_now.requests, settings_now.duration_s, settings_now.warmup))
            add_row("serve+batching", SERVE_BATCHING, F.SERVING_SIGNATURE,
                    lambda: served(services[SERVE_BATCHING].target, [services[SERVE_BATCHING]], examples,
                                   settings_now, F.SERVING_SIGNATURE, b, c))
            # The latency at half of the max load just measured: open loop, so waiting shows.
            half_rate = settings_now.half_load * current[-1]["qps"]
            add_row(f"serve+batching at {settings_now.half_load:.0%} load", SERVE_BATCHING, F.SERVING_SIGNATURE,
                    lambda: served(services[SERVE_BATCHING].target, [services[SERVE_BATCHING]], examples,
                                   settings_now, F.SERVING_SIGNATURE, b, 2 * c, rate_qps=half_rate))

        add(f"in-process, batch {b}", IN_PROCESS, F.SERVING_SIGNATURE,
            lambda: in_process(serve_fn, _payloads(examples, F.SERVING_SIGNATURE, b, distinct(b)), s.requests,
                               s.duration_s, s.warmup))
        add(f"in-process, batch {c}x{b} merged", IN_PROCESS, F.SERVING_SIGNATURE,
            lambda: in_process(serve_fn, _payloads(examples, F.SERVING_SIGNATURE, c * b, distinct(c * b)),
                               s.requests, s.duration_s, s.warmup))
        add("serve", SERVE, F.SERVING_SIGNATURE,
            lambda: served(services[SERVE].target, [services[SERVE]], examples, s, F.SERVING_SIGNATURE, b, c))
        add("serve+batching", SERVE_BATCHING, F.SERVING_SIGNATURE,
            lambda: served(services[SERVE_BATCHING].target, [services[SERVE_BATCHING]], examples, s,
                           F.SERVING_SIGNATURE, b, c))
        half_rate = s.half_load * rows[-1]["qps"]
        add(f"serve+batching at {s.half_load:.0%} load", SERVE_BATCHING, F.SERVING_SIGNATURE,
            lambda: served(services[SERVE_BATCHING].target, [services[SERVE_BATCHING]], examples, s,
                           F.SERVING_SIGNATURE, b, 2 * c, rate_qps=half_rate))
        add("route (2 arms) -> serve", ROUTE, F.SERVING_SIGNATURE,
            lambda: served(services[ROUTE].target, [services[ROUTE], services[SERVE]], examples, s,
                           F.SERVING_SIGNATURE, b, c))
        cc = s.candidates_concurrency
        add(f"in-process, score_candidates {n}", IN_PROCESS, F.SCORE_CANDIDATES_SIGNATURE,
            lambda: in_process(candidates_fn, _payloads(examples, F.SCORE_CANDIDATES_SIGNATURE, n, distinct(n)),
                               s.requests, s.duration_s, s.warmup), CANDIDATES)
        add(f"serve, score_candidates {n}", SERVE, F.SCORE_CANDIDATES_SIGNATURE,
            lambda: served(services[SERVE].target, [services[SERVE]], examples, s, F.SCORE_CANDIDATES_SIGNATURE, n, cc),
            CANDIDATES)
        add(f"in-process, {n} rows", IN_PROCESS, F.SERVING_SIGNATURE,
            lambda: in_process(serve_fn, _payloads(examples, F.SERVING_SIGNATURE, n, distinct(n)), s.requests,
                               s.duration_s, s.warmup), CANDIDATES)
        add(f"serve, {n} rows", SERVE, F.SERVING_SIGNATURE,
            lambda: served(services[SERVE].target, [services[SERVE]], examples, s, F.SERVING_SIGNATURE, n, cc),
            CANDIDATES)
        add("serve, 1-row requests", SERVE, F.SERVING_SIGNATURE,
            lambda: served(services[SERVE].target, [services[SERVE]], examples, s, F.SERVING_SIGNATURE, 1, cc),
            CANDIDATES)

        # The targets' rounds: the ceiling and the batching server back to back, shorter each.
        rounds = [target_round(rows, s)]
        short = dataclasses.replace(s, duration_s=s.duration_s / 2, requests=max(1, s.requests // 2))
        for k in range(1, s.target_rounds):
            current = []

            def add_round_row(scenario, path, signature, measure, k=k):
                row = {"scenario": scenario, "group": LOAD, "path": path, "signature": signature} | measure()
                current.append(row)
                print(format_row(row | {"scenario": f"round {k + 1}: {scenario}"}), flush=True)

            ceiling_and_batching(short, add_round_row)
            rounds.append(target_round(current, s))
    finally:
        for service in reversed(list(services.values())):
            service.stop()

    # Time to score one user's `n` candidates, from each way's throughput (with `cc` clients).
    per_set = {row["scenario"]: 1000.0 * n / row["rows_per_s"] for row in rows
               if row["group"] == CANDIDATES and row["rows_per_s"] > 0}
    print(f"ms per {n} candidates (from rows/s): " + "; ".join(f"{k}: {v:.1f}" for k, v in per_set.items()))
    goals = targets(rounds)
    print(f"serve+batching / in-process QPS, median of {len(rounds)} rounds: {_fmt(goals['qps_ratio'], 2)} "
          f"({', '.join(_fmt(r['qps_ratio'], 2) for r in rounds)}; target >= {TARGET_QPS_RATIO}); "
          f"p99 at {settings.half_load:.0%} load: {_fmt(goals['p99_at_half_load_ms'], 2)} ms "
          f"({', '.join(_fmt(r['p99_at_half_load_ms'], 1) for r in rounds)}; target <= {TARGET_P99_MS:g}; "
          f"from each request's send: {_fmt(goals['call_p99_at_half_load_ms'], 2)} ms); "
          f"{'met' if goals['met'] else 'NOT met'}")
    load_after = os.getloadavg()
    result = {
        "model": {"base_path": base_path, "version": version, "version_dir": version_dir,
                  "examples": examples_pattern, "examples_read": len(examples)} | (model_info or {}),
        "settings": dataclasses.asdict(settings),
        "in_process_tensorflow_threads": in_process_threads,
        "targets": goals,
        "batching": settings.batching(),
        "router": {"arms": 2, "backend": SERVE, "assignment_log": True},
        "machine": {"cpu_count": os.cpu_count(), "load_average_before": load_before[0],
                    "load_average_after": load_after[0]},
        "results": rows,
        "ms_per_candidate_set": per_set,
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    return result


# ----------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `xdctr benchmark serve` flags."""
    parser.add_argument("--model-dir", help="an exported SavedModel directory, or a TF Serving base path of versions "
                                            "(default: train a model on a generated log under --workdir)")
    parser.add_argument("--examples", help="TFRecord pattern of serialized tf.Examples for the requests "
                                           "(required with --model-dir; default: the generated eval split)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="registered model to train when no --model-dir")
    parser.add_argument("--users", type=int, default=DEFAULT_USERS, help="users of the generated log")
    parser.add_argument("--train-steps", type=int, default=DEFAULT_TRAIN_STEPS,
                        help="training steps of the benchmark model (when no --model-dir)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated log and of training")
    parser.add_argument("--requests", type=int, default=DEFAULT_REQUESTS,
                        help="at most this many requests per scenario")
    parser.add_argument("--duration", type=float, default=DEFAULT_DURATION_S,
                        help="at most this many seconds per scenario")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="closed-loop clients")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH, help=f"rows per {F.SERVING_SIGNATURE} request")
    parser.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES, help="candidates per user")
    parser.add_argument("--candidates-concurrency", type=int, default=DEFAULT_CANDIDATES_CONCURRENCY,
                        help="clients of the candidate scenarios")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="uncounted requests before each scenario")
    parser.add_argument("--batch-timeout-micros", type=int, default=DEFAULT_BATCH_TIMEOUT_MICROS,
                        help="batching: how long a batch waits to fill")
    parser.add_argument("--num-batch-threads", type=int, default=DEFAULT_NUM_BATCH_THREADS,
                        help="batch threads of the batching server (see the module docstring)")
    parser.add_argument("--server-processes", type=int, default=DEFAULT_SERVER_PROCESSES,
                        help="processes of the batching server (xdctr serve --processes; the plain server has one)")
    parser.add_argument("--tensorflow-intra-op-parallelism", type=int, default=DEFAULT_TF_THREADS,
                        help="TensorFlow's intra-op threads in the servers and the in-process calls (0: TF's choice)")
    parser.add_argument("--tensorflow-inter-op-parallelism", type=int, default=DEFAULT_TF_THREADS,
                        help="TensorFlow's inter-op threads in the servers and the in-process calls (0: TF's choice)")
    parser.add_argument("--half-load", type=float, default=DEFAULT_HALF_LOAD,
                        help="the latency scenario's rate as a fraction of serve+batching's max QPS")
    parser.add_argument("--target-rounds", type=int, default=DEFAULT_TARGET_ROUNDS,
                        help="rounds of in-process + serve+batching the targets take the median of (the first is "
                             "the main table's)")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR, help="generated data, model, service logs")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON results")


def run_from_args(args: argparse.Namespace) -> int:
    """`xdctr benchmark serve`."""
    settings = Settings(requests=args.requests, duration_s=args.duration, concurrency=args.concurrency,
                        batch=args.batch, candidates=args.candidates,
                        candidates_concurrency=args.candidates_concurrency,
                        warmup=args.warmup, batch_timeout_micros=args.batch_timeout_micros,
                        num_batch_threads=args.num_batch_threads, server_processes=args.server_processes,
                        tensorflow_intra_op_parallelism=args.tensorflow_intra_op_parallelism,
                        tensorflow_inter_op_parallelism=args.tensorflow_inter_op_parallelism,
                        half_load=args.half_load, target_rounds=args.target_rounds)
    _configure_tensorflow_threads(settings)  # before training a model here runs any op
    workdir = os.path.abspath(args.workdir)
    if args.model_dir:
        if not args.examples:
            raise ValueError("--model-dir needs --examples (a TFRecord pattern of tf.Examples the model reads)")
        base_path, examples = serving_base_path(args.model_dir, workdir), args.examples
        info = {"source": args.model_dir}
    else:
        import models

        if args.model not in models.names():
            raise ValueError(f"--model {args.model!r} is not a registered model; known: {models.names()}")
        base_path, examples = prepare_model(workdir, args.model, args.users, args.train_steps, args.seed)
        info = {"source": "generated", "model": args.model, "users": args.users, "train_steps": args.train_steps,
                "seed": args.seed}
    run(base_path, examples, workdir, args.out, settings, info)
    return 0


if __name__ == "__main__" and sys.argv[1:2] == [CHILD_FLAG]:
    sys.exit(_service_main(json.loads(sys.argv[2])))
