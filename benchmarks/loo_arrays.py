"""The leave-one-out protocol on any Keras backend: food-kitchen-loo from arrays.

The GPU machines this project is sometimes lent have JAX and PyTorch but no TensorFlow (TF with
CUDA does not fit their transfer limit), and the ingestion and `preprocess.dataset` are
TensorFlow. The models are backend-agnostic, so the protocol is split in two steps:

  export (the TensorFlow runtime): prepares food-kitchen's leave-one-out train part as
    `benchmark quality` does (`quality.prepare_loo`) and writes what the models see, as
    `preprocess` makes it, to one folder:
      train-train.npz, train-validation.npz: the train part's click rows (model inputs), by the
        Trainer's time holdout (`preprocess.validation_cut`);
      cases-valid.npz, cases-test.npz: every ranking case's model inputs
        (`ranking.case_example`, parsed by `preprocess`), with its user and target item code;
      catalogue.npz: every item code's hashed index and domain, every user's item codes (the
        negatives exclude them) and the ranking objective's per-domain item pools
        (`task.ranking_items`);
      meta.json: the input config, the counts, and seed 0's first valid negatives.
  train (any backend, no TensorFlow): builds registered models on those inputs, trains them
    under a ranking objective with Keras's early stopping on the valid cases' NDCG@10 (ranked
    after every epoch), and ranks the test cases against `ranking.sample_negatives`'s 999
    negatives, drawn from the exported catalogue with the protocol's seeds.

Differences from `quality.run_loo` (the TensorFlow path):
  - an epoch is one pass over the train-holdout clicks shuffled whole (tf.data shuffles
    through `preprocess.SHUFFLE_BUFFER` rows); the last batch of an epoch is smaller;
  - no SavedModel is exported: cases are ranked by the live model's logit, as the TF path
    ranks by `score_candidates`' logit output.
The results are `ranking.evaluate`-shaped dicts (`ranking.markdown` tables them).

  scripts/runtime python -m benchmarks.loo_arrays export --out outputs/loo-arrays
  KERAS_BACKEND=jax python -m benchmarks.loo_arrays train --data outputs/loo-arrays \\
      --models sasrec --seeds 0 1 2 --out outputs/loo-arrays/results.json
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from components.evaluation import ranking
from xdctr import features as F

logger = logging.getLogger(__name__)

HOLDOUTS = ("train", "validation")
SPLITS = (ranking.VALID, ranking.TEST)
META_FILE = "meta.json"
CHECK_CASES = 100  # seed 0's negatives of the first valid cases, to check the draw on another machine
OBJECTIVES = ("sampled_softmax", "full_softmax")
TRAINING_KEY = "training"  # a variant's training options (see `run`)


def _compact(values: np.ndarray) -> np.ndarray:
    """The smallest integer dtype that holds `values` (bool stays bool): the arrays travel."""
    if values.dtype == bool or not np.issubdtype(values.dtype, np.integer) or not values.size:
        return values
    for dtype in (np.int8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= values.min() and values.max() <= info.max:
            return values.astype(dtype)
    return values


def _save(path: str, arrays: Dict[str, np.ndarray]) -> None:
    np.savez_compressed(path, **{k: _compact(np.asarray(v)) for k, v in arrays.items()})


def _load(path: str) -> Dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: (data[k].astype(np.int32) if np.issubdtype(data[k].dtype, np.integer) else data[k]) for k in data}


def _negatives_digest(catalogue, split_cases, split: str, seed: int) -> str:
    digest = hashlib.sha256()
    for user, target in split_cases:
        digest.update(ranking.sample_negatives(catalogue, ranking.Case(int(user), int(target), 0, ()), split,
                                               seed).astype(np.int64).tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# export (TensorFlow)


def export(workdir: str, out_dir: str, history_length: int = F.DEFAULT_HISTORY_LENGTH, model: str = "sasrec") -> dict:
    """Writes the arrays (module docstring) of food-kitchen's leave-one-out set to `out_dir`.

    The input config (item buckets sized from the train part) is `model`'s, as the Trainer
    resolves it; `train` builds every model on it (and refuses `inputs` overrides). Returns the
    meta dict."""
    import tensorflow as tf

    from benchmarks import quality
    from components.ingest import beam_pipeline, importer
    from components.trainer import preprocess, task

    interactions, examples = quality.prepare_loo(workdir, quality.LOO_NEGATIVES, history_length)
    contract = beam_pipeline.read_contract(examples)
    files = sorted(tf.io.gfile.glob(os.path.join(examples, "Split-*", "*.gz")))
    inputs = task.resolve_model_config(model, {}, contract, train_files=files).inputs
    os.makedirs(out_dir, exist_ok=True)
    counts = {}
    for holdout in HOLDOUTS:
        parts: Dict[str, list] = {}
        for x, _ in preprocess.dataset(files, inputs, 8192, holdout=holdout, clicks_only=True):
            for key, value in x.items():
                parts.setdefault(key, []).append(value.numpy())
        arrays = {k: np.concatenate(v) for k, v in parts.items()}
        counts[f"train-{holdout}"] = int(len(arrays[F.ITEM_ID]))
        _save(os.path.join(out_dir, f"train-{holdout}.npz"), arrays)
    seqs = ranking.read_sequences([interactions], os.path.join(quality.loo_dir(workdir), "arrays" +
                                                                importer.DEAD_LETTER_SUFFIX))
    for split in SPLITS:
        split_cases = ranking.cases(seqs, split)
        parts = {}
        for start in range(0, len(split_cases), 4096):
            chunk = split_cases[start:start + 4096]
            serialized = tf.constant([ranking.case_example(seqs, c, contract) for c in chunk])
            for key, value in preprocess.to_model_inputs(preprocess.parse(serialized, inputs), inputs).items():
                parts.setdefault(key, []).append(value.numpy())
        arrays = {k: np.concatenate(v) for k, v in parts.items()}
        arrays["case_user"] = np.array([c.user for c in split_cases])
        arrays["case_target"] = np.array([c.target for c in split_cases])
        counts[f"cases-{split}"] = len(split_cases)
        _save(os.path.join(out_dir, f"cases-{split}.npz"), arrays)
    pools = task.ranking_items(files, contract, inputs)
    user_items = [np.array(sorted(items), dtype=np.int64) for items in seqs.user_items]
    _save(os.path.join(out_dir, "catalogue.npz"), {
        "item_bucket": preprocess.item_indices(tf.constant(seqs.items, tf.string), inputs).numpy(),
        "item_domain": seqs.item_domain,
        "user_item_counts": np.array([len(items) for items in user_items]),
        "user_items": np.concatenate(user_items) if user_items else np.zeros(0, np.int64),
        "pool_counts": np.array([len(p) for p in pools]), "pools": np.concatenate(pools),
    })
    catalogue = Catalogue.load(out_dir, seqs.domains)
    valid = _load(os.path.join(out_dir, f"cases-{ranking.VALID}.npz"))
    check = list(zip(valid["case_user"][:CHECK_CASES], valid["case_target"][:CHECK_CASES]))
    meta = {"interactions": interactions, "examples": examples, "history_length": history_length,
            "inputs": {**dataclasses.asdict(inputs), "domains": list(inputs.domains)},
            "item_domains": list(seqs.domains), "counts": counts, "model": model,
            "negatives_check": {"seed": 0, "split": ranking.VALID, "cases": len(check),
                                "sha256": _negatives_digest(catalogue, check, ranking.VALID, 0)}}
    with open(os.path.join(out_dir, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


# ---------------------------------------------------------------------------------------------
# train (any backend)


@dataclasses.dataclass
class Catalogue:
    """What `ranking.sample_negatives` reads of a `ranking.Sequences`, from catalogue.npz."""

    item_domain: np.ndarray
    user_items: list
    domain_items: list
    domains: list  # the item domains' names, in `item_domain`'s code order
    item_bucket: np.ndarray
    pools: list  # per model-input domain, the hashed item indices of the ranking objective

    @classmethod
    def load(cls, directory: str, domains: Sequence[str]) -> "Catalogue":
        data = _load(os.path.join(directory, "catalogue.npz"))
        ends = np.cumsum(data["user_item_counts"])
        user_items = [set(part.tolist()) for part in np.split(data["user_items"], ends[:-1])] if len(ends) else []
        item_domain = data["item_domain"].astype(np.int64)
        pools = np.split(data["pools"], np.cumsum(data["pool_counts"])[:-1])
        return cls(item_domain=item_domain, user_items=user_items,
                   domain_items=[np.flatnonzero(item_domain == d) for d in range(len(domains))],
                   domains=list(domains), item_bucket=data["item_bucket"], pools=[p.astype(np.int32) for p in pools])


@dataclasses.dataclass
class RankingCases:
    """One split's cases: model inputs (one row per case) and the candidates (target first)."""

    split: str
    inputs: Dict[str, np.ndarray]
    domains: np.ndarray  # (cases,) item-domain name of each case (its target's)
    codes: np.ndarray  # (cases, 1 + negatives) item codes, -1 where a domain ran short
    buckets: np.ndarray  # (cases, 1 + negatives) hashed item indices (0 where -1)
    domain_index: np.ndarray  # (cases,) model-input domain index of each case


def load_cases(directory: str, split: str, catalogue: Catalogue, input_domains: Sequence[str], seed: int,
               negatives: int = ranking.DEFAULT_NEGATIVES, max_users: Optional[int] = None) -> RankingCases:
    """`split`'s cases with `ranking.sample_negatives(seed)`'s negatives (the protocol's draw)."""
    data = _load(os.path.join(directory, f"cases-{split}.npz"))
    users, targets = data.pop("case_user")[:max_users], data.pop("case_target")[:max_users]
    codes = np.full((len(users), 1 + negatives), -1, dtype=np.int64)
    for row, (user, target) in enumerate(zip(users, targets)):
        negs = ranking.sample_negatives(catalogue, ranking.Case(int(user), int(target), 0, ()), split, seed, negatives)
        codes[row, 0] = target
        codes[row, 1:1 + len(negs)] = negs
    names = [catalogue.domains[d] for d in catalogue.item_domain[targets]]
    unknown = sorted(set(names) - set(input_domains))
    if unknown:
        raise ValueError(f"the cases have domain(s) {unknown} that the model inputs do not know: {list(input_domains)}")
    return RankingCases(split=split, inputs={k: v[:max_users] for k, v in data.items()}, domains=np.array(names),
                        codes=codes, buckets=np.where(codes >= 0, catalogue.item_bucket[np.maximum(codes, 0)], 0),
                        domain_index=np.array([list(input_domains).index(n) for n in names], dtype=np.int32))


def batch_scorer(model, batch_size: int):
    """fn(inputs (B, ...), items (B, C), domains (B, C)) -> (B, C) float logits of the model as it
    is now: `encode_context` once per case, `score` on each candidate. Under JAX one jitted
    function over the model's current variables (batches padded to `batch_size`)."""
    import keras
    from keras import ops

    def logits(inputs, items, domains):
        context = model.encode_context(inputs, training=False)
        rows, candidates = items.shape
        tiled = {name: ops.repeat(value, candidates, axis=0) for name, value in context.items()}
        out = model.score(tiled, ops.reshape(items, (-1,)), ops.reshape(domains, (-1,)), training=False)
        return ops.reshape(ops.cast(out, "float32"), (rows, candidates))

    if keras.backend.backend() != "jax":
        return lambda inputs, items, domains: ops.convert_to_numpy(logits(inputs, items, domains))
    import jax

    def stateless(trainable, non_trainable, inputs, items, domains):
        mapping = list(zip(model.trainable_variables, trainable)) + list(zip(model.non_trainable_variables,
                                                                            non_trainable))
        with keras.StatelessScope(state_mapping=mapping):
            return logits(inputs, items, domains)

    jitted = jax.jit(stateless)

    def score(inputs, items, domains):
        rows = len(items)
        pad = lambda a: np.concatenate([a, np.repeat(a[:1], batch_size - rows, axis=0)]) if rows < batch_size else a  # noqa: E731
        out = jitted([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
                     {k: pad(v) for k, v in inputs.items()}, pad(items), pad(domains))
        return np.asarray(out)[:rows]

    return score


def rank_cases(model, cases: RankingCases, batch_size: int = 64, score=None) -> dict:
    """`ranking.evaluate_scorer`'s split result ("overall", "domain=<d>", "negative_shortfall").
    `score`: the model's `batch_scorer(model, batch_size)`, made once by callers that rank often
    (under JAX each new one compiles again)."""
    score = score or batch_scorer(model, batch_size)
    ranks, ties = [], []
    for start in range(0, len(cases.codes), batch_size):
        rows = slice(start, start + batch_size)
        items = cases.buckets[rows].astype(np.int32)
        domains = np.repeat(cases.domain_index[rows][:, None], items.shape[1], axis=1)
        logits = score({k: v[rows] for k, v in cases.inputs.items()}, items, domains).astype(np.float64)
        logits = np.where(cases.codes[rows] >= 0, logits, -np.inf)  # a short domain's missing negatives
        target = logits[:, :1]
        ranks.append(1 + np.sum(logits[:, 1:] > target, axis=1))
        ties.append(np.sum(logits[:, 1:] == target, axis=1))
    ranks, ties = np.concatenate(ranks), np.concatenate(ties)
    result = {ranking.OVERALL: ranking.rank_metrics(ranks, ties)}
    for domain in sorted(set(cases.domains.tolist())):
        mask = cases.domains == domain
        result[f"domain={domain}"] = ranking.rank_metrics(ranks[mask], ties[mask])
    result["negative_shortfall"] = int(np.sum(cases.codes[:, 1:] < 0))
    return result


def _callbacks(model, valid: RankingCases, patience: int, deadline: Optional[float], log: list):
    import keras

    score = batch_scorer(model, 64)  # compiled once, reads the weights of each epoch

    class ValidRanking(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.monotonic()

        def on_epoch_end(self, epoch, logs=None):
            trained = time.monotonic() - self.started
            result = rank_cases(model, valid, 64, score)[ranking.OVERALL]
            for metric in ("hr@10", "ndcg@10", "mrr"):
                logs[f"val_ranking_{metric}"] = result[metric]
            log.append({"epoch": epoch + 1, "loss": float(logs.get("loss", float("nan"))), "train_s": round(trained, 2),
                        "valid_s": round(time.monotonic() - self.started - trained, 2),
                        **{m: round(result[m], 6) for m in ("hr@10", "ndcg@10", "mrr")}})
            logger.info("%s epoch %d: loss %.4f, valid HR@10 %.4f NDCG@10 %.4f (%.1f s train, %.1f s valid)",
                        model.name, epoch + 1, log[-1]["loss"], result["hr@10"], result["ndcg@10"], trained,
                        log[-1]["valid_s"])
            if deadline is not None and time.monotonic() > deadline:
                model.stop_training = True
                log[-1]["stopped_at_deadline"] = True

    stopping = keras.callbacks.EarlyStopping(monitor=ranking.VALIDATION_METRIC, mode="max", patience=patience,
                                             restore_best_weights=True)
    return [ValidRanking(), stopping]


def train_one(name: str, overrides: dict, meta: dict, train_arrays: dict, catalogue: Catalogue, valid: RankingCases,
              *, seed: int, epochs: int, patience: int, batch_size: int, learning_rate: float, objective: str,
              ranking_negatives: int, weight_decay: float = 0.0, deadline: Optional[float] = None):
    """Trains model `name` (config `overrides` on the exported inputs); returns (model, info)."""
    import keras

    import models

    if objective not in OBJECTIVES:
        raise ValueError(f"`objective` must be one of {OBJECTIVES}. Received: objective={objective!r}")
    if "inputs" in overrides:
        raise ValueError(f"{name}: the exported arrays fix the model inputs ({meta['inputs']}); an `inputs` override "
                         f"cannot apply to them (export again instead). Received: {overrides['inputs']}")
    keras.utils.set_random_seed(seed)
    config = models.resolve_config(name, {**overrides, "inputs": meta["inputs"]})
    model = models.build(name, config)
    if len(model.training_phases()) != 1:
        raise ValueError(f"{name} trains in phases {model.training_phases()}; this path trains one-phase models")
    model.set_ranking_objective(catalogue.pools, ranking_negatives if objective == "sampled_softmax" else None,
                                seed=seed)
    optimizer = (keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay) if weight_decay
                 else keras.optimizers.Adam(learning_rate))
    model.compile(optimizer=optimizer, loss={F.SERVING_OUTPUT: keras.losses.BinaryCrossentropy()})
    log: list = []
    labels = {F.SERVING_OUTPUT: np.ones(len(train_arrays[F.ITEM_ID]), np.float32)}
    started = time.monotonic()
    model.fit(train_arrays, labels, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0,
              callbacks=_callbacks(model, valid, patience, deadline, log))
    model.clear_ranking_objective()
    watched = [e["ndcg@10"] for e in log]
    info = {"epochs_run": len(log), "best_epoch": int(np.argmax(watched)) + 1 if watched else None,
            "monitor": ranking.VALIDATION_METRIC, "epochs": log, "train_seconds": round(time.monotonic() - started, 1),
            "objective": objective, "batch_size": batch_size, "learning_rate": learning_rate,
            "weight_decay": weight_decay, "train_clicks": int(len(labels[F.SERVING_OUTPUT])),
            "stopped_at_deadline": any(e.get("stopped_at_deadline") for e in log)}
    if objective == "sampled_softmax":
        info["ranking_negatives"] = ranking_negatives
    return model, info


def _run_name(name: str, variant: str) -> str:
    return name if not variant else f"{name}[{variant}]"


def run(data_dir: str, model_names: Sequence[str], seeds: Sequence[int], out: str, *, epochs: int = 30,
        patience: int = 3, batch_size: int = 256, learning_rate: float = 1e-3, objective: str = "sampled_softmax",
        ranking_negatives: int = 256, weight_decay: float = 0.0, variants: Optional[Dict[str, dict]] = None,
        select_variant: bool = False, max_users: Optional[int] = None, time_budget: Optional[float] = None,
        train_on_all: bool = False, max_train_rows: Optional[int] = None) -> List[dict]:
    """Trains and ranks every model x variant x seed (seed by seed); writes the results to `out`
    after every run and returns them.

    `variants` {label: config overrides} (default: one, no overrides); a variant's
    "training" entry overrides the training options (epochs, batch_size, learning_rate,
    objective, ranking_negatives, weight_decay) for its runs. With `select_variant`,
    only the first seed runs every variant; later seeds run each model's variant of the best
    valid NDCG@10 at the first seed (a choice on valid cases, never on test ones).
    `time_budget` (seconds from the call): runs stop at an epoch end past it (flagged
    `stopped_at_deadline`) and no run starts after it. `train_on_all` trains on the
    validation holdout's clicks too (the early stopping watches the valid cases, not that
    holdout). `max_train_rows` trains on the first rows only (quick checks)."""
    import keras

    started = time.monotonic()
    deadline = None if time_budget is None else started + time_budget
    if not os.path.isfile(os.path.join(data_dir, META_FILE)):
        raise FileNotFoundError(f"{data_dir!r} holds no {META_FILE}: not a directory written by "
                                "`python -m benchmarks.loo_arrays export`")
    with open(os.path.join(data_dir, META_FILE)) as f:
        meta = json.load(f)
    catalogue = Catalogue.load(data_dir, meta["item_domains"])
    check = meta["negatives_check"]
    valid_raw = _load(os.path.join(data_dir, f"cases-{check['split']}.npz"))
    pairs = list(zip(valid_raw["case_user"][:check["cases"]], valid_raw["case_target"][:check["cases"]]))
    same_draw = _negatives_digest(catalogue, pairs, check["split"], check["seed"]) == check["sha256"]
    if not same_draw:
        logger.warning("the negatives drawn here differ from the export machine's (numpy %s): the protocol holds "
                       "(uniform, seeded), the exact draw does not", np.__version__)
    train_arrays = _load(os.path.join(data_dir, "train-train.npz"))
    if train_on_all:
        extra = _load(os.path.join(data_dir, "train-validation.npz"))
        train_arrays = {k: np.concatenate([v, extra[k]]) for k, v in train_arrays.items()}
    variants = dict(variants or {"": {}})
    defaults = dict(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, objective=objective,
                    ranking_negatives=ranking_negatives, weight_decay=weight_decay)
    for label, overrides in variants.items():
        unknown = sorted(set(overrides.get(TRAINING_KEY, {})) - set(defaults))
        if unknown:
            raise ValueError(f"variant {label!r}: unknown training option(s) {unknown}; known: {sorted(defaults)}")
    if max_train_rows is not None:
        train_arrays = {k: v[:max_train_rows] for k, v in train_arrays.items()}
    environment = {"backend": keras.backend.backend(), "numpy": np.__version__, "same_negatives_as_export": same_draw}
    if keras.backend.backend() == "jax":
        import jax

        environment["devices"] = [str(d) for d in jax.devices()]
    results: List[dict] = []
    best_variant: Dict[str, str] = {}
    for position, seed in enumerate(seeds):
        valid = load_cases(data_dir, ranking.VALID, catalogue, meta["inputs"]["domains"], seed, max_users=max_users)
        test = load_cases(data_dir, ranking.TEST, catalogue, meta["inputs"]["domains"], seed, max_users=max_users)
        for name in model_names:
            labels = list(variants) if position == 0 or not select_variant else [best_variant[name]]
            for label in labels:
                if deadline is not None and time.monotonic() > deadline:
                    logger.warning("time budget spent: %s seed %d not run", _run_name(name, label), seed)
                    continue
                overrides = dict(variants[label])
                options = {**defaults, **overrides.pop(TRAINING_KEY, {})}
                model, info = train_one(name, overrides, meta, train_arrays, catalogue, valid, seed=seed,
                                        patience=patience, deadline=deadline, **options)
                rank_started = time.monotonic()
                score = batch_scorer(model, 64)
                splits = {ranking.VALID: rank_cases(model, valid, 64, score),
                          ranking.TEST: rank_cases(model, test, 64, score)}
                info["rank_seconds"] = round(time.monotonic() - rank_started, 1)
                results.append({"run": _run_name(name, label), "model": name, "variant": variants[label],
                                "seed": seed, "negatives": ranking.DEFAULT_NEGATIVES, "splits": splits,
                                "training": info, "environment": environment, "published": ranking.PUBLISHED,
                                "train_on_all": train_on_all})
                _print(results[-1])
                with open(out, "w") as f:
                    json.dump(results, f, indent=2)
                del model
            if position == 0 and select_variant:
                scored = [r for r in results if r["model"] == name and r["seed"] == seed]
                if scored:
                    best = max(scored, key=lambda r: r["splits"][ranking.VALID][ranking.OVERALL]["ndcg@10"])
                    best_variant[name] = next(k for k, v in variants.items() if v == best["variant"])
    return results


def _print(result: dict) -> None:
    test = result["splits"][ranking.TEST]
    cells = " ".join(f"{d[len('domain='):]} HR@10 {test[d]['hr@10']:.4f} NDCG@10 {test[d]['ndcg@10']:.4f} "
                     f"MRR {test[d]['mrr']:.4f}" for d in test if d.startswith("domain="))
    info = result["training"]
    print(f"leave-one-out {result['run']} (seed {result['seed']}, best epoch {info['best_epoch']} of "
          f"{info['epochs_run']}, {info['train_seconds']} s): {cells}", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loo_arrays", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    exp = commands.add_parser("export", help="write the arrays (needs TensorFlow: scripts/runtime)")
    exp.add_argument("--workdir", default="outputs/benchmark/quality")
    exp.add_argument("--out", default="outputs/loo-arrays")
    exp.add_argument("--history-length", type=int, default=F.DEFAULT_HISTORY_LENGTH)
    tr = commands.add_parser("train", help="train and rank from the arrays on any Keras backend")
    tr.add_argument("--data", default="outputs/loo-arrays")
    tr.add_argument("--models", nargs="+", default=["sasrec"])
    tr.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    tr.add_argument("--out", required=True)
    tr.add_argument("--epochs", type=int, default=30)
    tr.add_argument("--patience", type=int, default=3)
    tr.add_argument("--batch-size", type=int, default=256)
    tr.add_argument("--learning-rate", type=float, default=1e-3)
    tr.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay (0: Adam)")
    tr.add_argument("--objective", choices=OBJECTIVES, default="sampled_softmax")
    tr.add_argument("--ranking-negatives", type=int, default=256)
    tr.add_argument("--variant", action="append", default=[], metavar="LABEL=JSON",
                    help="config overrides to run as a variant, e.g. 'd128={\"embedding_dim\": 128}', with "
                         "training options under \"training\" (repeatable)")
    tr.add_argument("--select-variant", action="store_true",
                    help="later seeds run only the variant with the best valid NDCG@10 at the first seed")
    tr.add_argument("--max-users", type=int, default=None)
    tr.add_argument("--time-budget", type=float, default=None, help="seconds; no run starts past it")
    tr.add_argument("--train-on-all", action="store_true", help="train on the validation holdout's clicks too")
    tr.add_argument("--max-train-rows", type=int, default=None, help="train on the first rows only (quick checks)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.command == "export":
        meta = export(args.workdir, args.out, args.history_length)
        print(json.dumps(meta["counts"]))
        return 0
    variants = {}
    for spec in args.variant:
        label, sep, body = spec.partition("=")
        if not sep or not label:
            parser.error(f"--variant must be LABEL=JSON. Received: {spec!r}")
        try:
            variants[label] = json.loads(body)
        except json.JSONDecodeError as e:
            parser.error(f"--variant {label}: not JSON ({e}). Received: {body!r}")
    run(args.data, args.models, args.seeds, args.out, epochs=args.epochs, patience=args.patience,
        batch_size=args.batch_size, learning_rate=args.learning_rate, objective=args.objective,
        ranking_negatives=args.ranking_negatives, weight_decay=args.weight_decay, variants=variants or None,
        select_variant=args.select_variant, max_users=args.max_users, time_budget=args.time_budget,
        train_on_all=args.train_on_all, max_train_rows=args.max_train_rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
