"""`xdctr evaluate` on a real exported model and `xdctr compare` on hand-written runs."""

import argparse
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from components.evaluation import metrics, report
from components.ingest import beam_pipeline, generator
from components.trainer import task
from xdctr import features as F

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model dir, eval examples pattern) of a 2-step mean_pool_dnn trained on a tiny generated log."""
    tmp = tmp_path_factory.mktemp("report")
    log = str(tmp / "log.jsonl")
    generator.generate_file(generator.GeneratorConfig(num_users=60, items_per_domain=30, seed=7), log)
    examples = str(tmp / "examples")
    beam_pipeline.run(beam_pipeline.IngestConfig(input_patterns=(log,), history_length=4, domain_history_length=3),
                      examples)
    train_files = sorted(tf.io.gfile.glob(os.path.join(examples, f"Split-{F.TRAIN_SPLIT}", "*.gz")))
    model_dir = str(tmp / "model")
    task.train_and_export("mean_pool_dnn", {"inputs": {"item_buckets": 256, "user_buckets": 256}},
                          beam_pipeline.read_contract(examples), train_files, serving_model_dir=model_dir,
                          log_dir=str(tmp / "logs"), train_steps=2, validation_steps=1,
                          training=task.TrainingConfig(batch_size=16))
    return model_dir, os.path.join(examples, f"Split-{F.EVAL_SPLIT}", "*.gz")


@pytest.fixture(scope="module")
def evaluated(exported, tmp_path_factory):
    model_dir, pattern = exported
    out = str(tmp_path_factory.mktemp("evaluate") / "run")
    parser = argparse.ArgumentParser()
    report.add_evaluate_arguments(parser)
    # A batch size that does not divide the row count: several batches and a ragged last one.
    args = parser.parse_args(["--model-dir", model_dir, "--examples", pattern, "--out-dir", out, "--seed", "3",
                              "--batch-size", "37"])
    assert report.run_evaluate(args) == 0
    return out


def _direct(model_dir, pattern):
    """Every eval row's columns and the model's score, read and scored in one call, without the report code."""
    serialized = [r.numpy() for r in tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(pattern)), compression_type="GZIP")]
    spec = {F.USER_ID: tf.io.FixedLenFeature([], tf.string), F.DOMAIN: tf.io.FixedLenFeature([], tf.string),
            F.LABEL: tf.io.FixedLenFeature([], tf.int64), F.ORACLE_CTR: tf.io.FixedLenFeature([], tf.float32),
            F.TARGET_DOMAIN_CLICKS: tf.io.FixedLenFeature([], tf.int64),
            F.OTHER_DOMAIN_CLICKS: tf.io.FixedLenFeature([], tf.int64)}
    rows = {k: v.numpy() for k, v in tf.io.parse_example(tf.constant(serialized), spec).items()}
    serve = tf.saved_model.load(model_dir).signatures[F.SERVING_SIGNATURE]
    rows["score"] = serve(**{F.SERVING_INPUT: tf.constant(serialized)})[F.SERVING_OUTPUT].numpy().astype(np.float64)
    return rows


def _assert_summary_equal(got, expected):
    assert set(got) == set(expected)
    for key, value in expected.items():
        if value is None or isinstance(value, int):
            assert got[key] == value, key
        else:
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_evaluate_metrics_match_summary_on_direct_scores(exported, evaluated):
    model_dir, pattern = exported
    result = json.loads(open(os.path.join(evaluated, report.METRICS_FILE)).read())
    rows = _direct(model_dir, pattern)
    users, labels, scores, oracle = rows[F.USER_ID], rows[F.LABEL], rows["score"], rows[F.ORACLE_CTR]
    domains = rows[F.DOMAIN]
    cold = (rows[F.TARGET_DOMAIN_CLICKS] == 0) & (rows[F.OTHER_DOMAIN_CLICKS] > 0)
    earlier = rows[F.TARGET_DOMAIN_CLICKS] + rows[F.OTHER_DOMAIN_CLICKS]
    expected_masks = {"overall": np.ones(len(labels), bool), "domain=grocery": domains == b"grocery",
                      "domain=kitchen": domains == b"kitchen", "cold_start": cold,
                      "cold_start/domain=grocery": cold & (domains == b"grocery"),
                      "cold_start/domain=kitchen": cold & (domains == b"kitchen"),
                      "activity=0": earlier == 0, "activity=1-4": (earlier >= 1) & (earlier <= 4),
                      "activity=5-19": (earlier >= 5) & (earlier <= 19), "activity=20+": earlier >= 20}

    assert result["run"] == "mean_pool_dnn" and result["seed"] == 3
    assert result["model_dir"] == os.path.abspath(model_dir) and result["examples"] == pattern
    assert result["domains"] == ["grocery", "kitchen"]
    assert list(result["slices"]) == list(expected_masks)
    assert "weighted by their impressions" in result["definitions"]["gauc"]
    assert cold.any() and (earlier == 0).any()  # the data exercise the cold-start and activity slices
    for name, mask in expected_masks.items():
        if mask.any():
            _assert_summary_equal(result["slices"][name], metrics.summary(users[mask], labels[mask], scores[mask]))
            _assert_summary_equal(result["oracle"][name], metrics.summary(users[mask], labels[mask], oracle[mask]))
        else:
            assert result["slices"][name]["examples"] == 0 and result["slices"][name]["auc"] is None
    assert result["slices"]["overall"]["examples"] == len(labels)
    assert result["gauc_users_skipped"] == result["slices"]["overall"]["gauc_users_skipped"]
    # Activity buckets partition the rows.
    assert sum(result["slices"][f"activity={b}"]["examples"] for b in ("0", "1-4", "5-19", "20+")) == len(labels)


def test_evaluate_writes_png_plots_and_an_html_page_that_shows_them(evaluated):
    page = open(os.path.join(evaluated, report.REPORT_FILE)).read()
    for png in (report.ROC_PLOT, report.CALIBRATION_PLOT, report.GAUC_PLOT):
        data = open(os.path.join(evaluated, png), "rb").read()
        assert data[:8] == PNG_MAGIC, png
        assert len(data) > 10_000, png  # a drawn figure, not an empty canvas
        assert f'src="{png}"' in page
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "cold_start/domain=kitchen" in page and "oracle GAUC" in page
    assert "http" not in page  # nothing fetched from elsewhere


def test_evaluate_without_oracle_reports_none(exported, tmp_path):
    """Examples without `oracle_ctr` (real data) give `oracle: null`."""
    model_dir, pattern = exported
    stripped = str(tmp_path / "stripped.gz")
    with tf.io.TFRecordWriter(stripped, options="GZIP") as writer:
        for record in tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(pattern)), compression_type="GZIP").take(50):
            example = tf.train.Example.FromString(record.numpy())
            del example.features.feature[F.ORACLE_CTR]
            writer.write(example.SerializeToString())
    result = report.evaluate(model_dir, stripped, str(tmp_path / "out"), name="plain")
    assert result["oracle"] is None and result["run"] == "plain" and result["seed"] is None
    assert result["slices"]["overall"]["examples"] == 50


def test_evaluate_errors_are_one_line(exported, tmp_path):
    model_dir, pattern = exported
    with pytest.raises(ValueError, match=r"^model dir '.*/nope' holds no saved_model.pb; expected an exported") as e:
        report.evaluate(str(tmp_path / "nope"), pattern, str(tmp_path / "out"))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"^examples pattern '.*/none-\*\.gz' matches no file") as e:
        report.evaluate(model_dir, str(tmp_path / "none-*.gz"), str(tmp_path / "out"))
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "out")


def _write_run(directory, run, seed, auc, gauc, cold_auc=None, domain_a=None):
    """A hand-written metrics.json with the fields `compare` reads."""
    def summary(a, g, log_loss=0.5, calibration=1.0):
        return {"examples": 100, "auc": a, "gauc": g, "gauc_users": 10, "gauc_users_skipped": 2,
                "log_loss": log_loss, "calibration": calibration}
    slices = {"overall": summary(auc, gauc, log_loss=auc / 2, calibration=gauc * 2)}
    slices["domain=a"] = summary(*(domain_a or (auc, gauc)))
    slices["cold_start"] = summary(cold_auc, None)
    slices["activity=0"] = summary(0.5, 0.5)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, report.METRICS_FILE), "w") as f:
        json.dump({"run": run, "seed": seed, "slices": slices}, f)
    return str(directory)


def test_compare_writes_mean_and_std_over_seeds(tmp_path):
    runs = [
        _write_run(tmp_path / "dacdr-0", "dacdr", 0, 0.70, 0.60, cold_auc=0.65),
        _write_run(tmp_path / "dacdr-1", "dacdr", 1, 0.72, 0.62, cold_auc=0.66),
        os.path.join(_write_run(tmp_path / "dacdr-2", "dacdr", 2, 0.74, 0.64, cold_auc=None), report.METRICS_FILE),
        _write_run(tmp_path / "base", "single_domain_dnn", None, 0.65, 0.55, cold_auc=0.5, domain_a=(0.61, None)),
    ]
    out = str(tmp_path / "table.md")
    parser = argparse.ArgumentParser()
    report.add_compare_arguments(parser)
    assert report.run_compare(parser.parse_args([*runs, "--out", out])) == 0
    # dacdr AUC overall: mean(0.70, 0.72, 0.74) = 0.72, sample std = sqrt((0.02^2 + 0 + 0.02^2) / 2) = 0.02.
    # Log loss = AUC / 2: 0.36 ± 0.01; calibration = 2 GAUC: 1.24 ± 0.04.
    # Cold-start AUC: only 2 of 3 seeds have it: mean(0.65, 0.66) = 0.655, std = 0.00707.
    expected = (
        "| run | seeds | AUC overall | GAUC overall | AUC domain=a | GAUC domain=a | AUC cold_start | GAUC cold_start "
        "| log loss | calibration |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
        "| dacdr | 0, 1, 2 | 0.7200 ± 0.0200 | 0.6200 ± 0.0200 | 0.7200 ± 0.0200 | 0.6200 ± 0.0200 "
        "| 0.6550 ± 0.0071 (2/3) | n/a | 0.3600 ± 0.0100 | 1.2400 ± 0.0400 |\n"
        "| single_domain_dnn | — | 0.6500 | 0.5500 | 0.6100 | n/a | 0.5000 | n/a | 0.3250 | 1.1000 |\n"
    )
    assert open(out).read() == expected + "\n" + report.COMPARE_NOTE

    # Chosen slices, in the given order.
    text = report.compare(runs[3:], str(tmp_path / "two.md"), ["activity=0", "overall"])
    assert text.splitlines()[0] == ("| run | seeds | AUC activity=0 | GAUC activity=0 | AUC overall | GAUC overall "
                                    "| log loss | calibration |")
    assert text.splitlines()[2] == "| single_domain_dnn | — | 0.5000 | 0.5000 | 0.6500 | 0.5500 | 0.3250 | 1.1000 |"


def test_compare_reads_benchmark_train_json(tmp_path):
    def quality(auc):
        s = {"examples": 10, "auc": auc, "gauc": auc - 0.1, "gauc_users": 3, "gauc_users_skipped": 1,
             "log_loss": 0.4, "calibration": 1.0}
        return {"overall": s, "domain=a": s, "cold_start": s}
    paths = []
    for seed, shift in ((0, 0.0), (1, 0.02)):
        path = tmp_path / f"train-{seed}.json"
        path.write_text(json.dumps({"data": {"seed": seed}, "results": [
            {"model": "oracle", "quality": quality(0.9)},
            {"model": "man", "examples_per_second": 5, "quality": quality(0.7 + shift)}]}))
        paths.append(str(path))
    lines = report.compare(paths, str(tmp_path / "t.md"), ["overall"]).splitlines()
    assert lines[2] == "| oracle | 0, 1 | 0.9000 ± 0.0000 | 0.8000 ± 0.0000 | 0.4000 ± 0.0000 | 1.0000 ± 0.0000 |"
    assert lines[3] == "| man | 0, 1 | 0.7100 ± 0.0141 | 0.6100 ± 0.0141 | 0.4000 ± 0.0000 | 1.0000 ± 0.0000 |"


def test_compare_reads_seeds_of_one_multi_seed_benchmark_json(tmp_path):
    def quality(auc):
        s = {"examples": 10, "auc": auc, "gauc": auc, "gauc_users": 3, "gauc_users_skipped": 0,
             "log_loss": 0.5, "calibration": 1.0}
        return {"overall": s}
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"data": {"seeds": [0, 1, 2]}, "results": [
        {"model": "dnn_multi", "seed": seed, "quality": quality(auc)} for seed, auc in ((0, 0.6), (1, 0.62), (2, 0.64))]}))
    lines = report.compare([str(path)], str(tmp_path / "t.md"), ["overall"]).splitlines()
    # mean 0.62, sample std 0.02
    assert lines[2] == "| dnn_multi | 0, 1, 2 | 0.6200 ± 0.0200 | 0.6200 ± 0.0200 | 0.5000 ± 0.0000 | 1.0000 ± 0.0000 |"


def test_compare_errors_are_one_line(tmp_path):
    a = _write_run(tmp_path / "a", "dacdr", 0, 0.7, 0.6)
    b = _write_run(tmp_path / "b", "dacdr", 0, 0.7, 0.6)
    with pytest.raises(ValueError, match=r"share name 'dacdr' and seed 0"):
        report.compare([a, b], str(tmp_path / "t.md"))
    with pytest.raises(ValueError, match=r"^slice\(s\) \['domain=zz'\] are in none of the runs; available: "):
        report.compare([a], str(tmp_path / "t.md"), ["domain=zz"])
    with pytest.raises(ValueError, match=r"^no run at '.*/missing'; expected a metrics.json file"):
        report.compare([str(tmp_path / "missing")], str(tmp_path / "t.md"))
    (tmp_path / "other.json").write_text("{\"x\": 1}")
    with pytest.raises(ValueError, match=r"other.json: neither an `xdctr evaluate` metrics.json"):
        report.compare([str(tmp_path / "other.json")], str(tmp_path / "t.md"))
