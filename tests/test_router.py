"""The A/B router: assignment (pure), and routing through real backends with the standard stubs."""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import socket
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
import tensorflow as tf
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tensorflow_serving.apis import get_model_metadata_pb2, inference_pb2, prediction_service_pb2_grpc

from serving import ab_report, client, monitoring, router, server
from xdctr import features as F

MODEL_NAME = "ctr"
# The toy model's constant score per version, so a response tells which arm served it.
VERSION_SCORES = {1: 0.125, 2: 0.75}
WAIT_SECONDS = 10.0


def save_constant_model(path, score: float) -> None:
    """serving_default: parses USER_ID (and ITEM_ID) from serialized tf.Examples, returns `score` per example."""
    module = tf.Module()

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=F.SERVING_INPUT)])
    def serve(examples):
        parsed = tf.io.parse_example(examples, {
            F.USER_ID: tf.io.FixedLenFeature([], tf.string),
            F.ITEM_ID: tf.io.FixedLenFeature([], tf.string, default_value=""),
        })
        ones = tf.ones_like(tf.strings.length(parsed[F.USER_ID]), dtype=tf.float32)  # (batch,)
        return {F.SERVING_OUTPUT: ones * score}

    module.serve = serve
    tf.saved_model.save(module, str(path), signatures={F.SERVING_SIGNATURE: serve})


def example(user: str, item: str = "i0") -> bytes:
    feature = {
        F.USER_ID: tf.train.Feature(bytes_list=tf.train.BytesList(value=[user.encode()])),
        F.ITEM_ID: tf.train.Feature(bytes_list=tf.train.BytesList(value=[item.encode()])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, what: str, timeout: float = WAIT_SECONDS):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def two_arms(backends, weights=(0.5, 0.5), **extra) -> dict:
    config = {
        "salt": "test-salt",
        "arms": [
            {"name": "a", "backend": backends[0], "model_name": MODEL_NAME, "version": 1, "weight": weights[0]},
            {"name": "b", "backend": backends[1], "model_name": MODEL_NAME, "version": 2, "weight": weights[1]},
        ],
        "deadline_seconds": 3.0,
    }
    config.update(extra)
    return config


def write_config(path, config: dict) -> str:
    """Writes the file at once (a new file renamed over it), so that a polling router never reads
    it half-written, as a config map or `mv` replaces it in production."""
    staged = path.with_name(path.name + ".new")
    staged.write_text(yaml.safe_dump(config))
    os.replace(staged, path)
    return str(path)


# ----------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    for version, score in VERSION_SCORES.items():
        save_constant_model(base / str(version), score)
    return str(base)


@pytest.fixture(scope="module")
def backends(base_path):
    """Two `xdctr serve` backends of the same model (versions 1 and 2)."""
    started = [server.start_server(MODEL_NAME, base_path, port=0, max_workers=2) for _ in range(2)]
    yield [f"127.0.0.1:{port}" for _, port, _ in started]
    for grpc_server, _, _ in started:
        grpc_server.stop(None)


class HangingServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """A backend that never answers in time (until released)."""

    def __init__(self):
        self.release = threading.Event()

    def Predict(self, request, context):
        self.release.wait(WAIT_SECONDS)
        context.abort(grpc.StatusCode.UNAVAILABLE, "released")


@pytest.fixture
def hanging_backend():
    from concurrent import futures

    servicer = HangingServicer()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    yield f"127.0.0.1:{port}"
    servicer.release.set()
    grpc_server.stop(None)


@pytest.fixture
def start(tmp_path):
    """start(config dict, **start_router kwargs) -> RunningRouter; every router is stopped at teardown."""
    running = []

    def _start(config: dict, **kwargs):
        path = kwargs.pop("config_path", None) or write_config(tmp_path / "experiment.yaml", config)
        kwargs.setdefault("poll_seconds", 0.1)
        started = router.start_router(path, **kwargs)
        running.append(started)
        return started

    yield _start
    for started in running:
        started.stop(None)


def predict(running, users, items=None, metadata=(), timeout=5.0, version=None):
    """Predict through the router; returns (scores, response, trailing metadata dict)."""
    items = items or [f"i{k}" for k in range(len(users))]
    request = client.build_predict_request("whatever-the-client-calls-it", [example(u, i) for u, i in zip(users, items)],
                                           version=version)
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response, call = stub.Predict.with_call(request, timeout=timeout, metadata=tuple(metadata))
    return tf.make_ndarray(response.outputs[F.SERVING_OUTPUT]).tolist(), response, dict(call.trailing_metadata())


def arm_score(arm: str) -> float:
    return VERSION_SCORES[{"a": 1, "b": 2}[arm]]


# ----------------------------------------------------------------------------------------------
# Assignment (pure)


def config_of(weights, salt="s1", **extra) -> router.ExperimentConfig:
    arms = [router.Arm(name=f"arm{k}", backend="127.0.0.1:1", model_name=MODEL_NAME, weight=w) for k, w in enumerate(weights)]
    return router.ExperimentConfig(arms=arms, salt=salt, **extra)


@pytest.mark.parametrize("weights", [(0.7, 0.3), (5, 3, 2), (1, 0, 1)])
def test_split_proportions_within_three_sigma_over_10k_users(weights):
    config = config_of(weights)
    n = 10_000
    counts = {arm.name: 0 for arm in config.arms}
    for k in range(n):
        counts[router.assign(f"user-{k}", config)] += 1
    total = sum(weights)
    for arm, weight in zip(config.arms, weights):
        p = weight / total
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(counts[arm.name] - n * p) <= 3 * sigma, (arm.name, counts, n * p, sigma)
    assert sum(counts.values()) == n


def test_bucket_is_a_stable_hash_not_pythons_hash():
    # sha256("s1" + "\x1f" + "user-1"), first 8 bytes over 2**64: the same in every process and release
    # (Python's hash() of a str changes with PYTHONHASHSEED).
    assert router.bucket("s1", "user-1") == pytest.approx(0.3061612675396955, abs=1e-15)
    assert 0.0 <= router.bucket("", "") < 1.0
    config = config_of((0.5, 0.5))
    assert {router.assign("user-1", config) for _ in range(5)} == {router.assign("user-1", config)}


def test_salt_change_reshuffles_users():
    n = 10_000
    before, after = config_of((0.7, 0.3), salt="s1"), config_of((0.7, 0.3), salt="s2")
    moved = sum(router.assign(f"user-{k}", before) != router.assign(f"user-{k}", after) for k in range(n)) / n
    # Independent hashes: a user moves with probability 2 * 0.7 * 0.3 = 0.42.
    sigma = math.sqrt(0.42 * 0.58 / n)
    assert abs(moved - 0.42) <= 3 * sigma


def test_forced_assignments_win_over_the_hash():
    config = config_of((1, 0), forced={"vip": "arm1"})
    assert router.assign("vip", config) == "arm1"  # arm1 has weight 0: only forcing reaches it
    assert {router.assign(f"user-{k}", config) for k in range(200)} == {"arm0"}


@pytest.mark.parametrize("change, message", [
    ({"salt": None}, "missing required field `salt`"),
    ({"arms": []}, "`arms` must list at least one arm"),
    ({"forced": {"u": "nope"}}, "unknown arm 'nope'"),
    ({"fallback_arm": "nope"}, "`fallback_arm` must name an arm"),
    ({"wieght": 1}, "unknown field(s) ['wieght']"),
    ({"deadline_seconds": 0}, "`deadline_seconds` must be a positive number"),
    ({"arm0": {"weight": -1}}, "`arms[0].weight` must be a finite number >= 0. Received: -1.0"),
    ({"arm0": {"version_label": "stable"}}, "`arms[0]` names both `version` and `version_label`"),
    ({"arm0": {"name": "b"}}, "arm names must be distinct"),
    ({"arm0": {"weight": 0}, "arm1": {"weight": 0}}, "at least one arm needs a weight > 0"),
    ({"arm0": {"backend": "not a host port"}}, "`arms[0].backend` must be HOST:PORT"),
    ({"arm1": {"backend": "127.0.0.1"}}, "`arms[1].backend` must be HOST:PORT"),
    ({"arm0": {"backend": "127.0.0.1:70000"}}, "port in 1-65535"),
    ({"arm0": {"backend": "[zz::1]:8500"}}, "Received: '[zz::1]:8500'"),
])
def test_bad_config_is_one_line_naming_file_and_field(tmp_path, change, message):
    config = two_arms(["127.0.0.1:1", "127.0.0.1:2"])
    for key, value in change.items():
        if key.startswith("arm") and key[3:].isdigit():
            config["arms"][int(key[3:])].update(value)
        elif value is None:
            del config[key]
        else:
            config[key] = value
    path = write_config(tmp_path / "bad.yaml", config)
    with pytest.raises(ValueError) as error:
        router.load_config(path)
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("backend", ["127.0.0.1:8500", "localhost:1", "serving.ns.svc.cluster.local:8500",
                                     "[::1]:8500", "dns:///serving:8500", "unix:/tmp/serving.sock"])
def test_dialable_backend_addresses_are_accepted(tmp_path, backend):
    config = two_arms([backend, "127.0.0.1:2"])
    assert router.load_config(write_config(tmp_path / "ok.yaml", config)).arms[0].backend == backend


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("salt: s\narms: [\n  {name: a\n")
    with pytest.raises(ValueError, match=rf"^{path}:\d+: not valid YAML"):
        router.load_config(str(path))


# ----------------------------------------------------------------------------------------------
# Routing through real backends


def test_each_user_gets_the_model_version_of_its_arm(backends, start):
    running = start(two_arms(backends))
    users = [f"user-{k}" for k in range(12)]
    arms = {u: router.assign(u, running.config) for u in users}
    assert set(arms.values()) == {"a", "b"}  # both arms are exercised
    for user in users:
        scores, response, trailing = predict(running, [user, user])
        assert scores == [arm_score(arms[user])] * 2
        assert response.model_spec.name == MODEL_NAME
        assert response.model_spec.version.value == {"a": 1, "b": 2}[arms[user]]
        assert trailing[router.ARM_METADATA_KEY] == arms[user]


def test_client_version_is_replaced_by_the_arms(backends, start):
    running = start(two_arms(backends, weights=(1, 0)))
    scores, response, _ = predict(running, ["u"], version=2)  # the client asks for 2; the arm says 1
    assert scores == [VERSION_SCORES[1]]
    assert response.model_spec.version.value == 1


def test_assignment_is_sticky_across_requests_and_restarts(backends, start, tmp_path):
    config = two_arms(backends)
    users = [f"sticky-{k}" for k in range(8)]
    first = start(config)
    seen = {u: {predict(first, [u])[2][router.ARM_METADATA_KEY] for _ in range(3)} for u in users}
    assert all(len(arms) == 1 for arms in seen.values())
    first.stop(None)
    second = start(config)
    again = {u: predict(second, [u])[2][router.ARM_METADATA_KEY] for u in users}
    assert again == {u: arms.pop() for u, arms in seen.items()}


def test_metadata_user_id_wins_over_the_tensors(backends, start):
    running = start(two_arms(backends, forced={"meta-user": "b", "tensor-user": "a"}, user_metadata_key="X-User-Id"))
    scores, _, trailing = predict(running, ["tensor-user"], metadata=[("x-user-id", "meta-user")])
    assert (scores, trailing[router.ARM_METADATA_KEY]) == ([VERSION_SCORES[2]], "b")
    scores, _, trailing = predict(running, ["tensor-user"])  # no metadata: the tensor's user
    assert (scores, trailing[router.ARM_METADATA_KEY]) == ([VERSION_SCORES[1]], "a")


def test_forced_user_reaches_a_zero_weight_arm(backends, start):
    running = start(two_arms(backends, weights=(1, 0), forced={"tester": "b"}))
    assert predict(running, ["tester"])[0] == [VERSION_SCORES[2]]
    assert predict(running, ["someone-else"])[0] == [VERSION_SCORES[1]]
    registry = running.metrics.registry
    assert registry.get_sample_value("xdctr_router_assignments_total", {"arm": "b", "reason": "forced"}) == 1
    assert registry.get_sample_value("xdctr_router_assignments_total", {"arm": "a", "reason": "hash"}) == 1


def test_requests_without_user_id(backends, start):
    request_examples = [tf.train.Example().SerializeToString()]  # no user_id feature
    anonymous = start(two_arms(backends, anonymous_arm="b"))
    request = client.build_predict_request(MODEL_NAME, request_examples)
    with grpc.insecure_channel(f"127.0.0.1:{anonymous.port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        # The toy model requires user_id, so the backend refuses the example; the arm is still b.
        with pytest.raises(grpc.RpcError) as error:
            stub.Predict(request, timeout=5)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(error.value.trailing_metadata())[router.ARM_METADATA_KEY] == "b"
    registry = anonymous.metrics.registry
    assert registry.get_sample_value("xdctr_router_assignments_total", {"arm": "b", "reason": "anonymous"}) == 1
    assert registry.get_sample_value("xdctr_router_fallbacks_total", {"arm": "b", "fallback_arm": "a"}) is None


def test_dead_backend_falls_back(backends, start, tmp_path):
    log_path = tmp_path / "assignments.jsonl"
    config = two_arms([f"127.0.0.1:{free_port()}", backends[1]], weights=(1, 0), fallback_arm="b")
    running = start(config, assignment_log=str(log_path))
    scores, _, trailing = predict(running, ["u1"])
    assert scores == [VERSION_SCORES[2]]
    assert trailing[router.ARM_METADATA_KEY] == "b"
    registry = running.metrics.registry
    assert registry.get_sample_value("xdctr_router_fallbacks_total", {"arm": "a", "fallback_arm": "b"}) == 1
    assert registry.get_sample_value("xdctr_router_errors_total",
                                     {"arm": "a", "method": "Predict", "code": "UNAVAILABLE"}) == 1
    assert registry.get_sample_value("xdctr_router_requests_total", {"arm": "b", "method": "Predict"}) == 1
    running.stop(None)
    (line,) = [json.loads(text) for text in log_path.read_text().splitlines()]
    assert (line["assigned_arm"], line["arm"], line["model_version"]) == ("a", "b", 2)


def test_dead_backend_without_fallback_is_a_clear_unavailable(start):
    dead = f"127.0.0.1:{free_port()}"
    running = start(two_arms([dead, dead], weights=(1, 0)))
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        predict(running, ["u1"])
    assert time.monotonic() - started < 5.0
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error.value.details().startswith(f"arm 'a' (backend {dead}) failed: UNAVAILABLE")


def test_hanging_backend_is_cut_by_the_deadline(backends, start, hanging_backend):
    running = start(two_arms([hanging_backend, backends[1]], weights=(1, 0), deadline_seconds=0.3))
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        predict(running, ["u1"], timeout=WAIT_SECONDS)
    assert time.monotonic() - started < 3.0
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert f"arm 'a' (backend {hanging_backend})" in error.value.details()
    assert "no answer within 0.3 s" in error.value.details()


def test_client_errors_pass_through_without_fallback(backends, start):
    running = start(two_arms(backends, weights=(1, 0), fallback_arm="b"))
    request = client.build_predict_request(MODEL_NAME, [b"\xffnot a tf.Example"])
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.Predict(request, timeout=5)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not error.value.details().startswith("arm ")  # the backend's message as it is
    assert running.metrics.registry.get_sample_value("xdctr_router_fallbacks_total", {"arm": "a", "fallback_arm": "b"}) is None


def test_get_model_metadata_passes_through(backends, start):
    running = start(two_arms(backends, forced={"meta": "b"}))
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "anything"
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = stub.GetModelMetadata(request, timeout=5, metadata=(("x-user-id", "meta"),))
    assert (response.model_spec.name, response.model_spec.version.value) == (MODEL_NAME, 2)
    signature_defs = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signature_defs)
    assert F.SERVING_INPUT in signature_defs.signature_def[F.SERVING_SIGNATURE].inputs


def test_hot_reload_changes_weights_and_keeps_the_old_config_on_a_bad_file(backends, start, tmp_path, caplog):
    path = tmp_path / "experiment.yaml"
    write_config(path, two_arms(backends, weights=(1, 0)))
    running = start(None, config_path=str(path))
    assert predict(running, ["u1", "u1"])[0] == [VERSION_SCORES[1]] * 2

    write_config(path, two_arms(backends, weights=(0, 1)))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))  # a new mtime even on coarse clocks
    wait_for(lambda: running.config.arms[1].weight == 1, "the new weights to take effect")
    assert predict(running, ["u1"])[0] == [VERSION_SCORES[2]]

    caplog.set_level(logging.WARNING, logger=router.__name__)
    bad_files = {"salt: s\narms: [\n": "not valid YAML",
                 yaml.safe_dump(two_arms([backends[0], "not a host port"], weights=(1, 0))): "must be HOST:PORT"}
    for k, (text, detail) in enumerate(bad_files.items()):
        caplog.clear()
        staged = path.with_name(path.name + ".new")  # replaced at once, as write_config does
        staged.write_text(text)
        os.replace(staged, path)
        os.utime(path, ns=(time.time_ns(), time.time_ns() + (2 + k) * 1_000_000_000))
        refused = lambda: [r for r in caplog.records if getattr(r, "xdctr_event", None) == "config_reload_refused"]
        wait_for(refused, "the bad config to be reported")
        (record,) = refused()[:1]
        entry = json.loads(monitoring.JsonFormatter().format(record))  # one JSON line, as `xdctr serve` logs
        assert (entry["event"], entry["path"]) == ("config_reload_refused", str(path))
        assert detail in entry["error"]
        assert running.config.arms[1].weight == 1
        assert predict(running, ["u1"])[0] == [VERSION_SCORES[2]]


def test_assignment_log_lines_have_every_field(backends, start, tmp_path):
    log_path = tmp_path / "logs" / "assignments.jsonl"
    running = start(two_arms(backends, forced={"u-a": "a", "u-b": "b"}), assignment_log=str(log_path))
    before = time.time()
    predict(running, ["u-a", "u-a"], items=["i1", "i2"], metadata=[("x-request-id", "req-1")])
    predict(running, ["u-b"], items=["i3"])
    running.stop(None)  # flushes the buffered lines
    lines = [json.loads(text) for text in log_path.read_text().splitlines()]
    assert [set(line) for line in lines] == [set(ab_report.ASSIGNMENT_LOG_FIELDS)] * 2
    first, second = lines
    assert first == {
        "request_id": "req-1", "ts": first["ts"], "user": "u-a", "user_source": "tensor", "assignment": "forced",
        "assigned_arm": "a", "arm": "a", "model_name": MODEL_NAME, "model_version": 1, "version_label": None,
        "signature_name": F.SERVING_SIGNATURE, "item_ids": ["i1", "i2"], "scores": [VERSION_SCORES[1]] * 2,
    }
    assert before - 1 <= first["ts"] <= second["ts"] <= time.time()
    assert (second["user"], second["arm"], second["model_version"], second["item_ids"], second["scores"]) == (
        "u-b", "b", 2, ["i3"], [VERSION_SCORES[2]])
    assert len(second["request_id"]) == 32  # generated (uuid4 hex)


def test_prometheus_endpoint_counts_per_arm(backends, start):
    running = start(two_arms(backends, forced={"u-a": "a", "u-b": "b"}), monitoring_port=0)
    for user in ("u-a", "u-a", "u-b"):
        predict(running, [user])
    url = f"http://127.0.0.1:{running.monitoring_port}{router.METRICS_PATH}"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("xdctr_router_requests_total", (("arm", "a"), ("method", "Predict")))] == 2
    assert samples[("xdctr_router_requests_total", (("arm", "b"), ("method", "Predict")))] == 1
    assert samples[("xdctr_router_request_seconds_count", (("arm", "a"), ("method", "Predict")))] == 2
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(f"http://127.0.0.1:{running.monitoring_port}/other", timeout=5)
    assert error.value.code == 404


def test_multi_inference_is_forwarded_with_every_task_rewritten(start, tmp_path):
    """TF Serving's MultiInference test (half_plus_two, x=2.0) through the router."""
    fixture = pathlib.Path(__file__).resolve().parent / "fixtures" / "tf_serving" / "saved_model_half_plus_two_tf2"
    grpc_server, port, _ = server.start_server("half_plus_two", str(fixture), port=0, max_workers=2)
    try:
        backend = f"127.0.0.1:{port}"
        config = {"salt": "s", "arms": [{"name": "only", "backend": backend, "model_name": "half_plus_two",
                                         "version": 123}]}
        running = start(config)
        request = inference_pb2.MultiInferenceRequest()
        for signature, method in (("regress_x_to_y", "tensorflow/serving/regress"),
                                  ("classify_x_to_y", "tensorflow/serving/classify")):
            task = request.tasks.add(method_name=method)
            task.model_spec.name, task.model_spec.signature_name = "whatever-the-client-calls-it", signature
        request.input.example_list.examples.add().features.feature["x"].float_list.value.append(2.0)
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            response, call = prediction_service_pb2_grpc.PredictionServiceStub(channel).MultiInference.with_call(
                request, timeout=10)
        assert response.results[0].regression_result.regressions[0].value == pytest.approx(3.0)
        assert response.results[1].classification_result.classifications[0].classes[0].score == pytest.approx(3.0)
        assert [(r.model_spec.name, r.model_spec.version.value) for r in response.results] == [("half_plus_two", 123)] * 2
        assert dict(call.trailing_metadata())[router.ARM_METADATA_KEY] == "only"
    finally:
        grpc_server.stop(None)
