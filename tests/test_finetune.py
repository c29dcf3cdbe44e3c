"""`xdctr finetune --new-domain`: train DACDR on two domains, fine-tune a third, frozen weights stay."""

import os

import numpy as np
import pytest
import tensorflow as tf

from components.ingest import beam_pipeline, generator
from components.trainer import finetune, task
from models import dacdr
from xdctr import features as F

pytestmark = pytest.mark.slow  # make test-fast skips these

SMALL = {"embedding_dim": 8, "encoder_units": [8], "hidden_units": [8],
         "inputs": {"item_buckets": 512, "user_buckets": 512}}


def _ingest(tmp_path, name, domains, ingest_domains):
    log = str(tmp_path / f"{name}.jsonl")
    generator.generate_file(generator.GeneratorConfig(num_users=60, domains=domains, items_per_domain=40, seed=3), log)
    out = str(tmp_path / name)
    beam_pipeline.run(beam_pipeline.IngestConfig(input_patterns=(log,), history_length=5, domain_history_length=3,
                                                 parse=beam_pipeline.records.ParseOptions(domains=ingest_domains)), out)
    return out


def test_finetune_new_domain_moves_only_the_new_domain_parts(tmp_path):
    old = _ingest(tmp_path, "old", ("a", "b"), ("a", "b"))
    contract = beam_pipeline.read_contract(old)
    model_dir = str(tmp_path / "model")
    files = lambda d, s: sorted(tf.io.gfile.glob(os.path.join(d, f"Split-{s}", "*.gz")))  # noqa: E731
    task.train_and_export("dacdr", SMALL, contract, files(old, F.TRAIN_SPLIT), serving_model_dir=model_dir,
                          log_dir=str(tmp_path / "logs"), train_steps=5, validation_steps=1,
                          training=task.TrainingConfig(batch_size=32))

    new = _ingest(tmp_path, "new", ("a", "b", "c"), ("a", "b", "c"))
    out = str(tmp_path / "finetuned")
    before, after = finetune.finetune_new_domain(model_dir, "c", new, out, steps=5, batch_size=32, learning_rate=0.05)

    # The same expansion of the untrained-on-c model, built in the same order: zip by position.
    _, _, reloaded = task.load_trained_model(model_dir)
    expanded = dacdr.expand_domains(reloaded, after.config)
    dacdr.finetune_variables(expanded, 2)
    assert [w.trainable for w in expanded.weights] == [w.trainable for w in after.weights]
    moved, frozen = 0, 0
    for start, end in zip(expanded.weights, after.weights):
        same = np.array_equal(start.numpy(), end.numpy())
        if end.trainable:
            moved += "attention" in end.path and not same
        else:
            frozen += 1
            assert same, f"frozen weight {end.path} moved"
    assert moved > 0 and frozen > 0
    assert os.path.isfile(os.path.join(out, "saved_model.pb"))
    assert os.path.isfile(os.path.join(out, task.KERAS_WEIGHTS))
    served = tf.saved_model.load(out).signatures[F.SERVING_SIGNATURE]
    examples = [r.numpy() for r in tf.data.TFRecordDataset(files(new, F.EVAL_SPLIT), compression_type="GZIP").take(8)]
    scores = served(**{F.SERVING_INPUT: tf.constant(examples)})[F.SERVING_OUTPUT].numpy()
    assert scores.shape == (8,) and np.all((scores > 0) & (scores < 1))


def test_finetune_refuses_examples_with_other_domains(tmp_path):
    old = _ingest(tmp_path, "old", ("a", "b"), ("a", "b"))
    model_dir = str(tmp_path / "model")
    files = lambda d, s: sorted(tf.io.gfile.glob(os.path.join(d, f"Split-{s}", "*.gz")))  # noqa: E731
    task.train_and_export("dacdr", SMALL, beam_pipeline.read_contract(old), files(old, F.TRAIN_SPLIT),
                          serving_model_dir=model_dir, log_dir=str(tmp_path / "logs"), train_steps=2,
                          validation_steps=1, training=task.TrainingConfig(batch_size=32))
    try:
        finetune.finetune_new_domain(model_dir, "c", old, str(tmp_path / "x"), steps=1)
    except ValueError as e:
        assert "needs exactly ['a', 'b', 'c']" in str(e)
    else:
        raise AssertionError("expected ValueError")
