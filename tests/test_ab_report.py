"""`xdctr ab-report`: interval arithmetic, the join, a simulated experiment, and one run through a real router."""

from __future__ import annotations

import argparse
import gzip
import json
import math

import numpy as np
import pytest
import tensorflow as tf
import yaml

from components.ingest import generator
from serving import ab_report, client, router, server
from xdctr import features as F

# ----------------------------------------------------------------------------------------------
# Intervals, checked by hand


def test_wilson_interval_by_hand():
    # 10 clicks in 100: p = 0.1, z^2 = 3.8415; center = (0.1 + 3.8415/200) / (1 + 3.8415/100) = 0.11480,
    # half = 1.96 * sqrt(0.1 * 0.9 / 100 + 3.8415 / 40000) / 1.038415 = 0.05957.
    low, high = ab_report.wilson_interval(10, 100)
    assert (low, high) == pytest.approx((0.05523, 0.17437), abs=1e-5)
    assert ab_report.wilson_interval(0, 20)[0] == pytest.approx(0.0)  # Wilson stays inside [0, 1] without clipping tricks
    assert ab_report.wilson_interval(0, 0) is None


def test_proportion_difference_by_hand():
    # 10/100 vs 20/100: diff 0.1, se = sqrt(0.1 * 0.9 / 100 + 0.2 * 0.8 / 100) = 0.05, half = 1.96 * 0.05.
    diff, (low, high) = ab_report.proportion_difference(10, 100, 20, 100)
    assert diff == pytest.approx(0.1)
    assert (low, high) == pytest.approx((0.1 - 0.0979982, 0.1 + 0.0979982), abs=1e-6)
    assert ab_report.proportion_difference(1, 0, 1, 10) is None


def test_auc_standard_error_hanley_mcneil_by_hand():
    # A = 0.8, 50 positives, 50 negatives: Q1 = 0.8/1.2 = 0.66667, Q2 = 2*0.64/1.8 = 0.71111,
    # var = (0.16 + 49 * 0.02667 + 49 * 0.07111) / 2500 = 0.0019804, se = 0.044502.
    assert ab_report.auc_standard_error(0.8, 50, 50) == pytest.approx(0.044502, abs=1e-6)


# ----------------------------------------------------------------------------------------------
# The join


def line(ts, user, arm, items, scores, assigned=None, version=1):
    return {"request_id": f"r{ts}", "ts": ts, "user": user, "user_source": "tensor", "assignment": "hash",
            "assigned_arm": assigned or arm, "arm": arm, "model_name": "m", "model_version": version,
            "version_label": None, "signature_name": F.SERVING_SIGNATURE, "item_ids": items, "scores": scores}


def click(ts, user, item, clicked):
    return {F.LOG_TS: ts, F.LOG_USER_ID: user, F.LOG_DOMAIN: "d", F.LOG_ITEM_ID: item, F.LOG_CLICKED: clicked}


def test_join_rules_by_hand():
    lines = [
        line(1000.7, "u1", "a", ["i1", "i2", "i3", "i1"], [0.9, 0.8, 0.7, 0.6]),  # i1 twice: the 2nd is skipped
        line(2000.2, "u1", "a", ["i1"], [0.5]),
        line(1000.0, "u2", "b", ["i1", "i9"], [0.3, 0.2], assigned="a"),  # served by the fallback arm b
        line(1000.0, None, "b", ["i1"], [0.1]),  # no user: cannot be joined
    ]
    clicks = [
        click(1000, "u1", "i1", 1),  # same second as the request (1000.7 floors to 1000): joined
        click(1030, "u1", "i1", 0),  # the same impression again: the label stays 1
        click(1000 + 61, "u1", "i2", 1),  # after the 60 s window: not joined
        click(999, "u1", "i3", 1),  # before the request: not joined
        click(2030, "u1", "i1", 0),  # the latest request at or before 2030 is the one at 2000
        click(1010, "u2", "i1", 0),
        click(1020, "u2", "i9", 1),
        click(1000, "u3", "i1", 1),  # never scored
    ]
    report = ab_report.build_report(lines, clicks, window_seconds=60)
    a, b = report["arms"]["a"], report["arms"]["b"]
    # a: scored u1/i1, i2, i3 at 1000 and u1/i1 at 2000; shown: i1@1000 (clicked), i1@2000 (not).
    assert (a["requests"], a["users"], a["scored"], a["impressions"], a["clicks"]) == (2, 1, 4, 2, 1)
    assert a["ctr"] == pytest.approx(0.5)
    # The two labelled impressions: score 0.9 clicked, 0.5 not: AUC 1.
    assert a["auc"] == pytest.approx(1.0)
    assert (b["requests"], b["fallback_requests"], b["impressions"], b["fallback_impressions"], b["clicks"]) == (2, 1, 2, 2, 1)
    assert b["auc"] == pytest.approx(0.0)  # i9 (0.2) clicked, i1 (0.3) not
    assert report["inputs"] == {
        "assignment_lines": 4, "scored_examples": 8, "scored_without_user": 1, "scored_duplicate_item": 1,
        "scored_without_item": 0, "scored_not_shown": 2, "click_records": 8, "click_records_joined": 5,
        "click_records_unjoined": 3,
    }
    (difference,) = report["differences"]
    assert (difference["control"], difference["arm"], difference["ctr_diff"]) == ("a", "b", 0.0)


def test_control_must_be_an_arm():
    with pytest.raises(ValueError, match=r"control arm 'c' is not in the assignment log; arms there: \['a'\]"):
        ab_report.build_report([line(1, "u", "a", ["i"], [0.5])], [], control="c")


# ----------------------------------------------------------------------------------------------
# A simulated experiment


CANDIDATES = 4  # scored per request
SHOWN = 2  # the top-scored candidates the ad server shows
REQUEST_GAP = 100  # seconds between one user's requests
CLICK_DELAY = 5  # seconds from a request to the click-log record of what it showed


def simulate(tmp_path, users=800, seed=3):
    """Arm a scores with the generator's oracle_ctr plus small noise, arm b at random.

    Each user's generated impressions are cut into requests of CANDIDATES candidates. The arm
    scores them, the top SHOWN are shown, and their click-log records carry the generator's
    `clicked`, drawn from `oracle_ctr`. Writes the assignment log and a gzip click log; returns
    their paths.
    """
    config = router.ExperimentConfig(
        arms=[router.Arm("a", "-", "m", version=1), router.Arm("b", "-", "m", version=2)], salt="simulation")
    rng = np.random.default_rng(seed)
    log = generator.LogGenerator(generator.GeneratorConfig(num_users=users, mean_events_per_user=20, seed=seed))
    by_user = {}
    for record in log.records():
        by_user.setdefault(record[F.LOG_USER_ID], []).append(record)
    lines, clicks = [], []
    for user, records in by_user.items():
        arm = router.assign(user, config)
        for j in range(len(records) // CANDIDATES):
            candidates, seen = [], set()
            for record in records[j * CANDIDATES:(j + 1) * CANDIDATES]:
                if record[F.LOG_ITEM_ID] not in seen:
                    seen.add(record[F.LOG_ITEM_ID])
                    candidates.append(record)
            oracle = np.array([record[F.LOG_ORACLE_CTR] for record in candidates])
            if arm == "a":
                scores = np.clip(oracle + rng.normal(0, 0.02, size=len(oracle)), 0, 1)
            else:
                scores = rng.uniform(size=len(oracle))
            ts = generator.START_TS + j * REQUEST_GAP
            lines.append(line(ts + 0.25, user, arm, [r[F.LOG_ITEM_ID] for r in candidates], scores.tolist(),
                              version={"a": 1, "b": 2}[arm]))
            for k in np.argsort(-scores)[:SHOWN]:
                clicks.append(click(ts + CLICK_DELAY, user, candidates[k][F.LOG_ITEM_ID], candidates[k][F.LOG_CLICKED]))
    assignments_path, clicks_path = tmp_path / "assignments.jsonl", tmp_path / "clicks.jsonl.gz"
    assignments_path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with gzip.open(clicks_path, "wt") as f:
        f.write("".join(json.dumps(x) + "\n" for x in clicks))
    return str(assignments_path), str(clicks_path)


def test_simulated_experiment_shows_the_better_model(tmp_path):
    assignments, clicks = simulate(tmp_path)
    parser = argparse.ArgumentParser()
    ab_report.add_arguments(parser)
    out_dir = tmp_path / "report"
    args = parser.parse_args(["--assignments", assignments, "--clicks", str(tmp_path / "*.jsonl.gz"),
                              "--out-dir", str(out_dir), "--window-seconds", "60"])
    assert ab_report.run_from_args(args) == 0
    report = json.loads((out_dir / ab_report.REPORT_JSON).read_text())
    a, b = report["arms"]["a"], report["arms"]["b"]
    assert report["inputs"]["click_records_unjoined"] == 0
    assert report["inputs"]["click_records_joined"] == report["inputs"]["click_records"] == a["impressions"] + b["impressions"]
    assert min(a["impressions"], b["impressions"]) > 2000  # about half the users each
    assert a["model_versions"] == {"1": a["requests"]} and b["model_versions"] == {"2": b["requests"]}
    # Arm a ranks by the truth: its scores separate clicks (AUC near the oracle's), b's do not.
    assert a["auc_ci95"][0] > b["auc_ci95"][1]
    assert a["gauc_ci95"][0] > b["gauc_ci95"][1]
    assert b["auc_ci95"][0] < 0.5 < b["auc_ci95"][1]
    # ... and showing its top candidates earns more clicks: b - a is negative, its interval too.
    (difference,) = report["differences"]
    assert (difference["control"], difference["arm"]) == ("a", "b")
    assert difference["ctr_diff"] == pytest.approx(b["ctr"] - a["ctr"])
    assert difference["ctr_diff_ci95"][1] < 0
    assert difference["auc_diff_ci95"][1] < 0 and difference["gauc_diff_ci95"][1] < 0
    for arm in (a, b):
        low, high = arm["ctr_ci95"]
        assert low < arm["ctr"] < high
        assert arm["ctr"] == arm["clicks"] / arm["impressions"]
    markdown = (out_dir / ab_report.REPORT_MARKDOWN).read_text()
    assert f"| a | {a['requests']} | {a['users']} | {a['impressions']} | {a['clicks']} | {a['ctr']:.4f} |" in markdown
    assert "Wilson score interval" in markdown


def test_missing_inputs_and_bad_lines_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no assignment log file matches"):
        list(ab_report.read_assignment_log([str(tmp_path / "nothing*.jsonl")]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(line(1, "u", "a", ["i"], [0.5])) + "\n" + json.dumps({"ts": 1}) + "\n")
    with pytest.raises(ValueError, match=rf"^{bad}:2: assignment-log line lacks field\(s\) \['user', 'arm'"):
        list(ab_report.read_assignment_log([str(bad)]))


def test_bad_click_records_are_counted_and_skipped(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps(line(1000, "u", "a", ["i"], [0.5])) + "\n")
    (tmp_path / "clicks.csv").write_text("ts,user_id,domain,item_id,clicked\n1001,u,d,i,1\n1002,u,d,i,maybe\n")
    report = ab_report.run([str(tmp_path / "a.jsonl")], [str(tmp_path / "clicks.csv")], str(tmp_path / "out"))
    assert report["inputs"]["click_records_bad"] == 1
    assert (report["arms"]["a"]["impressions"], report["arms"]["a"]["clicks"]) == (1, 1)


# ----------------------------------------------------------------------------------------------
# End to end: a real router writes the assignment log


def save_constant_model(path, score: float) -> None:
    module = tf.Module()

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=F.SERVING_INPUT)])
    def serve(examples):
        users = tf.io.parse_example(examples, {F.USER_ID: tf.io.FixedLenFeature([], tf.string)})[F.USER_ID]
        return {F.SERVING_OUTPUT: tf.ones_like(tf.strings.length(users), dtype=tf.float32) * score}  # (batch,)

    module.serve = serve
    tf.saved_model.save(module, str(path), signatures={F.SERVING_SIGNATURE: serve})


def example(user: str, item: str) -> bytes:
    feature = {F.USER_ID: tf.train.Feature(bytes_list=tf.train.BytesList(value=[user.encode()])),
               F.ITEM_ID: tf.train.Feature(bytes_list=tf.train.BytesList(value=[item.encode()]))}
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def test_report_from_a_real_router(tmp_path):
    base = tmp_path / "models"
    save_constant_model(base / "1", 0.25)
    save_constant_model(base / "2", 0.5)
    grpc_server, port, _ = server.start_server("ctr", str(base), port=0, max_workers=2)
    running = None
    try:
        config = {"salt": "e2e", "forced": {"ua": "a", "ub": "b"}, "arms": [
            {"name": "a", "backend": f"127.0.0.1:{port}", "model_name": "ctr", "version": 1, "weight": 1},
            {"name": "b", "backend": f"127.0.0.1:{port}", "model_name": "ctr", "version": 2, "weight": 1}]}
        (tmp_path / "experiment.yaml").write_text(yaml.safe_dump(config))
        log_path = tmp_path / "assignments.jsonl"
        running = router.start_router(str(tmp_path / "experiment.yaml"), assignment_log=str(log_path))
        target = f"127.0.0.1:{running.port}"
        for user in ("ua", "ub"):
            scores = client.predict_examples(target, "ctr", [example(user, f"{user}-i{k}") for k in range(3)])
            assert scores.tolist() == [{"ua": 0.25, "ub": 0.5}[user]] * 3
    finally:
        if running is not None:
            running.stop(None)
        grpc_server.stop(None)
    now = math.floor(json.loads(log_path.read_text().splitlines()[0])["ts"])
    clicks = [click(now + 1, "ua", "ua-i0", 1), click(now + 1, "ua", "ua-i1", 0),
              click(now + 2, "ub", "ub-i0", 0), click(now + 2, "ub", "ub-i2", 0)]
    (tmp_path / "clicks.jsonl").write_text("".join(json.dumps(c) + "\n" for c in clicks))
    report = ab_report.run([str(log_path)], [str(tmp_path / "clicks.jsonl")], str(tmp_path / "report"))
    a, b = report["arms"]["a"], report["arms"]["b"]
    assert (a["requests"], a["scored"], a["impressions"], a["clicks"], a["model_versions"]) == (1, 3, 2, 1, {"1": 1})
    assert (b["requests"], b["scored"], b["impressions"], b["clicks"], b["model_versions"]) == (1, 3, 2, 0, {"2": 1})
    assert a["auc"] == pytest.approx(0.5)  # one constant score per arm: every pair tied
    assert b["auc"] is None  # no clicks
    assert report["differences"][0]["ctr_diff"] == pytest.approx(-0.5)
