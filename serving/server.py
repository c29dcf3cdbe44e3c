"""`xdctr serve`: a TensorFlow-Serving-compatible scoring server for exported SavedModels (lifecycle).

It speaks TF Serving's API with the protos of `tensorflow-serving-api`, so a program written
against TF Serving works unchanged (and vice versa). The layers, as TF Serving's:

- `serving.loader`: one SavedModel version directory -> runnable signatures;
- `serving.versions`: the version manager (sources, policies, loads, unloads, labels);
- `serving.tensors`: request decoding and response encoding (tensor <-> proto);
- `serving.inference`: Predict, Classify, Regress, MultiInference, GetModelMetadata on a loaded version;
- `serving.admin`: ModelService (GetModelStatus, HandleReloadConfigRequest and its checks);
- `serving.grpc_frontend`: the gRPC services (PredictionService, ModelService, health) on grpc.aio;
- `serving.rest`, `serving.rest_json`: TF Serving's REST API and its JSON formats;
- this module: starting and stopping it all, polling, and the `xdctr serve` flags.

Status codes are TF Serving's: INVALID_ARGUMENT for bad tensors, a wrong dtype, unknown
inputs/outputs or version label, malformed examples, shapes the graph rejects; NOT_FOUND for unknown model or version;
FAILED_PRECONDITION for an unknown Predict signature; RESOURCE_EXHAUSTED for a message over
`--max-request-bytes` (from gRPC), more rows than `--max-request-rows` or more elements than
`max_request_elements`; with batching, UNAVAILABLE for a full batch queue and INVALID_ARGUMENT
for a request over `max_batch_size`. The process never crashes on a request: anything else is
INTERNAL and logged with its trace.

Config reload through HandleReloadConfigRequest and by polling the config file (a file whose
content changed is applied; an unchanged file does not undo a reload made through the RPC).

Run it with `xdctr serve --model-name NAME --model-base-path PATH --port 8500` or
`xdctr serve --model-config-file models.config` (TF Serving's flag spellings work too, e.g.
`--rest_api_port=8501`); in Python, `start(ServerOptions(...))`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import signal
import threading
import time
from typing import Optional

from grpc_health.v1 import health, health_pb2
from tensorflow_serving.config import model_server_config_pb2

from serving.admin import ADMIN_TOKEN_ENV, ModelAdmin
from serving.batching import BatchingOptions
from serving.config import (
    DEFAULT_FILE_SYSTEM_POLL_WAIT_SECONDS,
    DEFAULT_GRACE_SECONDS,
    DEFAULT_MAX_REQUEST_ELEMENTS,
    DEFAULT_MAX_REQUEST_ROWS,
    DEFAULT_MODEL_NAME,
    DEFAULT_REST_API_TIMEOUT_MS,
    MAX_MESSAGE_BYTES,
    ServerOptions,
    parse_model_server_config,
    read_model_server_config,
)
from serving.grpc_frontend import SERVICE_NAMES, GrpcServer
from serving.inference import Inference
from serving.monitoring import MetricsHTTPServer, ServingMetrics, configure_json_logging, log_event
from serving.rest import RestApi, RestServer
from serving.status import ServingError, one_line
from serving.tensors import RequestLimits
from serving.versions import VersionManager

logger = logging.getLogger(__name__)

__all__ = [
    "ServerOptions",
    "ModelServer",
    "RunningServer",
    "start",
    "start_server",
    "serve",
    "add_arguments",
    "run_from_args",
]


class ModelServer:
    """The models and the request handling on them, without any frontend.

    Attributes:
      metrics: request, batch and load metrics.
      manager: the `VersionManager` (configs, polls, loaded versions, labels).
      inference: the PredictionService methods (`predict`, `classify`, ...).
      admin: the ModelService methods (`get_model_status`, `reload_config`).

    Args:
      metrics: a fresh `ServingMetrics` by default.
      batching: dynamic batching knobs; None serves each request alone.
      max_request_rows, max_request_elements: request size limits (RESOURCE_EXHAUSTED above).
      health_servicer: gets each model's SERVING / NOT_SERVING status.
      admin_token, allow_remote_admin: who may reload the config (`serving.admin`).
      reload_refusal: why config reloads by RPC are refused (None: they are not).
    """

    def __init__(
        self,
        metrics: Optional[ServingMetrics] = None,
        batching: Optional[BatchingOptions] = None,
        max_request_rows: int = DEFAULT_MAX_REQUEST_ROWS,
        max_request_elements: int = DEFAULT_MAX_REQUEST_ELEMENTS,
        health_servicer: Optional[health.HealthServicer] = None,
        admin_token: Optional[str] = None,
        allow_remote_admin: bool = False,
        reload_refusal: Optional[str] = None,
    ):
        self.metrics = metrics if metrics is not None else ServingMetrics()
        self.manager = VersionManager(self.metrics, lambda name, loaded: self.inference.replay_warmup(name, loaded),
                                      health_servicer)
        self.inference = Inference(self.manager, self.metrics, batching,
                                   RequestLimits(max_request_rows, max_request_elements))
        self.admin = ModelAdmin(self.manager, admin_token, allow_remote_admin, reload_refusal)

    def close(self, timeout: Optional[float] = None) -> None:
        """Runs the queued batches and stops the batch threads."""
        self.inference.close(timeout)


class _Poller:
    """Polls the base paths (and the config file) on one daemon thread."""

    def __init__(self, model_server: ModelServer, options: ServerOptions, config_file_config):
        self._model_server = model_server
        self._fs_seconds = options.file_system_poll_wait_seconds
        self._config_file = options.model_config_file
        self._config_seconds = options.model_config_file_poll_wait_seconds if self._config_file else 0.0
        self._applied_file_config = config_file_config  # last file content applied (or refused)
        self._stop = threading.Event()
        self._thread = None
        if self._fs_seconds > 0 or self._config_seconds > 0:
            self._thread = threading.Thread(target=self._loop, name="xdctr-poller", daemon=True)
            self._thread.start()

    def note_applied(self, config) -> None:
        self._applied_file_config = config

    def _loop(self) -> None:
        now = time.monotonic()
        next_fs = now + self._fs_seconds if self._fs_seconds > 0 else math.inf
        next_config = now + self._config_seconds if self._config_seconds > 0 else math.inf
        while not self._stop.wait(max(min(next_fs, next_config) - time.monotonic(), 0.0)):
            try:
                now = time.monotonic()
                if now >= next_config:
                    self._poll_config_file()
                    next_config = time.monotonic() + self._config_seconds
                if now >= next_fs:
                    self._model_server.manager.poll()
                    next_fs = time.monotonic() + self._fs_seconds
            except Exception:  # the poller must outlive any one bad poll
                logger.exception("Poll failed")

    def _poll_config_file(self) -> None:
        try:
            with open(self._config_file, encoding="utf-8") as f:
                config = parse_model_server_config(f.read(), self._config_file)
        except (OSError, ValueError) as e:
            log_event(logger, logging.WARNING, "config_file_unreadable", path=self._config_file, error=one_line(e))
            return
        if config == self._applied_file_config:
            return
        self._applied_file_config = config  # a refused config is not retried until the file changes
        try:
            self._model_server.manager.reload_config(config)
        except ServingError as e:
            log_event(logger, logging.WARNING, "config_reload_refused", source=self._config_file,
                      code=e.code.name, error=e.message)

    def stop(self, timeout: Optional[float] = None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)


class RunningServer:
    """A started server: `port`, `rest_port`, `monitoring_port`, `model_server`; `stop(grace)`, `reload_config()`."""

    def __init__(self, options, grpc_server, port, model_server, health_servicer, poller, metrics_http, rest):
        self.options = options
        self.grpc_server = grpc_server
        self.port = port
        self.model_server = model_server
        self.monitoring_port = metrics_http.port if metrics_http is not None else None
        self.rest_port = rest.port if rest is not None else None
        self._health = health_servicer
        self._poller = poller
        self._metrics_http = metrics_http
        self._rest = rest
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    @property
    def target(self) -> str:
        """The "host:port" gRPC clients on this machine connect to."""
        return _address(self._local_host, self.port)

    @property
    def rest_url(self) -> Optional[str]:
        """"http://host:port" of the REST API for clients on this machine (None without it)."""
        return None if self.rest_port is None else f"http://{_address(self._local_host, self.rest_port)}"

    @property
    def _local_host(self) -> str:
        return self.options.host if self.options.host not in ("0.0.0.0", "::", "[::]", "") else "127.0.0.1"

    def poll(self) -> None:
        """Looks for new versions now (besides the periodic polls)."""
        self.model_server.manager.poll()

    def reload_config(self) -> None:
        """Re-reads --model-config-file and applies it; ValueError (one line) if it is refused."""
        path = self.options.model_config_file
        if path is None:
            raise ValueError("This server was started with --model-base-path; there is no --model-config-file to reload.")
        config = read_model_server_config(path)
        try:
            self.model_server.manager.reload_config(config)
        except ServingError as e:
            raise ValueError(f"{path}: {e.message}") from None
        self._poller.note_applied(config)

    def stop(self, grace: Optional[float] = None) -> None:
        """Stops taking requests, lets running ones finish for `grace` s (options.grace by default)."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            grace = self.options.grace if grace is None else grace
            log_event(logger, logging.INFO, "server_stopping", port=self.port, grace_seconds=grace)
            self._health.enter_graceful_shutdown()  # health checks answer NOT_SERVING while draining
            self._poller.stop(timeout=grace + 5.0)
            if self._rest is not None:
                self._rest.stop(grace)
            self.grpc_server.stop(grace).wait(grace + 5.0)
            self.model_server.close(timeout=grace + 5.0)
            if self._metrics_http is not None:
                self._metrics_http.stop()
            self._stopped.set()
            log_event(logger, logging.INFO, "server_stopped", port=self.port)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Blocks until the server is stopped (True) or `timeout` passes (False)."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):  # IPv6 literal
        host = f"[{host}]"
    return f"{host}:{port}"


def start(options: ServerOptions) -> RunningServer:
    """Loads the models, starts gRPC (and metrics, and polling) and returns the running server.

    Raises ValueError (one line) for a config that cannot be read or served, a model without a
    loadable version, or an address that cannot be bound.
    """
    configure_tensorflow_threads(options.tensorflow_intra_op_parallelism, options.tensorflow_inter_op_parallelism)
    return _start(options, options.model_server_config())


def configure_tensorflow_threads(intra_op: int, inter_op: int) -> None:
    """Sizes TensorFlow's thread pools (0 keeps TensorFlow's choice); ValueError once TensorFlow runs.

    TensorFlow fixes its pools when it first runs an op, so this must come before any model loads
    in the process (as in the `xdctr serve` process).
    """
    import tensorflow as tf

    for name, value, setter, getter in (
        ("intra", intra_op, tf.config.threading.set_intra_op_parallelism_threads,
         tf.config.threading.get_intra_op_parallelism_threads),
        ("inter", inter_op, tf.config.threading.set_inter_op_parallelism_threads,
         tf.config.threading.get_inter_op_parallelism_threads),
    ):
        if value and getter() != value:
            try:
                setter(value)
            except RuntimeError:
                raise ValueError(f"--tensorflow_{name}_op_parallelism={value}: TensorFlow is already running in "
                                 "this process with other thread pools; set it before any model is loaded.") from None


def _start(options: ServerOptions, config: model_server_config_pb2.ModelServerConfig) -> RunningServer:
    metrics = ServingMetrics()
    health_servicer = health.HealthServicer()
    batching = options.batching_options()
    model_server = ModelServer(
        metrics=metrics,
        batching=batching,
        max_request_rows=options.max_request_rows,
        max_request_elements=options.max_request_elements,
        health_servicer=health_servicer,
        admin_token=options.admin_token,
        allow_remote_admin=options.allow_remote_admin,
        reload_refusal=None if options.processes == 1 else (
            f"This server runs {options.processes} processes and a ReloadConfigRequest reaches one of them; "
            "change --model_config_file instead, which --model_config_file_poll_wait_seconds applies to every "
            "process."),
    )
    metrics_http, grpc_server, rest = None, None, None
    try:
        rest_metrics_path = options.metrics_path_on_rest_port()  # a bad monitoring config fails before loading
        model_server.manager.load_config(config)
        grpc_server = GrpcServer(model_server.inference, model_server.admin, health_servicer,
                                 options.max_workers, options.max_request_bytes)
        address = _address(options.host, options.port)
        try:
            port = grpc_server.add_insecure_port(address)
        except RuntimeError as e:
            raise ValueError(f"Cannot bind the scoring server to {address}: {e}") from None
        if port == 0:
            raise ValueError(f"Cannot bind the scoring server to {address}.")
        if options.monitoring_port is not None:
            metrics_http = MetricsHTTPServer(metrics, options.monitoring_host, options.monitoring_port)
        if options.rest_api_port is not None:
            api = RestApi(model_server.inference, model_server.admin, options.rest_api_timeout_in_ms / 1000.0)
            rest = RestServer(api, options.host, options.rest_api_port, rest_metrics_path, options.max_request_bytes,
                              reuse_port=options.processes > 1)
    except BaseException:
        if grpc_server is not None:
            grpc_server.stop(None)  # frees a port already bound
        if metrics_http is not None:
            metrics_http.stop()
        model_server.close(timeout=5.0)
        raise
    grpc_server.start()
    for service in ("", *SERVICE_NAMES):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    poller = _Poller(model_server, options, config if options.model_config_file else None)
    running = RunningServer(options, grpc_server, port, model_server, health_servicer, poller, metrics_http, rest)
    log_event(
        logger,
        logging.INFO,
        "server_started",
        address=_address(options.host, port),
        models={name: sorted(model_server.manager.loaded_versions(name)) for name in model_server.manager.model_names},
        batching=None if batching is None else dataclasses.asdict(batching),
        monitoring=None if metrics_http is None else f"http://{_address(options.monitoring_host, metrics_http.port)}",
        rest_api=None if rest is None else f"http://{_address(options.host, rest.port)}",
    )
    return running


def start_server(
    model_name: str,
    base_path: str,
    port: int = 0,
    host: str = "127.0.0.1",
    max_workers: int = 8,
) -> tuple[GrpcServer, int, ModelServer]:
    """Loads one model, starts the gRPC server and returns (server, bound port, model server).

    Every version under `base_path` that loads is served (version policy `all`); requests
    without a version get the highest. `port=0` binds a free port. This server looks for
    versions once, at start, so stopping the returned server (`server.stop(grace)`)
    stops everything; use `start` for polling, config files, batching and metrics. Raises
    ValueError when no version under `base_path` loads or the address cannot be bound.
    """
    options = ServerOptions(
        port=port,
        host=host,
        model_name=model_name,
        model_base_path=base_path,
        max_workers=max_workers,
        file_system_poll_wait_seconds=0.0,
    )
    config = options.model_server_config()
    config.model_config_list.config[0].model_version_policy.all.SetInParent()
    running = _start(options, config)
    return running.grpc_server, running.port, running.model_server


def serve_until_signal(options: ServerOptions) -> None:
    """Serves until SIGINT or SIGTERM, then stops gracefully. Must run in the main thread."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        running = start(options)
        try:
            stop.wait()
        finally:
            running.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(
    model_name: str,
    base_path: str,
    port: int = 8500,
    host: str = "0.0.0.0",
    max_workers: int = 16,
    grace: float = DEFAULT_GRACE_SECONDS,
) -> None:
    """Serves one model (polling for new versions) until SIGINT or SIGTERM."""
    serve_until_signal(
        ServerOptions(port=port, host=host, model_name=model_name, model_base_path=base_path,
                      max_workers=max_workers, grace=grace)
    )


def _flag(value: str) -> bool:
    """A TF Serving bool flag value: true/false (also 1/0, yes/no)."""
    lowered = value.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `xdctr serve` flags: tensorflow_model_server's, in kebab case, and its own spelling as aliases.

    `xdctr serve --port=8500 --rest_api_port=8501 --model_config_file=... --enable_batching=true ...`
    takes the command line of a TF Serving deployment unchanged.
    """
    parser.add_argument("--port", type=int, default=8500, help="gRPC port (default 8500)")
    parser.add_argument("--rest-api-port", "--rest_api_port", type=int, default=0,
                        help="serve TF Serving's REST API on this port (default 0: off, as in TF Serving)")
    parser.add_argument("--rest-api-timeout-in-ms", "--rest_api_timeout_in_ms", type=int,
                        default=DEFAULT_REST_API_TIMEOUT_MS, help="REST requests' deadline (default 30000)")
    parser.add_argument("--host", default="0.0.0.0", help="gRPC, REST and metrics address to bind (default 0.0.0.0)")
    parser.add_argument("--model-name", "--model_name", default=DEFAULT_MODEL_NAME,
                        help="served model name with --model-base-path")
    parser.add_argument("--model-base-path", "--model_base_path", help="directory with <version>/saved_model.pb (one model)")
    parser.add_argument(
        "--model-config-file", "--model_config_file",
        help="TF Serving ModelServerConfig text file (models, version policies, labels)",
    )
    parser.add_argument(
        "--model-config-file-poll-wait-seconds", "--model_config_file_poll_wait_seconds", type=float, default=0.0,
        help="re-read --model-config-file this often (default 0: never)",
    )
    parser.add_argument(
        "--file-system-poll-wait-seconds", "--file_system_poll_wait_seconds", type=float,
        default=DEFAULT_FILE_SYSTEM_POLL_WAIT_SECONDS,
        help="look for new model versions this often (default 1; 0: only at start)",
    )
    parser.add_argument("--enable-batching", "--enable_batching", type=_flag, nargs="?", const=True, default=False,
                        metavar="true|false", help="batch concurrent requests together")
    parser.add_argument("--batching-parameters-file", "--batching_parameters_file",
                        help="TF Serving BatchingParameters text file")
    parser.add_argument("--monitoring-config-file", "--monitoring_config_file",
                        help="TF Serving MonitoringConfig text file: Prometheus metrics on the REST API port")
    parser.add_argument(
        "--monitoring-port", type=int, default=None,
        help="serve Prometheus metrics at http://HOST:PORT/monitoring/prometheus/metrics (default: off)",
    )
    parser.add_argument(
        "--admin-token", default=None,
        help=f"require 'authorization: Bearer TOKEN' for config reloads (default: ${ADMIN_TOKEN_ENV} if set)",
    )
    parser.add_argument(
        "--allow-remote-admin", action="store_true", help="accept config reloads from non-loopback peers"
    )
    parser.add_argument("--max-workers", type=int, default=16, help="gRPC handler threads (default 16)")
    parser.add_argument("--tensorflow-intra-op-parallelism", "--tensorflow_intra_op_parallelism", type=int, default=0,
                        help="threads of one TensorFlow op (default 0: TensorFlow's choice)")
    parser.add_argument("--tensorflow-inter-op-parallelism", "--tensorflow_inter_op_parallelism", type=int, default=0,
                        help="TensorFlow ops run at once (default 0: TensorFlow's choice)")
    parser.add_argument(
        "--grace", type=float, default=DEFAULT_GRACE_SECONDS,
        help="seconds running requests get to finish at shutdown (default 5)",
    )
    parser.add_argument(
        "--max-request-bytes", type=int, default=MAX_MESSAGE_BYTES, help="largest request message (RESOURCE_EXHAUSTED above)"
    )
    parser.add_argument(
        "--max-request-rows", type=int, default=DEFAULT_MAX_REQUEST_ROWS,
        help=f"most rows per request input (default {DEFAULT_MAX_REQUEST_ROWS}; RESOURCE_EXHAUSTED above)",
    )
    parser.add_argument(
        "--processes", type=int, default=1,
        help="server processes sharing the ports (SO_REUSEPORT), each with its own GIL and copy of the models; "
             "config reloads by RPC are then refused and --monitoring-port P gives process i port P + i (default 1)",
    )


def _absolute(path: Optional[str]) -> Optional[str]:
    return path if path is None or "://" in path else os.path.abspath(path)


def options_from_args(args: argparse.Namespace) -> ServerOptions:
    """ServerOptions from parsed `add_arguments` flags; ValueError for a bad combination."""
    return ServerOptions(
        port=args.port,
        host=args.host,
        model_name=args.model_name,
        model_base_path=_absolute(args.model_base_path),
        model_config_file=_absolute(args.model_config_file),
        model_config_file_poll_wait_seconds=args.model_config_file_poll_wait_seconds,
        file_system_poll_wait_seconds=args.file_system_poll_wait_seconds,
        enable_batching=args.enable_batching,
        batching_parameters_file=args.batching_parameters_file,
        rest_api_port=args.rest_api_port or None,  # 0 is off, as in TF Serving
        rest_api_timeout_in_ms=args.rest_api_timeout_in_ms,
        monitoring_config_file=args.monitoring_config_file,
        monitoring_port=args.monitoring_port,
        monitoring_host=args.host,
        admin_token=args.admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None,
        allow_remote_admin=args.allow_remote_admin,
        max_workers=args.max_workers,
        tensorflow_intra_op_parallelism=args.tensorflow_intra_op_parallelism,
        tensorflow_inter_op_parallelism=args.tensorflow_inter_op_parallelism,
        grace=args.grace,
        max_request_bytes=args.max_request_bytes,
        max_request_rows=args.max_request_rows,
        processes=args.processes,
    )


def run_from_args(args: argparse.Namespace) -> int:
    """`xdctr serve`: JSON Lines logs on stderr, serve until SIGINT/SIGTERM, return 0.

    User mistakes (flags, config files, nothing loadable, port taken) raise ValueError with one
    line; the CLI reports it as a usage error.
    """
    options = options_from_args(args)
    configure_json_logging(logging.INFO)
    if options.processes > 1:
        from serving import processes

        return processes.serve_processes_until_signal(options)
    serve_until_signal(options)
    return 0
