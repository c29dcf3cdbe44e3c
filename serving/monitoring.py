"""Prometheus metrics and structured (JSON Lines) logs of `xdctr serve`.

Metrics live in a `CollectorRegistry` per server, so several servers (tests, benchmarks) can run
in one process. They are served over HTTP at `METRICS_PATH`, the path TF Serving's
`prometheus_config` uses:

| metric | type | labels |
|---|---|---|
| `xdctr_serving_requests_total` | counter | model, version, signature, api, status |
| `xdctr_serving_request_latency_seconds` | histogram | model, version, signature, api, status |
| `xdctr_serving_batch_size` | histogram | model, version, signature |
| `xdctr_serving_model_load_events_total` | counter | model, event (load_success, load_failure, unload) |
| `xdctr_serving_model_versions_available` | gauge | model |

`status` is the gRPC status code name (OK, INVALID_ARGUMENT, ...). A request for a model the
server does not serve is counted with empty model, version and signature labels, so clients
cannot create label values at will. `batch_size` records the rows of every signature run: a
merged batch with batching on, the request's own rows with batching off.

Logs: `log_event(logger, level, event, **fields)` logs one event with named fields; with
`JsonFormatter` each event is one JSON object per line
(`{"ts": ..., "level": ..., "logger": ..., "event": ..., <fields>}`).
"""

from __future__ import annotations

import dataclasses
import datetime
import http.server
import json
import logging
import threading
from typing import Any, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

METRICS_PATH = "/monitoring/prometheus/metrics"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)
LOAD_SUCCESS = "load_success"
LOAD_FAILURE = "load_failure"
UNLOAD = "unload"

_EVENT = "xdctr_event"
_FIELDS = "xdctr_fields"


@dataclasses.dataclass
class RequestLabels:
    """What a request resolved to, for its metrics (filled in as it is resolved)."""

    model: str = ""
    version: str = ""
    signature: str = ""


class ServingMetrics:
    """The server's Prometheus metrics, registered in `registry` (a fresh one by default)."""

    def __init__(self, registry: Optional[CollectorRegistry] = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        request_labels = ["model", "version", "signature", "api", "status"]
        self.requests = Counter(
            "xdctr_serving_requests", "PredictionService requests, by outcome.", request_labels, registry=self.registry
        )
        self.request_latency = Histogram(
            "xdctr_serving_request_latency_seconds",
            "PredictionService request latency in seconds, as seen by the server.",
            request_labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "xdctr_serving_batch_size",
            "Rows per signature run (merged batches when batching is on).",
            ["model", "version", "signature"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.load_events = Counter(
            "xdctr_serving_model_load_events",
            "Model version load successes, load failures and unloads.",
            ["model", "event"],
            registry=self.registry,
        )
        self.versions_available = Gauge(
            "xdctr_serving_model_versions_available",
            "Versions of the model that take traffic.",
            ["model"],
            registry=self.registry,
        )

        # Label values -> metric children: `labels()` costs as much as a request's decoding.
        self._request_children: dict[tuple, tuple] = {}
        self._batch_children: dict[tuple, Any] = {}

    def observe_request(
        self, model: str, version: str, signature: str, api: str, status: str, seconds: float
    ) -> None:
        key = (model, version, signature, api, status)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (self.requests.labels(*key), self.request_latency.labels(*key))
        children[0].inc()
        children[1].observe(seconds)

    def observe_batch(self, model: str, version: str, signature: str, rows: int) -> None:
        key = (model, version, signature)
        child = self._batch_children.get(key)
        if child is None:
            child = self._batch_children[key] = self.batch_size.labels(*key)
        child.observe(rows)

    def load_event(self, model: str, event: str) -> None:
        self.load_events.labels(model, event).inc()

    def set_versions_available(self, model: str, count: int) -> None:
        self.versions_available.labels(model).set(count)

    def remove_model(self, model: str) -> None:
        """Drops the gauge of a model that is no longer configured."""
        try:
            self.versions_available.remove(model)
        except KeyError:
            pass

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)


class _MetricsHandler(http.server.BaseHTTPRequestHandler):
    metrics: Any  # set on the per-server subclass: anything with `exposition() -> bytes`

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path.split("?", 1)[0] != METRICS_PATH:
            self.send_error(404, f"Metrics are at {METRICS_PATH}")
            return
        body = self.metrics.exposition()
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # scrapes are not worth a log line each
        pass


class MetricsHTTPServer:
    """Serves `metrics` (`exposition() -> bytes`) at http://host:port/monitoring/prometheus/metrics on a daemon thread."""

    def __init__(self, metrics, host: str = "127.0.0.1", port: int = 0):
        handler = type("MetricsHandler", (_MetricsHandler,), {"metrics": metrics})
        try:
            self._server = http.server.ThreadingHTTPServer((host, port), handler)
        except OSError as e:
            raise ValueError(f"Cannot bind the monitoring server to {host}:{port}: {e.strerror}") from None
        self._server.daemon_threads = True
        self.host = host
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="xdctr-monitoring", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """Logs `event` with named fields: readable as text, one JSON object with `JsonFormatter`."""
    if not logger.isEnabledFor(level):
        return
    text = " ".join([event] + [f"{key}={value}" for key, value in fields.items()])
    logger.log(level, "%s", text, extra={_EVENT: event, _FIELDS: fields}, stacklevel=2)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC ISO 8601), level, logger, event or message, fields, error."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
        }
        event = getattr(record, _EVENT, None)
        if event is not None:
            entry["event"] = event
            for key, value in getattr(record, _FIELDS, {}).items():
                entry.setdefault(key, value)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_json_logging(level: int = logging.INFO) -> None:
    """Makes the root logger write JSON Lines to stderr (the `xdctr serve` process)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
