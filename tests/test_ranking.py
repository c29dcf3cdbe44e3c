"""The leave-one-out ranking protocol (components/evaluation/ranking.py)."""

import collections
import csv
import json
import math
import os

import numpy as np
import pytest
import tensorflow as tf

from components.evaluation import ranking
from components.ingest import beam_pipeline, importer, sequences
from components.trainer import preprocess, task
from xdctr import cli
from xdctr import features as F

HEADER = ",".join(importer.REQUIRED_COLUMNS)


def _csv(path, rows):
    path.write_text("\n".join([HEADER] + [",".join(map(str, r)) for r in rows]) + "\n", encoding="utf-8")
    return str(path)


def _sequences(tmp_path, rows):
    return ranking.read_sequences([_csv(tmp_path / "in.csv", rows)], str(tmp_path / "dead.jsonl"))


# ---------------------------------------------------------------------------------------------
# Metrics


def test_rank_metrics_by_hand():
    # Ranks 1, 3, 11: HR@5 = HR@10 = 2/3; NDCG@10 = (1/log2(2) + 1/log2(4) + 0) / 3 = (1 + 0.5) / 3;
    # MRR = (1 + 1/3 + 1/11) / 3.
    m = ranking.rank_metrics([1, 3, 11], [0, 2, 0])
    assert m["cases"] == 3
    assert m["hr@5"] == pytest.approx(2 / 3) and m["hr@10"] == pytest.approx(2 / 3)
    assert m["ndcg@10"] == pytest.approx(0.5)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 11) / 3)
    assert m["ties"] == pytest.approx(2 / 3)
    one = ranking.rank_metrics([1])
    assert one["ndcg@10"] == pytest.approx(1.0) and one["mrr"] == pytest.approx(1.0)
    assert ranking.rank_metrics([3])["ndcg@10"] == pytest.approx(1 / math.log2(4))
    assert ranking.rank_metrics([6])["hr@5"] == pytest.approx(0.0)
    assert ranking.rank_metrics([6])["hr@10"] == pytest.approx(1.0)
    assert ranking.rank_metrics([])["hr@10"] is None


def test_rank_counts_only_strictly_higher_negatives():
    # Two negatives tie the target: they do not count, so rank = 1 + one strictly higher.
    assert ranking.rank_of(0.5, np.array([0.7, 0.5, 0.5, 0.2])) == (2, 2)
    assert ranking.rank_of(0.9, np.array([0.1, 0.2])) == (1, 0)
    assert ranking.rank_of(0.0, np.array([0.1, 0.2, 0.3])) == (4, 0)


# ---------------------------------------------------------------------------------------------
# Sequences and splits

# u1, in file order: a1@10, b1@5, a2@10, a3@10, b2@20. By ts with ties in file order:
# b1@5, a1@10, a2@10, a3@10, b2@20; the tie-broken ts' are 5, 10, 11, 12, 20.
# u2: a crowded tie that runs into the next ts: a1@7, a2@7, a3@7, b1@8 -> ts' 7, 8, 9, 10.
# u3: two rows only: train rows, no case.
TIES = [("u1", "a1", "a", 10), ("u1", "b1", "b", 5), ("u2", "a1", "a", 7), ("u1", "a2", "a", 10),
        ("u2", "a2", "a", 7), ("u1", "a3", "a", 10), ("u2", "a3", "a", 7), ("u1", "b2", "b", 20),
        ("u2", "b1", "b", 8), ("u3", "a4", "a", 1), ("u3", "b3", "b", 2)]


def _named(seqs, rows):
    return [(seqs.items[i], ts) for i, ts in rows]


def test_sequences_keep_file_order_for_ties(tmp_path):
    seqs = _sequences(tmp_path, TIES)
    by_user = {seqs.users[u]: _named(seqs, rows) for u, rows in enumerate(seqs.rows)}
    assert by_user["u1"] == [("b1", 5), ("a1", 10), ("a2", 11), ("a3", 12), ("b2", 20)]
    assert by_user["u2"] == [("a1", 7), ("a2", 8), ("a3", 9), ("b1", 10)]
    assert by_user["u3"] == [("a4", 1), ("b3", 2)]


def test_test_valid_and_train_split(tmp_path):
    seqs = _sequences(tmp_path, TIES)
    test = {seqs.users[c.user]: c for c in ranking.cases(seqs, ranking.TEST)}
    valid = {seqs.users[c.user]: c for c in ranking.cases(seqs, ranking.VALID)}
    assert set(test) == set(valid) == {"u1", "u2"}  # u3 has 2 rows: no case
    assert (seqs.items[test["u1"].target], test["u1"].ts) == ("b2", 20)
    assert _named(seqs, test["u1"].history) == [("b1", 5), ("a1", 10), ("a2", 11), ("a3", 12)]
    assert (seqs.items[valid["u1"].target], valid["u1"].ts) == ("a3", 12)
    assert _named(seqs, valid["u1"].history) == [("b1", 5), ("a1", 10), ("a2", 11)]
    assert seqs.items[test["u2"].target] == "b1" and seqs.items[valid["u2"].target] == "a3"
    train = [(seqs.users[u], seqs.items[i], ts) for u, i, ts in ranking.train_part(seqs)]
    assert train == [("u1", "b1", 5), ("u1", "a1", 10), ("u1", "a2", 11), ("u2", "a1", 7), ("u2", "a2", 8),
                     ("u3", "a4", 1), ("u3", "b3", 2)]
    path = str(tmp_path / "train.csv")
    assert ranking.write_train_part(seqs, path) == 7
    with open(path, newline="") as f:
        written = list(csv.reader(f))
    assert written[0] == list(importer.REQUIRED_COLUMNS)
    assert written[1:4] == [["u1", "b1", "b", "5"], ["u1", "a1", "a", "10"], ["u1", "a2", "a", "11"]]


def test_case_example_sees_same_ts_rows_in_file_order(tmp_path):
    # The default ingestion would give a3 (u1's valid target, ts 10 in the file) no history at
    # ts 10; this protocol gives it b1, a1, a2 (a1 and a2 share its ts but come first in the file).
    seqs = _sequences(tmp_path, TIES)
    contract = F.Contract(("a", "b"), history_length=4, domain_history_length=2)
    case = next(c for c in ranking.cases(seqs, ranking.VALID) if seqs.users[c.user] == "u1")
    raw = tf.io.parse_example(tf.constant([ranking.case_example(seqs, case, contract)]), contract.feature_spec())
    assert raw[F.HISTORY_ITEM_IDS].numpy().tolist() == [[b"", b"b1", b"a1", b"a2"]]
    assert raw[F.HISTORY_TIMESTAMPS].numpy().tolist() == [[0, 5, 10, 11]]
    assert raw[F.DOMAIN_HISTORY_ITEM_IDS].numpy().tolist() == [[[b"a1", b"a2"], [b"", b"b1"]]]
    assert raw[F.ITEM_ID].numpy().tolist() == [b"a3"] and raw[F.TIMESTAMP].numpy().tolist() == [12]
    assert raw[F.TARGET_DOMAIN_CLICKS].numpy().tolist() == [2] and raw[F.OTHER_DOMAIN_CLICKS].numpy().tolist() == [1]


# ---------------------------------------------------------------------------------------------
# Negatives


def _catalogue_rows(users=200, items=60, per_user=6, seed=0):
    """Domain a with `items` items, b with 20; each user clicks `per_user` random a-items and one
    b-item, before them (even users: their test target is in a) or after them (odd users: in b)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        for j, i in enumerate(rng.choice(items, per_user, replace=False)):
            rows.append((f"u{u}", f"a{i}", "a", 100 + j))
        rows.append((f"u{u}", f"b{u % 20}", "b", 50 if u % 2 == 0 else 200))
    return rows


def test_negatives_exclude_the_users_items_are_distinct_and_seeded(tmp_path):
    seqs = _sequences(tmp_path, _catalogue_rows())
    counts = collections.Counter()
    for case in ranking.cases(seqs, ranking.TEST):
        negs = ranking.sample_negatives(seqs, case, ranking.TEST, seed=5, count=30)
        wanted = 30 if seqs.domains[seqs.item_domain[case.target]] == "a" else 19  # b: 20 items, 1 the user's
        assert len(negs) == wanted and len(set(negs.tolist())) == wanted
        assert not set(negs.tolist()) & seqs.user_items[case.user]
        assert {seqs.item_domain[i] for i in negs} == {seqs.item_domain[case.target]}
        again = ranking.sample_negatives(seqs, case, ranking.TEST, seed=5, count=30)
        np.testing.assert_array_equal(again, negs)
        counts.update(seqs.items[i] for i in negs)
    first = ranking.cases(seqs, ranking.TEST)[0]
    other_seed = ranking.sample_negatives(seqs, first, ranking.TEST, seed=6, count=30)
    valid = ranking.sample_negatives(seqs, first, ranking.VALID, seed=5, count=30)
    base = ranking.sample_negatives(seqs, first, ranking.TEST, seed=5, count=30)
    assert set(other_seed.tolist()) != set(base.tolist()) and set(valid.tolist()) != set(base.tolist())
    # Uniform: each of the 60 a-items is eligible for the users that did not click it. Expected
    # draws of item i: sum over its eligible users of 30 / 54. Chi-square, 59 degrees of freedom:
    # 95.6 is p = 0.001.
    eligible = collections.Counter()
    for case in ranking.cases(seqs, ranking.TEST):
        if seqs.domains[seqs.item_domain[case.target]] == "a":
            for i in seqs.domain_items[seqs.item_domain[case.target]]:
                if i not in seqs.user_items[case.user]:
                    eligible[seqs.items[i]] += 30 / 54
    assert sum((counts[i] - e) ** 2 / e for i, e in eligible.items()) < 95.6


def test_negatives_fall_short_only_when_too_few_are_eligible(tmp_path):
    # Domain b has 20 items; a user clicked one of them: 19 eligible for 30 wanted.
    seqs = _sequences(tmp_path, _catalogue_rows(users=30) + [("u0", "b5", "b", 500)])
    case = next(c for c in ranking.cases(seqs, ranking.TEST) if seqs.users[c.user] == "u0")
    negs = ranking.sample_negatives(seqs, case, ranking.TEST, seed=0, count=30)
    assert sorted(seqs.items[i] for i in negs) == sorted(f"b{j}" for j in range(20) if j not in (0, 5))


def test_random_and_popularity_baselines(tmp_path):
    seqs = _sequences(tmp_path, _catalogue_rows(users=400))
    random = ranking.evaluate_scorer(seqs, ranking.baseline_scorer(seqs, "random", 0), None, [ranking.TEST],
                                     negatives=49)
    # Random scores: P(rank <= 10) = 10 / 50 on the 200 cases in a (sd 0.028); in b only 19 items
    # are eligible, so those 200 cases rank among 20 candidates: 10 / 20.
    assert random[ranking.TEST]["domain=a"]["hr@10"] == pytest.approx(0.2, abs=0.09)
    assert random[ranking.TEST]["domain=b"]["hr@10"] == pytest.approx(0.5, abs=0.15)
    assert random[ranking.TEST]["negative_shortfall"] == 200 * (49 - 19)
    assert random[ranking.TEST]["overall"]["ties"] == 0
    popular = ranking.evaluate_scorer(seqs, ranking.baseline_scorer(seqs, "popularity", 0), None, [ranking.TEST],
                                      negatives=49)
    assert popular[ranking.TEST]["overall"]["cases"] == 400
    assert set(popular[ranking.TEST]) == {"overall", "domain=a", "domain=b", "negative_shortfall"}
    with pytest.raises(ValueError, match="baseline='best'"):
        ranking.baseline_scorer(seqs, "best", 0)


# ---------------------------------------------------------------------------------------------
# End to end: train part -> importer -> ingestion -> Trainer -> export -> score_candidates


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loo")
    interactions = _csv(tmp / "interactions.csv", _catalogue_rows(users=120, items=40))
    log = str(tmp / "train.jsonl.gz")
    summary = ranking.import_train_part([interactions], log, importer.ImportConfig(negatives=2,
                                                                                    negative_sampling=importer.UNIFORM))
    examples = str(tmp / "examples")
    beam_pipeline.run(beam_pipeline.IngestConfig(input_patterns=(log,), history_length=4, domain_history_length=3),
                      examples)
    files = sorted(tf.io.gfile.glob(os.path.join(examples, "Split-*", "*.gz")))
    model_dir = str(tmp / "model")
    model = task.train_and_export("dnn_multi", {"inputs": {"item_buckets": 256, "user_buckets": 256}, "embedding_dim": 8},
                          beam_pipeline.read_contract(examples), files, serving_model_dir=model_dir,
                          log_dir=str(tmp / "logs"), train_steps=20, validation_steps=1,
                          training=task.TrainingConfig(batch_size=32))
    return {"interactions": interactions, "summary": summary, "model_dir": model_dir, "tmp": tmp, "model": model,
            "examples": examples}


def test_train_part_import_has_k_uniform_negatives(trained):
    summary = trained["summary"]
    # 120 users x 7 rows, minus 2 held out each; K = 2 uniform negatives each, none short.
    assert summary["interactions"] == 120 * 5 and summary["negatives"] == 2 * 120 * 5
    assert summary["negative_sampling"] == importer.UNIFORM and summary["negative_shortfall"] == 0
    assert os.path.isfile(summary["train_csv"])


def test_end_to_end_ranks_through_score_candidates(trained):
    out = str(trained["tmp"] / "ranking")
    result = ranking.evaluate([trained["interactions"]], out, model_dir=trained["model_dir"], seed=3, negatives=19)
    assert result["run"] == "dnn_multi" and result["negatives"] == 19
    with open(os.path.join(out, ranking.RESULT_FILE)) as f:
        assert json.load(f)["splits"] == result["splits"]
    with open(os.path.join(out, ranking.MARKDOWN_FILE)) as f:
        assert f.readline().startswith("Leave-one-out, test cases, 19 sampled negatives")
    test = result["splits"][ranking.TEST]
    assert test["overall"]["cases"] == 120 == test["domain=a"]["cases"] + test["domain=b"]["cases"]
    assert test["negative_shortfall"] == 0
    # The same ranks, recomputed through the other signature: serving_default on copies of each
    # case's example whose target is each candidate.
    seqs = ranking.read_sequences([trained["interactions"]], str(trained["tmp"] / "dead.jsonl"))
    loaded = tf.saved_model.load(trained["model_dir"])
    serve = loaded.signatures[F.SERVING_SIGNATURE]
    contract = F.Contract(("a", "b"), 4, 3)
    ranks = []
    for case in ranking.cases(seqs, ranking.TEST)[:15]:
        candidates = [case.target] + ranking.sample_negatives(seqs, case, ranking.TEST, 3, 19).tolist()
        rows = []
        for item in candidates:
            target = seqs.event(case.user, item, case.ts)
            state = sequences.UserState(contract)
            for h, ts in case.history:
                state.add_click(seqs.event(case.user, h, ts))
            (example,) = sequences.user_examples(target.user_id, [target], contract, state=state)
            rows.append(sequences.serialize_example(example))
        scores = serve(**{F.SERVING_INPUT: tf.constant(rows)})[F.SERVING_OUTPUT].numpy()
        ranks.append(ranking.rank_of(scores[0], scores[1:])[0])
    limited = ranking.evaluate([trained["interactions"]], str(trained["tmp"] / "ranking15"),
                               model_dir=trained["model_dir"], seed=3, negatives=19, splits=[ranking.TEST],
                               max_users=15)
    assert limited["splits"][ranking.TEST]["overall"]["mrr"] == pytest.approx(np.mean(1.0 / np.array(ranks)), rel=1e-6)


def test_the_keras_model_ranks_as_its_export_and_the_callback_logs_the_valid_ranking(trained):
    seqs = ranking.read_sequences([trained["interactions"]], str(trained["tmp"] / "dead-keras.jsonl"))
    model = trained["model"]
    contract, exported, keep = ranking.saved_model_scorer(trained["model_dir"])
    live = ranking.keras_model_scorer(model, model.config.inputs)
    by_export = ranking.evaluate_scorer(seqs, exported, contract, [ranking.VALID], seed=1, negatives=19)[ranking.VALID]
    by_keras = ranking.evaluate_scorer(seqs, live, contract, [ranking.VALID], seed=1, negatives=19)[ranking.VALID]
    assert by_keras["overall"]["cases"] == 120
    for metric in ("hr@10", "ndcg@10", "mrr"):
        assert by_keras["overall"][metric] == pytest.approx(by_export["overall"][metric], abs=1e-9)
    callback = ranking.validation_ranking_callback(seqs, model, model.config.inputs, seed=1, negatives=19)
    logs = {"loss": 1.0}
    callback.on_epoch_end(0, logs)
    assert logs["loss"] == 1.0 and ranking.VALIDATION_METRIC == "val_ranking_ndcg@10"
    for metric in ("hr@10", "ndcg@10", "mrr"):
        assert logs[f"val_ranking_{metric}"] == pytest.approx(by_export["overall"][metric], abs=1e-9)
    del keep


def test_early_stopping_on_the_valid_ranking_keeps_the_best_epoch(trained):
    from benchmarks import train as train_benchmark

    seqs = ranking.read_sequences([trained["interactions"]], str(trained["tmp"] / "dead-select.jsonl"))
    examples = trained["examples"]
    files = sorted(tf.io.gfile.glob(os.path.join(examples, "Split-*", "*.gz")))
    rows = sum(beam_pipeline.read_summary(examples)["rows"].values())
    made = []

    def callbacks_for(model, config):
        made.append(ranking.validation_ranking_callback(seqs, model, config.inputs, seed=2, negatives=19))
        return made[-1:]

    model, config, info = train_benchmark.train_model(
        "sasrec", {"inputs": {"item_buckets": 256}, "embedding_dim": 8}, beam_pipeline.read_contract(examples), files,
        rows, seed=0, epochs=4, batch_size=32, patience=1, learning_rate=0.01, objective="sampled_softmax",
        ranking_negatives=8, monitor=ranking.VALIDATION_METRIC, callbacks_for=callbacks_for, refit=False)
    assert len(made) == 1 and info["monitor"] == ranking.VALIDATION_METRIC
    watched = info["monitored"]
    assert len(watched) == info["epochs_run"] == len(info["val_loss"]) and 1 <= len(watched) <= 4
    assert info["best_epoch"] == int(np.argmax(watched)) + 1
    # The weights kept are the best epoch's: ranking the valid cases again gives its NDCG@10.
    contract = preprocess.contract_of(config.inputs)
    again = ranking.evaluate_scorer(seqs, ranking.keras_model_scorer(model, config.inputs), contract, [ranking.VALID],
                                    seed=2, negatives=19)[ranking.VALID]["overall"]["ndcg@10"]
    assert again == pytest.approx(max(watched), abs=1e-5)


def test_cli_evaluate_leave_one_out(trained, capsys):
    out = str(trained["tmp"] / "cli")
    argv = ["evaluate", "--protocol", "leave-one-out", "--baseline", "random", "--interactions",
            trained["interactions"], "--out-dir", out, "--negatives", "9", "--splits", "test"]
    assert cli.main(argv) == 0
    assert "| random | 0 |" in capsys.readouterr().out
    assert os.path.isfile(os.path.join(out, ranking.RESULT_FILE))
    assert cli.main(["evaluate", "--protocol", "leave-one-out", "--baseline", "random", "--out-dir", out]) == 2
    assert "needs --interactions" in capsys.readouterr().err
    assert cli.main(["evaluate", "--protocol", "leave-one-out", "--interactions", trained["interactions"],
                     "--out-dir", out]) == 2
    assert "exactly one of --model-dir and --baseline" in capsys.readouterr().err
    assert cli.main(["evaluate", "--out-dir", out]) == 2  # the AUC report still needs its inputs
    assert "--protocol auc needs --model-dir and --examples" in capsys.readouterr().err


def test_cli_import_interactions_leave_one_out(tmp_path, capsys):
    interactions = _csv(tmp_path / "in.csv", TIES)
    out = str(tmp_path / "train.jsonl")
    assert cli.main(["import-interactions", "--input", interactions, "--out", out, "--leave-one-out",
                     "--negatives", "1"]) == 0
    assert "leave-one-out train part" in capsys.readouterr().out
    with open(out) as f:
        records = [json.loads(line) for line in f]
    clicks = [(r[F.LOG_USER_ID], r[F.LOG_ITEM_ID], r[F.LOG_TS]) for r in records if r[F.LOG_CLICKED]]
    # The 7 train rows with ts' (see test_test_valid_and_train_split), each with one uniform
    # non-click of its domain that the user never clicked.
    assert sorted(clicks) == sorted([("u1", "b1", 5), ("u1", "a1", 10), ("u1", "a2", 11), ("u2", "a1", 7),
                                     ("u2", "a2", 8), ("u3", "a4", 1), ("u3", "b3", 2)])
    assert len(records) == 14


def test_cooccurrence_reference_by_hand(tmp_path):
    # Train parts: v1 = [x, y], v2 = [x, y, z], v3 = [x, w] (each user has two more rows held out).
    rows = [("v1", "x", "a", 1), ("v1", "y", "a", 2), ("v1", "h1", "a", 3), ("v1", "h2", "a", 4),
            ("v2", "x", "a", 1), ("v2", "y", "a", 2), ("v2", "z", "a", 3), ("v2", "h3", "a", 4), ("v2", "h4", "a", 5),
            ("v3", "x", "a", 1), ("v3", "w", "a", 2), ("v3", "h5", "a", 3), ("v3", "h6", "a", 4)]
    seqs = _sequences(tmp_path, rows)
    score = ranking.baseline_scorer(seqs, "cooccurrence", 0)
    case = next(c for c in ranking.cases(seqs, ranking.VALID) if seqs.users[c.user] == "v3")
    # v3's valid input is [x, w] (w the latest, weight 1; x weight 1/2). C[w, y] = 0, C[x, y] = 2
    # (v1, v2); C[x, z] = 1; C[w, z] = 0; so y: 1/2 * 2 = 1, z: 1/2 * 1 = 0.5; plus 0.001 x popularity
    # (y 2, z 1) and a jitter below 1e-6.
    scores = score(case, b"", ["y", "z", "h1"], ["a"] * 3)
    np.testing.assert_allclose(scores, [1.0 + 0.002, 0.5 + 0.001, 0.0], atol=2e-6)


def test_ranking_uses_the_logit_where_the_served_ctr_saturates(trained, tmp_path):
    """float32 sigmoid is exactly 1.0 above a logit of ~17: a confident model's ctr ties the target
    with every confident negative. `score_candidates` returns the logit too, and the protocol
    ranks by it (DACDR under the softmax objective tied 0.59 negatives a case at 1.0)."""
    from components.trainer import export
    from models import config as config_lib

    model = trained["model"]
    original = model.get_weights()
    out = str(tmp_path / "saturated")
    try:
        model.set_weights([w * 40 for w in original])  # every layer x40: logits in the thousands
        export.export(model, model.config.inputs, out)
        config_lib.save(model.config, "dnn_multi", out)
    finally:
        model.set_weights(original)
    seqs = ranking.read_sequences([trained["interactions"]], str(trained["tmp"] / "dead-saturated.jsonl"))
    contract, by_logit, keep = ranking.saved_model_scorer(out)
    signature = keep.signatures[F.SCORE_CANDIDATES_SIGNATURE]

    def by_ctr(case, example, items, domains):
        return signature(**{F.SERVING_INPUT: tf.constant([example]), F.CANDIDATE_ITEM_IDS: tf.constant(items),
                            F.CANDIDATE_DOMAINS: tf.constant(domains)})[F.SERVING_OUTPUT].numpy().astype(np.float64)

    logit = ranking.evaluate_scorer(seqs, by_logit, contract, [ranking.TEST], seed=1, negatives=19)[ranking.TEST]
    ctr = ranking.evaluate_scorer(seqs, by_ctr, contract, [ranking.TEST], seed=1, negatives=19)[ranking.TEST]
    assert ctr["overall"]["ties"] > 1.0, ctr["overall"]  # saturated: many negatives at exactly 1.0
    # What ties remain are items sharing a hash bucket (80 items in 256 buckets), not saturation.
    assert logit["overall"]["ties"] < 0.1 * ctr["overall"]["ties"], (logit["overall"], ctr["overall"])
    # Ties count for the target (rank = 1 + strictly higher), so the saturated ctr ranks too well.
    assert ctr["overall"]["mrr"] > logit["overall"]["mrr"]
