"""Loading one SavedModel version directory into something that runs its signatures.

A version directory is TF Serving's `<base_path>/<version>/` holding `saved_model.pb` (plus
`variables/`, `assets/`, `assets.extra/`). `load_version` reads the `SignatureDef`s, loads the
model and wraps each signature as a `Signature`: its input specs, output names, whether dynamic
batching may merge its calls, and `run(arrays) -> arrays`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from serving.status import ServingError, one_line

SAVED_MODEL_FILE = "saved_model.pb"


def join(base: str, name: str) -> str:
    """`base/name` for local paths and URIs alike."""
    return base.rstrip("/") + "/" + name


class Signature:
    """One servable signature of a loaded TF2 SavedModel (a concrete function).

    Attributes:
      name: the signature key.
      input_specs: input name -> `tf.TensorSpec` (dtype and shape from the function).
      output_names: the output names, in the function's order.
      batchable: every input and output has a variable dimension 0, so dynamic batching may
        concatenate several calls' inputs along it.
    """

    def __init__(self, name: str, function):
        self.name = name
        self._function = function
        _, specs = function.structured_input_signature  # (args, {name: TensorSpec})
        self.input_specs: dict[str, tf.TensorSpec] = dict(specs)
        self.output_names: list[str] = list(function.structured_outputs)
        self.batchable = _is_batchable(function)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs the signature on NumPy inputs; returns NumPy outputs."""
        specs = self.input_specs
        tensors = {name: tf.convert_to_tensor(array, dtype=specs[name].dtype) for name, array in inputs.items()}
        try:
            outputs = self._function(**tensors)
        except UnicodeDecodeError as e:
            # TensorFlow cannot raise an op's error when the message quotes input bytes that are not
            # UTF-8 (parse_example does for a malformed serialized tf.Example): the op rejected the
            # request's input. The undecoded message is kept in the exception.
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, one_line(e.object.decode("utf-8", "backslashreplace")))
        return {name: value.numpy() for name, value in outputs.items()}


def _is_batchable(function) -> bool:
    _, input_specs = function.structured_input_signature
    specs = list(input_specs.values()) + list(function.structured_outputs.values())
    return bool(input_specs) and all(
        isinstance(spec, tf.TensorSpec) and spec.shape.rank and spec.shape[0] is None for spec in specs
    )


@dataclasses.dataclass(frozen=True)
class LoadedVersion:
    """One loaded version of a SavedModel.

    Attributes:
      version: the integer version (the directory name).
      path: the version directory.
      signatures: signature name -> `Signature`.
      signature_defs: signature name -> `SignatureDef` proto, as written in `saved_model.pb`.
      saved_model: what keeps the loaded model (and its variables) alive.
    """

    version: int
    path: str
    signatures: Mapping[str, Signature]
    signature_defs: Mapping[str, meta_graph_pb2.SignatureDef]
    saved_model: Any

    @property
    def batchable(self) -> frozenset:
        """Names of the signatures dynamic batching may merge; the others always run alone."""
        return frozenset(name for name, signature in self.signatures.items() if signature.batchable)


def read_signature_defs(version_path: str) -> dict[str, meta_graph_pb2.SignatureDef]:
    """The `SignatureDef`s of the first MetaGraph in `<version_path>/saved_model.pb`."""
    saved_model = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(join(version_path, SAVED_MODEL_FILE), "rb") as f:
        saved_model.ParseFromString(f.read())
    if not saved_model.meta_graphs:
        raise ValueError(f"{version_path}/{SAVED_MODEL_FILE} holds no MetaGraph.")
    return dict(saved_model.meta_graphs[0].signature_def)


def load_version(version: int, path: str) -> LoadedVersion:
    """Loads one version directory (no warmup); raises on any problem."""
    if not tf.io.gfile.exists(join(path, SAVED_MODEL_FILE)):
        raise FileNotFoundError(f"no {SAVED_MODEL_FILE} in {path}")
    signature_defs = read_signature_defs(path)
    saved_model = tf.saved_model.load(path)
    signatures = {name: Signature(name, function) for name, function in saved_model.signatures.items()}
    # `saved_model.pb` also lists internal signatures (`__saved_model_init_op`); serve what loads.
    signature_defs = {name: signature_defs[name] for name in signatures if name in signature_defs}
    return LoadedVersion(version, path, signatures, signature_defs, saved_model)
