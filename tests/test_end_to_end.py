"""The whole path on tiny data: a baseline and a cross-domain model through the TFX pipeline
(LocalDagRunner, temp dir), both evaluated side by side, the HTML report, `xdctr serve` with both
pushed versions, Predict round trips, and a 2-arm experiment through `xdctr route`."""

import os

import numpy as np
import pytest

from xdctr import demo

pytestmark = pytest.mark.slow  # make test-fast skips these


def test_pipeline_push_compare_serve_and_route(tmp_path, capsys):
    # max_gauc_drop=1: the tiny candidate is always blessed, so both versions are pushed and served.
    result = demo.run(str(tmp_path), source="generated", baseline="mean_pool_dnn", candidate="dasl", users=120,
                      train_steps=80, eval_fraction=0.2, max_gauc_drop=1.0, num_scores=16, routed_users=60)
    out = capsys.readouterr().out

    for metrics in (result["metrics"], result["baseline_metrics"]):
        overall = metrics[""]
        assert 0.0 < overall["auc"] < 1.0 and 0.0 < overall["gauc"] < 1.0
        assert overall["example_count"] > 0 and overall["gauc_users"] > 0
        assert {"domain=grocery", "domain=kitchen"} <= set(metrics)
    # The same eval split for both models, and the side-by-side table shows both.
    assert result["metrics"][""]["example_count"] == result["baseline_metrics"][""]["example_count"]
    assert result["blessed"] == {"mean_pool_dnn": True, "dasl": True}
    assert "AUC mean_pool_dnn" in out and "GAUC dasl" in out and "domain=kitchen" in out
    assert "summary" in out and "total" in out
    assert os.path.isfile(os.path.join(result["report_dir"], "report.html"))
    assert os.path.isfile(tmp_path / "comparison.txt")

    assert len(result["new_versions"]) == 2
    for version_dir in result["version_dirs"]:
        assert os.path.dirname(version_dir) == str(tmp_path / "serving" / demo.MODEL_NAME)
        assert os.path.isfile(os.path.join(version_dir, "saved_model.pb"))
        assert os.path.isfile(os.path.join(version_dir, "model_config.json"))

    served, expected = result["served"], result["expected"]
    assert served.shape == expected.shape == (16,)
    np.testing.assert_allclose(served, expected, rtol=1e-6, atol=1e-7)
    assert np.all((served > 0) & (served < 1))

    # 50/50 by user: both arms served, each by its own version.
    stable, canary = result["versions"]
    assert stable != canary
    versions_by_arm = {}
    for a in result["assignments"]:
        versions_by_arm.setdefault(a["arm"], set()).add(a["model_version"])
    assert versions_by_arm == {"stable": {stable}, "canary": {canary}}
    assert len(result["assignments"]) == 60
    # The server's and router's JSON logs go to files, not the demo's console.
    for name, event in (("serve", "server_started"), ("route", "router_started")):
        with open(tmp_path / "serving" / f"{name}.log") as f:
            assert f'"event": "{event}"' in f.read()
    assert '"event": "server_started"' not in out


def test_side_by_side_table_by_hand():
    baseline = {"": {"auc": 0.55, "gauc": 0.54, "example_count": 10},
                "domain=a": {"auc": 0.5, "gauc": 0.5, "example_count": 6}}
    candidate = {"": {"auc": 0.60, "gauc": 0.56, "example_count": 10},
                 "domain=a": {"auc": 0.52, "gauc": 0.49, "example_count": 6},
                 "cold_start=1": {"auc": 0.7, "gauc": 0.65, "example_count": 2}}
    lines = demo.side_by_side(baseline, candidate, "base", "cand").splitlines()
    assert lines[0].split() == ["slice", "examples", "AUC", "base", "AUC", "cand", "gain", "GAUC", "base", "GAUC",
                                "cand", "gain"]
    assert lines[1].split() == ["overall", "10", "0.5500", "0.6000", "+0.0500", "0.5400", "0.5600", "+0.0200"]
    assert lines[2].split() == ["domain=a", "6", "0.5000", "0.5200", "+0.0200", "0.5000", "0.4900", "-0.0100"]
    assert lines[3].split()[:3] == ["cold_start=1", "2", "nan"]  # no baseline number for a slice it lacks
