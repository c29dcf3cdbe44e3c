"""Helpers shared by the model tests: hand-written rows -> model inputs, labels and served CTR."""

import keras
import numpy as np
import tensorflow as tf

from components.ingest import beam_pipeline, generator, sequences
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


def generated_examples(directory, *, num_users, items_per_domain, seed):
    """A generated log ingested (history 4, per-domain history 3) under `directory`; returns the examples dir."""
    log = str(directory / "log.jsonl")
    generator.generate_file(generator.GeneratorConfig(num_users=num_users, items_per_domain=items_per_domain,
                                                      seed=seed), log)
    out = str(directory / "examples")
    beam_pipeline.run(beam_pipeline.IngestConfig(input_patterns=(log,), history_length=4, domain_history_length=3), out)
    return out
