"""Loading one SavedModel version directory into something that runs its signatures.

A version directory is TF Serving's `<base_path>/<version>/` holding `saved_model.pb` (plus
`variables/`, `assets/`, `assets.extra/`). `load_version` reads the `SignatureDef`s, loads the
model and wraps each signature as a `Signature`: input specs, output names, whether dynamic
batching may merge its calls, and `run(arrays) -> arrays`. Two kinds of SavedModel, as TF Serving
loads both:

- TF2 (`tf.saved_model.save`, an object graph): loaded with `tf.saved_model.load`; a signature is
  a concrete function.
- TF1 graphs (`tf.compat.v1.saved_model.Builder`, no object graph): loaded into a
  `tf.compat.v1.Session` as TF Serving's C++ loader does (variables restored, init op and assets
  run), since `tf.saved_model.load` cannot wrap every TF1 graph in functions (reference variables,
  placeholders whose declared shape the graph's own ops reject). A signature is a session callable
  that feeds its input tensors and fetches its outputs.

Like TF Serving, a signature runs on inputs of any shape the graph computes with: declared
shapes (`[None, 1]`, a scalar placeholder) are not enforced, only dtypes (by the caller).
Both kinds call TensorFlow below its public API for that: concrete functions through
`_call_flat` (the public call checks inputs against the declared specs) and sessions through
`_make_callable_from_options` (the public `make_callable` checks feed shapes).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2, meta_graph_pb2, saved_model_pb2
from tensorflow.python.saved_model import loader_impl

from serving.monitoring import log_event
from serving.status import ServingError, one_line

logger = logging.getLogger(__name__)

SAVED_MODEL_FILE = "saved_model.pb"
SERVING_TAGS = [tf.saved_model.SERVING]


def join(base: str, name: str) -> str:
    """`base/name` for local paths and URIs alike."""
    return base.rstrip("/") + "/" + name


def _batch_dim_variable(shape: tf.TensorShape) -> bool:
    """True when dimension 0 may take any size (unknown rank included)."""
    return shape.rank is None or (shape.rank >= 1 and shape[0] is None)


class Signature:
    """One servable signature.

    Attributes:
      name: the signature key.
      input_specs: input name -> `tf.TensorSpec` (the dtype is enforced, the shape is not).
      output_names: the output names.
      batchable: every input and output may have any size in dimension 0, so dynamic batching
        may concatenate several calls' inputs along it.
    """

    def __init__(self, name: str, input_specs: Mapping[str, tf.TensorSpec], output_specs: Mapping[str, tf.TensorSpec]):
        self.name = name
        self.input_specs = dict(input_specs)
        self.output_names = list(output_specs)
        self.batchable = bool(input_specs) and all(
            _batch_dim_variable(spec.shape) for spec in [*input_specs.values(), *output_specs.values()]
        )

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs the signature on NumPy inputs (the input specs' dtypes); returns NumPy outputs."""
        try:
            return self._run(inputs)
        except UnicodeDecodeError as e:
            # TensorFlow cannot raise an op's error when the message quotes input bytes that are not
            # UTF-8 (parse_example does for a malformed serialized tf.Example): the op rejected the
            # request's input. The undecoded message is kept in the exception.
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, one_line(e.object.decode("utf-8", "backslashreplace")))

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


class FunctionSignature(Signature):
    """A signature of a TF2 SavedModel: a concrete function."""

    def __init__(self, name: str, function):
        _, specs = function.structured_input_signature  # (args, {name: TensorSpec})
        outputs = {k: v for k, v in function.structured_outputs.items()}
        super().__init__(name, specs, {k: tf.TensorSpec(v.shape, v.dtype) for k, v in outputs.items()})
        self._function = function
        order = list(function.function_type.parameters)  # the flat order of the function's inputs
        self._order = order if sorted(order) == sorted(specs) else None

    def _run(self, inputs):
        specs = self.input_specs
        tensors = {name: tf.convert_to_tensor(array, dtype=specs[name].dtype) for name, array in inputs.items()}
        if self._order is None:
            outputs = self._function(**tensors)
        else:
            outputs = self._function._call_flat([tensors[name] for name in self._order],
                                                self._function.captured_inputs)
        return {name: value.numpy() for name, value in outputs.items()}


def _tensor_info_spec(info: meta_graph_pb2.TensorInfo) -> tf.TensorSpec:
    dtype = tf.dtypes.as_dtype(info.dtype).base_dtype  # reference dtypes (a TF1 variable) as their values
    return tf.TensorSpec(tf.TensorShape(info.tensor_shape), dtype)


class SessionSignature(Signature):
    """A signature of a TF1 graph: a callable of the version's session feeding the input tensors."""

    def __init__(self, name: str, signature_def: meta_graph_pb2.SignatureDef, session):
        super().__init__(name, {k: _tensor_info_spec(v) for k, v in signature_def.inputs.items()},
                         {k: _tensor_info_spec(v) for k, v in signature_def.outputs.items()})
        self._feeds = sorted(signature_def.inputs)
        options = config_pb2.CallableOptions(
            feed=[signature_def.inputs[k].name for k in self._feeds],
            fetch=[signature_def.outputs[k].name for k in self.output_names],
        )
        self._callable = session._make_callable_from_options(options)

    def _run(self, inputs):
        values = self._callable(*[inputs[name] for name in self._feeds])
        return {name: np.asarray(value) for name, value in zip(self.output_names, values)}


@dataclasses.dataclass(frozen=True)
class LoadedVersion:
    """One loaded version of a SavedModel.

    Attributes:
      version: the integer version (the directory name).
      path: the version directory.
      signatures: signature name -> `Signature`.
      signature_defs: signature name -> `SignatureDef` proto, as written in `saved_model.pb`.
      saved_model: what keeps the model (and its variables) alive: the loaded object or the session.
    """

    version: int
    path: str
    signatures: Mapping[str, Signature]
    signature_defs: Mapping[str, meta_graph_pb2.SignatureDef]
    saved_model: Any


def read_saved_model(version_path: str) -> saved_model_pb2.SavedModel:
    """`<version_path>/saved_model.pb`; ValueError when it holds no MetaGraph."""
    saved_model = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(join(version_path, SAVED_MODEL_FILE), "rb") as f:
        saved_model.ParseFromString(f.read())
    if not saved_model.meta_graphs:
        raise ValueError(f"{version_path}/{SAVED_MODEL_FILE} holds no MetaGraph.")
    return saved_model


def _serving_meta_graph(saved_model: saved_model_pb2.SavedModel, path: str) -> meta_graph_pb2.MetaGraphDef:
    for meta_graph in saved_model.meta_graphs:
        if set(SERVING_TAGS) <= set(meta_graph.meta_info_def.tags):
            return meta_graph
    tags = [list(m.meta_info_def.tags) for m in saved_model.meta_graphs]
    raise ValueError(f"{path}/{SAVED_MODEL_FILE} has no MetaGraph tagged {SERVING_TAGS}; its tags: {tags}")


def _relax_shapes(graph_def) -> None:
    """Drops the graph's recorded shapes and placeholder shapes: hints TF Serving never enforces.

    Importing validates them, and old exports hold some their own ops reject (a rank-0
    placeholder feeding ParseExample); a fed tensor may take any shape its consumers accept.
    """
    for node in graph_def.node:
        node.attr.pop("_output_shapes", None)
        if node.op in ("Placeholder", "PlaceholderWithDefault") and "shape" in node.attr:
            node.attr["shape"].shape.Clear()
            node.attr["shape"].shape.unknown_rank = True


def _load_tf1(path: str) -> tuple[Any, dict[str, meta_graph_pb2.SignatureDef], dict[str, Signature]]:
    loader = loader_impl.SavedModelLoader(path)
    meta_graph = loader.get_meta_graph_def_from_tags(SERVING_TAGS)  # the loader's own copy: relaxed in place
    _relax_shapes(meta_graph.graph_def)
    graph = tf.Graph()
    config = tf.compat.v1.ConfigProto(
        allow_soft_placement=True,
        intra_op_parallelism_threads=tf.config.threading.get_intra_op_parallelism_threads(),
        inter_op_parallelism_threads=tf.config.threading.get_inter_op_parallelism_threads(),
    )
    session = tf.compat.v1.Session(graph=graph, config=config)
    with graph.as_default():
        loader.load(session, SERVING_TAGS, clear_devices=True)
    signature_defs, signatures = {}, {}
    for name, signature_def in meta_graph.signature_def.items():
        tensors = [*signature_def.inputs.values(), *signature_def.outputs.values()]
        if any(info.WhichOneof("encoding") != "name" for info in tensors):
            log_event(logger, logging.WARNING, "signature_not_served", path=path, signature=name,
                      reason="sparse or composite tensors")
            continue
        signature_defs[name] = signature_def
        signatures[name] = SessionSignature(name, signature_def, session)
    return session, signature_defs, signatures


def load_version(version: int, path: str) -> LoadedVersion:
    """Loads one version directory (no warmup); raises on any problem."""
    if not tf.io.gfile.exists(join(path, SAVED_MODEL_FILE)):
        raise FileNotFoundError(f"no {SAVED_MODEL_FILE} in {path}")
    saved_model = read_saved_model(path)
    meta_graph = _serving_meta_graph(saved_model, path)
    if not meta_graph.object_graph_def.nodes:  # a TF1 graph
        session, signature_defs, signatures = _load_tf1(path)
        return LoadedVersion(version, path, signatures, signature_defs, session)
    loaded = tf.saved_model.load(path, tags=SERVING_TAGS)
    signatures = {name: FunctionSignature(name, function) for name, function in loaded.signatures.items()}
    # `saved_model.pb` also lists internal signatures (`__saved_model_init_op`); serve what loads.
    signature_defs = {name: meta_graph.signature_def[name] for name in signatures if name in meta_graph.signature_def}
    return LoadedVersion(version, path, signatures, signature_defs, loaded)
