"""The leave-one-out ranking protocol: HR@5, HR@10, NDCG@10 and MRR against 999 sampled items.

amazon-food-kitchen is the `afk` set of ABXI (WWW'25: same users, items and row order), so this
protocol puts the project's models next to published numbers on exactly its data.

Protocol (`xdctr evaluate --protocol leave-one-out`):

- Per user, the merged sequence s[1..n] of the user's interactions in all domains, by ts; rows
  that share a ts keep their FILE ORDER. This differs on purpose from the leakage-free default of
  the ingestion (where events sharing a ts never see each other): it is the published protocol's
  order. To let the normal ingestion reproduce it, every interaction gets a tie-broken time
  ts' = max(ts, ts' of the previous interaction + 1), strictly increasing along s and equal to
  ts where there is no tie (so a 3-row tie at day resolution becomes ts, ts + 1 s, ts + 2 s:
  the same 0-minute time-gap bucket as before).
- test case: target s[n], input s[1..n-1]; valid case: target s[n-1], input s[1..n-2]; the
  train part: s[1..n-2]. Users with fewer than 3 interactions give train rows only (every user
  of amazon-food-kitchen has 10 or more). A case's domain is its target's.
- Candidates: the target and `negatives` (999) items drawn uniformly without replacement from
  the target domain's items (every item of that domain in the input) minus ALL the user's items
  (s[1..n]). Seeded per (seed, split, user), so every model is ranked against the same items.
- rank = 1 + the number of negatives scoring strictly higher than the target (a negative that
  ties the target does not count; `ties` reports how many did). HR@k = mean(rank <= k);
  NDCG@10 = mean(1 / log2(rank + 1) if rank <= 10 else 0) (one relevant item, so IDCG = 1);
  MRR = mean(1 / rank). Per target domain and overall.

Training data (`write_train_part`, `xdctr import-interactions --leave-one-out`): the train part
with ts', through the importer (each train interaction a click + K uniform negatives), then the
normal ingestion and Trainer. A model is scored through its exported `score_candidates`
signature: one tf.Example of the case (the same history features as the ingestion builds, from
the input rows with ts') and the 1,000 candidates.

Reference scorers: `popularity` (the item's interactions in the train part, ties broken by a
seeded random jitter below 1, so the strictly-higher rule cannot flatter it), `random`
(uniform scores: expected HR@10 = 10 / 1000 = 0.010) and `cooccurrence`, item-to-item
co-occurrence without any learning: score(c) = sum over the case's history items h_k (k = 0 the
latest) of C[h_k, c] / (k + 1), C[i, j] = the number of users whose train part holds both i and
j, plus 0.001 x popularity and the jitter to break ties.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from components.ingest import importer, sequences
from components.ingest.records import Impression
from xdctr import features as F

logger = logging.getLogger(__name__)

PROTOCOL = "leave-one-out"
TEST, VALID = "test", "valid"
SPLITS = (TEST, VALID)
DEFAULT_NEGATIVES = 999
RESULT_FILE = "ranking.json"
MARKDOWN_FILE = "ranking.md"
OVERALL = "overall"
METRICS = ("hr@5", "hr@10", "ndcg@10", "mrr")
BASELINES = ("popularity", "random", "cooccurrence")
PROGRESS_EVERY = 1000

# ABXI (Bian et al., WWW'25), Table 3, the afk set = amazon-food-kitchen, mean of 5 seeds.
PUBLISHED = {
    "source": "ABXI (WWW'25) on afk (= amazon-food-kitchen), mean of 5 seeds",
    "domain=grocery_gourmet_food": {"hr@10": 0.3243, "ndcg@10": 0.1971, "mrr": 0.1655},
    "domain=home_kitchen": {"hr@10": 0.2438, "ndcg@10": 0.1427, "mrr": 0.1219},
}

DEFINITIONS = {
    "order": "per user, by ts; rows sharing a ts keep their file order (ts' = max(ts, previous ts' + 1))",
    "cases": "test: target s[n], input s[1..n-1]; valid: target s[n-1], input s[1..n-2]; train part s[1..n-2]",
    "candidates": ("the target + N items uniform without replacement from the target's domain, excluding every "
                   "item of the user; seeded per (seed, split, user)"),
    "rank": "1 + negatives scoring strictly higher than the target (ties do not count; see ties)",
    "hr@k": "mean of rank <= k", "ndcg@10": "mean of 1/log2(rank + 1) for rank <= 10, else 0",
    "mrr": "mean of 1/rank", "ties": "mean number of negatives scoring exactly the target's score",
}


def _split_index(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {list(SPLITS)}. Received: split={split!r}")
    return SPLITS.index(split)


@dataclasses.dataclass
class Sequences:
    """Every user's merged sequence, in protocol order.

    Attributes:
      users, items, domains: names (user code u is users[u], ...).
      item_domain: (items,) int domain code of each item.
      rows: per user, the list of (item code, ts') in protocol order.
      user_items: per user, the set of item codes in the user's whole sequence.
      domain_items: per domain, the int array of its item codes.
      rejected_rows: input rows rejected by the importer's validation (written as dead letters).
      duplicate_rows: exact duplicate input rows dropped.
    """

    users: list
    items: list
    domains: list
    item_domain: np.ndarray
    rows: list
    user_items: list
    domain_items: list
    rejected_rows: int = 0
    duplicate_rows: int = 0

    def event(self, user: int, item: int, ts: int) -> Impression:
        return Impression(ts, self.users[user], self.domains[self.item_domain[item]], self.items[item], 1)


def read_sequences(paths: Sequence[str], dead_letter_path: str) -> Sequences:
    """Reads interaction CSVs with the importer's validation (bad rows go to `dead_letter_path`,
    exact duplicate rows are one interaction) and orders every user's rows by the protocol."""
    paths = [str(p) for p in ([paths] if isinstance(paths, str) else paths)]
    data, dead = importer.read_interactions(paths, dead_letter_path)
    per_user: list = [[] for _ in data.users.names]
    for row, user in enumerate(data.row_user):
        per_user[user].append(row)
    rows = []
    for user_rows in per_user:
        user_rows.sort(key=data.row_ts.__getitem__)  # stable: ties keep the file order
        sequence, last = [], None
        for row in user_rows:
            ts = data.row_ts[row] if last is None else max(data.row_ts[row], last + 1)
            sequence.append((data.row_item[row], ts))
            last = ts
        rows.append(sequence)
    item_domain = np.asarray(data.item_domain, dtype=np.int64)
    return Sequences(
        users=list(data.users.names), items=list(data.items.names), domains=list(data.domains.names),
        item_domain=item_domain, rows=rows, user_items=[set(items) for items in data.user_items],
        domain_items=[np.flatnonzero(item_domain == d) for d in range(len(data.domains.names))],
        rejected_rows=int(sum(dead.values())), duplicate_rows=data.duplicates)


@dataclasses.dataclass(frozen=True)
class Case:
    """One ranking case: `user` (code) ranks `target` (item code) at `ts` after `history`."""

    user: int
    target: int
    ts: int
    history: tuple  # ((item code, ts'), ...) in protocol order


def cases(seqs: Sequences, split: str) -> List[Case]:
    """The `split` case of every user with at least 3 interactions, in user order."""
    back = 1 + _split_index(split)  # test: the last interaction, valid: the one before
    result = []
    for user, rows in enumerate(seqs.rows):
        if len(rows) >= 3:
            target, ts = rows[-back]
            result.append(Case(user, target, ts, tuple(rows[:-back])))
    return result


def train_part(seqs: Sequences) -> list:
    """(user code, item code, ts') of every train interaction: s[1..n-2], or all of s for n < 3."""
    return [(user, item, ts) for user, rows in enumerate(seqs.rows)
            for item, ts in (rows[:-2] if len(rows) >= 3 else rows)]


def write_train_part(seqs: Sequences, path: str) -> int:
    """Writes the train part as an interactions CSV (`user_id,item_id,domain,ts` with ts');
    returns the number of rows. Names are quoted by the csv module where they need it."""
    import csv

    rows = train_part(seqs)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(importer.REQUIRED_COLUMNS)
        for user, item, ts in rows:
            writer.writerow([seqs.users[user], seqs.items[item], seqs.domains[seqs.item_domain[item]], ts])
    return len(rows)


def import_train_part(paths: Sequence[str], output_path: str, config: importer.ImportConfig) -> dict:
    """The train part of `paths` as an impression log at `output_path`, through the importer
    with `config` (the protocol's: `negative_sampling="uniform"`); the train CSV is written next
    to it (`<output_path>.train.csv`). Returns the importer's summary plus `train_csv`."""
    dead_letter_path = str(output_path) + ".input" + importer.DEAD_LETTER_SUFFIX
    seqs = read_sequences(paths, dead_letter_path)
    train_csv = str(output_path) + ".train.csv"
    write_train_part(seqs, train_csv)
    summary = importer.import_interactions([train_csv], str(output_path), config)
    return {**summary, "train_csv": train_csv, "input_rejected_rows": seqs.rejected_rows,
            "input_dead_letter_path": dead_letter_path}


def sample_negatives(seqs: Sequences, case: Case, split: str, seed: int, count: int = DEFAULT_NEGATIVES) -> np.ndarray:
    """`count` item codes uniform without replacement from the target's domain minus the user's
    items (fewer only when fewer are eligible). Depends only on (seed, split, user).

    The draw is a uniform random ordered sample of count + m items of the domain (m: the user's
    items there); dropping the user's items from it leaves at least `count`, whose first `count`
    are a uniform sample of the eligible items (a uniform permutation restricted to a subset is a
    uniform permutation of that subset)."""
    domain_items = seqs.domain_items[seqs.item_domain[case.target]]
    excluded = seqs.user_items[case.user]
    own = sum(1 for i in excluded if seqs.item_domain[i] == seqs.item_domain[case.target])
    rng = np.random.default_rng([seed, _split_index(split), case.user])
    drawn = domain_items[rng.choice(len(domain_items), size=min(len(domain_items), count + own), replace=False)]
    return np.array([i for i in drawn.tolist() if i not in excluded][:count], dtype=np.int64)


def rank_of(target_score: float, negative_scores: np.ndarray) -> tuple:
    """(rank, ties): 1 + negatives scoring strictly higher; negatives scoring exactly the same."""
    negative_scores = np.asarray(negative_scores)
    return 1 + int(np.sum(negative_scores > target_score)), int(np.sum(negative_scores == target_score))


def rank_metrics(ranks: Sequence[int], ties: Optional[Sequence[int]] = None) -> dict:
    """HR@5, HR@10, NDCG@10, MRR (and mean ties) of 1-based ranks; None metrics for no case."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if not len(ranks):
        return {"cases": 0, **{m: None for m in METRICS}, "ties": None}
    ndcg = np.where(ranks <= 10, 1.0 / np.log2(ranks + 1.0), 0.0)
    return {"cases": int(len(ranks)), "hr@5": float(np.mean(ranks <= 5)), "hr@10": float(np.mean(ranks <= 10)),
            "ndcg@10": float(np.mean(ndcg)), "mrr": float(np.mean(1.0 / ranks)),
            "ties": None if ties is None else float(np.mean(ties))}


# ---------------------------------------------------------------------------------------------
# Scorers: (case, its serialized tf.Example, candidate item names, candidate domain names) -> scores

Scorer = Callable[[Case, bytes, List[str], List[str]], np.ndarray]


def case_example(seqs: Sequences, case: Case, contract: F.Contract) -> bytes:
    """The case as the serialized tf.Example the ingestion would make for its target, after
    exactly its history (ts' times, so every history row is strictly earlier)."""
    state = sequences.UserState(contract)
    for item, ts in case.history:
        state.add_click(seqs.event(case.user, item, ts))
    target = seqs.event(case.user, case.target, case.ts)
    (example,) = sequences.user_examples(target.user_id, [target], contract, state=state)
    return sequences.serialize_example(example)


def saved_model_scorer(model_dir: str) -> tuple:
    """(contract, scorer, keep-alive object) of an exported xdctr model's `score_candidates`."""
    import tensorflow as tf

    from models import config as config_lib

    config_path = os.path.join(model_dir, config_lib.CONFIG_FILE)
    if not tf.io.gfile.exists(os.path.join(model_dir, "saved_model.pb")) or not tf.io.gfile.exists(config_path):
        raise ValueError(f"model dir {model_dir!r} holds no saved_model.pb and {config_lib.CONFIG_FILE}; expected an "
                         "exported xdctr model (a version directory the Trainer or Pusher wrote)")
    with tf.io.gfile.GFile(config_path) as f:
        inputs = json.load(f)["config"]["inputs"]
    contract = F.Contract(tuple(inputs["domains"]), inputs["history_length"], inputs["domain_history_length"])
    loaded = tf.saved_model.load(model_dir)
    if F.SCORE_CANDIDATES_SIGNATURE not in loaded.signatures:
        raise ValueError(f"the SavedModel in {model_dir!r} has no {F.SCORE_CANDIDATES_SIGNATURE!r} signature; "
                         f"it has {sorted(loaded.signatures)}")
    signature = loaded.signatures[F.SCORE_CANDIDATES_SIGNATURE]
    # The logit where the export has it (ranks without float32 sigmoid ties at 1.0); older exports: ctr.
    output = F.RANKING_OUTPUT if F.RANKING_OUTPUT in signature.structured_outputs else F.SERVING_OUTPUT

    def score(case, example, items, domains):
        out = signature(**{F.SERVING_INPUT: tf.constant([example]), F.CANDIDATE_ITEM_IDS: tf.constant(items),
                           F.CANDIDATE_DOMAINS: tf.constant(domains)})
        return out[output].numpy().astype(np.float64)

    return contract, score, loaded


def keras_model_scorer(model, input_config) -> Scorer:
    """A scorer of a Keras `CTRModel` as it is now (its current weights, e.g. during training),
    through the same `score_candidates` function the export saves."""
    import tensorflow as tf

    from components.trainer import export

    module = export.ServingModule(model, input_config)

    def score(case, example, items, domains):
        out = module.score_candidates(tf.constant([example]), tf.constant(items), tf.constant(domains))
        return out[F.RANKING_OUTPUT].numpy().astype(np.float64)

    return score


VALIDATION_METRIC = "val_ranking_ndcg@10"  # what `validation_ranking_callback` adds to the epoch logs


def validation_ranking_callback(seqs: Sequences, model, input_config, seed: int = 0, max_users: Optional[int] = None,
                                negatives: int = DEFAULT_NEGATIVES):
    """A Keras callback that ranks the protocol's VALID cases (target s[n-1], input s[1..n-2],
    never trained on) with the model at the end of every epoch and adds `val_ranking_<metric>`
    (overall HR@10, NDCG@10, MRR) to the epoch's logs, so that early stopping can select the
    epoch by validation NDCG@10, as ABXI selects its epochs, instead of by a loss. Put it before
    the EarlyStopping callback. The test cases stay untouched."""
    import keras

    from components.trainer import preprocess

    contract = preprocess.contract_of(input_config)
    scorer = keras_model_scorer(model, input_config)

    class ValidationRanking(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            result = evaluate_scorer(seqs, scorer, contract, [VALID], seed, negatives, max_users)[VALID][OVERALL]
            if logs is not None:
                for metric in ("hr@10", "ndcg@10", "mrr"):
                    logs[f"val_ranking_{metric}"] = result[metric]
            logger.info("epoch %d: valid cases %d, HR@10 %.4f, NDCG@10 %.4f, MRR %.4f", epoch + 1, result["cases"],
                        result["hr@10"], result["ndcg@10"], result["mrr"])

    return ValidationRanking()


def _cooccurrence(seqs: Sequences, rows: list):
    """C (items x items, scipy CSR): C[i, j] = users whose train part holds both i and j (i != j)."""
    import scipy.sparse

    users = np.array([u for u, _, _ in rows], dtype=np.int64)
    items = np.array([i for _, i, _ in rows], dtype=np.int64)
    incidence = scipy.sparse.csr_matrix((np.ones(len(rows)), (users, items)), shape=(len(seqs.users), len(seqs.items)))
    incidence.data[:] = 1.0  # a repeated item counts once per user
    counts = (incidence.T @ incidence).tocsr()
    counts.setdiag(0.0)
    counts.eliminate_zeros()
    return counts


def baseline_scorer(seqs: Sequences, name: str, seed: int) -> Scorer:
    """`popularity` (train-part interactions of the item + a jitter in [0, 0.5)), `random`, or
    `cooccurrence` (see the module docstring)."""
    if name not in BASELINES:
        raise ValueError(f"`baseline` must be one of {list(BASELINES)}. Received: baseline={name!r}")
    rows = train_part(seqs)
    counts = np.zeros(len(seqs.items), dtype=np.float64)
    for _, item, _ in rows:
        counts[item] += 1
    together = _cooccurrence(seqs, rows) if name == "cooccurrence" else None
    index = {name: code for code, name in enumerate(seqs.items)}

    def score(case, example, items, domains):
        rng = np.random.default_rng([seed, 7, case.user, case.target])
        noise = rng.random(len(items))
        if name == "random":
            return noise
        codes = [index[i] for i in items]
        popularity = counts[codes]
        if together is None:
            return popularity + 0.5 * noise
        history = [item for item, _ in reversed(case.history)]  # latest first
        weights = 1.0 / (1.0 + np.arange(len(history)))  # (H,)
        shared = together[history][:, codes].toarray() if history else np.zeros((0, len(codes)))  # (H, N)
        return weights @ shared + 1e-3 * popularity + 1e-6 * noise

    return score


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluate_scorer(seqs: Sequences, scorer: Scorer, contract: Optional[F.Contract], splits: Sequence[str] = SPLITS,
                    seed: int = 0, negatives: int = DEFAULT_NEGATIVES, max_users: Optional[int] = None) -> dict:
    """Ranks every case of `splits`; {split: {"overall" and "domain=<d>": rank_metrics}}.

    `contract` is the model's (it needs the case tf.Examples); None for the reference scorers.
    `max_users` limits the cases to the first users (quick checks; the published numbers use all).
    """
    if negatives <= 0:
        raise ValueError(f"`negatives` must be positive. Received: negatives={negatives}")
    if contract is not None:
        unknown = sorted(set(seqs.domains) - set(contract.domains))
        if unknown:
            raise ValueError(f"the interactions have domain(s) {unknown} that the model does not know; "
                             f"it knows {list(contract.domains)}")
    result = {}
    started = time.monotonic()
    for split in splits:
        split_cases = cases(seqs, split)[:max_users]
        ranks, ties, case_domains, short = [], [], [], 0
        for done, case in enumerate(split_cases, start=1):
            negs = sample_negatives(seqs, case, split, seed, negatives)
            short += negatives - len(negs)
            codes = [case.target] + negs.tolist()
            domain = seqs.domains[seqs.item_domain[case.target]]
            example = case_example(seqs, case, contract) if contract is not None else b""
            scores = scorer(case, example, [seqs.items[c] for c in codes], [domain] * len(codes))
            rank, tied = rank_of(scores[0], scores[1:])
            ranks.append(rank)
            ties.append(tied)
            case_domains.append(domain)
            if done % PROGRESS_EVERY == 0 or done == len(split_cases):
                rate = done / max(time.monotonic() - started, 1e-9)
                logger.info("%s: ranked %d/%d cases (%.0f/s)", split, done, len(split_cases), rate)
        ranks, ties, case_domains = np.array(ranks), np.array(ties), np.array(case_domains, dtype=object)
        split_result = {OVERALL: rank_metrics(ranks, ties)}
        for domain in sorted(set(seqs.domains)):
            mask = case_domains == domain
            split_result[f"domain={domain}"] = rank_metrics(ranks[mask], ties[mask])
        split_result["negative_shortfall"] = short
        result[split] = split_result
    return result


def evaluate(interactions: Sequence[str], out_dir: str, model_dir: Optional[str] = None,
             baseline: Optional[str] = None, name: Optional[str] = None, seed: int = 0,
             negatives: int = DEFAULT_NEGATIVES, splits: Sequence[str] = SPLITS,
             max_users: Optional[int] = None) -> dict:
    """Runs the protocol for an exported model (`model_dir`) or a reference `baseline`; writes
    `ranking.json` and `ranking.md` under `out_dir` and returns the JSON's content."""
    if (model_dir is None) == (baseline is None):
        raise ValueError("give exactly one of `model_dir` (an exported model) and `baseline` "
                         f"({' / '.join(BASELINES)})")
    for split in splits:
        _split_index(split)
    started = time.monotonic()
    os.makedirs(out_dir, exist_ok=True)
    seqs = read_sequences(interactions, os.path.join(out_dir, "input" + importer.DEAD_LETTER_SUFFIX))
    keep_alive = None
    if model_dir is not None:
        contract, scorer, keep_alive = saved_model_scorer(model_dir)
        run = name or _model_name(model_dir)
    else:
        contract, scorer, run = None, baseline_scorer(seqs, baseline, seed), name or baseline
    splits_result = evaluate_scorer(seqs, scorer, contract, splits, seed, negatives, max_users)
    del keep_alive
    result = {
        "protocol": PROTOCOL, "run": run, "seed": seed, "negatives": negatives,
        "model_dir": os.path.abspath(model_dir) if model_dir else None, "baseline": baseline,
        "interactions": [str(p) for p in ([interactions] if isinstance(interactions, str) else interactions)],
        "users": len(seqs.users), "max_users": max_users, "rejected_rows": seqs.rejected_rows,
        "duplicate_rows": seqs.duplicate_rows, "definitions": dict(DEFINITIONS), "splits": splits_result,
        "published": PUBLISHED if all(s in splits_result.get(TEST, {}) for s in PUBLISHED if s != "source") else None,
        "seconds": round(time.monotonic() - started, 1),
    }
    with open(os.path.join(out_dir, RESULT_FILE), "w") as f:
        json.dump(result, f, indent=2, allow_nan=False)
    with open(os.path.join(out_dir, MARKDOWN_FILE), "w") as f:
        f.write(markdown([result]))
    return result


def _model_name(model_dir: str) -> str:
    from models import config as config_lib

    path = os.path.join(model_dir, config_lib.CONFIG_FILE)
    with open(path) as f:
        return str(json.load(f).get("model") or os.path.basename(os.path.normpath(model_dir)))


def _fmt(values: List[Optional[float]]) -> str:
    from components.evaluation import report

    return report.mean_std_cell(values)


def markdown(results: Sequence[dict], split: str = TEST) -> str:
    """One Markdown table of `split` over several runs (rows by run name; runs of one name are
    seeds: mean ± sample std), HR@10, NDCG@10, MRR per domain and HR@5/HR@10 overall, with the
    published ABXI row when the domains are amazon-food-kitchen's."""
    groups: Dict[str, list] = {}
    for r in results:
        groups.setdefault(r["run"], []).append(r)
    domains = [s for s in next(iter(results))["splits"][split] if s.startswith("domain=")]
    header = ["run", "seeds"] + [f"{m.upper()} {d[len('domain='):]}" for d in domains for m in ("hr@10", "ndcg@10", "mrr")]
    header += ["HR@5 overall", "HR@10 overall", "ties"]
    lines = [f"Leave-one-out, {split} cases, {next(iter(results))['negatives']} sampled negatives per case.\n",
             "| " + " | ".join(header) + " |", "| --- | --- |" + " ---: |" * (len(header) - 2)]
    for run, group in groups.items():
        value = lambda s, m: [(g["splits"][split].get(s) or {}).get(m) for g in group]  # noqa: E731
        cells = [run, ", ".join(str(g["seed"]) for g in group)]
        cells += [_fmt(value(d, m)) for d in domains for m in ("hr@10", "ndcg@10", "mrr")]
        cells += [_fmt(value(OVERALL, "hr@5")), _fmt(value(OVERALL, "hr@10")), _fmt(value(OVERALL, "ties"))]
        lines.append("| " + " | ".join(cells) + " |")
    published = next((r["published"] for r in results if r.get("published")), None)
    if published and split == TEST:
        cells = [f"published: {published['source']}", ""]
        cells += [f"{published[d][m]:.4f}" if d in published else "" for d in domains for m in ("hr@10", "ndcg@10", "mrr")]
        lines.append("| " + " | ".join(cells + ["", "", ""]) + " |")
    return "\n".join(lines) + "\n"


def add_arguments(parser) -> None:
    """The flags of `xdctr evaluate --protocol leave-one-out` (next to the AUC report's)."""
    parser.add_argument("--interactions", action="append",
                        help="leave-one-out: the interactions CSV (user_id,item_id,domain,ts); repeatable")
    parser.add_argument("--baseline", choices=BASELINES,
                        help="leave-one-out: rank with a reference scorer instead of --model-dir")
    parser.add_argument("--negatives", type=int, default=DEFAULT_NEGATIVES,
                        help="leave-one-out: sampled negatives per case")
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS),
                        help="leave-one-out: which cases to rank")
    parser.add_argument("--max-users", type=int, help="leave-one-out: only the first N users' cases (quick checks)")


def run_from_args(args) -> int:
    """`xdctr evaluate --protocol leave-one-out`: ranks, prints the table, writes JSON + Markdown."""
    if not args.interactions:
        raise ValueError("--protocol leave-one-out needs --interactions (the user_id,item_id,domain,ts CSV)")
    missing = [p for p in args.interactions if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"no interactions file {missing[0]!r}")
    if (args.model_dir is None) == (args.baseline is None):
        raise ValueError("--protocol leave-one-out needs exactly one of --model-dir and --baseline")
    result = evaluate(args.interactions, args.out_dir, model_dir=args.model_dir, baseline=args.baseline,
                      name=args.name, seed=args.seed or 0, negatives=args.negatives, splits=args.splits,
                      max_users=args.max_users)
    for split in args.splits:
        print(markdown([result], split))
    if result["rejected_rows"]:
        print(f"{result['rejected_rows']} input row(s) rejected: see "
              f"{os.path.join(args.out_dir, 'input' + importer.DEAD_LETTER_SUFFIX)}")
    print(f"wrote {os.path.join(args.out_dir, RESULT_FILE)} and {os.path.join(args.out_dir, MARKDOWN_FILE)}")
    return 0

