"""The Beam ingestion: click-log files -> per-user leakage-free examples as gzip TFRecords.

One implementation, run standalone by `xdctr ingest` and as the executor of the pipeline's
ExampleGen component (`components/ingest/component.py`).

Output layout under `output_dir`:
  Split-train/data_tfrecord-*.gz, Split-eval/data_tfrecord-*.gz   tf.Examples (features.py)
  dead_letter/dead_letter-*.jsonl                                   rejected records with reasons
  summary.json     the feature contract (domains, lengths), counts per split and per reject reason
  stats/<split>.json   rows, CTR and users per domain, history lengths, cold-start fraction
  schema/schema.pbtxt  the tf.Example schema (tensorflow_metadata), the same for every split

Memory: a heavy user's events (more than `heavy_user_events`) are grouped by (user, time block),
not by user, so no worker ever holds a whole heavy user's timeline. Each block's `UserState`
(bounded by the history lengths) is summed up per user in block order, and each block is then
expanded with the state at its start. A worker holds one block's events, or one user's per-block
states (blocks x history lengths). Other users are grouped whole: the block stages cost more
than they save for them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Optional, Sequence

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

from xdctr import features as F

from components.ingest import records, sequences

DEAD_LETTER_DIR = "dead_letter"
SUMMARY_FILE = "summary.json"
STATS_DIR = "stats"
SPLIT_MODES = ("events", "time")
QUANTILES = 1000
_WHOLE_TIMELINE = -1  # the block key of a light user's single group
SCHEMA_FILE = os.path.join("schema", "schema.pbtxt")


def split_dir(output_dir: str, split: str) -> str:
    """TFX's layout for a split of an Examples artifact."""
    return os.path.join(output_dir, f"Split-{split}")


@dataclasses.dataclass(frozen=True)
class IngestConfig:
    """Settings of one ingestion run.

    Attributes:
      input_patterns: file patterns of JSON Lines or CSV logs, plain or gzip.
      history_length: length of the mixed-domain history.
      domain_history_length: length of each per-domain history.
      block_seconds: length of the time blocks a heavy user's timeline is cut into.
      heavy_user_events: users with more events than this are processed in time blocks (memory
        bound); the others in one group each (faster: no block-state stages).
      eval_fraction: the size of the eval split, the latest part of the data.
      split_by: "events": eval is the last `eval_fraction` of the events by time (the cutoff is
        an approximate quantile of the timestamps; events at the cutoff time go to eval);
        "time": eval is the last `eval_fraction` of the time range.
      max_bad_fraction: the run fails when more than this fraction of records is rejected.
      parse: validation settings (domains, timestamp range).
    """

    input_patterns: tuple
    history_length: int = F.DEFAULT_HISTORY_LENGTH
    domain_history_length: int = F.DEFAULT_DOMAIN_HISTORY_LENGTH
    block_seconds: int = 86_400
    heavy_user_events: int = 100_000
    eval_fraction: float = 0.2
    split_by: str = "events"
    max_bad_fraction: float = 0.05
    parse: records.ParseOptions = dataclasses.field(default_factory=records.ParseOptions)

    def __post_init__(self):
        if not self.input_patterns:
            raise ValueError("`input_patterns` must name at least one file pattern.")
        if self.split_by not in SPLIT_MODES:
            raise ValueError(f"`split_by` must be one of {SPLIT_MODES}. Received: split_by={self.split_by!r}")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"`eval_fraction` must be in (0, 1). Received: eval_fraction={self.eval_fraction}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"`max_bad_fraction` must be in [0, 1]. Received: max_bad_fraction={self.max_bad_fraction}")
        if self.heavy_user_events < 0:
            raise ValueError(f"`heavy_user_events` must be >= 0. Received: heavy_user_events={self.heavy_user_events}")
        if self.block_seconds <= 0:
            raise ValueError(f"`block_seconds` must be positive. Received: block_seconds={self.block_seconds}")
        F.Contract(("check",), self.history_length, self.domain_history_length)

    def contract(self, domains) -> F.Contract:
        return F.Contract(tuple(domains), self.history_length, self.domain_history_length)


class IngestError(RuntimeError):
    """The run finished but its input was unacceptable (e.g. too many bad records)."""


class _ParseFile(beam.DoFn):
    """Readable file -> Impression (main output) and DeadLetter (tagged 'dead').

    JSON Lines and CSV are read line by line (gzip detected from the name); Parquet row by row,
    where the "line" of a dead letter is the 1-based row number.
    """

    DEAD = "dead"
    READ = "read"  # (path, records read): checked against what reaches the outputs

    def __init__(self, options: records.ParseOptions):
        self._options = options

    def _parquet(self, handle, path):
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=65536):
            for record in batch.to_pylist():
                row += 1
                yield records.validate(record, path, row, json.dumps(record, default=str), self._options)

    def process(self, readable: fileio.ReadableFile):
        path = readable.metadata.path
        with readable.open() as handle:
            if path.endswith(".parquet"):
                results = self._parquet(handle, path)
            else:
                results = records.parse_lines(iter(handle.readline, b""), path, self._options)
            read = 0
            for result in results:
                read += 1
                if isinstance(result, records.DeadLetter):
                    yield beam.pvalue.TaggedOutput(self.DEAD, result)
                else:
                    yield tuple(result)  # a plain tuple: Beam's fast tuple coder, not pickle
        yield beam.pvalue.TaggedOutput(self.READ, (path, read))


class ReadClickLogs(beam.PTransform):
    """File patterns -> (impressions, dead letters), plus ((path, records read), ...) with `with_counts`."""

    def __init__(self, patterns: Sequence[str], options: records.ParseOptions, with_counts: bool = False):
        super().__init__()
        self._patterns = list(patterns)
        self._options = options
        self._with_counts = with_counts

    def expand(self, pbegin):
        files = (
            pbegin
            | "Patterns" >> beam.Create(self._patterns)
            | "Match" >> fileio.MatchAll(fileio.EmptyMatchTreatment.DISALLOW)
            | "Open" >> fileio.ReadMatches()
            # Each file is read by one worker, so line numbers are exact.
            | "Reshuffle" >> beam.Reshuffle()
        )
        parsed = files | "Parse" >> beam.ParDo(_ParseFile(self._options)).with_outputs(
            _ParseFile.DEAD, _ParseFile.READ, main="good")
        if self._with_counts:
            return parsed.good, parsed[_ParseFile.DEAD], parsed[_ParseFile.READ]
        return parsed.good, parsed[_ParseFile.DEAD]


def _dead_letter_json(dead: records.DeadLetter) -> str:
    return json.dumps(dataclasses.asdict(dead), sort_keys=True)


def _eval_cutoff(bounds, eval_fraction: float) -> Optional[int]:
    """split_by="time": the last `eval_fraction` of the time range [low, high]."""
    low, high = bounds
    if low is None:  # no good records: no cutoff; check_bad_fraction reports the input
        return None
    return int(high - eval_fraction * (high - low))


def _quantile_cutoff(quantiles, eval_fraction: float) -> Optional[int]:
    """split_by="events": the timestamp below which (1 - eval_fraction) of the events lie."""
    if not quantiles:
        return None
    return int(quantiles[int(round((1 - eval_fraction) * (len(quantiles) - 1)))])


class _MinMax(beam.CombineFn):
    def create_accumulator(self):
        return (None, None)

    def add_input(self, acc, ts):
        low, high = acc
        return (ts if low is None else min(low, ts), ts if high is None else max(high, ts))

    def merge_accumulators(self, accs):
        result = (None, None)
        for low, high in accs:
            if low is not None:
                result = self.add_input(self.add_input(result, low), high)
        return result

    def extract_output(self, acc):
        return acc


def _summarise(split_counts, dead_counts, duplicates, cutoff, contract, read=()):
    summary = {
        "records_read": sum(n for _, n in read),
        "files_read": len(read),
        "contract": contract.to_dict() if contract else None,
        "rows": {split: n for split, n in split_counts},
        "dead_letter": {reason: n for reason, n in dead_counts},
        "duplicates_dropped": sum(duplicates),
        "eval_cutoff_ts": cutoff,
    }
    summary["good_records"] = sum(summary["rows"].values())
    summary["bad_records"] = sum(summary["dead_letter"].values())
    return json.dumps(summary, sort_keys=True, indent=2)


def _by_block(element, heavy_user_events: int, block_seconds: int):
    """(user, {events, count}) -> ((user, block), event): a light user's events share one block."""
    user, joined = element
    (count,) = joined["count"]
    for event in joined["events"]:
        yield (user, event[0] // block_seconds if count > heavy_user_events else _WHOLE_TIMELINE), event


class _Block(beam.DoFn):
    """((user, block), events) -> ((user, block), unique events); duplicates counted (tag 'dup').

    Exact duplicates share user and ts, hence a block, so dropping them here is global.
    """

    DUPLICATES = "dup"

    def process(self, element):
        key, events = element
        events = [records.Impression._make(e) for e in events]
        unique = list(dict.fromkeys(events))
        if len(unique) < len(events):
            yield beam.pvalue.TaggedOutput(self.DUPLICATES, len(events) - len(unique))
        yield key, unique


def _block_states(element, contract):
    """(user, [(block, block state)]) -> ((user, block), state at the block's start)."""
    user, blocks = element
    state = sequences.UserState(contract)
    for block, block_state in sorted(blocks, key=lambda b: b[0]):
        yield (user, block), state.copy()
        state.absorb(block_state)


class _BlockExamples(beam.DoFn):
    """Joined (user, block) -> serialized examples and light stats rows, tagged by split.

    Examples are serialized where they are made, so no example dict is ever encoded between stages.
    """

    def process(self, element, contract, cutoff):
        (user, _), joined = element
        if isinstance(joined, dict):  # a heavy user's block, with the state at its start
            (events,), (state,) = joined["events"], joined["state"]
        else:  # a light user's whole timeline
            events, state = joined, None
        for example in sequences.user_examples(user, events, contract, state):
            split = F.EVAL_SPLIT if example[F.TIMESTAMP] >= cutoff else F.TRAIN_SPLIT
            yield beam.pvalue.TaggedOutput(split, sequences.serialize_example(example))
            yield beam.pvalue.TaggedOutput(_stats_tag(split), _stats_row(example))


def _stats_tag(split: str) -> str:
    return f"stats_{split}"


def _stats_row(example: dict) -> tuple:
    """(domain, user, label, history length, target-domain clicks, other-domain clicks, oracle ctr)."""
    return (example[F.DOMAIN].decode(), example[F.USER_ID], example[F.LABEL], example[F.HISTORY_LENGTH],
            example[F.TARGET_DOMAIN_CLICKS], example[F.OTHER_DOMAIN_CLICKS], example.get(F.ORACLE_CTR))


ORACLE_BINS = 100_000


def _binned_auc(positives: dict, negatives: dict):
    """AUC from {bin: count} of positive and negative scores (ties within a bin count half)."""
    total_pos, total_neg = sum(positives.values()), sum(negatives.values())
    if not total_pos or not total_neg:
        return None
    below, area = 0, 0.0
    for b in sorted(set(positives) | set(negatives)):
        p, n = positives.get(b, 0), negatives.get(b, 0)
        area += p * (below + 0.5 * n)
        below += n
    return area / (total_pos * total_neg)


class _SplitStats(beam.CombineFn):
    """Examples of one split -> rows, clicks and CTR per domain, history lengths, cold start, and
    (generated logs) the AUC of the true click probability `oracle_ctr`, the ceiling for models.

    Cold start: no earlier click in the target domain but some elsewhere. The oracle AUC is
    computed from 100,000 score bins, so memory stays constant.
    """

    def create_accumulator(self):
        return {"domains": {}, "history_lengths": {}, "cold_start": 0, "rows": 0, "oracle": [{}, {}]}

    def add_input(self, acc, row):
        domain, _, label, history_length, target_clicks, other_clicks, oracle = row
        if oracle is not None:
            bins = acc["oracle"][label]
            b = min(int(oracle * ORACLE_BINS), ORACLE_BINS - 1)
            bins[b] = bins.get(b, 0) + 1
        d = acc["domains"].setdefault(domain, {"rows": 0, "clicks": 0, "cold_start_rows": 0})
        d["rows"] += 1
        d["clicks"] += label
        cold = int(target_clicks == 0 and other_clicks > 0)
        d["cold_start_rows"] += cold
        acc["cold_start"] += cold
        acc["rows"] += 1
        length = str(history_length)
        acc["history_lengths"][length] = acc["history_lengths"].get(length, 0) + 1
        return acc

    def merge_accumulators(self, accs):
        result = self.create_accumulator()
        for acc in accs:
            result["rows"] += acc["rows"]
            result["cold_start"] += acc["cold_start"]
            for label in (0, 1):
                for b, n in acc["oracle"][label].items():
                    result["oracle"][label][b] = result["oracle"][label].get(b, 0) + n
            for k, n in acc["history_lengths"].items():
                result["history_lengths"][k] = result["history_lengths"].get(k, 0) + n
            for domain, d in acc["domains"].items():
                r = result["domains"].setdefault(domain, {"rows": 0, "clicks": 0, "cold_start_rows": 0})
                for k in r:
                    r[k] += d[k]
        return result

    def extract_output(self, acc):
        for d in acc["domains"].values():
            d["ctr"] = d["clicks"] / d["rows"] if d["rows"] else None
        acc["cold_start_fraction"] = acc["cold_start"] / acc["rows"] if acc["rows"] else None
        negatives, positives = acc.pop("oracle")
        acc["oracle_auc"] = _binned_auc(positives, negatives)
        acc["history_lengths"] = dict(sorted(acc["history_lengths"].items(), key=lambda kv: int(kv[0])))
        return acc


def _stats_json(stats, users):
    for domain, n in users:
        stats["domains"].setdefault(domain, {})["users"] = n
    return json.dumps(stats, sort_keys=True, indent=2)


def schema_text(contract: F.Contract) -> str:
    """The tf.Example schema of the contract, as a tensorflow_metadata Schema in text format."""
    import tensorflow as tf
    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import schema_pb2

    types = {tf.string: schema_pb2.BYTES, tf.int64: schema_pb2.INT, tf.float32: schema_pb2.FLOAT}
    schema = schema_pb2.Schema()
    for name, spec in sorted(contract.feature_spec().items()):
        feature = schema.feature.add(name=name, type=types[spec.dtype])
        for size in spec.shape:
            feature.shape.dim.add(size=size)
        feature.presence.min_fraction = 1.0
    return text_format.MessageToString(schema)


def build(pipeline: beam.Pipeline, config: IngestConfig, output_dir: str):
    """Adds the ingestion to `pipeline`; returns nothing (it writes under `output_dir`)."""
    good, dead, read = pipeline | "Read" >> ReadClickLogs(config.input_patterns, config.parse, with_counts=True)

    good = good | "Impressions" >> beam.Map(records.Impression._make)
    timestamps = good | "Ts" >> beam.Map(lambda e: e.ts)
    if config.split_by == "time":
        cutoff = (timestamps | "MinMax" >> beam.CombineGlobally(_MinMax())
                  | "Cutoff" >> beam.Map(_eval_cutoff, config.eval_fraction))
    else:
        cutoff = (timestamps | "Quantiles" >> beam.transforms.stats.ApproximateQuantiles.Globally(QUANTILES + 1)
                  | "Cutoff" >> beam.Map(_quantile_cutoff, config.eval_fraction))
    if config.parse.domains:
        domains = pipeline | "Domains" >> beam.Create([tuple(config.parse.domains)])
    else:
        domains = (
            good
            | "Domain" >> beam.Map(lambda e: e.domain)
            | "DistinctDomains" >> beam.Distinct()
            | "DomainList" >> beam.combiners.ToList()
            | "Sort" >> beam.Map(lambda ds: tuple(sorted(ds)))
        )
    contract = domains | "Contract" >> beam.Map(lambda ds: config.contract(ds) if ds else None)
    contract_side = beam.pvalue.AsSingleton(contract)

    # Heavy users (more than `heavy_user_events` events) are cut into time blocks; everyone else's
    # timeline is one group, which skips the block-state stages. Joined per user (no side input:
    # Beam's DirectRunner lost records with a large AsDict side input, see scripts/).
    counts = good | "UserOnes" >> beam.Map(lambda e: (e.user_id, 1)) | "EventsPerUser" >> beam.CombinePerKey(sum)
    by_user = good | "ByUser" >> beam.Map(lambda e: (e.user_id, tuple(e)))
    grouped = (
        {"events": by_user, "count": counts}
        | "JoinCounts" >> beam.CoGroupByKey()
        | "ByBlock" >> beam.FlatMap(_by_block, config.heavy_user_events, config.block_seconds)
        | "GroupBlock" >> beam.GroupByKey()
        | "Dedupe" >> beam.ParDo(_Block()).with_outputs(_Block.DUPLICATES, main="blocks")
    )
    groups, duplicates = grouped.blocks, grouped[_Block.DUPLICATES]
    whole, blocks = groups | "HeavyOrNot" >> beam.Partition(lambda kv, n: int(kv[0][1] != _WHOLE_TIMELINE), 2)
    starts = (
        blocks
        | "BlockState" >> beam.Map(lambda kv, c: (kv[0][0], (kv[0][1], sequences.block_state(kv[1], c))), contract_side)
        | "GroupUser" >> beam.GroupByKey()
        | "Prefix" >> beam.FlatMap(_block_states, contract_side)
    )
    joined = {"events": blocks, "state": starts} | "Join" >> beam.CoGroupByKey()
    splits = [F.TRAIN_SPLIT, F.EVAL_SPLIT]
    examples = (
        (whole, joined)
        | "AllGroups" >> beam.Flatten()
        | "Examples" >> beam.ParDo(_BlockExamples(), contract_side, beam.pvalue.AsSingleton(cutoff)).with_outputs(
            *splits, *[_stats_tag(split) for split in splits])
    )
    split_counts = []
    for split in splits:
        pcoll, rows = examples[split], examples[_stats_tag(split)]
        (
            pcoll
            | f"Write{split}" >> beam.io.WriteToTFRecord(
                os.path.join(split_dir(output_dir, split), "data_tfrecord"), file_name_suffix=".gz"
            )
        )
        split_counts.append(
            pcoll | f"Count{split}" >> beam.combiners.Count.Globally() | f"Key{split}" >> beam.Map(lambda n, s=split: (s, n))
        )
        users = (
            rows
            | f"UserDomain{split}" >> beam.Map(lambda row: (row[0], row[1]))
            | f"DistinctUsers{split}" >> beam.Distinct()
            | f"CountUsers{split}" >> beam.combiners.Count.PerKey()
        )
        (
            rows
            | f"Stats{split}" >> beam.CombineGlobally(_SplitStats())
            | f"StatsJson{split}" >> beam.Map(_stats_json, beam.pvalue.AsList(users))
            | f"WriteStats{split}" >> beam.io.WriteToText(os.path.join(output_dir, STATS_DIR, f"{split}.json"),
                                                          shard_name_template="")
        )

    (
        dead
        | "DeadJson" >> beam.Map(_dead_letter_json)
        | "WriteDead" >> beam.io.WriteToText(os.path.join(output_dir, DEAD_LETTER_DIR, "dead_letter"), file_name_suffix=".jsonl")
    )
    (
        contract
        | "Schema" >> beam.FlatMap(lambda c: [schema_text(c)] if c else [])
        | "WriteSchema" >> beam.io.WriteToText(os.path.join(output_dir, SCHEMA_FILE), shard_name_template="")
    )
    all_split_counts = split_counts | "Splits" >> beam.Flatten()
    dead_counts = dead | "Reason" >> beam.Map(lambda d: d.reason) | "CountReasons" >> beam.combiners.Count.PerElement()
    (
        pipeline
        | "One" >> beam.Create([None])
        | "Summary" >> beam.Map(
            lambda _, splits, reasons, dups, cut, c, read: _summarise(splits, reasons, dups, cut, c, read),
            splits=beam.pvalue.AsList(all_split_counts),
            reasons=beam.pvalue.AsList(dead_counts),
            dups=beam.pvalue.AsList(duplicates),
            cut=beam.pvalue.AsSingleton(cutoff),
            c=contract_side,
            read=beam.pvalue.AsList(read),
        )
        | "WriteSummary" >> beam.io.WriteToText(os.path.join(output_dir, SUMMARY_FILE), shard_name_template="")
    )


def read_contract(output_dir: str) -> F.Contract:
    """The feature contract an ingestion run wrote (domains and history lengths)."""
    return F.Contract.from_dict(read_summary(output_dir)["contract"])


def read_summary(output_dir: str) -> dict:
    with FileSystems.open(os.path.join(output_dir, SUMMARY_FILE)) as f:
        return json.loads(f.read().decode("utf-8"))


def check_bad_fraction(summary: dict, max_bad_fraction: float) -> None:
    """Raises IngestError when too many records were rejected."""
    total = summary["good_records"] + summary["bad_records"] + summary["duplicates_dropped"]
    if total == 0:
        raise IngestError("no records were read: the input files are empty")
    fraction = summary["bad_records"] / total
    if fraction > max_bad_fraction:
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(summary["dead_letter"].items()))
        raise IngestError(
            f"{summary['bad_records']} of {total} records ({fraction:.1%}) were rejected ({reasons}), "
            f"more than max_bad_fraction={max_bad_fraction:.1%}; see the dead_letter output"
        )


def check_complete(summary: dict) -> None:
    """Raises IngestError unless every record read is written, dead-lettered or a dropped duplicate.

    A runner that drops elements must fail the run, not leave a silently incomplete output: Beam
    2.77's DirectRunner in multi_processing mode lost 632,118 and then 183,695 parsed records of a
    10M-event file between the parse and the grouping stage.
    """
    accounted = summary["good_records"] + summary["bad_records"] + summary["duplicates_dropped"]
    read = summary.get("records_read")
    if read is not None and read != accounted:
        raise IngestError(
            f"{read - accounted} of {read} records read from {summary.get('files_read')} file(s) are missing from the "
            f"output (written {summary['good_records']}, dead letters {summary['bad_records']}, duplicates "
            f"{summary['duplicates_dropped']}): the runner lost data; the output is incomplete, run again"
        )


def check_summary(summary: dict, max_bad_fraction: float) -> None:
    """`check_complete`, then `check_bad_fraction`."""
    check_complete(summary)
    check_bad_fraction(summary, max_bad_fraction)


def run(config: IngestConfig, output_dir: str, beam_pipeline_args: Optional[Iterable[str]] = None) -> dict:
    """Runs the ingestion standalone; returns the summary (and raises IngestError on bad input)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    with beam.Pipeline(options=PipelineOptions(list(beam_pipeline_args or []))) as p:
        build(p, config, output_dir)
    summary = read_summary(output_dir)
    check_summary(summary, config.max_bad_fraction)
    return summary
