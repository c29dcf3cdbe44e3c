"""NumPy CTR metrics against scikit-learn and hand-worked values."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from components.evaluation import metrics


def test_auc_by_hand_with_ties():
    # pairs (pos, neg): (0.8 vs 0.2) win, (0.8 vs 0.5) win, (0.5 vs 0.2) win, (0.5 vs 0.5) tie -> 3.5 / 4.
    assert metrics.auc([1, 1, 0, 0], [0.8, 0.5, 0.5, 0.2]) == pytest.approx(0.875)
    assert metrics.auc([1, 1], [0.1, 0.2]) is None


def test_auc_matches_sklearn_on_random_data_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    scores = np.round(rng.random(500), 1)  # many ties
    assert abs(metrics.auc(labels, scores) - roc_auc_score(labels, scores)) < 1e-12


def test_gauc_weights_users_by_impressions_and_skips_single_class_users():
    users = ["a", "a", "a", "a", "b", "b", "c", "c"]
    labels = [1, 0, 0, 1, 1, 0, 1, 1]
    scores = [0.9, 0.1, 0.8, 0.2, 0.3, 0.7, 0.5, 0.6]
    # a: pos {0.9, 0.2} vs neg {0.1, 0.8}: 0.9>0.1, 0.9>0.8, 0.2>0.1, 0.2<0.8 -> 3/4; 4 impressions.
    # b: 0.3 < 0.7 -> 0; 2 impressions. c: all clicked -> skipped.
    value, counted, skipped = metrics.gauc(users, labels, scores)
    assert (counted, skipped) == (2, 1)
    assert abs(value - (0.75 * 4 + 0.0 * 2) / 6) < 1e-12


def test_gauc_matches_per_user_sklearn():
    rng = np.random.default_rng(1)
    users = rng.integers(0, 30, 600)
    labels = rng.integers(0, 2, 600)
    scores = np.round(rng.random(600), 2)
    expected_total, expected_weight = 0.0, 0
    for u in np.unique(users):
        mask = users == u
        if len(set(labels[mask])) == 2:
            expected_total += roc_auc_score(labels[mask], scores[mask]) * mask.sum()
            expected_weight += mask.sum()
    value, _, _ = metrics.gauc(users, labels, scores)
    assert abs(value - expected_total / expected_weight) < 1e-12


def test_log_loss_and_calibration():
    assert abs(metrics.log_loss([1, 0], [0.5, 0.5]) - np.log(2)) < 1e-12
    assert metrics.calibration([1, 0, 0, 0], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(2.0)
