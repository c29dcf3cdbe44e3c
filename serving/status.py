"""Status codes of the scoring service: `ServingError`, and the status any failure is answered with.

Every layer (version manager, inference, admin, the gRPC and REST frontends) raises
`ServingError(code, message)` for what it refuses; `status_of` maps any other exception to the
status TF Serving would answer: a TensorFlow op error keeps its own code, anything unexpected is
`default` (INTERNAL for requests, UNKNOWN for loads).
"""

from __future__ import annotations

import re

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


def op_error_cause(message: str) -> str:
    """The cause in a TensorFlow op error's message, on one line, without the Python stacks.

    TensorFlow's messages wrap the cause ("Could not parse example input, ...") in "Graph execution
    error:", "Detected at node X defined at (most recent call last):" with the Python stack where the
    node was created (the server's own, for a graph loaded here), and "Original stack trace for X:".
    TF Serving answers with the cause and the node only.
    """
    kept, in_stack = [], False
    for line in message.splitlines():
        if line.startswith("Original stack trace for"):
            break  # the rest is a stack
        if line.startswith("Graph execution error"):
            continue
        if line.startswith("Detected at node"):
            in_stack = True
            continue
        if in_stack and (not line.strip() or line.startswith(" ") or line == "<stack traces unavailable>"):
            continue  # "  File ..., line N, in f" and its source line
        in_stack = False
        if line.startswith("Node: "):
            continue  # repeats the node of the cause
        kept.append(line)
    cause = one_line(" ".join(kept))
    cause = re.sub(r" \[Op:__inference_[^\]]*\]$", "", cause)  # the Python function that raised
    return cause or one_line(message)


def status_of(error: BaseException, default: grpc.StatusCode = grpc.StatusCode.INTERNAL) -> tuple[grpc.StatusCode, str]:
    """(code, one-line message) to answer `error` with."""
    if isinstance(error, ServingError):
        return error.code, error.message
    if isinstance(error, tf.errors.OpError):  # e.g. a malformed serialized tf.Example
        return CODES.get(error.error_code, grpc.StatusCode.UNKNOWN), op_error_cause(error.message)
    if isinstance(error, FileNotFoundError):
        return grpc.StatusCode.NOT_FOUND, one_line(error)
    return default, one_line(f"{type(error).__name__}: {error}")
