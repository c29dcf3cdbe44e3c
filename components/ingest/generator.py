"""Synthetic click logs with a known truth (`xdctr generate-logs`).

Planted structure, so that cross-domain models have something to find:
  - user taste = a shared part (one of `num_groups` latent groups that span all domains, plus
    personal noise) + a domain-specific part;
  - item popularity with a heavy (Zipf) tail: impressions are drawn by popularity and popular
    items get a higher click logit;
  - short-term drift: an exponentially decayed mean of the user's recently clicked items (in any
    domain) enters the logit, so recent clicks matter;
  - cold start: a multi-domain user enters each extra domain part-way through their timeline, so
    their first impressions there come with history from other domains only.

Every record carries `oracle_ctr`, the true click probability the click was drawn from. Its AUC
on an eval split is the ceiling no model can beat. `LogGenerator.records_with_parts()` also gives
each record's logit split into its planted terms (`LOGIT_PARTS`), for ceilings of what a model
could know (`benchmarks/oracle.py`).

Output is streamed user by user (each user's records in time order), so memory stays bounded by
the item tables whatever the number of events.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
from typing import Iterator, TextIO

import numpy as np

from xdctr import features as F

START_TS = 1_704_067_200  # 2024-01-01T00:00:00Z
DAY = 86_400
# The terms of a record's logit, in the order they are summed: the base rate, the user's group
# taste and personal taste (together the shared, cross-domain taste), the domain-specific taste,
# the drift towards recent clicks and the item's popularity.
LOGIT_PARTS = ("base", "group_taste", "personal_taste", "domain_taste", "drift", "popularity")
# The drift's memory: after each click of item vector v, recent <- DRIFT_KEEP recent + DRIFT_ADD v sqrt(dim).
DRIFT_KEEP, DRIFT_ADD = 0.7, 0.3


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    num_users: int = 1000
    domains: tuple = ("grocery", "kitchen")
    items_per_domain: int = 500
    multi_domain_fraction: float = 0.6
    mean_events_per_user: float = 30.0
    activity_shape: float = 1.5  # Pareto shape of user activity; smaller is heavier-tailed
    num_days: int = 30
    num_groups: int = 8
    dim: int = 8
    shared_weight: float = 1.0  # weight of the cross-domain (group) taste in the logit
    domain_weight: float = 0.6  # weight of the domain-specific taste
    personal_scale: float = 0.3  # std of a user's personal taste around their group's
    domain_scale: float = 0.8  # std of a user's domain-specific taste
    drift_weight: float = 0.8  # weight of the recent-click drift term
    popularity_weight: float = 0.4
    base_logit: float = -1.6
    seed: int = 0

    def __post_init__(self):
        checks = {
            "num_users": self.num_users > 0,
            "items_per_domain": self.items_per_domain > 1,
            "num_days": self.num_days > 0,
            "num_groups": self.num_groups > 0,
            "dim": self.dim > 0,
            "mean_events_per_user": self.mean_events_per_user >= 1,
            "activity_shape": self.activity_shape > 1,
            "multi_domain_fraction": 0 <= self.multi_domain_fraction <= 1,
            "personal_scale": self.personal_scale >= 0,
            "domain_scale": self.domain_scale >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"`{name}` is out of range. Received: {name}={getattr(self, name)!r}")
        if len(self.domains) < 2 or len(set(self.domains)) != len(self.domains):
            raise ValueError(f"`domains` must name 2 or more distinct domains. Received: domains={self.domains!r}")


def item_id(domain: str, index: int) -> str:
    """The log's id of item `index` of `domain`."""
    return f"{domain}:i{index}"


def item_index(item: str) -> int:
    """The item's index in its domain, from an id `item_id` made."""
    return int(item.rsplit(":i", 1)[1])


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


class LogGenerator:
    """Draws users one at a time; `records()` yields log records (dicts) in per-user time order."""

    def __init__(self, config: GeneratorConfig):
        self.config = config
        rng = np.random.default_rng(config.seed)
        c = config
        self.group_taste = rng.normal(size=(c.num_groups, c.dim))
        # Per domain: item vectors, popularity logits and the sampling distribution.
        self.item_vectors = rng.normal(size=(len(c.domains), c.items_per_domain, c.dim)) / math.sqrt(c.dim)
        ranks = np.arange(1, c.items_per_domain + 1)
        zipf = 1.0 / ranks  # heavy tail: a few items take most impressions
        self.popularity = np.stack([rng.permutation(zipf) for _ in c.domains])
        self.popularity /= self.popularity.sum(axis=1, keepdims=True)
        self.popularity_logit = np.log(self.popularity * c.items_per_domain)
        self._seed_sequence = np.random.SeedSequence(config.seed)

    def _user(self, index: int, with_parts: bool = False) -> Iterator:
        """Records of user `index` in time order; with `with_parts`, (record, {part: value}) pairs."""
        c = self.config
        rng = np.random.default_rng([c.seed, index])
        num_domains = len(c.domains)
        group = rng.integers(c.num_groups)
        shared = self.group_taste[group] + c.personal_scale * rng.normal(size=c.dim)
        specific = rng.normal(size=(num_domains, c.dim)) * c.domain_scale
        n_events = max(1, int(round((c.mean_events_per_user * (c.activity_shape - 1) / c.activity_shape)
                                    * (1 + rng.pareto(c.activity_shape)))))
        primary = int(rng.integers(num_domains))
        domains = [primary]
        if rng.random() < c.multi_domain_fraction:
            others = [d for d in range(num_domains) if d != primary]
            extra = 1 + rng.binomial(len(others) - 1, 0.3) if len(others) > 1 else 1
            domains += list(rng.choice(others, size=extra, replace=False))
        # Extra domains are entered part-way through the timeline: cold start there.
        entry = {d: (0.0 if d == primary else rng.uniform(0.2, 0.8)) for d in domains}
        times = np.sort(rng.uniform(0, c.num_days * DAY, size=n_events)).astype(np.int64)
        recent = np.zeros(c.dim)
        for t in times:
            position = (t / (c.num_days * DAY))
            active = [d for d in domains if entry[d] <= position]
            d = active[int(rng.integers(len(active)))]
            item = int(rng.choice(c.items_per_domain, p=self.popularity[d]))
            v = self.item_vectors[d, item]
            shared_part = c.shared_weight * shared @ v
            domain_part = c.domain_weight * specific[d] @ v
            drift_part = c.drift_weight * recent @ v * math.sqrt(c.dim)
            popularity_part = c.popularity_weight * self.popularity_logit[d, item]
            logit = c.base_logit + shared_part + domain_part + drift_part + popularity_part
            p = _sigmoid(logit)
            clicked = int(rng.random() < p)
            if clicked:
                recent = DRIFT_KEEP * recent + DRIFT_ADD * v * math.sqrt(c.dim)
            record = {
                F.LOG_TS: int(START_TS + t),
                F.LOG_USER_ID: f"u{index}",
                F.LOG_DOMAIN: c.domains[d],
                F.LOG_ITEM_ID: item_id(c.domains[d], item),
                F.LOG_CLICKED: clicked,
                F.LOG_ORACLE_CTR: round(p, 6),
            }
            if not with_parts:
                yield record
                continue
            group_part = c.shared_weight * self.group_taste[group] @ v
            parts = (c.base_logit, group_part, shared_part - group_part, domain_part, drift_part, popularity_part)
            yield record, dict(zip(LOGIT_PARTS, map(float, parts)))

    def records(self) -> Iterator[dict]:
        for index in range(self.config.num_users):
            yield from self._user(index)

    def records_with_parts(self) -> Iterator[tuple]:
        """(record, {part: value}) pairs; the parts of a record sum to its logit (see `LOGIT_PARTS`)."""
        for index in range(self.config.num_users):
            yield from self._user(index, with_parts=True)


def write_jsonl(config: GeneratorConfig, out: TextIO) -> int:
    """Writes the log as JSON Lines; returns the number of records."""
    count = 0
    for record in LogGenerator(config).records():
        out.write(json.dumps(record, separators=(",", ":")))
        out.write("\n")
        count += 1
    return count


def generate_file(config: GeneratorConfig, path: str) -> int:
    """Writes to `path` (gzip when it ends in .gz); returns the number of records."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as out:
        return write_jsonl(config, out)
