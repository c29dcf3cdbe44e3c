"""The gRPC frontend: TF Serving's PredictionService and ModelService, and gRPC health checking.

Health checking answers SERVING for "" (the server), for each service's full name and for each
model name with a version available.

The servicers translate between gRPC and the layers below (`serving.inference`,
`serving.admin`): a `ServingError` becomes its status code, any other exception INTERNAL (logged
with its trace), and every PredictionService call is counted and timed in the metrics.
"""

from __future__ import annotations

import logging
import time
from concurrent import futures
from typing import Optional

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from serving.admin import ModelAdmin
from serving.config import MAX_MESSAGE_BYTES
from serving.inference import Inference
from serving.monitoring import RequestLabels
from serving.status import status_of

logger = logging.getLogger(__name__)

# Health-check names of the services ("tensorflow.serving.PredictionService", ...), SERVING while up.
# (tensorflow_serving.apis' model_service_pb2, which declares them, does not import with protobuf 6.)
SERVICE_NAMES = ("tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")


def seconds_left(context) -> Optional[float]:
    """Seconds until the call's deadline; None without one."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e6 else remaining


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """gRPC front of an `Inference`: maps its errors to status codes, counts and times requests."""

    def __init__(self, inference: Inference):
        self.inference = inference

    def _call(self, api: str, method, request, context):
        labels = RequestLabels()
        started = time.perf_counter()
        response, code, message = None, grpc.StatusCode.OK, ""
        try:
            response = method(request, labels=labels, deadline=seconds_left(context))
        except Exception as e:
            code, message = status_of(e)
            if code == grpc.StatusCode.INTERNAL:
                logger.exception("Internal error in %s", api)
        self.inference.metrics.observe_request(
            labels.model, labels.version, labels.signature, api, code.name, time.perf_counter() - started
        )
        if code != grpc.StatusCode.OK:
            context.abort(code, message)
        return response

    def Predict(self, request, context):
        return self._call("predict", self.inference.predict, request, context)

    def Classify(self, request, context):
        return self._call("classify", self.inference.classify, request, context)

    def Regress(self, request, context):
        return self._call("regress", self.inference.regress, request, context)

    def MultiInference(self, request, context):
        return self._call("multi_inference", self.inference.multi_inference, request, context)

    def GetModelMetadata(self, request, context):
        return self._call("get_model_metadata", self.inference.get_model_metadata, request, context)


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """gRPC front of a `ModelAdmin` (TF Serving's ModelService)."""

    def __init__(self, admin: ModelAdmin):
        self.admin = admin

    def _call(self, rpc: str, method, context):
        try:
            return method()
        except Exception as e:
            code, message = status_of(e)
            if code == grpc.StatusCode.INTERNAL:
                logger.exception("Internal error in %s", rpc)
        context.abort(code, message)

    def GetModelStatus(self, request, context):
        return self._call("GetModelStatus", lambda: self.admin.get_model_status(request), context)

    def HandleReloadConfigRequest(self, request, context):
        metadata = dict(context.invocation_metadata() or ())
        return self._call("HandleReloadConfigRequest",
                          lambda: self.admin.reload_config(request, context.peer(), metadata), context)


def grpc_server(inference: Inference, admin: ModelAdmin, health_servicer: health.HealthServicer,
                max_workers: int, max_request_bytes: int) -> grpc.Server:
    """A gRPC server (not started, no port yet) with the three services."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="xdctr-serving"),
        options=[
            ("grpc.max_receive_message_length", max_request_bytes),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionServicer(inference), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(admin), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server
