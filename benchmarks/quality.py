"""`xdctr benchmark quality`: every model on three sets, over seeds, with early stopping.

Sets (`--sets`, all by default):

- `generated`: a generated log (`--users`, 20,000 by default; data seed 0), time split; AUC, GAUC,
  per domain and cold start, next to the oracle (the true click probability) and the log's
  ceilings (`benchmarks/oracle.py`; its posterior row is the best any model can do from the
  users' earlier impressions, and the targets are reported against it).
- `food-kitchen`: amazon-food-kitchen imported with the default protocol (K=4 popularity
  non-clicks in a 1,000-interaction window, seed 0), time split; AUC and GAUC as above.
- `five-domains`: amazon-five-domains, the same way.
- `food-kitchen-loo`: amazon-food-kitchen under the leave-one-out ranking protocol
  (`components/evaluation/ranking.py`): the train part imported with K uniform non-clicks and
  ingested (both of the ingestion's splits are training data here: the protocol's test cases are
  held out before), each model trained, exported and ranked through `score_candidates` on the
  test cases (999 seeded negatives); the `popularity` and `random` references; next to ABXI's
  published numbers. Models train with the sampled-softmax objective by default (each click
  against `--ranking-negatives` uniform items of its domain; `--loo-objective full_softmax`
  against every item of its domain; `--loo-objective pointwise` trains the CTR log loss on the
  imported non-clicks instead). `--loo-history-length` ingests longer histories; `--loo-select
  valid_ndcg` stops on the protocol's valid cases' NDCG@10 instead of the holdout's loss.

Every model is trained for every seed (`--seeds`, 0 1 2) by `benchmarks.train.train_model`: the
Trainer's validation holdout (the latest 10% of the training rows) and early stopping on its loss
(or, on the AUC-protocol sets, its GAUC: `--select val_gauc`), up to `--epochs`, then a fresh model
trained on every row for the best epoch count (unless `--no-refit`). Writes one Markdown file (`--markdown`) with a table per set
and the targets of issue 12 with what was measured against them, and one JSON (`--out`) with
every run. Each set's own output (the `benchmark train` JSON, the rankings) stays under
`--workdir`.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from benchmarks import oracle, train
from components.evaluation import ranking
from components.ingest import beam_pipeline
from components.trainer import task
from xdctr import features as F

SETS = ("generated", "food-kitchen", "five-domains", "food-kitchen-loo")
REAL_SETS = {"food-kitchen": "amazon-food-kitchen", "five-domains": "amazon-five-domains"}
CROSS_DOMAIN = ("dacdr", "dasl", "man", "syncrec", "recguru")
BASELINE = "dnn_multi"  # the multi-domain DNN the cross-domain models must beat in GAUC


def _interactions(name: str) -> str:
    from xdctr import demo

    path = os.path.join(demo.SHARED_DATA, name, "interactions.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the bundled data set {name} is not at ../shared/data/{name}/interactions.csv")
    return path


def _ingest(log: str, examples: str, history_length: int = F.DEFAULT_HISTORY_LENGTH) -> str:
    from components.ingest import beam_pipeline

    if not os.path.exists(os.path.join(examples, beam_pipeline.SUMMARY_FILE)):
        beam_pipeline.run(beam_pipeline.IngestConfig(input_patterns=(log,), history_length=history_length), examples)
    return examples


def prepare_real(workdir: str, set_name: str) -> str:
    """The set imported with the default (popularity) protocol and ingested; returns the examples dir."""
    from components.ingest import importer

    directory = os.path.join(workdir, set_name)
    log = os.path.join(directory, "impressions.jsonl.gz")
    if not os.path.exists(log):
        os.makedirs(directory, exist_ok=True)
        importer.import_interactions([_interactions(REAL_SETS[set_name])], log, importer.ImportConfig(negatives=4, seed=0))
    return _ingest(log, os.path.join(directory, "examples"))


LOO_NEGATIVES = 4  # uniform non-clicks per click of the leave-one-out train part
LOO_OBJECTIVE = task.SAMPLED_SOFTMAX  # a ranking protocol: train for ranking
RANKING_NEGATIVES = task.TrainingConfig.ranking_negatives


def loo_dir(workdir: str, negatives: int = LOO_NEGATIVES) -> str:
    """The leave-one-out set's directory: `food-kitchen-loo`, with `-kK` for K != 4 non-clicks."""
    return os.path.join(workdir, "food-kitchen-loo" + ("" if negatives == LOO_NEGATIVES else f"-k{negatives}"))


def prepare_loo(workdir: str, negatives: int = LOO_NEGATIVES, history_length: int = F.DEFAULT_HISTORY_LENGTH) -> tuple:
    """(interactions CSV, examples dir) of food-kitchen's leave-one-out train part, `negatives`
    uniform non-clicks per click, ingested with mixed histories of `history_length` clicks
    (`examples`, or `examples-hL` for another length than the default)."""
    from components.ingest import importer

    interactions = _interactions(REAL_SETS["food-kitchen"])
    directory = loo_dir(workdir, negatives)
    log = os.path.join(directory, "train.jsonl.gz")
    if not os.path.exists(log):
        os.makedirs(directory, exist_ok=True)
        ranking.import_train_part([interactions], log, importer.ImportConfig(negatives=negatives, seed=0,
                                                                             negative_sampling=importer.UNIFORM))
    name = "examples" + ("" if history_length == F.DEFAULT_HISTORY_LENGTH else f"-h{history_length}")
    return interactions, _ingest(log, os.path.join(directory, name), history_length)


def run_loo(model_names: Sequence[str], workdir: str, seeds: Sequence[int], epochs: int, patience: int,
            batch_size: int = 256, max_users=None, overrides=None, baselines: bool = True,
            learning_rate: float = 1e-3, negatives: int = LOO_NEGATIVES, objective: str = LOO_OBJECTIVE,
            ranking_negatives: int = RANKING_NEGATIVES,
            history_length: int = F.DEFAULT_HISTORY_LENGTH, select: str = "val_loss",
            refit: bool = True) -> List[dict]:
    """Trains, exports and ranks every model and seed on food-kitchen's leave-one-out protocol
    (trained on the train part with `negatives` uniform non-clicks per click);
    the rankings of the references (with `baselines`) come first. Returns the `ranking.evaluate`
    results; `overrides` apply to every model's config (runs are named `model[key=value]`).
    `objective` ("sampled_softmax" by default: each click against `ranking_negatives` uniform
    items of its domain; "pointwise": the CTR log loss on the imported non-clicks too) as in
    `task.TrainingConfig`; runs under another objective than the default are named
    `model[objective=...]`, and with another `history_length` (mixed-history clicks the models
    see, in training and ranking) than the default `model[history_length=L]`. `select` is what
    early stopping watches: "val_loss" (the objective on the held-out train clicks) or
    "valid_ndcg" (NDCG@10 of the protocol's valid cases, ranked after every epoch, as ABXI
    selects its epochs; runs named `model[select=valid_ndcg]`)."""
    import tensorflow as tf

    from components.ingest import beam_pipeline
    from components.trainer import export
    from models import config as config_lib

    interactions, examples = prepare_loo(workdir, negatives, history_length)
    contract = beam_pipeline.read_contract(examples)
    rows = sum(beam_pipeline.read_summary(examples)["rows"].values())
    files = sorted(tf.io.gfile.glob(os.path.join(examples, "Split-*", "*.gz")))
    directory = loo_dir(workdir, negatives)
    overrides = dict(overrides or {})
    if select not in SELECTIONS:
        raise ValueError(f"`select` must be one of {SELECTIONS}. Received: select={select!r}")
    suffix = train.run_suffix({**overrides, **({"objective": objective} if objective != LOO_OBJECTIVE else {}),
                               **({"history_length": history_length}
                                  if history_length != F.DEFAULT_HISTORY_LENGTH else {}),
                               **({"select": select} if select != "val_loss" else {})})
    valid = None
    if select == "valid_ndcg":
        from components.ingest import importer

        valid = ranking.read_sequences([interactions], os.path.join(directory, "valid" + importer.DEAD_LETTER_SUFFIX))
    results = []
    for baseline in ranking.BASELINES if baselines else ():
        for seed in seeds:
            results.append(ranking.evaluate([interactions], os.path.join(directory, "rankings", f"{baseline}-{seed}"),
                                            baseline=baseline, seed=seed, splits=[ranking.TEST], max_users=max_users))
            _print_loo(results[-1])
    for seed in seeds:  # every model at one seed before the next seed: an interrupted run still compares them
        for name in model_names:
            started = time.monotonic()
            model, config, info = train.train_model(name, overrides, contract, files, rows, seed=seed, epochs=epochs,
                                                    batch_size=batch_size, patience=patience,
                                                    learning_rate=learning_rate, objective=objective,
                                                    ranking_negatives=ranking_negatives, refit=refit,
                                                    **_selection(select, valid, seed, max_users))
            trained = time.monotonic() - started
            slug = re.sub(r"[^A-Za-z0-9_.=,-]+", "_", f"{name}{suffix}-{seed}")  # no glob characters in paths
            model_dir = os.path.join(directory, "models", slug)
            export.export(model, config.inputs, model_dir)
            config_lib.save(config, name, model_dir)
            result = ranking.evaluate([interactions], os.path.join(directory, "rankings", slug),
                                      model_dir=model_dir, name=name + suffix, seed=seed, splits=[ranking.TEST],
                                      max_users=max_users)
            result.update(training=info, train_seconds=round(trained, 1), load_average=list(os.getloadavg()))
            results.append(result)
            _print_loo(result)
            del model
    return results


SELECTIONS = ("val_loss", "valid_ndcg")


def _selection(select: str, valid, seed: int, max_users=None) -> dict:
    """`train.train_model`'s monitor and callbacks for `select` (see `run_loo`; `max_users` limits
    the valid cases as it limits the test cases)."""
    if select == "val_loss":
        return {}
    return {"monitor": ranking.VALIDATION_METRIC,
            "callbacks_for": lambda model, config: [ranking.validation_ranking_callback(valid, model, config.inputs,
                                                                                        seed=seed, max_users=max_users)]}


def _print_loo(result: dict) -> None:
    test = result["splits"]["test"]
    cells = " ".join(f"{d[len('domain='):]} HR@10 {test[d]['hr@10']:.4f} NDCG@10 {test[d]['ndcg@10']:.4f} "
                     f"MRR {test[d]['mrr']:.4f}" for d in test if d.startswith("domain="))
    epochs = result.get("training", {}).get("best_epoch")
    print(f"leave-one-out {result['run']} (seed {result['seed']}{f', best epoch {epochs}' if epochs else ''}): "
          f"{cells}", flush=True)


# ---------------------------------------------------------------------------------------------
# Targets


def _mean_std(values: Sequence[float]) -> tuple:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _by_model(runs: Sequence[dict], value) -> Dict[str, tuple]:
    groups: Dict[str, list] = {}
    for r in runs:
        groups.setdefault(r["model"], []).append(value(r))
    return {name: _mean_std(values) for name, values in groups.items()}


def _split_run(name: str) -> tuple:
    """A run's name -> (model, config overrides suffix): "dasl[item_buckets=vocabulary]" ->
    ("dasl", "[item_buckets=vocabulary]"); "dasl" -> ("dasl", "")."""
    model, bracket, rest = name.partition("[")
    return model, bracket + rest


def _suffixes(runs: Sequence[dict]) -> List[str]:
    """The distinct override suffixes of `runs`, sorted ("" first): the targets compare models
    trained with the same overrides."""
    return sorted({_split_run(r["model"])[1] for r in runs})


GENERATED_DATA_SEED = 0
GENERATED_EVAL_FRACTION = beam_pipeline.IngestConfig.eval_fraction  # the split `train.prepare_data` ingests with


def targets(results: dict, ceilings: Optional[dict] = None) -> List[str]:
    """The issue's targets, each with what was measured (lines of Markdown).

    `ceilings`: `oracle.ceilings` of the generated log; its posterior row is named with the
    generated targets.
    """
    lines = []
    auc_runs = lambda s: [r for r in results.get(s, []) if r["model"] != "oracle"]  # noqa: E731
    generated = auc_runs("generated")
    for suffix in _suffixes(generated):
        runs = [r for r in generated if _split_run(r["model"])[1] == suffix]
        auc = _by_model(runs, lambda r: r["quality"]["overall"]["auc"])
        cold = _by_model(runs, lambda r: r["quality"]["cold_start"]["auc"])
        cross = {m: v for m, v in auc.items() if _split_run(m)[0] in CROSS_DOMAIN and v[0] is not None}
        if cross:
            best = max(cross, key=lambda m: cross[m][0])
            baselines = {m: cold[m][0] for m in cold if _split_run(m)[0] not in CROSS_DOMAIN and cold[m][0] is not None}
            margin = cold[best][0] - max(baselines.values()) if baselines else None
            lines.append(f"- generated: best cross-domain model {best} AUC {cross[best][0]:.4f} (target >= 0.85: "
                         f"{'met' if cross[best][0] >= 0.85 else 'NOT met'}); its cold-start AUC minus the best "
                         f"baseline's ({max(baselines, key=baselines.get) if baselines else 'none run'}): "
                         + (f"{margin:+.4f} (target >= +0.02: {'met' if margin >= 0.02 else 'NOT met'})"
                            if margin is not None else "n/a"))
            posterior = (ceilings or {}).get("overall", {}).get(oracle.POSTERIOR)
            if posterior is not None:
                cold_ceiling = ceilings["cold_start"][oracle.POSTERIOR]["auc"]
                lines.append(f"- generated: the best any model can do from the users' earlier impressions (the "
                             f"posterior ceiling): AUC {posterior['auc']:.4f}, cold-start AUC "
                             + ("n/a" if cold_ceiling is None else f"{cold_ceiling:.4f}")
                             + f"; {best} is {posterior['auc'] - cross[best][0]:.4f} AUC below it")
    if "food-kitchen-loo" in results:
        runs = [r for r in results["food-kitchen-loo"] if not r.get("baseline")]
        for domain, target in (("grocery_gourmet_food", 0.25), ("home_kitchen", 0.18)):
            hr = {name: value for name, value in _by_model(
                [{"model": r["run"], **r} for r in runs],
                lambda r: r["splits"]["test"][f"domain={domain}"]["hr@10"]).items()}
            if hr:
                best = max(hr, key=lambda m: hr[m][0])
                lines.append(f"- food-kitchen leave-one-out, {domain}: best HR@10 {best} {hr[best][0]:.4f} "
                             f"(target >= {target}: {'met' if hr[best][0] >= target else 'NOT met'}; ABXI "
                             f"{ranking.PUBLISHED[f'domain={domain}']['hr@10']:.4f})")
    gauc = _by_model(auc_runs("food-kitchen"), lambda r: r["quality"]["overall"]["gauc"])
    for suffix in _suffixes(auc_runs("food-kitchen")):
        baseline = BASELINE + suffix
        if baseline in gauc:
            base_mean, base_std = gauc[baseline]
            for model in (m + suffix for m in CROSS_DOMAIN):
                if model in gauc:
                    mean, std = gauc[model]
                    spread = 2 * float(np.hypot(std, base_std))
                    lines.append(f"- food-kitchen AUC protocol: {model} GAUC {mean:.4f} vs {baseline} {base_mean:.4f}: "
                                 f"{mean - base_mean:+.4f}, 2 std of the difference {spread:.4f} "
                                 f"({'beats it' if mean - base_mean > spread else 'does NOT beat it'} by more than 2 std)")
    return lines


# ---------------------------------------------------------------------------------------------


def run(model_names: Sequence[str], workdir: str, out: str, markdown_path: str, sets: Sequence[str] = SETS,
        seeds: Sequence[int] = (0, 1, 2), users: int = 20_000, epochs: int = 10, patience: int = 1,
        batch_size: int = 256, max_users=None, overrides=None, baselines: bool = True,
        learning_rate: float = 1e-3, loo_negatives: int = LOO_NEGATIVES, loo_objective: str = LOO_OBJECTIVE,
        ranking_negatives: int = RANKING_NEGATIVES, loo_history_length: int = F.DEFAULT_HISTORY_LENGTH,
        loo_select: str = "val_loss", refit: bool = True, select: str = "val_loss") -> dict:
    """Runs the chosen sets; writes the JSON (`out`) and the Markdown (`markdown_path`).

    `overrides` (config field -> value) apply to every model, as in `benchmark train`; without
    `baselines` the leave-one-out set skips the popularity and random references. `select` is
    what early stopping watches on the AUC-protocol sets (`benchmark train`'s `select`: "val_loss"
    or "val_gauc"), `loo_select` on the leave-one-out set."""
    unknown = sorted(set(sets) - set(SETS))
    if unknown:
        raise ValueError(f"unknown set(s) {unknown}; known: {list(SETS)}")
    os.makedirs(workdir, exist_ok=True)
    results: Dict[str, list] = {}
    generated_ceilings = None
    sections = []
    started = time.monotonic()
    load_before = os.getloadavg()
    for set_name in sets:
        print(f"== {set_name}", flush=True)
        if set_name == "food-kitchen-loo":
            results[set_name] = run_loo(model_names, workdir, seeds, epochs, patience, batch_size, max_users,
                                        overrides, baselines, learning_rate, loo_negatives, loo_objective,
                                        ranking_negatives, loo_history_length, loo_select, refit)
            sections.append(f"### food-kitchen, leave-one-out\n\n{ranking.markdown(results[set_name])}")
            continue
        set_dir = os.path.join(workdir, set_name)
        if set_name == "generated":
            examples = train.prepare_data(set_dir, users, GENERATED_DATA_SEED)
            computed = oracle.compute(users, GENERATED_DATA_SEED, GENERATED_EVAL_FRACTION)
            generated_ceilings = computed["results"]
            print(oracle.describe(users, GENERATED_DATA_SEED, GENERATED_EVAL_FRACTION, computed), flush=True)
            sections.append("### generated: what the log allows (`xdctr benchmark oracle`)\n\n"
                            + oracle.markdown(generated_ceilings) + "\n")
        else:
            examples = prepare_real(workdir, set_name)
        json_path = os.path.join(set_dir, "train.json")
        train.run(list(model_names), set_dir, json_path, users=users, epochs=epochs, batch_size=batch_size,
                  seeds=seeds, examples=examples, patience=patience, overrides=overrides, learning_rate=learning_rate,
                  refit=refit, select=select)
        with open(json_path) as f:
            content = json.load(f)
        results[set_name] = content["results"]
        table = [(s["model"], s, s.get("params")) for s in content["summary"]]
        sections.append(f"### {set_name} (AUC protocol)\n\n"
                        + train.markdown_table(table, train.summary_slices(content["data"]["domains"])))
    goals = targets(results, generated_ceilings)
    load_after = os.getloadavg()
    settings = (f"seeds {list(seeds)}, early stopping on {select} (patience {patience}, at most {epochs} epochs), batch "
                f"{batch_size}, Adam {learning_rate:g}" + (f", overrides {train.run_suffix(overrides)}" if overrides else ""))
    text = (f"## Quality benchmark\n\n{settings}; load average {load_before[0]:.1f} at the start, "
            f"{load_after[0]:.1f} at the end; {time.monotonic() - started:.0f} s.\n\n" + "\n".join(sections)
            + ("\n### Targets\n\n" + "\n".join(goals) + "\n" if goals else ""))
    os.makedirs(os.path.dirname(os.path.abspath(markdown_path)), exist_ok=True)
    with open(markdown_path, "w") as f:
        f.write(text)
    with open(out, "w") as f:
        json.dump({"sets": list(sets), "seeds": list(seeds), "epochs": epochs, "patience": patience, "select": select,
                   "learning_rate": learning_rate, "overrides": overrides or {},
                   "users": users, "results": results, "generated_ceilings": generated_ceilings, "targets": goals},
                  f, indent=2, allow_nan=False)
    print(text)
    print(f"wrote {markdown_path} and {out}")
    return results
