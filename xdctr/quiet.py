"""Known-harmless noise of the libraries under xdctr, silenced unless `xdctr -v` asks for it.

What is silenced, and why it is harmless here:
- TensorFlow's C++ log lines below errors-that-matter (`TF_CPP_MIN_LOG_LEVEL=3`): "Could not find
  cuda drivers", "failed call to cuInit" (a CPU-only machine), oneDNN notices, absl's
  "All log messages before absl::InitializeLog()". Python exceptions are never hidden.
- ml-metadata's absl warnings "ArtifactQuery.property_predicate is not supported" and "Fallback to
  non-ZetaSQL contexts execution query": ML Metadata falls back to its plain query path, which
  gives the same answers.
- Keras's "`shuffle=True` was passed, but will be ignored since the data `x` was provided as a
  tf.data.Dataset": the Trainer's tf.data input shuffles itself.
- TensorFlow's deprecation notice for `tf_record_iterator`, which TFMA's own writer calls.
- gRPC's C-core info lines (`GRPC_VERBOSITY=ERROR`).

Environment variables are set only when the user has not set them, and before TensorFlow is
imported, so child processes (`xdctr serve`, `xdctr route`) inherit them.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "GRPC_VERBOSITY": "ERROR"}
HARMLESS_LOG_MESSAGES = re.compile(
    r"ArtifactQuery\.property_predicate is not supported"
    r"|Fallback to non-ZetaSQL contexts execution query"
    r"|tf_record_iterator \(from tensorflow\.python\.lib\.io\.tf_record\) is deprecated"
)
HARMLESS_WARNINGS = (
    r"`shuffle=True` was passed, but will be ignored",
)


class HarmlessMessages(logging.Filter):
    """Drops the log records `HARMLESS_LOG_MESSAGES` matches; lets everything else through."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed record is not ours to drop
            return True
        return not HARMLESS_LOG_MESSAGES.search(message)


def configure(verbose: bool) -> None:
    """Silences the known-harmless noise, unless `verbose`; idempotent."""
    if verbose:
        return
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    for message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    root = logging.getLogger()
    for target in (logging.getLogger("absl"), root, *root.handlers):
        if not any(isinstance(f, HarmlessMessages) for f in target.filters):
            target.addFilter(HarmlessMessages())
