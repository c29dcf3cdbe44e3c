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
    assert set(written["results"]["overall"]) == set(oracle.CEILINGS)


def test_a_log_too_small_for_a_cold_start_slice_prints_n_a(tmp_path):
    result = oracle.run(1, 0, 0.2, str(tmp_path / "one.json"))  # one user: no cold-start impressions
    assert result["cold_start"]["oracle"]["examples"] == 0 and result["cold_start"]["oracle"]["auc"] is None
    assert "| oracle | " in oracle.markdown(result) and "n/a" in oracle.markdown(result)
