"""`benchmarks/train.py`: mean ± std over seeds, the table, and the Trainer's early stopping."""

import json

import pytest

from benchmarks import train

import modelkit

SLICES = ["overall", "domain=a", "cold_start"]


def _run(seed, auc, cold_auc, speed, best):
    summary = lambda value: {"auc": value, "gauc": None if value is None else value - 0.1}  # noqa: E731
    return {"seed": seed, "examples_per_second": speed, "best_epoch": best,
            "quality": {"overall": summary(auc), "domain=a": summary(auc), "cold_start": summary(cold_auc)}}


def test_aggregate_mean_and_sample_std():
    runs = [_run(0, 0.70, 0.60, 100, 2), _run(1, 0.72, None, 300, 3), _run(2, 0.74, 0.64, 200, 2)]
    agg = train.aggregate(runs, SLICES)
    assert agg["seeds"] == [0, 1, 2] and agg["best_epoch"] == [2, 3, 2]
    mean, std, n = agg["overall"]["auc"]
    assert mean == pytest.approx(0.72) and std == pytest.approx(0.02) and n == 3  # sample std, n - 1
    # A slice one run cannot score (one class): averaged over the two that can, and counted.
    mean, std, n = agg["cold_start"]["auc"]
    assert mean == pytest.approx(0.62) and std == pytest.approx(0.0282843, rel=1e-5) and n == 2
    assert agg["examples_per_second"][0] == pytest.approx(200)
    json.dumps(agg)  # what the benchmark writes


def test_markdown_table_cells():
    runs = [_run(0, 0.70, 0.60, 100, 2), _run(1, 0.72, None, 300, 3), _run(2, 0.74, 0.64, 200, 2)]
    oracle = train.aggregate([{"seed": None, "quality": _run(0, 0.9, 0.8, None, None)["quality"]}], SLICES)
    lines = train.markdown_table([("oracle", oracle, None), ("man", train.aggregate(runs, SLICES), 1234)],
                                 SLICES).splitlines()
    assert lines[0] == ("| model | seeds | best epochs | AUC | GAUC | GAUC a | cold-start AUC | cold-start GAUC "
                        "| examples/s | params |")
    assert lines[2] == "| oracle |  |  | 0.9000 | 0.8000 | 0.8000 | 0.8000 | 0.7000 |  |  |"
    assert lines[3] == ("| man | 3 | 2, 3, 2 | 0.7200 ± 0.0200 | 0.6200 ± 0.0200 | 0.6200 ± 0.0200 "
                        "| 0.6200 ± 0.0283 (2/3) | 0.5200 ± 0.0283 (2/3) | 200 | 1,234 |")
    assert train.format_mean_std(None) == "n/a"


@pytest.fixture(scope="module")
def tiny_examples(tmp_path_factory):
    return modelkit.generated_examples(tmp_path_factory.mktemp("bench"), num_users=80, items_per_domain=40, seed=3)


def test_train_model_stops_early_at_the_best_epoch(tiny_examples):
    import os

    import keras
    import numpy as np
    import tensorflow as tf

    from components.ingest import beam_pipeline
    from components.trainer import preprocess
    from xdctr import features as F

    contract = beam_pipeline.read_contract(tiny_examples)
    files = sorted(tf.io.gfile.glob(os.path.join(tiny_examples, "Split-train", "*.gz")))
    rows = beam_pipeline.read_summary(tiny_examples)["rows"][F.TRAIN_SPLIT]
    overrides = {"inputs": {"item_buckets": 128, "user_buckets": 128}, "embedding_dim": 32, "hidden_units": [64, 64]}
    # A large learning rate on ~1.5k rows: the validation loss turns up within a few epochs.
    model, config, info = train.train_model("dnn_multi", overrides, contract, files, rows, seed=0, epochs=12,
                                            batch_size=32, patience=1, learning_rate=0.02, refit=False)
    losses = info["val_loss"]
    assert info["epochs_run"] == len(losses) and 2 <= len(losses) < 12
    assert info["best_epoch"] == int(np.argmin(losses)) + 1 and info["epochs_run"] == info["best_epoch"] + 1
    assert "refit_epochs" not in info
    # The best epoch's weights are restored: the validation loss now is the best one.
    validation = preprocess.dataset(files, config.inputs, 4096, holdout="validation")
    bce = keras.losses.BinaryCrossentropy()
    loss_on = lambda m: np.mean([float(bce(y, m(x)[F.SERVING_OUTPUT])) for x, y in validation])  # noqa: E731
    assert loss_on(model) == pytest.approx(min(losses), rel=1e-3)
    # With a refit (the default) the same selection run is followed by a fresh model trained on every
    # row, the held-out ones included, for the best epoch's number of epochs.
    refitted, _, refit_info = train.train_model("dnn_multi", overrides, contract, files, rows, seed=0, epochs=12,
                                                batch_size=32, patience=1, learning_rate=0.02)
    assert refit_info["val_loss"] == pytest.approx(losses, rel=1e-3)
    assert refit_info["refit_epochs"] == info["best_epoch"]
    assert abs(loss_on(refitted) - min(losses)) > 1e-3


def test_train_model_sizes_item_buckets_from_the_train_files(tiny_examples):
    """As the Trainer does: without a number in the overrides the buckets follow the item count."""
    import os

    import tensorflow as tf

    from components.ingest import beam_pipeline
    from components.trainer import preprocess, task
    from xdctr import features as F

    contract = beam_pipeline.read_contract(tiny_examples)
    files = sorted(tf.io.gfile.glob(os.path.join(tiny_examples, "Split-train", "*.gz")))
    rows = beam_pipeline.read_summary(tiny_examples)["rows"][F.TRAIN_SPLIT]
    distinct = len(preprocess.distinct_item_ids(files, contract))
    expected = preprocess.auto_item_buckets(distinct, task.ITEM_BUCKET_FACTOR)
    small = {"embedding_dim": 8, "hidden_units": [8], "inputs": {"user_buckets": 64}}
    _, config, info = train.train_model("dnn_multi", small, contract, files, rows, seed=0, epochs=1, batch_size=64)
    assert 0 < distinct < 200 and expected != 1 << 15  # the InputConfig default would be a different size
    assert config.inputs.item_buckets == expected
    assert info["item_hashing"]["item_buckets"] == expected and info["item_hashing"]["distinct_items"] == distinct
    # A number in the overrides is kept.
    fixed = {**small, "inputs": {"user_buckets": 64, "item_buckets": 512}}
    _, config, info = train.train_model("dnn_multi", fixed, contract, files, rows, seed=0, epochs=1, batch_size=64)
    assert config.inputs.item_buckets == 512 and info["item_hashing"]["item_buckets"] == 512


def test_train_model_under_sampled_softmax_passes_over_the_clicks(tiny_examples):
    """An epoch is the clicks over the batch size; the run's info names the objective; the
    returned model is back to the served graph."""
    import os

    import math

    import keras
    import tensorflow as tf

    from components.ingest import beam_pipeline
    from components.trainer import preprocess
    from xdctr import features as F

    contract = beam_pipeline.read_contract(tiny_examples)
    files = sorted(tf.io.gfile.glob(os.path.join(tiny_examples, "Split-train", "*.gz")))
    rows = beam_pipeline.read_summary(tiny_examples)["rows"][F.TRAIN_SPLIT]
    clicks = preprocess.count_clicks(files)
    assert 0 < clicks < rows
    steps = []

    class Steps(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            steps.append(self.params["steps"])

    small = {"embedding_dim": 8, "hidden_units": [8], "inputs": {"user_buckets": 64}}
    model, _, info = train.train_model("dnn_multi", small, contract, files, rows, seed=0, epochs=2, batch_size=16,
                                       patience=2, objective="sampled_softmax", ranking_negatives=4,
                                       callbacks=[Steps()])
    assert info["objective"] == "sampled_softmax" and info["ranking_negatives"] == 4
    assert info["train_clicks"] == clicks and steps == [clicks // 16] * 2
    assert len(info["val_loss"]) == 2 and all(0 < v < 2 * math.log(5) for v in info["val_loss"])
    assert model._ranking is None


def test_run_suffix_names_nested_overrides():
    assert train.run_suffix({}) == ""
    assert train.run_suffix({"use_sc_mim": False, "inputs": {"item_buckets": 262144}}) == (
        "[inputs.item_buckets=262144,use_sc_mim=False]")
