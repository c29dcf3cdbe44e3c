"""benchmarks/loo_arrays.py: the leave-one-out protocol from exported arrays, on any backend.

The exported path must rank exactly as the TensorFlow path does (same cases, same negatives,
same model inputs), and train with early stopping on the valid cases.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import loo_arrays, quality
from components.evaluation import ranking

pytestmark = pytest.mark.slow  # make test-fast skips these (a Beam ingestion, then training)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOMAINS = ("grocery", "kitchen")


def _interactions(path):
    rng = np.random.default_rng(7)
    rows = ["user_id,item_id,domain,ts"]
    for u in range(40):
        for t in range(6):
            domain = DOMAINS[int(rng.integers(2))]
            rows.append(f"u{u},{domain[0]}{int(rng.integers(30))},{domain},{1000 + 10 * t}")
    rows += [f"x{i},{d[0]}{i},{d},1" for i in range(30) for d in DOMAINS]  # every item exists
    path.write_text("\n".join(rows) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("loo-arrays")
    csv = _interactions(base / "interactions.csv")
    patch = pytest.MonkeyPatch()
    patch.setattr(quality, "_interactions", lambda name: csv)
    try:
        meta = loo_arrays.export(str(base / "work"), str(base / "arrays"))
    finally:
        patch.undo()
    return str(base / "arrays"), meta, ranking.read_sequences([csv], str(base / "dead.jsonl"))


def test_export_writes_every_case_and_every_train_click(exported):
    data, meta, seqs = exported
    cases = {split: ranking.cases(seqs, split) for split in loo_arrays.SPLITS}
    assert meta["counts"]["cases-valid"] == len(cases[ranking.VALID]) == 40
    assert meta["counts"]["cases-test"] == len(cases[ranking.TEST]) == 40
    train_clicks = len(ranking.train_part(seqs))
    assert meta["counts"]["train-train"] + meta["counts"]["train-validation"] == train_clicks
    test = loo_arrays._load(os.path.join(data, "cases-test.npz"))
    assert test["case_target"].tolist() == [c.target for c in cases[ranking.TEST]]
    assert meta["inputs"]["domains"] == sorted(DOMAINS)  # the contract's order
    assert meta["item_domains"] == seqs.domains  # the interactions' order (here: kitchen first)


def test_negatives_are_the_protocols_draw(exported):
    data, meta, seqs = exported
    catalogue = loo_arrays.Catalogue.load(data, meta["item_domains"])
    for seed in (0, 3):
        cases = loo_arrays.load_cases(data, ranking.TEST, catalogue, meta["inputs"]["domains"], seed, negatives=20)
        for row, case in enumerate(ranking.cases(seqs, ranking.TEST)):
            expected = ranking.sample_negatives(seqs, case, ranking.TEST, seed, 20)
            got = cases.codes[row]
            assert got[0] == case.target
            assert got[1:1 + len(expected)].tolist() == expected.tolist()
            assert (got[1 + len(expected):] == -1).all()  # a domain with fewer eligible items: marked, not filled


@pytest.mark.parametrize("name", ["sasrec", "dnn_multi"])  # dnn_multi's score depends on the candidate's domain
def test_array_ranking_equals_the_tensorflow_scorer(exported, name):
    import keras

    import models
    from components.trainer import preprocess

    data, meta, seqs = exported
    keras.utils.set_random_seed(1)
    config = models.resolve_config(name, {"inputs": meta["inputs"]})
    model = models.build(name, config)
    catalogue = loo_arrays.Catalogue.load(data, meta["item_domains"])
    cases = loo_arrays.load_cases(data, ranking.TEST, catalogue, meta["inputs"]["domains"], 0, negatives=25)
    got = loo_arrays.rank_cases(model, cases, batch_size=16)
    expected = ranking.evaluate_scorer(seqs, ranking.keras_model_scorer(model, config.inputs),
                                       preprocess.contract_of(config.inputs), [ranking.TEST], 0, 25)[ranking.TEST]
    assert got["negative_shortfall"] == expected["negative_shortfall"]
    for key in [ranking.OVERALL] + [f"domain={d}" for d in DOMAINS]:
        assert got[key]["cases"] == expected[key]["cases"]
        for metric in ("hr@5", "hr@10", "ndcg@10", "mrr"):
            # logits here, sigmoid(logits) there: at most one case may rank differently on a near tie
            assert got[key][metric] == pytest.approx(expected[key][metric], abs=1.0 / got[key]["cases"] + 1e-9)


def test_run_stops_on_valid_ndcg_and_restores_the_best_epoch(exported, tmp_path):
    data, meta, _ = exported
    out = str(tmp_path / "results.json")
    results = loo_arrays.run(data, ["sasrec"], [0], out, epochs=4, patience=1, batch_size=32, ranking_negatives=8,
                             variants={"small": {"embedding_dim": 16, "training": {"learning_rate": 0.01}}})
    assert json.load(open(out)) == json.loads(json.dumps(results))
    (result,) = results
    assert result["run"] == "sasrec[small]" and result["training"]["learning_rate"] == 0.01
    epochs = result["training"]["epochs"]
    watched = [e["ndcg@10"] for e in epochs]
    assert 1 <= len(epochs) <= 4 and result["training"]["best_epoch"] == int(np.argmax(watched)) + 1
    # The ranked model is the best epoch's (EarlyStopping restored it): its valid NDCG@10 is the best one.
    assert result["splits"][ranking.VALID][ranking.OVERALL]["ndcg@10"] == pytest.approx(max(watched), abs=1e-6)
    assert set(result["splits"][ranking.TEST]) >= {ranking.OVERALL, "domain=grocery", "domain=kitchen"}
    with pytest.raises(ValueError, match="unknown training option"):
        loo_arrays.run(data, ["sasrec"], [0], out, variants={"bad": {"training": {"momentum": 0.9}}})


def test_select_variant_runs_only_the_best_valid_variant_at_later_seeds(exported, tmp_path):
    data, _, _ = exported
    results = loo_arrays.run(data, ["bilinear_recency"], [0, 1], str(tmp_path / "r.json"), epochs=1, patience=1,
                             batch_size=64, ranking_negatives=4, select_variant=True,
                             variants={"lr-tiny": {"training": {"learning_rate": 1e-7}},
                                       "lr-big": {"training": {"learning_rate": 0.05}}})
    first = {r["run"]: r["splits"][ranking.VALID][ranking.OVERALL]["ndcg@10"] for r in results if r["seed"] == 0}
    later = [r["run"] for r in results if r["seed"] == 1]
    assert sorted(first) == ["bilinear_recency[lr-big]", "bilinear_recency[lr-tiny]"]
    assert later == [max(first, key=first.get)]


def test_train_runs_under_jax_without_tensorflow(exported, tmp_path):
    """The GPU path: KERAS_BACKEND=jax and TensorFlow not importable."""
    data, _, _ = exported
    out = str(tmp_path / "jax.json")
    blocker = ("import sys, importlib.abc, runpy\n"
               "class Block(importlib.abc.MetaPathFinder):\n"
               "    def find_spec(self, name, path, target=None):\n"
               "        if name.split('.')[0] in ('tensorflow', 'tensorflow_serving', 'tfx', 'apache_beam'):\n"
               "            raise ImportError('blocked: ' + name)\n"
               "sys.meta_path.insert(0, Block())\n"
               "sys.argv = ['loo_arrays'] + sys.argv[1:]\n"
               "runpy.run_module('benchmarks.loo_arrays', run_name='__main__')\n")
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", blocker, "train", "--data", data, "--models", "sasrec",
                             "--seeds", "0", "--epochs", "1", "--batch-size", "32", "--ranking-negatives", "8",
                             "--out", out], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = json.load(open(out))
    assert run["environment"]["backend"] == "jax" and run["environment"]["same_negatives_as_export"] is True
    test = run["splits"][ranking.TEST][ranking.OVERALL]
    assert test["cases"] == 40 and 0.0 <= test["hr@10"] <= 1.0 and np.isfinite(test["mrr"])


def test_bad_data_dir_and_inputs_overrides_are_refused_with_the_reason(exported, tmp_path):
    data, _, _ = exported
    with pytest.raises(FileNotFoundError, match="holds no meta.json"):
        loo_arrays.run(str(tmp_path), ["sasrec"], [0], str(tmp_path / "r.json"))
    with pytest.raises(ValueError, match="fix the model inputs"):
        loo_arrays.run(data, ["sasrec"], [0], str(tmp_path / "r.json"), epochs=1,
                       variants={"wide": {"inputs": {"item_buckets": 1024}}})
    assert not os.path.exists(tmp_path / "r.json")  # nothing written for a refused run
