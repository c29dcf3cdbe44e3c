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
- popularity only;
- posterior: what the user's earlier impressions can tell, at best. Each impression is scored
  with P(click | every impression of the user at an earlier time, clicked or not, and the
  generator's exact parameters), the taste the generator drew (group, personal and domain
  taste) integrated out by importance sampling from its prior (`posterior_logits`). The drift
  and popularity terms are functions of the earlier clicks and the item, so they enter as they
  are. Thresholding this probability is the most powerful test of a click given that
  information (Neyman-Pearson), and every model's inputs (the earlier clicks, the target, the
  times) are a function of it, so its AUC bounds every model's, up to the sampling's error. A
  cold-start impression's posterior knows the user's other domains, and their non-clicks too.
- posterior, clicks only (optional): the same from the earlier clicks alone, what a model's
  history features show (`click_posterior_logits`); an estimate of a click-history model's
  ceiling, not a bound. With `--click-history-length N`, from the last N earlier clicks only, as
  a mixed history of N clicks shows them.
- logistic on the true item vectors (optional, `--logistic`): not a ceiling but a reference of
  what a simple model of the right form reaches when its item embeddings are perfect. A logistic
  regression, fitted on the rows before the eval cutoff, reads what a model's inputs show (the
  last `F.DEFAULT_HISTORY_LENGTH` earlier clicks and the target) through the generator's own item
  vectors: the drift's decayed sum, the mean affinity to the clicks in the target's domain and in
  the others, and the item's popularity (`logistic_features`). A trained model learns its
  embeddings from the clicks, so this is what it could reach with the best embeddings and this
  functional form, not a bound.

The split and the slice follow the ingestion's defaults: eval is the last `eval_fraction` of the
events by time (events at the cutoff time included), and an impression is cold-start when the
user has no click in its domain before its time but some in another. The `oracle` row matches
the benchmarks' to four decimals (on the 20,000-user log the ingestion's eval split holds 9 more
impressions of the 123,403), which checks that the two agree.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Iterable, Optional

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


POSTERIOR = "posterior"
CLICK_POSTERIOR = "posterior, clicks only"
LOGISTIC = "logistic on the true item vectors"
# The columns of `logistic_features`, in order; the domain indicators follow them.
LOGISTIC_FEATURES = ("drift", "mean affinity, same domain", "mean affinity, other domains",
                     "shrunk mean affinity, same domain", "shrunk mean affinity, other domains",
                     "log1p clicks, same domain", "log1p clicks, other domains", "popularity")
# The shrunk means are mean * n / (n + LOGISTIC_SHRINK): a mean of few clicks says less.
LOGISTIC_SHRINK = 2.0
DEFAULT_SAMPLES_PER_GROUP = 256


def click_posterior_name(history_length: Optional[int] = None) -> str:
    """The click posterior's row: `CLICK_POSTERIOR`, or with its clicks window."""
    return CLICK_POSTERIOR if history_length is None else f"posterior, last {history_length} clicks only"


def events(records_with_parts: Iterable[tuple]) -> dict:
    """Columns of the events: user, ts, label, cold_start (bool), domain and item (the record's
    ids, "" when absent) and one column per logit part.

    Records must come user by user, each user's in time order (as the generator writes them).
    cold_start: no click of the user in the record's domain at an earlier time, some elsewhere.
    """
    columns = {name: [] for name in ("user", "ts", "label", "cold_start", "domain", "item", *generator.LOGIT_PARTS)}
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
        columns["domain"].append(domain)
        columns["item"].append(record.get(F.LOG_ITEM_ID, ""))
        for name in generator.LOGIT_PARTS:
            columns[name].append(parts[name])
        if record[F.LOG_CLICKED]:
            pending.append(domain)
    return {name: np.asarray(values) for name, values in columns.items()}


def eval_mask(ts: np.ndarray, eval_fraction: float) -> np.ndarray:
    """The last `eval_fraction` of the events by time: ts >= the ingestion's cutoff."""
    ordered = np.sort(ts)
    return ts >= ordered[min(len(ordered) - 1, int((1 - eval_fraction) * len(ordered)))]


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def posterior_logits(columns: dict, log: generator.LogGenerator, samples_per_group: int = DEFAULT_SAMPLES_PER_GROUP,
                     seed: int = 0, rows: Optional[np.ndarray] = None) -> np.ndarray:
    """Logit of P(click | the user's impressions at earlier times) for each row (see the docstring).

    The generator draws a user's taste as shared = group_taste[g] + personal_scale * n and
    specific_d = domain_scale * z_d (g uniform, n and z_d standard normal), and the logit of an
    impression of item vector v in domain d as
        base + shared_weight * shared . v + domain_weight * specific_d . v + drift + popularity.
    S = num_groups * samples_per_group draws of (g, n, z) from that prior (the same draws for
    every user; g stratified, `samples_per_group` per group) are weighted, for an impression k,
    by the likelihood of the user's impressions j with ts_j < ts_k (clicked or not), and the
    click probability is the weighted mean of each draw's sigmoid(logit_k). The first impression
    of a user gets the prior mean.

    Args:
      columns: `events` of a log `log` wrote (user by user, in time order; with domain and item).
      log: the generator of that log (its item vectors and group tastes).
      samples_per_group: draws per group.
      seed: seed of the draws.
      rows: a boolean mask of the rows to score (others are only conditioned on); None: all.

    Returns:
      (num_rows,) logits; NaN where `rows` is False.
    """
    # every impression, clicked or not: log sigmoid(+-logit)
    impressions_of = lambda domains, items, labels, logits: -_softplus(np.where(labels, -logits, logits))  # noqa: E731
    return _posterior(columns, log, _taste_draws(log, samples_per_group, seed), rows, impressions_of)


def _item_vectors(columns: dict, log: generator.LogGenerator) -> tuple:
    """(domains, items, vectors) of every row: its domain and item indices, (N,) each, and the
    generator's vector of its item, (N, dim)."""
    domain_index = {name: d for d, name in enumerate(log.config.domains)}
    domains = np.array([domain_index[name] for name in columns["domain"]])
    items = np.array([generator.item_index(item) for item in columns["item"]])
    return domains, items, log.item_vectors[domains, items]


def _posterior(columns: dict, log: generator.LogGenerator, taste: np.ndarray, rows: Optional[np.ndarray],
               user_loglik, clicks_window: Optional[int] = None) -> np.ndarray:
    """The importance-sampling posterior of each wanted row, given a likelihood.

    taste: (S, D, dim) draws from the prior. user_loglik(domains, items, labels, logits) gives,
    for one user's K impressions (domain and item indices, labels, each draw's logits (S, K)),
    the (S, K) log-likelihood each impression adds for the impressions after it. Each wanted row
    gets the draws' click probabilities weighted by the likelihood of the impressions at earlier
    times, or with `clicks_window` of the last `clicks_window` clicks at earlier times only (the
    likelihood must then be 0 at every impression not clicked); returns the logits, NaN where
    `rows` is False.
    """
    domains, items, vectors = _item_vectors(columns, log)
    rest = columns["base"] + columns["drift"] + columns["popularity"]  # (N,): known given the earlier clicks
    labels = columns["label"].astype(bool)
    wanted = np.ones(len(labels), bool) if rows is None else np.asarray(rows, bool)
    out = np.full(len(labels), np.nan)

    users = columns["user"]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    for start, end in zip(starts, np.r_[starts[1:], len(users)]):
        if not wanted[start:end].any():
            continue
        user_domains, ts = domains[start:end], columns["ts"][start:end]
        logits = np.einsum("skd,kd->sk", taste[:, user_domains, :], vectors[start:end]) + rest[start:end]  # (S, K)
        loglik = user_loglik(user_domains, items[start:end], labels[start:end], logits)  # (S, K)
        first_at_time = np.searchsorted(ts, ts, side="left")  # impressions at the same time are not earlier
        keep = np.flatnonzero(wanted[start:end])
        if clicks_window is None:
            before = np.concatenate([np.zeros((len(taste), 1)), np.cumsum(loglik, axis=1)], axis=1)  # (S, K+1)
            weights = before[:, first_at_time[keep]]  # (S, kept): log weights
        else:
            clicked = np.flatnonzero(labels[start:end])
            before = np.concatenate([np.zeros((len(taste), 1)), np.cumsum(loglik[:, clicked], axis=1)], axis=1)
            seen = np.searchsorted(clicked, first_at_time[keep], side="left")  # (kept,): clicks at earlier times
            weights = before[:, seen] - before[:, np.maximum(seen - clicks_window, 0)]  # (S, kept): the last ones'
        weights = np.exp(weights - weights.max(axis=0, keepdims=True))
        ctr = np.sum(weights / (1.0 + np.exp(-logits[:, keep])), axis=0) / weights.sum(axis=0)  # (kept,)
        ctr = np.clip(ctr, 1e-12, 1 - 1e-12)
        out[start + keep] = np.log(ctr) - np.log1p(-ctr)
    return out


def _taste_draws(log: generator.LogGenerator, samples_per_group: int, seed: int) -> np.ndarray:
    """(S, D, dim): shared_weight * shared + domain_weight * specific_d of S draws from the prior
    (g stratified, `samples_per_group` per group)."""
    config = log.config
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(config.num_groups), samples_per_group)  # (S,)
    shared = log.group_taste[groups] + config.personal_scale * rng.normal(size=(len(groups), config.dim))  # (S, dim)
    specific = config.domain_scale * rng.normal(size=(len(groups), len(config.domains), config.dim))  # (S, D, dim)
    return config.shared_weight * shared[:, None, :] + config.domain_weight * specific


def click_posterior_logits(columns: dict, log: generator.LogGenerator,
                           samples_per_group: int = DEFAULT_SAMPLES_PER_GROUP, seed: int = 0,
                           rows: Optional[np.ndarray] = None, history_length: Optional[int] = None) -> np.ndarray:
    """Logit of P(click | the user's clicks at earlier times) for each row: `posterior_logits`
    with the likelihood of what a model's history features show, the clicked items alone.

    A model reads a user's earlier clicks (which items, in which domain, when), not the
    impressions they did not click. Each earlier click j of item i_j in domain d_j enters as the
    probability that a click in d_j is on i_j:

        P(i_j | a click in d_j) = pop(d_j, i_j) sigmoid(l(i_j)) / sum_k pop(d_j, k) sigmoid(l(k))

    where l(k) is the logit of item k of d_j at click j's moment under the draw's taste (with
    the drift of the clicks before j, as the generator computes it) and pop the generator's
    impression distribution. Two things the history also shows are left out: when the clicks
    came (the number of impressions between them is not shown, and follows the user's activity,
    which is drawn apart from the taste) and which domain each was in (the domain an impression
    comes from is drawn uniformly among the user's active domains, which a history does not
    show either). So this is the best guess from which items were clicked, a close estimate of
    a click-history model's ceiling rather than a proven bound; `posterior_logits` (every
    impression) is the bound.

    `history_length` conditions on the last `history_length` earlier clicks only, what the
    ingestion's mixed history of that length shows (its default, `F.DEFAULT_HISTORY_LENGTH`, cuts
    the clicks of heavy users); None: every earlier click. The drift enters whole either way (it
    keeps 0.7^k of the click k steps back, so clicks beyond the window add almost nothing to it).

    Args and returns as `posterior_logits`; the same seed gives the same draws.
    """
    if history_length is not None and history_length < 1:
        raise ValueError(f"`history_length` must be >= 1 or None. Received: history_length={history_length!r}")
    config = log.config
    taste = _taste_draws(log, samples_per_group, seed)  # (S, D, dim)
    # taste . v of every draw and item: (D, S, items)
    affinity = np.einsum("sdr,dkr->dsk", taste, log.item_vectors).astype(np.float32)
    popularity_part = config.popularity_weight * log.popularity_logit  # (D, items)
    drift_scale = config.drift_weight * np.sqrt(config.dim)

    def clicks_of(domains, items, labels, logits):
        loglik = np.zeros(logits.shape)  # (S, K): 0 for the impressions not clicked
        recent = np.zeros(config.dim)
        for k in np.flatnonzero(labels):
            d, vectors = domains[k], log.item_vectors[domains[k]]
            known = (config.base_logit + drift_scale * vectors @ recent + popularity_part[d]).astype(np.float32)  # (items,)
            every = affinity[d] + known  # (S, items): each draw's logit of every item of d at this moment
            normaliser = (1.0 / (1.0 + np.exp(-every))) @ log.popularity[d].astype(np.float32)  # (S,)
            loglik[:, k] = -_softplus(-logits[:, k]) - np.log(normaliser)
            recent = generator.DRIFT_KEEP * recent + generator.DRIFT_ADD * vectors[items[k]] * np.sqrt(config.dim)
        return loglik

    return _posterior(columns, log, taste, rows, clicks_of, clicks_window=history_length)


def logistic_features(columns: dict, log: generator.LogGenerator,
                      history_length: int = F.DEFAULT_HISTORY_LENGTH) -> np.ndarray:
    """(rows, len(LOGISTIC_FEATURES) + D) features of every row, read through the true item vectors.

    A row's window is the last `history_length` clicks of its user at times before the row's, as
    the ingestion's mixed history holds them. With v the target's item vector, a_j = v_j . v the
    affinity of window click j, k_j its steps back from the latest (0) and n_same, n_other the
    window's clicks in the target's domain and in the others:

        drift = sum_j DRIFT_KEEP^k_j a_j    (the generator's drift term is drift_weight * DRIFT_ADD
                                             * dim times this when the window holds every earlier
                                             click at an earlier time)
        mean affinity, same domain = mean of a_j over the window's clicks in the domain (0 if none),
          and the same over the other domains' clicks
        shrunk mean affinity = mean * n / (n + LOGISTIC_SHRINK), n the clicks it averages
        log1p clicks = log(1 + n_same), log(1 + n_other)
        popularity = the generator's popularity term of the target

    then one 0/1 column per domain (the row's domain; they are the intercepts). Records must come
    user by user, each user's in time order (`events`).
    """
    if history_length < 1:
        raise ValueError(f"`history_length` must be >= 1. Received: history_length={history_length!r}")
    config = log.config
    domains, items, vectors = _item_vectors(columns, log)
    labels, users, ts = columns["label"].astype(bool), columns["user"], columns["ts"]
    rows = len(labels)
    out = np.zeros((rows, len(LOGISTIC_FEATURES) + len(config.domains)))
    out[:, LOGISTIC_FEATURES.index("popularity")] = config.popularity_weight * log.popularity_logit[domains, items]
    out[np.arange(rows), len(LOGISTIC_FEATURES) + domains] = 1.0
    decay = generator.DRIFT_KEEP ** np.arange(history_length)[::-1]  # the last slot holds the latest click
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    for start, end in zip(starts, np.r_[starts[1:], rows]):
        clicked = start + np.flatnonzero(labels[start:end])  # the user's clicks, as rows
        if not len(clicked):
            continue
        seen = np.searchsorted(ts[clicked], ts[start:end], side="left")  # (K,): clicks at earlier times
        slots = seen[:, None] - history_length + np.arange(history_length)  # (K, L): indices into clicked
        valid = slots >= 0
        window = clicked[np.maximum(slots, 0)]  # (K, L)
        affinity = np.einsum("kld,kd->kl", vectors[window], vectors[start:end]) * valid
        same = valid & (domains[window] == domains[start:end, None])
        other = valid & ~same
        block = out[start:end]
        block[:, 0] = affinity @ decay
        for column, mask in ((1, same), (2, other)):
            count = mask.sum(axis=1)
            mean = (affinity * mask).sum(axis=1) / np.maximum(count, 1)
            block[:, column] = mean
            block[:, column + 2] = mean * count / (count + LOGISTIC_SHRINK)
            block[:, column + 4] = np.log1p(count)
    return out


def _fit_logistic(x: np.ndarray, y: np.ndarray, ridge: float = 1e-3, iterations: int = 100) -> np.ndarray:
    """Weights minimising the log loss + ridge / 2 |w|^2, by Newton's method."""
    weights = np.zeros(x.shape[1])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(x @ weights)))
        gradient = x.T @ (p - y) + ridge * weights
        hessian = (x * (p * (1.0 - p))[:, None]).T @ x + ridge * np.eye(x.shape[1])
        step = np.linalg.solve(hessian, gradient)
        weights -= step
        if np.max(np.abs(step)) < 1e-9:
            break
    return weights


def logistic_logits(columns: dict, log: generator.LogGenerator, eval_fraction: float = 0.2,
                    history_length: int = F.DEFAULT_HISTORY_LENGTH) -> tuple:
    """(logits of every row, {feature: weight}): the logistic regression on `logistic_features`,
    fitted on the rows before the eval cutoff (`eval_mask`), the rows a model trains on."""
    x = logistic_features(columns, log, history_length)
    train = ~eval_mask(columns["ts"], eval_fraction)
    if not train.any():
        raise ValueError("no rows before the eval cutoff to fit the logistic reference on")
    weights = _fit_logistic(x[train], columns["label"][train].astype(np.float64))
    names = LOGISTIC_FEATURES + tuple(f"domain {name}" for name in log.config.domains)
    return x @ weights, dict(zip(names, map(float, weights)))


def ceilings(columns: dict, eval_fraction: float = 0.2, posterior: Optional[np.ndarray] = None,
             click_posterior: Optional[np.ndarray] = None, click_history_length: Optional[int] = None,
             logistic: Optional[np.ndarray] = None) -> dict:
    """{slice: {ceiling: {auc, gauc, examples}}} for the slices "overall" and "cold_start".

    `posterior`, `click_posterior`: `posterior_logits` and `click_posterior_logits` of (at
    least) the eval rows, for their rows; the latter computed with `click_history_length`, which
    names its row (`click_posterior_name`). `logistic`: `logistic_logits` of the same rows.
    """
    in_eval = eval_mask(columns["ts"], eval_fraction)
    result = {}
    scorers = {name: (lambda mask, parts=parts: np.sum([columns[part][mask] for part in parts], axis=0))
               for name, parts in CEILINGS.items()}
    if posterior is not None:
        scorers[POSTERIOR] = lambda mask: posterior[mask]
    if click_posterior is not None:
        scorers[click_posterior_name(click_history_length)] = lambda mask: click_posterior[mask]
    if logistic is not None:
        scorers[LOGISTIC] = lambda mask: logistic[mask]
    for slice_name, mask in (("overall", in_eval), ("cold_start", in_eval & columns["cold_start"])):
        labels, users = columns["label"][mask], columns["user"][mask]
        result[slice_name] = {}
        for name, scorer in scorers.items():
            logit = scorer(mask)
            gauc, _, _ = metrics.gauc(users, labels, logit)
            result[slice_name][name] = {"auc": metrics.auc(labels, logit), "gauc": gauc, "examples": int(mask.sum())}
    return result


def markdown(result: dict) -> str:
    """The ceilings as a table; "n/a" where a slice has one class only (no AUC)."""
    cell = lambda value: "n/a" if value is None else f"{value:.4f}"  # noqa: E731
    lines = ["| ceiling | AUC | GAUC | cold-start AUC | cold-start GAUC |", "| --- | ---: | ---: | ---: | ---: |"]
    for name in result["overall"]:
        overall, cold = result["overall"][name], result["cold_start"][name]
        lines.append(f"| {name} | {cell(overall['auc'])} | {cell(overall['gauc'])} | {cell(cold['auc'])} | "
                     f"{cell(cold['gauc'])} |")
    return "\n".join(lines)


def compute(users: int, seed: int, eval_fraction: float, samples_per_group: int = DEFAULT_SAMPLES_PER_GROUP,
            posterior_seed: int = 0, click_samples_per_group: int = 0,
            click_history_length: Optional[int] = None, logistic: bool = False) -> dict:
    """The ceilings of the generated log (`users`, `seed`): {"results": `ceilings`, "posterior" and
    "click_posterior": their settings and seconds, or None when their draws per group are 0,
    "logistic": the logistic reference's window, weights and seconds, or None without `logistic`}.

    The click posterior is off by default: on the 20,000-user log it took 231 s at 64 draws per
    group (2 cores, beside two training runs), and its cost grows linearly with the draws.
    `click_history_length`: the click posterior's window (see `click_posterior_logits`)."""
    config = generator.GeneratorConfig(num_users=users, seed=seed)
    log = generator.LogGenerator(config)
    columns = events(log.records_with_parts())
    in_eval = eval_mask(columns["ts"], eval_fraction)
    scores, infos = {}, {}
    click_posterior = functools.partial(click_posterior_logits, history_length=click_history_length)
    for name, function, draws in (("posterior", posterior_logits, samples_per_group),
                                  ("click_posterior", click_posterior, click_samples_per_group)):
        scores[name], infos[name] = None, None
        if draws > 0:
            started = time.perf_counter()
            scores[name] = function(columns, log, draws, posterior_seed, rows=in_eval)
            infos[name] = {"samples_per_group": draws, "groups": config.num_groups, "seed": posterior_seed,
                           "seconds": time.perf_counter() - started}
    if infos["click_posterior"] is not None:
        infos["click_posterior"]["history_length"] = click_history_length
    scores["logistic"], infos["logistic"] = None, None
    if logistic:
        started = time.perf_counter()
        scores["logistic"], weights = logistic_logits(columns, log, eval_fraction)
        infos["logistic"] = {"history_length": F.DEFAULT_HISTORY_LENGTH, "weights": weights,
                             "seconds": time.perf_counter() - started}
    results = ceilings(columns, eval_fraction, scores["posterior"], scores["click_posterior"], click_history_length,
                       scores["logistic"])
    return {"results": results, **infos}


def describe(users: int, seed: int, eval_fraction: float, computed: dict) -> str:
    """One line on the log, the split, the posteriors' draws and the logistic reference's window."""
    result = computed["results"]
    text = (f"generated log: {users} users, seed {seed}; eval = the last {eval_fraction:g} of the events "
            f"({result['overall']['oracle']['examples']} impressions, {result['cold_start']['oracle']['examples']} "
            f"cold-start)")
    for name in ("posterior", "click_posterior"):
        info = computed.get(name)
        if info is not None:
            text += (f"; {name.replace('_', ' ')}: {info['groups']} x {info['samples_per_group']} draws "
                     f"(seed {info['seed']}), {info['seconds']:.0f} s")
    if computed.get("logistic") is not None:
        info = computed["logistic"]
        text += f"; logistic: the last {info['history_length']} clicks, {info['seconds']:.0f} s"
    return text


def run(users: int, seed: int, eval_fraction: float, out: str,
        samples_per_group: int = DEFAULT_SAMPLES_PER_GROUP, posterior_seed: int = 0,
        click_samples_per_group: int = 0, click_history_length: Optional[int] = None,
        logistic: bool = False) -> dict:
    """Prints the ceilings of the generated log (`users`, `seed`) and writes them to `out`.

    samples_per_group, click_samples_per_group: the posteriors' draws per group; 0 leaves the
    row out (the click posterior's default: see `compute`). click_history_length: the click
    posterior's window of earlier clicks (None: all). logistic: add the logistic reference's row.
    """
    computed = compute(users, seed, eval_fraction, samples_per_group, posterior_seed, click_samples_per_group,
                       click_history_length, logistic)
    result = computed["results"]
    print(describe(users, seed, eval_fraction, computed) + "\n")
    print(markdown(result))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"users": users, "seed": seed, "eval_fraction": eval_fraction,
                   "ceilings": {name: list(parts) for name, parts in CEILINGS.items()},
                   "posterior": computed["posterior"], "click_posterior": computed["click_posterior"],
                   "logistic": computed["logistic"], "results": result}, f, indent=2)
    print(f"\nwrote {out}")
    return result
