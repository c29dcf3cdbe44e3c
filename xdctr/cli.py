"""The `xdctr` command line: one entry point, one subcommand per job.

A user mistake (bad flag, missing file, bad config) ends with one line on stderr and exit code 2;
internal errors keep their traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib
import logging
import os
import sys
from typing import List, Optional

from xdctr import features as F
from xdctr import quiet


class UsageError(Exception):
    """A mistake in the invocation or its inputs; reported as one line."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help with every flag's default; flags without one (required, store_true) show none."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or action.required or not action.option_strings:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _require_input(pattern: str) -> str:
    if "://" not in pattern and not glob.glob(pattern):
        raise UsageError(f"no input file matches {pattern!r}")
    return pattern


def _cmd_generate_logs(args) -> int:
    from components.ingest import generator

    config = generator.GeneratorConfig(
        num_users=args.users,
        domains=tuple(d.strip() for d in args.domains.split(",") if d.strip()),
        items_per_domain=args.items_per_domain,
        multi_domain_fraction=args.multi_domain_fraction,
        mean_events_per_user=args.mean_events_per_user,
        num_days=args.days,
        seed=args.seed,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    count = generator.generate_file(config, args.out)
    print(f"wrote {count} impressions of {config.num_users} users in {len(config.domains)} domains to {args.out}")
    return 0


def _cmd_import_interactions(args) -> int:
    from components.ingest import importer

    paths = [path for pattern in args.input for path in sorted(glob.glob(_require_input(pattern)))]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    sampling = args.negative_sampling or (importer.UNIFORM if args.leave_one_out else importer.POPULARITY)
    config = importer.ImportConfig(negatives=args.negatives, seed=args.seed, popularity_window=args.popularity_window,
                                   negative_sampling=sampling)
    if args.leave_one_out:
        from components.evaluation import ranking

        summary = ranking.import_train_part(paths, args.out, config)
        print(f"leave-one-out train part (each user's last two interactions held out, ties in file order): "
              f"{summary['train_csv']}")
    else:
        summary = importer.import_interactions(paths, args.out, config)
    dead = ", ".join(f"{r}={n}" for r, n in sorted(summary["dead_letter"].items())) or "none"
    print(f"{summary['interactions']} interactions of {summary['users']} users "
          f"({summary['duplicate_interactions']} exact duplicate rows dropped) -> {summary['impressions']} impressions "
          f"({summary['negatives']} {config.negative_sampling} non-clicks, {summary['negative_topups']} topped up, "
          f"shortfall {summary['negative_shortfall']}); "
          f"rejected rows: {dead}; output: {args.out}")
    return 0


def _cmd_ingest(args) -> int:
    from components.ingest import beam_pipeline, records

    config = beam_pipeline.IngestConfig(
        input_patterns=tuple(_require_input(p) for p in args.input),
        history_length=args.history_length,
        domain_history_length=args.domain_history_length,
        block_seconds=args.block_seconds,
        heavy_user_events=args.heavy_user_events,
        eval_fraction=args.eval_fraction,
        split_by=args.split_by,
        max_bad_fraction=args.max_bad_fraction,
        parse=records.ParseOptions(domains=tuple(d for d in args.domains.split(",") if d)),
        spill_pieces=args.spill,
    )
    try:
        summary = beam_pipeline.run(config, args.out, args.beam_arg)
    except beam_pipeline.IngestError as e:
        raise UsageError(str(e)) from e
    rows = ", ".join(f"{split}={n}" for split, n in sorted(summary["rows"].items()))
    dead = ", ".join(f"{r}={n}" for r, n in sorted(summary["dead_letter"].items())) or "none"
    print(f"examples: {rows}; rejected: {dead}; duplicates dropped: {summary['duplicates_dropped']}; output: {args.out}")
    return 0


def _pipeline_args(args, local: bool) -> dict:
    import json

    from components.evaluation.eval_config import Thresholds
    from components.trainer import task
    from models import config as config_lib

    overrides = config_lib.load_overrides(args.model_config)
    overrides.update(config_lib.parse_assignments(args.set or []))
    task.check_model_config(args.model, overrides)  # fail early on a bad config
    training = task.TrainingConfig(batch_size=args.batch_size, learning_rate=args.learning_rate, epochs=args.epochs,
                                   seed=args.seed, early_stopping_patience=args.early_stopping_patience,
                                   objective=args.objective, ranking_negatives=args.ranking_negatives,
                                   mixed_precision=args.mixed_precision, jit_compile=args.jit_compile,
                                   refit=not args.no_refit, early_stopping_monitor=args.early_stopping_monitor)
    serving_dir = args.serving_dir if "://" in args.serving_dir else os.path.abspath(args.serving_dir)
    return dict(
        pipeline_name=args.name,
        input_pattern=_require_input(args.input) if local else args.input,
        serving_model_dir=os.path.join(serving_dir, args.model_name),
        model_name=args.model,
        model_config=json.loads(json.dumps(overrides)),
        train_steps=args.train_steps,
        eval_steps=args.eval_steps,
        history_length=args.history_length,
        domain_history_length=args.domain_history_length,
        eval_fraction=args.eval_fraction,
        domains=[d for d in args.domains.split(",") if d] or None,
        training=dataclasses.asdict(training),
        thresholds=Thresholds(min_auc=args.min_auc, min_gauc=args.min_gauc, max_gauc_drop=args.max_gauc_drop),
        enable_cache=not args.no_cache,
        beam_pipeline_args=args.beam_arg or None,
    )


def _cmd_pipeline_run(args) -> int:
    from pipeline import local_runner

    pipeline_args = _pipeline_args(args, local=True)
    if pipeline_args["beam_pipeline_args"] is None:
        pipeline_args.pop("beam_pipeline_args")  # the local runner's defaults
    local_runner.run(os.path.abspath(args.root), **pipeline_args)
    print(f"pipeline {args.name} finished; artifacts under {args.root}")
    return 0


def _cmd_pipeline_compile(args) -> int:
    from pipeline import kubeflow_runner

    pipeline_args = _pipeline_args(args, local=False)
    input_pattern, train_steps = pipeline_args.pop("input_pattern"), pipeline_args.pop("train_steps")
    path = kubeflow_runner.compile_pipeline(args.output, args.image, args.root, input_pattern, train_steps,
                                            **pipeline_args)
    print(f"wrote Kubeflow Pipelines v2 spec {path} (image {args.image})")
    return 0


def _cmd_predict(args) -> int:
    from xdctr import demo

    scores, labels = demo.predict_tfrecords(args.target, args.model_name, _require_input(args.examples), args.limit)
    for score, label in zip(scores, labels):
        print(f"{score:.6f}\t{label}")
    return 0


def _cmd_demo(args) -> int:
    from xdctr import demo

    from models import config as config_lib

    overrides = config_lib.parse_assignments(args.set or [])
    demo.run(os.path.abspath(args.workdir), source=args.source, baseline=args.baseline, candidate=args.candidate,
             candidate_config=overrides, users=args.users, train_steps=args.train_steps, epochs=args.epochs,
             num_scores=args.scores)
    return 0


def _cmd_finetune(args) -> int:
    from components.trainer import finetune

    for path in (args.model_dir, args.examples):
        if "://" not in path and not os.path.isdir(path):
            raise UsageError(f"no such directory: {path}")
    finetune.finetune_new_domain(args.model_dir, args.new_domain, args.examples, args.out, args.steps,
                                 args.batch_size, args.learning_rate, args.seed)
    print(f"fine-tuned {args.model_dir} on new domain {args.new_domain!r}; exported to {args.out}")
    return 0


def _cmd_benchmark_ingest(args) -> int:
    from benchmarks import ingest

    ingest.run(args.events, args.modes, args.workers, args.workdir, args.out, args.repeat, args.format, args.spill)
    return 0


def _benchmark_models(args) -> tuple:
    """(model names, config overrides) of a training benchmark's flags, checked."""
    import models
    from components.trainer import task
    from models import config as config_lib

    names = args.models or models.names()
    unknown = sorted(set(names) - set(models.names()))
    if unknown:
        raise UsageError(f"unknown model(s) {unknown}; known: {models.names()}")
    try:
        overrides = config_lib.parse_assignments(args.set or [])
        for name in names:
            task.check_model_config(name, overrides)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if args.early_stopping_patience < 1:
        raise UsageError(f"--early-stopping-patience must be >= 1, got {args.early_stopping_patience}")
    return names, overrides


def _cmd_benchmark_oracle(args) -> int:
    from benchmarks import oracle

    if args.users < 1 or not 0 < args.eval_fraction < 1:
        raise UsageError(f"--users must be >= 1 and --eval-fraction in (0, 1); got {args.users}, {args.eval_fraction}")
    for flag in ("posterior_samples", "click_posterior_samples", "click_history_length"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    try:
        oracle.run(args.users, args.seed, args.eval_fraction, args.out, args.posterior_samples, args.posterior_seed,
                   args.click_posterior_samples, args.click_history_length or None, args.logistic)
    except ValueError as e:  # e.g. no rows before the eval cutoff to fit the logistic reference on
        raise UsageError(str(e)) from e
    return 0


def _cmd_benchmark_train(args) -> int:
    from benchmarks import train

    names, overrides = _benchmark_models(args)
    if args.examples and not os.path.isfile(os.path.join(args.examples, "summary.json")):
        raise UsageError(f"{args.examples} is not an ingestion output (no summary.json)")
    if args.seed is not None and args.seeds:
        raise UsageError("give --seeds or --seed, not both")
    seeds = args.seeds or [0 if args.seed is None else args.seed]
    train.run(names, args.workdir, args.out, users=args.users, epochs=args.epochs, batch_size=args.batch_size,
              seeds=seeds, examples=args.examples, overrides=overrides, patience=args.early_stopping_patience,
              data_seed=args.data_seed, learning_rate=args.learning_rate, refit=not args.no_refit, select=args.select)
    return 0


def _cmd_benchmark_quality(args) -> int:
    from benchmarks import quality

    names, overrides = _benchmark_models(args)
    quality.run(names, args.workdir, args.out, args.markdown, sets=args.sets, seeds=args.seeds, users=args.users,
                epochs=args.epochs, patience=args.early_stopping_patience, batch_size=args.batch_size,
                max_users=args.max_users, overrides=overrides, baselines=not args.no_references,
                learning_rate=args.learning_rate, loo_negatives=args.loo_negatives,
                loo_objective=args.loo_objective, ranking_negatives=args.ranking_negatives,
                loo_history_length=args.loo_history_length, loo_select=args.loo_select, refit=not args.no_refit,
                select=args.select)
    return 0


SELECT_HELP = ("what early stopping watches: the validation holdout's loss, or its GAUC (the served ctr's per-user "
               "AUC over the held-out rows after every epoch; runs named model[select=val_gauc])")
NO_REFIT_HELP = ("keep the early-stopped model instead of training a fresh one on every train row for the best "
                 "number of epochs (faster; that model never saw the latest 10%% of the train rows)")


def _add_pipeline_flags(p, root_default: str):
    p.add_argument("--input", required=True, help="click-log file pattern (JSON Lines, CSV or Parquet, plain or .gz)")
    p.add_argument("--root", default=root_default, help="pipeline root (artifacts; ML Metadata for local runs)")
    p.add_argument("--serving-dir", default="outputs/serving", help="serving root; the Pusher writes <dir>/<model name>/<version>/")
    p.add_argument("--name", default="xdctr", help="pipeline name")
    p.add_argument("--model", default="mean_pool_dnn", help="registered model to train")
    p.add_argument("--model-name", default="xdctr", help="served model name")
    p.add_argument("--model-config", help="YAML/JSON file of model config overrides")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="model config override, e.g. embedding_dim=32")
    p.add_argument("--train-steps", type=int, default=500, help="total training steps (over all epochs)")
    p.add_argument("--eval-steps", type=int, default=20, help="validation batches after each epoch")
    p.add_argument("--epochs", type=int, default=1, help="passes over the train split (train steps are split over them)")
    p.add_argument("--batch-size", type=int, default=256, help="training batch size")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--early-stopping-patience", type=int, default=2, help="0 disables early stopping")
    p.add_argument("--no-refit", action="store_true", help=NO_REFIT_HELP)
    p.add_argument("--early-stopping-monitor", choices=["val_loss", "val_gauc"], default="val_loss",
                   help="what early stopping watches on the validation holdout: its loss, or its GAUC (pointwise "
                        "objective only)")
    p.add_argument("--objective", choices=["pointwise", "sampled_softmax", "full_softmax"], default="pointwise",
                   help="pointwise: log loss of every row (CTR); sampled_softmax: clicks against uniform items of "
                        "their domain (ranking); full_softmax: clicks against every item of their domain (sasrec, "
                        "bilinear_recency)")
    p.add_argument("--ranking-negatives", type=int, default=32, help="sampled items per click under sampled_softmax")
    p.add_argument("--mixed-precision", action="store_true", help="train with the mixed_float16 policy")
    p.add_argument("--jit-compile", action="store_true", help="compile the train step with XLA")
    p.add_argument("--history-length", type=int, default=F.DEFAULT_HISTORY_LENGTH, help="mixed-domain history length")
    p.add_argument("--domain-history-length", type=int, default=F.DEFAULT_DOMAIN_HISTORY_LENGTH, help="per-domain history length")
    p.add_argument("--eval-fraction", type=float, default=0.2, help="size of the eval split (the latest events)")
    p.add_argument("--domains", default="", help="comma-separated accepted domains, in vocabulary order (default: all seen)")
    p.add_argument("--min-auc", type=float, default=0.5, help="blessing: overall AUC >= this")
    p.add_argument("--min-gauc", type=float, default=0.5, help="blessing: overall GAUC >= this")
    p.add_argument("--max-gauc-drop", type=float, default=0.0,
                   help="blessing: per-domain GAUC >= the latest blessed model's minus this")
    p.add_argument("--beam-arg", action="append", default=[],
                   help="Beam pipeline option for ingestion and evaluation, e.g. --beam-arg=--runner=DataflowRunner")
    p.add_argument("--no-cache", action="store_true", help="re-run every component even on unchanged inputs")
    p.add_argument("--seed", type=int, default=0, help="training seed (initialisation, shuffling, dropout)")


LAZY_COMMANDS = {
    "serve": ("TF-Serving-compatible gRPC scoring service (model_config_list, labels, batching, metrics)",
              "serving.server", "add_arguments", "run_from_args"),
    "loadtest": ("bounded load generator against a PredictionService on loopback (QPS, latency percentiles)",
                 "serving.loadtest", "add_arguments", "run_from_args"),
    "evaluate": ("metrics, slices and an HTML report with plots for an exported model",
                 "components.evaluation.report", "add_evaluate_arguments", "run_evaluate"),
    "compare": ("a Markdown table of several evaluate / benchmark runs",
                "components.evaluation.report", "add_compare_arguments", "run_compare"),
    "route": ("A/B router: a PredictionService proxy that splits traffic between model versions",
              "serving.router", "add_arguments", "run_from_args"),
    "ab-report": ("per-arm CTR, AUC and GAUC of an A/B experiment from its assignment and click logs",
                  "serving.ab_report", "add_arguments", "run_from_args"),
}


def _command_of(argv: List[str]) -> Optional[str]:
    """The subcommand named in `argv` (the first word that is not an option)."""
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="xdctr", description="Cross-domain CTR models on TFX: ingest, train, evaluate, serve.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("generate-logs", help="write a synthetic click log with a known truth")
    p.add_argument("--out", required=True, help="output file (.jsonl or .jsonl.gz)")
    p.add_argument("--users", type=int, default=1000, help="number of users")
    p.add_argument("--domains", default="grocery,kitchen", help="comma-separated domain names (2 or more)")
    p.add_argument("--items-per-domain", type=int, default=500, help="catalogue size of each domain (Zipf popularity)")
    p.add_argument("--multi-domain-fraction", type=float, default=0.6,
                   help="fraction of users active in more than one domain (they enter later domains part-way: cold start)")
    p.add_argument("--mean-events-per-user", type=float, default=30.0,
                   help="mean impressions per user (Pareto-tailed activity)")
    p.add_argument("--days", type=int, default=30, help="time span of the log")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same log")
    p.set_defaults(func=_cmd_generate_logs)

    p = sub.add_parser("import-interactions", help="real interactions (user_id,item_id,domain,ts CSV) -> impression log")
    p.add_argument("--input", required=True, action="append", help="CSV file pattern; repeatable")
    p.add_argument("--out", required=True, help="output impression log (.jsonl or .jsonl.gz)")
    p.add_argument("--negatives", type=int, default=4, help="non-clicked impressions sampled per interaction (K)")
    p.add_argument("--popularity-window", type=int, default=1_000,
                   help="negatives are drawn by popularity among the domain's last W interactions before the click")
    p.add_argument("--negative-sampling", choices=["popularity", "uniform"],
                   help="popularity: by popularity in the trailing window (time-split AUC protocol; the default); "
                        "uniform: uniformly from the domain's whole catalogue (the default with --leave-one-out)")
    p.add_argument("--leave-one-out", action="store_true",
                   help="import only the leave-one-out protocol's train part: per user all but the last two "
                        "interactions, ties in file order (see xdctr evaluate --protocol leave-one-out)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the negative sampling")
    p.set_defaults(func=_cmd_import_interactions)

    p = sub.add_parser("ingest", help="click logs -> per-user sequence TFRecords (Beam)")
    p.add_argument("--input", required=True, action="append", help="file pattern; repeatable")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--history-length", type=int, default=F.DEFAULT_HISTORY_LENGTH, help="mixed-domain history length")
    p.add_argument("--domain-history-length", type=int, default=F.DEFAULT_DOMAIN_HISTORY_LENGTH, help="per-domain history length")
    p.add_argument("--block-seconds", type=int, default=86_400,
                   help="heavy users' timelines are grouped in blocks of this many seconds (bounds memory per worker)")
    p.add_argument("--heavy-user-events", type=int, default=100_000,
                   help="users with more events than this are processed in time blocks")
    p.add_argument("--eval-fraction", type=float, default=0.2, help="size of the eval split (the latest data)")
    p.add_argument("--split-by", choices=["events", "time"], default="events",
                   help="eval = the last fraction of the events by time, or of the time range")
    p.add_argument("--max-bad-fraction", type=float, default=0.05,
                   help="fail the run when more than this fraction of the records is rejected")
    p.add_argument("--domains", default="", help="comma-separated accepted domains (empty: any)")
    p.add_argument("--spill", action=argparse.BooleanOptionalAction, default=True,
                   help="parsed events go to the user shards through files under --out (memory stays flat), "
                        "not through the runner's shuffle")
    p.add_argument("--beam-arg", action="append", default=[], help="Beam pipeline option, e.g. --beam-arg=--runner=DirectRunner")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("pipeline", help="the TFX pipeline")
    psub = p.add_subparsers(dest="pipeline_command", metavar="ACTION", parser_class=_Parser)
    psub.required = True
    run = psub.add_parser("run", help="run locally with LocalDagRunner")
    _add_pipeline_flags(run, "outputs/pipeline")
    run.set_defaults(func=_cmd_pipeline_run)
    compile_ = psub.add_parser("compile", help="compile for an orchestrator (Kubeflow Pipelines v2 JSON)")
    _add_pipeline_flags(compile_, "gs://YOUR_BUCKET/xdctr/pipeline")
    compile_.add_argument("--runner", choices=["kubeflow"], default="kubeflow", help="orchestrator to compile for")
    compile_.add_argument("--output", default="outputs/kubeflow/xdctr_pipeline.json", help="compiled pipeline file")
    compile_.add_argument("--image", default="xdctr:0.1.0",
                          help="default image of every component: the project's Dockerfile, built and pushed")
    compile_.set_defaults(func=_cmd_pipeline_compile)

    p = sub.add_parser("finetune", help="train a DACDR model on a new domain, everything else frozen (DACDR sec. 3.5)")
    p.add_argument("--model-dir", required=True, help="an exported DACDR (a version directory the Trainer wrote)")
    p.add_argument("--new-domain", required=True, help="the domain to add")
    p.add_argument("--examples", required=True, help="ingestion output with domains = the model's + the new one")
    p.add_argument("--out", required=True, help="export directory of the fine-tuned model")
    p.add_argument("--steps", type=int, default=200, help="training steps on the new domain")
    p.add_argument("--batch-size", type=int, default=256, help="training batch size")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("benchmark", help="benchmark scripts (print a table, write JSON)")
    bsub = p.add_subparsers(dest="benchmark_command", metavar="WHAT", parser_class=_Parser)
    bsub.required = True
    b = bsub.add_parser("ingest", help="Beam ingestion throughput and peak memory on generated logs")
    b.add_argument("--events", type=int, nargs="+", default=[1_000_000, 10_000_000],
                   help="generated log sizes to ingest (approximate event counts)")
    b.add_argument("--modes", nargs="+", default=["in_memory", "multi_processing"],
                   choices=["in_memory", "multi_threading", "multi_processing"], help="DirectRunner running modes")
    b.add_argument("--workers", type=int, default=2, help="--direct_num_workers")
    b.add_argument("--repeat", type=int, default=1, help="runs of each mode (each is checked for lost records)")
    b.add_argument("--format", choices=["jsonl.gz", "jsonl"], default="jsonl.gz",
                   help="the generated log's format (plain JSON Lines are parsed in byte ranges by several workers)")
    b.add_argument("--spill", nargs="+", choices=["on", "off"], default=["on"],
                   help="runs with the parsed pieces spilled to files (the default of xdctr ingest), through the "
                        "shuffle, or both")
    b.add_argument("--workdir", default="outputs/benchmark/ingest", help="generated logs and outputs")
    b.add_argument("--out", default="outputs/benchmark/ingest.json", help="JSON results")
    b.set_defaults(func=_cmd_benchmark_ingest)
    b = bsub.add_parser("oracle", help="AUC ceilings of generated logs: the oracle less what a model cannot know")
    b.add_argument("--users", type=int, default=20000, help="users of the generated log (the quality benchmark's)")
    b.add_argument("--seed", type=int, default=0, help="the generated log's seed")
    b.add_argument("--eval-fraction", type=float, default=0.2, help="eval = the last fraction of the events by time")
    b.add_argument("--posterior-samples", type=int, default=256,
                   help="the posterior ceiling's draws of a user's taste per latent group (0: no posterior row)")
    b.add_argument("--posterior-seed", type=int, default=0, help="seed of the posterior's draws")
    b.add_argument("--click-posterior-samples", type=int, default=0,
                   help="the click-only posterior's draws per group (0: no such row; about 10 ms per earlier "
                        "click at 256)")
    b.add_argument("--click-history-length", type=int, default=0,
                   help="the click-only posterior reads the last N earlier clicks, as a mixed history of length N "
                        "does (0: every earlier click)")
    b.add_argument("--logistic", action="store_true",
                   help="add a reference row: a logistic regression on features read through the generator's own "
                        "item vectors (what a simple model with perfect embeddings reaches)")
    b.add_argument("--out", default="outputs/benchmark/oracle.json", help="JSON results")
    b.set_defaults(func=_cmd_benchmark_oracle)
    b = bsub.add_parser("train", help="examples/s, AUC and GAUC of every model on generated logs")
    b.add_argument("--models", nargs="+", help="registered model names (default: all)")
    b.add_argument("--users", type=int, default=2000, help="users of the generated log")
    b.add_argument("--examples", default="", help="an ingestion output to train on instead (e.g. imported real data)")
    b.add_argument("--epochs", type=int, default=10, help="most epochs a run trains (early stopping ends it sooner)")
    b.add_argument("--early-stopping-patience", type=int, default=1,
                   help="epochs without a lower validation loss before a run stops (best weights restored)")
    b.add_argument("--no-refit", action="store_true", help=NO_REFIT_HELP)
    b.add_argument("--select", choices=["val_loss", "val_gauc"], default="val_loss", help=SELECT_HELP)
    b.add_argument("--batch-size", type=int, default=256, help="training batch size")
    b.add_argument("--learning-rate", type=float, default=1e-3, help="Adam's learning rate")
    b.add_argument("--seeds", type=int, nargs="+", help="training seeds; the table gives mean ± std over them (default: 0)")
    b.add_argument("--seed", type=int, help="one training seed (the same as --seeds N)")
    b.add_argument("--data-seed", type=int, default=0, help="seed of the generated log")
    b.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="model config override for every model (an ablation); the run is named model[KEY=VALUE,...]")
    b.add_argument("--workdir", default="outputs/benchmark/train", help="generated log, examples and models")
    b.add_argument("--out", default="outputs/benchmark/train.json", help="JSON results")
    b.set_defaults(func=_cmd_benchmark_train)

    b = bsub.add_parser("quality", help="every model on generated logs, food-kitchen (AUC and leave-one-out) and "
                                        "five-domains, over seeds, with early stopping: one Markdown table + JSON")
    b.add_argument("--sets", nargs="+", choices=["generated", "food-kitchen", "five-domains", "food-kitchen-loo"],
                   default=["generated", "food-kitchen", "five-domains", "food-kitchen-loo"], help="data sets to run")
    b.add_argument("--models", nargs="+", help="registered model names (default: all)")
    b.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (mean ± std over them)")
    b.add_argument("--users", type=int, default=20_000, help="users of the generated log")
    b.add_argument("--epochs", type=int, default=10, help="most epochs a run trains (early stopping ends it sooner)")
    b.add_argument("--early-stopping-patience", type=int, default=1,
                   help="epochs without a lower validation loss before a run stops (best weights restored)")
    b.add_argument("--no-refit", action="store_true", help=NO_REFIT_HELP)
    b.add_argument("--select", choices=["val_loss", "val_gauc"], default="val_loss", help=SELECT_HELP)
    b.add_argument("--batch-size", type=int, default=256, help="training batch size")
    b.add_argument("--learning-rate", type=float, default=1e-3, help="Adam's learning rate")
    b.add_argument("--max-users", type=int, help="leave-one-out: rank only the first N users' test cases (quick checks)")
    b.add_argument("--loo-negatives", type=int, default=4,
                   help="leave-one-out: uniform non-clicks per click of the train part (K != 4 in food-kitchen-loo-kK)")
    b.add_argument("--loo-objective", choices=["pointwise", "sampled_softmax", "full_softmax"],
                   default="sampled_softmax",
                   help="leave-one-out: the training objective (runs under pointwise are named model[objective=pointwise])")
    b.add_argument("--ranking-negatives", type=int, default=32,
                   help="leave-one-out under sampled_softmax: uniform items of the click's domain per click")
    b.add_argument("--loo-history-length", type=int, default=F.DEFAULT_HISTORY_LENGTH,
                   help="leave-one-out: clicks of the mixed history (another length than the default is ingested "
                        "again, into examples-hL, and runs are named model[history_length=L])")
    b.add_argument("--loo-select", choices=["val_loss", "valid_ndcg"], default="val_loss",
                   help="leave-one-out: what early stopping watches: the objective's loss on held-out train clicks, "
                        "or NDCG@10 of the protocol's valid cases after every epoch (runs named model[select=...])")
    b.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="config override for every model, e.g. inputs.item_buckets=262144 (runs are named model[...])")
    b.add_argument("--no-references", action="store_true",
                   help="leave-one-out: skip the popularity and random reference rankings")
    b.add_argument("--workdir", default="outputs/benchmark/quality", help="data, examples and models of the runs")
    b.add_argument("--out", default="outputs/benchmark/quality.json", help="JSON results")
    b.add_argument("--markdown", default="outputs/benchmark/quality.md", help="the Markdown table")
    b.set_defaults(func=_cmd_benchmark_quality)
    if command == "benchmark":  # its flags come from a module that starts TensorFlow services lazily
        from benchmarks import serve as serve_benchmark

        b = bsub.add_parser("serve", help="scoring QPS and latency: in-process vs xdctr serve (with and without "
                                          "batching) vs xdctr route, score_candidates vs separate rows")
        serve_benchmark.add_arguments(b)
        b.set_defaults(func=serve_benchmark.run_from_args)

    # Commands whose flags live in modules that import TensorFlow: their flags are added only when
    # that command is the one invoked, so a mistake elsewhere fails fast, in one line.
    for name, (help_text, module, add, run) in LAZY_COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == command:
            loaded = importlib.import_module(module)
            getattr(loaded, add)(p)
            p.set_defaults(func=getattr(loaded, run))

    p = sub.add_parser("predict", help="score TFRecord examples through a running service (TF Serving client stubs)")
    p.add_argument("--target", default="localhost:8500", help="host:port of the PredictionService")
    p.add_argument("--model-name", default="xdctr", help="served model name")
    p.add_argument("--examples", required=True, help="gzip TFRecord file pattern of tf.Examples")
    p.add_argument("--limit", type=int, default=10, help="examples to score")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("demo", help="the main job: a baseline and a cross-domain model through the TFX pipeline, "
                                    "side by side, the HTML report, serve the blessed one, route an A/B test")
    p.add_argument("--workdir", default="outputs/demo", help="logs, pipeline root, serving dir, report")
    p.add_argument("--source", default="amazon-food-kitchen",
                   help="bundled data set under ../shared/data, or 'generated' for a synthetic log")
    p.add_argument("--baseline", default="dnn_multi", help="registered model trained first: the current model")
    p.add_argument("--candidate", default="dasl", help="registered cross-domain model that must beat it to be blessed")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override of the candidate")
    p.add_argument("--users", type=int, default=300, help="users of a generated log")
    p.add_argument("--train-steps", type=int, default=1000, help="training steps of each model (over all epochs)")
    p.add_argument("--epochs", type=int, default=1, help="epochs the steps are split over (early stopping between)")
    p.add_argument("--scores", type=int, default=8, help="served scores to print")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Before any TensorFlow import (build_parser imports the command's module).
    quiet.configure(verbose=bool({"-v", "--verbose"} & set(argv[:argv.index("--")] if "--" in argv else argv)))
    parser = build_parser(_command_of(argv))
    try:
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        quiet.configure(verbose=args.verbose)  # again: basicConfig made the root handler
        return args.func(args)
    except UsageError as e:
        print(f"xdctr: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        # Config and input validation raise these with a message that names the bad value.
        print(f"xdctr: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
