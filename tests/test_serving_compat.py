"""TF Serving compatibility: TF Serving's own test models and client calls, answered as TF Serving does.

The models are rebuilt by tests/fixtures/make_tf_serving_models.py (TF1 graphs through
`tf.compat.v1` and a TF2 `tf.Module`, committed under tests/fixtures/tf_serving/, version
00000123). The requests and expected values are those of TF Serving's tests
(tensorflow_model_server_test.py, multi_inference_test.cc, the REST API docs): y = 0.5x + 2,
y2 = 0.5x + 3, half_plus_three y = 0.5x + 3; Predict x=[2.0] -> 3.0, x=[1.0, 2.0, 5.0] ->
[2.5, 3.0, 4.5]. Clients are the standard `tensorflow-serving-api` stubs and read outputs the
way TF Serving's clients do (`float_val`).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from serving import rest_json, server, warmup
from serving.batching import BatchingOptions
from serving.config import ServerOptions
from serving.status import ServingError
from test_serving import channel, stub  # noqa: F401 (fixtures on this module's `running`)

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "tf_serving"
VERSION = 123
HALF_PLUS_TWO, HALF_PLUS_THREE = "half_plus_two", "half_plus_three"
HALF_PLUS_TWO_TF2, COUNTER = "half_plus_two_tf2", "counter"
MODELS = {
    HALF_PLUS_TWO: "saved_model_half_plus_two",
    HALF_PLUS_THREE: "saved_model_half_plus_three",
    HALF_PLUS_TWO_TF2: "saved_model_half_plus_two_tf2",
    COUNTER: "saved_model_counter",
}
HALF_PLUS_TWO_MODELS = (HALF_PLUS_TWO, HALF_PLUS_TWO_TF2)
REGRESS_METHOD, CLASSIFY_METHOD = "tensorflow/serving/regress", "tensorflow/serving/classify"
PREDICT_METHOD = "tensorflow/serving/predict"
TIMEOUT = 10.0
METRICS_PATH = "/monitoring/prometheus/metrics"


def models_config(names) -> str:
    entries = "".join(
        f'config {{ name: "{name}" base_path: "{FIXTURES / MODELS[name]}" model_platform: "tensorflow" }} '
        for name in names
    )
    return f"model_config_list {{ {entries}}}\n"


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    directory = tmp_path_factory.mktemp("compat")
    config_file, monitoring_file = directory / "models.config", directory / "monitoring.config"
    config_file.write_text(models_config(MODELS))
    monitoring_file.write_text(f'prometheus_config {{ enable: true path: "{METRICS_PATH}" }}\n')
    running = server.start(ServerOptions(model_config_file=str(config_file), file_system_poll_wait_seconds=0.0,
                                         max_workers=4, rest_api_port=0, monitoring_config_file=str(monitoring_file)))
    yield running
    running.stop(0)


def predict_request(model: str, xs, shape=None, output_filter=("y",), signature="") -> predict_pb2.PredictRequest:
    """TF Serving's test request: input "x" as float_val with an explicit shape (default [len(xs)])."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    request.inputs["x"].dtype = types_pb2.DT_FLOAT
    request.inputs["x"].float_val.extend(xs)
    for size in ([len(xs)] if shape is None else shape):
        request.inputs["x"].tensor_shape.dim.add(size=size)
    request.output_filter.extend(output_filter)
    return request


def add_example(input_proto, x: float) -> None:
    input_proto.example_list.examples.add().features.feature["x"].float_list.value.append(x)


def assert_model_spec(spec, name: str, signature: str) -> None:
    assert (spec.name, spec.signature_name, spec.version.value) == (name, signature, VERSION)


# ----------------------------------------------------------------------------------------------
# Predict.


@pytest.mark.parametrize("model, expected", [(HALF_PLUS_TWO, 3.0), (HALF_PLUS_TWO_TF2, 3.0), (HALF_PLUS_THREE, 4.0)])
@pytest.mark.parametrize("output_filter", [("y",), ()])
def test_predict_x_2_as_tf_serving_tests_send_it(stub, model, expected, output_filter):
    """TF Serving's VerifyPredictRequest: x=[2.0] with shape [1], with and without output_filter."""
    response = stub.Predict(predict_request(model, [2.0], output_filter=output_filter), timeout=TIMEOUT)
    assert list(response.outputs) == ["y"]
    y = response.outputs["y"]
    assert y.dtype == types_pb2.DT_FLOAT
    assert len(y.float_val) == 1 and y.float_val[0] == pytest.approx(expected)
    assert_model_spec(response.model_spec, model, "serving_default")


@pytest.mark.parametrize("model", HALF_PLUS_TWO_MODELS)
def test_predict_fills_float_val_for_several_values(stub, model):
    response = stub.Predict(predict_request(model, [1.0, 2.0, 5.0]), timeout=TIMEOUT)
    y = response.outputs["y"]
    assert not y.tensor_content
    np.testing.assert_allclose(list(y.float_val), [2.5, 3.0, 4.5], rtol=1e-6)
    assert [d.size for d in y.tensor_shape.dim] == [3]


@pytest.mark.parametrize("model", HALF_PLUS_TWO_MODELS)
@pytest.mark.parametrize("shape, values, expected_shape", [
    ([], [2.0], []),  # a scalar x
    ([1, 1], [2.0], [1, 1]),  # TF Serving's batch_input request
    ([3], [1.0, 2.0, 5.0], [3]),
])
def test_predict_does_not_enforce_signature_shapes(stub, model, shape, values, expected_shape):
    """TF Serving feeds any shape the graph computes with; so must xdctr serve."""
    response = stub.Predict(predict_request(model, values, shape=shape), timeout=TIMEOUT)
    y = tf.make_ndarray(response.outputs["y"])
    assert list(y.shape) == expected_shape
    np.testing.assert_allclose(y.reshape(-1), 0.5 * np.asarray(values) + 2.0, rtol=1e-6)


def test_predict_tensor_content_inputs_are_accepted(stub):
    request = predict_request(HALF_PLUS_TWO_TF2, [])
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([[1.0], [4.0]], np.float32)))  # tensor_content
    response = stub.Predict(request, timeout=TIMEOUT)
    np.testing.assert_allclose(list(response.outputs["y"].float_val), [2.5, 4.0], rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Classify, Regress, MultiInference.


@pytest.mark.parametrize("model", HALF_PLUS_TWO_MODELS)
def test_classify(stub, model):
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name, request.model_spec.signature_name = model, "classify_x_to_y"
    add_example(request.input, 2.0)
    response = stub.Classify(request, timeout=TIMEOUT)
    (classifications,) = response.result.classifications
    (entry,) = classifications.classes
    assert (entry.label, entry.score) == ("", pytest.approx(3.0))
    assert_model_spec(response.model_spec, model, "classify_x_to_y")


@pytest.mark.parametrize("model", HALF_PLUS_TWO_MODELS)
@pytest.mark.parametrize("signature, expected", [("regress_x_to_y", 3.0), ("regress_x_to_y2", 4.0)])
def test_regress(stub, model, signature, expected):
    request = regression_pb2.RegressionRequest()
    request.model_spec.name, request.model_spec.signature_name = model, signature
    add_example(request.input, 2.0)
    response = stub.Regress(request, timeout=TIMEOUT)
    assert [r.value for r in response.result.regressions] == [pytest.approx(expected)]
    assert_model_spec(response.model_spec, model, signature)


def multi_inference_request(tasks, model=HALF_PLUS_TWO, x=2.0) -> inference_pb2.MultiInferenceRequest:
    """tasks: (signature, method[, model name]) each."""
    request = inference_pb2.MultiInferenceRequest()
    for task in tasks:
        signature, method, name = (*task, model)[:3]
        added = request.tasks.add(method_name=method)
        added.model_spec.name, added.model_spec.signature_name = name, signature
    if x is not None:
        add_example(request.input, x)
    return request


@pytest.mark.parametrize("model", HALF_PLUS_TWO_MODELS)
def test_multi_inference_regress_and_classify(stub, model):
    request = multi_inference_request([("regress_x_to_y", REGRESS_METHOD), ("classify_x_to_y", CLASSIFY_METHOD),
                                       ("regress_x_to_y2", REGRESS_METHOD)], model=model)
    response = stub.MultiInference(request, timeout=TIMEOUT)
    assert len(response.results) == 3
    assert response.results[0].regression_result.regressions[0].value == pytest.approx(3.0)
    assert response.results[1].classification_result.classifications[0].classes[0].score == pytest.approx(3.0)
    assert response.results[2].regression_result.regressions[0].value == pytest.approx(4.0)
    for result, task in zip(response.results, request.tasks):
        assert_model_spec(result.model_spec, model, task.model_spec.signature_name)


@pytest.mark.parametrize("tasks, x, code, detail", [
    ([("regress_x_to_y", REGRESS_METHOD)], None, grpc.StatusCode.INVALID_ARGUMENT, "Input is empty"),
    ([("ThisSignatureDoesNotExist", REGRESS_METHOD)], 2.0, grpc.StatusCode.INVALID_ARGUMENT, "signature not found"),
    ([("regress_x_to_y", REGRESS_METHOD), ("regress_x_to_y", REGRESS_METHOD, "ModelDoesNotExist")], 2.0,
     grpc.StatusCode.INVALID_ARGUMENT, "must access the same model name"),
    ([("regress_x_to_y", REGRESS_METHOD), ("regress_x_to_y", REGRESS_METHOD)], 2.0,
     grpc.StatusCode.INVALID_ARGUMENT, "Duplicate evaluation of signature: regress_x_to_y"),
    ([("serving_default", PREDICT_METHOD)], 2.0, grpc.StatusCode.UNIMPLEMENTED, "Unsupported signature"),
    ([], 2.0, grpc.StatusCode.INVALID_ARGUMENT, "at least one task"),
])
def test_multi_inference_errors_of_tf_serving(stub, tasks, x, code, detail):
    with pytest.raises(grpc.RpcError) as info:
        stub.MultiInference(multi_inference_request(tasks, x=x), timeout=TIMEOUT)
    assert info.value.code() == code
    assert detail in info.value.details()


def test_failed_op_error_is_the_cause_without_the_server_stack(stub):
    request = regression_pb2.RegressionRequest()
    request.model_spec.name, request.model_spec.signature_name = HALF_PLUS_TWO_TF2, "regress_x_to_y"
    request.input.example_list.examples.add()  # no "x", which has no default
    with pytest.raises(grpc.RpcError) as info:
        stub.Regress(request, timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details()
    assert "Feature: x (data type: float) is required but could not be found." in details
    assert "File " not in details and "most recent call last" not in details and len(details) < 300


# ----------------------------------------------------------------------------------------------
# Stateful and graph-format edge cases.


def test_counter_with_reference_variables(stub):
    def call(signature, **inputs):
        request = predict_pb2.PredictRequest()
        request.model_spec.name, request.model_spec.signature_name = COUNTER, signature
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value, dtype=tf.float32))
        return stub.Predict(request, timeout=TIMEOUT).outputs["output"].float_val[0]

    assert call("reset_counter") == pytest.approx(0.0)
    assert [call("incr_counter") for _ in range(3)] == [1.0, 2.0, 3.0]
    assert call("incr_counter_by", delta=2.5) == pytest.approx(5.5)
    assert call("get_counter") == pytest.approx(5.5)
    assert call("reset_counter") == pytest.approx(0.0)


# ----------------------------------------------------------------------------------------------
# Model status and metadata.


@pytest.mark.parametrize("model", list(MODELS))
def test_get_model_status(channel, model):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model
    response = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, timeout=TIMEOUT)
    (status,) = response.model_version_status
    assert (status.version, status.state, status.status.error_code) == (
        VERSION, get_model_status_pb2.ModelVersionStatus.AVAILABLE, 0)


@pytest.mark.parametrize("model", HALF_PLUS_TWO_MODELS)
def test_get_model_metadata(stub, model):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = model
    response = stub.GetModelMetadata(request, timeout=TIMEOUT)
    assert (response.model_spec.name, response.model_spec.version.value) == (model, VERSION)
    signature_defs = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signature_defs)
    assert set(signature_defs.signature_def) == {"serving_default", "classify_x_to_y", "regress_x_to_y",
                                                 "regress_x_to_y2", "regress_x2_to_y3"}
    if model == HALF_PLUS_TWO:  # TF2 exports mark every signature "predict"
        assert signature_defs.signature_def["regress_x_to_y"].method_name == REGRESS_METHOD


# ----------------------------------------------------------------------------------------------
# Batching and warmup.


def test_batching_covers_tf1_graphs_and_refuses_tasks_over_max_batch_size(tmp_path):
    running = server.start(ServerOptions(
        model_name=HALF_PLUS_TWO, model_base_path=str(FIXTURES / MODELS[HALF_PLUS_TWO]),
        file_system_poll_wait_seconds=0.0, enable_batching=True,
        batching=BatchingOptions(max_batch_size=128, num_batch_threads=1)))
    try:
        (loaded,) = running.model_server.manager.loaded_versions(HALF_PLUS_TWO).values()
        assert loaded.signatures["serving_default"].batchable
        with grpc.insecure_channel(running.target) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            xs = np.arange(128, dtype=np.float32)
            response = stub.Predict(predict_request(HALF_PLUS_TWO, xs, shape=[128, 1]), timeout=TIMEOUT)
            np.testing.assert_allclose(tf.make_ndarray(response.outputs["y"]).reshape(-1), 0.5 * xs + 2, rtol=1e-6)
            with pytest.raises(grpc.RpcError) as info:
                stub.Predict(predict_request(HALF_PLUS_TWO, np.arange(129.0), shape=[129, 1]), timeout=TIMEOUT)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "Task size 129 is larger than maximum input batch size 128" in info.value.details()
    finally:
        running.stop(0)


def write_warmup(version_dir: pathlib.Path, logs) -> None:
    (version_dir / warmup.WARMUP_ASSETS_DIR).mkdir(exist_ok=True)
    with tf.io.TFRecordWriter(warmup.warmup_file(str(version_dir))) as writer:
        for log in logs:
            writer.write(log.SerializeToString())


def test_warmup_with_tf_serving_requests_loads_the_version(tmp_path):
    base = tmp_path / HALF_PLUS_TWO_TF2
    shutil.copytree(FIXTURES / MODELS[HALF_PLUS_TWO_TF2], base)
    scalar = predict_request(HALF_PLUS_TWO_TF2, [2.0], shape=[])
    multi = multi_inference_request([("regress_x_to_y", REGRESS_METHOD), ("classify_x_to_y", CLASSIFY_METHOD)],
                                    model=HALF_PLUS_TWO_TF2)
    write_warmup(base / "00000123", [
        prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=scalar)),
        prediction_log_pb2.PredictionLog(multi_inference_log=prediction_log_pb2.MultiInferenceLog(request=multi)),
    ])
    running = server.start(ServerOptions(model_name=HALF_PLUS_TWO_TF2, model_base_path=str(base),
                                         file_system_poll_wait_seconds=0.0))
    try:
        assert list(running.model_server.manager.loaded_versions(HALF_PLUS_TWO_TF2)) == [VERSION]
    finally:
        running.stop(0)


# ----------------------------------------------------------------------------------------------
# The REST API: TF Serving's tests and docs, and its error answers.


def call_rest(running, path: str, body=None) -> tuple[int, dict]:
    """(HTTP status, parsed JSON body) of GET (body None) or POST `path`; like TF Serving's CallREST."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(running.rest_url + path, data=data)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            assert response.headers["Content-Type"] == "application/json"
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read())


@pytest.mark.parametrize("model", HALF_PLUS_TWO_MODELS)
@pytest.mark.parametrize("key, answer_key", [("instances", "predictions"), ("inputs", "outputs")])
def test_rest_predict_row_and_columnar(running, model, key, answer_key):
    status, answer = call_rest(running, f"/v1/models/{model}:predict", {key: [2.0, 3.0, 4.0]})
    assert (status, answer) == (200, {answer_key: [3.0, 3.5, 4.0]})


def test_rest_predict_half_plus_three_as_the_rest_docs(running):
    status, answer = call_rest(running, f"/v1/models/{HALF_PLUS_THREE}:predict", {"instances": [1.0, 2.0, 5.0]})
    assert (status, answer) == (200, {"predictions": [3.5, 4.0, 5.5]})


@pytest.mark.parametrize("path", [f"/v1/models/{HALF_PLUS_TWO}/versions/123:predict",
                                  f"/v1/models/{HALF_PLUS_TWO}:PREDICT", f"/V1/Models/{HALF_PLUS_TWO}:predict"])
def test_rest_predict_by_version_and_case_insensitive_paths(running, path):
    status, answer = call_rest(running, path, {"signature_name": "serving_default", "instances": [[1.0], [5.0]]})
    assert (status, answer) == (200, {"predictions": [[2.5], [4.5]]})


@pytest.mark.parametrize("model", HALF_PLUS_TWO_MODELS)
def test_rest_classify_and_regress(running, model):
    request = {"signature_name": "classify_x_to_y", "examples": [{"x": 2.0}]}
    assert call_rest(running, f"/v1/models/{model}:classify", request) == (200, {"results": [[["", 3.0]]]})
    request = {"signature_name": "regress_x_to_y", "examples": [{"x": 2.0}, {"x": 1.0}]}
    assert call_rest(running, f"/v1/models/{model}:regress", request) == (200, {"results": [3.0, 2.5]})
    request = {"signature_name": "regress_x_to_y2", "context": {"x": 4.0}, "examples": [{}, {"x2": 1.0}]}
    assert call_rest(running, f"/v1/models/{model}:regress", request) == (200, {"results": [5.0, 5.0]})


def test_rest_model_status(running):
    assert call_rest(running, f"/v1/models/{HALF_PLUS_TWO}") == (200, {
        "model_version_status": [{"version": "123", "state": "AVAILABLE",
                                  "status": {"error_code": "OK", "error_message": ""}}]})
    status, answer = call_rest(running, f"/v1/models/{HALF_PLUS_TWO}/versions/123")
    assert (status, [v["version"] for v in answer["model_version_status"]]) == (200, ["123"])


def test_rest_model_metadata_as_tf_serving_writes_it(running):
    status, answer = call_rest(running, f"/v1/models/{HALF_PLUS_TWO}/metadata")
    assert status == 200
    assert answer["model_spec"] == {"name": HALF_PLUS_TWO, "signature_name": "", "version": "123"}
    signature_defs = answer["metadata"]["signature_def"]["signature_def"]
    assert set(signature_defs) == {"serving_default", "classify_x_to_y", "regress_x_to_y", "regress_x_to_y2",
                                   "regress_x2_to_y3"}
    dim = [{"size": "-1", "name": ""}, {"size": "1", "name": ""}]
    regress = signature_defs["regress_x2_to_y3"]
    assert regress["method_name"] == "tensorflow/serving/regress"
    assert regress["inputs"] == {"inputs": {"dtype": "DT_FLOAT", "tensor_shape": {"dim": dim, "unknown_rank": False},
                                            "name": "x2:0"}}
    assert signature_defs["classify_x_to_y"]["inputs"]["inputs"] == {
        "dtype": "DT_STRING", "tensor_shape": {"dim": [], "unknown_rank": True}, "name": "tf_example:0"}


@pytest.mark.parametrize("path, body, status, error", [
    ("/v1/models/half:predict", {"instances": [1.0, 5.0]}, 404, "Servable not found for request: Latest(half)"),
    (f"/v1/models/{HALF_PLUS_TWO}/versions/7:predict", {"instances": [1.0]}, 404,
     f"Servable not found for request: Specific({HALF_PLUS_TWO}, 7)"),
    (f"/v1/models/{HALF_PLUS_TWO}/labels/nope:predict", {"instances": [1.0]}, 400,
     "Unrecognized servable version label: nope"),
    (f"/v1/models/{HALF_PLUS_TWO}:predict", b"{not json", 400, "JSON Parse error"),
    (f"/v1/models/{HALF_PLUS_TWO}:predict", b"", 400, "JSON Parse error: The document is empty"),
    (f"/v1/models/{HALF_PLUS_TWO}:predict", {"instances": [1.0], "inputs": [1.0]}, 400,
     "expecting only one of 'inputs' or 'instances' keys"),
    (f"/v1/models/{HALF_PLUS_TWO}:predict", {"signature_name": "nope", "instances": [1.0]}, 400,
     'Serving signature name: "nope" not found in signature def'),
    (f"/v1/models/{HALF_PLUS_TWO}:predict", {"instances": ["a"]}, 400,
     'JSON Value: "a" Type: String is not of expected type: float'),
    (f"/v1/models/{HALF_PLUS_TWO}:predict", {"instances": [[1.0], [1.0, 2.0]]}, 400, "Expecting tensor size: 1"),
    (f"/v1/models/{HALF_PLUS_TWO}:predict", {"instances": [2**25]}, 400, "without loss of precision"),
    (f"/v1/models/{HALF_PLUS_TWO}:predict", {"instances": []}, 400, "No values in 'instances' array"),
    (f"/v1/models/{HALF_PLUS_TWO}:predict", {"x": [1.0]}, 400, "Missing 'inputs' or 'instances' key"),
    (f"/v1/models/{HALF_PLUS_TWO}:regress", {"signature_name": "regress_x_to_y"}, 400,
     "key 'examples' is expected and was not found"),
    (f"/v1/models/{HALF_PLUS_TWO}:classify", {"signature_name": "classify_x_to_y", "examples": [{"x": [1.0, "a"]}]},
     400, "Unexpected element type in feature: x expecting type: float"),
    (f"/v1/models/{COUNTER}:predict", {"signature_name": "incr_counter", "inputs": {}}, 400,
     "Failed to get input map for signature: incr_counter"),
    ("/v1/modelz/x:predict", {"instances": [1.0]}, 400, "Malformed request: POST /v1/modelz/x:predict"),
])
def test_rest_errors_are_tf_serving_json(running, path, body, status, error):
    answer_status, answer = call_rest(running, path, body)
    assert answer_status == status
    assert list(answer) == ["error"] and error in answer["error"]


def test_rest_serves_the_metrics_of_the_monitoring_config(running):
    call_rest(running, f"/v1/models/{HALF_PLUS_TWO}:predict", {"instances": [1.0]})
    with urllib.request.urlopen(running.rest_url + METRICS_PATH, timeout=TIMEOUT) as response:
        text = response.read().decode()
    assert "# TYPE" in text
    assert f'xdctr_serving_requests_total{{api="predict",model="{HALF_PLUS_TWO}"' in text


# ----------------------------------------------------------------------------------------------
# The REST JSON formats on their own (the REST API docs' examples).


def tensor_infos(**dtypes) -> dict:
    return {name: meta_graph_pb2.TensorInfo(name=f"{name}:0", dtype=dtype) for name, dtype in dtypes.items()}


DOC_INPUTS = tensor_infos(tag=types_pb2.DT_STRING, signal=types_pb2.DT_INT32, sensor=types_pb2.DT_FLOAT)
DOC_ROWS = [{"tag": "foo", "signal": [1, 2, 3, 4, 5], "sensor": [[1, 2], [3, 4]]},
            {"tag": "bar", "signal": [3, 4, 1, 2, 5], "sensor": [[4, 5], [6, 8]]}]
DOC_COLUMNS = {"tag": ["foo", "bar"], "signal": [[1, 2, 3, 4, 5], [3, 4, 1, 2, 5]],
               "sensor": [[[1, 2], [3, 4]], [[4, 5], [6, 8]]]}


@pytest.mark.parametrize("document, kind", [({"instances": DOC_ROWS}, rest_json.ROW),
                                            ({"inputs": DOC_COLUMNS}, rest_json.COLUMNAR)])
def test_rest_json_row_and_columnar_inputs_give_the_same_tensors(document, kind):
    request = predict_pb2.PredictRequest()
    assert rest_json.fill_predict_request(document, request, DOC_INPUTS) == kind
    arrays = {name: tf.make_ndarray(proto) for name, proto in request.inputs.items()}
    assert arrays["tag"].tolist() == [b"foo", b"bar"]
    np.testing.assert_array_equal(arrays["signal"], [[1, 2, 3, 4, 5], [3, 4, 1, 2, 5]])
    assert arrays["signal"].dtype == np.int32
    np.testing.assert_allclose(arrays["sensor"], [[[1, 2], [3, 4]], [[4, 5], [6, 8]]])


@pytest.mark.parametrize("rows, error", [
    ([1.0, 2.0], "instances is a plain list, but expecting list of objects"),
    ([DOC_ROWS[0], {"tag": "x"}], "keys must be equal to: sensor,signal,tag"),
    ([DOC_ROWS[0], {**DOC_ROWS[1], "signal": [1, 2]}], "Expecting tensor size: 5 but got: 2"),
    ([{**DOC_ROWS[0], "signal": [1, 2.5, 3, 4, 5]}], "is not of expected type: int32"),
])
def test_rest_json_bad_rows(rows, error):
    with pytest.raises(ServingError) as info:
        rest_json.fill_predict_request({"instances": rows}, predict_pb2.PredictRequest(), DOC_INPUTS)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and error in info.value.message


def test_rest_json_base64_bytes_in_and_out():
    request = predict_pb2.PredictRequest()
    rest_json.fill_predict_request({"instances": [{"b64": "aW1hZ2UgYnl0ZXM="}]}, request,
                                   tensor_infos(image_bytes=types_pb2.DT_STRING))
    assert tf.make_ndarray(request.inputs["image_bytes"]).tolist() == [b"image bytes"]
    response = predict_pb2.PredictResponse()
    response.outputs["label_bytes"].CopyFrom(tf.make_tensor_proto([b"\xff\x00", b"ok"]))
    response.outputs["scores"].CopyFrom(tf.make_tensor_proto(np.array([[0.1, np.nan], [np.inf, 2.0]], np.float32)))
    row = rest_json.predict_response_json(response, rest_json.ROW)
    assert "0.1," in row  # float32 0.1 written as TF Serving writes it, not 0.10000000149011612
    assert json.loads(row) == {"predictions": [
        {"label_bytes": {"b64": "/wA="}, "scores": [pytest.approx(0.1), pytest.approx(float("nan"), nan_ok=True)]},
        {"label_bytes": {"b64": "b2s="}, "scores": [float("inf"), 2.0]}]}
    columnar = json.loads(rest_json.predict_response_json(response, rest_json.COLUMNAR))
    assert columnar["outputs"]["label_bytes"] == [{"b64": "/wA="}, {"b64": "b2s="}]
    assert columnar["outputs"]["scores"][1] == [float("inf"), 2.0]
