"""Configuration of `xdctr serve`: TF Serving's config files, read with TF Serving's protos.

- `--model_config_file`: a `tensorflow.serving.ModelServerConfig` in protobuf text format,
  parsed with `tensorflow_serving.config.model_server_config_pb2`, so the same file serves real
  TF Serving and `xdctr serve`:

      model_config_list {
        config {
          name: "xdctr"
          base_path: "/models/xdctr"
          model_platform: "tensorflow"
          model_version_policy { latest { num_versions: 2 } }
          version_labels { key: "stable" value: 1 }
        }
      }

- `--batching_parameters_file`: a `tensorflow.serving.BatchingParameters` in text format, e.g.
  `max_batch_size { value: 128 } batch_timeout_micros { value: 1000 }`.
- `--monitoring_config_file`: a `tensorflow.serving.MonitoringConfig` in text format,
  `prometheus_config { enable: true path: "/monitoring/prometheus/metrics" }`: the metrics on the
  REST API port at that path.

The `tensorflow-serving-api` package does not ship those two protos (they live in TF Serving's
`session_bundle_config.proto` and `monitoring_config.proto`), so `tf_serving_message_class()`
builds the same messages (same package, field names, numbers and types; BatchingParameters
fields 1-7) at run time. Fields of newer TF Serving releases are not defined and give a parse
error naming them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from serving.batching import BatchingOptions

MODEL_PLATFORM = "tensorflow"  # the only `model_platform` xdctr serve (and TF Serving's default build) serves
DEFAULT_MODEL_NAME = "xdctr"
DEFAULT_FILE_SYSTEM_POLL_WAIT_SECONDS = 1.0  # TF Serving's --file_system_poll_wait_seconds
DEFAULT_GRACE_SECONDS = 5.0
# TF Serving sets its gRPC message limits to INT32_MAX; large batches must not fail at 4 MiB.
MAX_MESSAGE_BYTES = 2**31 - 1
DEFAULT_MAX_REQUEST_ROWS = 100_000  # rows (dimension 0) of one request input
DEFAULT_MAX_REQUEST_ELEMENTS = 2**26  # elements over all decoded input tensors of one request
DEFAULT_REST_API_TIMEOUT_MS = 30_000  # TF Serving's --rest_api_timeout_in_ms
DEFAULT_METRICS_PATH = "/monitoring/prometheus/metrics"  # TF Serving's Prometheus path

_MODEL_CONFIG_EXAMPLE = (
    'model_config_list { config { name: "NAME" base_path: "/ABSOLUTE/PATH" model_platform: "tensorflow" } }'
)


def _is_uri(path: str) -> bool:
    return "://" in path


def _parse_text(text: str, message, source: str, expected: str):
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as e:
        line, column = e.GetLine(), e.GetColumn()
        where = f"{source}:{line}:{column}" if line is not None else source
        detail = str(e).split(" : ", 1)[-1]
        raise ValueError(f"{where}: {detail}; expected {expected}") from None
    return message


def parse_model_server_config(text: str, source: str = "<model config>") -> model_server_config_pb2.ModelServerConfig:
    """Parses a ModelServerConfig in text format; ValueError names `source`, line and column."""
    return _parse_text(
        text,
        model_server_config_pb2.ModelServerConfig(),
        source,
        f"a tensorflow.serving.ModelServerConfig in text format, e.g. {_MODEL_CONFIG_EXAMPLE}",
    )


def _read_text(path: str, what: str) -> str:
    """The text of a config file; ValueError naming it (`what`: "model config") when unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"Cannot read the {what} file {path}: {e.strerror}") from None


def read_model_server_config(path: str) -> model_server_config_pb2.ModelServerConfig:
    """Reads and validates a --model-config-file."""
    config = parse_model_server_config(_read_text(path, "model config"), path)
    try:
        validate_model_server_config(config)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return config


def single_model_config(model_name: str, base_path: str) -> model_server_config_pb2.ModelServerConfig:
    """The config TF Serving builds from --model_name and --model_base_path (latest version)."""
    if not _is_uri(base_path):
        base_path = os.path.abspath(base_path)
    config = model_server_config_pb2.ModelServerConfig()
    model = config.model_config_list.config.add()
    model.name = model_name
    model.base_path = base_path
    model.model_platform = MODEL_PLATFORM
    return config


def validate_model_server_config(config: model_server_config_pb2.ModelServerConfig) -> None:
    """Raises ValueError for a config TF Serving would refuse (or xdctr serve cannot serve).

    Checked like TF Serving's ServerCore: a `model_config_list` (not `custom_model_config`),
    model names non-empty and unique, base paths absolute (or URIs), `model_platform` set to
    "tensorflow"; plus: version numbers and labels well-formed.
    """
    if config.WhichOneof("config") != "model_config_list":
        raise ValueError(
            "ServerModelConfig type not supported. Only ModelConfigList is currently supported; "
            f"expected e.g. {_MODEL_CONFIG_EXAMPLE}"
        )
    names = set()
    for index, model in enumerate(config.model_config_list.config):
        where = f"model_config_list.config[{index}]"
        if not model.name:
            raise ValueError(f"{where}: `name` must be set.")
        if model.name in names:
            raise ValueError(f"Illegal to list model {model.name} multiple times in config list")
        names.add(model.name)
        if not model.base_path:
            raise ValueError(f"{where} ({model.name}): `base_path` must be set.")
        if not (_is_uri(model.base_path) or os.path.isabs(model.base_path)):
            raise ValueError(
                f"Expected model {model.name} to have an absolute path or URI; got base_path()={model.base_path}"
            )
        if model.model_platform != MODEL_PLATFORM:
            raise ValueError(
                f"{where} ({model.name}): model_platform must be {MODEL_PLATFORM!r}; "
                f"got {model.model_platform!r}."
            )
        policy = model.model_version_policy
        if policy.WhichOneof("policy_choice") == "specific":
            if not policy.specific.versions:
                raise ValueError(f"{where} ({model.name}): model_version_policy.specific lists no versions.")
            if any(v < 0 for v in policy.specific.versions):
                raise ValueError(
                    f"{where} ({model.name}): versions must be >= 0; got {list(policy.specific.versions)}."
                )
        for label, version in model.version_labels.items():
            if not label or version < 0:
                raise ValueError(
                    f"{where} ({model.name}): version label {label!r} -> {version} needs a name and a version >= 0."
                )


# TF Serving messages the tensorflow-serving-api wheel lacks, with their package, names, numbers
# and types: session_bundle_config.proto's BatchingParameters (fields 1-7) and
# monitoring_config.proto's MonitoringConfig.
_TF_SERVING_MESSAGES = {
    "BatchingParameters": (
        (1, "max_batch_size", ".google.protobuf.Int64Value"),
        (2, "batch_timeout_micros", ".google.protobuf.Int64Value"),
        (3, "max_enqueued_batches", ".google.protobuf.Int64Value"),
        (4, "num_batch_threads", ".google.protobuf.Int64Value"),
        (5, "thread_pool_name", ".google.protobuf.StringValue"),
        (6, "allowed_batch_sizes", "repeated int64"),
        (7, "pad_variable_length_inputs", "bool"),
    ),
    "PrometheusConfig": ((1, "enable", "bool"), (2, "path", "string")),
    "MonitoringConfig": ((1, "prometheus_config", ".tensorflow.serving.PrometheusConfig"),),
}
_message_classes: dict = {}


def tf_serving_message_class(name: str):
    """The message class `tensorflow.serving.<name>` of `_TF_SERVING_MESSAGES` (see the module docstring)."""
    if not _message_classes:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

        FieldProto = descriptor_pb2.FieldDescriptorProto
        scalars = {"bool": FieldProto.TYPE_BOOL, "string": FieldProto.TYPE_STRING, "int64": FieldProto.TYPE_INT64}
        file_proto = descriptor_pb2.FileDescriptorProto(
            name="xdctr/serving/tf_serving_config.proto",
            package="tensorflow.serving",
            syntax="proto3",
            dependency=[wrappers_pb2.DESCRIPTOR.name],
        )
        for message_name, fields in _TF_SERVING_MESSAGES.items():
            message = file_proto.message_type.add(name=message_name)
            for number, field_name, kind in fields:
                field = message.field.add(name=field_name, number=number, json_name=field_name,
                                          label=FieldProto.LABEL_OPTIONAL)
                if kind.startswith("repeated "):
                    field.label, kind = FieldProto.LABEL_REPEATED, kind.split()[1]
                if kind.startswith("."):
                    field.type, field.type_name = FieldProto.TYPE_MESSAGE, kind
                else:
                    field.type = scalars[kind]
        pool = descriptor_pool.DescriptorPool()
        pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
        pool.Add(file_proto)
        for message_name in _TF_SERVING_MESSAGES:
            _message_classes[message_name] = message_factory.GetMessageClass(
                pool.FindMessageTypeByName(f"tensorflow.serving.{message_name}"))
    return _message_classes[name]


def batching_parameters_class():
    """TF Serving's `tensorflow.serving.BatchingParameters` message class."""
    return tf_serving_message_class("BatchingParameters")


def parse_batching_parameters(text: str, source: str = "<batching parameters>") -> BatchingOptions:
    """BatchingOptions from a BatchingParameters text proto; unset fields keep TF Serving's defaults.

    `thread_pool_name`, `allowed_batch_sizes` and `pad_variable_length_inputs` are accepted and
    ignored: batches are never padded.
    """
    parameters = _parse_text(
        text,
        batching_parameters_class()(),
        source,
        "a tensorflow.serving.BatchingParameters in text format, e.g. "
        "max_batch_size { value: 128 } batch_timeout_micros { value: 1000 }",
    )
    values = {}
    for name in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads"):
        if parameters.HasField(name):
            values[name] = getattr(parameters, name).value
    try:
        return BatchingOptions(**values)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def parse_monitoring_config(text: str, source: str = "<monitoring config>") -> Optional[str]:
    """The metrics path a MonitoringConfig text proto enables; None when Prometheus export is off."""
    config = _parse_text(
        text,
        tf_serving_message_class("MonitoringConfig")(),
        source,
        f'a tensorflow.serving.MonitoringConfig in text format, e.g. prometheus_config {{ enable: true '
        f'path: "{DEFAULT_METRICS_PATH}" }}',
    )
    prometheus = config.prometheus_config
    if not prometheus.enable:
        return None
    path = prometheus.path or DEFAULT_METRICS_PATH
    if not path.startswith("/"):
        raise ValueError(f"{source}: prometheus_config.path must start with '/'. Received: {path!r}")
    return path


def read_monitoring_config(path: str) -> Optional[str]:
    return parse_monitoring_config(_read_text(path, "monitoring config"), path)


def read_batching_parameters(path: str) -> BatchingOptions:
    return parse_batching_parameters(_read_text(path, "batching parameters"), path)


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """Everything `serving.server.start` needs; the `xdctr serve` flags map one to one.

    Give either `model_base_path` (one model, `model_name`, latest version) or
    `model_config_file` (TF Serving's ModelServerConfig text file).

    Attributes:
      port, host: the gRPC address; port 0 picks a free port.
      model_name, model_base_path: the single-model mode.
      model_config_file: the multi-model mode.
      model_config_file_poll_wait_seconds: re-read the config file this often; 0 never does.
      file_system_poll_wait_seconds: look for new versions this often; 0 looks once at start.
      enable_batching: dynamic batching across requests (off by default, as in TF Serving).
      batching_parameters_file: BatchingParameters text file; needs `enable_batching`.
      batching: the batching knobs directly (instead of the file).
      rest_api_port: serve TF Serving's REST API on this port (0: a free port; None: off).
      rest_api_timeout_in_ms: how long a REST request may wait for a batch.
      monitoring_config_file: TF Serving's MonitoringConfig text file; with Prometheus export on,
        the metrics are served on the REST API port at its path (needs `rest_api_port`).
      monitoring_port: serve Prometheus metrics over HTTP on this port (0: a free port; None: off).
      monitoring_host: the address of that HTTP server.
      admin_token: when set, HandleReloadConfigRequest needs `authorization: Bearer <token>`.
      allow_remote_admin: accept HandleReloadConfigRequest from non-loopback peers.
      max_workers: gRPC handler threads (with batching, at least twice max_batch_size requests
        must be able to wait at once for full batches).
      tensorflow_intra_op_parallelism, tensorflow_inter_op_parallelism: TensorFlow's thread pools
        (TF Serving's flags; 0 lets TensorFlow choose, one thread per core). Small models under
        concurrent load spend less CPU per call with 1: the concurrency comes from the requests.
      grace: seconds in-flight requests get to finish at shutdown.
      max_request_bytes: gRPC receive limit; larger messages get RESOURCE_EXHAUSTED from gRPC.
      max_request_rows: rows (dimension 0) one request input may carry (RESOURCE_EXHAUSTED above).
      max_request_elements: elements all decoded input tensors of one request may hold together
        (RESOURCE_EXHAUSTED above; a TensorProto can declare a huge shape with one value).
      processes: server processes sharing the gRPC and REST ports (`serving.processes`); each
        holds its own copy of the models, batches its own requests and polls on its own.
    """

    port: int = 0
    host: str = "127.0.0.1"
    model_name: str = DEFAULT_MODEL_NAME
    model_base_path: Optional[str] = None
    model_config_file: Optional[str] = None
    model_config_file_poll_wait_seconds: float = 0.0
    file_system_poll_wait_seconds: float = DEFAULT_FILE_SYSTEM_POLL_WAIT_SECONDS
    enable_batching: bool = False
    batching_parameters_file: Optional[str] = None
    batching: Optional[BatchingOptions] = None
    rest_api_port: Optional[int] = None
    rest_api_timeout_in_ms: int = DEFAULT_REST_API_TIMEOUT_MS
    monitoring_config_file: Optional[str] = None
    monitoring_port: Optional[int] = None
    monitoring_host: str = "127.0.0.1"
    admin_token: Optional[str] = None
    allow_remote_admin: bool = False
    max_workers: int = 16
    tensorflow_intra_op_parallelism: int = 0
    tensorflow_inter_op_parallelism: int = 0
    grace: float = DEFAULT_GRACE_SECONDS
    max_request_bytes: int = MAX_MESSAGE_BYTES
    max_request_rows: int = DEFAULT_MAX_REQUEST_ROWS
    max_request_elements: int = DEFAULT_MAX_REQUEST_ELEMENTS
    processes: int = 1

    def __post_init__(self):
        if (self.model_base_path is None) == (self.model_config_file is None):
            raise ValueError(
                "Give exactly one of --model-base-path (one model) and --model-config-file (a ModelServerConfig); "
                f"got model_base_path={self.model_base_path!r}, model_config_file={self.model_config_file!r}."
            )
        if self.model_base_path is not None and not self.model_name:
            raise ValueError("--model-name must be non-empty with --model-base-path.")
        if (self.batching_parameters_file or self.batching) and not self.enable_batching:
            raise ValueError("Batching parameters were given but batching is off; add --enable-batching.")
        if self.batching_parameters_file and self.batching:
            raise ValueError("Give batching parameters as a file or as options, not both.")
        if self.monitoring_config_file and self.rest_api_port is None:
            raise ValueError("--monitoring_config_file serves the metrics on the REST API port; add --rest_api_port "
                             "(or use --monitoring-port).")
        for name in ("port", "rest_api_port", "monitoring_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ValueError(f"`{name}` must be in [0, 65535]. Received: {name}={value}")
        for name in ("model_config_file_poll_wait_seconds", "file_system_poll_wait_seconds", "grace",
                     "tensorflow_intra_op_parallelism", "tensorflow_inter_op_parallelism"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0. Received: {name}={getattr(self, name)}")
        for name in ("max_workers", "max_request_bytes", "max_request_rows", "max_request_elements",
                     "rest_api_timeout_in_ms"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1. Received: {name}={getattr(self, name)}")
        if self.max_request_bytes > MAX_MESSAGE_BYTES:
            raise ValueError(f"`max_request_bytes` must be at most {MAX_MESSAGE_BYTES}. Received: {self.max_request_bytes}")
        if self.admin_token is not None and not self.admin_token.strip():
            raise ValueError("`admin_token` must not be blank.")
        if self.processes < 1:
            raise ValueError(f"`processes` must be at least 1. Received: processes={self.processes}")
        if self.processes > 1 and self.monitoring_config_file:
            raise ValueError("--monitoring_config_file serves one process's metrics on the shared REST port, so a "
                             "scrape would see a random process; with --processes > 1 use --monitoring-port (process "
                             "i serves its metrics on PORT + i).")

    def model_server_config(self) -> model_server_config_pb2.ModelServerConfig:
        """The ModelServerConfig to start with (read from the file, or the single model)."""
        if self.model_config_file is not None:
            return read_model_server_config(self.model_config_file)
        return single_model_config(self.model_name, self.model_base_path)

    def metrics_path_on_rest_port(self) -> Optional[str]:
        """Where the REST API port serves the metrics (from --monitoring_config_file), or None."""
        return read_monitoring_config(self.monitoring_config_file) if self.monitoring_config_file else None

    def batching_options(self) -> Optional[BatchingOptions]:
        """The batching knobs, or None when batching is off."""
        if not self.enable_batching:
            return None
        if self.batching_parameters_file:
            return read_batching_parameters(self.batching_parameters_file)
        return self.batching or BatchingOptions()
