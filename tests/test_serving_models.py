"""`xdctr serve` model management: version polling, policies, bad versions, config reloads, warmup."""

from __future__ import annotations

import logging
import shutil
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (
    model_management_pb2,
    model_service_pb2_grpc,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
)

from components.trainer.export import write_warmup_requests
from serving import config as serving_config
from serving import loader, server, versions, warmup
from serving.config import ServerOptions
from serving.status import ServingError
from test_serving import (
    END,
    MODEL_NAME,
    XS,
    metric_value,
    model_config_text,
    predict_request,
    save_toy_model,
    scores_of,
    serialize,
    sigmoid,
    status_request,
)
from xdctr import features as F

OTHER_MODEL = "other_model"
LOAD_SECONDS = 3.0  # upper bound of the load loop
WAIT_SECONDS = 20.0


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    """Saved toy models to copy from: "<scale>" scores sigmoid(scale * x); "counting" counts calls."""
    root = tmp_path_factory.mktemp("templates")
    for scale in (1, 2, 3):
        save_toy_model(root / str(scale), float(scale))
    save_toy_model(root / "counting", 1.0, count_calls=True)
    return root


def push(templates, base, version: int, template) -> None:
    """Copies a toy model to <base>/<version>, file by file (not atomic), as the Pusher does."""
    shutil.copytree(templates / str(template), base / str(version))


def new_base(tmp_path, name="models"):
    base = tmp_path / name
    base.mkdir()
    return base


def wait_for(condition, what: str, timeout: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def write_config(path, text: str) -> str:
    path.write_text(text)
    return str(path)


# ----------------------------------------------------------------------------------------------
# Version polling.


def test_new_version_pushed_under_load_takes_traffic_without_failed_requests(templates, tmp_path):
    base = new_base(tmp_path)
    push(templates, base, 1, 1)
    running = server.start(ServerOptions(model_name=MODEL_NAME, model_base_path=str(base), max_workers=4,
                                         file_system_poll_wait_seconds=0.1))
    errors: list[str] = []
    seen: list[list[int]] = [[], []]
    pushed = threading.Event()

    def load(i: int) -> None:
        with grpc.insecure_channel(running.target) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            deadline = time.monotonic() + LOAD_SECONDS + WAIT_SECONDS
            while time.monotonic() < deadline:
                try:
                    response = stub.Predict(predict_request(), timeout=5)
                except grpc.RpcError as e:
                    errors.append(f"{e.code().name}: {e.details()}")
                    continue
                version = response.model_spec.version.value
                seen[i].append(version)
                if not np.allclose(scores_of(response), sigmoid(version * XS), rtol=1e-6):
                    errors.append(f"version {version} answered with another version's scores")
                if pushed.is_set() and seen[i][-10:] == [2] * 10:
                    return  # traffic has moved

    threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: all(len(versions) >= 3 for versions in seen), "both clients to be answered")
        push(templates, base, 2, 2)
        pushed.set()
        for thread in threads:
            thread.join(LOAD_SECONDS + WAIT_SECONDS)
    finally:
        running.stop(0)
    assert errors == []
    for versions in seen:
        assert versions[0] == 1 and versions[-1] == 2
        assert versions == sorted(versions)  # moved once, never back


def test_corrupt_version_is_ignored_and_half_written_version_is_picked_up_when_complete(templates, tmp_path):
    base = new_base(tmp_path)
    push(templates, base, 1, 1)
    running = server.start(ServerOptions(model_name=MODEL_NAME, model_base_path=str(base),
                                         file_system_poll_wait_seconds=0.0))
    model_server = running.model_server
    try:
        (base / "3").mkdir()
        (base / "3" / loader.SAVED_MODEL_FILE).write_bytes(b"not a saved model")
        (base / "2").mkdir()
        shutil.copytree(templates / "2" / "variables", base / "2" / "variables")  # still being written
        running.poll()
        states = model_server.manager.version_states(MODEL_NAME)
        assert (states[3].state, states[2].state) == (END, END)
        assert states[3].code != grpc.StatusCode.OK and states[3].message
        assert states[2].code == grpc.StatusCode.NOT_FOUND
        assert model_server.inference.predict(predict_request()).model_spec.version.value == 1

        failures = lambda: metric_value(  # noqa: E731
            model_server.metrics.exposition().decode(), "xdctr_serving_model_load_events_total",
            model=MODEL_NAME, event="load_failure")
        assert failures() == 2
        running.poll()
        assert failures() == 2  # unchanged directories are not retried

        for item in (templates / "2").iterdir():  # the copy completes
            if item.name != "variables":
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, base / "2" / item.name)
        running.poll()
        assert sorted(model_server.manager.loaded_versions(MODEL_NAME)) == [2]
        response = model_server.inference.predict(predict_request())
        assert response.model_spec.version.value == 2
        np.testing.assert_allclose(scores_of(response), sigmoid(2.0 * XS), rtol=1e-6)
        statuses = {s.version: s for s in model_server.admin.get_model_status(status_request()).model_version_status}
        assert [statuses[v].state for v in (3, 2, 1)] == [END, versions.State.AVAILABLE, END]
        assert statuses[3].status.error_code != grpc.StatusCode.OK.value[0]
        assert statuses[1].status.error_code == grpc.StatusCode.OK.value[0]  # unloaded, not failed
    finally:
        running.stop(0)


@pytest.mark.parametrize("name, version", [("7", 7), ("00000123", 123), (str(2**63 - 1), 2**63 - 1),
                                           (str(2**63), None), ("99999999999999999999", None), ("-1", None),
                                           ("\u0663", None), ("1a", None), ("", None)])
def test_version_directory_names_are_int64(name, version):
    assert versions.parse_version(name) == version


def test_version_directory_beyond_int64_is_ignored(templates, tmp_path):
    """TF Serving ignores names that do not parse as int64; they must not unload the good version."""
    base = new_base(tmp_path)
    push(templates, base, 1, 1)
    push(templates, base, "99999999999999999999", 2)
    running = server.start(ServerOptions(model_name=MODEL_NAME, model_base_path=str(base),
                                         file_system_poll_wait_seconds=0.0))
    try:
        running.poll()
        assert list(running.model_server.manager.version_states(MODEL_NAME)) == [1]
        response = running.model_server.inference.predict(predict_request())
        assert response.model_spec.version.value == 1
        np.testing.assert_allclose(scores_of(response), sigmoid(XS), rtol=1e-6)
    finally:
        running.stop(0)


def test_vanished_base_path_keeps_the_loaded_versions(templates, tmp_path):
    base = new_base(tmp_path)
    push(templates, base, 1, 1)
    running = server.start(ServerOptions(model_name=MODEL_NAME, model_base_path=str(base),
                                         file_system_poll_wait_seconds=0.0))
    try:
        base.rename(tmp_path / "moved")
        running.poll()
        assert running.model_server.inference.predict(predict_request()).model_spec.version.value == 1
    finally:
        running.stop(0)


@pytest.mark.parametrize(
    "policy, before, after",
    [
        ("latest { num_versions: 2 }", [1, 2], [2, 3]),
        ("all {}", [1, 2], [1, 2, 3]),
        ("specific { versions: 1 }", [1], [1]),
    ],
)
def test_version_policy_decides_what_is_loaded_and_unloaded(templates, tmp_path, policy, before, after):
    base = new_base(tmp_path)
    for version in (1, 2):
        push(templates, base, version, version)
    config = write_config(tmp_path / "models.config", model_config_text(MODEL_NAME, base, policy=policy))
    running = server.start(ServerOptions(model_config_file=config, file_system_poll_wait_seconds=0.0))
    model_server = running.model_server
    try:
        assert sorted(model_server.manager.loaded_versions(MODEL_NAME)) == before
        push(templates, base, 3, 3)
        running.poll()
        assert sorted(model_server.manager.loaded_versions(MODEL_NAME)) == after
        for version in sorted(set(before) - set(after)):
            assert model_server.manager.version_states(MODEL_NAME)[version] == versions.VersionState(END)
            with pytest.raises(ServingError) as info:
                model_server.inference.predict(predict_request(version=version))
            assert info.value.code == grpc.StatusCode.NOT_FOUND
        assert model_server.inference.predict(predict_request()).model_spec.version.value == max(after)
    finally:
        running.stop(0)


# ----------------------------------------------------------------------------------------------
# Config reloads.


def two_models_config(base_a, base_b, labels_b=None, policy_b="all {}") -> str:
    a = model_config_text(MODEL_NAME, base_a).strip()[len("model_config_list { "):-2]
    b = model_config_text(OTHER_MODEL, base_b, policy=policy_b, labels=labels_b).strip()[len("model_config_list { "):-2]
    return f"model_config_list {{ {a} {b} }}"


def reload(model_stub, text: str):
    config = serving_config.parse_model_server_config(text)
    return model_stub.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=config), timeout=30)


def test_reload_config_rpc_adds_and_removes_models_and_checks_labels(templates, tmp_path):
    base_a, base_b = new_base(tmp_path, "a"), new_base(tmp_path, "b")
    push(templates, base_a, 1, 1)
    push(templates, base_b, 1, 1)
    push(templates, base_b, 2, 2)
    config = write_config(tmp_path / "models.config", model_config_text(MODEL_NAME, base_a))
    running = server.start(ServerOptions(model_config_file=config, file_system_poll_wait_seconds=0.0))
    model_server = running.model_server
    try:
        with grpc.insecure_channel(running.target) as channel:
            model_stub = model_service_pb2_grpc.ModelServiceStub(channel)
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            health_stub = health_pb2_grpc.HealthStub(channel)

            labels = {"stable": 1, "canary": 2}
            assert reload(model_stub, two_models_config(base_a, base_b, labels)).status.error_code == 0
            for label, version in labels.items():
                response = stub.Predict(predict_request(model=OTHER_MODEL, label=label), timeout=10)
                assert response.model_spec.version.value == version
                np.testing.assert_allclose(scores_of(response), sigmoid(version * XS), rtol=1e-6)
            assert stub.Predict(predict_request(), timeout=10).model_spec.version.value == 1

            refused = {
                "a label on a version that is not loaded": (
                    two_models_config(base_a, base_b, {"stable": 1, "next": 3}),
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"Request to assign label to version 3 of model {OTHER_MODEL}, which is not currently available",
                ),
                "a label on a version the new policy drops": (
                    two_models_config(base_a, base_b, {"stable": 1}, policy_b="latest {}"),
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "label to version 1",
                ),
                "a new model whose base path is missing": (
                    two_models_config(base_a, tmp_path / "missing"),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Could not find base path {tmp_path / 'missing'} for servable {OTHER_MODEL}",
                ),
                "a new model without version directories": (
                    two_models_config(base_a, new_base(tmp_path, "empty")),
                    grpc.StatusCode.NOT_FOUND,
                    f"Unable to find a numerical version path for servable {OTHER_MODEL}",
                ),
                "a relative base path": (
                    model_config_text(MODEL_NAME, "relative/path"),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "absolute path",
                ),
                "a model listed twice": (
                    two_models_config(base_a, base_b).replace(OTHER_MODEL, MODEL_NAME),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "multiple times",
                ),
            }
            for what, (text, code, detail) in refused.items():
                with pytest.raises(grpc.RpcError) as info:
                    reload(model_stub, text)
                assert (info.value.code(), what) == (code, what)
                assert detail in info.value.details(), what
            # An empty request changes nothing, as in TF Serving.
            empty = model_management_pb2.ReloadConfigRequest()
            assert model_stub.HandleReloadConfigRequest(empty, timeout=30).status.error_code == 0
            # Nothing of the refused configs was applied.
            assert model_server.manager.labels(OTHER_MODEL) == labels
            assert sorted(model_server.manager.loaded_versions(OTHER_MODEL)) == [1, 2]

            reload(model_stub, model_config_text(MODEL_NAME, base_a))  # drops the other model
            with pytest.raises(grpc.RpcError) as info:
                stub.Predict(predict_request(model=OTHER_MODEL, version=1), timeout=10)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as info:
                model_stub.GetModelStatus(status_request(model=OTHER_MODEL), timeout=10)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            health = health_stub.Check(health_pb2.HealthCheckRequest(service=OTHER_MODEL), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    finally:
        running.stop(0)


def test_config_file_is_polled_and_bad_edits_are_refused(templates, tmp_path, caplog):
    base = new_base(tmp_path)
    push(templates, base, 1, 1)
    config_path = tmp_path / "models.config"
    config = write_config(config_path, model_config_text(MODEL_NAME, base))
    running = server.start(ServerOptions(model_config_file=config, file_system_poll_wait_seconds=0.0,
                                         model_config_file_poll_wait_seconds=0.05))
    model_server = running.model_server
    try:
        config_path.write_text(model_config_text(MODEL_NAME, base, labels={"stable": 1}))
        wait_for(lambda: model_server.manager.labels(MODEL_NAME) == {"stable": 1}, "the config file's label")

        def events():
            return [getattr(r, "xdctr_event", None) for r in caplog.records]

        with caplog.at_level(logging.WARNING, logger=server.__name__):
            config_path.write_text("model_config_list { config { nme: 'typo' } }")
            wait_for(lambda: "config_file_unreadable" in events(), "the bad config to be reported")
        assert model_server.manager.labels(MODEL_NAME) == {"stable": 1}
        assert model_server.inference.predict(predict_request(label="stable")).model_spec.version.value == 1
        with pytest.raises(ValueError, match=rf"{config_path}:1:\d+: .*nme"):
            running.reload_config()
    finally:
        running.stop(0)


@pytest.mark.parametrize(
    "text, detail",
    [
        ("model_config_list { config { nme: 'x' } }", r"models\.config:1:\d+: .*no field named \"nme\""),
        ("custom_model_config { }", "Only ModelConfigList"),
        ("model_config_list { config { name: 'm' base_path: '/abs' model_platform: 'tensorflow' } "
         "config { name: 'm' base_path: '/b' model_platform: 'tensorflow' } }", "Illegal to list model m multiple times"),
        ("model_config_list { config { name: 'm' base_path: 'rel' model_platform: 'tensorflow' } }", "absolute"),
        ("model_config_list { config { name: 'm' base_path: '/abs' } }", "model_platform must be 'tensorflow'"),
        ("model_config_list { config { name: 'm' base_path: '/abs' model_platform: 'tensorflow' "
         "model_version_policy { specific { } } } }", "lists no versions"),
    ],
)
def test_bad_model_config_files_name_the_problem(tmp_path, text, detail):
    path = tmp_path / "models.config"
    path.write_text(text)
    with pytest.raises(ValueError, match=detail) as info:
        serving_config.read_model_server_config(str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------
# Warmup.


def bad_warmup_log() -> prediction_log_pb2.PredictionLog:
    request = predict_request(xs=[1.0])
    request.inputs["wrong_input"].CopyFrom(request.inputs[F.SERVING_INPUT])
    del request.inputs[F.SERVING_INPUT]
    return prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))


def test_warmup_requests_are_replayed_before_the_version_takes_traffic(templates, tmp_path):
    base = new_base(tmp_path)
    push(templates, base, 1, "counting")
    path = write_warmup_requests(str(base / "1"), MODEL_NAME, serialize([1.0, 2.0, 3.0]))
    assert path == warmup.warmup_file(str(base / "1"))
    logs = warmup.read_warmup_logs(str(base / "1"))
    assert [log.predict_log.request.model_spec.name for log in logs] == [MODEL_NAME] * 3
    push(templates, base, 2, "counting")  # a newer version whose warmup request is malformed
    (base / "2" / warmup.WARMUP_ASSETS_DIR).mkdir()
    with tf.io.TFRecordWriter(warmup.warmup_file(str(base / "2"))) as writer:
        writer.write(bad_warmup_log().SerializeToString())

    running = server.start(ServerOptions(model_name=MODEL_NAME, model_base_path=str(base),
                                         file_system_poll_wait_seconds=0.0))
    model_server = running.model_server
    try:
        loaded = model_server.manager.loaded_versions(MODEL_NAME)
        assert sorted(loaded) == [1]  # version 2 failed its warmup
        assert loaded[1].saved_model.calls.numpy() == 3  # one call per record, before any request
        model_server.inference.predict(predict_request())
        assert loaded[1].saved_model.calls.numpy() == 4
        state = model_server.manager.version_states(MODEL_NAME)[2]
        assert (state.state, state.code) == (END, grpc.StatusCode.INVALID_ARGUMENT)
        assert "Warmup" in state.message and "wrong_input" in state.message
    finally:
        running.stop(0)


def test_write_warmup_requests_needs_1_to_1000_examples(tmp_path):
    for examples in ([], [b""] * 1001):
        with pytest.raises(ValueError, match="1 to 1000 examples"):
            write_warmup_requests(str(tmp_path), MODEL_NAME, examples)
