"""`xdctr route`: an A/B router in front of TF-Serving-compatible backends.

Speaks `tensorflow.serving.PredictionService` on both sides with the stubs of
`tensorflow_serving.apis`: a client written for TF Serving points at the router unchanged, and the
backends are `xdctr serve` processes or real TF Serving. For each call the router picks the user's
arm, rewrites the request's `model_spec` to the arm's model (name plus version or version label;
the signature name is kept), forwards it to the arm's backend and returns the backend's response.
Predict, GetModelMetadata, Classify, Regress and MultiInference (every task's model spec rewritten)
are forwarded.

Experiment config (YAML; polled, reloaded when the file changes; a bad new file is logged and the
old config kept):

    salt: ctr-2024-06               # required; changing it reshuffles every user
    arms:                           # required, in this order on the [0, 1) line
      - name: control
        backend: 127.0.0.1:8500     # host:port of xdctr serve or TF Serving
        model_name: xdctr
        version: 3                  # or `version_label: stable`; neither: the latest
        weight: 0.9                 # >= 0; weights are normalised by their sum
      - name: treatment
        backend: 127.0.0.1:8501
        model_name: xdctr
        version_label: canary
        weight: 0.1
    user_metadata_key: x-user-id    # call metadata that carries the user id (default x-user-id)
    forced: {alice: treatment}      # optional: user -> arm, before hashing
    fallback_arm: control           # optional: answers when the assigned arm's backend fails
    anonymous_arm: control          # optional: see "Requests without a user id"
    deadline_seconds: 2.0           # per backend call (default 5); the client's deadline if shorter

A backend is HOST:PORT (`[v6]:PORT`, `dns:///HOST:PORT`) or `unix:PATH`; any other address is
refused when the config is read, at start and on reload (the old config stays).

The user id: the call metadata `user_metadata_key` when present (it wins), otherwise the
`xdctr.features.USER_ID` feature of the first serialized tf.Example in the `SERVING_INPUT` tensor
(Predict; `serving_default` and `score_candidates` alike), or of the first example (the context of
`example_list_with_context` first) of a Classify/Regress input.

Assignment (`assign`): forced users get their arm; everyone else is hashed:
`u = int(sha256(salt + "\\x1f" + user)[:8 bytes]) / 2**64` in [0, 1), and the arm is the first
whose cumulative normalised weight exceeds `u`. The same user gets the same arm on every request,
on every router and after restarts, until the salt (or the weights) change.

Requests without a user id go to `anonymous_arm` when the config names one; otherwise they are
hashed like users, with the sha256 of the serialized request (inputs and model spec) as the key.
That keeps the traffic split by weight and sends identical requests to the same arm, but it is
not sticky per user; such requests are logged with `user: null` and `assignment: "anonymous"`.

Failures: a backend answer with a code in `CLIENT_ERROR_CODES` (the request itself is bad) is
returned as it is. Any other failure (UNAVAILABLE, DEADLINE_EXCEEDED, NOT_FOUND for a model the
backend lacks, ...) is retried once on the fallback arm when one is configured (and differs);
otherwise, or when the fallback fails too, the client gets the backend's code with a message that
names the arm and its backend. Every backend call carries a deadline, so nothing waits forever.

Metrics (a `CollectorRegistry` per router, at `/monitoring/prometheus/metrics` on the monitoring
port): `xdctr_router_assignments_total{arm, reason}`, `xdctr_router_requests_total{arm, method}`
(calls sent to an arm's backend, fallback calls included), `xdctr_router_errors_total{arm, method,
code}`, `xdctr_router_fallbacks_total{arm, fallback_arm}` and
`xdctr_router_request_seconds{arm, method}`.

Assignment log: one JSON line per served Predict request with the fields of
`serving.ab_report.ASSIGNMENT_LOG_FIELDS` (request id from the `x-request-id` metadata or
generated, user, arm, model name and the version the backend served, time, per example the item
id and the score served). Writes are buffered, flushed every poll interval and on stop.

The request id is forwarded to the backend as `x-request-id`; the router answers with the
trailing metadata `x-request-id` and `x-ab-arm`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import logging
import math
import os
import re
import signal
import threading
import time
import uuid
from concurrent import futures
from typing import Mapping, Optional

import grpc
import numpy as np
import prometheus_client
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tensorflow import make_ndarray
from tensorflow.core.example import example_pb2
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from serving import ab_report as log_format
from serving.monitoring import MetricsHTTPServer, configure_json_logging, log_event
from xdctr import features as F

logger = logging.getLogger(__name__)

DEFAULT_USER_METADATA_KEY = "x-user-id"
REQUEST_ID_METADATA_KEY = "x-request-id"
ARM_METADATA_KEY = "x-ab-arm"
DEFAULT_DEADLINE_SECONDS = 5.0
DEFAULT_POLL_SECONDS = 1.0
DEFAULT_GRACE_SECONDS = 5.0
METRICS_PATH = "/monitoring/prometheus/metrics"
MAX_MESSAGE_BYTES = 2**31 - 1  # as TF Serving: large candidate batches must not fail at 4 MiB
LOG_BUFFER_LINES = 256
SALT_SEPARATOR = "\x1f"
# Backend answers that mean the request itself is bad: returned as they are, never retried.
CLIENT_ERROR_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED})

ASSIGNED_BY_HASH = "hash"
ASSIGNED_BY_FORCE = "forced"
ASSIGNED_ANONYMOUS = "anonymous"
USER_FROM_METADATA = "metadata"
USER_FROM_TENSOR = "tensor"


# ----------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class Arm:
    """One arm of the experiment: a model (and version or label) on a backend, with a weight."""

    name: str
    backend: str
    model_name: str
    version: Optional[int] = None
    version_label: Optional[str] = None
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """The router's experiment; see the module docstring for the YAML form."""

    arms: tuple
    salt: str
    user_metadata_key: str = DEFAULT_USER_METADATA_KEY
    forced: Mapping[str, str] = dataclasses.field(default_factory=dict)
    fallback_arm: Optional[str] = None
    anonymous_arm: Optional[str] = None
    deadline_seconds: float = DEFAULT_DEADLINE_SECONDS

    def __post_init__(self):
        object.__setattr__(self, "arms", tuple(self.arms))
        object.__setattr__(self, "forced", dict(self.forced))
        object.__setattr__(self, "user_metadata_key", self.user_metadata_key.lower())
        names = [arm.name for arm in self.arms]
        if not self.arms:
            raise ValueError("`arms` must list at least one arm. Received: arms=[]")
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be distinct. Received: {names}")
        if not sum(arm.weight for arm in self.arms) > 0:
            raise ValueError(f"at least one arm needs a weight > 0. Received weights: "
                             f"{ {arm.name: arm.weight for arm in self.arms} }")
        for field in ("fallback_arm", "anonymous_arm"):
            value = getattr(self, field)
            if value is not None and value not in names:
                raise ValueError(f"`{field}` must name an arm, one of {names}. Received: {field}={value!r}")
        for user, arm in self.forced.items():
            if arm not in names:
                raise ValueError(f"`forced` sends user {user!r} to unknown arm {arm!r}; arms: {names}")
        if not (self.deadline_seconds > 0 and math.isfinite(self.deadline_seconds)):
            raise ValueError(f"`deadline_seconds` must be a positive number. Received: {self.deadline_seconds!r}")

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise KeyError(name)

    @classmethod
    def from_dict(cls, values: dict) -> "ExperimentConfig":
        """Builds the config from parsed YAML; ValueError names the bad field."""
        if not isinstance(values, dict):
            raise ValueError(f"the config must be a mapping with `salt` and `arms`. Received: {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}; known fields: {sorted(known)}")
        for field in ("salt", "arms"):
            if field not in values:
                raise ValueError(f"missing required field `{field}`")
        if not isinstance(values["arms"], list):
            raise ValueError(f"`arms` must be a list of arms. Received: {values['arms']!r}")
        arms = tuple(_arm_from_dict(value, f"arms[{i}]") for i, value in enumerate(values["arms"]))
        kwargs = {"arms": arms, "salt": _string(values["salt"], "salt", allow_empty=True)}
        if "user_metadata_key" in values:
            kwargs["user_metadata_key"] = _string(values["user_metadata_key"], "user_metadata_key")
        if values.get("forced") is not None:
            if not isinstance(values["forced"], dict):
                raise ValueError(f"`forced` must map user ids to arm names. Received: {values['forced']!r}")
            kwargs["forced"] = {_string(user, "forced key"): _string(arm, f"forced[{user!r}]")
                                for user, arm in values["forced"].items()}
        for field in ("fallback_arm", "anonymous_arm"):
            if values.get(field) is not None:
                kwargs[field] = _string(values[field], field)
        if "deadline_seconds" in values:
            kwargs["deadline_seconds"] = _number(values["deadline_seconds"], "deadline_seconds")
        return cls(**kwargs)


def _string(value, field: str, allow_empty: bool = False) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"`{field}` must be a string. Received: {value!r}")
    value = str(value)
    if not value and not allow_empty:
        raise ValueError(f"`{field}` must be a non-empty string. Received: {value!r}")
    return value


def _number(value, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{field}` must be a number. Received: {value!r}")
    return float(value)


_HOST_PORT = re.compile(r"(?:dns:(?://[^/]*/)?)?(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)"
                        r":(?P<port>\d{1,5})")


def _backend(value, field: str) -> str:
    """A backend address gRPC can dial: HOST:PORT ([v6]:PORT, dns:///HOST:PORT) or unix:PATH."""
    address = _string(value, field)
    if address.startswith(("unix:", "unix-abstract:")) and len(address.split(":", 1)[1]) > 0:
        return address
    match = _HOST_PORT.fullmatch(address)
    host_ok = match is not None and (not match["host"].startswith("[") or _is_ipv6(match["host"][1:-1]))
    if not (host_ok and 1 <= int(match["port"]) <= 65535):
        raise ValueError(f"`{field}` must be HOST:PORT with a port in 1-65535 (e.g. 127.0.0.1:8500, [::1]:8500, "
                         f"dns:///serving:8500) or unix:PATH. Received: {address!r}")
    return address


def _is_ipv6(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address)
    except ValueError:
        return False


def _arm_from_dict(values, where: str) -> Arm:
    if not isinstance(values, dict):
        raise ValueError(f"`{where}` must be a mapping with name, backend, model_name and weight. Received: {values!r}")
    known = {f.name for f in dataclasses.fields(Arm)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"`{where}` has unknown field(s) {unknown}; known fields: {sorted(known)}")
    for field in ("name", "backend", "model_name"):
        if field not in values:
            raise ValueError(f"`{where}` misses required field `{field}`")
    if values.get("version") is not None and values.get("version_label") is not None:
        raise ValueError(f"`{where}` names both `version` and `version_label`; give one, or neither for the latest")
    version = values.get("version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 0):
        raise ValueError(f"`{where}.version` must be a non-negative integer. Received: {version!r}")
    weight = _number(values.get("weight", 1.0), f"{where}.weight")
    if not (weight >= 0 and math.isfinite(weight)):
        raise ValueError(f"`{where}.weight` must be a finite number >= 0. Received: {weight!r}")
    label = values.get("version_label")
    return Arm(
        name=_string(values["name"], f"{where}.name"),
        backend=_backend(values["backend"], f"{where}.backend"),
        model_name=_string(values["model_name"], f"{where}.model_name"),
        version=version,
        version_label=None if label is None else _string(label, f"{where}.version_label"),
        weight=weight,
    )


def load_config(path: str) -> ExperimentConfig:
    """Reads and validates the experiment YAML; ValueError names the file and the problem."""
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"experiment config {path} does not exist") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        problem = getattr(e, "problem", None) or str(e)
        raise ValueError(f"{where}: not valid YAML: {' '.join(str(problem).split())}") from e
    try:
        return ExperimentConfig.from_dict(values)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


# ----------------------------------------------------------------------------------------------
# Assignment


def bucket(salt: str, key: str) -> float:
    """A stable hash of (salt, key) to [0, 1): the first 8 bytes of sha256, over 2**64."""
    digest = hashlib.sha256(f"{salt}{SALT_SEPARATOR}{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _arm_for_bucket(u: float, config: ExperimentConfig) -> str:
    total = sum(arm.weight for arm in config.arms)
    cumulative = 0.0
    last = None
    for arm in config.arms:
        if arm.weight <= 0:
            continue
        cumulative += arm.weight / total
        last = arm.name
        if u < cumulative:
            return arm.name
    return last  # u within rounding of 1.0


def assign(user_id: str, config: ExperimentConfig) -> str:
    """The arm of `user_id`: its forced arm, or the arm its salted hash falls in (pure, stable)."""
    forced = config.forced.get(user_id)
    if forced is not None:
        return forced
    return _arm_for_bucket(bucket(config.salt, user_id), config)


def _first_user_id(serialized: bytes) -> Optional[str]:
    """The USER_ID feature of one serialized tf.Example, or None when it has none or does not parse."""
    example = example_pb2.Example()
    try:
        example.ParseFromString(serialized)
    except Exception:  # a malformed example: the backend will refuse it with INVALID_ARGUMENT
        return None
    feature = example.features.feature.get(F.USER_ID)
    if feature is None or not feature.bytes_list.value:
        return None
    return feature.bytes_list.value[0].decode("utf-8", "replace") or None


def _user_from_predict(request) -> Optional[str]:
    tensor = request.inputs.get(F.SERVING_INPUT)
    if tensor is None or tensor.dtype != types_pb2.DT_STRING or not tensor.string_val:
        return None
    return _first_user_id(tensor.string_val[0])


def _user_from_examples(request) -> Optional[str]:
    """Classify/Regress: the user of the context example, else of the first example."""
    which = request.input.WhichOneof("kind")
    if which == "example_list_with_context":
        container = request.input.example_list_with_context
        candidates = [container.context] + list(container.examples[:1])
    elif which == "example_list":
        candidates = list(request.input.example_list.examples[:1])
    else:
        return None
    for example in candidates:
        feature = example.features.feature.get(F.USER_ID)
        if feature is not None and feature.bytes_list.value and feature.bytes_list.value[0]:
            return feature.bytes_list.value[0].decode("utf-8", "replace")
    return None


def _item_ids(request) -> Optional[list]:
    """Per scored example its item id: the candidates of score_candidates, else each example's ITEM_ID."""
    candidates = request.inputs.get(F.CANDIDATE_ITEM_IDS)
    if candidates is not None and candidates.dtype == types_pb2.DT_STRING:
        return [value.decode("utf-8", "replace") for value in candidates.string_val]
    tensor = request.inputs.get(F.SERVING_INPUT)
    if tensor is None or tensor.dtype != types_pb2.DT_STRING:
        return None
    items = []
    for serialized in tensor.string_val:
        example = example_pb2.Example()
        try:
            example.ParseFromString(serialized)
        except Exception:
            items.append(None)
            continue
        feature = example.features.feature.get(F.ITEM_ID)
        items.append(feature.bytes_list.value[0].decode("utf-8", "replace")
                     if feature is not None and feature.bytes_list.value else None)
    return items


# ----------------------------------------------------------------------------------------------
# Metrics and the assignment log


class RouterMetrics:
    """The router's Prometheus metrics, in a registry of their own."""

    def __init__(self):
        self.registry = prometheus_client.CollectorRegistry()
        self.assignments = prometheus_client.Counter(
            "xdctr_router_assignments", "Requests per assigned arm and how the arm was chosen (hash, forced, anonymous).",
            ["arm", "reason"], registry=self.registry)
        self.requests = prometheus_client.Counter(
            "xdctr_router_requests", "Calls sent to an arm's backend (fallback calls included).",
            ["arm", "method"], registry=self.registry)
        self.errors = prometheus_client.Counter(
            "xdctr_router_errors", "Failed backend calls per arm and gRPC status code.",
            ["arm", "method", "code"], registry=self.registry)
        self.fallbacks = prometheus_client.Counter(
            "xdctr_router_fallbacks", "Requests of a failed arm answered by the fallback arm.",
            ["arm", "fallback_arm"], registry=self.registry)
        self.latency = prometheus_client.Histogram(
            "xdctr_router_request_seconds", "Backend call latency per arm.", ["arm", "method"], registry=self.registry)

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return prometheus_client.generate_latest(self.registry)


class AssignmentLog:
    """Buffered JSON Lines writer (appends; thread-safe); `flush` writes the buffer out."""

    def __init__(self, path: str, buffer_lines: int = LOG_BUFFER_LINES):
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self.path = path
        self._buffer_lines = buffer_lines
        self._lines: list = []
        self._lock = threading.Lock()
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":"))
        with self._lock:
            self._lines.append(line)
            if len(self._lines) >= self._buffer_lines:
                self._flush_locked()

    def _flush_locked(self) -> None:
        if self._file.closed:
            return
        if self._lines:
            self._file.write("\n".join(self._lines) + "\n")
            self._lines.clear()
        self._file.flush()

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def close(self) -> None:
        with self._lock:
            self._flush_locked()
            self._file.close()


# ----------------------------------------------------------------------------------------------
# The servicer


class _ArmFailure(Exception):
    def __init__(self, arm: Arm, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.arm = arm
        self.code = code
        self.details = details

    def message(self) -> str:
        return f"arm {self.arm.name!r} (backend {self.arm.backend}) failed: {self.code.name}: {self.details}"


@dataclasses.dataclass(frozen=True)
class _Routing:
    user: Optional[str]
    user_source: Optional[str]
    assignment: str
    arm: Arm


class RouterServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Routes each call to its arm's backend. `config` is swapped whole on reload."""

    def __init__(self, config: ExperimentConfig, metrics: RouterMetrics, assignment_log: Optional[AssignmentLog] = None):
        self.config = config
        self.metrics = metrics
        self.assignment_log = assignment_log
        self._stubs: dict = {}
        self._channels: dict = {}
        self._lock = threading.Lock()

    def _stub(self, address: str):
        with self._lock:
            stub = self._stubs.get(address)
            if stub is None:
                channel = grpc.insecure_channel(address, options=[
                    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ])
                self._channels[address] = channel
                stub = self._stubs[address] = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            return stub

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
            self._stubs.clear()

    @staticmethod
    def _route(config: ExperimentConfig, request, metadata: dict, user_in_request) -> _Routing:
        user, source = metadata.get(config.user_metadata_key) or None, USER_FROM_METADATA
        if isinstance(user, bytes):  # a "-bin" metadata key
            user = user.decode("utf-8", "replace")
        if user is None:
            user, source = user_in_request(request), USER_FROM_TENSOR
        if user is not None:
            reason = ASSIGNED_BY_FORCE if user in config.forced else ASSIGNED_BY_HASH
            return _Routing(user, source, reason, config.arm(assign(user, config)))
        if config.anonymous_arm is not None:
            name = config.anonymous_arm
        else:
            key = hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()
            name = _arm_for_bucket(bucket(config.salt, "request:" + key), config)
        return _Routing(None, None, ASSIGNED_ANONYMOUS, config.arm(name))

    def _call_arm(self, config: ExperimentConfig, arm: Arm, method: str, request, context, request_id: str):
        forwarded = type(request)()
        forwarded.CopyFrom(request)
        # MultiInference names the model in every task; the other methods in `model_spec`.
        specs = [task.model_spec for task in forwarded.tasks] if method == "MultiInference" else [forwarded.model_spec]
        for spec in specs:
            spec.name = arm.model_name
            spec.ClearField("version_choice")
            if arm.version is not None:
                spec.version.value = arm.version
            elif arm.version_label is not None:
                spec.version_label = arm.version_label
        timeout = config.deadline_seconds
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, remaining)
        self.metrics.requests.labels(arm.name, method).inc()
        started = time.perf_counter()
        try:
            if timeout <= 0:
                raise _ArmFailure(arm, grpc.StatusCode.DEADLINE_EXCEEDED, "the client's deadline passed before the call")
            call = getattr(self._stub(arm.backend), method)
            return call(forwarded, timeout=timeout, metadata=((REQUEST_ID_METADATA_KEY, request_id),))
        except grpc.RpcError as e:
            code = e.code() if callable(getattr(e, "code", None)) else grpc.StatusCode.UNKNOWN
            details = e.details() if callable(getattr(e, "details", None)) else str(e)
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                details = f"no answer within {timeout:.3g} s ({details})"
            raise _ArmFailure(arm, code, details) from e
        finally:
            self.metrics.latency.labels(arm.name, method).observe(time.perf_counter() - started)

    def _forward(self, method: str, request, context, user_in_request):
        config = self.config  # one config for the whole call, even if a reload lands meanwhile
        metadata = dict(context.invocation_metadata() or ())
        request_id = metadata.get(REQUEST_ID_METADATA_KEY) or uuid.uuid4().hex
        routing = self._route(config, request, metadata, user_in_request)
        self.metrics.assignments.labels(routing.arm.name, routing.assignment).inc()
        served = routing.arm
        try:
            response = self._call_arm(config, served, method, request, context, request_id)
        except _ArmFailure as failure:
            self.metrics.errors.labels(failure.arm.name, method, failure.code.name).inc()
            fallback = config.fallback_arm
            if failure.code in CLIENT_ERROR_CODES:  # the request is bad: the backend's answer as it is
                self._abort(context, failure.code, failure.details, request_id, served)
            if fallback is None or fallback == served.name:
                self._abort(context, failure.code, failure.message(), request_id, served)
            log_event(logger, logging.WARNING, "arm_failed_using_fallback", arm=served.name, backend=served.backend,
                      code=failure.code.name, error=failure.details, fallback_arm=fallback, request_id=request_id)
            self.metrics.fallbacks.labels(served.name, fallback).inc()
            served = config.arm(fallback)
            try:
                response = self._call_arm(config, served, method, request, context, request_id)
            except _ArmFailure as second:
                self.metrics.errors.labels(second.arm.name, method, second.code.name).inc()
                self._abort(context, second.code, f"{failure.message()}; fallback {second.message()}", request_id, served)
        context.set_trailing_metadata(((REQUEST_ID_METADATA_KEY, request_id), (ARM_METADATA_KEY, served.name)))
        return response, routing, served, request_id

    @staticmethod
    def _abort(context, code, message, request_id, arm):
        context.set_trailing_metadata(((REQUEST_ID_METADATA_KEY, request_id), (ARM_METADATA_KEY, arm.name)))
        context.abort(code, message)

    def Predict(self, request, context):
        response, routing, served, request_id = self._forward("Predict", request, context, _user_from_predict)
        if self.assignment_log is not None:
            self._log(request, response, routing, served, request_id)
        return response

    def GetModelMetadata(self, request, context):
        return self._forward("GetModelMetadata", request, context, lambda _: None)[0]

    def Classify(self, request, context):
        return self._forward("Classify", request, context, _user_from_examples)[0]

    def Regress(self, request, context):
        return self._forward("Regress", request, context, _user_from_examples)[0]

    def MultiInference(self, request, context):
        return self._forward("MultiInference", request, context, _user_from_examples)[0]

    def _log(self, request, response, routing: _Routing, served: Arm, request_id: str) -> None:
        scores = None
        output = response.outputs.get(F.SERVING_OUTPUT)
        if output is not None:
            try:
                scores = [float(x) for x in np.asarray(make_ndarray(output), dtype=np.float64).reshape(-1)]
            except (TypeError, ValueError):
                log_event(logger, logging.WARNING, "scores_not_numeric", output=F.SERVING_OUTPUT, request_id=request_id)
        spec = response.model_spec
        self.assignment_log.write({
            log_format.LOG_REQUEST_ID: request_id,
            log_format.LOG_TS: round(time.time(), 3),
            log_format.LOG_USER: routing.user,
            log_format.LOG_USER_SOURCE: routing.user_source,
            log_format.LOG_ASSIGNMENT: routing.assignment,
            log_format.LOG_ASSIGNED_ARM: routing.arm.name,
            log_format.LOG_ARM: served.name,
            log_format.LOG_MODEL_NAME: served.model_name,
            log_format.LOG_MODEL_VERSION: spec.version.value if spec.HasField("version") else None,
            log_format.LOG_VERSION_LABEL: served.version_label,
            log_format.LOG_SIGNATURE: request.model_spec.signature_name or F.SERVING_SIGNATURE,
            log_format.LOG_ITEM_IDS: _item_ids(request),
            log_format.LOG_SCORES: scores,
        })


# ----------------------------------------------------------------------------------------------
# Running it


def _address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):  # IPv6 literal
        host = f"[{host}]"
    return f"{host}:{port}"


def _stat(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class RunningRouter:
    """A started router: `port`, `monitoring_port` (None without the HTTP endpoint), `stop(grace)`.

    Also `servicer` (its `config` is the one in force), `metrics` (`metrics.registry`) and
    `config_path`.
    """

    def __init__(self, config_path: str, server: grpc.Server, port: int, servicer: RouterServicer,
                 metrics: RouterMetrics, health_servicer, http_server, assignment_log, poll_seconds: float):
        self.config_path = config_path
        self.server = server
        self.port = port
        self.servicer = servicer
        self.metrics = metrics
        self.monitoring_port = http_server.port if http_server is not None else None
        self._health = health_servicer
        self._http_server = http_server
        self._assignment_log = assignment_log
        self._poll_seconds = poll_seconds
        self._config_stat = _stat(config_path)
        self._stop = threading.Event()
        self._stopped = False
        self._threads = []
        self._threads.append(threading.Thread(target=self._poll, name="xdctr-router-poll", daemon=True))
        for thread in self._threads:
            thread.start()

    @property
    def config(self) -> ExperimentConfig:
        return self.servicer.config

    def _poll(self) -> None:
        while not self._stop.wait(self._poll_seconds):
            self.reload_if_changed()
            if self._assignment_log is not None:
                self._assignment_log.flush()

    def reload_if_changed(self) -> bool:
        """Reloads the config when its file changed; True when a new config took effect."""
        current = _stat(self.config_path)
        if current == self._config_stat:
            return False
        self._config_stat = current
        try:
            config = load_config(self.config_path)
        except (ValueError, OSError) as e:
            log_event(logger, logging.WARNING, "config_reload_refused", path=self.config_path, error=str(e),
                      kept="the current experiment config")
            return False
        self.servicer.config = config
        log_event(logger, logging.INFO, "config_reloaded", path=self.config_path,
                  weights={arm.name: arm.weight for arm in config.arms})
        return True

    def stop(self, grace: Optional[float] = None) -> None:
        """Stops serving (letting running calls finish for `grace` s) and flushes the assignment log."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        self._health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self._http_server is not None:
            self._http_server.stop()
        for thread in self._threads:
            thread.join(timeout=5.0)
        self.servicer.close()
        if self._assignment_log is not None:
            self._assignment_log.close()


def start_router(
    config_path: str,
    port: int = 0,
    host: str = "127.0.0.1",
    assignment_log: Optional[str] = None,
    monitoring_port: Optional[int] = None,
    poll_seconds: float = DEFAULT_POLL_SECONDS,
    max_workers: int = 16,
) -> RunningRouter:
    """Loads the experiment config and starts the router; returns it running.

    Args:
      config_path: the experiment YAML (polled every `poll_seconds` for changes).
      port: gRPC port; 0 binds a free one (`RunningRouter.port`).
      host: interface to bind.
      assignment_log: JSON Lines file the assignment log is appended to; None: no log.
      monitoring_port: port of the HTTP metrics endpoint; 0 a free one; None: no endpoint.
      poll_seconds: how often the config file is checked and the log flushed.
      max_workers: threads answering calls.

    Raises:
      ValueError: a bad config or an address that cannot be bound.
      FileNotFoundError: no config file.
    """
    if not poll_seconds > 0:
        raise ValueError(f"`poll_seconds` must be positive. Received: poll_seconds={poll_seconds!r}")
    config = load_config(config_path)
    metrics = RouterMetrics()
    http_server = MetricsHTTPServer(metrics, host, monitoring_port) if monitoring_port is not None else None
    log = AssignmentLog(assignment_log) if assignment_log is not None else None
    servicer = RouterServicer(config, metrics, log)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="xdctr-router"),
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = _address(host, port)
    try:
        bound_port = server.add_insecure_port(address)
    except RuntimeError as e:
        bound_port = 0
        error = e
    else:
        error = None
    if bound_port == 0:
        if http_server is not None:
            http_server.stop()
        if log is not None:
            log.close()
        raise ValueError(f"Cannot bind the router to {address}" + (f": {error}" if error else "."))
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return RunningRouter(config_path, server, bound_port, servicer, metrics, health_servicer, http_server, log, poll_seconds)


# ----------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser) -> None:
    """The flags of `xdctr route`."""
    parser.add_argument("--config", required=True, help="experiment YAML (arms, weights, salt; reloaded when it changes)")
    parser.add_argument("--port", type=int, default=8600, help="gRPC port of the router")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--assignment-log", help="JSON Lines file the assignments and served scores are appended to")
    parser.add_argument("--monitoring-port", type=int,
                        help=f"HTTP port of {METRICS_PATH} (default: no metrics endpoint)")


def run_from_args(args) -> int:
    """Runs `xdctr route` until SIGINT or SIGTERM (must run in the main thread)."""
    configure_json_logging(logging.INFO)  # one JSON object per line, as `xdctr serve` logs
    router = start_router(os.path.abspath(args.config), args.port, args.host, args.assignment_log, args.monitoring_port)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        log_event(logger, logging.INFO, "router_started", address=_address(args.host, router.port),
                  arms=[dataclasses.asdict(arm) for arm in router.config.arms],
                  monitoring=f":{router.monitoring_port}{METRICS_PATH}" if router.monitoring_port else None)
        stop.wait()
        log_event(logger, logging.INFO, "router_stopping", grace_seconds=DEFAULT_GRACE_SECONDS)
        router.stop(DEFAULT_GRACE_SECONDS)
        log_event(logger, logging.INFO, "router_stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
