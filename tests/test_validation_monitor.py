"""Early stopping on the validation holdout's GAUC (`components/trainer/validation.py`)."""

import os

import numpy as np
import pytest
import tensorflow as tf

import models
from benchmarks import train
from components.evaluation import metrics
from components.ingest import beam_pipeline
from components.trainer import preprocess, task, validation
from xdctr import cli
from xdctr import features as F

import modelkit

# Two user buckets: a GAUC grouped by the hashed user ids would see at most two users.
OVERRIDES = {"inputs": {"item_buckets": 128, "user_buckets": 2}, "embedding_dim": 8, "hidden_units": [16]}


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    return modelkit.generated_examples(tmp_path_factory.mktemp("monitor"), num_users=60, items_per_domain=30, seed=7)


def _setup(examples):
    contract = beam_pipeline.read_contract(examples)
    files = sorted(tf.io.gfile.glob(os.path.join(examples, "Split-train", "*.gz")))
    config = task.resolve_model_config("dnn_multi", OVERRIDES, contract, train_files=files)
    return contract, files, config


def _raw_rows(files):
    spec = {F.USER_ID: tf.io.FixedLenFeature([], tf.string), F.LABEL: tf.io.FixedLenFeature([], tf.int64),
            F.TIMESTAMP: tf.io.FixedLenFeature([], tf.int64)}
    parts = [tf.io.parse_example(b, spec) for b in tf.data.TFRecordDataset(files, compression_type="GZIP").batch(512)]
    return {k: np.concatenate([p[k].numpy() for p in parts]) for k in spec}


def test_monitor_scores_every_held_out_row_grouped_by_raw_user(examples):
    contract, files, config = _setup(examples)
    cut = preprocess.validation_cut(files, 0.3)
    raw = _raw_rows(files)
    held = raw[F.TIMESTAMP] >= cut
    ds = validation.holdout_dataset(files, config.inputs, cut, batch_size=16)
    users = np.concatenate([u.numpy() for _, _, u in ds])
    labels = np.concatenate([y.numpy() for _, y, _ in ds])
    # Every held-out row once, in file order, with its raw user id and label.
    np.testing.assert_array_equal(users, raw[F.USER_ID][held])
    np.testing.assert_array_equal(labels, raw[F.LABEL][held])

    model = models.build("dnn_multi", config)
    monitor = validation.GAUCMonitor(ds)
    monitor.set_model(model)
    logs = {"val_loss": 0.5}
    monitor.on_epoch_end(0, logs)
    # The same model's scores of the same rows through the Trainer's validation input.
    scores = np.concatenate([model(x, training=False)[F.SERVING_OUTPUT].numpy().reshape(-1) for x, _ in
                             preprocess.dataset(files, config.inputs, 64, holdout="validation", validation_cut_ts=cut)])
    expected, counted, _ = metrics.gauc(users, labels, scores)
    assert logs[validation.VAL_GAUC] == pytest.approx(expected, abs=1e-6)
    assert logs[validation.VAL_AUC] == pytest.approx(metrics.auc(labels, scores), abs=1e-6)
    # Grouped by the raw ids: more users than the two hashed buckets could hold.
    both = {u for u in set(users) if 0 < labels[users == u].sum() < (users == u).sum()}
    assert monitor.history[0]["users"] == counted == len(both) > 2
    assert monitor.history[0]["rows"] == int(held.sum())

    # One domain only (the single-domain baselines).
    domain = contract.domains[0]
    only = validation.holdout_dataset(files, config.inputs, cut, only_domain=domain)
    domains = np.concatenate([x[F.DOMAIN].numpy() for x, _, _ in only])
    assert len(domains) < held.sum() and np.all(domains == 0)


def test_monitor_refuses_what_it_cannot_measure(examples):
    _, files, config = _setup(examples)
    cut = preprocess.validation_cut(files, 0.3)
    with pytest.raises(ValueError, match="must be one of"):
        validation.check_monitor("val_auc")
    with pytest.raises(ValueError, match="click rows only"):
        validation.check_monitor("val_gauc", "sampled_softmax")
    with pytest.raises(ValueError, match="click rows only"):
        task.TrainingConfig(early_stopping_monitor="val_gauc", objective="sampled_softmax")
    with pytest.raises(ValueError, match="must be one of"):
        task.TrainingConfig(early_stopping_monitor="gauc")
    with pytest.raises(ValueError, match="only_domain"):
        validation.holdout_dataset(files, config.inputs, cut, only_domain="nope")
    model = models.build("dnn_multi", config)
    # Only clicks: no user has both labels, so there is no GAUC to stop on.
    clicks = validation.holdout_dataset(files, config.inputs, cut).map(lambda x, y, u: (x, tf.ones_like(y), u))
    monitor = validation.GAUCMonitor(clicks)
    monitor.set_model(model)
    with pytest.raises(ValueError, match="val_gauc is undefined"):
        monitor.on_epoch_end(0, {})
    # No rows after the cut at all.
    empty = validation.GAUCMonitor(validation.holdout_dataset(files, config.inputs, 2 ** 62))
    empty.set_model(model)
    with pytest.raises(ValueError, match="no rows"):
        empty.on_epoch_end(0, {})


def test_benchmark_early_stopping_picks_the_epoch_of_the_best_gauc(examples):
    contract, files, _ = _setup(examples)
    rows = beam_pipeline.read_summary(examples)["rows"][F.TRAIN_SPLIT]
    # Patience 4 over 4 epochs: every epoch runs, and the best GAUC's epoch is the one refitted.
    _, _, info = train.train_model("dnn_multi", OVERRIDES, contract, files, rows, seed=0, epochs=4, batch_size=32,
                                   patience=4, learning_rate=0.05, monitor=validation.VAL_GAUC)
    watched = info["monitored"]
    assert info["monitor"] == validation.VAL_GAUC and len(watched) == len(info["val_loss"]) == 4
    assert all(0 <= g <= 1 for g in watched)
    assert info["best_epoch"] == int(np.argmax(watched)) + 1 == info["refit_epochs"]
    with pytest.raises(ValueError, match="click rows only"):
        train.train_model("dnn_multi", OVERRIDES, contract, files, rows, seed=0, epochs=2, monitor="val_gauc",
                          objective="sampled_softmax")


def test_trainer_early_stopping_on_gauc_refits_for_its_best_epoch(examples, tmp_path, monkeypatch):
    contract, files, _ = _setup(examples)
    runs = []
    fit = task.fit

    def recording_fit(model, train_ds, **kwargs):
        history = fit(model, train_ds, **kwargs)
        runs.append({"kwargs": kwargs, "history": dict(history.history)})
        return history

    monkeypatch.setattr(task, "fit", recording_fit)
    training = task.TrainingConfig(batch_size=16, epochs=3, early_stopping_patience=3, learning_rate=0.05,
                                   early_stopping_monitor="val_gauc")
    task.train_and_export("dnn_multi", OVERRIDES, contract, files, serving_model_dir=str(tmp_path / "m"),
                          log_dir=str(tmp_path / "logs"), train_steps=30, validation_steps=2, training=training)
    selection, refit = runs
    gaucs = selection["history"][validation.VAL_GAUC]
    assert len(gaucs) == 3 and len(selection["history"]["val_loss"]) == 3
    assert refit["kwargs"]["last_phase_epochs"] == int(np.argmax(gaucs)) + 1


def test_select_flags_reach_the_trainer_and_the_benchmarks():
    parser = cli.build_parser()
    for monitor, flags in (("val_loss", []), ("val_gauc", ["--early-stopping-monitor", "val_gauc"])):
        args = parser.parse_args(["pipeline", "compile", "--input", "gs://bucket/x.jsonl", *flags])
        training = cli._pipeline_args(args, local=False)["training"]
        assert task.TrainingConfig(**training).early_stopping_monitor == monitor
    for what in ("train", "quality"):
        assert parser.parse_args(["benchmark", what]).select == "val_loss"
        assert parser.parse_args(["benchmark", what, "--select", "val_gauc"]).select == "val_gauc"
    with pytest.raises(ValueError, match="must be one of"):
        train.run(["dnn_multi"], "/nonexistent", "/nonexistent/out.json", select="gauc")
