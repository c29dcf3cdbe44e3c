"""`xdctr evaluate` and `xdctr compare`: offline reports for exported models.

`evaluate` scores a gzip TFRecord split of the ingestion with any exported xdctr SavedModel
(`serving_default`: serialized tf.Examples in, `ctr` out), in batches, and writes under its output
directory:

- `metrics.json`: the run (`run`, `seed`, `model_dir`, `examples`, `domains`), the definitions of
  GAUC and of the slices, and for every slice `metrics.summary` (examples, auc, gauc, gauc_users,
  gauc_users_skipped, log_loss, calibration); with `oracle` the same for the true click
  probability `oracle_ctr` when every example carries it (generated logs), the ceiling.
- `roc.png` (ROC curve per domain, AUC in the legend), `calibration.png` (mean prediction vs
  observed CTR in 10 equal-count bins of the prediction, with the diagonal) and `gauc.png` (GAUC
  per slice, next to the oracle's when known).
- `report.html`: one page with the run, the definitions, a metrics table (one row per slice) and
  the three plots. It needs no network, script or stylesheet: the images are the PNG files next
  to it, referenced by relative name.

Slices (names as in `metrics.json` and `xdctr benchmark train`):

- `overall`; `domain=<d>` for every target domain in the examples (sorted);
- `cold_start`: rows whose user has no earlier click in the target domain but some elsewhere
  (`target_domain_clicks == 0 and other_domain_clicks > 0`), and `cold_start/domain=<d>`;
- `activity=<bucket>`: rows by the user's earlier clicks in all domains
  (`target_domain_clicks + other_domain_clicks`) in the buckets 0, 1-4, 5-19 and 20+.

An empty slice is kept with `examples: 0` and every metric null.

`compare` reads several runs (a `metrics.json`, a directory holding one, or the JSON written by
`xdctr benchmark train`, whose every result with a `quality` dict is a run named after its model,
with the result's `seed`, else the file's) and writes a Markdown table: one row per run name, in order of
first appearance; columns `seeds`, then `AUC <slice>` and `GAUC <slice>` per chosen slice, then
`log loss` and `calibration` of the `overall` slice. Runs that share a name are the same model
with different seeds: the cell is `mean ± std` (sample standard deviation, n - 1) over them, to 4
decimals; a metric that some of those runs lack is averaged over the others and marked `(k/n)`;
`n/a` where no run has it. Two runs with the same name and seed are an error. By default the
slices are `overall`, every `domain=<d>` slice and `cold_start`, as far as any run has them.
"""

from __future__ import annotations

import html
import json
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from components.evaluation import metrics
from xdctr import features as F

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"
ROC_PLOT = "roc.png"
CALIBRATION_PLOT = "calibration.png"
GAUC_PLOT = "gauc.png"
DEFAULT_BATCH_SIZE = 4096
CALIBRATION_BINS = 10

OVERALL = "overall"
COLD_START = "cold_start"
# (label, lowest, highest or None) of the user's earlier clicks in all domains.
ACTIVITY_BUCKETS = (("0", 0, 0), ("1-4", 1, 4), ("5-19", 5, 19), ("20+", 20, None))

DEFINITIONS = {
    "gauc": ("per-user AUC (ties count half), averaged over users weighted by their impressions in the slice; "
             "users whose labels in the slice are all one class have no AUC and are skipped "
             "(counted in gauc_users_skipped)"),
    "auc": "area under the ROC curve over all rows of the slice, ties count half",
    "log_loss": "mean binary cross-entropy, predictions clipped to [1e-7, 1 - 1e-7]",
    "calibration": "mean prediction / observed CTR (1 is calibrated)",
    "cold_start": (f"rows with {F.TARGET_DOMAIN_CLICKS} == 0 and {F.OTHER_DOMAIN_CLICKS} > 0: no earlier click "
                   "in the target domain, some elsewhere"),
    "activity": (f"rows by the user's earlier clicks in all domains ({F.TARGET_DOMAIN_CLICKS} + "
                 f"{F.OTHER_DOMAIN_CLICKS}) in the buckets " + ", ".join(label for label, _, _ in ACTIVITY_BUCKETS)),
}

SCORE = "score"  # the model's prediction in the columns `score_examples` returns


def domain_slice(domain: str) -> str:
    return f"domain={domain}"


def cold_start_slice(domain: str) -> str:
    return f"{COLD_START}/{domain_slice(domain)}"


def activity_slice(label: str) -> str:
    return f"activity={label}"


# ---------------------------------------------------------------------------------------------
# Scoring


def _match_examples(pattern: str) -> List[str]:
    import tensorflow as tf

    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise ValueError(f"examples pattern {pattern!r} matches no file; expected gzip TFRecords of the ingestion, "
                         f"e.g. 'outputs/examples/Split-{F.EVAL_SPLIT}/*.gz'")
    return files


def _load_serving_signature(model_dir: str):
    """(loaded SavedModel, its serving signature); the first must stay alive while the second is used."""
    import tensorflow as tf

    if not tf.io.gfile.exists(os.path.join(model_dir, "saved_model.pb")):
        raise ValueError(f"model dir {model_dir!r} holds no saved_model.pb; expected an exported xdctr model "
                         "(a version directory the Trainer or Pusher wrote)")
    loaded = tf.saved_model.load(model_dir)
    if F.SERVING_SIGNATURE not in loaded.signatures:
        raise ValueError(f"the SavedModel in {model_dir!r} has no {F.SERVING_SIGNATURE!r} signature; "
                         f"it has {sorted(loaded.signatures)}")
    return loaded, loaded.signatures[F.SERVING_SIGNATURE]


def score_examples(model_dir: str, pattern: str, batch_size: int = DEFAULT_BATCH_SIZE,
                   progress: Optional[Callable[[int], None]] = None) -> Dict[str, np.ndarray]:
    """Scores every example matching `pattern` with the model's `serving_default`, in batches.

    Returns the columns the slices need (user, domain as str, label, earlier clicks, the oracle CTR
    when every example carries it) and `SCORE`, one row per example in file order. `progress`
    is called with the number of examples scored so far after each batch.
    """
    import tensorflow as tf

    if batch_size <= 0:
        raise ValueError(f"`batch_size` must be positive. Received: batch_size={batch_size}")
    files = _match_examples(pattern)
    loaded, serve = _load_serving_signature(model_dir)
    spec = {F.USER_ID: tf.io.FixedLenFeature([], tf.string), F.DOMAIN: tf.io.FixedLenFeature([], tf.string),
            F.LABEL: tf.io.FixedLenFeature([], tf.int64),
            F.TARGET_DOMAIN_CLICKS: tf.io.FixedLenFeature([], tf.int64),
            F.OTHER_DOMAIN_CLICKS: tf.io.FixedLenFeature([], tf.int64),
            F.ORACLE_CTR: tf.io.FixedLenFeature([], tf.float32, default_value=-1.0)}
    parts = {name: [] for name in (*spec, SCORE)}
    scored = 0
    try:
        for batch in tf.data.TFRecordDataset(files, compression_type="GZIP").batch(batch_size):
            parsed = tf.io.parse_example(batch, spec)
            for name, values in parsed.items():
                parts[name].append(values.numpy())
            served = serve(**{F.SERVING_INPUT: batch})[F.SERVING_OUTPUT]
            parts[SCORE].append(np.reshape(served.numpy(), [-1]).astype(np.float64))
            scored += int(batch.shape[0])
            if progress is not None:
                progress(scored)
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"examples {pattern!r} are not gzip TFRecords of xdctr tf.Examples scorable by "
                         f"{model_dir!r}: {first_line}") from e
    del loaded  # kept alive until here: the signature's variables belong to it
    if scored == 0:
        raise ValueError(f"examples pattern {pattern!r} matches files with no example")
    columns = {name: np.concatenate(values) for name, values in parts.items()}
    columns[F.DOMAIN] = np.array([d.decode() for d in columns[F.DOMAIN]], dtype=object)
    if np.any(columns[F.ORACLE_CTR] < 0):
        del columns[F.ORACLE_CTR]
    else:
        columns[F.ORACLE_CTR] = columns[F.ORACLE_CTR].astype(np.float64)
    return columns


# ---------------------------------------------------------------------------------------------
# Slices and metrics


def slice_masks(columns: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Boolean row mask per slice name, in report order (see the module docstring)."""
    domains = columns[F.DOMAIN]
    target, other = columns[F.TARGET_DOMAIN_CLICKS], columns[F.OTHER_DOMAIN_CLICKS]
    cold = (target == 0) & (other > 0)
    earlier = target + other
    names = sorted(set(domains))
    masks = {OVERALL: np.ones(len(domains), dtype=bool)}
    masks.update({domain_slice(d): domains == d for d in names})
    masks[COLD_START] = cold
    masks.update({cold_start_slice(d): cold & (domains == d) for d in names})
    for label, low, high in ACTIVITY_BUCKETS:
        masks[activity_slice(label)] = (earlier >= low) & (earlier <= (np.inf if high is None else high))
    return masks


def _empty_summary() -> dict:
    return {"examples": 0, "auc": None, "gauc": None, "gauc_users": 0, "gauc_users_skipped": 0,
            "log_loss": None, "calibration": None}


def slice_metrics(columns: Dict[str, np.ndarray], scores: np.ndarray) -> Dict[str, dict]:
    """`metrics.summary` of `scores` on every slice; an empty slice gets `examples: 0` and nulls."""
    users, labels = columns[F.USER_ID], columns[F.LABEL]
    return {name: (metrics.summary(users[mask], labels[mask], scores[mask]) if mask.any() else _empty_summary())
            for name, mask in slice_masks(columns).items()}


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib's Agg canvas through Figure, no pyplot state)


def _figure(width=6.4, height=4.8):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _fmt(value, digits=4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def plot_roc(columns, scores, domain_metrics: Dict[str, dict], path: str) -> None:
    """One ROC curve per domain; the legend gives each domain's AUC and number of rows."""
    from sklearn.metrics import roc_curve

    fig = _figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance (AUC 0.5)")
    labels = columns[F.LABEL]
    for domain in sorted(set(columns[F.DOMAIN])):
        mask = columns[F.DOMAIN] == domain
        summary = domain_metrics[domain_slice(domain)]
        if summary["auc"] is None:  # one class only: no curve
            ax.plot([], [], label=f"{domain}: AUC n/a (one class, n={summary['examples']})")
            continue
        fpr, tpr, _ = roc_curve(labels[mask], scores[mask])
        ax.plot(fpr, tpr, linewidth=1.8, label=f"{domain}: AUC {summary['auc']:.4f} (n={summary['examples']})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate",
           title="ROC per domain")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.savefig(path, format="png")


def _calibration_bins(labels, scores, bins: int):
    """(mean prediction, observed CTR) per equal-count bin of the sorted predictions."""
    order = np.argsort(scores, kind="mergesort")
    groups = [g for g in np.array_split(order, min(bins, len(order))) if len(g)]
    return (np.array([scores[g].mean() for g in groups]), np.array([labels[g].mean() for g in groups]))


def plot_calibration(columns, scores, path: str, bins: int = CALIBRATION_BINS) -> None:
    """Mean prediction vs observed CTR in `bins` quantile bins of the prediction, overall and per domain."""
    fig = _figure()
    ax = fig.add_subplot()
    labels = columns[F.LABEL].astype(np.float64)
    predicted, observed = _calibration_bins(labels, scores, bins)
    highest = [predicted.max(), observed.max()]
    ax.plot(predicted, observed, marker="o", linewidth=2, color="black", label="overall")
    for domain in sorted(set(columns[F.DOMAIN])):
        mask = columns[F.DOMAIN] == domain
        p, o = _calibration_bins(labels[mask], scores[mask], bins)
        highest += [p.max(), o.max()]
        ax.plot(p, o, marker=".", linewidth=1, alpha=0.8, label=domain)
    top = min(1.0, max(highest) * 1.05) or 1.0
    ax.plot([0, top], [0, top], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    ax.set(xlim=(0, top), ylim=(0, top), xlabel="mean predicted CTR (per bin)", ylabel="observed CTR (per bin)",
           title=f"Calibration ({bins} equal-count bins of the prediction)")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    fig.savefig(path, format="png")


def plot_gauc(slices: Dict[str, dict], oracle: Optional[Dict[str, dict]], path: str) -> None:
    """Horizontal bars of GAUC per slice (the oracle's beside it when known); n/a for empty slices."""
    names = list(slices)
    fig = _figure(8.0, max(3.0, 0.35 * len(names) * (2 if oracle else 1) + 1.2))
    ax = fig.add_subplot()
    positions = np.arange(len(names))[::-1]  # first slice on top
    series = [("model", slices, 0.8 if oracle is None else 0.4, 0.0)]
    if oracle is not None:
        series = [("model", slices, 0.4, 0.2), ("oracle (true CTR)", oracle, 0.4, -0.2)]
    for label, values, height, offset in series:
        gaucs = [values[n]["gauc"] for n in names]
        bars = ax.barh(positions + offset, [g or 0.0 for g in gaucs], height=height, label=label)
        ax.bar_label(bars, labels=[_fmt(g, 3) for g in gaucs], padding=3, fontsize="small")
    ax.axvline(0.5, linestyle="--", color="grey", linewidth=1)
    ax.set_yticks(positions, [f"{n} (n={slices[n]['examples']})" for n in names], fontsize="small")
    ax.set(xlim=(0, 1.15), xlabel="GAUC (impression-weighted per-user AUC); dashed: chance",
           title="GAUC per slice")
    ax.grid(axis="x", alpha=0.3)
    if oracle is not None:
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    fig.savefig(path, format="png")


# ---------------------------------------------------------------------------------------------
# HTML

_STYLE = ("body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse}"
          "td,th{border:1px solid #ccc;padding:.25em .6em}td.num{text-align:right}th{background:#f3f3f3}"
          "img{max-width:100%;border:1px solid #ddd;margin:.5em 0}dt{font-weight:bold}")


def _html_table(result: dict) -> str:
    oracle = result.get("oracle")
    head = ["slice", "examples", "AUC", "GAUC", "GAUC users", "users skipped", "log loss", "calibration"]
    if oracle:
        head += ["oracle AUC", "oracle GAUC"]
    rows = ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for name, s in result["slices"].items():
        cells = [s["examples"], _fmt(s["auc"]), _fmt(s["gauc"]), s["gauc_users"], s["gauc_users_skipped"],
                 _fmt(s["log_loss"]), _fmt(s["calibration"])]
        if oracle:
            cells += [_fmt(oracle[name]["auc"]), _fmt(oracle[name]["gauc"])]
        rows.append(f"<tr><td>{html.escape(name)}</td>" + "".join(f'<td class="num">{c}</td>' for c in cells) + "</tr>")
    return "<table>\n" + "\n".join(rows) + "\n</table>"


def render_html(result: dict) -> str:
    """The report page of an `evaluate` result (the images are the PNGs named in `result['plots']`)."""
    title = f"xdctr evaluation: {result['run']}"
    facts = [("run", result["run"]), ("seed", "none" if result["seed"] is None else result["seed"]),
             ("model dir", result["model_dir"]), ("examples", result["examples"]),
             ("domains", ", ".join(result["domains"])),
             ("GAUC users skipped (overall)", result["slices"][OVERALL]["gauc_users_skipped"])]
    definitions = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in result["definitions"].items())
    figures = "".join(f'<h3>{html.escape(caption)}</h3><img src="{html.escape(file)}" alt="{html.escape(caption)}">'
                      for caption, file in (("ROC per domain", result["plots"]["roc"]),
                                            ("Calibration", result["plots"]["calibration"]),
                                            ("GAUC per slice", result["plots"]["gauc"])))
    oracle_note = ("<p>Oracle: the true click probability of the generated log, the ceiling for any model.</p>"
                   if result.get("oracle") else "")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n<table>"
            + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
            + f"</table>\n<h2>Metrics per slice</h2>\n{_html_table(result)}\n{oracle_note}"
            f"<h2>Definitions</h2><dl>{definitions}</dl>\n<h2>Plots</h2>\n{figures}\n</body></html>\n")


# ---------------------------------------------------------------------------------------------
# evaluate


def _default_run_name(model_dir: str) -> str:
    from models import config as config_lib

    path = os.path.join(model_dir, config_lib.CONFIG_FILE)
    if os.path.exists(path):
        with open(path) as f:
            name = json.load(f).get("model")
        if name:
            return str(name)
    return os.path.basename(os.path.normpath(model_dir))


def evaluate(model_dir: str, examples: str, out_dir: str, name: Optional[str] = None, seed: Optional[int] = None,
             batch_size: int = DEFAULT_BATCH_SIZE, progress: Optional[Callable[[int], None]] = None) -> dict:
    """Scores `examples` with the model in `model_dir`, writes the report under `out_dir`, returns `metrics.json`'s content.

    `name` defaults to the model name in the export's `model_config.json`, else the directory name.
    """
    columns = score_examples(model_dir, examples, batch_size, progress)
    scores = columns[SCORE]
    slices = slice_metrics(columns, scores)
    oracle = slice_metrics(columns, columns[F.ORACLE_CTR]) if F.ORACLE_CTR in columns else None
    result = {
        "run": name or _default_run_name(model_dir),
        "seed": seed,
        "model_dir": os.path.abspath(model_dir) if "://" not in model_dir else model_dir,
        "examples": examples,
        "domains": sorted(set(columns[F.DOMAIN])),
        "definitions": dict(DEFINITIONS),
        "gauc_users_skipped": slices[OVERALL]["gauc_users_skipped"],
        "slices": slices,
        "oracle": oracle,
        "plots": {"roc": ROC_PLOT, "calibration": CALIBRATION_PLOT, "gauc": GAUC_PLOT},
    }
    os.makedirs(out_dir, exist_ok=True)
    plot_roc(columns, scores, slices, os.path.join(out_dir, ROC_PLOT))
    plot_calibration(columns, scores, os.path.join(out_dir, CALIBRATION_PLOT))
    plot_gauc(slices, oracle, os.path.join(out_dir, GAUC_PLOT))
    with open(os.path.join(out_dir, METRICS_FILE), "w") as f:
        json.dump(result, f, indent=2, allow_nan=False)
    with open(os.path.join(out_dir, REPORT_FILE), "w") as f:
        f.write(render_html(result))
    return result


PROTOCOLS = ("auc", "leave-one-out")


def add_evaluate_arguments(parser) -> None:
    from components.evaluation import ranking

    parser.add_argument("--protocol", choices=PROTOCOLS, default="auc",
                        help="auc: AUC/GAUC per slice on an ingestion split (default); leave-one-out: HR@k, NDCG@10, "
                             "MRR of each user's last interaction against sampled items (components/evaluation/ranking.py)")
    parser.add_argument("--model-dir", help="an exported xdctr SavedModel (a version directory)")
    parser.add_argument("--examples", help="auc: gzip TFRecord file pattern of the ingestion, e.g. 'out/Split-eval/*.gz'")
    parser.add_argument("--out-dir", required=True,
                        help=f"where {METRICS_FILE}, {REPORT_FILE} and the PNG plots go ({ranking.RESULT_FILE} and "
                             f"{ranking.MARKDOWN_FILE} for leave-one-out)")
    parser.add_argument("--name", help="run name (default: the model name in the export's model_config.json)")
    parser.add_argument("--seed", type=int, help="the training seed, recorded so `xdctr compare` can average seeds")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="examples scored per call")
    ranking.add_arguments(parser)


def run_evaluate(args) -> int:
    """The `xdctr evaluate` command: prints progress on stderr, a per-slice summary and the files written."""
    if getattr(args, "protocol", "auc") == "leave-one-out":
        from components.evaluation import ranking

        return ranking.run_from_args(args)
    if not args.model_dir or not args.examples:
        raise ValueError("--protocol auc needs --model-dir and --examples")
    def progress(scored):
        print(f"\rscored {scored} examples", end="", file=sys.stderr, flush=True)

    result = evaluate(args.model_dir, args.examples, args.out_dir, args.name, args.seed, args.batch_size, progress)
    print(file=sys.stderr)
    print(f"{'slice':<28} {'examples':>9} {'AUC':>7} {'GAUC':>7} {'skipped':>8} {'log loss':>9} {'calib':>7}")
    for slice_name, s in result["slices"].items():
        print(f"{slice_name:<28} {s['examples']:>9} {_fmt(s['auc']):>7} {_fmt(s['gauc']):>7} "
              f"{s['gauc_users_skipped']:>8} {_fmt(s['log_loss']):>9} {_fmt(s['calibration']):>7}")
    if result["oracle"]:
        overall = result["oracle"][OVERALL]
        print(f"oracle (true CTR) overall: AUC {_fmt(overall['auc'])}, GAUC {_fmt(overall['gauc'])}")
    print(f"wrote {os.path.join(args.out_dir, METRICS_FILE)}, {os.path.join(args.out_dir, REPORT_FILE)} and "
          f"{', '.join(result['plots'].values())}")
    return 0


# ---------------------------------------------------------------------------------------------
# compare


def load_runs(path: str) -> List[dict]:
    """Runs `{"name", "seed", "slices", "source"}` from a metrics.json, its directory, or a `benchmark train` JSON."""
    file = os.path.join(path, METRICS_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ValueError(f"no run at {path!r}; expected a {METRICS_FILE} file, a directory holding one, "
                         "or the JSON of `xdctr benchmark train`")
    try:
        with open(file) as f:
            content = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}:{e.lineno}: not JSON ({e.msg})") from e
    if isinstance(content, dict) and isinstance(content.get("slices"), dict):
        return [{"name": str(content.get("run") or os.path.basename(os.path.dirname(os.path.abspath(file)))),
                 "seed": content.get("seed"), "slices": content["slices"], "source": file}]
    if isinstance(content, dict) and isinstance(content.get("results"), list):
        seed = (content.get("data") or {}).get("seed")  # one seed for the whole file (older benchmark JSONs)
        runs = [{"name": str(r["model"]), "seed": r.get("seed", seed), "slices": r["quality"], "source": file}
                for r in content["results"] if isinstance(r, dict) and isinstance(r.get("quality"), dict) and "model" in r]
        if runs:
            return runs
    raise ValueError(f"{file}: neither an `xdctr evaluate` {METRICS_FILE} (no 'slices') nor an "
                     "`xdctr benchmark train` JSON (no 'results' with 'model' and 'quality')")


def default_slices(runs: Sequence[dict]) -> List[str]:
    """`overall`, every `domain=` slice (in order of first appearance) and `cold_start`, as far as runs have them."""
    seen = []
    for run in runs:
        seen += [s for s in run["slices"] if s not in seen]
    domains = [s for s in seen if s.startswith(domain_slice(""))]
    return [s for s in (OVERALL, *domains, COLD_START) if s in seen]


def mean_std_cell(values: List[Optional[float]]) -> str:
    """A table cell of one metric over runs: the value, or `mean ± std` (sample std), `(k/n)` when
    only k of the n runs have it, `n/a` when none has."""
    present = [v for v in values if v is not None]
    if not present:
        return "n/a"
    if len(values) == 1:
        return f"{present[0]:.4f}"
    text = f"{np.mean(present):.4f}"
    if len(present) > 1:
        text += f" ± {np.std(present, ddof=1):.4f}"
    if len(present) < len(values):
        text += f" ({len(present)}/{len(values)})"
    return text


def compare_table(runs: Sequence[dict], slices: Optional[Sequence[str]] = None) -> str:
    """The Markdown table of `runs` (see the module docstring for the format)."""
    slices = list(slices) if slices else default_slices(runs)
    available = {s for run in runs for s in run["slices"]}
    missing = [s for s in slices if s not in available]
    if missing:
        raise ValueError(f"slice(s) {missing} are in none of the runs; available: {sorted(available)}")
    groups: Dict[str, List[dict]] = {}
    for run in runs:
        for other in groups.get(run["name"], []):
            if other["seed"] == run["seed"]:
                raise ValueError(f"runs in {other['source']} and {run['source']} share name {run['name']!r} and seed "
                                 f"{run['seed']}; give each seed its own --seed, or each model its own --name")
        groups.setdefault(run["name"], []).append(run)

    def value(run, slice_name, metric):
        return (run["slices"].get(slice_name) or {}).get(metric)

    header = ["run", "seeds"] + [f"{m} {s}" for s in slices for m in ("AUC", "GAUC")] + ["log loss", "calibration"]
    lines = ["| " + " | ".join(header) + " |", "| --- | --- |" + " ---: |" * (len(header) - 2)]
    for name, group in groups.items():
        seeds = ", ".join(str(r["seed"]) for r in group if r["seed"] is not None) or "—"
        cells = [name, seeds]
        for s in slices:
            cells += [mean_std_cell([value(r, s, "auc") for r in group]),
                      mean_std_cell([value(r, s, "gauc") for r in group])]
        cells += [mean_std_cell([value(r, OVERALL, "log_loss") for r in group]),
                  mean_std_cell([value(r, OVERALL, "calibration") for r in group])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


COMPARE_NOTE = ("AUC and GAUC per slice; log loss and calibration (mean prediction / observed CTR) overall. "
                "Several seeds of a run: mean ± sample std (n - 1); (k/n): only k of the n seeds have the metric.\n")


def compare(paths: Sequence[str], out: str, slices: Optional[Sequence[str]] = None) -> str:
    """Writes the comparison of the runs at `paths` to the Markdown file `out`; returns its text."""
    runs = [run for path in paths for run in load_runs(path)]
    text = compare_table(runs, slices) + "\n" + COMPARE_NOTE
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    return text


def add_compare_arguments(parser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help=f"{METRICS_FILE} of `xdctr evaluate`, its directory, or the JSON of `xdctr benchmark train`")
    parser.add_argument("--out", required=True, help="Markdown file to write")
    parser.add_argument("--slices", help="comma-separated slices, e.g. overall,domain=grocery,cold_start "
                                         "(default: overall, every domain, cold_start)")


def run_compare(args) -> int:
    """The `xdctr compare` command: writes the table and prints it."""
    slices = [s.strip() for s in args.slices.split(",") if s.strip()] if args.slices else None
    text = compare(args.runs, args.out, slices)
    print(text, end="")
    print(f"wrote {args.out}")
    return 0
