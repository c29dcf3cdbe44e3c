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

import pathlib
import shutil

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import types_pb2
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

from serving import server, warmup
from serving.batching import BatchingOptions
from serving.config import ServerOptions
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


def models_config(names) -> str:
    entries = "".join(
        f'config {{ name: "{name}" base_path: "{FIXTURES / MODELS[name]}" model_platform: "tensorflow" }} '
        for name in names
    )
    return f"model_config_list {{ {entries}}}\n"


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    config_file = tmp_path_factory.mktemp("compat") / "models.config"
    config_file.write_text(models_config(MODELS))
    running = server.start(ServerOptions(model_config_file=str(config_file), file_system_poll_wait_seconds=0.0,
                                         max_workers=4))
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

    assert call("reset_counter") == 0.0
    assert [call("incr_counter") for _ in range(3)] == [1.0, 2.0, 3.0]
    assert call("incr_counter_by", delta=2.5) == 5.5
    assert call("get_counter") == 5.5
    assert call("reset_counter") == 0.0


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
