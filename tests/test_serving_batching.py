"""Dynamic batching: the scheduler's rules, the parameters file, and batched == unbatched results."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_service_pb2_grpc

from serving import config as serving_config
from serving import server
from serving.batching import (
    BatchingError,
    BatchingOptions,
    BatchQueueFullError,
    BatchScheduler,
    SchedulerStoppedError,
    TaskTooLargeError,
)
from serving.config import ServerOptions
from serving.inference import LoopDelivery
from serving.status import ServingError
from test_serving import MODEL_NAME, metric_value, predict_request, save_toy_model, scores_of, sigmoid
from xdctr import features as F

WAIT_SECONDS = 20.0
KEY = ("model", 1, "signature", ())


def double(inputs):
    return {"y": inputs["x"] * 2}


class BlockingRun:
    """A run function whose first call waits for `release`, so that tasks pile up behind it."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()
        self.batches = []

    def __call__(self, inputs):
        self.batches.append(len(inputs["x"]))
        if len(self.batches) == 1:
            self.entered.set()
            self.release.wait(WAIT_SECONDS)
        return double(inputs)


def rows(*values):
    return {"x": np.array(values, dtype=np.float32)}


@pytest.fixture
def scheduler_factory():
    schedulers = []

    def make(**options):
        scheduler = BatchScheduler(BatchingOptions(**options))
        schedulers.append(scheduler)
        return scheduler

    yield make
    for scheduler in schedulers:
        scheduler.stop(timeout=WAIT_SECONDS)


def test_tasks_waiting_for_a_busy_thread_run_as_one_batch(scheduler_factory):
    scheduler = scheduler_factory(max_batch_size=8, num_batch_threads=1)
    run = BlockingRun()
    first = scheduler.submit(KEY, run, rows(1, 2), 2)
    assert run.entered.wait(WAIT_SECONDS)
    second = scheduler.submit(KEY, run, rows(3, 4, 5), 3)
    third = scheduler.submit(KEY, run, rows(6), 1)
    run.release.set()
    assert run.batches[:1] == [2]
    np.testing.assert_allclose(first.result(WAIT_SECONDS)["y"], [2, 4], rtol=1e-6)
    np.testing.assert_allclose(second.result(WAIT_SECONDS)["y"], [6, 8, 10], rtol=1e-6)  # each task gets its own rows
    np.testing.assert_allclose(third.result(WAIT_SECONDS)["y"], [12], rtol=1e-6)
    assert run.batches == [2, 4]  # the second and third tasks ran together


def test_a_cancelled_task_leaves_its_batch(scheduler_factory):
    scheduler = scheduler_factory(max_batch_size=8, num_batch_threads=1)
    run = BlockingRun()
    first = scheduler.submit(KEY, run, rows(1), 1)
    assert run.entered.wait(WAIT_SECONDS)
    gone = scheduler.submit(KEY, run, rows(2, 3), 2)
    kept = scheduler.submit(KEY, run, rows(4), 1)
    assert gone.cancel()
    run.release.set()
    np.testing.assert_allclose(kept.result(WAIT_SECONDS)["y"], [8], rtol=1e-6)
    first.result(WAIT_SECONDS)
    assert run.batches == [1, 1]  # the second batch ran without the cancelled task's 2 rows


def test_batch_timeout_waits_for_more_tasks(scheduler_factory):
    scheduler = scheduler_factory(max_batch_size=8, num_batch_threads=1, batch_timeout_micros=300_000)
    run = BlockingRun()
    run.release.set()
    futures = [scheduler.submit(KEY, run, rows(i), 1) for i in range(3)]
    assert [f.result(WAIT_SECONDS)["y"].tolist() for f in futures] == [[0], [2], [4]]
    assert run.batches == [3]


def test_full_batch_is_closed_and_a_full_queue_refuses_tasks(scheduler_factory):
    scheduler = scheduler_factory(max_batch_size=2, num_batch_threads=1, max_enqueued_batches=1)
    run = BlockingRun()
    running = scheduler.submit(KEY, run, rows(0), 1)
    assert run.entered.wait(WAIT_SECONDS)  # the thread is busy; the queue is empty again
    queued = scheduler.submit(KEY, run, rows(1, 2), 2)  # fills the only batch the queue may hold
    with pytest.raises(BatchQueueFullError, match="queue to which this task was submitted is full"):
        scheduler.submit(KEY, run, rows(3), 1)
    other_key = scheduler.submit(("other",), double, rows(4), 1)  # other queues are not affected
    with pytest.raises(TaskTooLargeError, match="Task size 3 is larger than maximum input batch size 2"):
        scheduler.submit(KEY, run, rows(1, 2, 3), 3)
    run.release.set()
    assert running.result(WAIT_SECONDS)["y"].tolist() == [0]
    assert queued.result(WAIT_SECONDS)["y"].tolist() == [2, 4]
    assert other_key.result(WAIT_SECONDS)["y"].tolist() == [8]


def test_errors_reach_every_task_of_the_batch(scheduler_factory):
    scheduler = scheduler_factory(max_batch_size=8, num_batch_threads=1, batch_timeout_micros=200_000)

    def fail(inputs):
        raise ValueError("bad batch")

    def wrong_rows(inputs):
        return {"y": inputs["x"][:1]}

    for run, error, match in ((fail, ValueError, "bad batch"), (wrong_rows, BatchingError, "one row per input row")):
        futures = [scheduler.submit((run.__name__,), run, rows(i, i), 2) for i in range(2)]
        for future in futures:
            with pytest.raises(error, match=match):
                future.result(WAIT_SECONDS)


def test_stop_runs_queued_tasks_then_refuses_new_ones():
    scheduler = BatchScheduler(BatchingOptions(max_batch_size=4, num_batch_threads=1))
    run = BlockingRun()
    first = scheduler.submit(KEY, run, rows(1), 1)
    assert run.entered.wait(WAIT_SECONDS)
    queued = scheduler.submit(KEY, run, rows(2), 1)
    stopper = threading.Thread(target=scheduler.stop, kwargs={"timeout": WAIT_SECONDS})
    stopper.start()
    run.release.set()
    stopper.join(WAIT_SECONDS)
    assert (first.result(0)["y"].tolist(), queued.result(0)["y"].tolist()) == ([2], [4])
    with pytest.raises(SchedulerStoppedError):
        scheduler.submit(KEY, run, rows(3), 1)


# ----------------------------------------------------------------------------------------------
# LoopDelivery: a batch's results reach the gRPC event loop with one wake-up.


class CountingLoop:
    """An event loop on a thread of its own that counts `call_soon_threadsafe` calls (its wake-ups)."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.wakeups = 0
        original = self.loop.call_soon_threadsafe

        def counting(*args, **kwargs):
            self.wakeups += 1
            return original(*args, **kwargs)

        self.loop.call_soon_threadsafe = counting
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(WAIT_SECONDS)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT_SECONDS)
        self.loop.close()


@pytest.fixture
def counting_loop():
    loop = CountingLoop()
    yield loop
    loop.close()


def test_a_burst_of_results_wakes_the_loop_once(counting_loop):
    delivery = LoopDelivery(counting_loop.loop)
    tasks = [futures.Future() for _ in range(12)]

    async def await_all():
        waiters = [delivery.wrap(task) for task in tasks]
        await asyncio.sleep(0)  # every waiter registered before the batch resolves
        burst = threading.Thread(target=lambda: [t.set_result({"y": np.array([i])}) for i, t in enumerate(tasks)])
        counting_loop.wakeups = 0
        burst.start()
        burst.join()  # blocks the loop, so no drain runs mid-burst however the threads are scheduled
        return await asyncio.gather(*waiters)

    results = counting_loop.run(await_all())
    assert [int(r["y"][0]) for r in results] == list(range(12))
    assert counting_loop.wakeups == 1


def test_asyncio_wrap_future_wakes_the_loop_once_per_result(counting_loop):
    """What LoopDelivery saves: the standard wrapper's wake-ups, for the same burst of 12."""
    tasks = [futures.Future() for _ in range(12)]

    async def await_all():
        waiters = [asyncio.wrap_future(task) for task in tasks]
        counting_loop.wakeups = 0
        burst = threading.Thread(target=lambda: [t.set_result(i) for i, t in enumerate(tasks)])
        burst.start()
        burst.join()  # the same burst, the loop blocked the same way
        return await asyncio.gather(*waiters)

    assert counting_loop.run(await_all()) == list(range(12))
    assert counting_loop.wakeups == 12


def test_delivery_passes_errors_and_cancellation_both_ways(counting_loop):
    delivery = LoopDelivery(counting_loop.loop)
    failed, abandoned, cancelled, done_before = (futures.Future() for _ in range(4))
    done_before.set_result("early")

    async def scenario():
        failing = delivery.wrap(failed)
        failed.set_exception(BatchQueueFullError("full"))
        with pytest.raises(BatchQueueFullError, match="full"):
            await failing
        waiter = delivery.wrap(abandoned)
        waiter.cancel()  # the caller's deadline: the batch task must leave its batch
        await asyncio.sleep(0)
        gone = delivery.wrap(cancelled)
        cancelled.cancel()  # the scheduler dropped the task
        with pytest.raises(asyncio.CancelledError):
            await gone
        return await delivery.wrap(done_before)  # already resolved when wrapped

    assert counting_loop.run(scenario()) == "early"
    assert abandoned.cancelled()


@pytest.mark.parametrize(
    "options, detail",
    [({"max_batch_size": 0}, "max_batch_size"), ({"num_batch_threads": 0}, "num_batch_threads"),
     ({"batch_timeout_micros": -1}, "batch_timeout_micros")],
)
def test_batching_options_are_validated(options, detail):
    with pytest.raises(ValueError, match=detail):
        BatchingOptions(**options)


# ----------------------------------------------------------------------------------------------
# TF Serving's batching parameters file.


def test_batching_parameters_file_in_tf_serving_text_format(tmp_path):
    path = tmp_path / "batching_parameters.txt"
    path.write_text(
        "max_batch_size { value: 128 }\n"
        "batch_timeout_micros { value: 1000 }\n"
        "max_enqueued_batches { value: 100 }\n"
        "num_batch_threads { value: 4 }\n"
        "pad_variable_length_inputs: true\n"
    )
    assert serving_config.read_batching_parameters(str(path)) == BatchingOptions(
        max_batch_size=128, batch_timeout_micros=1000, max_enqueued_batches=100, num_batch_threads=4
    )
    partial = serving_config.parse_batching_parameters("max_batch_size { value: 32 }")
    assert (partial.max_batch_size, partial.batch_timeout_micros, partial.max_enqueued_batches) == (32, 0, 10)
    assert serving_config.batching_parameters_class().DESCRIPTOR.full_name == "tensorflow.serving.BatchingParameters"


@pytest.mark.parametrize(
    "text, detail",
    [
        ("max_batch_size { value: 32 }\nmax_batch_sise { value: 1 }", r"batching\.txt:2:\d+: .*max_batch_sise"),
        ("max_batch_size: 32", r"batching\.txt:1:\d+: "),  # a wrapper message, not a number
        ("max_batch_size { value: 0 }", r"batching\.txt: `max_batch_size` must be at least 1"),
    ],
)
def test_bad_batching_parameters_name_file_and_line(tmp_path, text, detail):
    path = tmp_path / "batching.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=detail):
        serving_config.read_batching_parameters(str(path))


# ----------------------------------------------------------------------------------------------
# Batching in the server.


def save_model_with_unbatchable_signature(path) -> None:
    """serving_default plus `first_row`, whose fixed (1,) input cannot be merged with others."""
    module = tf.Module()

    def score(examples):
        x = tf.io.parse_example(examples, {"x": tf.io.FixedLenFeature([], tf.float32)})["x"]
        return tf.sigmoid(x)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=F.SERVING_INPUT)])
    def serve(examples):
        return {F.SERVING_OUTPUT: score(examples)}

    @tf.function(input_signature=[tf.TensorSpec([1], tf.string, name=F.SERVING_INPUT)])
    def first_row(examples):
        return {F.SERVING_OUTPUT: score(examples)}

    module.serve, module.first_row = serve, first_row
    tf.saved_model.save(module, str(path), signatures={F.SERVING_SIGNATURE: serve, "first_row": first_row})


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    save_toy_model(base / "1", scale=1.5)
    return base


@pytest.fixture(scope="module")
def batching_server(base_path):
    options = ServerOptions(
        model_name=MODEL_NAME,
        model_base_path=str(base_path),
        file_system_poll_wait_seconds=0.0,
        max_workers=16,
        enable_batching=True,
        batching=BatchingOptions(max_batch_size=64, batch_timeout_micros=200_000, num_batch_threads=1),
    )
    running = server.start(options)
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def plain_server(base_path):
    running = server.start(ServerOptions(model_name=MODEL_NAME, model_base_path=str(base_path),
                                         file_system_poll_wait_seconds=0.0, max_workers=4))
    yield running
    running.stop(0)


def test_batched_results_equal_unbatched_under_concurrency(batching_server, plain_server):
    rng = np.random.default_rng(0)
    requests = [rng.normal(size=rng.integers(1, 6)).astype(np.float32) for _ in range(8)]  # 1-5 rows each
    with grpc.insecure_channel(plain_server.target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        unbatched = [scores_of(stub.Predict(predict_request(xs), timeout=10)) for xs in requests]

    metrics = batching_server.model_server.metrics
    labels = dict(model=MODEL_NAME, version="1", signature=F.SERVING_SIGNATURE)
    batches_before = metric_value(metrics.exposition().decode(), "xdctr_serving_batch_size_count", **labels)
    barrier = threading.Barrier(len(requests))
    batched, errors = [None] * len(requests), []
    with grpc.insecure_channel(batching_server.target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

        def call(i):
            try:
                barrier.wait(WAIT_SECONDS)
                batched[i] = scores_of(stub.Predict(predict_request(requests[i]), timeout=WAIT_SECONDS))
            except Exception as e:  # reported below, with the others
                errors.append(repr(e))

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT_SECONDS * 2)
    assert errors == []
    for got, expected, xs in zip(batched, unbatched, requests):
        # Equal up to float32 rounding: vectorized kernels may round a row differently by its
        # position in the batch (one ulp, ~1e-7 relative).
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)
        np.testing.assert_allclose(got, sigmoid(1.5 * xs), rtol=1e-6)
    text = metrics.exposition().decode()
    batches = metric_value(text, "xdctr_serving_batch_size_count", **labels) - batches_before
    assert 1 <= batches < len(requests)  # requests were merged
    assert metric_value(text, "xdctr_serving_batch_size_sum", **labels) >= sum(len(xs) for xs in requests)


def test_request_over_max_batch_size_is_invalid_argument(batching_server):
    with pytest.raises(ServingError) as info:
        batching_server.model_server.inference.predict(predict_request(np.zeros(65, dtype=np.float32)))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "Task size 65 is larger than maximum input batch size 64" in info.value.message


def test_full_batch_queue_is_unavailable(batching_server, monkeypatch):
    """TF Serving answers UNAVAILABLE when the batch queue is full (a retryable status)."""
    scheduler = batching_server.model_server.inference.scheduler

    def full(*args, **kwargs):
        raise BatchQueueFullError("The batch scheduling queue to which this task was submitted is full")

    monkeypatch.setattr(scheduler, "submit", full)
    with grpc.insecure_channel(batching_server.target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(predict_request(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "is full" in info.value.details()


def test_a_batch_that_does_not_come_in_time_is_deadline_exceeded_and_left(batching_server, monkeypatch):
    scheduler = batching_server.model_server.inference.scheduler
    pending = []

    def never(*args, **kwargs):
        pending.append(futures.Future())
        return pending[-1]

    monkeypatch.setattr(scheduler, "submit", never)
    with pytest.raises(ServingError) as info:  # the thread-driven path (REST, warmup)
        batching_server.model_server.inference.predict(predict_request(), deadline=0.2)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    with grpc.insecure_channel(batching_server.target) as channel:  # the event-loop path (gRPC)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as rpc_info:
            stub.Predict(predict_request(), timeout=0.5)
    assert rpc_info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + WAIT_SECONDS
    while not all(f.cancelled() for f in pending) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(pending) == 2 and all(f.cancelled() for f in pending)  # their tasks leave the batch


def test_signatures_with_fixed_batch_run_unbatched(tmp_path):
    save_model_with_unbatchable_signature(tmp_path / "1")
    running = server.start(ServerOptions(model_name=MODEL_NAME, model_base_path=str(tmp_path), enable_batching=True,
                                         file_system_poll_wait_seconds=0.0))
    try:
        loaded = running.model_server.manager.loaded_versions(MODEL_NAME)[1]
        assert {name for name, signature in loaded.signatures.items() if signature.batchable} == {F.SERVING_SIGNATURE}
        response = running.model_server.inference.predict(predict_request([0.25], signature="first_row"))
        np.testing.assert_allclose(scores_of(response), sigmoid([0.25]), rtol=1e-6)
    finally:
        running.stop(0)
