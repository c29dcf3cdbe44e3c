"""Request decoding and response encoding: TensorProto <-> NumPy, tf.Example inputs.

Shared by the gRPC and REST frontends (REST requests are turned into the same protos first), so
both check requests the same way and answer with the same errors.
"""

from __future__ import annotations

import math
from typing import Mapping

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2

from serving.status import ServingError, one_line


def dtype_name(datatype: int) -> str:
    """"float32" for DT_FLOAT (the enum as TensorFlow names it)."""
    try:
        return tf.dtypes.as_dtype(datatype).name
    except TypeError:
        return f"<invalid dtype enum {datatype}>"


class RequestLimits:
    """How large one request may be (RESOURCE_EXHAUSTED above).

    Args:
      max_rows: rows (dimension 0) of one input.
      max_elements: elements over all decoded input tensors of one request (a TensorProto can
        declare a huge shape with one value).
    """

    def __init__(self, max_rows: int, max_elements: int):
        self.max_rows = max_rows
        self.max_elements = max_elements

    def too_many_rows(self, what: str, rows: int) -> ServingError:
        return ServingError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{what} has {rows} rows; this server accepts at most {self.max_rows} per request (--max-request-rows).",
        )


def decode_inputs(protos: Mapping[str, tensor_pb2.TensorProto], input_specs, signature_name: str,
                  limits: RequestLimits) -> dict[str, np.ndarray]:
    """The request's TensorProtos as arrays, checked against the signature and the size limits."""
    arrays = {}
    elements = 0
    for name, spec in input_specs.items():
        proto = protos[name]
        if proto.dtype != spec.dtype.as_datatype_enum:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Input {name!r} of signature {signature_name!r} expects dtype {spec.dtype.name} "
                f"but {dtype_name(proto.dtype)} was provided.",
            )
        dims = [dim.size for dim in proto.tensor_shape.dim]
        if proto.tensor_shape.unknown_rank or any(d < 0 for d in dims):
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT, f"tensor parsing error: {name} (shape {dims} is not fully defined)"
            )
        if dims and dims[0] > limits.max_rows:
            raise limits.too_many_rows(f"Input {name!r}", dims[0])
        elements += math.prod(dims)
        if elements > limits.max_elements:
            raise ServingError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"The request's inputs hold more than {limits.max_elements} elements "
                "(max_request_elements of this server).",
            )
        try:
            array = tf.make_ndarray(proto)
        except Exception as e:  # TypeError/ValueError for contents that do not match the shape
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"tensor parsing error: {name}: {one_line(e)}")
        if not spec.shape.is_compatible_with(array.shape):
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Input {name!r} of signature {signature_name!r} expects shape {spec.shape} "
                f"but {list(array.shape)} was provided.",
            )
        arrays[name] = array
    return arrays


def encode_tensor(array: np.ndarray) -> tensor_pb2.TensorProto:
    """A TensorProto of an output array."""
    return tf.make_tensor_proto(array)


def serialized_examples(input_proto, limits: RequestLimits) -> np.ndarray:
    """Serialized tf.Examples of a Classify/Regress `Input` (context merged as TF Serving does), (batch,)."""
    kind = input_proto.WhichOneof("kind")
    if kind == "example_list":
        serialized = [example.SerializeToString() for example in input_proto.example_list.examples]
    elif kind == "example_list_with_context":
        # Concatenated serializations parse as a merge: the example's features win over the context's.
        context = input_proto.example_list_with_context.context.SerializeToString()
        examples = input_proto.example_list_with_context.examples
        serialized = [context + example.SerializeToString() for example in examples]
    else:
        serialized = []
    if not serialized:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Input is empty.")
    if len(serialized) > limits.max_rows:
        raise limits.too_many_rows("Input", len(serialized))
    array = np.empty(len(serialized), dtype=object)  # (batch,)
    array[:] = serialized
    return array
