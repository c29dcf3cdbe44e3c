"""`benchmarks/quality.py`: the issue's targets checked against hand-made results."""

import pytest

from benchmarks import oracle, quality


def _auc_run(model, seed, auc, gauc, cold):
    return {"model": model, "seed": seed, "quality": {"overall": {"auc": auc, "gauc": gauc},
                                                      "cold_start": {"auc": cold, "gauc": cold}}}


def _loo_run(model, seed, food, kitchen, baseline=None):
    test = {"domain=grocery_gourmet_food": {"hr@10": food}, "domain=home_kitchen": {"hr@10": kitchen}}
    return {"run": model, "seed": seed, "baseline": baseline, "splits": {"test": test}}


def test_targets_report_what_was_measured():
    results = {
        "generated": [{"model": "oracle", "quality": {"overall": {"auc": 0.9}, "cold_start": {"auc": 0.88}}},
                      _auc_run("man", 0, 0.86, 0.85, 0.80), _auc_run("man", 1, 0.84, 0.83, 0.82),
                      _auc_run("dnn_multi", 0, 0.80, 0.80, 0.78), _auc_run("dnn_multi", 1, 0.80, 0.80, 0.78)],
        "food-kitchen": [_auc_run("dnn_multi", s, 0.53, g, 0.5) for s, g in ((0, 0.530), (1, 0.532), (2, 0.534))]
                        + [_auc_run("dasl", s, 0.55, g, 0.5) for s, g in ((0, 0.545), (1, 0.546), (2, 0.547))]
                        + [_auc_run("man", s, 0.55, g, 0.5) for s, g in ((0, 0.530), (1, 0.540), (2, 0.550))],
        "food-kitchen-loo": [_loo_run("popularity", 0, 0.9, 0.9, baseline="popularity"),
                             _loo_run("syncrec", 0, 0.26, 0.17), _loo_run("syncrec", 1, 0.28, 0.19),
                             _loo_run("dnn_multi", 0, 0.20, 0.10)],
    }
    lines = quality.targets(results)
    # generated: man's mean AUC 0.85 (met); its cold-start AUC 0.81 vs dnn_multi's 0.78: +0.03 (met).
    assert lines[0] == ("- generated: best cross-domain model man AUC 0.8500 (target >= 0.85: met); its cold-start "
                        "AUC minus the best baseline's (dnn_multi): +0.0300 (target >= +0.02: met)")
    # Leave-one-out: references are not candidates; syncrec's means 0.27 and 0.18.
    assert lines[1].startswith("- food-kitchen leave-one-out, grocery_gourmet_food: best HR@10 syncrec 0.2700 "
                               "(target >= 0.25: met; ABXI 0.3243)")
    assert "home_kitchen: best HR@10 syncrec 0.1800 (target >= 0.18: met" in lines[2]
    # dasl: +0.014 over dnn_multi, std 0.001 and 0.002: 2 * hypot = 0.0045 -> beats it.
    # man: +0.008 but std 0.01: 2 * hypot(0.01, 0.002) = 0.0204 -> does not.
    assert lines[3] == ("- food-kitchen AUC protocol: dasl GAUC 0.5460 vs dnn_multi 0.5320: +0.0140, 2 std of the "
                        "difference 0.0045 (beats it by more than 2 std)")
    assert lines[4].endswith("+0.0080, 2 std of the difference 0.0204 (does NOT beat it by more than 2 std)")
    assert len(lines) == 5

    # With the generated log's ceilings, the posterior row is named after the generated target.
    ceilings = {"overall": {oracle.POSTERIOR: {"auc": 0.8755}}, "cold_start": {oracle.POSTERIOR: {"auc": 0.818}}}
    with_ceilings = quality.targets(results, ceilings)
    assert with_ceilings[1] == ("- generated: the best any model can do from the users' earlier impressions (the "
                                "posterior ceiling): AUC 0.8755, cold-start AUC 0.8180; man is 0.0255 AUC below it")
    assert with_ceilings[:1] + with_ceilings[2:] == lines


def test_targets_compare_runs_trained_with_the_same_overrides():
    v = "[item_buckets=vocabulary]"
    results = {
        "generated": [_auc_run("syncrec" + v, 0, 0.86, 0.85, 0.80), _auc_run("bilinear_recency" + v, 0, 0.84, 0.8, 0.77),
                      _auc_run("syncrec", 0, 0.84, 0.83, 0.76), _auc_run("bilinear_recency", 0, 0.85, 0.8, 0.78)],
        "food-kitchen": [_auc_run("dnn_multi", s, 0.53, g, 0.5) for s, g in ((0, 0.530), (1, 0.532))]
                        + [_auc_run("dasl", s, 0.55, g, 0.5) for s, g in ((0, 0.531), (1, 0.533))]
                        + [_auc_run("dnn_multi" + v, s, 0.53, g, 0.5) for s, g in ((0, 0.520), (1, 0.522))]
                        + [_auc_run("dasl" + v, s, 0.55, g, 0.5) for s, g in ((0, 0.545), (1, 0.547))],
    }
    lines = quality.targets(results)
    assert lines[0].startswith("- generated: best cross-domain model syncrec AUC 0.8400 (target >= 0.85: NOT met); "
                               "its cold-start AUC minus the best baseline's (bilinear_recency): -0.0200")
    assert lines[1].startswith(f"- generated: best cross-domain model syncrec{v} AUC 0.8600 (target >= 0.85: met); "
                               f"its cold-start AUC minus the best baseline's (bilinear_recency{v}): +0.0300")
    assert lines[2].startswith("- food-kitchen AUC protocol: dasl GAUC 0.5320 vs dnn_multi 0.5310: +0.0010")
    assert lines[3].startswith(f"- food-kitchen AUC protocol: dasl{v} GAUC 0.5460 vs dnn_multi{v} 0.5210: +0.0250")
    assert len(lines) == 4


def test_the_generated_set_reports_the_logs_ceilings(tmp_path, monkeypatch):
    """The generated set's section and JSON carry `benchmark oracle`'s ceilings of the same log."""
    import json
    import os

    users = 60
    runs = [_auc_run("man", 0, 0.70, 0.70, 0.65), _auc_run("dnn_multi", 0, 0.68, 0.68, 0.60)]

    def fake_train_run(models, set_dir, json_path, **kwargs):  # training is `benchmark train`'s, tested there
        os.makedirs(set_dir, exist_ok=True)
        with open(json_path, "w") as f:
            json.dump({"results": runs, "summary": [], "data": {"domains": ["grocery", "kitchen"]}}, f)

    monkeypatch.setattr(quality.train, "prepare_data", lambda set_dir, n, seed: str(tmp_path / "examples"))
    monkeypatch.setattr(quality.train, "run", fake_train_run)
    monkeypatch.setattr(quality.train, "markdown_table", lambda table, slices: "(table)")
    out, md = tmp_path / "q.json", tmp_path / "q.md"
    quality.run(["man", "dnn_multi"], str(tmp_path), str(out), str(md), sets=["generated"], seeds=[0], users=users)
    written = json.loads(out.read_text())
    expected = oracle.compute(users, quality.GENERATED_DATA_SEED, quality.GENERATED_EVAL_FRACTION)["results"]
    assert written["generated_ceilings"]["overall"][oracle.POSTERIOR]["auc"] == \
        pytest.approx(expected["overall"][oracle.POSTERIOR]["auc"], abs=1e-9)
    text = md.read_text()
    assert "### generated: what the log allows" in text and f"| {oracle.POSTERIOR} |" in text
    assert "the posterior ceiling" in text


def test_loo_train_part_has_the_asked_negatives_in_its_own_directory(tmp_path, monkeypatch):
    """--loo-negatives K: the train part gets K uniform non-clicks per click, under food-kitchen-loo-kK."""
    import gzip
    import json
    import os

    csv = tmp_path / "interactions.csv"
    rows = ["user_id,item_id,domain,ts"]
    for u in range(6):
        for t in range(5):
            domain = "grocery" if t % 2 else "kitchen"
            rows.append(f"u{u},{domain[0]}{(u + t) % 40},{domain},{1000 + 10 * t}")
    rows += [f"x{i},{d[0]}{i},{d},1" for i in range(40) for d in ("grocery", "kitchen")]  # the item pool
    csv.write_text("\n".join(rows) + "\n")
    monkeypatch.setattr(quality, "_interactions", lambda name: str(csv))
    assert quality.loo_dir(str(tmp_path)) == os.path.join(str(tmp_path), "food-kitchen-loo")
    for k in (4, 7):
        _, examples = quality.prepare_loo(str(tmp_path), negatives=k)
        assert examples == os.path.join(quality.loo_dir(str(tmp_path), k), "examples")
        with gzip.open(os.path.join(quality.loo_dir(str(tmp_path), k), "train.jsonl.gz"), "rt") as f:
            log = [json.loads(line) for line in f]
        clicks = sum(r["clicked"] for r in log)
        assert clicks > 0 and len(log) - clicks == k * clicks
    assert quality.loo_dir(str(tmp_path), 7).endswith("food-kitchen-loo-k7")
    # --loo-history-length L: the same train part ingested again with L-click mixed histories.
    from components.ingest import beam_pipeline

    _, default = quality.prepare_loo(str(tmp_path), negatives=4)
    _, longer = quality.prepare_loo(str(tmp_path), negatives=4, history_length=3)
    assert longer == os.path.join(quality.loo_dir(str(tmp_path)), "examples-h3")
    assert beam_pipeline.read_contract(default).history_length == 20
    assert beam_pipeline.read_contract(longer).history_length == 3
    assert beam_pipeline.read_summary(longer)["rows"] == beam_pipeline.read_summary(default)["rows"]
