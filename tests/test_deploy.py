"""The deployment files for real TF Serving (deploy/): what can be checked without a cluster.

Every YAML parses; the Kubernetes objects have the kinds, ports, flags, mounts and probes they
need and point at each other consistently; the ConfigMaps hold exact copies of deploy/*.config and
deploy/experiment.yaml; the TF Serving configs parse with TF Serving's protos; the compose file
runs the same servers with the same flags; and models.config works in `xdctr serve`.
"""

from __future__ import annotations

import argparse
import pathlib
import posixpath

import grpc
import numpy as np
import pytest
import tensorflow as tf
import yaml
from google.protobuf import text_format
from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc, prediction_service_pb2_grpc
from tensorflow_serving.config import model_server_config_pb2

from serving import client, router, server
from serving import config as serving_config
from xdctr import features as F

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
MODELS_CONFIG = DEPLOY / "models.config"
BATCHING_CONFIG = DEPLOY / "batching.config"
MONITORING_CONFIG = DEPLOY / "monitoring.config"
EXPERIMENT = DEPLOY / "experiment.yaml"
COMPOSE = DEPLOY / "docker-compose.yaml"

MODEL_NAME = "xdctr"
GRPC_PORT = 8500
REST_PORT = 8501
METRICS_PATH = "/monitoring/prometheus/metrics"
SERVING_CONFIG_FILES = {"models.config": MODELS_CONFIG, "batching.config": BATCHING_CONFIG,
                        "monitoring.config": MONITORING_CONFIG}


def load_objects(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((KUBERNETES / name).read_text()) if doc is not None]


def one(objects: list[dict], kind: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def flags(args: list[str]) -> dict[str, str]:
    """{"--name": "value"} of `--name=value` arguments ("" for a bare flag)."""
    return dict((a.split("=", 1) + [""])[:2] for a in args if a.startswith("--"))


def container_port(container: dict, port) -> int:
    """A probe's or Service's port (a number or a container port name) as a number."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return number


def mount_path_of_config_map(deployment: dict, config_map_name: str) -> str:
    pod = deployment["spec"]["template"]["spec"]
    (volume,) = [v["name"] for v in pod["volumes"] if v.get("configMap", {}).get("name") == config_map_name]
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume]
    assert "subPath" not in mount  # a subPath mount would never see ConfigMap edits
    return mount["mountPath"]


def tf_serving_message(name: str):
    """TF Serving's `tensorflow.serving.<name>` (BatchingParameters, MonitoringConfig), which the
    tensorflow-serving-api wheel lacks: rebuilt by `xdctr serve` with TF Serving's package, names,
    types and field numbers, so text_format parses the files as TF Serving's C++ parser does."""
    return serving_config.tf_serving_message_class(name)


def parse_models_config(text: str) -> model_server_config_pb2.ModelServerConfig:
    return text_format.Parse(text, model_server_config_pb2.ModelServerConfig())


# ---- Parsing -------------------------------------------------------------------------------------


def test_every_yaml_parses():
    paths = sorted(KUBERNETES.glob("*.yaml")) + [COMPOSE, EXPERIMENT]
    assert [p.name for p in sorted(KUBERNETES.glob("*.yaml"))] == ["models-pvc.yaml", "router.yaml", "tf-serving.yaml"]
    for path in paths:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, path
        for doc in docs:
            assert isinstance(doc, dict), path
    for path in KUBERNETES.glob("*.yaml"):
        for obj in load_objects(path.name):
            assert {"apiVersion", "kind", "metadata"} <= set(obj), f"{path.name}: {obj.get('kind')}"
            assert obj["metadata"]["name"].startswith("xdctr-")


def test_kinds_of_each_manifest():
    assert [o["kind"] for o in load_objects("tf-serving.yaml")] == ["ConfigMap", "Deployment", "Service"]
    assert [o["kind"] for o in load_objects("router.yaml")] == ["ConfigMap", "Deployment", "Service"]
    assert [o["kind"] for o in load_objects("models-pvc.yaml")] == ["PersistentVolumeClaim"]


def test_models_config_parses_with_tf_serving_protos():
    config = parse_models_config(MODELS_CONFIG.read_text())
    (model,) = config.model_config_list.config
    assert model.name == MODEL_NAME
    assert model.base_path == "/models/xdctr"
    assert model.model_platform == "tensorflow"
    assert model.model_version_policy.WhichOneof("policy_choice") == "latest"
    assert model.model_version_policy.latest.num_versions == 2
    assert dict(model.version_labels) == {"stable": 1, "canary": 2}


def test_batching_config_parses_as_tf_serving_batching_parameters():
    params = text_format.Parse(BATCHING_CONFIG.read_text(), tf_serving_message("BatchingParameters")())
    set_fields = {field.name for field, _ in params.ListFields()}
    assert set_fields == {"max_batch_size", "batch_timeout_micros", "num_batch_threads", "max_enqueued_batches"}
    assert params.max_batch_size.value == 256
    assert params.batch_timeout_micros.value == 2000
    assert params.num_batch_threads.value == 4
    assert params.max_enqueued_batches.value == 100


def test_config_files_load_with_xdctr_serve_readers():
    config = serving_config.read_model_server_config(str(MODELS_CONFIG))  # parsed and validated
    assert [m.name for m in config.model_config_list.config] == [MODEL_NAME]
    options = serving_config.read_batching_parameters(str(BATCHING_CONFIG))
    assert (options.max_batch_size, options.batch_timeout_micros, options.num_batch_threads,
            options.max_enqueued_batches) == (256, 2000, 4, 100)


def test_batching_parser_is_strict():
    """The stand-in proto rejects what TF Serving would: bare values instead of wrappers, unknown keys."""
    with pytest.raises(text_format.ParseError):
        text_format.Parse("max_batch_size: 256", tf_serving_message("BatchingParameters")())
    with pytest.raises(text_format.ParseError):
        text_format.Parse("max_batch_sise { value: 256 }", tf_serving_message("BatchingParameters")())


def test_monitoring_config_enables_prometheus():
    config = text_format.Parse(MONITORING_CONFIG.read_text(), tf_serving_message("MonitoringConfig")())
    assert config.prometheus_config.enable is True
    assert config.prometheus_config.path == METRICS_PATH


# ---- TF Serving on Kubernetes --------------------------------------------------------------------


def test_serving_config_map_holds_exact_copies_of_the_config_files():
    config_map = one(load_objects("tf-serving.yaml"), "ConfigMap")
    assert set(config_map["data"]) == set(SERVING_CONFIG_FILES)
    for key, path in SERVING_CONFIG_FILES.items():
        assert config_map["data"][key] == path.read_text(), f"ConfigMap key {key} differs from {path}"


def test_tf_serving_deployment_flags_point_at_the_mounted_config_map():
    objects = load_objects("tf-serving.yaml")
    deployment, config_map = one(objects, "Deployment"), one(objects, "ConfigMap")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"].startswith("tensorflow/serving:")
    assert container["command"] == ["tensorflow_model_server"]
    args = flags(container["args"])
    config_dir = mount_path_of_config_map(deployment, config_map["metadata"]["name"])
    assert args["--port"] == str(GRPC_PORT)
    assert args["--rest_api_port"] == str(REST_PORT)
    assert args["--model_config_file"] == posixpath.join(config_dir, "models.config")
    assert args["--model_config_file_poll_wait_seconds"] == "60"
    assert args["--enable_batching"] in ("", "true")
    assert args["--batching_parameters_file"] == posixpath.join(config_dir, "batching.config")
    assert args["--monitoring_config_file"] == posixpath.join(config_dir, "monitoring.config")
    for flag in ("--model_config_file", "--batching_parameters_file", "--monitoring_config_file"):
        assert posixpath.basename(args[flag]) in config_map["data"]


def test_tf_serving_deployment_ports_probes_resources():
    deployment = one(load_objects("tf-serving.yaml"), "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"grpc": GRPC_PORT, "http": REST_PORT}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container_port(container, container[probe]["tcpSocket"]["port"]) == GRPC_PORT
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == METRICS_PATH
    assert annotations["prometheus.io/port"] == str(REST_PORT)


def test_tf_serving_reads_models_from_the_claim_at_the_config_base_path():
    deployment = one(load_objects("tf-serving.yaml"), "Deployment")
    claim = one(load_objects("models-pvc.yaml"), "PersistentVolumeClaim")
    pod = deployment["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
    (model,) = parse_models_config(MODELS_CONFIG.read_text()).model_config_list.config
    assert posixpath.dirname(model.base_path) == mount["mountPath"]  # /models/xdctr under the /models mount


@pytest.mark.parametrize("manifest", ["tf-serving.yaml", "router.yaml"])
def test_service_selects_the_deployment_and_exposes_grpc(manifest):
    objects = load_objects(manifest)
    deployment, service = one(objects, "Deployment"), one(objects, "Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == GRPC_PORT
    assert container_port(container, ports["grpc"]["targetPort"]) == GRPC_PORT


# ---- The router ----------------------------------------------------------------------------------


def test_router_config_map_holds_an_exact_copy_of_the_experiment():
    config_map = one(load_objects("router.yaml"), "ConfigMap")
    assert config_map["data"] == {"experiment.yaml": EXPERIMENT.read_text()}


def test_experiment_config_is_a_two_arm_split_of_stable_and_canary():
    config_map = one(load_objects("router.yaml"), "ConfigMap")
    values = yaml.safe_load(config_map["data"]["experiment.yaml"])
    experiment = router.ExperimentConfig.from_dict(values)  # the router's own validation
    arms = experiment.arms
    assert [(a.name, a.model_name, a.version_label, a.version) for a in arms] == [
        ("stable", MODEL_NAME, "stable", None), ("canary", MODEL_NAME, "canary", None)]
    assert sum(a.weight for a in arms) == pytest.approx(1.0)
    assert [a.weight for a in arms] == [0.9, 0.1]
    assert experiment.salt
    assert experiment.fallback_arm == "stable"
    # Every arm's label exists in models.config, and its backend is the TF Serving Service.
    (model,) = parse_models_config(MODELS_CONFIG.read_text()).model_config_list.config
    assert {a.version_label for a in arms} <= set(model.version_labels)
    service = one(load_objects("tf-serving.yaml"), "Service")
    assert {a.backend for a in arms} == {f"{service['metadata']['name']}:{GRPC_PORT}"}


def test_experiment_file_loads_in_xdctr_route():
    experiment = router.load_config(str(EXPERIMENT))
    assert [a.name for a in experiment.arms] == ["stable", "canary"]
    # Users split about 90/10 between the arms.
    users = [f"user-{i}" for i in range(2000)]
    canary = sum(router.assign(user, experiment) == "canary" for user in users) / len(users)
    assert 0.07 < canary < 0.13


def test_router_deployment_runs_xdctr_route_on_the_mounted_experiment():
    objects = load_objects("router.yaml")
    deployment, config_map = one(objects, "Deployment"), one(objects, "ConfigMap")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "command" not in container  # the project image's entrypoint is `xdctr`
    assert container["args"][0] == "route"
    config_dir = mount_path_of_config_map(deployment, config_map["metadata"]["name"])
    parser = argparse.ArgumentParser(exit_on_error=False)
    router.add_arguments(parser)
    args = parser.parse_args(container["args"][1:])  # the flags `xdctr route` has
    assert args.config == posixpath.join(config_dir, "experiment.yaml")
    assert args.port == GRPC_PORT
    assert args.monitoring_port == container_port(container, "http")
    pod = deployment["spec"]["template"]["spec"]
    (log_volume,) = [v["name"] for v in pod["volumes"] if "emptyDir" in v]
    (log_mount,) = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == log_volume]
    assert posixpath.dirname(args.assignment_log) == log_mount
    assert container_port(container, "grpc") == GRPC_PORT
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == GRPC_PORT
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])


def test_project_image_entrypoint_is_xdctr():
    assert 'ENTRYPOINT ["xdctr"]' in (ROOT / "Dockerfile").read_text()


# ---- Docker Compose ------------------------------------------------------------------------------


def test_compose_runs_the_same_servers_with_the_same_flags():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"xdctr-serving", "router"}

    k8s_serving = one(load_objects("tf-serving.yaml"), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    serving = services["xdctr-serving"]
    assert serving["image"] == k8s_serving["image"]
    assert serving["entrypoint"] == k8s_serving["command"]
    assert serving["command"] == k8s_serving["args"]
    mounts = {v["target"]: v for v in serving["volumes"]}
    (model,) = parse_models_config(MODELS_CONFIG.read_text()).model_config_list.config
    assert posixpath.dirname(model.base_path) in mounts  # a volume for /models
    assert mounts["/models"]["read_only"] is True
    config_dir = posixpath.dirname(flags(serving["command"])["--model_config_file"])
    assert (COMPOSE.parent / mounts[config_dir]["source"]).resolve() == DEPLOY  # the files checked above
    assert f"{GRPC_PORT}:{GRPC_PORT}" in serving["ports"]

    k8s_router = one(load_objects("router.yaml"), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    router_service = services["router"]
    assert router_service["command"] == k8s_router["args"]
    build = router_service["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == ROOT / "Dockerfile"
    router_config_dir = posixpath.dirname(flags(router_service["command"])["--config"])
    assert {v["target"]: v["source"] for v in router_service["volumes"]}[router_config_dir] == "."
    assert router_service["depends_on"]["xdctr-serving"]["condition"] == "service_healthy"
    # The experiment's backend address resolves in compose too: the service is named like the K8s Service.
    experiment = router.load_config(str(EXPERIMENT))
    assert {arm.backend.split(":")[0] for arm in experiment.arms} == {"xdctr-serving"}


# ---- The same models.config in `xdctr serve` -----------------------------------------------------


def test_xdctr_serve_takes_the_tf_serving_command_line_unchanged():
    container = one(load_objects("tf-serving.yaml"), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    parser = argparse.ArgumentParser(exit_on_error=False)
    server.add_arguments(parser)
    options = server.options_from_args(parser.parse_args(container["args"]))
    expected = flags(container["args"])
    assert (options.port, options.rest_api_port) == (GRPC_PORT, REST_PORT)
    assert options.model_config_file == expected["--model_config_file"]
    assert options.model_config_file_poll_wait_seconds == float(expected["--model_config_file_poll_wait_seconds"])
    assert options.file_system_poll_wait_seconds == float(expected["--file_system_poll_wait_seconds"])
    assert options.enable_batching is True
    assert options.batching_parameters_file == expected["--batching_parameters_file"]
    assert options.monitoring_config_file == expected["--monitoring_config_file"]
    assert serving_config.read_monitoring_config(str(MONITORING_CONFIG)) == METRICS_PATH


def save_toy_model(path, scale: float) -> None:
    """serving_default: sigmoid(scale * x) of the float feature "x" of each tf.Example."""
    module = tf.Module()

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=F.SERVING_INPUT)])
    def serve(examples):
        x = tf.io.parse_example(examples, {"x": tf.io.FixedLenFeature([], tf.float32)})["x"]
        return {F.SERVING_OUTPUT: tf.sigmoid(scale * x)}

    module.serve = serve
    tf.saved_model.save(module, str(path), signatures={F.SERVING_SIGNATURE: serve})


def test_models_config_loads_in_xdctr_serve(tmp_path):
    """deploy/models.config, with only base_path moved to a temp dir, served by `xdctr serve`."""
    config = parse_models_config(MODELS_CONFIG.read_text())
    (model,) = config.model_config_list.config
    base = tmp_path / posixpath.basename(model.base_path)
    scales = {"stable": 1.0, "canary": 2.0}  # one toy version per label, at the label's version number
    for label, scale in scales.items():
        save_toy_model(base / str(model.version_labels[label]), scale)
    model.base_path = str(base)
    config_path = tmp_path / "models.config"
    config_path.write_text(text_format.MessageToString(config))

    xs = np.array([-1.0, 0.5], dtype=np.float32)
    examples = [tf.train.Example(features=tf.train.Features(feature={
        "x": tf.train.Feature(float_list=tf.train.FloatList(value=[x]))})).SerializeToString() for x in xs]
    running = server.start(serving_config.ServerOptions(model_config_file=str(config_path), port=0))
    try:
        target = f"127.0.0.1:{running.port}"
        client.wait_until_serving(target, timeout=30.0, service=MODEL_NAME)
        with grpc.insecure_channel(target) as channel:
            predict = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            for label, scale in scales.items():
                request = client.build_predict_request(MODEL_NAME, examples)
                request.model_spec.version_label = label
                response = predict.Predict(request, timeout=10)
                assert response.model_spec.version.value == model.version_labels[label]
                np.testing.assert_allclose(tf.make_ndarray(response.outputs[F.SERVING_OUTPUT]),
                                           1 / (1 + np.exp(-scale * xs)), rtol=1e-6)
            status_request = get_model_status_pb2.GetModelStatusRequest()
            status_request.model_spec.name = MODEL_NAME
            status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(status_request, timeout=10)
            available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
            assert sorted(v.version for v in status.model_version_status if v.state == available) == [1, 2]
    finally:
        running.stop()
