"""The load generator against a tiny scoring server, over real gRPC with the standard stubs."""

from __future__ import annotations

import argparse
import json
import time

import pytest
import tensorflow as tf

from serving import loadtest, server
from xdctr import features as F

MODEL_NAME = "toy"
BUCKETS = 100
NUM_EXAMPLES = 12
DOMAINS = (b"books", b"movies")


def example(i: int) -> bytes:
    def bytes_feature(value):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    features = {F.ITEM_ID: bytes_feature(b"item-%d" % i), F.DOMAIN: bytes_feature(DOMAINS[i % 2])}
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


EXAMPLES = [example(i) for i in range(NUM_EXAMPLES)]


def save_toy_model(path) -> None:
    """Both xdctr signatures; ctr = hash bucket of the (candidate) item id / BUCKETS."""
    module = tf.Module()

    def ctr(item_ids):
        return tf.cast(tf.strings.to_hash_bucket_fast(item_ids, BUCKETS), tf.float32) / BUCKETS

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=F.SERVING_INPUT)])
    def serve(examples):
        items = tf.io.parse_example(examples, {F.ITEM_ID: tf.io.FixedLenFeature([], tf.string)})[F.ITEM_ID]
        return {F.SERVING_OUTPUT: ctr(items)}  # (batch,)

    @tf.function(input_signature=[
        tf.TensorSpec([1], tf.string, name=F.SERVING_INPUT),
        tf.TensorSpec([None], tf.string, name=F.CANDIDATE_ITEM_IDS),
        tf.TensorSpec([None], tf.string, name=F.CANDIDATE_DOMAINS),
    ])
    def score_candidates(examples, candidate_item_ids, candidate_domains):
        tf.debugging.assert_equal(tf.size(candidate_item_ids), tf.size(candidate_domains))
        return {F.SERVING_OUTPUT: ctr(candidate_item_ids)}  # (N,)

    module.serve, module.score_candidates = serve, score_candidates
    tf.saved_model.save(module, str(path), signatures={
        F.SERVING_SIGNATURE: serve, F.SCORE_CANDIDATES_SIGNATURE: score_candidates})


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    save_toy_model(base / "1")
    grpc_server, port, _ = server.start_server(MODEL_NAME, str(base), port=0, max_workers=4)
    yield f"127.0.0.1:{port}"
    grpc_server.stop(None)


def test_request_bound_is_respected(target):
    result = loadtest.run(target, MODEL_NAME, EXAMPLES, requests=25, duration_s=60.0, concurrency=3, batch=4)
    assert result["stopped_by"] == "requests"
    assert result["sent"] == 25
    assert result["ok"] == 25
    assert result["errors"] == {}
    assert result["unfinished"] == 0
    assert result["rows_per_request"] == 4
    assert result["qps"] == pytest.approx(25 / result["elapsed_s"])
    assert result["rows_per_s"] == pytest.approx(4 * result["qps"])
    assert result["elapsed_s"] < 60.0


def test_time_bound_is_respected(target):
    duration = 0.5
    before = time.monotonic()
    result = loadtest.run(target, MODEL_NAME, EXAMPLES, requests=10**9, duration_s=duration, concurrency=2)
    wall = time.monotonic() - before
    assert result["stopped_by"] == "time"
    assert 0 < result["sent"] < 10**9
    assert result["ok"] + result["unfinished"] + sum(result["errors"].values()) == result["sent"]
    assert result["errors"] == {}
    assert duration <= result["elapsed_s"] < duration + 2.0  # calls end by the bound; slack for threads
    assert wall < duration + 15.0  # includes building requests and connecting


def test_open_loop_sends_at_the_rate(target):
    result = loadtest.run(target, MODEL_NAME, EXAMPLES, requests=10**9, duration_s=1.0, concurrency=4, rate_qps=40.0)
    assert result["rate_qps"] == pytest.approx(40.0) and result["stopped_by"] == "time"
    assert 36 <= result["sent"] <= 40  # k/40 s < 1 s for k = 0..39; a busy machine may end a few late
    assert result["ok"] + result["unfinished"] + sum(result["errors"].values()) == result["sent"]
    assert result["qps"] == pytest.approx(result["ok"] / result["elapsed_s"])
    # Latency counts from each request's due time, at least the call's own time.
    assert result["call_latency_ms"]["p50"] <= result["latency_ms"]["p50"]
    assert result["call_latency_ms"]["max"] <= result["latency_ms"]["max"]
    with pytest.raises(ValueError, match="`rate_qps` must be a positive number"):
        loadtest.run(target, MODEL_NAME, EXAMPLES, requests=3, duration_s=1.0, rate_qps=0.0)


def test_warmup_requests_are_not_counted(target):
    result = loadtest.run(target, MODEL_NAME, EXAMPLES, requests=3, duration_s=60.0, concurrency=1, warmup=5)
    assert (result["warmup"], result["sent"], result["ok"]) == (5, 3, 3)
    with pytest.raises(ValueError, match="`warmup` must be a non-negative integer"):
        loadtest.run(target, MODEL_NAME, EXAMPLES, requests=3, duration_s=1.0, warmup=-1)


def test_latency_percentiles_are_ordered_and_positive(target):
    result = loadtest.run(target, MODEL_NAME, EXAMPLES, requests=30, duration_s=60.0, concurrency=2, batch=2)
    latency = result["latency_ms"]
    assert result["call_latency_ms"] == latency  # a closed loop sends each request when it is due
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    assert 0 < latency["mean"] <= latency["max"]
    assert latency["max"] < result["elapsed_s"] * 1000.0


def test_score_candidates_requests(target):
    result = loadtest.run(target, MODEL_NAME, EXAMPLES, requests=6, duration_s=60.0, concurrency=2,
                          signature=F.SCORE_CANDIDATES_SIGNATURE, candidates=50)
    assert (result["ok"], result["errors"]) == (6, {})
    assert result["rows_per_request"] == 50
    assert result["signature"] == F.SCORE_CANDIDATES_SIGNATURE


def test_score_candidates_request_payload():
    (request,) = loadtest.build_requests(MODEL_NAME, EXAMPLES, F.SCORE_CANDIDATES_SIGNATURE, batch=1,
                                         candidates=5, count=1, version_label="canary")
    assert request.model_spec.version_label == "canary"
    assert list(tf.make_ndarray(request.inputs[F.SERVING_INPUT])) == [EXAMPLES[0]]
    # Candidates cycle through the examples' distinct (item_id, domain) targets.
    assert list(tf.make_ndarray(request.inputs[F.CANDIDATE_ITEM_IDS])) == [b"item-%d" % i for i in range(5)]
    assert list(tf.make_ndarray(request.inputs[F.CANDIDATE_DOMAINS])) == [DOMAINS[i % 2] for i in range(5)]


def test_serving_default_requests_cycle_through_examples():
    requests = loadtest.build_requests(MODEL_NAME, EXAMPLES[:5], F.SERVING_SIGNATURE, batch=3, candidates=1,
                                       count=2, version=7)
    assert [r.model_spec.version.value for r in requests] == [7, 7]
    assert list(tf.make_ndarray(requests[0].inputs[F.SERVING_INPUT])) == EXAMPLES[0:3]
    assert list(tf.make_ndarray(requests[1].inputs[F.SERVING_INPUT])) == EXAMPLES[3:5] + EXAMPLES[0:1]


def test_errors_are_counted_by_status_code(target):
    result = loadtest.run(target, "no_such_model", EXAMPLES, requests=8, duration_s=60.0, concurrency=2)
    assert result["errors"] == {"NOT_FOUND": 8}
    assert "no_such_model" in result["error_details"]["NOT_FOUND"]
    assert result["ok"] == 0
    assert result["qps"] == pytest.approx(0.0)
    assert result["latency_ms"]["p50"] is None
    assert "NOT_FOUND=8" in loadtest.format_summary(result)


def test_unknown_signature_is_refused_before_sending(target):
    with pytest.raises(ValueError, match="`signature` must be one of"):
        loadtest.run(target, MODEL_NAME, EXAMPLES, requests=1, duration_s=1.0, signature="classify")


@pytest.mark.parametrize("name, value", [("requests", 0), ("duration_s", 0.0), ("duration_s", float("inf")),
                                         ("concurrency", 0), ("batch", -1)])
def test_bad_bounds_are_refused(target, name, value):
    with pytest.raises(ValueError, match=f"`{name}` must be a positive"):
        loadtest.run(target, MODEL_NAME, EXAMPLES, **{"requests": 1, "duration_s": 1.0, name: value})


@pytest.mark.parametrize("remote", ["10.0.0.5:8500", "example.com:8500", "dns:///example.com:8500",
                                    "[2001:db8::1]:8500", "ipv4:127.0.0.1:8500,10.0.0.5:8500"])
def test_non_loopback_target_is_refused(remote):
    with pytest.raises(ValueError, match="not a loopback address.*--allow-remote"):
        loadtest.run(remote, MODEL_NAME, EXAMPLES, requests=1, duration_s=1.0)


@pytest.mark.parametrize("local", ["localhost:8500", "127.0.0.1:8500", "127.1.2.3:1", "[::1]:8500",
                                   "dns:///localhost:8500", "ipv4:127.0.0.1:8500", "unix:/tmp/xdctr.sock"])
def test_loopback_targets_are_accepted(local):
    loadtest.check_target(local)  # does not raise
    assert loadtest.is_loopback(loadtest.target_host(local))


def test_allow_remote_accepts_any_host():
    loadtest.check_target("10.0.0.5:8500", allow_remote=True)  # does not raise
    assert not loadtest.is_loopback(loadtest.target_host("10.0.0.5:8500"))


def test_target_without_port_is_refused():
    with pytest.raises(ValueError, match="must be HOST:PORT"):
        loadtest.check_target("localhost")


def test_no_server_is_one_clear_error():
    with pytest.raises(ValueError, match="cannot connect to 127.0.0.1:1 within 0.5 s"):
        loadtest.run("127.0.0.1:1", MODEL_NAME, EXAMPLES, requests=1, duration_s=1.0, connect_timeout_s=0.5)


def test_cli_reads_tfrecords_prints_summary_and_writes_json(target, tmp_path, capsys):
    path = tmp_path / "examples.tfrecord.gz"
    with tf.io.TFRecordWriter(str(path), options="GZIP") as writer:
        for serialized in EXAMPLES:
            writer.write(serialized)
    parser = argparse.ArgumentParser()
    loadtest.add_arguments(parser)
    out = tmp_path / "result" / "loadtest.json"
    args = parser.parse_args(["--target", target, "--model-name", MODEL_NAME, "--examples", str(tmp_path / "*.gz"),
                              "--requests", "5", "--duration", "30", "--concurrency", "1", "--batch", "2",
                              "--out", str(out)])
    assert loadtest.run_from_args(args) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"loadtest {target} {MODEL_NAME}/{F.SERVING_SIGNATURE} ")
    assert "5/5 ok" in line and "errors: none" in line
    result = json.loads(out.read_text())
    assert (result["sent"], result["ok"], result["rows_per_request"]) == (5, 5, 2)


def test_read_examples_missing_pattern(tmp_path):
    with pytest.raises(FileNotFoundError, match="no TFRecord file matches"):
        loadtest.read_examples(str(tmp_path / "*.gz"))
