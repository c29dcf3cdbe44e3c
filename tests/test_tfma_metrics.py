"""GAUC as a TFMA metric: hand-worked combiner values, then TFMA's real Beam evaluation on random
data with ties and single-class users against the NumPy reference and per-user scikit-learn AUC,
overall and per domain, plus value and change thresholds that pass and fail."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_analysis as tfma
from sklearn.metrics import roc_auc_score
from tensorflow_model_analysis.metrics import metric_specs, metric_types
from tensorflow_model_analysis.proto import config_pb2

from components.evaluation import metrics as reference
from components.evaluation import tfma_metrics as M
from xdctr import features as F

# Prediction columns stored in the test examples (model-less evaluation); not contract features.
SCORE = "test_score"
BASELINE_SCORE = "test_baseline_score"
CANDIDATE, BASELINE = "candidate", "baseline"
DOMAINS = ("a", "b")
TOLERANCE = 1e-9


# ---- the combiner on hand-worked inputs (no Beam) ---------------------------------------------------


def example(user, label, score, weight=1.0):
    return metric_types.StandardMetricInputs(
        labels=np.array([float(label)]), predictions=np.array([score], dtype=np.float32),
        example_weights=np.array([weight]), features={F.USER_ID: np.array([user], dtype=object)})


def run_combiner(inputs, example_weighted=False, split=None):
    (computation,) = M.GAUC().computations(example_weighted=example_weighted)
    combiner = computation.combiner
    parts = [inputs] if split is None else [inputs[:split], inputs[split:]]
    accumulators = []
    for part in parts:
        accumulator = combiner.create_accumulator()
        for element in part:
            accumulator = combiner.add_input(accumulator, element)
        accumulators.append(accumulator)
    output = combiner.extract_output(combiner.merge_accumulators(accumulators))
    return {key.name: value for key, value in output.items()}


# u1: positive 0.9 vs negatives {0.5, 0.9}: a win and a tie -> 0.75 on 3 impressions.
# u2: positive 0.2 below negative 0.8 -> 0 on 2 impressions. u3: clicks only -> skipped.
# GAUC = (0.75 * 3 + 0 * 2) / 5 = 0.45.
HAND_INPUTS = [example(b"u1", 1, 0.9), example(b"u2", 0, 0.8), example(b"u1", 0, 0.5), example(b"u3", 1, 0.4),
               example(b"u1", 0, 0.9), example(b"u2", 1, 0.2), example(b"u3", 1, 0.6)]


@pytest.mark.parametrize("split", [None, 2, 5])
def test_combiner_by_hand_with_ties_and_merged_accumulators(split):
    result = run_combiner(HAND_INPUTS, split=split)
    assert result == {M.GAUC_NAME: pytest.approx(0.45, abs=1e-12), M.GAUC_USERS_NAME: 2, M.GAUC_USERS_SKIPPED_NAME: 1}


def test_combiner_example_weight_counts_like_repeated_impressions():
    # u1's negative 0.5 weighted 2 == that impression twice: positive 0.9 beats 0.5 twice, ties 0.9
    # once -> 2.5 / 3 on 4 impressions; u2 as above -> 0 on 2.
    weighted = [example(b"u1", 1, 0.9), example(b"u1", 0, 0.5, weight=2.0), example(b"u1", 0, 0.9),
                example(b"u2", 0, 0.8), example(b"u2", 1, 0.2)]
    result = run_combiner(weighted, example_weighted=True)
    assert result[M.GAUC_NAME] == pytest.approx((2.5 / 3 * 4 + 0.0 * 2) / 6, abs=1e-12)
    assert run_combiner(weighted)[M.GAUC_NAME] == pytest.approx((0.75 * 3 + 0.0 * 2) / 5, abs=1e-12)


def test_combiner_nan_when_every_user_is_skipped():
    result = run_combiner([example(b"u1", 1, 0.3), example(b"u2", 0, 0.3)])
    assert np.isnan(result[M.GAUC_NAME])
    assert (result[M.GAUC_USERS_NAME], result[M.GAUC_USERS_SKIPPED_NAME]) == (0, 2)


def test_combiner_rejects_non_binary_labels_and_missing_user():
    with pytest.raises(ValueError, match="binary labels"):
        run_combiner([example(b"u1", 0.5, 0.3)])
    missing_user = metric_types.StandardMetricInputs(
        labels=np.array([1.0]), predictions=np.array([0.5]), example_weights=np.array([1.0]), features={})
    with pytest.raises(ValueError, match=F.USER_ID):
        run_combiner([missing_user])


def test_query_key_is_rejected():
    with pytest.raises(ValueError, match="query_key"):
        M.GAUC().computations(query_key=F.USER_ID)


def test_metric_config_round_trip_and_threshold_builders():
    config = M.gauc_metric_config(user_key="viewer", name="viewer_gauc")
    assert (config.class_name, config.module) == ("GAUC", "components.evaluation.tfma_metrics")
    assert json.loads(config.config) == {"user_key": "viewer", "name": "viewer_gauc"}
    instance = metric_specs.metric_instance(config)
    assert isinstance(instance, M.GAUC)
    assert (instance.name, instance.get_config()["user_key"]) == ("viewer_gauc", "viewer")
    keys = {key.name for key in instance.computations()[0].keys}
    assert keys == {"viewer_gauc", "viewer_gauc_users", "viewer_gauc_users_skipped"}

    threshold = M.gauc_threshold(min_value=0.6, max_drop=0.01)
    assert threshold.value_threshold.lower_bound.value == pytest.approx(0.6)
    assert threshold.change_threshold.absolute.value == pytest.approx(-0.01)
    assert threshold.change_threshold.direction == config_pb2.MetricDirection.HIGHER_IS_BETTER
    with pytest.raises(ValueError, match="max_drop"):
        M.gauc_threshold(max_drop=-0.1)
    with pytest.raises(ValueError, match="min_value"):
        M.gauc_threshold(min_value=1.5)
    with pytest.raises(ValueError, match="per_slice_thresholds"):
        M.gauc_metric_config(per_slice_thresholds=[threshold])


# ---- TFMA's Beam evaluation on random data -------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """~50 users, 1-12 impressions each over two domains, scores rounded to 1 decimal (ties)."""
    rng = np.random.default_rng(7)
    rows = []
    for user in range(50):
        kind = user % 5  # 0: clicks only, 1: no clicks, else mixed
        for _ in range(rng.integers(1, 13)):
            label = 1 if kind == 0 else 0 if kind == 1 else int(rng.random() < 0.4)
            score = np.clip(0.3 * label + 0.7 * rng.random(), 0.0, 1.0)
            rows.append({F.USER_ID: f"user{user}".encode(), F.DOMAIN: DOMAINS[rng.integers(0, 2)].encode(),
                         F.LABEL: label, SCORE: np.float32(np.round(score, 1)),
                         BASELINE_SCORE: np.float32(np.round(rng.random(), 1))})
    path = str(tmp_path_factory.mktemp("gauc") / "eval.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for row in rows:
            feature = {
                F.USER_ID: tf.train.Feature(bytes_list=tf.train.BytesList(value=[row[F.USER_ID]])),
                F.DOMAIN: tf.train.Feature(bytes_list=tf.train.BytesList(value=[row[F.DOMAIN]])),
                F.LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[row[F.LABEL]])),
                SCORE: tf.train.Feature(float_list=tf.train.FloatList(value=[row[SCORE]])),
                BASELINE_SCORE: tf.train.Feature(float_list=tf.train.FloatList(value=[row[BASELINE_SCORE]])),
            }
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    columns = {key: np.array([row[key] for row in rows]) for key in rows[0]}
    return path, columns


def expected(columns, score_key, domain=None):
    """(reference GAUC, users, skipped, sklearn GAUC, calibration) on the rows of `domain` (None: all)."""
    mask = np.ones(len(columns[F.LABEL]), bool) if domain is None else columns[F.DOMAIN] == domain.encode()
    users, labels = columns[F.USER_ID][mask], columns[F.LABEL][mask]
    scores = columns[score_key][mask].astype(np.float64)  # the float32 values the examples hold
    value, counted, skipped = reference.gauc(users, labels, scores)
    total = weight = 0.0
    for user in np.unique(users):
        in_user = users == user
        if len(np.unique(labels[in_user])) == 2:
            total += roc_auc_score(labels[in_user], scores[in_user]) * in_user.sum()
            weight += in_user.sum()
    return value, counted, skipped, total / weight, reference.calibration(labels, scores)


def evaluate(path, output_path, candidate_key, baseline_key, per_slice_thresholds):
    """Model-less TFMA run: the candidate's and the baseline's predictions are example features."""
    eval_config = config_pb2.EvalConfig(
        model_specs=[config_pb2.ModelSpec(name=CANDIDATE, prediction_key=candidate_key, label_key=F.LABEL),
                     config_pb2.ModelSpec(name=BASELINE, prediction_key=baseline_key, label_key=F.LABEL,
                                          is_baseline=True)],
        slicing_specs=[config_pb2.SlicingSpec(), config_pb2.SlicingSpec(feature_keys=[F.DOMAIN])],
        metrics_specs=[M.metrics_spec(per_slice_thresholds=per_slice_thresholds,
                                      metrics=[config_pb2.MetricConfig(class_name="Calibration")])],
    )
    # Materialized-prediction "models": no SavedModel, but TFMA knows there is a baseline.
    models = [tfma.types.EvalSharedModel(model_path="", model_name=name, is_baseline=name == BASELINE,
                                         model_type=tfma.constants.MATERIALIZED_PREDICTION,
                                         include_default_metrics=False) for name in (CANDIDATE, BASELINE)]
    tfma.run_model_analysis(eval_shared_model=models, eval_config=eval_config, data_location=path,
                            output_path=output_path)
    metrics = {}
    for metrics_for_slice in tfma.load_metrics(output_path):
        domain = metrics_for_slice.slice_key.single_slice_keys[0].bytes_value.decode() \
            if metrics_for_slice.slice_key.single_slice_keys else None
        for entry in metrics_for_slice.metric_keys_and_values:
            metrics[(domain, entry.key.model_name, entry.key.name, entry.key.is_diff)] = entry.value.double_value.value
    return metrics, tfma.load_validation_result(output_path)


def slice_thresholds(columns, candidate_key, above):
    """Value threshold just above/below the candidate's true overall GAUC; no GAUC drop per domain."""
    overall = expected(columns, candidate_key)[0]
    return [([config_pb2.SlicingSpec()], M.gauc_threshold(min_value=overall + (1e-6 if above else -1e-6))),
            ([config_pb2.SlicingSpec(feature_keys=[F.DOMAIN])], M.gauc_threshold(max_drop=0.0))]


@pytest.fixture(scope="module")
def passing_run(data, tmp_path_factory):
    path, columns = data
    return evaluate(path, str(tmp_path_factory.mktemp("pass")), SCORE, BASELINE_SCORE,
                    slice_thresholds(columns, SCORE, above=False))


def test_data_has_ties_single_class_users_and_a_better_candidate(data):
    _, columns = data
    assert len(np.unique(columns[SCORE])) <= 11 < len(columns[SCORE])
    for domain in (None,) + DOMAINS:
        candidate, _, skipped, _, _ = expected(columns, SCORE, domain)
        assert skipped >= 10
        assert candidate > expected(columns, BASELINE_SCORE, domain)[0]


@pytest.mark.parametrize("domain", (None,) + DOMAINS)
def test_tfma_gauc_matches_reference_and_sklearn_per_slice(data, passing_run, domain):
    _, columns = data
    metrics, _ = passing_run
    for model, score_key in ((CANDIDATE, SCORE), (BASELINE, BASELINE_SCORE)):
        value, counted, skipped, sklearn_value, calibration = expected(columns, score_key, domain)
        assert abs(metrics[(domain, model, M.GAUC_NAME, False)] - value) < TOLERANCE
        assert abs(metrics[(domain, model, M.GAUC_NAME, False)] - sklearn_value) < TOLERANCE
        assert metrics[(domain, model, M.GAUC_USERS_NAME, False)] == counted
        assert metrics[(domain, model, M.GAUC_USERS_SKIPPED_NAME, False)] == skipped
        # TFMA's own Calibration is mean prediction / observed CTR.
        assert abs(metrics[(domain, model, "calibration", False)] - calibration) < TOLERANCE
    diff = metrics[(domain, CANDIDATE, M.GAUC_NAME, True)]
    assert abs(diff - (expected(columns, SCORE, domain)[0] - expected(columns, BASELINE_SCORE, domain)[0])) < TOLERANCE


def test_thresholds_pass_just_below_true_value_and_with_better_candidate(passing_run):
    _, validation = passing_run
    assert validation.validation_ok, validation


def test_thresholds_fail_just_above_true_value_and_with_worse_candidate(data, tmp_path_factory):
    path, columns = data
    # The candidate is the worse model here: its GAUC drops against the baseline in both domains.
    _, validation = evaluate(path, str(tmp_path_factory.mktemp("fail")), BASELINE_SCORE, SCORE,
                             slice_thresholds(columns, BASELINE_SCORE, above=True))
    assert not validation.validation_ok
    failures = set()
    for failing_slice in validation.metric_validations_per_slice:
        keys = failing_slice.slice_key.single_slice_keys
        domain = keys[0].bytes_value.decode() if keys else None
        for failure in failing_slice.failures:
            failures.add((domain, failure.metric_key.name, failure.metric_key.is_diff))
    assert failures == {(None, M.GAUC_NAME, False), ("a", M.GAUC_NAME, True), ("b", M.GAUC_NAME, True)}
