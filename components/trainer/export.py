"""SavedModel export with two signatures.

- `serving_default`: serialized tf.Examples (batch,) in, `ctr` (batch,) out.
- `score_candidates`: one user's serialized tf.Example (1,) plus N candidate item ids and
  domains in, `ctr` (N,) out. The model's `encode_context` (sequence encoders, user towers) runs
  once; only `score` runs per candidate, on the context repeated N times.
"""

from __future__ import annotations

import os
from typing import Sequence

import tensorflow as tf

from components.trainer import preprocess
from models.config import InputConfig
from xdctr import features as F


class ServingModule(tf.Module):
    """Wraps a Keras `CTRModel` with the in-graph parsing and id hashing (or item vocabulary) it was
    trained with."""

    def __init__(self, model, input_config: InputConfig):
        super().__init__()
        self.model = model
        self._input_config = input_config
        if input_config.item_vocabulary:
            self.item_table = preprocess.item_table(input_config)  # tracked, so the SavedModel keeps it

    def _inputs(self, examples):
        return preprocess.to_model_inputs(preprocess.parse(examples, self._input_config), self._input_config)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=F.SERVING_INPUT)])
    def serve_examples(self, examples):
        outputs = self.model(self._inputs(examples), training=False)
        return {F.SERVING_OUTPUT: tf.cast(outputs[F.SERVING_OUTPUT], tf.float32)}

    @tf.function(input_signature=[
        tf.TensorSpec([1], tf.string, name=F.SERVING_INPUT),
        tf.TensorSpec([None], tf.string, name=F.CANDIDATE_ITEM_IDS),
        tf.TensorSpec([None], tf.string, name=F.CANDIDATE_DOMAINS),
    ])
    def score_candidates(self, examples, candidate_item_ids, candidate_domains):
        config = self._input_config
        tf.debugging.assert_equal(tf.size(candidate_item_ids), tf.size(candidate_domains),
                                  message="candidate_item_ids and candidate_domains must have the same length")
        context = self.model.encode_context(self._inputs(examples), training=False)  # (1, ...) each
        n = tf.size(candidate_item_ids)
        context = tf.nest.map_structure(lambda t: tf.repeat(t, n, axis=0), context)  # (N, ...) each
        domains, known = preprocess.domain_index(candidate_domains, config.domains)
        tf.debugging.assert_equal(known, True, message=f"unknown candidate domain; known: {list(config.domains)}")
        items = preprocess.item_indices(candidate_item_ids, config)
        logits = tf.cast(self.model.score(context, items, domains, training=False), tf.float32)  # (N,)
        return {F.SERVING_OUTPUT: tf.sigmoid(logits), F.RANKING_OUTPUT: logits}


def export(model, input_config: InputConfig, export_dir: str) -> str:
    module = ServingModule(model, input_config)
    signatures = {
        F.SERVING_SIGNATURE: module.serve_examples.get_concrete_function(),
        F.SCORE_CANDIDATES_SIGNATURE: module.score_candidates.get_concrete_function(),
    }
    tf.saved_model.save(module, export_dir, signatures=signatures)
    return export_dir


WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")  # TF Serving's name
MAX_WARMUP_REQUESTS = 1000  # TF Serving refuses warmup files with more records


def write_warmup_requests(export_dir: str, model_name: str, serialized_examples: Sequence[bytes]) -> str:
    """Writes `<export_dir>/assets.extra/tf_serving_warmup_requests`; returns its path.

    A TFRecord of `tensorflow.serving.PredictionLog`s: one `serving_default` PredictRequest per
    serialized tf.Example, so each warms up one batch size-1 call (TF Serving replays every record
    once at load). At most 1000 examples, TF Serving's limit.
    """
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    serialized_examples = list(serialized_examples)
    if not 1 <= len(serialized_examples) <= MAX_WARMUP_REQUESTS:
        raise ValueError(
            f"`serialized_examples` must hold 1 to {MAX_WARMUP_REQUESTS} examples. "
            f"Received: {len(serialized_examples)}"
        )
    path = os.path.join(export_dir, WARMUP_FILE)
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.TFRecordWriter(path) as writer:
        for example in serialized_examples:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = model_name
            request.model_spec.signature_name = F.SERVING_SIGNATURE
            request.inputs[F.SERVING_INPUT].CopyFrom(tf.make_tensor_proto([example], dtype=tf.string, shape=[1]))
            request.output_filter.append(F.SERVING_OUTPUT)
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return path
