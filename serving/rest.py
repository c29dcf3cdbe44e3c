"""The REST frontend: TF Serving's RESTful API on `--rest_api_port` (stdlib HTTP server).

    GET  /v1/models/NAME[/versions/N | /labels/L]            GetModelStatus
    GET  /v1/models/NAME[/versions/N | /labels/L]/metadata   GetModelMetadata (signature_def)
    POST /v1/models/NAME[/versions/N | /labels/L]:predict    Predict (row or columnar format)
    POST /v1/models/NAME[/versions/N | /labels/L]:classify   Classify
    POST /v1/models/NAME[/versions/N | /labels/L]:regress    Regress

Bodies are JSON in TF Serving's formats (`serving.rest_json`). The requests become the same protos
the gRPC frontend takes and run through the same `Inference` and `ModelAdmin`, so every check and
error is the gRPC one; errors answer `{"error": "<message>"}` with the HTTP status TF Serving maps
the gRPC code to (INVALID_ARGUMENT 400, NOT_FOUND 404, ...). A path under /v1/ that matches none of
the above is "Malformed request" (400); with a `MonitoringConfig` whose Prometheus export is on,
its path serves the metrics. REST calls are counted in the same metrics as gRPC calls.
"""

from __future__ import annotations

import http.server
import logging
import re
import threading
import time
import urllib.parse
from typing import Optional

import grpc
from prometheus_client import CONTENT_TYPE_LATEST
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    predict_pb2,
    regression_pb2,
)

from serving import rest_json
from serving.admin import ModelAdmin
from serving.inference import SIGNATURE_DEF_FIELD, Inference
from serving.monitoring import RequestLabels
from serving.status import ServingError, status_of
from xdctr import features as F

logger = logging.getLogger(__name__)

API_PREFIX = re.compile(r"(?i)/v1/.*")
_MODEL = r"/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
PREDICTION_PATH = re.compile(rf"(?i){_MODEL}:(?P<method>classify|regress|predict)")
STATUS_PATH = re.compile(rf"(?i)/v1/models(?:/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?)?"
                         r"(?P<metadata>/metadata)?")
HTTP_STATUS = {
    grpc.StatusCode.OK: 200, grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409, grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500, grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
MAX_INT64 = 2**63 - 1


def _model_spec(match: re.Match) -> model_pb2.ModelSpec:
    spec = model_pb2.ModelSpec(name=urllib.parse.unquote(match["name"] or ""))
    if match["version"] is not None:
        version = int(match["version"])
        if version > MAX_INT64:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Failed to convert version: {match['version']} to numeric.")
        spec.version.value = version
    elif match["label"] is not None:
        spec.version_label = urllib.parse.unquote(match["label"])
    return spec


class RestApi:
    """TF Serving's REST API without HTTP: `handle(method, path, body) -> (HTTP status, JSON text)`.

    Args:
      inference, admin: what answers the requests.
      timeout_s: how long a batched request may wait (TF Serving's --rest_api_timeout_in_ms).
    """

    def __init__(self, inference: Inference, admin: ModelAdmin, timeout_s: Optional[float] = None):
        self.inference = inference
        self.admin = admin
        self.timeout_s = timeout_s

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, str]:
        labels, api = RequestLabels(), None
        started = time.perf_counter()
        try:
            prediction = PREDICTION_PATH.fullmatch(path) if method == "POST" else None
            status = STATUS_PATH.fullmatch(path) if method == "GET" else None
            if prediction is not None:
                api = prediction["method"].lower()
                text = self._predict_classify_regress(api, _model_spec(prediction), body, labels)
            elif status is not None and status["name"]:
                if status["metadata"]:
                    api = "get_model_metadata"
                    text = self._metadata(_model_spec(status), labels)
                else:
                    text = self._status(_model_spec(status))
            elif status is not None:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Missing model name in request.")
            else:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"Malformed request: {method} {path}")
            code = grpc.StatusCode.OK
        except Exception as e:
            code, message = status_of(e)
            if code == grpc.StatusCode.INTERNAL:
                logger.exception("Internal error in REST %s %s", method, path)
            text = rest_json.error_json(message)
        if api is not None:
            self.inference.metrics.observe_request(labels.model, labels.version, labels.signature, api, code.name,
                                                   time.perf_counter() - started)
        return HTTP_STATUS.get(code, 500), text

    def _predict_classify_regress(self, api: str, spec: model_pb2.ModelSpec, body: bytes, labels) -> str:
        document = rest_json.parse_json(body)
        spec.signature_name = rest_json.signature_name(document)
        if api == "predict":
            request = predict_pb2.PredictRequest(model_spec=spec)
            _, loaded = self.inference.manager.resolve(spec)
            signature = spec.signature_name or F.SERVING_SIGNATURE
            signature_def = loaded.signature_defs.get(signature)
            if signature_def is None:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f'Serving signature name: "{signature}" not found in signature def')
            kind = rest_json.fill_predict_request(document, request, signature_def.inputs)
            response = self.inference.predict(request, labels=labels, deadline=self.timeout_s)
            return rest_json.predict_response_json(response, kind)
        if api == "classify":
            request = classification_pb2.ClassificationRequest(model_spec=spec)
            rest_json.fill_examples(document, request.input)
            response = self.inference.classify(request, labels=labels, deadline=self.timeout_s)
            return rest_json.classification_json(response.result)
        request = regression_pb2.RegressionRequest(model_spec=spec)
        rest_json.fill_examples(document, request.input)
        response = self.inference.regress(request, labels=labels, deadline=self.timeout_s)
        return rest_json.regression_json(response.result)

    def _status(self, spec: model_pb2.ModelSpec) -> str:
        response = self.admin.get_model_status(get_model_status_pb2.GetModelStatusRequest(model_spec=spec))
        return rest_json.status_json(response)

    def _metadata(self, spec: model_pb2.ModelSpec, labels) -> str:
        request = get_model_metadata_pb2.GetModelMetadataRequest(model_spec=spec, metadata_field=[SIGNATURE_DEF_FIELD])
        response = self.inference.get_model_metadata(request, labels=labels)
        return rest_json.metadata_json(response, SIGNATURE_DEF_FIELD)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every answer has a Content-Length
    server: "_HTTPServer"

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _read_body(self) -> Optional[bytes]:
        """The request body; None (after answering) when it is too large or unreadable."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()  # the empty line after the last chunk
                    return b"".join(chunks)
                total += size
                if total > self.server.max_body_bytes:
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        else:
            length = int(self.headers.get("Content-Length") or 0)
            if length <= self.server.max_body_bytes:
                return self.rfile.read(length)
        message = f"The request body is larger than {self.server.max_body_bytes} bytes (--max-request-bytes)."
        self.close_connection = True
        self._answer(HTTP_STATUS[grpc.StatusCode.RESOURCE_EXHAUSTED], rest_json.error_json(message).encode(),
                     "application/json")
        return None

    def _dispatch(self, method: str) -> None:
        path = urllib.parse.urlsplit(self.path).path
        body = self._read_body() if method == "POST" or self.headers.get("Content-Length") else b""
        if body is None:
            return
        if method == "GET" and self.server.metrics_path is not None and path == self.server.metrics_path:
            self._answer(200, self.server.api.inference.metrics.exposition(), CONTENT_TYPE_LATEST)
            return
        if not API_PREFIX.fullmatch(path):
            self._answer(404, rest_json.error_json(f"Not found: {path}").encode(), "application/json")
            return
        with self.server.tracker:
            status, text = self.server.api.handle(method, path, body)
        self._answer(status, text.encode("utf-8"), "application/json")

    def do_GET(self):  # noqa: N802 (http.server's names)
        self._dispatch("GET")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self):  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self):  # noqa: N802
        self._dispatch("DELETE")

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        logger.debug("rest: " + format, *args)


class _InFlight:
    """Counts requests being answered, so that shutdown can wait for them."""

    def __init__(self):
        self._count = 0
        self._idle = threading.Condition()

    def __enter__(self):
        with self._idle:
            self._count += 1

    def __exit__(self, *exc):
        with self._idle:
            self._count -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._count == 0, timeout)


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    api: RestApi
    metrics_path: Optional[str]
    max_body_bytes: int
    tracker: _InFlight


class _SharedPortHTTPServer(_HTTPServer):
    allow_reuse_port = True  # SO_REUSEPORT: the server processes of one group share the port


class RestServer:
    """Serves a `RestApi` on host:port on daemon threads (`port` is the bound one).

    Args:
      metrics_path: also serve the Prometheus metrics there (None: not on this port).
      max_body_bytes: larger bodies are refused with 429 (RESOURCE_EXHAUSTED).
      reuse_port: bind with SO_REUSEPORT, so the processes of a group (`serving.processes`) share it.
    """

    def __init__(self, api: RestApi, host: str, port: int, metrics_path: Optional[str], max_body_bytes: int,
                 reuse_port: bool = False):
        try:
            self._server = (_SharedPortHTTPServer if reuse_port else _HTTPServer)((host, port), _Handler)
        except OSError as e:
            raise ValueError(f"Cannot bind the REST API to {host}:{port}: {e.strerror}") from None
        self._server.api, self._server.metrics_path = api, metrics_path
        self._server.max_body_bytes, self._server.tracker = max_body_bytes, _InFlight()
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="xdctr-rest", daemon=True)
        self._thread.start()

    def stop(self, grace: float) -> None:
        """Stops accepting requests and lets running ones finish for up to `grace` s."""
        self._server.shutdown()
        self._server.tracker.wait_idle(grace)
        self._server.server_close()
        self._thread.join(timeout=5.0)
