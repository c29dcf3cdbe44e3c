"""Helpers shared by the model tests: hand-written rows -> model inputs, labels and served CTR."""

import keras
import numpy as np
import tensorflow as tf

from components.ingest import sequences
from components.trainer import preprocess
from xdctr import features as F


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def model_inputs(rows, config):
    """Example dicts (as ingestion makes them) -> model inputs, through the serving preprocessing."""
    serialized = tf.constant([sequences.serialize_example(r) for r in rows])
    return preprocess.to_model_inputs(preprocess.parse(serialized, config.inputs), config.inputs)


def labels(rows):
    return np.array([r[F.LABEL] for r in rows], "float32")


def served_ctr(model, inputs):
    return to_numpy(model(inputs)[F.SERVING_OUTPUT])
