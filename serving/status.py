"""Status codes of the scoring service: `ServingError`, and the status any failure is answered with.

Every layer (version manager, inference, admin, the gRPC and REST frontends) raises
`ServingError(code, message)` for what it refuses; `status_of` maps any other exception to the
status TF Serving would answer: a TensorFlow op error keeps its own code, anything unexpected is
`default` (INTERNAL for requests, UNKNOWN for loads).
"""

from __future__ import annotations

import grpc
import tensorflow as tf

CODES = {code.value[0]: code for code in grpc.StatusCode}  # int -> grpc.StatusCode


class ServingError(Exception):
    """A request (or load) the server refuses, with the gRPC status code to answer it with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def one_line(text) -> str:
    """`text` with every run of whitespace (newlines included) as one space."""
    return " ".join(str(text).split())


def status_of(error: BaseException, default: grpc.StatusCode = grpc.StatusCode.INTERNAL) -> tuple[grpc.StatusCode, str]:
    """(code, one-line message) to answer `error` with."""
    if isinstance(error, ServingError):
        return error.code, error.message
    if isinstance(error, tf.errors.OpError):  # e.g. a malformed serialized tf.Example
        return CODES.get(error.error_code, grpc.StatusCode.UNKNOWN), one_line(error.message)
    if isinstance(error, FileNotFoundError):
        return grpc.StatusCode.NOT_FOUND, one_line(error)
    return default, one_line(f"{type(error).__name__}: {error}")
