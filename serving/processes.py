"""`xdctr serve --processes N`: N server processes on one gRPC port (and one REST port).

A Python server runs its gRPC event loop, request decoding and batch assembly under one GIL, so
one process uses about one core however many the machine has (README, Measured: on 2 cores and
16 clients, one batching process served about 2,100 QPS with one core busy, two 2,227 QPS with
both cores busy). TF Serving is one C++ process with many threads; the Python equivalent is
several processes. Each worker is a whole `serving.server` (its own models, batching, version polling,
health) and binds the shared ports with SO_REUSEPORT, so the kernel spreads the connections over
the workers; a client with several connections spreads its load, a client with one connection
talks to one worker.

The parent reserves the ports (a bound, non-listening SO_REUSEPORT socket of each, so port 0 picks
a free port and nothing else takes it), starts the workers (multiprocessing "spawn": TensorFlow
is never forked), waits until every worker serves, and stops them all when one fails or when it
is stopped. What differs from one process:
- config reloads by RPC are refused with FAILED_PRECONDITION (one would reach one worker): change
  the --model_config_file, which --model_config_file_poll_wait_seconds applies to every worker;
- metrics are per worker: --monitoring-port P gives worker i the port P + i (0: free ports);
  --monitoring_config_file (metrics on the shared REST port) is refused;
- memory: each worker holds its own copy of every loaded version.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import signal
import socket
import threading
import time
from typing import Optional

from serving.config import ServerOptions
from serving.monitoring import configure_json_logging, log_event

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 300.0  # model loads and warmup of every worker
STOP_MESSAGE = "stop"


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, non-listening SO_REUSEPORT socket on (host, port): holds the port for the group.

    ValueError (one line) when the port is taken by a socket that does not share it.
    """
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host.strip("[]") or "0.0.0.0", port))
    except OSError as e:
        sock.close()
        raise ValueError(f"Cannot reserve port {port} on {host} for the server processes: {e.strerror}") from None
    return sock


def worker_options(options: ServerOptions, index: int, port: int, rest_api_port: Optional[int]) -> ServerOptions:
    """The options of worker `index`: the group's ports, its own monitoring port."""
    monitoring = options.monitoring_port
    if monitoring:
        monitoring += index
    return dataclasses.replace(options, port=port, rest_api_port=rest_api_port, monitoring_port=monitoring)


def _worker_main(options: ServerOptions, index: int, conn) -> None:
    """One worker: serve, report the bound ports, stop when told (or when the parent's end closes)."""
    from serving import server

    configure_json_logging(logging.INFO)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when the group stops
    try:
        running = server.start(options)
    except Exception as e:  # reported to the parent, which fails the start with it
        conn.send({"error": f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)})
        conn.close()
        return
    conn.send({"index": index, "port": running.port, "rest_port": running.rest_port,
               "monitoring_port": running.monitoring_port})
    try:
        while conn.recv() != STOP_MESSAGE:
            pass
    except (EOFError, OSError):  # the parent is gone
        pass
    running.stop()
    conn.close()


class ProcessGroup:
    """Started worker processes: `port`, `rest_port`, `monitoring_ports`; `stop(grace)`, `wait()`."""

    def __init__(self, options: ServerOptions, workers, conns, reserved, reports):
        self.options = options
        self.port = reports[0]["port"]
        self.rest_port = reports[0]["rest_port"]
        self.monitoring_ports = [r["monitoring_port"] for r in reports]
        self._workers, self._conns, self._reserved = workers, conns, reserved
        self._stopped = threading.Event()

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self._workers]

    @property
    def target(self) -> str:
        host = self.options.host if self.options.host not in ("0.0.0.0", "::", "[::]", "") else "127.0.0.1"
        return f"{host}:{self.port}"

    def failed_worker(self) -> Optional[tuple[int, Optional[int]]]:
        """(index, exit code) of a worker that is no longer running, or None while all run."""
        for index, worker in enumerate(self._workers):
            if not worker.is_alive():
                return index, worker.exitcode
        return None

    def stop(self, grace: Optional[float] = None) -> None:
        """Tells every worker to stop (each lets running requests finish), then waits for them."""
        if self._stopped.is_set():
            return
        grace = self.options.grace if grace is None else grace
        for conn in self._conns:
            try:
                conn.send(STOP_MESSAGE)
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + grace + 15.0
        for worker in self._workers:
            worker.join(max(deadline - time.monotonic(), 0.1))
            if worker.is_alive():
                worker.kill()
                worker.join(5.0)
        for item in self._conns + self._reserved:
            item.close()
        self._stopped.set()
        log_event(logger, logging.INFO, "server_group_stopped", port=self.port, processes=len(self._workers))

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self._stopped.wait(timeout)

    def __enter__(self) -> "ProcessGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_processes(options: ServerOptions, ready_timeout_s: float = READY_TIMEOUT_S) -> ProcessGroup:
    """Starts `options.processes` workers on shared ports; returns once every one serves.

    Raises ValueError (one line) when a port cannot be reserved or a worker cannot start (the
    first worker's own error, e.g. a config that cannot be read), after stopping the others.
    """
    reserved = [reserve_port(options.host, options.port)]
    port = reserved[0].getsockname()[1]
    rest_port = options.rest_api_port
    if rest_port is not None:
        reserved.append(reserve_port(options.host, rest_port))
        rest_port = reserved[-1].getsockname()[1]
    context = multiprocessing.get_context("spawn")
    workers, conns = [], []
    try:
        for index in range(options.processes):
            parent_end, child_end = context.Pipe()
            worker = context.Process(target=_worker_main, name=f"xdctr-serve-{index}",
                                     args=(worker_options(options, index, port, rest_port), index, child_end))
            worker.start()
            child_end.close()
            workers.append(worker)
            conns.append(parent_end)
        reports = []
        deadline = time.monotonic() + ready_timeout_s
        for index, (worker, conn) in enumerate(zip(workers, conns)):
            if not conn.poll(max(deadline - time.monotonic(), 0.0)):
                raise ValueError(f"server process {index} did not start within {ready_timeout_s:g} s")
            try:
                report = conn.recv()
            except EOFError:
                worker.join(5.0)
                raise ValueError(f"server process {index} exited with code {worker.exitcode} before serving") from None
            if "error" in report:
                raise ValueError(report["error"])
            reports.append(report)
    except BaseException:
        for conn in conns:
            try:
                conn.send(STOP_MESSAGE)
            except (BrokenPipeError, OSError):
                pass
        for worker in workers:
            worker.join(10.0)
            if worker.is_alive():
                worker.kill()
        for item in conns + reserved:
            item.close()
        raise
    group = ProcessGroup(options, workers, conns, reserved, reports)
    log_event(logger, logging.INFO, "server_group_started", address=group.target, processes=options.processes,
              pids=group.pids, monitoring_ports=group.monitoring_ports, rest_port=group.rest_port)
    return group


def serve_processes_until_signal(options: ServerOptions) -> int:
    """Serves with `options.processes` workers until SIGINT or SIGTERM (0) or until a worker
    exits on its own (1: the others are stopped too). Must run in the main thread."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        group = start_processes(options)
        try:
            while not stop.wait(1.0):
                failed = group.failed_worker()
                if failed is not None:
                    log_event(logger, logging.ERROR, "server_process_exited", index=failed[0], exit_code=failed[1])
                    return 1
            return 0
        finally:
            group.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
