"""The full TFX pipeline on tiny generated data: components, blessing, caching, Kubeflow compile."""

import glob
import json
import os

import pytest
from ml_metadata.metadata_store import metadata_store
from ml_metadata.proto import metadata_store_pb2

from components.evaluation.eval_config import Thresholds
from components.ingest import generator
from pipeline import kubeflow_runner, local_runner
from xdctr import features as F

pytestmark = pytest.mark.slow  # make test-fast skips these

COMPONENTS = {"ClickLogExampleGen", "StatisticsGen", "SchemaGen", "ExampleValidator", "Trainer",
              "latest_blessed_model_resolver", "Evaluator", "Pusher"}
SMALL = {"inputs": {"item_buckets": 512, "user_buckets": 512}}


def _store(root):
    config = metadata_store_pb2.ConnectionConfig()
    config.sqlite.filename_uri = os.path.join(root, local_runner.METADATA_FILE)
    config.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READONLY
    return metadata_store.MetadataStore(config)


def _component(store, execution):
    """The component id of an execution: its node context is named `<pipeline>.<component id>`."""
    names = [c.name for c in store.get_contexts_by_execution(execution.id) if c.name.startswith("xdctr-test.")]
    return names[0].split(".", 1)[1]


def _blessings(store):
    return [a.custom_properties["blessed"].int_value for a in sorted(store.get_artifacts_by_type("ModelBlessing"),
                                                                      key=lambda a: a.id)]


def _versions(serving):
    return sorted(os.path.basename(d) for d in glob.glob(os.path.join(serving, "*")) if os.path.basename(d).isdigit())


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pipeline") / "clicks.jsonl")
    generator.generate_file(generator.GeneratorConfig(num_users=150, items_per_domain=60, seed=1), path)
    return path


def _args(log, serving, **changes):
    args = dict(pipeline_name="xdctr-test", input_pattern=log, serving_model_dir=serving, model_name="mean_pool_dnn",
                model_config=SMALL, train_steps=60, eval_steps=2, history_length=5, domain_history_length=3,
                training={"batch_size": 64, "learning_rate": 0.01, "early_stopping_patience": 0},
                thresholds=Thresholds(min_auc=0.55, min_gauc=0.5, max_gauc_drop=0.0))
    args.update(changes)
    return args


def test_pipeline_blesses_pushes_caches_and_refuses_a_worse_model(log, tmp_path):
    root, serving = str(tmp_path / "root"), str(tmp_path / "serving" / "xdctr")

    local_runner.run(root, **_args(log, serving))
    store = _store(root)
    ran = {_component(store, e) for e in store.get_executions()}
    assert COMPONENTS <= ran
    assert _blessings(store) == [1]
    first = _versions(serving)
    assert len(first) == 1
    assert os.path.isfile(os.path.join(serving, first[0], "saved_model.pb"))
    schema = glob.glob(os.path.join(root, "SchemaGen", "schema", "*", "schema.pbtxt"))
    assert schema and F.HISTORY_ITEM_IDS in open(schema[0]).read()

    # Unchanged inputs: every component but the resolver is reused from the cache.
    before = len(store.get_executions())
    local_runner.run(root, **_args(log, serving))
    store = _store(root)
    new = sorted(store.get_executions(), key=lambda e: e.id)[before:]
    states = {_component(store, e): e.last_known_state for e in new}
    cached = {c for c, s in states.items() if s == metadata_store_pb2.Execution.CACHED}
    assert {"ClickLogExampleGen", "StatisticsGen", "SchemaGen", "ExampleValidator", "Trainer"} <= cached
    # The Evaluator runs again (its baseline is now the first model, i.e. the same model), blesses
    # it, and the Pusher pushes the same trained model once more.
    pushed = _versions(serving)
    same = lambda a, b: open(os.path.join(serving, a, "variables", "variables.data-00000-of-00001"), "rb").read() == \
        open(os.path.join(serving, b, "variables", "variables.data-00000-of-00001"), "rb").read()  # noqa: E731
    assert all(same(first[0], version) for version in pushed)

    # A deliberately worse model (an untrained one, 1 step at a tiny learning rate) loses GAUC
    # against the blessed baseline: not blessed, not pushed.
    worse = _args(log, serving, train_steps=1, training={"batch_size": 64, "learning_rate": 1e-6,
                                                         "early_stopping_patience": 0})
    local_runner.run(root, **worse)
    assert _blessings(_store(root))[-1] == 0
    assert _versions(serving) == pushed


def test_kubeflow_compile(log, tmp_path):
    output = str(tmp_path / "kfp" / "xdctr.json")
    args = _args("gs://bucket/logs/*.jsonl.gz", "gs://bucket/serving/xdctr")
    input_pattern, train_steps = args.pop("input_pattern"), args.pop("train_steps")
    kubeflow_runner.compile_pipeline(output, "registry.example.com/xdctr:1.2.3", "gs://bucket/root", input_pattern,
                                     train_steps, **args)
    spec = json.loads(open(output).read())
    spec = spec.get("pipelineSpec", spec)
    tasks = set(spec["root"]["dag"]["tasks"])
    # Kubeflow v2 compiles the latest-blessed-model Resolver into two resolver tasks.
    assert COMPONENTS - {"latest_blessed_model_resolver"} <= tasks
    assert {"latest_blessed_model_resolver-model-resolver", "latest_blessed_model_resolver-model-blessing-resolver"} <= tasks
    executors = spec["deploymentSpec"]["executors"]
    images = {e["container"]["image"] for e in executors.values() if "container" in e}
    assert images == {"registry.example.com/xdctr:1.2.3"}
    assert {"ClickLogExampleGen_executor", "Trainer_executor", "Evaluator_executor", "Pusher_executor"} <= set(executors)
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert {kubeflow_runner.INPUT_PATTERN_PARAMETER, kubeflow_runner.TRAIN_ARGS_PARAMETER} <= set(parameters)
    trainer = spec["root"]["dag"]["tasks"]["Trainer"]["inputs"]["parameters"]
    assert trainer["run_fn"]["runtimeValue"]["constantValue"]["stringValue"] == "components.trainer.task.run_fn"
    assert trainer["train_args"]["componentInputParameter"] == kubeflow_runner.TRAIN_ARGS_PARAMETER
    custom = json.loads(trainer["custom_config"]["runtimeValue"]["constantValue"]["stringValue"])
    assert custom["model"] == "mean_pool_dnn" and custom["batch_size"] == 64
