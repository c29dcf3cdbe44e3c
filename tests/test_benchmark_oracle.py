"""`benchmarks/oracle.py` and the generator's logit parts: the ceilings a model is held against."""

import json
import math

import numpy as np
import pytest

from benchmarks import oracle
from components.evaluation import metrics
from components.ingest import generator
from xdctr import features as F

SMALL = dict(num_users=300, items_per_domain=40, mean_events_per_user=15, num_days=10, seed=3)


def _record(user, ts, domain, clicked):
    return {F.LOG_USER_ID: user, F.LOG_TS: ts, F.LOG_DOMAIN: domain, F.LOG_CLICKED: clicked}


def _parts(**values):
    return {name: values.get(name, 0.0) for name in generator.LOGIT_PARTS}


def test_logit_parts_sum_to_the_logit_the_click_was_drawn_from():
    pairs = list(generator.LogGenerator(generator.GeneratorConfig(**SMALL)).records_with_parts())
    assert [record for record, _ in pairs] == list(generator.LogGenerator(generator.GeneratorConfig(**SMALL)).records())
    for record, parts in pairs[:500]:
        assert set(parts) == set(generator.LOGIT_PARTS)
        assert parts["base"] == pytest.approx(generator.GeneratorConfig.base_logit)
        ctr = 1 / (1 + math.exp(-sum(parts.values())))
        assert ctr == pytest.approx(record[F.LOG_ORACLE_CTR], abs=2e-6)  # the record rounds to 6 places
    # The group taste is the larger part of the shared taste (group vectors N(0, 1), personal noise 0.3).
    group = np.array([p["group_taste"] for _, p in pairs])
    personal = np.array([p["personal_taste"] for _, p in pairs])
    assert group.std() > 2 * personal.std() > 0


def test_cold_start_counts_clicks_at_earlier_times_in_the_domain_only():
    rows = [
        (_record("u1", 10, "a", 0), _parts()),  # no clicks yet: not cold
        (_record("u1", 20, "a", 1), _parts()),  # no clicks yet: not cold
        (_record("u1", 20, "b", 0), _parts()),  # the click at the same time does not count: not cold
        (_record("u1", 30, "b", 1), _parts()),  # a click in a, none in b: cold
        (_record("u1", 40, "b", 0), _parts()),  # a click in b at 30: not cold
        (_record("u2", 5, "b", 0), _parts()),  # a new user starts with no clicks
    ]
    columns = oracle.events(rows)
    assert columns["cold_start"].tolist() == [False, False, False, True, False, False]
    assert columns["user"].tolist() == ["u1"] * 5 + ["u2"]
    assert columns["label"].tolist() == [0, 1, 0, 1, 0, 0]


def test_eval_mask_is_the_last_fraction_of_the_events_with_the_cutoff_time_included():
    ts = np.array([5, 1, 2, 3, 4, 4, 4, 6, 7, 8])
    # rank int(0.8 * 10) = 8 of the sorted times (1 2 3 4 4 4 5 6 7 8) is 7
    assert oracle.eval_mask(ts, 0.2).tolist() == [False] * 8 + [True, True]
    # rank 5 is 4: every event at time 4 goes to eval
    assert oracle.eval_mask(ts, 0.5).tolist() == [True, False, False, False, True, True, True, True, True, True]


def test_ceilings_order_and_the_oracle_row_is_the_oracle_ctrs_auc(tmp_path):
    config = generator.GeneratorConfig(**SMALL)
    pairs = list(generator.LogGenerator(config).records_with_parts())
    columns = oracle.events(pairs)
    result = oracle.ceilings(columns, 0.2)
    mask = oracle.eval_mask(columns["ts"], 0.2)
    ctr = np.array([record[F.LOG_ORACLE_CTR] for record, _ in pairs])[mask]
    assert result["overall"]["oracle"]["auc"] == pytest.approx(metrics.auc(columns["label"][mask], ctr), abs=1e-3)
    overall = {name: value["auc"] for name, value in result["overall"].items()}
    assert overall["oracle"] > overall["without the domain taste"] > overall["popularity only"] > 0.5
    assert overall["oracle"] > overall["without the drift"]
    assert 0 < result["cold_start"]["oracle"]["examples"] < result["overall"]["oracle"]["examples"] == mask.sum()

    out = tmp_path / "oracle.json"
    oracle.run(SMALL["num_users"], SMALL["seed"], 0.2, str(out))  # run() builds the default config but users/seed
    written = json.loads(out.read_text())
    assert set(written["results"]) == {"overall", "cold_start"}
    assert set(written["results"]["overall"]) == set(oracle.CEILINGS) | {oracle.POSTERIOR}


def test_a_log_too_small_for_a_cold_start_slice_prints_n_a(tmp_path):
    result = oracle.run(1, 0, 0.2, str(tmp_path / "one.json"))  # one user: no cold-start impressions
    assert result["cold_start"]["oracle"]["examples"] == 0 and result["cold_start"]["oracle"]["auc"] is None
    assert "| oracle | " in oracle.markdown(result) and "n/a" in oracle.markdown(result)


# ----------------------------------------------------------------------------------------------
# The posterior ceiling: P(click | the user's earlier impressions), the taste integrated out.


def _log_and_columns(**overrides):
    log = generator.LogGenerator(generator.GeneratorConfig(**(SMALL | overrides)))
    return log, oracle.events(log.records_with_parts())


def _oracle_logit(columns):
    return np.sum([columns[part] for part in generator.LOGIT_PARTS], axis=0)


def test_with_nothing_latent_the_posterior_is_the_oracle():
    # One group, no personal or domain taste: every draw is the user's true taste.
    log, columns = _log_and_columns(num_groups=1, personal_scale=0.0, domain_scale=0.0)
    posterior = oracle.posterior_logits(columns, log, samples_per_group=4)
    np.testing.assert_allclose(posterior, _oracle_logit(columns), atol=1e-6)


def test_a_first_impression_gets_the_prior_mean_and_many_impressions_find_the_group():
    log, columns = _log_and_columns(num_groups=2, personal_scale=0.0, domain_scale=0.0)
    posterior = oracle.posterior_logits(columns, log, samples_per_group=2)
    users = columns["user"]
    first = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    # The first impression of a user: the mean over the two (equally likely) groups' click
    # probabilities, each the record's logit with that group's taste in place of the user's.
    k = first[1]
    domain = log.config.domains.index(columns["domain"][k])
    vector = log.item_vectors[domain, generator.item_index(columns["item"][k])]
    rest = columns["base"][k] + columns["drift"][k] + columns["popularity"][k]
    ctr = np.mean([1 / (1 + np.exp(-(rest + log.config.shared_weight * taste @ vector))) for taste in log.group_taste])
    assert posterior[k] == pytest.approx(np.log(ctr / (1 - ctr)), abs=1e-9)
    # After 40 impressions the posterior is sure of the group: the oracle's logit.
    earlier = np.arange(len(users)) - np.repeat(first, np.diff(np.r_[first, len(users)]))
    late = earlier >= 40
    assert late.sum() > 100
    assert np.mean(np.abs(posterior[late] - _oracle_logit(columns)[late]) < 0.01) > 0.95


def test_the_posterior_reads_only_impressions_at_earlier_times():
    log, columns = _log_and_columns()
    users = columns["user"]
    k = next(i for i in range(1, len(users) - 2) if users[i - 1] == users[i] == users[i + 2]
             and columns["ts"][i - 1] < columns["ts"][i] < columns["ts"][i + 1])
    columns["ts"] = columns["ts"].copy()
    columns["ts"][k + 1] = columns["ts"][k]  # row k + 1 now at the same time as row k
    rows = np.zeros(len(users), bool)
    rows[k - 1:k + 3] = True
    base = oracle.posterior_logits(columns, log, samples_per_group=16, rows=rows)

    def flipped(row):
        changed = dict(columns, label=columns["label"].copy())
        changed["label"][row] = 1 - changed["label"][row]
        return oracle.posterior_logits(changed, log, samples_per_group=16, rows=rows)

    same_time, later, earlier = flipped(k + 1), flipped(k + 2), flipped(k - 1)
    assert same_time[k] == pytest.approx(base[k], abs=1e-12) and later[k] == pytest.approx(base[k], abs=1e-12)
    assert flipped(k)[k + 1] == pytest.approx(base[k + 1], abs=1e-12)  # same time: not earlier either way
    assert abs(earlier[k] - base[k]) > 1e-6 and abs(flipped(k)[k + 2] - base[k + 2]) > 1e-6
    assert np.isnan(base[~rows]).all() and np.isfinite(base[rows]).all()


def test_the_posterior_row_sits_between_popularity_and_the_oracle(tmp_path):
    log, columns = _log_and_columns()
    posterior = oracle.posterior_logits(columns, log, samples_per_group=32)
    result = oracle.ceilings(columns, 0.2, posterior)
    overall = {name: value["auc"] for name, value in result["overall"].items()}
    assert overall["popularity only"] < overall[oracle.POSTERIOR] < overall["oracle"]

    out = tmp_path / "oracle.json"
    printed = oracle.run(SMALL["num_users"], SMALL["seed"], 0.2, str(out), samples_per_group=8)
    written = json.loads(out.read_text())
    assert written["posterior"]["samples_per_group"] == 8 and oracle.POSTERIOR in written["results"]["cold_start"]
    assert f"| {oracle.POSTERIOR} |" in oracle.markdown(printed)
    assert oracle.POSTERIOR not in oracle.run(SMALL["num_users"], SMALL["seed"], 0.2, str(out), samples_per_group=0)["overall"]


# ----------------------------------------------------------------------------------------------
# The click posterior: the same, from the earlier clicks alone (what a history feature shows).


def test_with_nothing_latent_the_click_posterior_is_the_oracle():
    log, columns = _log_and_columns(num_groups=1, personal_scale=0.0, domain_scale=0.0)
    posterior = oracle.click_posterior_logits(columns, log, samples_per_group=4)
    np.testing.assert_allclose(posterior, _oracle_logit(columns), atol=1e-6)


def test_the_click_posterior_weighs_each_group_by_the_clicked_items_share_of_its_clicks():
    # Two groups, nothing else latent. After one click on item i (no drift before a first click),
    # group g's weight is P(i | a click in the domain; g) = pop_i sigmoid(l_g(i)) / sum_k pop_k sigmoid(l_g(k)).
    log, columns = _log_and_columns(num_groups=2, personal_scale=0.0, domain_scale=0.0)
    config = log.config
    users, labels, ts = columns["user"], columns["label"], columns["ts"]
    first = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    j = next(f for f in first if labels[f] == 1 and users[f + 1] == users[f] and ts[f + 1] > ts[f]
             and labels[f + 1] == 0)
    k = j + 1
    posterior = oracle.click_posterior_logits(columns, log, samples_per_group=1)
    sigmoid = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    d_j = config.domains.index(columns["domain"][j])
    d_k = config.domains.index(columns["domain"][k])
    known = config.base_logit + config.popularity_weight * log.popularity_logit[d_j]  # (items,): no drift yet
    v_k = log.item_vectors[d_k, generator.item_index(columns["item"][k])]
    rest_k = columns["base"][k] + columns["drift"][k] + columns["popularity"][k]
    weights, ctrs = [], []
    for taste in log.group_taste:
        clicks = sigmoid(known + config.shared_weight * log.item_vectors[d_j] @ taste)  # (items,)
        share = log.popularity[d_j] * clicks / np.sum(log.popularity[d_j] * clicks)
        weights.append(share[generator.item_index(columns["item"][j])])
        ctrs.append(sigmoid(rest_k + config.shared_weight * taste @ v_k))
    ctr = np.dot(weights, ctrs) / np.sum(weights)
    assert posterior[k] == pytest.approx(np.log(ctr / (1 - ctr)), abs=1e-5)


def test_the_click_posterior_ignores_earlier_non_clicks_and_the_posterior_does_not():
    log, columns = _log_and_columns()
    users, labels = columns["user"], columns["label"]
    # An impression not clicked, followed by 3 impressions of the same user at later times.
    k = next(i for i in range(len(users) - 3) if labels[i] == 0 and users[i] == users[i + 3]
             and columns["ts"][i] < columns["ts"][i + 1])
    rows = np.zeros(len(users), bool)
    rows[k + 1:k + 4] = True
    changed = dict(columns, item=columns["item"].copy(), domain=columns["domain"].copy())
    other = generator.item_index(columns["item"][k]) + 1
    changed["item"][k] = generator.item_id(columns["domain"][k], other % log.config.items_per_domain)
    np.testing.assert_allclose(oracle.click_posterior_logits(changed, log, 16, rows=rows)[rows],
                               oracle.click_posterior_logits(columns, log, 16, rows=rows)[rows], atol=1e-12)
    assert np.abs(oracle.posterior_logits(changed, log, 16, rows=rows)[rows]
                  - oracle.posterior_logits(columns, log, 16, rows=rows)[rows]).max() > 1e-6


def test_a_window_of_the_last_clicks_equals_dropping_the_clicks_before_it():
    # Without drift a click's likelihood does not depend on the clicks before it, so conditioning
    # on the last 2 earlier clicks is conditioning on a log whose earlier clicks are not clicked.
    log, columns = _log_and_columns(drift_weight=0.0)
    users, labels, ts = columns["user"], columns["label"], columns["ts"]
    # A row with at least 4 clicks of its user at earlier times.
    k = next(i for i in range(len(users)) if ts[i] > ts[i - 1] and users[i] == users[i - 1]
             and labels[(users == users[i]) & (ts < ts[i])].sum() >= 4)
    rows = np.zeros(len(users), bool)
    rows[k] = True
    earlier_clicks = np.flatnonzero((users == users[k]) & (ts < ts[k]) & (labels == 1))
    dropped = dict(columns, label=labels.copy())
    dropped["label"][earlier_clicks[:-2]] = 0
    windowed = oracle.click_posterior_logits(columns, log, 16, rows=rows, history_length=2)[k]
    assert windowed == pytest.approx(oracle.click_posterior_logits(dropped, log, 16, rows=rows)[k], abs=1e-9)
    # It is a different guess from the one of every earlier click, and a window as long as the
    # history is that one.
    every = oracle.click_posterior_logits(columns, log, 16, rows=rows)[k]
    assert abs(windowed - every) > 1e-4
    long = oracle.click_posterior_logits(columns, log, 16, rows=rows, history_length=len(earlier_clicks))[k]
    assert long == pytest.approx(every, abs=1e-9)
    with pytest.raises(ValueError, match="history_length"):
        oracle.click_posterior_logits(columns, log, 16, rows=rows, history_length=0)


def test_the_windowed_click_posterior_row_is_named_by_its_window(tmp_path):
    out = tmp_path / "oracle.json"
    printed = oracle.run(SMALL["num_users"], SMALL["seed"], 0.2, str(out), samples_per_group=0,
                         click_samples_per_group=4, click_history_length=3)
    name = oracle.click_posterior_name(3)
    assert name == "posterior, last 3 clicks only" and oracle.click_posterior_name() == oracle.CLICK_POSTERIOR
    assert name in printed["cold_start"] and oracle.CLICK_POSTERIOR not in printed["overall"]
    assert 0.5 < printed["overall"][name]["auc"] < printed["overall"]["oracle"]["auc"]
    assert json.loads(out.read_text())["click_posterior"]["history_length"] == 3


def test_the_click_posterior_row_is_below_the_posterior_and_off_by_default(tmp_path):
    out = tmp_path / "oracle.json"
    printed = oracle.run(SMALL["num_users"], SMALL["seed"], 0.2, str(out), samples_per_group=32,
                         click_samples_per_group=32)
    written = json.loads(out.read_text())
    assert written["click_posterior"]["samples_per_group"] == 32
    overall = {name: value["auc"] for name, value in printed["overall"].items()}
    # What the clicks show is part of what every impression shows; on this small log the gap is
    # well above the draws' noise (0.01).
    assert overall["popularity only"] < overall[oracle.CLICK_POSTERIOR] < overall[oracle.POSTERIOR] - 0.003
    assert f"| {oracle.CLICK_POSTERIOR} |" in oracle.markdown(printed)
    default = oracle.run(SMALL["num_users"], SMALL["seed"], 0.2, str(out), samples_per_group=8)
    assert oracle.CLICK_POSTERIOR not in default["overall"] and json.loads(out.read_text())["click_posterior"] is None


def test_the_cli_passes_the_click_window_and_refuses_a_negative_one(tmp_path, capsys):
    from xdctr import cli

    out = tmp_path / "oracle.json"
    assert cli.main(["benchmark", "oracle", "--users", "200", "--posterior-samples", "0",
                     "--click-posterior-samples", "2", "--click-history-length", "-1", "--out", str(out)]) == 2
    assert "--click-history-length must be >= 0" in capsys.readouterr().err and not out.exists()
    assert cli.main(["benchmark", "oracle", "--users", "200", "--posterior-samples", "0",
                     "--click-posterior-samples", "2", "--click-history-length", "5", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["click_posterior"]["history_length"] == 5
    assert oracle.click_posterior_name(5) in written["results"]["overall"]


# ----------------------------------------------------------------------------------------------
# The logistic reference: a logistic regression on features read through the true item vectors.


def _most_clicks(columns):
    """The most clicks of one user: a window this long holds every earlier click."""
    _, counts = np.unique(columns["user"][columns["label"] == 1], return_counts=True)
    return int(counts.max())


def test_the_drift_feature_is_the_generators_drift_term_over_a_window_of_every_click():
    log, columns = _log_and_columns()
    x = oracle.logistic_features(columns, log, history_length=_most_clicks(columns))
    config = log.config
    scale = config.drift_weight * generator.DRIFT_ADD * config.dim
    users, ts = columns["user"], columns["ts"]
    # The generator's drift counts a click at the same time as the impression; a history does not.
    apart = np.r_[True, (users[1:] != users[:-1]) | (ts[1:] > ts[:-1])]
    assert apart.mean() > 0.99
    np.testing.assert_allclose(scale * x[apart, 0], columns["drift"][apart], atol=1e-9)
    assert x[:, oracle.LOGISTIC_FEATURES.index("popularity")] == pytest.approx(columns["popularity"], abs=1e-12)
    domain_columns = x[:, len(oracle.LOGISTIC_FEATURES):]
    assert domain_columns.sum(axis=1) == pytest.approx(np.ones(len(users)))
    assert (domain_columns[:, 0] == (columns["domain"] == config.domains[0])).all()


def test_the_window_features_of_one_row_by_hand():
    log, columns = _log_and_columns()
    window = 3
    x = oracle.logistic_features(columns, log, history_length=window)
    users, ts, labels, domains = columns["user"], columns["ts"], columns["label"], columns["domain"]

    def vector(k):
        return log.item_vectors[log.config.domains.index(domains[k]), generator.item_index(columns["item"][k])]

    checked = 0
    for k in range(len(users)):
        earlier = [j for j in range(k) if users[j] == users[k] and ts[j] < ts[k] and labels[j]][-window:]
        same = [j for j in earlier if domains[j] == domains[k]]
        if len(earlier) < window or not same or len(same) == window:
            continue
        affinity = {j: vector(j) @ vector(k) for j in earlier}
        drift = sum(generator.DRIFT_KEEP ** (len(earlier) - 1 - i) * affinity[j] for i, j in enumerate(earlier))
        other = [j for j in earlier if j not in same]
        mean_same, mean_other = np.mean([affinity[j] for j in same]), np.mean([affinity[j] for j in other])
        expected = [drift, mean_same, mean_other, mean_same * len(same) / (len(same) + oracle.LOGISTIC_SHRINK),
                    mean_other * len(other) / (len(other) + oracle.LOGISTIC_SHRINK), math.log1p(len(same)),
                    math.log1p(len(other))]
        np.testing.assert_allclose(x[k, :7], expected, atol=1e-12)
        checked += 1
        if checked == 20:
            break
    assert checked == 20
    first = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    assert not x[first, :7].any()  # no earlier click: every history feature is 0
    with pytest.raises(ValueError, match="history_length"):
        oracle.logistic_features(columns, log, history_length=0)
    same_time = dict(columns, ts=np.zeros_like(columns["ts"]))  # every row at the cutoff: none to fit on
    with pytest.raises(ValueError, match="no rows before the eval cutoff"):
        oracle.logistic_logits(same_time, log, 0.2)


def test_the_logistic_reference_recovers_the_planted_weights_when_nothing_is_latent():
    # No taste at all: the logit is base + drift + popularity, all three read exactly by the features.
    log, columns = _log_and_columns(num_users=3000, shared_weight=0.0, domain_weight=0.0)
    logits, weights = oracle.logistic_logits(columns, log, 0.2, history_length=_most_clicks(columns))
    config = log.config
    assert weights["drift"] == pytest.approx(config.drift_weight * generator.DRIFT_ADD * config.dim, abs=0.3)
    assert weights["popularity"] == pytest.approx(1.0, abs=0.15)
    for domain in config.domains:
        assert weights[f"domain {domain}"] == pytest.approx(config.base_logit, abs=0.3)
    in_eval = oracle.eval_mask(columns["ts"], 0.2)
    labels = columns["label"][in_eval]
    assert metrics.auc(labels, logits[in_eval]) == pytest.approx(metrics.auc(labels, _oracle_logit(columns)[in_eval]),
                                                                 abs=0.005)


def test_the_logistic_row_sits_between_popularity_and_the_oracle_and_is_off_by_default(tmp_path, capsys):
    from xdctr import cli

    out = tmp_path / "oracle.json"
    printed = oracle.run(SMALL["num_users"], SMALL["seed"], 0.2, str(out), samples_per_group=0, logistic=True)
    overall = {name: value["auc"] for name, value in printed["overall"].items()}
    assert overall["popularity only"] < overall[oracle.LOGISTIC] < overall["oracle"]
    written = json.loads(out.read_text())
    assert written["logistic"]["history_length"] == F.DEFAULT_HISTORY_LENGTH
    assert set(written["logistic"]["weights"]) == {*oracle.LOGISTIC_FEATURES,
                                                   *(f"domain {d}" for d in generator.GeneratorConfig.domains)}
    assert f"| {oracle.LOGISTIC} |" in oracle.markdown(printed) and "logistic: the last 20 clicks" in capsys.readouterr().out
    default = oracle.run(SMALL["num_users"], SMALL["seed"], 0.2, str(out), samples_per_group=0)
    assert oracle.LOGISTIC not in default["overall"] and json.loads(out.read_text())["logistic"] is None
    assert cli.main(["benchmark", "oracle", "--users", "200", "--posterior-samples", "0", "--logistic",
                     "--out", str(out)]) == 0
    assert oracle.LOGISTIC in json.loads(out.read_text())["results"]["cold_start"]
