"""Dynamic batching across concurrent requests, with TF Serving's knobs and queueing rules.

TF Serving's `--enable_batching` wraps each model in a shared batch scheduler
(`tensorflow/core/kernels/batching_util/shared_batch_scheduler.h`). This module does the same for
`xdctr serve`:

- Every (model, version, signature, input layout) gets its own queue of batches. A request is a
  *task* of `rows` rows; it joins the queue's open batch when it fits in `max_batch_size`, else
  the open batch is closed and a new one opened.
- A batch is ready when it is closed (full) or its oldest task has waited `batch_timeout_micros`.
  `num_batch_threads` threads take the oldest ready batch over all queues, concatenate its tasks'
  inputs along dimension 0, run the signature once and hand each task its rows of the outputs.
  With `batch_timeout_micros = 0` a batch runs as soon as a thread is free, so requests merge only
  while every thread is busy: batching costs no latency when the server is idle.
- A queue holds at most `max_enqueued_batches` batches (the open one included; a batch taken by a
  thread has left the queue). A task that needs a new batch in a full queue is refused with
  `BatchQueueFullError` (TF Serving: UNAVAILABLE "The batch scheduling queue to which this task
  was submitted is full"); a task larger than `max_batch_size` with `TaskTooLargeError`
  (INVALID_ARGUMENT "Task size N is larger than maximum input batch size M").

Defaults are TF Serving's: max_batch_size 1000, batch_timeout_micros 0, max_enqueued_batches 10,
num_batch_threads = number of CPUs.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from concurrent import futures
from typing import Callable, Hashable, Mapping, Optional

import numpy as np

logger = logging.getLogger(__name__)

Arrays = Mapping[str, np.ndarray]
RunFunction = Callable[[Arrays], Arrays]


@dataclasses.dataclass(frozen=True)
class BatchingOptions:
    """TF Serving's `BatchingParameters` that `xdctr serve` implements (see the module docstring)."""

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    num_batch_threads: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    max_enqueued_batches: int = 10

    def __post_init__(self):
        for name in ("max_batch_size", "num_batch_threads", "max_enqueued_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1. Received: {name}={getattr(self, name)}")
        if self.batch_timeout_micros < 0:
            raise ValueError(
                f"`batch_timeout_micros` must be >= 0. Received: batch_timeout_micros={self.batch_timeout_micros}"
            )


class BatchingError(Exception):
    """A task the scheduler refuses."""


class TaskTooLargeError(BatchingError):
    """The task has more rows than `max_batch_size`."""


class BatchQueueFullError(BatchingError):
    """The task needs a new batch and its queue already holds `max_enqueued_batches`."""


class SchedulerStoppedError(BatchingError):
    """The scheduler is stopping and takes no new tasks."""


class _Task:
    def __init__(self, inputs: Arrays, rows: int):
        self.inputs = inputs
        self.rows = rows
        self.future: futures.Future = futures.Future()


class _Batch:
    def __init__(self):
        self.tasks: list[_Task] = []
        self.rows = 0
        self.opened = time.monotonic()  # when its first task arrived
        self.closed = False


class _Queue:
    def __init__(self, key: Hashable, run: RunFunction):
        self.key = key
        self.run = run
        self.batches: collections.deque[_Batch] = collections.deque()


class BatchScheduler:
    """Merges concurrent tasks into batches and runs them on `num_batch_threads` threads.

    Args:
      options: the batching knobs.
      on_batch: called as `on_batch(key, rows)` for every batch run, e.g. to record batch sizes.
    """

    def __init__(self, options: BatchingOptions, on_batch: Optional[Callable[[Hashable, int], None]] = None):
        self.options = options
        self._on_batch = on_batch
        self._timeout = options.batch_timeout_micros / 1e6
        self._cv = threading.Condition()
        self._queues: dict[Hashable, _Queue] = {}
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._work, name=f"xdctr-batch-{i}", daemon=True)
            for i in range(options.num_batch_threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, key: Hashable, run: RunFunction, inputs: Arrays, rows: int) -> futures.Future:
        """Queues a task; the future resolves to this task's rows of `run`'s outputs.

        Cancelling the future before its batch runs takes the task out of the batch.

        Tasks with the same `key` are merged, so they must share `run` and every input's dtype and
        shape past dimension 0. `inputs` are arrays with `rows` rows each.

        Raises:
          TaskTooLargeError, BatchQueueFullError, SchedulerStoppedError.
        """
        if rows > self.options.max_batch_size:
            raise TaskTooLargeError(
                f"Task size {rows} is larger than maximum input batch size {self.options.max_batch_size}"
            )
        task = _Task(inputs, rows)
        with self._cv:
            if self._stopping:
                raise SchedulerStoppedError("The batch scheduler is shutting down.")
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = _Queue(key, run)
            open_batch = queue.batches[-1] if queue.batches and not queue.batches[-1].closed else None
            if open_batch is None or open_batch.rows + rows > self.options.max_batch_size:
                if open_batch is not None:
                    open_batch.closed = True
                if len(queue.batches) >= self.options.max_enqueued_batches:
                    raise BatchQueueFullError(
                        "The batch scheduling queue to which this task was submitted is full "
                        f"(max_enqueued_batches={self.options.max_enqueued_batches})"
                    )
                open_batch = _Batch()
                queue.batches.append(open_batch)
            open_batch.tasks.append(task)
            open_batch.rows += rows
            if open_batch.rows >= self.options.max_batch_size:
                open_batch.closed = True
            self._cv.notify()
        return task.future

    def stop(self, timeout: Optional[float] = None) -> None:
        """Refuses new tasks, runs the queued ones, then ends the batch threads."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(deadline - time.monotonic(), 0.0))

    def _next_batch(self) -> Optional[tuple[_Queue, _Batch]]:
        """The oldest ready batch, removed from its queue; None when stopping with nothing left."""
        with self._cv:
            while True:
                now = time.monotonic()
                chosen, wait = None, None
                for queue in self._queues.values():
                    batch = queue.batches[0]
                    waited = now - batch.opened
                    if batch.closed or waited >= self._timeout or self._stopping:
                        if chosen is None or batch.opened < chosen[1].opened:
                            chosen = (queue, batch)
                    else:
                        remaining = self._timeout - waited
                        wait = remaining if wait is None else min(wait, remaining)
                if chosen is not None:
                    queue, batch = chosen
                    queue.batches.popleft()
                    if not queue.batches:
                        del self._queues[queue.key]
                    return chosen
                if self._stopping:
                    return None
                self._cv.wait(wait)

    def _work(self) -> None:
        while True:
            chosen = self._next_batch()
            if chosen is None:
                return
            queue, batch = chosen
            try:
                self._run(queue, batch)
            except BaseException as e:  # never let a batch thread die with tasks waiting
                logger.exception("Batch of %d rows failed", batch.rows)
                for task in batch.tasks:
                    if not task.future.done():
                        task.future.set_exception(e)

    def _run(self, queue: _Queue, batch: _Batch) -> None:
        # Tasks whose caller gave up (a cancelled future) leave the batch; the others cannot be cancelled now.
        tasks = [task for task in batch.tasks if task.future.set_running_or_notify_cancel()]
        if not tasks:
            return
        batch.rows = sum(task.rows for task in tasks)
        if len(tasks) == 1:
            inputs = tasks[0].inputs
        else:
            inputs = {name: np.concatenate([task.inputs[name] for task in tasks]) for name in tasks[0].inputs}
        if self._on_batch is not None:
            self._on_batch(queue.key, batch.rows)
        try:
            outputs = queue.run(inputs)
        except Exception as e:
            for task in tasks:
                task.future.set_exception(e)
            return
        for name, value in outputs.items():
            if np.ndim(value) == 0 or len(value) != batch.rows:
                error = BatchingError(
                    f"Output {name!r} has shape {list(np.shape(value))}; a batched signature must return "
                    f"one row per input row ({batch.rows})."
                )
                for task in tasks:
                    task.future.set_exception(error)
                return
        start = 0
        for task in tasks:
            end = start + task.rows
            task.future.set_result({name: value[start:end] for name, value in outputs.items()})
            start = end
