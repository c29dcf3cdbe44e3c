"""Every registered model trains through the Trainer's code path and exports both signatures."""

import argparse
import json
import logging
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import models
from components.ingest import beam_pipeline
from components.trainer import preprocess, task
from xdctr import cli
from xdctr import features as F

import modelkit

SMALL_INPUTS = {"inputs": {"item_buckets": 256, "user_buckets": 256}}
# Shrunken configs where the default graph is large (tracing it dominates the test's time); the
# code path through the Trainer is the same.
SMALL_MODELS = {"syncrec": {"num_experts": 2}, "recguru": {"critic_iters": 1, "critic_hidden_units": [8]},
                "man": {"num_groups": 2}}


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    return modelkit.generated_examples(tmp_path_factory.mktemp("trainer"), num_users=40, items_per_domain=30, seed=5)


def _files(examples, split):
    return sorted(tf.io.gfile.glob(os.path.join(examples, f"Split-{split}", "*.gz")))


@pytest.mark.parametrize("name", models.names())
def test_model_trains_and_exports(examples, tmp_path, name):
    contract = beam_pipeline.read_contract(examples)
    out = str(tmp_path / "model")
    model = task.train_and_export(name, {**SMALL_INPUTS, **SMALL_MODELS.get(name, {})}, contract,
                                  _files(examples, F.TRAIN_SPLIT), serving_model_dir=out,
                                  log_dir=str(tmp_path / "logs"), train_steps=2, validation_steps=1,
                                  training=task.TrainingConfig(batch_size=16))
    saved = json.loads(open(os.path.join(out, "model_config.json")).read())
    assert saved["model"] == name
    assert saved["config"]["inputs"]["domains"] == list(contract.domains)
    assert saved["config"]["inputs"]["history_length"] == 4

    loaded = tf.saved_model.load(out)
    assert set(loaded.signatures) == {F.SERVING_SIGNATURE, F.SCORE_CANDIDATES_SIGNATURE}
    serialized = [r.numpy() for r in tf.data.TFRecordDataset(_files(examples, F.EVAL_SPLIT), compression_type="GZIP").take(4)]
    served = loaded.signatures[F.SERVING_SIGNATURE](**{F.SERVING_INPUT: tf.constant(serialized)})[F.SERVING_OUTPUT].numpy()
    assert served.shape == (4,) and np.all((served > 0) & (served < 1))
    # The same user context scored against two candidates in different domains.
    scored = loaded.signatures[F.SCORE_CANDIDATES_SIGNATURE](**{
        F.SERVING_INPUT: tf.constant(serialized[:1]),
        F.CANDIDATE_ITEM_IDS: tf.constant([b"grocery:i1", b"kitchen:i2"]),
        F.CANDIDATE_DOMAINS: tf.constant([b"grocery", b"kitchen"]),
    })
    candidates = scored[F.SERVING_OUTPUT].numpy()
    assert candidates.shape == (2,) and np.all(np.isfinite(candidates))
    # ... and the logit the ranking protocol ranks by: ctr = sigmoid(logit).
    np.testing.assert_allclose(1 / (1 + np.exp(-scored[F.RANKING_OUTPUT].numpy())), candidates, rtol=1e-5)
    assert model.count_params() > 0


def test_training_options_early_stopping_mixed_precision_and_holdout(examples, tmp_path, caplog):
    contract = beam_pipeline.read_contract(examples)
    training = task.TrainingConfig(batch_size=16, epochs=6, early_stopping_patience=1, mixed_precision=True,
                                   jit_compile=False, validation_fraction=0.3, learning_rate=0.5, refit=False)
    with caplog.at_level(logging.WARNING):
        model = task.train_and_export("mean_pool_dnn", SMALL_INPUTS, contract, _files(examples, F.TRAIN_SPLIT),
                                      serving_model_dir=str(tmp_path / "m"), log_dir=str(tmp_path / "logs"),
                                      train_steps=60, validation_steps=2, training=training)
    # The explicit 256 buckets are kept; the collisions they cause are written next to the model and
    # warned about (~60 items in 255 real buckets: 1 - exp(-60/255) ~ 21% share a bucket).
    hashing = json.loads(open(str(tmp_path / "m" / task.ITEM_HASHING_FILE)).read())
    ids = preprocess.distinct_item_ids(_files(examples, F.TRAIN_SPLIT), contract)
    assert hashing == preprocess.hashing_stats(ids, models.config.InputConfig(item_buckets=256))
    assert hashing["colliding_item_fraction"] > task.COLLISION_WARNING
    assert "share one of the 256 buckets" in caplog.text and "item_buckets=auto" in caplog.text
    assert "item_buckets=vocabulary" in caplog.text
    history = model.history.history
    # A huge learning rate overfits at once: validation loss stops improving, so training stops
    # before the 6th epoch; the policy is back to float32 afterwards.
    assert len(history["val_loss"]) < 6
    assert keras.mixed_precision.global_policy().name == "float32"
    assert os.listdir(str(tmp_path / "logs"))  # TensorBoard wrote its logs


def test_refit_trains_a_fresh_model_on_every_row_for_the_best_epochs(examples, tmp_path, monkeypatch):
    """After early stopping picks the best epoch on the latest rows, a fresh model with the same seed
    trains that many epochs on every train row (held-out rows included) and is the one exported."""
    contract = beam_pipeline.read_contract(examples)
    runs = []
    fit = task.fit

    def recording_fit(model, train_ds, **kwargs):
        history = fit(model, train_ds, **kwargs)
        runs.append({"kwargs": kwargs, "history": dict(history.history), "model": model,
                     "users": sum(len(x[F.USER_ID]) for x, _ in train_ds.take(kwargs["steps"] // kwargs["epochs"]))})
        return history

    monkeypatch.setattr(task, "fit", recording_fit)
    training = task.TrainingConfig(batch_size=16, epochs=6, early_stopping_patience=1, learning_rate=0.5)
    model = task.train_and_export("mean_pool_dnn", SMALL_INPUTS, contract, _files(examples, F.TRAIN_SPLIT),
                                  serving_model_dir=str(tmp_path / "m"), log_dir=str(tmp_path / "logs"),
                                  train_steps=60, validation_steps=2, training=training)
    selection, refit = runs
    losses = selection["history"]["val_loss"]
    best = int(np.argmin(losses)) + 1
    assert len(losses) < 6 and refit["kwargs"]["last_phase_epochs"] == best
    assert "val_loss" not in refit["history"] and len(refit["history"]["loss"]) == best
    assert refit["model"] is model and selection["model"] is not model
    # The refit reads full batches (no row is held out); the first run's batches miss the held-out rows.
    assert refit["users"] == 16 * 10 and selection["users"] < 16 * 10
    # Without early stopping there is nothing to select: one run, on every row.
    runs.clear()
    task.train_and_export("mean_pool_dnn", SMALL_INPUTS, contract, _files(examples, F.TRAIN_SPLIT),
                          serving_model_dir=str(tmp_path / "n"), log_dir=str(tmp_path / "logs2"),
                          train_steps=6, validation_steps=2,
                          training=task.TrainingConfig(batch_size=16, epochs=2, early_stopping_patience=0))
    assert len(runs) == 1 and runs[0]["kwargs"]["last_phase_epochs"] == 2 and runs[0]["users"] == 16 * 3
    # Nor with one epoch: no rows are held out, and their time cut is not even read.
    runs.clear()
    monkeypatch.setattr(preprocess, "validation_cut", lambda *a, **k: pytest.fail("no holdout with one epoch"))
    task.train_and_export("mean_pool_dnn", SMALL_INPUTS, contract, _files(examples, F.TRAIN_SPLIT),
                          serving_model_dir=str(tmp_path / "o"), log_dir=str(tmp_path / "logs3"),
                          train_steps=3, validation_steps=2, training=task.TrainingConfig(batch_size=16, epochs=1))
    assert len(runs) == 1 and runs[0]["kwargs"]["last_phase_epochs"] == 1 and runs[0]["users"] == 16 * 3


def test_validation_holdout_is_disjoint_and_deterministic(examples):
    contract = beam_pipeline.read_contract(examples)
    config = models.resolve_config("mean_pool_dnn", {"inputs": {"domains": list(contract.domains),
                                                                "history_length": 4, "domain_history_length": 3}})
    def rows(holdout):
        ds = preprocess.dataset(_files(examples, F.TRAIN_SPLIT), config.inputs, 64, holdout=holdout,
                                validation_fraction=0.2)
        return [tuple(x[F.USER_ID].numpy().tolist()) for x, _ in ds]
    train, validation, everything = rows("train"), rows("validation"), rows("all")
    count = lambda batches: sum(len(b) for b in batches)  # noqa: E731
    assert count(train) + count(validation) == count(everything)
    assert 0.15 < count(validation) / count(everything) < 0.3
    assert rows("validation") == validation
    # The validation rows come in full batches: the one-user batches of early rows hold none.
    assert all(len(b) == 64 for b in validation[:-1])


def test_validation_holdout_is_the_latest_rows_and_no_trained_row_shows_its_clicks(examples):
    from benchmarks import holdout

    contract = beam_pipeline.read_contract(examples)
    files = _files(examples, F.TRAIN_SPLIT)
    serialized = [r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP")]
    raw = tf.io.parse_example(tf.constant(serialized), contract.feature_spec())
    cut = preprocess.validation_cut(files, 0.2)
    held = preprocess.in_validation(raw, cut).numpy()
    ts = raw[F.TIMESTAMP].numpy()
    assert 0.18 < held.mean() < 0.3
    assert ts[~held].max() < cut <= ts[held].min()
    # No held-out click is in a trained-on row's history; with a random holdout of rows (what the
    # Trainer used before) most are.
    by_name = {r["holdout"]: r for r in holdout.measure(files, contract, 0.2, batch_size=50)}
    assert by_name["time"]["held_out_rows"] == held.sum()
    assert by_name["time"]["held_out_clicks"] > 20 and by_name["time"]["clicks_shown_to_training"] == 0
    assert by_name["random rows"]["held_out_clicks"] > 20 and by_name["random rows"]["share_shown"] > 0.5


def test_holdout_benchmark_prints_a_table_and_writes_json(examples, tmp_path, capsys):
    from benchmarks import holdout

    out = str(tmp_path / "holdout.json")
    assert holdout.main(["--examples", examples, "--validation-fraction", "0.2", "--out", out]) == 0
    written = json.loads(open(out).read())
    assert [r["holdout"] for r in written["results"]] == ["time", "random rows"]
    assert written["results"][0]["clicks_shown_to_training"] == 0
    assert "| time |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        holdout.main(["--examples", str(tmp_path), "--out", out])
    assert "no train files" in capsys.readouterr().err


def test_validation_cut_refuses_what_leaves_nothing_to_train_on(tmp_path, examples):
    with pytest.raises(ValueError, match="fraction"):
        preprocess.validation_cut(_files(examples, F.TRAIN_SPLIT), 1.0)
    same_time = str(tmp_path / "same.gz")
    example = tf.train.Example(features=tf.train.Features(feature={
        F.TIMESTAMP: tf.train.Feature(int64_list=tf.train.Int64List(value=[7]))}))
    with tf.io.TFRecordWriter(same_time, options="GZIP") as writer:
        for _ in range(10):
            writer.write(example.SerializeToString())
    with pytest.raises(ValueError, match="no rows to train on"):
        preprocess.validation_cut([same_time], 0.1)
    empty = str(tmp_path / "empty.gz")
    tf.io.TFRecordWriter(empty, options="GZIP").close()
    with pytest.raises(ValueError, match="nothing to hold out"):
        preprocess.validation_cut([empty], 0.1)


def test_item_buckets_are_sized_from_the_train_split_unless_given(examples):
    contract = beam_pipeline.read_contract(examples)
    files = _files(examples, F.TRAIN_SPLIT)
    distinct = len(preprocess.distinct_item_ids(files, contract))
    assert 40 < distinct < 70  # 2 domains x 30 items, most of them clicked before the eval cutoff
    auto = preprocess.auto_item_buckets(distinct, task.ITEM_BUCKET_FACTOR)
    assert auto >= task.ITEM_BUCKET_FACTOR * distinct + 1 and auto & (auto - 1) == 0
    resolve = lambda overrides, **kw: task.resolve_model_config("dnn_multi", overrides, contract, **kw).inputs  # noqa: E731
    assert resolve({}, train_files=files).item_buckets == auto
    assert resolve({"inputs": {"item_buckets": "auto"}}, train_files=files).item_buckets == auto
    assert resolve({"inputs": {"item_buckets": 300}}, train_files=files).item_buckets == 300
    assert resolve({"item_buckets": 512}, train_files=files).item_buckets == 512  # --set item_buckets=512
    assert resolve({}).item_buckets == models.config.InputConfig().item_buckets  # no data to size from
    # At the auto size fewer items collide (about 1 - exp(-n / B) ~ 11% here): no warning.
    assert task.item_hashing(files, contract, resolve({}, train_files=files))["colliding_item_fraction"] < \
        task.COLLISION_WARNING


def test_item_vocabulary_from_the_train_split_is_trained_exported_and_served(examples, tmp_path):
    contract = beam_pipeline.read_contract(examples)
    files = _files(examples, F.TRAIN_SPLIT)
    out = str(tmp_path / "m")
    model = task.train_and_export("mean_pool_dnn", {"item_buckets": "vocabulary"}, contract, files,
                                  serving_model_dir=out, log_dir=str(tmp_path / "logs"), train_steps=4,
                                  validation_steps=1, training=task.TrainingConfig(batch_size=16))
    ids = [i.decode() for i in preprocess.distinct_item_ids(files, contract)]
    n = len(ids)
    inputs = model.config.inputs
    assert list(inputs.item_vocabulary) == ids and inputs.item_buckets == n + 1 + -(-n // 8)
    assert task.vocabulary_buckets(n) == inputs.item_buckets and task.vocabulary_buckets(0) == 2
    hashing = json.loads(open(os.path.join(out, task.ITEM_HASHING_FILE)).read())
    assert (hashing["distinct_items"], hashing["occupied_buckets"], hashing["colliding_item_fraction"]) == (n, n, 0.0)
    saved = json.loads(open(os.path.join(out, "model_config.json")).read())
    assert saved["config"]["inputs"]["item_vocabulary"] == ids
    name, config, reloaded = task.load_trained_model(out)  # the vocabulary round-trips (fine-tuning's path)
    assert (name, config.inputs) == ("mean_pool_dnn", inputs)

    # The SavedModel carries the table: its scores equal the Keras model's on the same rows.
    serialized = [r.numpy() for r in tf.data.TFRecordDataset(_files(examples, F.EVAL_SPLIT), compression_type="GZIP").take(6)]
    loaded = tf.saved_model.load(out)
    served = loaded.signatures[F.SERVING_SIGNATURE](**{F.SERVING_INPUT: tf.constant(serialized)})[F.SERVING_OUTPUT]
    keras_inputs = preprocess.to_model_inputs(preprocess.parse(tf.constant(serialized), inputs), inputs)
    np.testing.assert_allclose(served.numpy(), model(keras_inputs)[F.SERVING_OUTPUT].numpy().reshape(-1), atol=1e-5)
    # ... and `xdctr serve` loads it the same way.
    from serving import loader
    version = loader.load_version(1, out)
    by_server = version.signatures[F.SERVING_SIGNATURE].run({F.SERVING_INPUT: np.array(serialized, dtype=object)})
    np.testing.assert_allclose(by_server[F.SERVING_OUTPUT], served.numpy(), atol=1e-6)
    # An id the vocabulary lacks is scored too (one of the rows after the vocabulary).
    scored = loaded.signatures[F.SCORE_CANDIDATES_SIGNATURE](**{
        F.SERVING_INPUT: tf.constant(serialized[:1]),
        F.CANDIDATE_ITEM_IDS: tf.constant([ids[0].encode(), b"grocery:never-seen"]),
        F.CANDIDATE_DOMAINS: tf.constant([ids[0].split(":")[0].encode(), b"grocery"]),
    })[F.SERVING_OUTPUT].numpy()
    assert scored.shape == (2,) and np.all((scored > 0) & (scored < 1))
    with pytest.raises(ValueError, match="needs the train split"):
        task.resolve_model_config("mean_pool_dnn", {"item_buckets": "vocabulary"}, contract)


def test_the_clis_early_config_check_takes_the_item_buckets_shortcut_and_auto():
    for overrides in ({"item_buckets": "auto"}, {"item_buckets": 512}, {"inputs": {"item_buckets": "auto"}},
                      {"inputs": {"item_buckets": 300}, "dropout": 0.2}):
        task.check_model_config("dnn_multi", overrides)
    with pytest.raises(ValueError, match="expects int"):
        task.check_model_config("dnn_multi", {"item_buckets": "many"})
    with pytest.raises(ValueError, match="unknown config field `buckets`"):
        task.check_model_config("dnn_multi", {"buckets": 512})
    args = argparse.Namespace(models=["dnn_multi", "man"], set=["item_buckets=auto", "dropout=0.1"],
                              early_stopping_patience=1)
    assert cli._benchmark_models(args) == (["dnn_multi", "man"], {"item_buckets": "auto", "dropout": 0.1})
    with pytest.raises(cli.UsageError, match="expects int"):
        cli._benchmark_models(argparse.Namespace(models=["man"], set=["item_buckets=many"], early_stopping_patience=1))


def test_phase_steps_split_by_share_with_at_least_one_step_each():
    assert task.phase_steps((("a", 0.3), ("b", 0.4), ("c", 0.3)), 100) == [30, 40, 30]
    assert task.phase_steps((("a", 1.0), ("b", 0.0)), 10) == [10, 1]
    with pytest.raises(ValueError, match="positive sum"):
        task.phase_steps((("a", 0.0),), 10)


def test_fit_runs_the_phases_in_order_with_their_steps():
    class TwoPhases(models.base.CTRModel):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1)
            self.log = []

        def training_phases(self):
            return (("pretrain", 1.0), ("finetune", 3.0))

        def call(self, inputs, training=False):
            return {F.SERVING_OUTPUT: keras.ops.sigmoid(keras.ops.squeeze(self.dense(inputs), -1))}

    class Steps(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            self.model.log.append(self.model.phase)

    model = TwoPhases()
    model.compile(optimizer="adam", loss={F.SERVING_OUTPUT: keras.losses.BinaryCrossentropy()})
    data = tf.data.Dataset.from_tensors((np.ones((4, 3), np.float32), {F.SERVING_OUTPUT: np.ones(4, np.float32)})).repeat()
    history = task.fit(model, data, steps=8, epochs=2, callbacks=[Steps()], verbose=0)
    assert model.log == ["pretrain"] * 2 + ["finetune"] * 6
    assert len(history.history["loss"]) == 2  # the last phase's two epochs
    with pytest.raises(ValueError, match="unknown training phase `nope`"):
        model.set_phase("nope")


def test_no_refit_flag_reaches_the_trainer_and_the_benchmarks():
    parser = cli.build_parser()
    for refit, flags in ((True, []), (False, ["--no-refit"])):
        args = parser.parse_args(["pipeline", "compile", "--input", "gs://bucket/x.jsonl", *flags])
        assert cli._pipeline_args(args, local=False)["training"]["refit"] is refit
        assert task.TrainingConfig(**cli._pipeline_args(args, local=False)["training"]).refit is refit
        for what in ("train", "quality"):
            assert parser.parse_args(["benchmark", what, *flags]).no_refit is not refit
