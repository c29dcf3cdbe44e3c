"""`xdctr benchmark oracle`: what a model could know on generated logs, as AUC ceilings.

The oracle (the true click probability) is the ceiling no model can beat. Some of what it knows
no model can: a cold-start user's taste for the new domain shows in no click before the
impression. This benchmark scores the eval split with the true logit less some of its planted
terms (`generator.LOGIT_PARTS`), overall and on the cold-start slice, so a target can be held
against what the data allow:

- oracle: every term (the `oracle` row of `benchmark train` / `quality`);
- without the domain taste: what clicks in other domains cannot tell about a new domain;
- group taste, no personal or domain taste: the user's latent group (one of `num_groups`) known,
  the rest of their taste not;
- without the drift: no use of the recent clicks;
- popularity only.

The split and the slice follow the ingestion's defaults: eval is the last `eval_fraction` of the
events by time (events at the cutoff time included), and an impression is cold-start when the
user has no click in its domain before its time but some in another. The `oracle` row matches
the benchmarks' to four decimals (on the 20,000-user log the ingestion's eval split holds 9 more
impressions of the 123,403), which checks that the two agree.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import numpy as np

from components.evaluation import metrics
from components.ingest import generator
from xdctr import features as F

# name -> the logit parts it sums
CEILINGS = {
    "oracle": generator.LOGIT_PARTS,
    "without the domain taste": ("base", "group_taste", "personal_taste", "drift", "popularity"),
    "group taste, no personal or domain taste": ("base", "group_taste", "drift", "popularity"),
    "without the drift": ("base", "group_taste", "personal_taste", "domain_taste", "popularity"),
    "popularity only": ("base", "popularity"),
}


def events(records_with_parts: Iterable[tuple]) -> dict:
    """Columns of the events: user, ts, label, cold_start (bool) and one column per logit part.

    Records must come user by user, each user's in time order (as the generator writes them).
    cold_start: no click of the user in the record's domain at an earlier time, some elsewhere.
    """
    columns = {name: [] for name in ("user", "ts", "label", "cold_start", *generator.LOGIT_PARTS)}
    user, clicks, pending, last_ts = None, {}, [], None
    for record, parts in records_with_parts:
        ts, domain = record[F.LOG_TS], record[F.LOG_DOMAIN]
        if record[F.LOG_USER_ID] != user:
            user, clicks, pending, last_ts = record[F.LOG_USER_ID], {}, [], None
        if ts != last_ts:  # clicks at an earlier time count; those at the same time do not
            for clicked_domain in pending:
                clicks[clicked_domain] = clicks.get(clicked_domain, 0) + 1
            pending, last_ts = [], ts
        in_domain = clicks.get(domain, 0)
        columns["user"].append(user)
        columns["ts"].append(ts)
        columns["label"].append(record[F.LOG_CLICKED])
        columns["cold_start"].append(in_domain == 0 and sum(clicks.values()) > in_domain)
        for name in generator.LOGIT_PARTS:
            columns[name].append(parts[name])
        if record[F.LOG_CLICKED]:
            pending.append(domain)
    return {name: np.asarray(values) for name, values in columns.items()}


def eval_mask(ts: np.ndarray, eval_fraction: float) -> np.ndarray:
    """The last `eval_fraction` of the events by time: ts >= the ingestion's cutoff."""
    ordered = np.sort(ts)
    return ts >= ordered[min(len(ordered) - 1, int((1 - eval_fraction) * len(ordered)))]


def ceilings(columns: dict, eval_fraction: float = 0.2) -> dict:
    """{slice: {ceiling: {auc, gauc, examples}}} for the slices "overall" and "cold_start"."""
    in_eval = eval_mask(columns["ts"], eval_fraction)
    result = {}
    for slice_name, mask in (("overall", in_eval), ("cold_start", in_eval & columns["cold_start"])):
        labels, users = columns["label"][mask], columns["user"][mask]
        result[slice_name] = {}
        for name, parts in CEILINGS.items():
            logit = np.sum([columns[part][mask] for part in parts], axis=0)
            gauc, _, _ = metrics.gauc(users, labels, logit)
            result[slice_name][name] = {"auc": metrics.auc(labels, logit), "gauc": gauc, "examples": int(mask.sum())}
    return result


def markdown(result: dict) -> str:
    """The ceilings as a table; "n/a" where a slice has one class only (no AUC)."""
    cell = lambda value: "n/a" if value is None else f"{value:.4f}"  # noqa: E731
    lines = ["| ceiling | AUC | GAUC | cold-start AUC | cold-start GAUC |", "| --- | ---: | ---: | ---: | ---: |"]
    for name in CEILINGS:
        overall, cold = result["overall"][name], result["cold_start"][name]
        lines.append(f"| {name} | {cell(overall['auc'])} | {cell(overall['gauc'])} | {cell(cold['auc'])} | "
                     f"{cell(cold['gauc'])} |")
    return "\n".join(lines)


def run(users: int, seed: int, eval_fraction: float, out: str) -> dict:
    config = generator.GeneratorConfig(num_users=users, seed=seed)
    result = ceilings(events(generator.LogGenerator(config).records_with_parts()), eval_fraction)
    print(f"generated log: {users} users, seed {seed}; eval = the last {eval_fraction:g} of the events "
          f"({result['overall']['oracle']['examples']} impressions, {result['cold_start']['oracle']['examples']} "
          f"cold-start)\n")
    print(markdown(result))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"users": users, "seed": seed, "eval_fraction": eval_fraction,
                   "ceilings": {name: list(parts) for name, parts in CEILINGS.items()}, "results": result}, f, indent=2)
    print(f"\nwrote {out}")
    return result
