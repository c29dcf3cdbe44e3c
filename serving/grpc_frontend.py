"""The gRPC frontend: TF Serving's PredictionService and ModelService, and gRPC health checking.

The services run on a `grpc.aio` server whose event loop has a thread of its own: a request is
decoded, checked and answered on that one thread, and waits for the model without holding a
thread (`serving.inference.run_steps_async`): a batched request awaits its batch, an unbatched
model call runs on a pool of `max_workers` threads. Few threads means few hand-offs of Python's
GIL per request, the main cost of serving small models from Python. A batch's results reach the
loop through one `serving.inference.LoopDelivery`: one wake-up of the loop per batch, not one per
request (on 2 cores, 16 clients of 4 rows, 2 processes: 8-15% more QPS in three paired runs).

The servicers translate between gRPC and the layers below (`serving.inference`,
`serving.admin`): a `ServingError` becomes its status code, any other exception INTERNAL (logged
with its trace), and every PredictionService call is counted and timed in the metrics.

Health checking answers SERVING for "" (the server), for each service's full name and for each
model name with a version available.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent import futures
from typing import Optional

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from serving.admin import ModelAdmin
from serving.config import MAX_MESSAGE_BYTES
from serving.inference import Inference, LoopDelivery, run_steps_async
from serving.monitoring import RequestLabels
from serving.status import status_of

logger = logging.getLogger(__name__)

# Health-check names of the services, SERVING while up. (tensorflow_serving.apis' model_service_pb2,
# which declares them, does not import with protobuf 6.)
SERVICE_NAMES = ("tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")
HEALTH_THREADS = 2  # health checks are answered by the sync servicer of grpc_health on these


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """gRPC front of an `Inference`: maps its errors to status codes, counts and times requests."""

    def __init__(self, inference: Inference, executor: futures.Executor, delivery: LoopDelivery):
        self.inference = inference
        self._executor = executor
        self._delivery = delivery

    async def _call(self, api: str, request, context):
        labels = RequestLabels()
        started = time.perf_counter()
        response, code, message = None, grpc.StatusCode.OK, ""
        try:
            if api == "get_model_metadata":  # answered from memory
                response = self.inference.get_model_metadata(request, labels=labels)
            else:
                steps = self.inference.steps(api, request, labels)
                response = await run_steps_async(steps, self._executor, self._delivery)  # gRPC cancels it at the deadline
        except Exception as e:
            code, message = status_of(e)
            if code == grpc.StatusCode.INTERNAL:
                logger.exception("Internal error in %s", api)
        self.inference.metrics.observe_request(
            labels.model, labels.version, labels.signature, api, code.name, time.perf_counter() - started
        )
        if code != grpc.StatusCode.OK:
            await context.abort(code, message)
        return response

    async def Predict(self, request, context):
        return await self._call("predict", request, context)

    async def Classify(self, request, context):
        return await self._call("classify", request, context)

    async def Regress(self, request, context):
        return await self._call("regress", request, context)

    async def MultiInference(self, request, context):
        return await self._call("multi_inference", request, context)

    async def GetModelMetadata(self, request, context):
        return await self._call("get_model_metadata", request, context)


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """gRPC front of a `ModelAdmin` (TF Serving's ModelService); config reloads run on the thread pool."""

    def __init__(self, admin: ModelAdmin, executor: futures.Executor):
        self.admin = admin
        self._executor = executor

    async def _call(self, rpc: str, method, context):
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, method)
        except Exception as e:
            code, message = status_of(e)
            if code == grpc.StatusCode.INTERNAL:
                logger.exception("Internal error in %s", rpc)
        await context.abort(code, message)

    async def GetModelStatus(self, request, context):
        return await self._call("GetModelStatus", lambda: self.admin.get_model_status(request), context)

    async def HandleReloadConfigRequest(self, request, context):
        peer, metadata = context.peer(), dict(context.invocation_metadata() or ())
        return await self._call("HandleReloadConfigRequest",
                                lambda: self.admin.reload_config(request, peer, metadata), context)


class GrpcServer:
    """The three services on a `grpc.aio` server, with the calls of a `grpc.Server` from any thread.

    `add_insecure_port(address) -> port`, `start()`, and `stop(grace)`, which returns a
    `threading.Event` set once the server has stopped (running calls get `grace` seconds).
    """

    def __init__(self, inference: Inference, admin: ModelAdmin, health_servicer: health.HealthServicer,
                 max_workers: int, max_request_bytes: int):
        self._executor = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="xdctr-serving")
        self._health_pool = futures.ThreadPoolExecutor(max_workers=HEALTH_THREADS, thread_name_prefix="xdctr-health")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="xdctr-grpc", daemon=True)
        self._thread.start()
        self._stopped = threading.Event()

        async def build() -> grpc.aio.Server:
            server = grpc.aio.server(
                migration_thread_pool=self._health_pool,
                options=[
                    ("grpc.max_receive_message_length", max_request_bytes),
                    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ],
            )
            prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
                PredictionServicer(inference, self._executor, LoopDelivery(self._loop)), server)
            model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(admin, self._executor), server)
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
            return server

        self._server = self._on_loop(build())

    def _on_loop(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def add_insecure_port(self, address: str) -> int:
        async def add() -> int:
            return self._server.add_insecure_port(address)

        return self._on_loop(add())

    def start(self) -> None:
        self._on_loop(self._server.start())

    def stop(self, grace: Optional[float]) -> threading.Event:
        """Stops taking calls; running ones get `grace` seconds (None: none). Returns an Event set when done."""
        if self._loop.is_closed() or self._stopped.is_set():
            self._stopped.set()
            return self._stopped

        def finished(_) -> None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5.0)
            if not self._thread.is_alive():
                self._loop.close()
            self._executor.shutdown(wait=False)
            self._health_pool.shutdown(wait=False)
            self._stopped.set()

        stopping = asyncio.run_coroutine_threadsafe(self._server.stop(grace), self._loop)
        stopping.add_done_callback(lambda future: threading.Thread(target=finished, args=(future,)).start())
        return self._stopped
