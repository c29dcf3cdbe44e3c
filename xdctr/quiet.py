"""Known-harmless noise of the libraries under xdctr, silenced unless `xdctr -v` asks for it.

What is silenced, and why it is harmless here:
- TensorFlow's C++ log lines: its info lines (oneDNN notices, "Could not find cuda drivers"), its
  error-level notice that oneDNN falls back to Eigen for bool tensors without AVX-512 (a CPU
  feature note: the op still runs), CUDA
  probing on a machine without a GPU ("failed call to cuInit" and the other `cuda_*` lines) and
  absl's "All log messages before absl::InitializeLog()". TensorFlow 2.21 writes these to file
  descriptor 2 before its log level (`TF_CPP_MIN_LOG_LEVEL`) applies, so standard error is passed
  through a line filter (`StderrFilter`) that drops only lines of those shapes; everything else,
  Python tracebacks included, goes through unchanged.
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

import atexit
import logging
import os
import re
import sys
import threading
import warnings

QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "GRPC_VERBOSITY": "ERROR"}
HARMLESS_LOG_MESSAGES = re.compile(
    r"ArtifactQuery\.property_predicate is not supported"
    r"|Fallback to non-ZetaSQL contexts execution query"
    r"|tf_record_iterator \(from tensorflow\.python\.lib\.io\.tf_record\) is deprecated"
)
# C++ log lines (absl format: level letter, MMDD, time, thread, file:line]) that are noise here.
HARMLESS_NATIVE_LINES = re.compile(
    rb"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"
    rb"|^I\d{4} [\d:. ]+\d+ [\w.]+:\d+\] "
    rb"|^[WE]\d{4} [\d:. ]+\d+ (cuda_\w+|cudart_stub|gpu_\w+)\.cc:\d+\] "
    rb"|^E\d{4} [\d:. ]+\d+ util\.cc:\d+\] oneDNN supports DT_BOOL only on platforms with AVX-512\. "
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


class StderrFilter:
    """Passes file descriptor 2 through a thread that drops the lines `HARMLESS_NATIVE_LINES` matches.

    Child processes inherit the filtered descriptor. At exit the original descriptor is restored
    and what is still in the pipe is written out, so a last traceback is never lost.
    """

    def __init__(self, pattern=HARMLESS_NATIVE_LINES):
        self.pattern = pattern
        self._original = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self._reader = os.fdopen(read, "rb", buffering=0)
        self._thread = threading.Thread(target=self._forward, name="stderr-filter", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def _forward(self):
        pending = b""
        while True:
            chunk = self._reader.read(65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            kept = [line + b"\n" for line in lines if not self.pattern.search(line)]
            if kept:
                os.write(self._original, b"".join(kept))
        if pending and not self.pattern.search(pending):
            os.write(self._original, pending)

    def close(self, timeout: float = 2.0):
        """Restores descriptor 2; the thread drains the pipe (children may still hold it: bounded wait)."""
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self._original, 2)
        self._thread.join(timeout)


_stderr_filter = None


def configure(verbose: bool) -> None:
    """Silences the known-harmless noise, unless `verbose`; idempotent."""
    global _stderr_filter
    if verbose:
        return
    if _stderr_filter is None and "pytest" not in sys.modules:  # pytest captures fd 2 itself
        _stderr_filter = StderrFilter()
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    for message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    root = logging.getLogger()
    for target in (logging.getLogger("absl"), root, *root.handlers):
        if not any(isinstance(f, HarmlessMessages) for f in target.filters):
            target.addFilter(HarmlessMessages())
