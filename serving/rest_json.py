"""TF Serving's REST JSON formats: JSON <-> request and response protos (TF Serving's json_tensor).

Predict requests carry tensors in row format (`"instances"`: one element per row, an object per
row when the signature has several inputs) or columnar format (`"inputs"`: one value, or an
object of named values); the answer comes back in the same format (`"predictions"` /
`"outputs"`, an object per row or of named outputs when there are several). Classify and Regress
take `"examples"` (and an optional `"context"`) as JSON objects of features and answer
`"results"`. A string value `{"b64": "..."}` is base64 bytes; outputs whose name ends in
`_bytes` are written that way. Floats may be `NaN`, `Infinity`, `-Infinity`. Errors are
`{"error": "..."}` with TF Serving's messages.

Every conversion raises `ServingError(INVALID_ARGUMENT, ...)` for what TF Serving refuses.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any, Mapping

import grpc
import numpy as np
from google.protobuf import json_format
from tensorflow.core.example import example_pb2, feature_pb2
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2

from serving.status import ServingError
from serving.tensors import decode_tensor, encode_tensor

ROW, COLUMNAR = "row", "columnar"  # the Predict request formats
SIGNATURE_KEY, INSTANCES_KEY, INPUTS_KEY = "signature_name", "instances", "inputs"
PREDICTIONS_KEY, OUTPUTS_KEY = "predictions", "outputs"
CONTEXT_KEY, EXAMPLES_KEY, RESULTS_KEY, ERROR_KEY = "context", "examples", "results", "error"
BASE64_KEY = "b64"
BYTES_SUFFIX = "_bytes"

# TensorFlow's DataTypeString names, used in TF Serving's messages.
_TYPE_NAMES = {
    types_pb2.DT_FLOAT: "float", types_pb2.DT_DOUBLE: "double", types_pb2.DT_INT32: "int32",
    types_pb2.DT_INT16: "int16", types_pb2.DT_INT8: "int8", types_pb2.DT_UINT8: "uint8",
    types_pb2.DT_STRING: "string", types_pb2.DT_INT64: "int64", types_pb2.DT_BOOL: "bool",
    types_pb2.DT_UINT32: "uint32", types_pb2.DT_UINT64: "uint64", types_pb2.DT_HALF: "half",
}
_NUMPY = {
    types_pb2.DT_FLOAT: np.float32, types_pb2.DT_DOUBLE: np.float64, types_pb2.DT_INT32: np.int32,
    types_pb2.DT_INT16: np.int16, types_pb2.DT_INT8: np.int8, types_pb2.DT_UINT8: np.uint8,
    types_pb2.DT_STRING: object, types_pb2.DT_INT64: np.int64, types_pb2.DT_BOOL: np.bool_,
    types_pb2.DT_UINT32: np.uint32, types_pb2.DT_UINT64: np.uint64,
}
_INT_RANGES = {
    types_pb2.DT_INT32: (-2**31, 2**31 - 1), types_pb2.DT_INT16: (-2**15, 2**15 - 1),
    types_pb2.DT_INT8: (-2**7, 2**7 - 1), types_pb2.DT_UINT8: (0, 2**8 - 1),
    types_pb2.DT_INT64: (-2**63, 2**63 - 1), types_pb2.DT_UINT32: (0, 2**32 - 1), types_pb2.DT_UINT64: (0, 2**64 - 1),
}
_MAX_EXACT_INT = {types_pb2.DT_FLOAT: 2**24 - 1, types_pb2.DT_DOUBLE: 2**53 - 1}
_MAX_FLOAT = {types_pb2.DT_FLOAT: float(np.finfo(np.float32).max), types_pb2.DT_DOUBLE: float(np.finfo(np.float64).max)}


def _invalid(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _text(value) -> str:
    """A JSON value as compact JSON text, for messages."""
    return json.dumps(value, separators=(",", ":"))


def _json_type(value) -> str:
    if value is None:
        return "Null"
    if value is True:
        return "True"
    if value is False:
        return "False"
    if isinstance(value, dict):
        return "Object"
    if isinstance(value, list):
        return "Array"
    return "String" if isinstance(value, str) else "Number"


def _type_name(dtype: int) -> str:
    return _TYPE_NAMES.get(dtype, types_pb2.DataType.Name(dtype) if dtype in types_pb2.DataType.values() else str(dtype))


def parse_json(body: bytes) -> dict:
    """The request body as a JSON object (NaN and Infinity accepted)."""
    if not body.strip():
        raise _invalid("JSON Parse error: The document is empty")
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _invalid(f"JSON Parse error: {e}") from None
    if not isinstance(document, dict):
        raise _invalid(f"JSON Value: {_text(document)} Is not object")
    return document


def signature_name(document: Mapping) -> str:
    """The request's optional `signature_name` ("" when absent)."""
    value = document.get(SIGNATURE_KEY, "")
    if not isinstance(value, str):
        raise _invalid(f"JSON Value: {_text(document)} not formatted correctly. "
                       "'signature_name' key must be a string value.")
    return value


def _is_base64(value) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get(BASE64_KEY), str)


def _decode_base64(value) -> bytes:
    if not _is_base64(value):
        raise _invalid(f"JSON Value: {_text(value)} not formatted correctly for base64 data")
    try:
        return base64.b64decode(value[BASE64_KEY], validate=True)
    except (binascii.Error, ValueError):
        raise _invalid("Unable to base64 decode") from None


# ----------------------------------------------------------------------------------------------
# JSON values -> tensors.


def _scalar(value, dtype: int):
    """One JSON leaf as a value of `dtype`."""
    def type_error():
        return _invalid(f"JSON Value: {_text(value)} Type: {_json_type(value)} is not of expected type: "
                        f"{_type_name(dtype)}")

    if isinstance(value, dict):
        if dtype == types_pb2.DT_STRING:
            return _decode_base64(value)
        raise type_error()
    if dtype in (types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise type_error()
        lossless = (abs(value) <= _MAX_EXACT_INT[dtype] if isinstance(value, int)
                    else not math.isfinite(value) or abs(value) <= _MAX_FLOAT[dtype])
        if not lossless:
            raise _invalid(f"Cannot convert JSON value: {_text(value)} to {_type_name(dtype)} without loss of precision.")
        return value
    if dtype in _INT_RANGES:
        low, high = _INT_RANGES[dtype]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise type_error()
        return value
    if dtype == types_pb2.DT_STRING:
        if not isinstance(value, str):
            raise type_error()
        return value.encode("utf-8")
    if dtype == types_pb2.DT_BOOL:
        if not isinstance(value, bool):
            raise type_error()
        return value
    raise ServingError(grpc.StatusCode.UNIMPLEMENTED,
                       f"Conversion of JSON Value: {_text(value)} to type: {_type_name(dtype)}")


def _dense_shape(value) -> list[int]:
    """The shape a nested JSON list declares (from its first elements)."""
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def _fill(value, level: int, shape: list[int], dtype: int, out: list) -> None:
    rank = len(shape)
    if not isinstance(value, list):
        if level != rank:
            raise _invalid(f"JSON Value: {_text(value)} found at incorrect level: {level + 1} in the JSON DOM. "
                           f"Expected at level: {rank}")
        out.append(_scalar(value, dtype))
        return
    if level >= rank:
        raise _invalid(f"Encountered list at unexpected level: {level} expected < {rank}")
    if len(value) != shape[level]:
        raise _invalid(f"Encountered list at unexpected size: {len(value)} at level: {level} "
                       f"expected size: {shape[level]}")
    for element in value:
        _fill(element, level + 1, shape, dtype, out)


def json_to_array(value, dtype: int) -> np.ndarray:
    """A JSON value (scalar or nested lists) as an array of `dtype`."""
    shape = _dense_shape(value)
    values: list = []
    _fill(value, 0, shape, dtype, values)
    kind = _NUMPY.get(dtype)
    if kind is None:
        raise ServingError(grpc.StatusCode.UNIMPLEMENTED, f"Conversion of JSON to type: {_type_name(dtype)}")
    array = np.empty(len(values), dtype=kind)
    array[:] = values
    return array.reshape(shape)


def _instance_item(value, name: str, dtypes: Mapping[str, int], shapes: dict, columns: dict) -> None:
    if name not in dtypes:
        raise _invalid(f"JSON object: does not have named input: {name}")
    array = json_to_array(value, dtypes[name])
    if name in shapes and shapes[name] != array.shape:
        first = shapes[name]
        if math.prod(first) != array.size:
            raise _invalid(f"Expecting tensor size: {math.prod(first)} but got: {array.size}")
        raise _invalid(f"Expecting shape [{','.join(map(str, first))}] but got: [{','.join(map(str, array.shape))}]")
    shapes[name] = array.shape
    columns.setdefault(name, []).append(array)


def _is_named_object(value) -> bool:
    return isinstance(value, dict) and not _is_base64(value)


def _instances(instances: list, dtypes: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Row format: one element per row; rows stacked along a new dimension 0."""
    by_name = _is_named_object(instances[0])
    if not by_name and len(dtypes) > 1:
        raise _invalid("instances is a plain list, but expecting list of objects as multiple input tensors "
                       "required as per tensorinfo_map")
    names = sorted(dtypes)
    shapes: dict = {}
    columns: dict[str, list] = {}
    for index, element in enumerate(instances):
        if by_name:
            if not _is_named_object(element):
                raise _invalid(f"Expecting object but got list at item {index} of input list")
            for name, value in element.items():
                try:
                    _instance_item(value, name, dtypes, shapes, columns)
                except ServingError as e:
                    raise _invalid(f"Failed to process element: {index} key: {name} of 'instances' list. "
                                   f"Error: {e.code.name}: {e.message}") from None
            if sorted(element) != names:
                raise _invalid(f"Failed to process element: {index} of 'instances' list. JSON object: "
                               f"{_text(element)} keys must be equal to: {','.join(names)}")
        else:
            if _is_named_object(element):
                raise _invalid(f"Expecting value/list but got object at item {index} of input list")
            try:
                _instance_item(element, names[0], dtypes, shapes, columns)
            except ServingError as e:
                raise _invalid(f"Failed to process element: {index} of 'instances' list. "
                               f"Error: {e.code.name}: {e.message}") from None
    return {name: np.stack(arrays) for name, arrays in columns.items()}


def _columns(inputs, dtypes: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Columnar format: one value for the only input, or an object of named inputs."""
    if not _is_named_object(inputs):
        if len(dtypes) > 1:
            raise _invalid("inputs is a plain value/list, but expecting an object as multiple input tensors "
                           "required as per tensorinfo_map")
        (name,) = dtypes
        return {name: json_to_array(inputs, dtypes[name])}
    arrays = {}
    for name, dtype in sorted(dtypes.items()):
        if name not in inputs:
            raise _invalid(f"Missing named input: {name} in 'inputs' object.")
        arrays[name] = json_to_array(inputs[name], dtype)
    return arrays


def fill_predict_request(document: Mapping, request: predict_pb2.PredictRequest,
                         inputs: Mapping[str, meta_graph_pb2.TensorInfo]) -> str:
    """Fills `request.inputs` from a Predict body; returns its format (ROW or COLUMNAR).

    `inputs` are the signature's input TensorInfos (their dtypes type the JSON values).
    """
    if not inputs:
        raise _invalid(f"Failed to get input map for signature: {request.model_spec.signature_name or 'DEFAULT'}")
    dtypes = {name: info.dtype for name, info in inputs.items()}
    has_instances, has_inputs = INSTANCES_KEY in document, INPUTS_KEY in document
    if has_instances and has_inputs:
        raise _invalid(f"JSON Value: {_text(document)} Not formatted correctly expecting only one of "
                       f"'{INPUTS_KEY}' or '{INSTANCES_KEY}' keys to exist ")
    if has_instances:
        instances = document[INSTANCES_KEY]
        if not isinstance(instances, list):
            raise _invalid(f"JSON Value: {_text(document)} Excepting '{INSTANCES_KEY}' to be an list/array")
        if not instances:
            raise _invalid(f"JSON Value: {_text(document)} No values in '{INSTANCES_KEY}' array")
        arrays, kind = _instances(instances, dtypes), ROW
    elif has_inputs:
        arrays, kind = _columns(document[INPUTS_KEY], dtypes), COLUMNAR
    else:
        raise _invalid(f"Missing '{INPUTS_KEY}' or '{INSTANCES_KEY}' key")
    for name, array in arrays.items():
        request.inputs[name].CopyFrom(encode_tensor(array))
    return kind


def _feature(name: str, value) -> feature_pb2.Feature:
    feature = feature_pb2.Feature()
    for element in value if isinstance(value, list) else [value]:
        if isinstance(element, bool):
            kind, converted = "int64_list", int(element)
        elif isinstance(element, float):
            if math.isfinite(element) and abs(element) > _MAX_FLOAT[types_pb2.DT_FLOAT]:
                raise _invalid(f"Cannot convert JSON value: {_text(element)} to float without loss of precision.")
            kind, converted = "float_list", element
        elif isinstance(element, int):
            if not -2**63 <= element < 2**63:
                raise _invalid(f"Feature: {name} has uint64 element. Only int64 is supported.")
            kind, converted = "int64_list", element
        elif isinstance(element, str):
            kind, converted = "bytes_list", element.encode("utf-8")
        elif _is_base64(element):
            kind, converted = "bytes_list", _decode_base64(element)
        else:
            raise _invalid(f"Feature: {name} has element with unexpected JSON type: {_json_type(element)}")
        current = feature.WhichOneof("kind")
        if current is not None and current != kind:
            expected = {"bytes_list": "bytes", "float_list": "float", "int64_list": "int64"}[current]
            raise _invalid(f"Unexpected element type in feature: {name} expecting type: {expected}")
        getattr(feature, kind).value.append(converted)
    return feature


def _example(value, example: example_pb2.Example) -> None:
    if not isinstance(value, dict):
        raise _invalid(f"Example must be JSON object but got JSON {_json_type(value)}")
    for name, content in value.items():
        example.features.feature[name].CopyFrom(_feature(name, content))


def fill_examples(document: Mapping, input_proto) -> None:
    """Fills a Classify/Regress `Input` from the body's `examples` (and `context`)."""
    has_context = CONTEXT_KEY in document
    if has_context:
        _example(document[CONTEXT_KEY], input_proto.example_list_with_context.context)
    examples = document.get(EXAMPLES_KEY)
    if EXAMPLES_KEY not in document:
        raise _invalid(f"JSON Value: {_text(document)} When method is classify, key '{EXAMPLES_KEY}' is expected "
                       "and was not found")
    if not isinstance(examples, list):
        raise _invalid(f"JSON Value: {_text(document)} Expecting '{EXAMPLES_KEY}' value to be an list/array")
    if not examples:
        raise _invalid(f"JSON Value: {_text(document)} '{EXAMPLES_KEY}' value is an empty array")
    container = input_proto.example_list_with_context if has_context else input_proto.example_list
    for value in examples:
        _example(value, container.examples.add())


# ----------------------------------------------------------------------------------------------
# Responses -> JSON.


def _float_token(value) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "-Infinity" if value < 0 else "Infinity"
    text = str(value)  # NumPy's shortest text that reads back as the same float32 / float64
    return text if any(c in text for c in ".e") else text + ".0"


def _tokens(array: np.ndarray, as_bytes: bool) -> list[str]:
    flat = array.reshape(-1)
    if array.dtype == object:
        if as_bytes:
            return [_text({BASE64_KEY: base64.b64encode(v).decode("ascii")}) for v in flat]
        return [json.dumps(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)) for v in flat]
    if array.dtype.kind == "f":
        return [_float_token(v) for v in flat]
    if array.dtype.kind == "b":
        return ["true" if v else "false" for v in flat]
    if array.dtype.kind in "iu":
        return [str(int(v)) for v in flat.tolist()]
    raise _invalid(f"Failed to write JSON value for tensor type: {array.dtype.name}")


def _nest(tokens: list[str], shape: tuple) -> str:
    if not shape:
        return tokens[0]
    if len(shape) == 1:
        return "[" + ",".join(tokens) + "]"
    step = math.prod(shape[1:])
    return "[" + ",".join(_nest(tokens[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])) + "]"


def _output_arrays(response: predict_pb2.PredictResponse) -> dict[str, np.ndarray]:
    return {name: decode_tensor(proto, [d.size for d in proto.tensor_shape.dim])
            for name, proto in sorted(response.outputs.items())}


def predict_response_json(response: predict_pb2.PredictResponse, kind: str) -> str:
    """`{"predictions": ...}` (ROW) or `{"outputs": ...}` (COLUMNAR)."""
    arrays = _output_arrays(response)
    if not arrays:
        raise _invalid("Cannot convert empty tensor map to JSON")
    tokens = {name: _tokens(array, name.endswith(BYTES_SUFFIX) and array.dtype == object)
              for name, array in arrays.items()}
    if kind == COLUMNAR:
        values = {name: _nest(tokens[name], array.shape) for name, array in arrays.items()}
        body = next(iter(values.values())) if len(values) == 1 else (
            "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in values.items()) + "}")
        return f'{{"{OUTPUTS_KEY}":{body}}}'
    batch = None
    for name, array in arrays.items():
        if array.ndim == 0:
            raise _invalid(f"Tensor name: {name} has no shape information ")
        if batch is not None and array.shape[0] != batch:
            raise _invalid(f"Tensor name: {name} has inconsistent batch size: {array.shape[0]} expecting: {batch}")
        batch = array.shape[0]
    rows = []
    for i in range(batch):
        cells = {}
        for name, array in arrays.items():
            step = math.prod(array.shape[1:])
            cells[name] = _nest(tokens[name][i * step:(i + 1) * step], array.shape[1:])
        rows.append(next(iter(cells.values())) if len(cells) == 1 else
                    "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in cells.items()) + "}")
    return f'{{"{PREDICTIONS_KEY}":[' + ",".join(rows) + "]}"


def classification_json(result) -> str:
    """`{"results": [[[label, score], ...] per example]}`."""
    if not result.classifications:
        raise _invalid("Cannot convert empty ClassificationResults to JSON")
    rows = ["[" + ",".join(f"[{json.dumps(c.label)},{_float_token(np.float32(c.score))}]" for c in row.classes) + "]"
            for row in result.classifications]
    return f'{{"{RESULTS_KEY}":[' + ",".join(rows) + "]}"


def regression_json(result) -> str:
    """`{"results": [value per example]}`."""
    if not result.regressions:
        raise _invalid("Cannot convert empty RegressionResults to JSON")
    return f'{{"{RESULTS_KEY}":[' + ",".join(_float_token(np.float32(r.value)) for r in result.regressions) + "]}"


def _message_dict(message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def status_json(response) -> str:
    """A GetModelStatusResponse as TF Serving prints it (proto field names, every field)."""
    return json.dumps(_message_dict(response), indent=1)


def metadata_json(response: get_model_metadata_pb2.GetModelMetadataResponse, field: str) -> str:
    """`{"model_spec": ..., "metadata": {"signature_def": <SignatureDefMap>}}`, as TF Serving composes it."""
    signature_defs = get_model_metadata_pb2.SignatureDefMap()
    response.metadata[field].Unpack(signature_defs)
    return json.dumps({"model_spec": _message_dict(response.model_spec),
                       "metadata": {field: _message_dict(signature_defs)}}, indent=1)


def error_json(message: str) -> str:
    return json.dumps({ERROR_KEY: message})
