"""Request decoding and response encoding: TensorProto <-> NumPy, tf.Example inputs.

Shared by the gRPC and REST frontends (REST requests are turned into the same protos first), so
both check requests the same way and answer with the same errors.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

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


# dtype -> (TensorProto field of its values, NumPy dtype): the typed fields TF Serving reads and fills.
_FIELDS = {
    types_pb2.DT_FLOAT: ("float_val", np.float32),
    types_pb2.DT_DOUBLE: ("double_val", np.float64),
    types_pb2.DT_INT32: ("int_val", np.int32),
    types_pb2.DT_INT16: ("int_val", np.int16),
    types_pb2.DT_INT8: ("int_val", np.int8),
    types_pb2.DT_UINT8: ("int_val", np.uint8),
    types_pb2.DT_UINT16: ("int_val", np.uint16),
    types_pb2.DT_INT64: ("int64_val", np.int64),
    types_pb2.DT_UINT32: ("uint32_val", np.uint32),
    types_pb2.DT_UINT64: ("uint64_val", np.uint64),
    types_pb2.DT_BOOL: ("bool_val", np.bool_),
}
_DTYPES = {np.dtype(kind): dtype for dtype, (_, kind) in _FIELDS.items()}


def decode_tensor(proto: tensor_pb2.TensorProto, shape: list[int]) -> np.ndarray:
    """A TensorProto's values as an array of `shape`, with TensorFlow's rules.

    Values come from `tensor_content` (exactly the shape's bytes) or the typed field: none means
    zeros, fewer than the shape holds repeat the last one, more are an error. Dtypes without a
    typed field here (half, bfloat16, complex) go through `tf.make_ndarray`.
    """
    count = math.prod(shape)
    if proto.dtype == types_pb2.DT_STRING:
        values = list(proto.string_val)
        kind = object
    elif proto.dtype in _FIELDS:
        field, kind = _FIELDS[proto.dtype]
        if proto.tensor_content:
            array = np.frombuffer(proto.tensor_content, dtype=kind)
            if array.size != count:
                raise ValueError(f"tensor_content holds {array.size} values; the shape {shape} needs {count}")
            return array.reshape(shape)
        values = getattr(proto, field)
    else:
        return tf.make_ndarray(proto)
    if len(values) > count:
        raise ValueError(f"{len(values)} values for shape {shape} ({count} elements)")
    array = np.empty(count, dtype=kind)
    if not len(values):
        array[:] = b"" if kind is object else 0
    else:
        array[:len(values)] = values
        array[len(values):] = values[-1]
    return array.reshape(shape)


def decode_inputs(protos: Mapping[str, tensor_pb2.TensorProto], input_specs, signature_name: str,
                  limits: RequestLimits) -> dict[str, np.ndarray]:
    """The request's TensorProtos as arrays, checked against the signature's dtypes and the size limits.

    Shapes are the request's: as in TF Serving, a signature's declared shapes are not enforced
    (the graph rejects what it cannot compute).
    """
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
            arrays[name] = decode_tensor(proto, dims)
        except Exception as e:  # TypeError/ValueError for contents that do not match the shape
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"tensor parsing error: {name}: {one_line(e)}")
    return arrays


def encode_tensor(array: np.ndarray, proto: Optional[tensor_pb2.TensorProto] = None) -> tensor_pb2.TensorProto:
    """A TensorProto of an output array (filled into `proto` when given), values in the typed field
    (`float_val`, ...) as TF Serving fills them."""
    array = np.asarray(array)
    dtype = _DTYPES.get(array.dtype)
    if proto is None:
        proto = tensor_pb2.TensorProto()
    if dtype is None and array.dtype != object:
        proto.CopyFrom(tf.make_tensor_proto(array))  # half, bfloat16, complex: tensor_content
        return proto
    proto.dtype = types_pb2.DT_STRING if dtype is None else dtype
    proto.tensor_shape.dim.extend(tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in array.shape)
    if dtype is None:  # strings
        proto.string_val.extend(v if isinstance(v, bytes) else str(v).encode() for v in array.reshape(-1))
    else:
        getattr(proto, _FIELDS[dtype][0]).extend(array.reshape(-1).tolist())
    return proto


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
