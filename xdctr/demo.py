"""The main job (`make run`, `xdctr demo`): what the product is for, end to end, for real.

1. Click logs: the bundled Amazon food-kitchen interactions (grocery and kitchen shops, 7,144
   users) imported as impressions, or a generated log (`source="generated"`, used by the
   end-to-end test).
2. The TFX pipeline on LocalDagRunner trains the current model, a baseline: ClickLogExampleGen,
   StatisticsGen, SchemaGen, ExampleValidator, Trainer, Evaluator (TFMA: AUC and GAUC overall,
   per domain and for cold-start users), Pusher. Nothing is blessed yet, so fixed thresholds
   decide, and it is pushed as version A.
3. The pipeline again with a cross-domain model (inputs unchanged, so ingestion and statistics
   come from the cache). The Evaluator scores candidate and blessed baseline on the same eval
   split; the candidate is blessed and pushed (version B) only if its GAUC is no worse in every
   domain.
4. Both models side by side (AUC, GAUC, per domain, cold start) from that evaluation, and the HTML
   report (`xdctr evaluate`: per-slice metrics, ROC, calibration and GAUC plots) of the model
   that now serves.
5. `xdctr serve` serves the blessed versions from a TF Serving model_config_list (labels `stable`
   = A and `canary` = B), answering Predict through the standard TF Serving client stubs; the
   served scores are checked against the in-process model's.
6. `xdctr route` splits users 50/50 between the two versions (an A/B test) and logs assignments.

Every run starts from an empty model history under `<workdir>/pipeline` and
`<workdir>/serving` (so the baseline is always the first blessed model); the imported log is
reused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np

from xdctr import features as F

MODEL_NAME = "xdctr"
FOOD_KITCHEN = "amazon-food-kitchen"
# The demo's pair: the multi-domain DNN baseline and the cross-domain model it must beat.
BASELINE, CANDIDATE = "dnn_multi", "dasl"
# The first model is blessed on a sanity floor only: popularity-matched negatives leave little to
# learn in one short run, and a baseline near 0.5 AUC is still the honest current model.
MIN_AUC = 0.45
# The bundled data: ../shared/data next to the checkout.
SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data")


def read_examples(pattern: str, limit: int) -> List[bytes]:
    """The first `limit` serialized tf.Examples of gzip TFRecord files matching `pattern`."""
    import tensorflow as tf

    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no TFRecord files match {pattern!r}")
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP").take(limit)
    return [record.numpy() for record in ds]


def feature_of(serialized: List[bytes], name: str) -> list:
    import tensorflow as tf

    values = []
    for s in serialized:
        feature = tf.train.Example.FromString(s).features.feature[name]
        values.append((feature.int64_list.value or feature.bytes_list.value)[0])
    return values


def predict_tfrecords(target: str, model_name: str, pattern: str, limit: int) -> Tuple[np.ndarray, List[int]]:
    from serving import client

    serialized = read_examples(pattern, limit)
    return client.predict_examples(target, model_name, serialized), feature_of(serialized, F.LABEL)


def local_scores(model_dir: str, serialized: List[bytes]) -> np.ndarray:
    """Scores from the SavedModel loaded in this process, for comparison with the service."""
    import tensorflow as tf

    signature = tf.saved_model.load(model_dir).signatures[F.SERVING_SIGNATURE]
    return signature(**{F.SERVING_INPUT: tf.constant(serialized)})[F.SERVING_OUTPUT].numpy()


def _store(pipeline_root: str):
    from ml_metadata.metadata_store import metadata_store
    from ml_metadata.proto import metadata_store_pb2

    config = metadata_store_pb2.ConnectionConfig()
    config.sqlite.filename_uri = os.path.join(pipeline_root, "metadata.sqlite")
    config.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READONLY
    return metadata_store.MetadataStore(config)


def latest_artifact(pipeline_root: str, type_name: str):
    """The newest artifact of `type_name` in the pipeline's ML Metadata."""
    artifacts = _store(pipeline_root).get_artifacts_by_type(type_name)
    if not artifacts:
        raise RuntimeError(f"no {type_name} artifact in {pipeline_root}")
    return max(artifacts, key=lambda a: a.id)


def pushed_versions(base_path: str) -> List[int]:
    return sorted(int(os.path.basename(d)) for d in glob.glob(os.path.join(base_path, "*")) if os.path.basename(d).isdigit())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _process(args: List[str], target: str, what: str, log_path: str) -> Iterator[str]:
    """Runs `python -m xdctr ARGS` until the block ends, once its gRPC health check says SERVING.

    Its output (the JSON log lines of the server or router) goes to `log_path`, not the demo's
    console; when it does not start, the error names the log and ends with its last lines."""
    from serving import client

    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "xdctr", *args], stdout=log, stderr=subprocess.STDOUT)
    try:
        client.wait_until_serving(target, timeout=180)
        yield target
    except TimeoutError as e:
        with open(log_path, errors="replace") as log:
            tail = "".join(log.readlines()[-20:])
        raise RuntimeError(f"{what} did not start serving at {target}; its log {log_path} ends with:\n{tail}") from e
    finally:
        process.terminate()
        process.wait(timeout=30)


def model_config_text(base_path: str, stable: int, canary: int) -> str:
    """Both labels on their versions; when the candidate was not blessed both name the baseline."""
    versions = " ".join(f"versions: {v}" for v in sorted({stable, canary}))
    return f"""model_config_list {{
  config {{
    name: "{MODEL_NAME}"
    base_path: "{base_path}"
    model_platform: "tensorflow"
    model_version_policy {{ specific {{ {versions} }} }}
    version_labels {{ key: "stable" value: {stable} }}
    version_labels {{ key: "canary" value: {canary} }}
  }}
}}
"""


def experiment_yaml(backend: str) -> str:
    return json.dumps({
        "salt": "demo-1",
        "arms": [
            {"name": "stable", "backend": backend, "model_name": MODEL_NAME, "version_label": "stable", "weight": 0.5},
            {"name": "canary", "backend": backend, "model_name": MODEL_NAME, "version_label": "canary", "weight": 0.5},
        ],
        "fallback_arm": "stable",
    }, indent=2)  # JSON is YAML


class Stages:
    """Numbered progress lines, one per stage, and the time each took (for the closing summary)."""

    def __init__(self, total: int, out=None):
        self.total, self._out, self.done = total, out, []
        self._number, self._started = 0, time.monotonic()

    @property
    def out(self):
        return self._out or sys.stdout  # looked up at print time (tests capture sys.stdout)

    @contextlib.contextmanager
    def stage(self, title: str) -> Iterator[Callable[[str], None]]:
        """Prints `[i/n] title ...`; the block may `say(line)` details; then prints the time taken."""
        self._number += 1
        print(f"[{self._number}/{self.total}] {title} ...", file=self.out, flush=True)
        started = time.monotonic()
        yield lambda line: print(f"      {line}", file=self.out, flush=True)
        seconds = time.monotonic() - started
        self.done.append((title, seconds))
        print(f"      done in {seconds:.0f} s", file=self.out, flush=True)

    def summary(self) -> str:
        width = max(len(title) for title, _ in self.done)
        lines = [f"{'stage':<{width}}  seconds"]
        lines += [f"{title:<{width}}  {seconds:7.0f}" for title, seconds in self.done]
        lines.append(f"{'total':<{width}}  {time.monotonic() - self._started:7.0f}")
        return "\n".join(lines)


def _logs(workdir: str, source: str, users: int, say) -> str:
    if source == "generated":
        from components.ingest import generator

        path = os.path.join(workdir, "logs", "clicks.jsonl.gz")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        count = generator.generate_file(generator.GeneratorConfig(num_users=users), path)
        say(f"generated {count} impressions of {users} users in 2 domains: {path}")
        return path
    from components.ingest import importer

    interactions = os.path.join(SHARED_DATA, source, "interactions.csv")
    if not os.path.isfile(interactions):
        raise FileNotFoundError(f"the bundled data set {source} is not at ../shared/data/{source}/interactions.csv")
    path = os.path.join(workdir, "logs", f"{source}.jsonl.gz")
    summary_path = path + ".summary.json"
    config = importer.ImportConfig(negatives=4, seed=0)
    # Reused only when the same importer settings made it (a changed importer default re-imports).
    wanted = {"input": interactions, "config": dataclasses.asdict(config)}
    summary = None
    if os.path.isfile(path) and os.path.isfile(summary_path):
        with open(summary_path) as f:
            cached = json.load(f)
        if cached.get("made_by") == wanted:
            summary = cached["summary"]
            say(f"reusing {path}")
    if summary is None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        summary = importer.import_interactions([interactions], path, config)
        with open(summary_path, "w") as f:
            json.dump({"made_by": wanted, "summary": summary}, f)
    say(f"{summary['interactions']} interactions of {summary['users']} users ({source}) -> "
        f"{summary['impressions']} impressions (each click + 4 sampled non-clicks)")
    return path


def evaluation_metrics(pipeline_root: str, model_name: Optional[str] = None) -> dict:
    """{slice name: {metric: value}} of the newest Evaluator run; slice '' is overall.

    `model_name` is "candidate" or "baseline" when the Evaluator compared the two."""
    import tensorflow_model_analysis as tfma

    result = tfma.load_eval_result(latest_artifact(pipeline_root, "ModelEvaluation").uri, model_name=model_name)
    metrics = {}
    for slice_key, values in result.slicing_metrics:
        name = ",".join(f"{k}={v}" for k, v in slice_key)
        metrics[name] = {k: v.get("doubleValue") for k, v in values[""][""].items() if "doubleValue" in v}
    return metrics


def _is_blessed(pipeline_root: str) -> bool:
    return bool(latest_artifact(pipeline_root, "ModelBlessing").custom_properties["blessed"].int_value)


SIDE_BY_SIDE_METRICS = (("auc", "AUC"), ("gauc", "GAUC"))


def _comparison_rows(metrics: dict) -> List[str]:
    """Overall, each domain, cold start (overall and per domain): the slices the table shows."""
    names = [""] + sorted(n for n in metrics if n.startswith(f"{F.DOMAIN}=") and "," not in n)
    names += sorted(n for n in metrics if n.startswith(f"{F.COLD_START}=1") or n.endswith(f"{F.COLD_START}=1"))
    return [n for n in names if n in metrics]


def side_by_side(baseline: dict, candidate: dict, baseline_name: str, candidate_name: str) -> str:
    """A text table: per slice, each model's AUC and GAUC and the candidate's gain."""
    rows = _comparison_rows(candidate)
    width = max([len("overall")] + [len(name) for name in rows])
    header = f"{'slice':<{width}} {'examples':>8}"
    for _, label in SIDE_BY_SIDE_METRICS:
        header += f" {label + ' ' + baseline_name:>{len(label) + len(baseline_name) + 3}}"
        header += f" {label + ' ' + candidate_name:>{len(label) + len(candidate_name) + 3}} {'gain':>7}"
    lines = [header]
    for name in rows:
        b, c = baseline.get(name, {}), candidate[name]
        line = f"{name or 'overall':<{width}} {int(c.get('example_count', 0)):>8}"
        for key, label in SIDE_BY_SIDE_METRICS:
            bv, cv = b.get(key, float("nan")), c.get(key, float("nan"))
            line += f" {bv:>{len(label) + len(baseline_name) + 3}.4f} {cv:>{len(label) + len(candidate_name) + 3}.4f}"
            line += f" {cv - bv:>+7.4f}"
        lines.append(line)
    return "\n".join(lines)


def _serve_and_route(workdir: str, root: str, serving_base: str, versions: List[int], num_scores: int,
                     routed_users: int, stages: Stages) -> dict:
    from serving import client

    stable, canary = versions[0], versions[-1]
    config_file = os.path.join(workdir, "serving", "models.config")
    with open(config_file, "w") as f:
        f.write(model_config_text(serving_base, stable, canary))
    examples_uri = latest_artifact(root, "Examples").uri
    serialized = read_examples(os.path.join(examples_uri, f"Split-{F.EVAL_SPLIT}", "*.gz"), max(num_scores, 2000))
    labels = feature_of(serialized[:num_scores], F.LABEL)

    serve_port, route_port = free_port(), free_port()
    serve_target, route_target = f"127.0.0.1:{serve_port}", f"127.0.0.1:{route_port}"
    experiment = os.path.join(workdir, "serving", "experiment.yaml")
    with open(experiment, "w") as f:
        f.write(experiment_yaml(serve_target))
    assignment_log = os.path.join(workdir, "serving", "assignments.jsonl")
    if os.path.exists(assignment_log):
        os.remove(assignment_log)
    serve_log, route_log = (os.path.join(workdir, "serving", f"{name}.log") for name in ("serve", "route"))
    with _process(["serve", "--model-config-file", config_file, "--port", str(serve_port), "--host", "127.0.0.1"],
                  serve_target, "xdctr serve", serve_log):
        with stages.stage(f"xdctr serve at {serve_target}: Predict through the TF Serving client stubs") as say:
            say(f"model {MODEL_NAME}: version {stable} (label stable), version {canary} (label canary); "
                f"server log: {serve_log}")
            served = client.predict_examples(serve_target, MODEL_NAME, serialized[:num_scores])
            expected = local_scores(os.path.join(serving_base, str(canary)), serialized[:num_scores])
            max_diff = float(np.max(np.abs(served - expected)))
            say("served_ctr  in_process_ctr  label")
            for s, e, y in zip(served, expected, labels):
                say(f"{s:.6f}    {e:.6f}        {y}")
            say(f"max |served - in-process| = {max_diff:.2e} over {len(served)} eval examples")
            if max_diff > 1e-5:
                raise RuntimeError(f"served scores differ from the in-process model's by {max_diff}")

        with stages.stage("xdctr route: a 2-arm A/B test, 50/50 by user (salt demo-1)") as say:
            with _process(["route", "--config", experiment, "--port", str(route_port), "--host", "127.0.0.1",
                           "--assignment-log", assignment_log], route_target, "xdctr route", route_log):
                by_user = {}
                for s in serialized:
                    by_user.setdefault(feature_of([s], F.USER_ID)[0], s)
                users_sent = list(by_user.items())[:routed_users]
                for _, example in users_sent:
                    client.predict_examples(route_target, MODEL_NAME, [example])
            with open(assignment_log) as f:  # complete once the router has stopped
                assignments = [json.loads(line) for line in f]
            arms = {}
            for a in assignments:
                arms.setdefault(a["arm"], set()).add(a["model_version"])
            counts = {arm: sum(1 for a in assignments if a["arm"] == arm) for arm in sorted(arms)}
            say(f"{len(assignments)} requests of {len(users_sent)} users: "
                + ", ".join(f"{arm}={n} (version {sorted(arms[arm])})" for arm, n in counts.items()))
            say(f"assignment log: {assignment_log}; router log: {route_log}")
    return {"served": served, "expected": expected, "versions": (stable, canary), "assignments": assignments}


def run(workdir: str, source: str = FOOD_KITCHEN, baseline: str = BASELINE, candidate: str = CANDIDATE,
        candidate_config: Optional[dict] = None, users: int = 300, train_steps: int = 1000, epochs: int = 1,
        eval_fraction: float = 0.1, max_gauc_drop: float = 0.0, num_scores: int = 8, routed_users: int = 200) -> dict:
    """The main job; returns what it measured and served (the end-to-end test reads it).

    `eval_fraction` is the latest share of the events the models are evaluated on; 0.1 keeps
    TFMA's two-model evaluation of food-kitchen within the demo's time budget. The candidate is
    blessed when its GAUC in every domain is at least the baseline's minus `max_gauc_drop`."""
    from components.evaluation import report
    from components.evaluation.eval_config import Thresholds
    from pipeline import local_runner

    stages = Stages(total=7)
    root = os.path.join(workdir, "pipeline")
    serving_base = os.path.join(workdir, "serving", MODEL_NAME)
    for fresh in (root, os.path.dirname(serving_base)):
        shutil.rmtree(fresh, ignore_errors=True)
    with stages.stage(f"click logs ({source})") as say:
        logs = _logs(workdir, source, users, say)

    runs = ((baseline, {}, "the current model (a baseline)"),
            (candidate, dict(candidate_config or {}), "a cross-domain candidate"))
    blessed = {}
    for seed, (model, config, role) in enumerate(runs):
        with stages.stage(f"TFX pipeline: {model}, {role}") as say:
            local_runner.run(
                root, pipeline_name="xdctr-demo", input_pattern=logs, serving_model_dir=serving_base, model_name=model,
                model_config=config, train_steps=train_steps, eval_steps=20, eval_fraction=eval_fraction,
                training={"batch_size": 256, "learning_rate": 1e-3, "seed": seed, "epochs": epochs},
                thresholds=Thresholds(min_auc=MIN_AUC, min_gauc=MIN_AUC, max_gauc_drop=max_gauc_drop),
            )
            blessed[model] = _is_blessed(root)
            versions = pushed_versions(serving_base)
            rule = (f"AUC and GAUC >= {MIN_AUC}" if not seed else
                    f"GAUC in every domain >= the blessed {baseline}'s" + (f" - {max_gauc_drop}" if max_gauc_drop else ""))
            say(f"{'blessed and pushed as version ' + str(versions[-1]) if blessed[model] else 'NOT blessed, not pushed'}"
                f" ({rule})")

    with stages.stage(f"evaluation: {baseline} vs {candidate} on the same eval split (TFMA)") as say:
        candidate_metrics = evaluation_metrics(root, "candidate")
        baseline_metrics = evaluation_metrics(root, "baseline")
        table = side_by_side(baseline_metrics, candidate_metrics, baseline, candidate)
        for line in table.splitlines():
            say(line)
        comparison = os.path.join(workdir, "comparison.txt")
        with open(comparison, "w") as f:
            f.write(table + "\n")
        say(f"cold start: no earlier click in the target domain, some in the other; written to {comparison}")

    versions = pushed_versions(serving_base)
    if not versions:
        raise RuntimeError(f"no model was blessed and pushed under {serving_base}")
    serving_model = candidate if blessed[candidate] else baseline
    with stages.stage(f"HTML report of the serving model ({serving_model}, version {versions[-1]})") as say:
        examples_uri = latest_artifact(root, "Examples").uri
        report_dir = os.path.join(workdir, "report")
        report.evaluate(os.path.join(serving_base, str(versions[-1])),
                        os.path.join(examples_uri, f"Split-{F.EVAL_SPLIT}", "*.gz"), report_dir, name=serving_model)
        say(f"{os.path.join(report_dir, report.REPORT_FILE)} (metrics.json, ROC, calibration and GAUC plots)")

    served = _serve_and_route(workdir, root, serving_base, versions, num_scores, routed_users, stages)
    print("\nsummary", flush=True)
    print(stages.summary(), flush=True)
    overall_b, overall_c = baseline_metrics.get("", {}), candidate_metrics.get("", {})
    print(f"{candidate} vs {baseline}: AUC {overall_c.get('auc', float('nan')):.4f} vs "
          f"{overall_b.get('auc', float('nan')):.4f}, GAUC {overall_c.get('gauc', float('nan')):.4f} vs "
          f"{overall_b.get('gauc', float('nan')):.4f}; {candidate} "
          f"{'blessed: it serves as canary' if blessed[candidate] else 'not blessed: the baseline keeps serving'}",
          flush=True)
    return {"metrics": candidate_metrics, "baseline_metrics": baseline_metrics, "blessed": blessed,
            "version_dirs": [os.path.join(serving_base, str(v)) for v in versions], "new_versions": versions,
            "report_dir": report_dir, **served}
