"""`xdctr benchmark serve` at smoke size: every scenario runs and its numbers are consistent.

Timings are not asserted (they depend on the machine); the structure, the counts and the order
of the percentiles are.
"""

from __future__ import annotations

import argparse
import json

import pytest
import tensorflow as tf

from benchmarks import serve
from xdctr import features as F

BUCKETS = 100
NUM_EXAMPLES = 12
DOMAINS = (b"books", b"movies")
REQUESTS = 8
CONCURRENCY = 2
BATCH = 2
CANDIDATES = 5


def _bytes_feature(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _example(i: int) -> bytes:
    features = {F.USER_ID: _bytes_feature(b"user-%d" % (i % 3)), F.ITEM_ID: _bytes_feature(b"item-%d" % i),
                F.DOMAIN: _bytes_feature(DOMAINS[i % 2])}
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def _save_toy_model(path: str) -> None:
    """Both xdctr signatures; ctr = hash bucket of the (candidate) item id / BUCKETS."""
    module = tf.Module()

    def ctr(item_ids):
        return tf.cast(tf.strings.to_hash_bucket_fast(item_ids, BUCKETS), tf.float32) / BUCKETS

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=F.SERVING_INPUT)])
    def serve_examples(examples):
        items = tf.io.parse_example(examples, {F.ITEM_ID: tf.io.FixedLenFeature([], tf.string)})[F.ITEM_ID]
        return {F.SERVING_OUTPUT: ctr(items)}  # (batch,)

    @tf.function(input_signature=[
        tf.TensorSpec([1], tf.string, name=F.SERVING_INPUT),
        tf.TensorSpec([None], tf.string, name=F.CANDIDATE_ITEM_IDS),
        tf.TensorSpec([None], tf.string, name=F.CANDIDATE_DOMAINS),
    ])
    def score_candidates(examples, candidate_item_ids, candidate_domains):
        return {F.SERVING_OUTPUT: ctr(candidate_item_ids)}  # (N,)

    module.serve_examples, module.score_candidates = serve_examples, score_candidates
    tf.saved_model.save(module, path, signatures={
        F.SERVING_SIGNATURE: serve_examples, F.SCORE_CANDIDATES_SIGNATURE: score_candidates})


def _parse(argv):
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    """One smoke-size run on a toy SavedModel directory, through the command-line entry point."""
    tmp = tmp_path_factory.mktemp("benchmark_serve")
    model_dir = str(tmp / "toy_model")
    _save_toy_model(model_dir)
    examples = str(tmp / "examples.tfrecord")
    with tf.io.TFRecordWriter(examples) as writer:
        for i in range(NUM_EXAMPLES):
            writer.write(_example(i))
    out = str(tmp / "serve.json")
    args = _parse(["--model-dir", model_dir, "--examples", examples, "--workdir", str(tmp / "work"), "--out", out,
                   "--requests", str(REQUESTS), "--duration", "20", "--concurrency", str(CONCURRENCY),
                   "--batch", str(BATCH), "--candidates", str(CANDIDATES), "--warmup", "1",
                   "--target-rounds", "2"])
    assert serve.run_from_args(args) == 0
    with open(out) as f:
        return json.load(f)


def test_every_scenario_runs_without_errors(benchmark):
    results = benchmark["results"]
    assert [(r["path"], r["signature"], r["rows_per_request"]) for r in results] == [
        (serve.IN_PROCESS, F.SERVING_SIGNATURE, BATCH),
        (serve.IN_PROCESS, F.SERVING_SIGNATURE, CONCURRENCY * BATCH),
        (serve.SERVE, F.SERVING_SIGNATURE, BATCH),
        (serve.SERVE_BATCHING, F.SERVING_SIGNATURE, BATCH),
        (serve.SERVE_BATCHING, F.SERVING_SIGNATURE, BATCH),  # open loop at half load
        (serve.ROUTE, F.SERVING_SIGNATURE, BATCH),
        (serve.IN_PROCESS, F.SCORE_CANDIDATES_SIGNATURE, CANDIDATES),
        (serve.SERVE, F.SCORE_CANDIDATES_SIGNATURE, CANDIDATES),
        (serve.IN_PROCESS, F.SERVING_SIGNATURE, CANDIDATES),
        (serve.SERVE, F.SERVING_SIGNATURE, CANDIDATES),
        (serve.SERVE, F.SERVING_SIGNATURE, 1),
    ]
    assert [r["group"] for r in results] == [serve.LOAD] * 6 + [serve.CANDIDATES] * 5
    assert [r["concurrency"] for r in results] == [1, 1, CONCURRENCY, CONCURRENCY, 2 * CONCURRENCY, CONCURRENCY,
                                                   1, 1, 1, 1, 1]
    closed_loop_qps = results[3]["qps"]
    assert results[4]["rate_qps"] == pytest.approx(0.5 * closed_loop_qps)
    assert [r["rate_qps"] for r in results[:4] + results[5:]] == [None] * 10
    for r in results:
        # 8 requests finish well within 20 s: every scenario stops by the request bound.
        assert (r["sent"], r["ok"], r["errors"], r["unfinished"], r["stopped_by"]) == (REQUESTS, REQUESTS, {}, 0,
                                                                                      "requests"), r["scenario"]


def test_throughput_and_latency_are_positive_and_ordered(benchmark):
    for r in benchmark["results"]:
        latency = r["latency_ms"]
        assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"], r["scenario"]
        assert r["qps"] > 0 and r["elapsed_s"] > 0
        assert r["qps"] == pytest.approx(r["ok"] / r["elapsed_s"])
        assert r["rows_per_s"] == pytest.approx(r["qps"] * r["rows_per_request"])
        # CPU times tick in 10 ms steps: 8 requests may not reach one.
        assert r["service_cpu_ms_per_request"] >= 0
        if r["path"] == serve.IN_PROCESS:
            assert r["client_cpu_ms_per_request"] is None and r["server_handler_ms_mean"] is None
        else:
            assert r["client_cpu_ms_per_request"] >= 0 and r["server_handler_ms_mean"] > 0


def test_server_metrics_show_the_rows_per_signature_run(benchmark):
    runs = {r["scenario"]: r["rows_per_signature_run"] for r in benchmark["results"]}
    assert runs["serve"] == BATCH  # one run per request without batching
    assert runs["route (2 arms) -> serve"] == BATCH
    assert runs[f"serve, {CANDIDATES} rows"] == CANDIDATES
    assert runs["serve, 1-row requests"] == 1
    # With batching, requests may merge, never split: between one request and all in flight.
    assert BATCH <= runs["serve+batching"] <= CONCURRENCY * BATCH
    assert BATCH <= runs["serve+batching at 50% load"] <= 2 * CONCURRENCY * BATCH
    assert runs[f"in-process, score_candidates {CANDIDATES}"] == CANDIDATES


def test_settings_and_candidate_summary_are_recorded(benchmark):
    assert benchmark["batching"] == {"max_batch_size": CONCURRENCY * BATCH, "batch_timeout_micros": 1000,
                                     "num_batch_threads": 1, "max_enqueued_batches": 10}
    rows = {r["scenario"]: r for r in benchmark["results"]}
    goals = benchmark["targets"]
    first, second = goals["rounds"]  # the main table's round, then one more
    assert first["qps_ratio"] == pytest.approx(rows["serve+batching"]["qps"] / rows[f"in-process, batch {BATCH}"]["qps"])
    assert first["p99_at_half_load_ms"] == rows["serve+batching at 50% load"]["latency_ms"]["p99"]
    assert second["qps_ratio"] == pytest.approx(second["serve_batching_qps"] / second["in_process_qps"])
    assert goals["qps_ratio"] == pytest.approx((first["qps_ratio"] + second["qps_ratio"]) / 2)  # the median of 2
    assert goals["p99_at_half_load_ms"] == pytest.approx(
        (first["p99_at_half_load_ms"] + second["p99_at_half_load_ms"]) / 2)
    assert (goals["qps_ratio_target"], goals["p99_target_ms"]) == (0.7, 20.0)
    assert goals["met"] == (goals["qps_ratio"] >= 0.7 and goals["p99_at_half_load_ms"] <= 20.0)
    assert set(benchmark["in_process_tensorflow_threads"]) == {"intra_op", "inter_op"}
    assert benchmark["settings"]["requests"] == REQUESTS
    assert benchmark["settings"]["server_processes"] == serve.DEFAULT_SERVER_PROCESSES == 2  # the batching server
    assert benchmark["model"]["version"] == 1 and benchmark["model"]["examples_read"] == NUM_EXAMPLES
    per_set = benchmark["ms_per_candidate_set"]
    assert set(per_set) == {r["scenario"] for r in benchmark["results"] if r["group"] == serve.CANDIDATES}
    assert all(ms > 0 for ms in per_set.values())


def test_model_dir_needs_examples_and_a_saved_model(tmp_path):
    with pytest.raises(ValueError, match="--model-dir needs --examples"):
        serve.run_from_args(_parse(["--model-dir", str(tmp_path)]))
    with pytest.raises(ValueError, match="expected a SavedModel directory"):
        serve.serving_base_path(str(tmp_path), str(tmp_path / "work"))


def test_settings_refuse_bad_values():
    with pytest.raises(ValueError, match="`concurrency` must be at least 1. Received: concurrency=0"):
        serve.Settings(concurrency=0)
    with pytest.raises(ValueError, match="`duration_s` must be a positive number"):
        serve.Settings(duration_s=0)
    with pytest.raises(ValueError, match="`half_load` must be in"):
        serve.Settings(half_load=1.0)
