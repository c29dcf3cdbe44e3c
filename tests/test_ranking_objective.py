"""The ranking objectives (sampled and full softmax): sampler, logits, loss, and training through the Trainer."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import models
import models.base
from components.ingest import beam_pipeline
from components.trainer import preprocess, task
from xdctr import features as F

import modelkit

INPUTS = {"inputs": {"domains": ["a", "b"], "item_buckets": 64, "history_length": 5, "domain_history_length": 3}}
RANKING_MODELS = [name for name in models.names() if models.registry.model_class(name).supports_ranking_objective]
FULL_SOFTMAX_MODELS = [name for name in models.names() if models.build(name, models.resolve_config(name, INPUTS))
                       .supports_full_softmax]


def _inputs(config, items, domains):
    x = models.base.dummy_inputs(config.inputs, batch=len(items))
    x[F.ITEM_ID] = ops.convert_to_tensor(items, "int32")
    x[F.DOMAIN] = ops.convert_to_tensor(domains, "int32")
    x[F.HISTORY_ITEM_IDS] = ops.convert_to_tensor(np.tile([[0, 0, 3, 8, 9]], (len(items), 1)), "int32")
    x[F.HISTORY_MASK] = ops.convert_to_tensor(np.tile([[False, False, True, True, True]], (len(items), 1)))
    return x


def test_the_model_without_the_objective_is_recguru():
    assert set(models.names()) - set(RANKING_MODELS) == {"recguru"}
    model = models.build("recguru", models.resolve_config("recguru", INPUTS))
    with pytest.raises(ValueError, match="trains its own objective"):
        model.set_ranking_objective([[1], [2]], 4)


@pytest.mark.parametrize("name", RANKING_MODELS)
def test_ranking_logits_are_the_candidate_then_the_sampled_items_of_its_domain(name):
    config = models.resolve_config(name, INPUTS)
    model = models.build(name, config)
    items, domains = [1, 2, 5, 4], [0, 1, 0, 1]
    x = _inputs(config, items, domains)
    served = ops.convert_to_numpy(model(x, training=False)[F.SERVING_OUTPUT])
    # One item per domain: every negative of a row is that item (5 in domain a, 7 in b).
    model.set_ranking_objective([np.array([5]), np.array([7])], 6)
    logits = ops.convert_to_numpy(model(x, training=False)[models.base.RANKING_LOGITS])
    assert logits.shape == (4, 7)
    context = model.encode_context(x, training=False)
    np.testing.assert_allclose(logits[:, 0], ops.convert_to_numpy(model.score(context, x[F.ITEM_ID], x[F.DOMAIN])),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(1 / (1 + np.exp(-logits[:, 0])), served, rtol=1e-4, atol=1e-6)  # same model
    negative = ops.convert_to_numpy(model.score(context, ops.convert_to_tensor([5, 7, 5, 7], "int32"), x[F.DOMAIN]))
    for row in (0, 1, 3):
        np.testing.assert_allclose(logits[row, 1:], np.full(6, negative[row]), rtol=1e-4, atol=1e-5)
    # Row 2 clicked item 5 itself: a sampled 5 is not a negative.
    np.testing.assert_array_equal(logits[2, 1:], np.full(6, models.base._MASKED_LOGIT, "float32"))
    model.clear_ranking_objective()
    assert set(model(x, training=False)) == {F.SERVING_OUTPUT}


def test_the_models_with_a_batched_scorer_are_sasrec_bilinear_recency_and_syncrec():
    assert set(FULL_SOFTMAX_MODELS) == {"sasrec", "bilinear_recency", "syncrec"}
    for name in set(RANKING_MODELS) - set(FULL_SOFTMAX_MODELS):
        model = models.build(name, models.resolve_config(name, INPUTS))
        with pytest.raises(ValueError, match="no batched scorer"):
            model.set_ranking_objective([[1], [2]], None)


@pytest.mark.parametrize("name", FULL_SOFTMAX_MODELS)
def test_score_items_is_score_of_every_row_and_item(name):
    config = models.resolve_config(name, INPUTS)
    model = models.build(name, config)
    x = _inputs(config, [1, 2, 5], [0, 1, 0])
    x[F.HISTORY_ITEM_IDS] = ops.convert_to_tensor([[0, 0, 3, 8, 9], [0, 4, 4, 1, 2], [0, 0, 0, 0, 7]], "int32")
    x[F.HISTORY_MASK] = ops.convert_to_tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 0, 1]], "bool")
    model(x, training=False)  # builds the weights
    for weight in model.weights:  # away from the initial zeros/identity, so that biases and M count
        weight.assign(weight + np.random.default_rng(0).normal(0, 0.3, weight.shape).astype("float32"))
    context = model.encode_context(x, training=False)
    items, domains = np.array([3, 11, 5, 60], "int32"), np.array([0, 1, 1, 0], "int32")
    batched = ops.convert_to_numpy(model.score_items(context, ops.convert_to_tensor(items), ops.convert_to_tensor(domains)))
    assert batched.shape == (3, 4)
    for n in range(4):
        one = model.score(context, ops.convert_to_tensor(np.full(3, items[n])), ops.convert_to_tensor(np.full(3, domains[n])))
        np.testing.assert_allclose(batched[:, n], ops.convert_to_numpy(one), rtol=1e-4, atol=1e-5)
    assert np.std(batched) > 0.01  # the rows and items do differ


@pytest.mark.parametrize("name", FULL_SOFTMAX_MODELS)
def test_full_softmax_logits_are_the_candidate_then_every_item_of_its_domain(name):
    config = models.resolve_config(name, INPUTS)
    model = models.build(name, config)
    x = _inputs(config, [1, 6, 9], [0, 1, 1])
    catalogue = [np.array([1, 2, 3]), np.array([6, 7])]  # domain a: 1, 2, 3; domain b: 6, 7
    model.set_ranking_objective(catalogue, None)
    logits = ops.convert_to_numpy(model(x, training=False)[models.base.RANKING_LOGITS])
    assert logits.shape == (3, 1 + 5)
    context = model.encode_context(x, training=False)
    everything = ops.convert_to_numpy(model.score_items(context, ops.convert_to_tensor([1, 2, 3, 6, 7], "int32"),
                                                        ops.convert_to_tensor([0, 0, 0, 1, 1], "int32")))
    masked = models.base._MASKED_LOGIT
    # Row 0 clicked 1 in a: its negatives are 2 and 3. Row 1 clicked 6 in b: 7. Row 2 clicked 9 in
    # b (not in the catalogue): 6 and 7.
    kept = [[False, True, True, False, False], [False, False, False, False, True], [False, False, False, True, True]]
    np.testing.assert_allclose(logits[:, 1:], np.where(kept, everything, masked), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits[:, 0], ops.convert_to_numpy(model.score(context, x[F.ITEM_ID], x[F.DOMAIN])),
                               rtol=1e-4, atol=1e-5)
    loss = float(models.base.sampled_softmax_loss(logits, np.ones(3, "float32")))
    by_hand = np.mean([np.log(np.exp(logits[r, 0]) + np.exp(everything[r][np.array(kept[r])]).sum()) - logits[r, 0]
                       for r in range(3)])
    assert loss == pytest.approx(by_hand, rel=1e-4)
    model.clear_ranking_objective()
    assert set(model(x, training=False)) == {F.SERVING_OUTPUT}


def test_sampler_draws_uniformly_from_the_rows_domain():
    sampler = models.base._RankingSampler([np.array([3, 4, 5]), np.array([9]), np.array([], "int32")], 1000, seed=1)
    items, present = sampler.sample(ops.convert_to_tensor([0, 1, 2], "int32"))
    items, present = ops.convert_to_numpy(items), ops.convert_to_numpy(present)
    assert present.tolist() == [True, True, False]
    values, counts = np.unique(items[0], return_counts=True)
    assert values.tolist() == [3, 4, 5]
    assert np.all(np.abs(counts / 1000 - 1 / 3) < 0.06)  # 1000 draws: std of a share ~0.015
    assert set(items[1].tolist()) == {9}
    with pytest.raises(ValueError, match="every domain is empty"):
        models.base._RankingSampler([[], []], 4, seed=0)
    with pytest.raises(ValueError, match="negatives"):
        models.base._RankingSampler([[1]], 0, seed=0)


def test_sampled_softmax_loss_by_hand():
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, models.base._MASKED_LOGIT], [1.0, 1.0, 3.0]], "float32")
    labels = np.array([1.0, 0.0, 1.0], "float32")
    expected = (np.log(np.exp(2.0) + 2.0) - 2.0 + np.log(2 * np.e + np.exp(3.0)) - 1.0) / 2  # non-click row ignored
    assert float(models.base.sampled_softmax_loss(logits, labels)) == pytest.approx(expected, rel=1e-5)
    # A masked negative adds nothing: the row is a softmax over the candidate and one item.
    assert float(models.base.sampled_softmax_loss(logits[1:2], np.ones(1, "float32"))) == pytest.approx(
        np.log(1 + np.e), rel=1e-5)
    assert float(models.base.sampled_softmax_loss(logits, np.zeros(3, "float32"))) == 0.0


def test_training_config_checks_the_objective():
    with pytest.raises(ValueError, match="objective"):
        task.TrainingConfig(objective="listwise")
    with pytest.raises(ValueError, match="ranking_negatives"):
        task.TrainingConfig(objective="sampled_softmax", ranking_negatives=0)


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    return modelkit.generated_examples(tmp_path_factory.mktemp("ranking"), num_users=60, items_per_domain=30, seed=3)


def _train_files(examples):
    return sorted(tf.io.gfile.glob(os.path.join(examples, "Split-train", "*.gz")))


def test_domain_items_clicks_only_and_click_count(examples):
    contract = beam_pipeline.read_contract(examples)
    files = _train_files(examples)
    per_domain = preprocess.domain_item_ids(files, contract)
    assert list(per_domain) == list(contract.domains)
    everything = {bytes(i) for i in preprocess.distinct_item_ids(files, contract)}
    union = set().union(*({bytes(i) for i in ids} for ids in per_domain.values()))
    assert union <= everything and len(union) > 0.8 * len(everything)  # targets; histories repeat them
    for domain, ids in per_domain.items():  # the generator names items "<domain>:i<k>"
        assert all(i.startswith(domain.encode() + b":") for i in ids)
    config = task.resolve_model_config("dnn_multi", {}, contract, train_files=files)
    labels = [y.numpy() for _, y in preprocess.dataset(files, config.inputs, 32, clicks_only=True)]
    assert all(len(batch) == 32 for batch in labels[:-1])  # full batches of clicks
    everything_labels = np.concatenate([y.numpy() for _, y in preprocess.dataset(files, config.inputs, 64)])
    assert np.all(np.concatenate(labels) == 1.0)
    assert sum(len(b) for b in labels) == preprocess.count_clicks(files) == int(everything_labels.sum())
    pools = task.ranking_items(files, contract, config.inputs)
    assert [len(p) for p in pools] == [len(np.unique(preprocess.hash_ids(tf.constant(list(per_domain[d])),
                                                                         config.inputs.item_buckets).numpy()))
                                       for d in contract.domains]


def test_trainer_trains_the_ranking_objective_and_exports_the_served_graph(examples, tmp_path):
    contract = beam_pipeline.read_contract(examples)
    # Patience 3 runs every epoch with validation; no refit, so the model returned is the one validated.
    training = task.TrainingConfig(batch_size=32, epochs=3, early_stopping_patience=3, learning_rate=0.01,
                                   objective="sampled_softmax", ranking_negatives=8, refit=False)
    out = str(tmp_path / "model")
    model = task.train_and_export("dnn_multi", {}, contract, _train_files(examples), serving_model_dir=out,
                                  log_dir=str(tmp_path / "logs"), train_steps=90, validation_steps=2,
                                  training=training)
    history = model.history.history
    assert set(history) == {"loss", "val_loss"}  # no AUC on clicks alone
    # Untrained, the candidate is one of 9 near-equal logits: loss ~ log 9 = 2.20. The planted
    # preferences make it learnable: the loss falls well below that, also on held-out clicks.
    assert history["loss"][-1] < history["loss"][0] < np.log(9) - 0.3
    assert min(history["val_loss"]) < np.log(9) - 0.5
    assert model._ranking is None
    loaded = tf.saved_model.load(out)
    serialized = [r.numpy() for r in tf.data.TFRecordDataset(_train_files(examples), compression_type="GZIP").take(3)]
    served = loaded.signatures[F.SERVING_SIGNATURE](**{F.SERVING_INPUT: tf.constant(serialized)})
    assert set(served) == {F.SERVING_OUTPUT} and served[F.SERVING_OUTPUT].shape == (3,)
    # The exported model scores as the trained Keras model does.
    x = next(iter(preprocess.dataset(_train_files(examples), model.config.inputs, 3)))[0]
    np.testing.assert_allclose(served[F.SERVING_OUTPUT].numpy(),
                               keras.ops.convert_to_numpy(model(x, training=False)[F.SERVING_OUTPUT]), rtol=1e-4,
                               atol=1e-6)


def test_trainer_trains_the_full_softmax(examples, tmp_path):
    contract = beam_pipeline.read_contract(examples)
    files = _train_files(examples)
    training = task.TrainingConfig(batch_size=32, epochs=3, early_stopping_patience=3, learning_rate=0.01,
                                   objective="full_softmax", refit=False)
    model = task.train_and_export("sasrec", {}, contract, files, serving_model_dir=str(tmp_path / "model"),
                                  log_dir=str(tmp_path / "logs"), train_steps=90, validation_steps=2, training=training)
    history = model.history.history
    assert set(history) == {"loss", "val_loss"}
    # Untrained, the click is one of its domain's ~30 items (the candidate plus the others):
    # loss ~ log 30 = 3.4. The planted preferences make it learnable.
    smallest = min(len(p) for p in task.ranking_items(files, contract, model.config.inputs))
    assert smallest >= 20
    assert history["loss"][-1] < history["loss"][0]
    assert min(history["val_loss"]) < np.log(smallest) - 0.5
    assert model._ranking is None
    with pytest.raises(ValueError, match="no batched scorer"):
        task.train_and_export("dnn_multi", {}, contract, files, serving_model_dir=str(tmp_path / "dnn"),
                              log_dir=str(tmp_path / "dnn-logs"), train_steps=2, validation_steps=1, training=training)


def test_cli_flags_match_the_training_config():
    # The CLI spells the objectives and the default negatives itself (it does not import the
    # Trainer, and TensorFlow with it, to build its parser): they must stay task.py's.
    from xdctr import cli

    parser = cli.build_parser()
    run = parser.parse_args(["pipeline", "run", "--input", "x.jsonl"])
    assert (run.objective, run.ranking_negatives) == (task.TrainingConfig.objective, task.TrainingConfig.ranking_negatives)
    quality = parser.parse_args(["benchmark", "quality"])
    assert (quality.loo_objective, quality.ranking_negatives) == (task.SAMPLED_SOFTMAX, task.TrainingConfig.ranking_negatives)
    for objective in task.OBJECTIVES:
        assert parser.parse_args(["pipeline", "run", "--input", "x", "--objective", objective]).objective == objective
        assert parser.parse_args(["benchmark", "quality", "--loo-objective", objective]).loo_objective == objective
    from benchmarks import quality as quality_benchmark

    assert quality.loo_select == quality_benchmark.SELECTIONS[0]
    for select in quality_benchmark.SELECTIONS:
        assert parser.parse_args(["benchmark", "quality", "--loo-select", select]).loo_select == select
    with pytest.raises(cli.UsageError, match="invalid choice: 'listwise'"):
        parser.parse_args(["pipeline", "run", "--input", "x", "--objective", "listwise"])
