"""SavedModel warmup: replay `assets.extra/tf_serving_warmup_requests` before a version takes traffic.

The file is TF Serving's: a TFRecord of `tensorflow.serving.PredictionLog`, at most 1000 records.
TF Serving replays each logged request once against the freshly loaded SavedModel (ignoring the
model name and version in the logged `model_spec`) and fails the load when a request fails; so
does `xdctr serve`. Predict, Classify, Regress and MultiInference logs are replayed; other log
types (session_run_log) fail the load as in TF Serving ("Unsupported log_type for warmup").

The trainer writes the file with `components.trainer.export.write_warmup_requests`.
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

WARMUP_ASSETS_DIR = "assets.extra"
WARMUP_FILE_NAME = "tf_serving_warmup_requests"
MAX_WARMUP_RECORDS = 1000  # TF Serving's kMaxNumRecordsPerFile

Handler = Callable[[object], object]


def warmup_file(version_path: str) -> str:
    """`<version_path>/assets.extra/tf_serving_warmup_requests`."""
    return "/".join([version_path.rstrip("/"), WARMUP_ASSETS_DIR, WARMUP_FILE_NAME])


def read_warmup_logs(version_path: str) -> list[prediction_log_pb2.PredictionLog]:
    """The PredictionLogs of a version's warmup file; [] when it has none.

    Raises ValueError for a file with more than 1000 records or a record that is not a
    PredictionLog, and tf.errors.DataLossError for a corrupt TFRecord.
    """
    path = warmup_file(version_path)
    if not tf.io.gfile.exists(path):
        return []
    logs = []
    for index, record in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator()):
        if index >= MAX_WARMUP_RECORDS:
            raise ValueError(f"Number of warmup records exceeds the maximum ({MAX_WARMUP_RECORDS}) at {path}")
        log = prediction_log_pb2.PredictionLog()
        try:
            log.ParseFromString(record)
        except Exception as e:  # protobuf's DecodeError
            raise ValueError(f"Warmup record {index} of {path} is not a tensorflow.serving.PredictionLog: {e}") from None
        logs.append(log)
    return logs


def replay_warmup(version_path: str, predict: Handler, classify: Handler, regress: Handler,
                  multi_inference: Handler) -> int:
    """Runs every logged request through the matching handler; returns how many ran.

    A handler's exception propagates (the version must not load).
    """
    handlers = {
        "predict_log": (predict, lambda log: log.predict_log.request),
        "classify_log": (classify, lambda log: log.classify_log.request),
        "regress_log": (regress, lambda log: log.regress_log.request),
        "multi_inference_log": (multi_inference, lambda log: log.multi_inference_log.request),
    }
    logs = read_warmup_logs(version_path)
    for index, log in enumerate(logs):
        kind = log.WhichOneof("log_type")
        if kind not in handlers:
            raise ValueError(f"Unsupported log_type for warmup: {kind} (record {index} of {warmup_file(version_path)})")
        handler, request_of = handlers[kind]
        handler(request_of(log))
    return len(logs)
