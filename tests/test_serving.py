"""`xdctr serve` over a real gRPC channel, with the standard TF Serving client stubs.

Predict, GetModelMetadata, Classify, Regress, GetModelStatus, version labels, malformed requests
with their exact status codes, admin restrictions, metrics, logs and graceful shutdown.
Version polling and config reloads are in test_serving_models.py, batching in
test_serving_batching.py; both import the toy-model helpers from here.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from serving import admin, client, inference, loader, monitoring, server, versions
from serving.config import ServerOptions
from xdctr import features as F

MODEL_NAME = "ctr_model"
X_FEATURE = "x"  # the one feature of the toy model
XS = np.array([-2.0, 0.0, 0.5, 3.0], dtype=np.float32)
CLASSIFY_SIGNATURE = "classify"
REGRESS_SIGNATURE = "regress"
CLASS_LABELS = (b"no_click", b"click")
ADMIN_TOKEN = "s3cret-token"
MAX_ROWS = 16
MAX_REQUEST_BYTES = 64 * 1024
AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
END = get_model_status_pb2.ModelVersionStatus.END


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def example(x=None) -> tf.train.Example:
    feature = {} if x is None else {X_FEATURE: tf.train.Feature(float_list=tf.train.FloatList(value=[x]))}
    return tf.train.Example(features=tf.train.Features(feature=feature))


def serialize(xs) -> list[bytes]:
    return [example(float(x)).SerializeToString() for x in xs]


def save_toy_model(path, scale: float, count_calls: bool = False) -> None:
    """A SavedModel scoring sigmoid(scale * x) for tf.Examples with one float feature "x".

    Signatures: `serving_default` (xdctr's: "examples" in, "ctr" out), `classify` (TF Serving's
    classification layout: "inputs" in, "scores" and "classes" (batch, 2) out) and `regress`
    ("inputs" in, "outputs" out). With `count_calls`, the variable `calls` counts serving_default
    calls.
    """
    module = tf.Module()
    module.calls = tf.Variable(0, dtype=tf.int64)

    def score(serialized):
        x = tf.io.parse_example(serialized, {X_FEATURE: tf.io.FixedLenFeature([], tf.float32)})[X_FEATURE]
        return tf.sigmoid(scale * x)  # (batch,)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=F.SERVING_INPUT)])
    def serve(examples):
        if count_calls:
            module.calls.assign_add(1)
        return {F.SERVING_OUTPUT: score(examples)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=tf.saved_model.CLASSIFY_INPUTS)])
    def classify(inputs):
        p = score(inputs)
        classes = tf.tile(tf.constant([list(CLASS_LABELS)]), [tf.shape(p)[0], 1])  # (batch, 2)
        return {
            tf.saved_model.CLASSIFY_OUTPUT_SCORES: tf.stack([1.0 - p, p], axis=1),  # (batch, 2)
            tf.saved_model.CLASSIFY_OUTPUT_CLASSES: classes,
        }

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=tf.saved_model.REGRESS_INPUTS)])
    def regress(inputs):
        return {tf.saved_model.REGRESS_OUTPUTS: score(inputs)}

    module.serve, module.classify, module.regress = serve, classify, regress
    tf.saved_model.save(
        module,
        str(path),
        signatures={F.SERVING_SIGNATURE: serve, CLASSIFY_SIGNATURE: classify, REGRESS_SIGNATURE: regress},
    )


def model_config_text(name: str, base_path, policy: str = "", labels: dict | None = None) -> str:
    """A ModelServerConfig in TF Serving's text format with one model."""
    label_lines = "".join(f' version_labels {{ key: "{k}" value: {v} }}' for k, v in (labels or {}).items())
    policy_line = f" model_version_policy {{ {policy} }}" if policy else ""
    return (
        f'model_config_list {{ config {{ name: "{name}" base_path: "{base_path}" model_platform: "tensorflow"'
        f"{policy_line}{label_lines} }} }}\n"
    )


def predict_request(xs=XS, version=None, label=None, signature=F.SERVING_SIGNATURE, model=MODEL_NAME):
    request = client.build_predict_request(model, serialize(xs), signature_name=signature, version=version)
    if label is not None:
        request.model_spec.version_label = label
    return request


def scores_of(response) -> np.ndarray:
    return tf.make_ndarray(response.outputs[F.SERVING_OUTPUT])


def status_request(model=MODEL_NAME, version=None) -> get_model_status_pb2.GetModelStatusRequest:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model
    if version is not None:
        request.model_spec.version.value = version
    return request


def metric_value(metrics_text: str, sample_name: str, **labels) -> float:
    """The value of the sample with exactly `labels`, 0 when absent."""
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == sample_name and sample.labels == labels:
                return sample.value
    return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# Fixtures: one server, all versions, labels, metrics, an admin token and small request limits.


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    save_toy_model(base / "1", scale=1.0)
    save_toy_model(base / "2", scale=2.0)  # the latest loadable version
    (base / "3").mkdir()
    (base / "3" / loader.SAVED_MODEL_FILE).write_bytes(b"not a saved model")  # corrupt: never served
    (base / "4").mkdir()  # no saved_model.pb: never served
    (base / "latest").mkdir()  # not an integer: ignored
    return base


@pytest.fixture(scope="module")
def running(base_path, tmp_path_factory):
    config_file = tmp_path_factory.mktemp("config") / "models.config"
    config_file.write_text(
        model_config_text(MODEL_NAME, base_path, policy="all {}", labels={"stable": 1, "canary": 2})
    )
    options = ServerOptions(
        model_config_file=str(config_file),
        file_system_poll_wait_seconds=0.0,
        monitoring_port=0,
        admin_token=ADMIN_TOKEN,
        max_workers=4,
        max_request_rows=MAX_ROWS,
        max_request_bytes=MAX_REQUEST_BYTES,
    )
    running = server.start(options)
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def channel(running):
    with grpc.insecure_channel(running.target) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel):
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


@pytest.fixture(scope="module")
def model_stub(channel):
    return model_service_pb2_grpc.ModelServiceStub(channel)


# ----------------------------------------------------------------------------------------------
# Predict and the version choice.


@pytest.mark.parametrize(
    "choice, expected_version",
    [({}, 2), ({"version": 1}, 1), ({"version": 2}, 2), ({"label": "stable"}, 1), ({"label": "canary"}, 2)],
)
def test_predict_by_version_or_label(stub, choice, expected_version):
    response = stub.Predict(predict_request(**choice), timeout=10)
    np.testing.assert_allclose(scores_of(response), sigmoid(expected_version * XS), rtol=1e-6)
    assert response.model_spec.name == MODEL_NAME
    assert response.model_spec.version.value == expected_version
    assert response.model_spec.signature_name == F.SERVING_SIGNATURE


def test_loads_every_valid_version(running):
    assert sorted(running.model_server.manager.loaded_versions(MODEL_NAME)) == [1, 2]
    assert running.model_server.manager.labels(MODEL_NAME) == {"stable": 1, "canary": 2}


def test_empty_signature_name_means_serving_default(stub):
    request = predict_request()
    request.model_spec.signature_name = ""
    request.ClearField("output_filter")  # no filter: every output comes back
    response = stub.Predict(request, timeout=10)
    assert list(response.outputs) == [F.SERVING_OUTPUT]
    assert response.model_spec.signature_name == F.SERVING_SIGNATURE


def test_client_predict_examples(running):
    scores = client.predict_examples(running.target, MODEL_NAME, serialize(XS), version=1)
    assert scores.shape == (len(XS),)
    np.testing.assert_allclose(scores, sigmoid(XS), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Malformed requests: TF Serving's status codes, and the server keeps serving.


def _set_input(request, tensor_proto):
    request.inputs[F.SERVING_INPUT].CopyFrom(tensor_proto)


def _unknown_model(request):
    request.model_spec.name = "no_such_model"


def _no_model_name(request):
    request.model_spec.name = ""


def _unknown_version(request):
    request.model_spec.version.value = 3  # the corrupt directory is never served


def _unknown_label(request):
    request.model_spec.version_label = "no_such_label"


def _unknown_signature(request):
    request.model_spec.signature_name = "no_such_signature"


def _wrong_input_name(request):
    request.inputs["wrong_name"].CopyFrom(request.inputs[F.SERVING_INPUT])
    del request.inputs[F.SERVING_INPUT]


def _wrong_dtype(request):
    _set_input(request, tf.make_tensor_proto(XS))  # float instead of string


def _wrong_rank(request):
    _set_input(request, tf.make_tensor_proto([serialize(XS)], dtype=tf.string))


def _negative_dimension(request):
    request.inputs[F.SERVING_INPUT].tensor_shape.dim[0].size = -3


def _values_do_not_match_shape(request):
    _set_input(request, tf.make_tensor_proto([b"a", b"b", b"c"], dtype=tf.string))
    request.inputs[F.SERVING_INPUT].tensor_shape.dim[0].size = 2


def _garbage_example(request):
    _set_input(request, tf.make_tensor_proto([b"garbage"], dtype=tf.string))


def _garbage_binary_example(request):  # not UTF-8: TensorFlow's own error message fails to decode
    _set_input(request, tf.make_tensor_proto([b"\xff garbage"], dtype=tf.string))


def _unknown_output(request):
    request.output_filter.append("no_such_output")


def _duplicate_output(request):
    request.output_filter.append(F.SERVING_OUTPUT)


def _too_many_rows(request):
    _set_input(request, tf.make_tensor_proto(serialize(range(MAX_ROWS + 1)), dtype=tf.string))


def _shape_bomb(request):  # few values declared as 10^12 elements: TensorProto repeats the last value
    request.inputs[F.SERVING_INPUT].tensor_shape.dim.add(size=10**12)


def _huge_message(request):
    _set_input(request, tf.make_tensor_proto([b"x" * (2 * MAX_REQUEST_BYTES)], dtype=tf.string))


BAD_REQUESTS = {
    "unknown_model": (_unknown_model, grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(no_such_model)"),
    "no_model_name": (_no_model_name, grpc.StatusCode.INVALID_ARGUMENT, "ModelSpec has no name specified"),
    "unknown_version": (_unknown_version, grpc.StatusCode.NOT_FOUND, f"Specific({MODEL_NAME}, 3)"),
    "unknown_label": (_unknown_label, grpc.StatusCode.INVALID_ARGUMENT, "Unrecognized servable version label: no_such_label"),
    "unknown_signature": (_unknown_signature, grpc.StatusCode.FAILED_PRECONDITION, '"no_such_signature" not found'),
    "wrong_input_name": (_wrong_input_name, grpc.StatusCode.INVALID_ARGUMENT, "wrong_name"),
    "wrong_dtype": (_wrong_dtype, grpc.StatusCode.INVALID_ARGUMENT, "expects dtype string but float32 was provided"),
    "wrong_rank": (_wrong_rank, grpc.StatusCode.INVALID_ARGUMENT, "shape"),
    "negative_dimension": (_negative_dimension, grpc.StatusCode.INVALID_ARGUMENT, "tensor parsing error"),
    "values_do_not_match_shape": (_values_do_not_match_shape, grpc.StatusCode.INVALID_ARGUMENT, "tensor parsing error"),
    "garbage_example": (_garbage_example, grpc.StatusCode.INVALID_ARGUMENT, "Could not parse example"),
    "garbage_binary_example": (_garbage_binary_example, grpc.StatusCode.INVALID_ARGUMENT, "Could not parse example"),
    "unknown_output": (_unknown_output, grpc.StatusCode.INVALID_ARGUMENT, "no_such_output"),
    "duplicate_output": (_duplicate_output, grpc.StatusCode.INVALID_ARGUMENT, "Duplicate output"),
    "too_many_rows": (_too_many_rows, grpc.StatusCode.RESOURCE_EXHAUSTED, f"at most {MAX_ROWS}"),
    "shape_bomb": (_shape_bomb, grpc.StatusCode.RESOURCE_EXHAUSTED, "elements"),
    "huge_message": (_huge_message, grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_gets_status_code(stub, case):
    mutate, code, detail = BAD_REQUESTS[case]
    request = predict_request()
    mutate(request)
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request, timeout=10)
    assert info.value.code() == code
    assert detail in info.value.details()


def test_still_serves_after_bad_requests(stub, channel):
    for mutate, code, _ in BAD_REQUESTS.values():
        request = predict_request()
        mutate(request)
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(request, timeout=10)
        assert info.value.code() == code
    response = stub.Predict(predict_request(), timeout=10)
    np.testing.assert_allclose(scores_of(response), sigmoid(2.0 * XS), rtol=1e-6)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_unexpected_exception_is_internal_and_server_keeps_running(stub, running, monkeypatch):
    signature = running.model_server.manager.loaded_versions(MODEL_NAME)[2].signatures[F.SERVING_SIGNATURE]

    def explode(inputs):
        raise RuntimeError("boom")

    monkeypatch.setattr(signature, "run", explode)
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(predict_request(), timeout=10)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "boom" in info.value.details()
    monkeypatch.undo()
    assert stub.Predict(predict_request(), timeout=10).model_spec.version.value == 2


# ----------------------------------------------------------------------------------------------
# GetModelMetadata and GetModelStatus.


def test_get_model_metadata_signature_def(stub):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=[inference.SIGNATURE_DEF_FIELD])
    request.model_spec.name = MODEL_NAME
    request.model_spec.version_label = "stable"
    response = stub.GetModelMetadata(request, timeout=10)
    assert response.model_spec.version.value == 1
    signature_defs = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata[inference.SIGNATURE_DEF_FIELD].Unpack(signature_defs)
    assert sorted(signature_defs.signature_def) == sorted([F.SERVING_SIGNATURE, CLASSIFY_SIGNATURE, REGRESS_SIGNATURE])
    signature = signature_defs.signature_def[F.SERVING_SIGNATURE]
    assert list(signature.inputs) == [F.SERVING_INPUT]
    assert signature.inputs[F.SERVING_INPUT].dtype == tf.string.as_datatype_enum
    assert [d.size for d in signature.inputs[F.SERVING_INPUT].tensor_shape.dim] == [-1]
    assert list(signature.outputs) == [F.SERVING_OUTPUT]
    assert signature.outputs[F.SERVING_OUTPUT].dtype == tf.float32.as_datatype_enum


@pytest.mark.parametrize("fields, detail", [(["no_such_field"], "no_such_field"), ([], "at least one metadata_field")])
@pytest.mark.parametrize("model", [MODEL_NAME, "no_such_model"])
def test_get_model_metadata_rejects_other_fields_before_looking_up_the_model(stub, fields, detail, model):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=fields)
    request.model_spec.name = model
    with pytest.raises(grpc.RpcError) as info:
        stub.GetModelMetadata(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert detail in info.value.details()


def test_get_model_status_lists_every_version_with_its_error(model_stub):
    response = model_stub.GetModelStatus(status_request(), timeout=10)
    statuses = {s.version: s for s in response.model_version_status}
    assert [s.version for s in response.model_version_status] == [4, 3, 2, 1]
    for version in (1, 2):
        assert statuses[version].state == AVAILABLE
        assert statuses[version].status.error_code == grpc.StatusCode.OK.value[0]
    assert statuses[4].state == END
    assert statuses[4].status.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert loader.SAVED_MODEL_FILE in statuses[4].status.error_message
    assert statuses[3].state == END
    assert statuses[3].status.error_code != grpc.StatusCode.OK.value[0]
    assert statuses[3].status.error_message


def test_get_model_status_of_one_version(model_stub):
    response = model_stub.GetModelStatus(status_request(version=2), timeout=10)
    assert [(s.version, s.state) for s in response.model_version_status] == [(2, AVAILABLE)]


@pytest.mark.parametrize(
    "request_args, detail",
    [({"version": 7}, f"Could not find version 7 of model {MODEL_NAME}"),
     ({"model": "no_such_model"}, "Could not find any versions of model no_such_model")],
)
def test_get_model_status_not_found(model_stub, request_args, detail):
    with pytest.raises(grpc.RpcError) as info:
        model_stub.GetModelStatus(status_request(**request_args), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert detail in info.value.details()


# ----------------------------------------------------------------------------------------------
# Classify and Regress.


def classification_request(signature, examples, version=None, context=None):
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = MODEL_NAME
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if context is None:
        request.input.example_list.examples.extend(examples)
    else:
        request.input.example_list_with_context.context.CopyFrom(context)
        request.input.example_list_with_context.examples.extend(examples)
    return request


def test_classify_returns_classes_and_scores(stub):
    response = stub.Classify(classification_request(CLASSIFY_SIGNATURE, [example(x) for x in XS], version=1), timeout=10)
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == CLASSIFY_SIGNATURE
    p = sigmoid(XS)
    assert len(response.result.classifications) == len(XS)
    for i, classifications in enumerate(response.result.classifications):
        assert [c.label for c in classifications.classes] == [label.decode() for label in CLASS_LABELS]
        np.testing.assert_allclose([c.score for c in classifications.classes], [1 - p[i], p[i]], rtol=1e-5)


def test_classify_merges_the_context_into_each_example(stub):
    # Example 0 has no "x" and takes the context's 0.5; example 1's own x=3.0 wins over the context.
    request = classification_request(CLASSIFY_SIGNATURE, [example(), example(3.0)], version=1, context=example(0.5))
    response = stub.Classify(request, timeout=10)
    scores = [c.classes[1].score for c in response.result.classifications]
    np.testing.assert_allclose(scores, sigmoid([0.5, 3.0]), rtol=1e-5)


def test_regress_returns_one_value_per_example(stub):
    request = regression_pb2.RegressionRequest()
    request.model_spec.name = MODEL_NAME
    request.model_spec.signature_name = REGRESS_SIGNATURE
    request.input.example_list.examples.extend(example(x) for x in XS)
    response = stub.Regress(request, timeout=10)
    assert response.model_spec.version.value == 2
    np.testing.assert_allclose([r.value for r in response.result.regressions], sigmoid(2.0 * XS), rtol=1e-5)


@pytest.mark.parametrize(
    "api, signature, examples, detail",
    [
        ("Classify", F.SERVING_SIGNATURE, [example(1.0)], "No classification inputs found in SignatureDef"),
        ("Regress", F.SERVING_SIGNATURE, [example(1.0)], "No regression inputs found in SignatureDef"),
        ("Regress", CLASSIFY_SIGNATURE, [example(1.0)], "Expected one output Tensor."),
        ("Classify", "no_such_signature", [example(1.0)], "No signature was found with the name: no_such_signature"),
        ("Classify", CLASSIFY_SIGNATURE, [], "Input is empty."),
    ],
)
def test_classify_and_regress_refuse_like_tf_serving(stub, api, signature, examples, detail):
    """xdctr's serving_default ("examples" in, "ctr" out) is not a classify/regress signature."""
    request = classification_request(signature, examples)
    if api == "Regress":
        request = regression_pb2.RegressionRequest(model_spec=request.model_spec, input=request.input)
    with pytest.raises(grpc.RpcError) as info:
        getattr(stub, api)(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert detail in info.value.details()


# ----------------------------------------------------------------------------------------------
# Health, metrics and logs.


def test_health_check_serving(running, channel):
    health_stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", MODEL_NAME, "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService"):
        response = health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    client.wait_until_serving(running.target, timeout=5.0, service=MODEL_NAME)  # returns without raising


def test_wait_until_serving_times_out_without_server():
    with pytest.raises(TimeoutError, match="SERVING"):
        client.wait_until_serving("127.0.0.1:1", timeout=0.5)


def read_metrics(running) -> str:
    url = f"http://127.0.0.1:{running.monitoring_port}{monitoring.METRICS_PATH}"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


def test_metrics_count_requests_by_model_version_signature_and_status(running, stub):
    ok = dict(model=MODEL_NAME, version="1", signature=F.SERVING_SIGNATURE, api="predict", status="OK")
    unknown = dict(model="", version="", signature="", api="predict", status="NOT_FOUND")
    before = read_metrics(running)
    for _ in range(3):
        stub.Predict(predict_request(version=1), timeout=10)
    with pytest.raises(grpc.RpcError):
        stub.Predict(predict_request(model="no_such_model"), timeout=10)
    after = read_metrics(running)
    count = "xdctr_serving_requests_total"
    assert metric_value(after, count, **ok) - metric_value(before, count, **ok) == 3
    assert metric_value(after, count, **unknown) - metric_value(before, count, **unknown) == 1
    latency = "xdctr_serving_request_latency_seconds_count"
    assert metric_value(after, latency, **ok) - metric_value(before, latency, **ok) == 3
    rows = "xdctr_serving_batch_size_sum"
    labels = dict(model=MODEL_NAME, version="1", signature=F.SERVING_SIGNATURE)
    assert metric_value(after, rows, **labels) - metric_value(before, rows, **labels) == 3 * len(XS)
    events = "xdctr_serving_model_load_events_total"
    assert metric_value(after, events, model=MODEL_NAME, event="load_success") == 2
    assert metric_value(after, events, model=MODEL_NAME, event="load_failure") == 2  # versions 3 and 4
    assert metric_value(after, "xdctr_serving_model_versions_available", model=MODEL_NAME) == 2


def test_metrics_http_server_answers_404_elsewhere(running):
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://127.0.0.1:{running.monitoring_port}/metrics", timeout=10)
    assert info.value.code == 404


def test_log_event_is_one_json_line_with_fields():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(monitoring.JsonFormatter())
    log = logging.getLogger("test_serving.json")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        monitoring.log_event(log, logging.INFO, "version_loaded", model="m", version=3, seconds=0.25)
    finally:
        log.removeHandler(handler)
    (line,) = stream.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["event"] == "version_loaded"
    assert (entry["model"], entry["version"], entry["seconds"]) == ("m", 3, 0.25)
    assert (entry["level"], entry["logger"]) == ("INFO", "test_serving.json")


# ----------------------------------------------------------------------------------------------
# Admin RPCs: loopback peers only (unless allowed) and the token.


def reload_request(running) -> model_management_pb2.ReloadConfigRequest:
    return model_management_pb2.ReloadConfigRequest(config=running.model_server.manager.config)


@pytest.mark.parametrize("metadata", [None, (("authorization", "Bearer wrong"),), (("authorization", ADMIN_TOKEN),)])
def test_reload_config_without_the_token_is_denied(running, model_stub, metadata):
    with pytest.raises(grpc.RpcError) as info:
        model_stub.HandleReloadConfigRequest(reload_request(running), metadata=metadata, timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "Bearer" in info.value.details()


def test_reload_config_with_the_token_from_loopback(running, model_stub):
    metadata = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    response = model_stub.HandleReloadConfigRequest(reload_request(running), metadata=metadata, timeout=10)
    assert response.status.error_code == grpc.StatusCode.OK.value[0]
    assert sorted(running.model_server.manager.loaded_versions(MODEL_NAME)) == [1, 2]


def test_admin_rpcs_are_refused_from_remote_peers_unless_allowed(running):
    manager = running.model_server.manager
    remote, token = "ipv4:10.1.2.3:5555", {"authorization": f"Bearer {ADMIN_TOKEN}"}
    local_only = admin.ModelAdmin(manager, admin_token=ADMIN_TOKEN)
    assert "loopback" in local_only.admin_denial(remote, token)
    allowed = admin.ModelAdmin(manager, admin_token=ADMIN_TOKEN, allow_remote_admin=True)
    assert allowed.admin_denial(remote, token) is None
    assert "Bearer" in allowed.admin_denial(remote, {})
    no_token = admin.ModelAdmin(manager)
    assert no_token.admin_denial("ipv6:[::1]:5555", {}) is None


@pytest.mark.parametrize(
    "peer, loopback",
    [
        ("ipv4:127.0.0.1:5000", True),
        ("ipv4:127.8.9.10:5000", True),
        ("ipv6:[::1]:5000", True),
        ("ipv6:%5B::1%5D:5000", True),  # gRPC percent-encodes the brackets
        ("ipv6:[::ffff:127.0.0.1]:5000", True),
        ("unix:/tmp/socket", True),
        ("ipv4:10.0.0.1:5000", False),
        ("ipv6:[2001:db8::1]:5000", False),
        ("ipv6:[::ffff:10.0.0.1]:5000", False),
        ("garbage", False),
    ],
)
def test_is_loopback_peer(peer, loopback):
    assert admin.is_loopback_peer(peer) is loopback


# ----------------------------------------------------------------------------------------------
# Graceful shutdown, the CLI entry point and the start_server helper.


def test_stop_lets_running_requests_finish(base_path, monkeypatch):
    running = server.start(ServerOptions(model_name=MODEL_NAME, model_base_path=str(base_path), max_workers=2,
                                         file_system_poll_wait_seconds=0.0))
    started = threading.Event()
    signature = running.model_server.manager.loaded_versions(MODEL_NAME)[2].signatures[F.SERVING_SIGNATURE]
    real_run = signature.run

    def slow_run(inputs):
        started.set()
        time.sleep(0.5)
        return real_run(inputs)

    monkeypatch.setattr(signature, "run", slow_run)
    results = {}
    with grpc.insecure_channel(running.target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

        def call():
            results["response"] = stub.Predict(predict_request(), timeout=10)

        caller = threading.Thread(target=call)
        caller.start()
        try:
            assert started.wait(10)
            running.stop(grace=5.0)
        finally:
            caller.join(10)
        assert results["response"].model_spec.version.value == 2
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(predict_request(), timeout=2)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_run_from_args_serves_until_sigint(base_path, monkeypatch):
    monkeypatch.setattr(server, "configure_json_logging", lambda level: None)  # keep pytest's log capture
    parser = argparse.ArgumentParser()
    server.add_arguments(parser)
    port = free_port()
    args = parser.parse_args(["--model-name", MODEL_NAME, "--model-base-path", str(base_path), "--port", str(port),
                              "--host", "127.0.0.1", "--file-system-poll-wait-seconds", "0", "--grace", "1"])
    answers = []

    def score_then_interrupt():
        try:
            target = f"127.0.0.1:{port}"
            client.wait_until_serving(target, timeout=30.0, service=MODEL_NAME)
            answers.append(client.predict_examples(target, MODEL_NAME, serialize(XS)))
        finally:
            os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=score_then_interrupt)
    thread.start()
    try:
        assert server.run_from_args(args) == 0
    finally:
        thread.join(30)
    np.testing.assert_allclose(answers[0], sigmoid(2.0 * XS), rtol=1e-6)  # latest version only


def test_options_from_args_maps_every_flag(tmp_path):
    parser = argparse.ArgumentParser()
    server.add_arguments(parser)
    batching_file = tmp_path / "batching.txt"
    args = parser.parse_args([
        "--model-config-file", "models.config", "--model-config-file-poll-wait-seconds", "30",
        "--file-system-poll-wait-seconds", "2", "--enable-batching", "--batching-parameters-file", str(batching_file),
        "--monitoring-port", "8502", "--admin-token", "t", "--allow-remote-admin", "--max-workers", "32",
        "--grace", "9", "--port", "9000", "--max-request-rows", "50",
    ])
    options = server.options_from_args(args)
    assert options.model_config_file == os.path.abspath("models.config")
    assert options.model_base_path is None
    assert (options.model_config_file_poll_wait_seconds, options.file_system_poll_wait_seconds) == (30.0, 2.0)
    assert (options.enable_batching, options.batching_parameters_file) == (True, str(batching_file))
    assert (options.monitoring_port, options.monitoring_host, options.port) == (8502, "0.0.0.0", 9000)
    assert (options.admin_token, options.allow_remote_admin) == ("t", True)
    assert (options.max_workers, options.grace, options.max_request_rows) == (32, 9.0, 50)


@pytest.mark.parametrize("batching_flags, enabled", [
    (["--enable_batching"], True), (["--enable_batching=true"], True), (["--enable_batching=false"], False),
    (["--enable-batching"], True), ([], False),
])
def test_tf_serving_flag_spellings_are_accepted(batching_flags, enabled):
    parser = argparse.ArgumentParser()
    server.add_arguments(parser)
    args = parser.parse_args(["--port=9000", "--rest_api_port=8501", "--model_name=half", "--model_base_path=/m",
                              "--file_system_poll_wait_seconds=30", "--rest_api_timeout_in_ms=5000",
                              "--monitoring_config_file=/c/monitoring.config", *batching_flags])
    options = server.options_from_args(args)
    assert (options.port, options.rest_api_port, options.rest_api_timeout_in_ms) == (9000, 8501, 5000)
    assert (options.model_name, options.model_base_path) == ("half", "/m")
    assert options.file_system_poll_wait_seconds == pytest.approx(30.0)
    assert options.monitoring_config_file == "/c/monitoring.config"
    assert options.enable_batching is enabled


def test_rest_api_port_0_is_off_as_in_tf_serving():
    parser = argparse.ArgumentParser()
    server.add_arguments(parser)
    assert server.options_from_args(parser.parse_args(["--model_base_path=/m", "--rest_api_port=0"])).rest_api_port is None


@pytest.mark.parametrize(
    "flags, detail",
    [
        ([], "exactly one of --model-base-path"),
        (["--model-base-path", "m", "--monitoring_config_file", "c"], "add --rest_api_port"),
        (["--model-base-path", "m", "--enable_batching=maybe"], None),
        (["--model-base-path", "m", "--model-config-file", "c"], "exactly one of --model-base-path"),
        (["--model-base-path", "m", "--batching-parameters-file", "b"], "--enable-batching"),
        (["--model-base-path", "m", "--port", "70000"], "port"),
    ],
)
def test_options_from_args_rejects_bad_combinations(flags, detail):
    parser = argparse.ArgumentParser(exit_on_error=False)
    server.add_arguments(parser)
    if detail is None:  # refused by the parser
        with pytest.raises(argparse.ArgumentError, match="expected true or false"):
            parser.parse_args(flags)
        return
    with pytest.raises(ValueError, match=detail):
        server.options_from_args(parser.parse_args(flags))


def test_start_server_serves_every_version(base_path):
    grpc_server, port, model_server = server.start_server(MODEL_NAME, str(base_path), port=0, max_workers=2)
    try:
        assert sorted(model_server.manager.loaded_versions(MODEL_NAME)) == [1, 2]
        np.testing.assert_allclose(
            client.predict_examples(f"127.0.0.1:{port}", MODEL_NAME, serialize(XS), version=1), sigmoid(XS), rtol=1e-6
        )
    finally:
        grpc_server.stop(None)


def test_no_valid_version_raises_value_error(tmp_path, caplog):
    (tmp_path / "1").mkdir()  # no saved_model.pb
    (tmp_path / "2").mkdir()
    (tmp_path / "2" / loader.SAVED_MODEL_FILE).write_bytes(b"garbage")
    (tmp_path / "notes").mkdir()
    with caplog.at_level(logging.WARNING, logger=versions.__name__):
        with pytest.raises(ValueError, match=r"<version>/saved_model\.pb") as info:
            server.start_server(MODEL_NAME, str(tmp_path))
    message = str(info.value)
    assert str(tmp_path) in message and "\n" not in message
    assert "version 1: NOT_FOUND" in message and "version 2:" in message
    failed = sorted(r.xdctr_fields["version"] for r in caplog.records if getattr(r, "xdctr_event", None) == "version_load_failed")
    assert failed == [1, 2]


def test_missing_base_path_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match=f"Could not find base path {tmp_path / 'missing'} for servable {MODEL_NAME}"):
        server.start_server(MODEL_NAME, str(tmp_path / "missing"))
