"""`ClickLogExampleGen`: the pipeline's ExampleGen, running the Beam ingestion as its executor.

It writes a standard `Examples` artifact (splits `train` and `eval`, gzip TFRecords of
tf.Example), so StatisticsGen, Trainer and Evaluator read it like any ExampleGen's output. The
ingestion summary (row counts, dead-letter reasons) and the dead-letter records are written next
to the splits and the counts are recorded as custom properties of the artifact.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

from tfx import types
from tfx.components.util import examples_utils
from tfx.dsl.components.base import base_beam_component, base_beam_executor, executor_spec
from tfx.proto import example_gen_pb2
from tfx.types import artifact_utils, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ExecutionParameter

from components.ingest import beam_pipeline, records
from xdctr import features as F

SPLITS = [F.TRAIN_SPLIT, F.EVAL_SPLIT]


def input_fingerprint(pattern: str) -> str:
    """Names, sizes and modification times of the files `pattern` matches.

    Passed by the local runner as the component's `fingerprint` execution property, so that TFX's
    cache reuses an earlier run only when the input files are unchanged.
    """
    import tensorflow as tf

    parts = []
    for path in sorted(tf.io.gfile.glob(pattern)):
        stat = tf.io.gfile.stat(path)
        parts.append(f"{path}:{stat.length}:{stat.mtime_nsec}")
    return "\n".join(parts)


class ClickLogExampleGenSpec(types.ComponentSpec):
    PARAMETERS = {
        "input_pattern": ExecutionParameter(type=str),
        "input_fingerprint": ExecutionParameter(type=str),
        "history_length": ExecutionParameter(type=int),
        "domain_history_length": ExecutionParameter(type=int),
        "block_seconds": ExecutionParameter(type=int),
        "heavy_user_events": ExecutionParameter(type=int),
        "eval_fraction": ExecutionParameter(type=float),
        "split_by": ExecutionParameter(type=str),
        "max_bad_fraction": ExecutionParameter(type=float),
        "domains": ExecutionParameter(type=str),  # comma-separated; empty accepts any
    }
    INPUTS = {}
    OUTPUTS = {"examples": ChannelParameter(type=standard_artifacts.Examples)}


class Executor(base_beam_executor.BaseBeamExecutor):
    """Runs `components.ingest.beam_pipeline` with the pipeline's Beam settings."""

    def Do(self, input_dict: Dict[str, List[types.Artifact]], output_dict: Dict[str, List[types.Artifact]],
           exec_properties: Dict[str, Any]) -> None:
        examples = artifact_utils.get_single_instance(output_dict["examples"])
        domains = tuple(d for d in exec_properties["domains"].split(",") if d)
        config = beam_pipeline.IngestConfig(
            input_patterns=(exec_properties["input_pattern"],),
            history_length=exec_properties["history_length"],
            domain_history_length=exec_properties["domain_history_length"],
            block_seconds=exec_properties["block_seconds"],
            heavy_user_events=exec_properties["heavy_user_events"],
            eval_fraction=exec_properties["eval_fraction"],
            split_by=exec_properties["split_by"],
            max_bad_fraction=exec_properties["max_bad_fraction"],
            parse=records.ParseOptions(domains=domains),
        )
        with self._make_beam_pipeline() as pipeline:
            beam_pipeline.build(pipeline, config, examples.uri)
        summary = beam_pipeline.read_summary(examples.uri)
        examples.split_names = artifact_utils.encode_split_names(SPLITS)
        examples_utils.set_payload_format(examples, example_gen_pb2.PayloadFormat.FORMAT_TF_EXAMPLE)
        examples.set_string_custom_property("ingest_summary", json.dumps(summary, sort_keys=True))
        beam_pipeline.check_summary(summary, config.max_bad_fraction)


class ClickLogExampleGen(base_beam_component.BaseBeamComponent):
    """Click logs (JSON Lines / CSV, plain or gzip) -> leakage-free sequence examples."""

    SPEC_CLASS = ClickLogExampleGenSpec
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(Executor)

    def __init__(self, input_pattern: str, history_length: int = F.DEFAULT_HISTORY_LENGTH,
                 domain_history_length: int = F.DEFAULT_DOMAIN_HISTORY_LENGTH, block_seconds: int = 86_400,
                 heavy_user_events: int = 100_000,
                 eval_fraction: float = 0.2, split_by: str = "events", max_bad_fraction: float = 0.05, domains: Optional[List[str]] = None,
                 fingerprint: str = ""):
        spec = ClickLogExampleGenSpec(
            input_pattern=input_pattern,
            input_fingerprint=fingerprint,
            history_length=history_length,
            domain_history_length=domain_history_length,
            block_seconds=block_seconds,
            heavy_user_events=heavy_user_events,
            eval_fraction=eval_fraction,
            split_by=split_by,
            max_bad_fraction=max_bad_fraction,
            domains=",".join(domains or []),
            examples=types.Channel(type=standard_artifacts.Examples),
        )
        super().__init__(spec=spec)
