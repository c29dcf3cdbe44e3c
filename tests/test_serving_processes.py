"""`xdctr serve --processes N`: workers on shared ports (SO_REUSEPORT), with TF Serving's test model."""

from __future__ import annotations

import json
import socket
import urllib.request

import grpc
import pytest
from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc, prediction_service_pb2_grpc

from serving import processes
from serving.config import ServerOptions
from test_serving_compat import FIXTURES, HALF_PLUS_TWO, MODELS, TIMEOUT, models_config, predict_request

CONNECTIONS = 24  # separate connections, so the kernel spreads them over the workers


def _metric_total(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/monitoring/prometheus/metrics", timeout=TIMEOUT) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    config_file = tmp_path_factory.mktemp("group") / "models.config"
    config_file.write_text(models_config([HALF_PLUS_TWO]))
    options = ServerOptions(model_config_file=str(config_file), file_system_poll_wait_seconds=0.0, max_workers=4,
                            rest_api_port=0, monitoring_port=0, processes=2, grace=1.0)
    group = processes.start_processes(options)
    yield group
    group.stop()


def test_every_worker_answers_on_the_one_port(group):
    assert len(group.pids) == 2 and len(set(group.monitoring_ports)) == 2 and group.port > 0
    answers = []
    for _ in range(CONNECTIONS):
        with grpc.insecure_channel(group.target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            answers.append(list(stub.Predict(predict_request(HALF_PLUS_TWO, [2.0, 4.0]), timeout=TIMEOUT)
                                .outputs["y"].float_val))
    assert answers == [pytest.approx([3.0, 4.0])] * CONNECTIONS
    served = [_metric_total(port, "xdctr_serving_requests_total") for port in group.monitoring_ports]
    assert sum(served) >= CONNECTIONS and all(n > 0 for n in served), served  # both workers took connections


def test_rest_api_on_the_shared_port(group):
    body = json.dumps({"instances": [1.0, 2.0]}).encode()
    url = f"http://127.0.0.1:{group.rest_port}/v1/models/{HALF_PLUS_TWO}:predict"
    for _ in range(4):
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=TIMEOUT) as r:
            assert json.loads(r.read())["predictions"] == pytest.approx([2.5, 3.0])


def test_config_reload_by_rpc_is_refused_with_the_way_to_do_it(group):
    with grpc.insecure_channel(group.target) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(), timeout=TIMEOUT)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "runs 2 processes" in raised.value.details() and "--model_config_file" in raised.value.details()


def test_a_worker_that_cannot_start_fails_the_group_with_its_error(tmp_path):
    config_file = tmp_path / "models.config"
    config_file.write_text(f'model_config_list {{ config {{ name: "m" base_path: "{tmp_path / "missing"}" model_platform: "tensorflow" }} }}\n')
    with pytest.raises(ValueError, match="missing"):
        processes.start_processes(ServerOptions(model_config_file=str(config_file), processes=2,
                                                file_system_poll_wait_seconds=0.0), ready_timeout_s=120)


def test_a_port_taken_by_a_socket_that_does_not_share_it_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"Cannot reserve port {port}"):
            processes.reserve_port("127.0.0.1", port)


def test_stop_ends_every_worker(tmp_path):
    config_file = tmp_path / "models.config"
    config_file.write_text(models_config([HALF_PLUS_TWO]))
    group = processes.start_processes(ServerOptions(model_config_file=str(config_file), processes=2, grace=0.5,
                                                    file_system_poll_wait_seconds=0.0))
    workers = list(group._workers)
    group.stop()
    assert [w.is_alive() for w in workers] == [False, False] and [w.exitcode for w in workers] == [0, 0]
    assert group.failed_worker() is not None  # the group reports its workers as gone


@pytest.mark.parametrize("processes_, extra, message", [
    (0, {}, "`processes` must be at least 1"),
    (2, {"rest_api_port": 0, "monitoring_config_file": "m.config"}, "with --processes > 1 use --monitoring-port"),
])
def test_options_refuse_bad_process_settings(processes_, extra, message):
    with pytest.raises(ValueError, match=message):
        ServerOptions(model_base_path=str(FIXTURES / MODELS[HALF_PLUS_TWO]), processes=processes_, **extra)


def test_worker_options_offset_the_monitoring_port():
    options = ServerOptions(model_base_path="/m", monitoring_port=9100, processes=3)
    assert [processes.worker_options(options, i, 8500, None).monitoring_port for i in range(3)] == [9100, 9101, 9102]
    free = ServerOptions(model_base_path="/m", monitoring_port=0, processes=2)
    assert processes.worker_options(free, 1, 8500, 8501).monitoring_port == 0
    assert processes.worker_options(free, 1, 8500, 8501).rest_api_port == 8501


@pytest.mark.parametrize("entry", ["python -m xdctr", "xdctr"])
def test_xdctr_serve_processes_serves_until_sigterm(tmp_path, entry):
    """The command line: `xdctr serve --processes 2` logs the group, answers, and exits 0 on SIGTERM.

    Both ways of starting it: `python -m xdctr`, and the `xdctr` script on the runtime's PATH
    (scripts/setup-runtime writes it). The workers start with multiprocessing's "spawn", which runs
    the main script again in each of them; an unguarded script started the command again there
    and every worker exited 1.
    """
    import shutil
    import signal
    import subprocess
    import sys
    import time

    log = open(tmp_path / "serve.log", "w+")
    if entry == "xdctr":
        executable = shutil.which("xdctr")
        assert executable is not None, "no `xdctr` on PATH: run the tests in the runtime (scripts/runtime)"
        start = [executable]
    else:
        start = [sys.executable, "-m", "xdctr"]
    command = [*start, "serve", f"--model_base_path={FIXTURES / MODELS[HALF_PLUS_TWO]}",
               f"--model_name={HALF_PLUS_TWO}", "--port=0", "--host=127.0.0.1", "--processes=2"]
    child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        started, deadline = None, time.monotonic() + 120
        while started is None and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.5)
            log.seek(0)
            started = next((json.loads(line) for line in log if '"server_group_started"' in line), None)
        assert started is not None, open(tmp_path / "serve.log").read()[-2000:]
        assert started["processes"] == 2 and len(started["pids"]) == 2
        with grpc.insecure_channel(started["address"]) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            response = stub.Predict(predict_request(HALF_PLUS_TWO, [2.0]), timeout=TIMEOUT)
        assert list(response.outputs["y"].float_val) == pytest.approx([3.0])
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 0
    finally:
        if child.poll() is None:
            child.kill()
        log.close()
