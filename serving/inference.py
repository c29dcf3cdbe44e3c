"""Prediction on loaded versions: Predict, Classify, Regress, MultiInference, GetModelMetadata, as TF Serving.

`Inference` takes TF Serving's request protos and returns its response protos; it raises
`ServingError` with TF Serving's status code and message for what it refuses. The frontends
(`serving.grpc_frontend`, `serving.rest`) only translate. With dynamic batching on, calls of a
batchable signature go through the `serving.batching` scheduler; warmup requests run alone.

Each request is written once, as a generator of *steps* that yields where it needs the model: a
callable (run the signature now) or a future (this request's rows of a batch), and gets the
outputs sent back. `run_steps` drives it in the calling thread (the sync methods `predict`, ...,
the REST frontend, warmup); `run_steps_async` drives it from an asyncio event loop without
blocking it (the gRPC frontend): callables go to a thread pool, futures are awaited.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from concurrent import futures
from typing import Callable, Generator, Mapping, Optional, Union

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    inference_pb2,
    model_pb2,
    predict_pb2,
    regression_pb2,
)

from serving import warmup
from serving.batching import (
    BatchingError,
    BatchingOptions,
    BatchQueueFullError,
    BatchScheduler,
    SchedulerStoppedError,
    TaskTooLargeError,
)
from serving.loader import LoadedVersion
from serving.monitoring import RequestLabels, ServingMetrics
from serving.status import ServingError
from serving.tensors import RequestLimits, decode_inputs, encode_tensor, serialized_examples
from serving.versions import VersionManager
from xdctr import features as F

SIGNATURE_DEF_FIELD = "signature_def"  # the only GetModelMetadata field TF Serving supports
CLASSIFY_METHOD, REGRESS_METHOD = tf.saved_model.CLASSIFY_METHOD_NAME, tf.saved_model.REGRESS_METHOD_NAME


Step = Union[futures.Future, Callable[[], dict]]  # what a request's steps yield; outputs are sent back
Steps = Generator[Step, dict, object]


def _advance(steps: Steps, value) -> tuple[bool, object]:
    """(True, response) when the steps are done, else (False, the next step), after sending `value`."""
    try:
        return False, steps.send(value)
    except StopIteration as done:
        return True, done.value


def _batch_failure(error: Exception) -> ServingError:
    if isinstance(error, TimeoutError):  # futures.TimeoutError is TimeoutError
        return ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline exceeded while waiting for a batch.")
    return ServingError(grpc.StatusCode.INTERNAL, str(error))


def run_steps(steps: Steps, deadline: Optional[float] = None):
    """Drives a request's steps in this thread: calls the model inline, waits for batches; returns the response."""
    done, step = _advance(steps, None)
    while not done:
        if not isinstance(step, futures.Future):
            done, step = _advance(steps, step())
            continue
        try:
            value = step.result(timeout=deadline)
        except (TimeoutError, BatchingError) as e:
            step.cancel()  # leaves its batch if that has not started
            raise _batch_failure(e) from None
        done, step = _advance(steps, value)
    return step


class LoopDelivery:
    """Hands results of futures resolved on other threads to one event loop, a wake-up per burst.

    `asyncio.wrap_future` wakes the loop once per future (a write to its self-pipe, then an epoll
    return and a read). A batch resolves all its tasks' futures back to back, so here the first
    result of a burst schedules one drain on the loop and the rest join its list: a batch of 12
    requests wakes the loop once, not 12 times.

    Cancelling the awaitable that `wrap` returns cancels the concurrent future, as with
    `asyncio.wrap_future` (a batch task leaves its batch if that has not started).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Future, futures.Future]] = []

    def wrap(self, future: futures.Future) -> asyncio.Future:
        """An asyncio future of this loop (call it on the loop) that settles as `future` does."""
        waiter = self._loop.create_future()
        waiter.add_done_callback(lambda w: future.cancel() if w.cancelled() else None)
        future.add_done_callback(lambda f: self._resolved(waiter, f))
        return waiter

    def _resolved(self, waiter: asyncio.Future, future: futures.Future) -> None:  # any thread
        with self._lock:
            self._pending.append((waiter, future))
            first = len(self._pending) == 1
        if first:
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: nobody awaits these any more
                with self._lock:
                    self._pending.clear()

    def _drain(self) -> None:  # on the loop
        with self._lock:
            pending, self._pending = self._pending, []
        for waiter, future in pending:
            if waiter.done():
                continue
            if future.cancelled():
                waiter.cancel()
            elif (error := future.exception()) is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(future.result())


async def run_steps_async(steps: Steps, executor: futures.Executor, delivery: LoopDelivery):
    """Drives a request's steps from an event loop: model calls on `executor`, batches awaited.

    Batch results reach the loop through `delivery` (one per loop).
    The caller's deadline is the event loop's to enforce: cancelling this coroutine (gRPC does at
    the call's deadline) cancels the awaited batch future, whose task then leaves its batch.
    """
    loop = asyncio.get_running_loop()
    done, step = _advance(steps, None)
    while not done:
        if not isinstance(step, futures.Future):
            done, step = _advance(steps, await loop.run_in_executor(executor, step))
            continue
        try:
            value = await delivery.wrap(step)
        except BatchingError as e:
            raise _batch_failure(e) from None
        done, step = _advance(steps, value)
    return step


def _signature_text(signature_def: meta_graph_pb2.SignatureDef) -> str:
    return text_format.MessageToString(signature_def, as_one_line=True)


def _response_spec(model_name: str, version: int, signature_name: str = "") -> model_pb2.ModelSpec:
    spec = model_pb2.ModelSpec(name=model_name, signature_name=signature_name)
    spec.version.value = version
    return spec


class Inference:
    """The PredictionService's methods on the versions `manager` serves.

    Args:
      manager: resolves each request's model spec to a loaded version.
      metrics: rows per signature run go to its batch-size histogram.
      batching: dynamic batching knobs; None serves each request alone.
      limits: request size limits.
    """

    def __init__(self, manager: VersionManager, metrics: ServingMetrics, batching: Optional[BatchingOptions],
                 limits: RequestLimits):
        self.manager = manager
        self.metrics = metrics
        self.limits = limits
        self.scheduler = BatchScheduler(batching, on_batch=self._on_batch) if batching is not None else None

    def close(self, timeout: Optional[float] = None) -> None:
        """Runs the queued batches and stops the batch threads."""
        if self.scheduler is not None:
            self.scheduler.stop(timeout)

    def replay_warmup(self, model_name: str, loaded: LoadedVersion) -> int:
        """Runs a fresh version's warmup requests (unbatched); returns how many ran."""
        def alone(steps_on):
            return lambda request: run_steps(steps_on(model_name, loaded, request, batch=False))

        return warmup.replay_warmup(
            loaded.path,
            predict=alone(self._predict_on),
            classify=alone(self._classify_on),
            regress=alone(self._regress_on),
            multi_inference=alone(self._multi_inference_on),
        )

    def steps(self, api: str, request, labels: Optional[RequestLabels] = None) -> Steps:
        """The steps of one request; `api` is "predict", "classify", "regress" or "multi_inference"."""
        on = {"predict": self._predict_on, "classify": self._classify_on, "regress": self._regress_on,
              "multi_inference": self._multi_inference_on}[api]
        if api == "multi_inference":  # the first task names the version, as in TF Serving
            if not request.tasks:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Expected at least one task")
            spec = request.tasks[0].model_spec
        else:
            spec = request.model_spec
        model_name, loaded = self.manager.resolve(spec, labels)
        return on(model_name, loaded, request, labels)

    # ----------------------------------------------------------------------------------------
    # Running a signature.

    def _on_batch(self, key, rows: int) -> None:
        model_name, version, signature_name = key[:3]
        self.metrics.observe_batch(model_name, str(version), signature_name, rows)

    def _run(
        self,
        model_name: str,
        loaded: LoadedVersion,
        signature_name: str,
        inputs: Mapping[str, np.ndarray],
        batch: bool,
    ) -> Steps:
        """Runs a signature, through the batch scheduler when batching is on and it is batchable (a step)."""
        signature = loaded.signatures[signature_name]
        # Scalars cannot be concatenated: such a call of a batchable signature runs alone.
        batched = batch and self.scheduler is not None and signature.batchable and all(
            np.ndim(array) >= 1 for array in inputs.values())
        if not batched:
            return (yield functools.partial(self._run_alone, model_name, loaded.version, signature, inputs))
        sizes = {array.shape[0] for array in inputs.values()}
        if len(sizes) != 1:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Batching Run() input tensors must have equal 0th-dimension size; got {sorted(sizes)}",
            )
        layout = tuple((name, array.dtype.str, array.shape[1:]) for name, array in sorted(inputs.items()))
        key = (model_name, loaded.version, signature_name, layout)
        try:
            future = self.scheduler.submit(key, signature.run, inputs, sizes.pop())
        except TaskTooLargeError as e:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        except (BatchQueueFullError, SchedulerStoppedError) as e:
            raise ServingError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        return (yield future)

    def _run_alone(self, model_name: str, version: int, signature, inputs) -> dict[str, np.ndarray]:
        outputs = signature.run(inputs)
        # Rows scored: the outputs' batch dimension (inputs may differ, e.g. one context example
        # and N candidates in score_candidates).
        rows = max((len(a) for a in outputs.values() if np.ndim(a)), default=1)
        self.metrics.observe_batch(model_name, str(version), signature.name, rows)
        return outputs

    # ----------------------------------------------------------------------------------------
    # Predict.

    def predict(
        self,
        request: predict_pb2.PredictRequest,
        labels: Optional[RequestLabels] = None,
        deadline: Optional[float] = None,
    ) -> predict_pb2.PredictResponse:
        """Runs one signature on the request's input tensors (TF Serving's Predict).

        `deadline` is the seconds a batched request may wait; `labels` collects what the request
        resolved to.
        """
        return run_steps(self.steps("predict", request, labels), deadline)

    def _predict_on(self, model_name, loaded, request, labels=None, batch=True) -> Steps:
        signature_name = request.model_spec.signature_name or F.SERVING_SIGNATURE
        signature = loaded.signatures.get(signature_name)
        if signature is None:
            raise ServingError(
                grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{signature_name}" not found.'
            )
        if labels is not None:
            labels.signature = signature_name

        sent, required = set(request.inputs), set(signature.input_specs)
        if sent != required:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Inputs do not match signature {signature_name!r}. "
                f"Sent extra: {sorted(sent - required)}. Missing but required: {sorted(required - sent)}.",
            )
        output_names = signature.output_names
        for name in request.output_filter:
            if name not in output_names:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Output tensor alias {name!r} not found in signature {signature_name!r}; "
                    f"outputs are {sorted(output_names)}.",
                )
        if len(set(request.output_filter)) != len(request.output_filter):
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT, f"Duplicate output tensor alias in {list(request.output_filter)}."
            )
        inputs = decode_inputs(request.inputs, signature.input_specs, signature_name, self.limits)
        outputs = yield from self._run(model_name, loaded, signature_name, inputs, batch)
        response = predict_pb2.PredictResponse(model_spec=_response_spec(model_name, loaded.version, signature_name))
        for name in request.output_filter or output_names:
            encode_tensor(outputs[name], response.outputs[name])
        return response

    # ----------------------------------------------------------------------------------------
    # Classify, Regress and MultiInference: serialized tf.Examples in.

    @staticmethod
    def _example_signature(loaded, signature_name: str, api: str, input_key: str, check_outputs) -> str:
        """Checks a Classify/Regress signature like TF Serving (method_name check off); returns its name."""
        signature_name = signature_name or F.SERVING_SIGNATURE
        signature_def = loaded.signature_defs.get(signature_name)
        if signature_def is None or signature_name not in loaded.signatures:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT, f"No signature was found with the name: {signature_name}"
            )
        if len(signature_def.inputs) != 1:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Expected one input Tensor.")
        check_outputs(signature_def)
        if input_key not in signature_def.inputs:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"No {api} inputs found in SignatureDef: {_signature_text(signature_def)}",
            )
        if signature_def.inputs[input_key].dtype != tf.string.as_datatype_enum:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Input {input_key!r} of signature {signature_name!r} must be DT_STRING serialized tf.Examples.",
            )
        return signature_name

    def _classification_signature(self, loaded, signature_name: str) -> str:
        classes_key, scores_key = tf.saved_model.CLASSIFY_OUTPUT_CLASSES, tf.saved_model.CLASSIFY_OUTPUT_SCORES

        def check_outputs(signature_def):
            if len(signature_def.outputs) not in (1, 2):
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Expected one or two output Tensors, found {len(signature_def.outputs)}",
                )

        signature_name = self._example_signature(loaded, signature_name, "classification",
                                                 tf.saved_model.CLASSIFY_INPUTS, check_outputs)
        signature_def = loaded.signature_defs[signature_name]
        if classes_key not in signature_def.outputs and scores_key not in signature_def.outputs:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f'Expected classification signature outputs to contain at least one of "{classes_key}" or '
                f'"{scores_key}". Signature was: {_signature_text(signature_def)}',
            )
        return signature_name

    def _regression_signature(self, loaded, signature_name: str) -> str:
        outputs_key = tf.saved_model.REGRESS_OUTPUTS

        def check_outputs(signature_def):
            if len(signature_def.outputs) != 1:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Expected one output Tensor.")

        signature_name = self._example_signature(loaded, signature_name, "regression", tf.saved_model.REGRESS_INPUTS,
                                                 check_outputs)
        signature_def = loaded.signature_defs[signature_name]
        if outputs_key not in signature_def.outputs:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"No regression outputs found in SignatureDef: {_signature_text(signature_def)}",
            )
        return signature_name

    def _classify_examples(self, result: classification_pb2.ClassificationResult, model_name, loaded,
                           signature_name: str, examples: np.ndarray, batch) -> Steps:
        """Runs a classification signature on serialized examples into `result`."""
        classes_key, scores_key = tf.saved_model.CLASSIFY_OUTPUT_CLASSES, tf.saved_model.CLASSIFY_OUTPUT_SCORES
        outputs = yield from self._run(
            model_name, loaded, signature_name, {tf.saved_model.CLASSIFY_INPUTS: examples}, batch
        )
        classes, scores = outputs.get(classes_key), outputs.get(scores_key)
        num_examples = len(examples)
        for name, value, kind in ((classes_key, classes, np.object_), (scores_key, scores, np.float32)):
            if value is None:
                continue
            if value.ndim != 2:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Expected Tensor shape: [batch_size num_classes] but got {list(value.shape)}",
                )
            if value.dtype != kind:
                expected = "DT_STRING" if kind is np.object_ else "DT_FLOAT"
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"Expected {name} Tensor of {expected}. Got: {value.dtype}"
                )
            if value.shape[0] != num_examples:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Expected {name} output batch size of {num_examples}. Got: {value.shape[0]}",
                )
        if classes is not None and scores is not None and classes.shape[1] != scores.shape[1]:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Tensors class and score should match in dim_size(1). Got {classes.shape[1]} vs. {scores.shape[1]}",
            )
        num_classes = (classes if classes is not None else scores).shape[1]
        for i in range(num_examples):
            classifications = result.classifications.add()
            for c in range(num_classes):
                entry = classifications.classes.add()
                if classes is not None:
                    entry.label = classes[i, c].decode("utf-8", "backslashreplace")
                if scores is not None:
                    entry.score = float(scores[i, c])

    def _regress_examples(self, result: regression_pb2.RegressionResult, model_name, loaded, signature_name: str,
                          examples: np.ndarray, batch) -> Steps:
        """Runs a regression signature on serialized examples into `result`."""
        outputs = yield from self._run(
            model_name, loaded, signature_name, {tf.saved_model.REGRESS_INPUTS: examples}, batch
        )
        values = outputs[tf.saved_model.REGRESS_OUTPUTS]
        if not (values.ndim == 1 or (values.ndim == 2 and values.shape[1] == 1)):
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Expected output Tensor shape to be either [batch_size] or [batch_size, 1] but got {list(values.shape)}",
            )
        if values.shape[0] != len(examples):
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Input batch size did not match output batch size: {len(examples)} vs. {values.shape[0]}",
            )
        if values.dtype != np.float32:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"Expected output Tensor of DT_FLOAT.  Got: {values.dtype}")
        for value in values.reshape(-1):
            result.regressions.add(value=float(value))

    def classify(self, request, labels=None, deadline=None) -> classification_pb2.ClassificationResponse:
        """TF Serving's Classify: tf.Examples in, per-example classes and/or scores out.

        The signature needs one DT_STRING input "inputs" and outputs "classes" and/or "scores",
        each (batch, num_classes); xdctr's `serving_default` ("examples" in, "ctr" out) does not
        qualify and gets TF Serving's INVALID_ARGUMENT.
        """
        return run_steps(self.steps("classify", request, labels), deadline)

    def _classify_on(self, model_name, loaded, request, labels=None, batch=True) -> Steps:
        return self._on_examples(classification_pb2.ClassificationResponse, self._classification_signature,
                                 self._classify_examples, model_name, loaded, request, labels, batch)

    def _on_examples(self, response_type, signature_of, run_into, model_name, loaded, request, labels,
                     batch) -> Steps:
        """Classify or Regress: checks the signature, runs it on the request's examples, fills the response."""
        signature_name = signature_of(loaded, request.model_spec.signature_name)
        if labels is not None:
            labels.signature = signature_name
        examples = serialized_examples(request.input, self.limits)
        response = response_type(model_spec=_response_spec(model_name, loaded.version, request.model_spec.signature_name))
        yield from run_into(response.result, model_name, loaded, signature_name, examples, batch)
        return response

    def regress(self, request, labels=None, deadline=None) -> regression_pb2.RegressionResponse:
        """TF Serving's Regress: tf.Examples in, one float per example out.

        The signature needs one DT_STRING input "inputs" and one output "outputs", (batch,) or
        (batch, 1); xdctr's `serving_default` does not qualify (INVALID_ARGUMENT, as TF Serving).
        """
        return run_steps(self.steps("regress", request, labels), deadline)

    def _regress_on(self, model_name, loaded, request, labels=None, batch=True) -> Steps:
        return self._on_examples(regression_pb2.RegressionResponse, self._regression_signature,
                                 self._regress_examples, model_name, loaded, request, labels, batch)

    def multi_inference(self, request, labels=None, deadline=None) -> inference_pb2.MultiInferenceResponse:
        """TF Serving's MultiInference: several classify/regress signatures of one model on the same examples.

        Every task names the same model (its version is the first task's); each signature once;
        `method_name` is "tensorflow/serving/classify" or "tensorflow/serving/regress".
        """
        return run_steps(self.steps("multi_inference", request, labels), deadline)

    def _multi_inference_on(self, model_name, loaded, request, labels=None, batch=True) -> Steps:
        kinds = {CLASSIFY_METHOD: self._classification_signature, REGRESS_METHOD: self._regression_signature}
        seen: set[str] = set()
        plan = []
        for task in request.tasks:
            if not task.model_spec.name:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Found ModelSpec with an empty model name.")
            if task.model_spec.name != model_name:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   "All ModelSpecs in a MultiInferenceRequest must access the same model name.")
            signature_name = task.model_spec.signature_name or F.SERVING_SIGNATURE
            if signature_name in seen:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"Duplicate evaluation of signature: {signature_name}")
            seen.add(signature_name)
            if signature_name not in loaded.signature_defs:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"Requested signature not found in model graph: {signature_name}")
            if task.method_name not in kinds:
                raise ServingError(grpc.StatusCode.UNIMPLEMENTED,
                                   f"Unsupported signature method_name: {task.method_name}")
            plan.append((task, kinds[task.method_name](loaded, signature_name)))
        if labels is not None:
            labels.signature = ",".join(name for _, name in plan)
        examples = serialized_examples(request.input, self.limits)
        response = inference_pb2.MultiInferenceResponse()
        for task, signature_name in plan:
            result = response.results.add(
                model_spec=_response_spec(model_name, loaded.version, task.model_spec.signature_name))
            if task.method_name == CLASSIFY_METHOD:
                yield from self._classify_examples(result.classification_result, model_name, loaded,
                                                   signature_name, examples, batch)
            else:
                yield from self._regress_examples(result.regression_result, model_name, loaded, signature_name,
                                                  examples, batch)
        return response

    # ----------------------------------------------------------------------------------------
    # GetModelMetadata.

    def get_model_metadata(
        self,
        request: get_model_metadata_pb2.GetModelMetadataRequest,
        labels: Optional[RequestLabels] = None,
        deadline: Optional[float] = None,
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        """The signature_def map of the requested version (TF Serving's GetModelMetadata)."""
        del deadline  # answered from memory
        if not request.metadata_field:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"GetModelMetadataRequest must specify at least one metadata_field: {SIGNATURE_DEF_FIELD!r}.",
            )
        for field in request.metadata_field:
            if field != SIGNATURE_DEF_FIELD:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Metadata field {field!r} is not supported; supported: {SIGNATURE_DEF_FIELD!r}.",
                )
        model_name, loaded = self.manager.resolve(request.model_spec, labels)  # after the fields, as TF Serving
        signature_def_map = get_model_metadata_pb2.SignatureDefMap()
        for name, signature_def in loaded.signature_defs.items():
            signature_def_map.signature_def[name].CopyFrom(signature_def)
        response = get_model_metadata_pb2.GetModelMetadataResponse(model_spec=_response_spec(model_name, loaded.version))
        response.metadata[SIGNATURE_DEF_FIELD].Pack(signature_def_map)
        return response
