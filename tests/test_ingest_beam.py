"""The Beam ingestion on tiny hand-written logs: exact elements, exact summary, exact TFRecords."""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os

import apache_beam as beam
import pytest
import tensorflow as tf
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from components.ingest import beam_pipeline as bp
from components.ingest import records as R
from components.ingest import sequences
from components.ingest.records import Impression, ParseOptions
from xdctr import features as F

PAD = F.PAD_ID


def write(path, lines, compress=False):
    text = "".join(line + "\n" for line in lines)
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


# ---- (1) ReadClickLogs ---------------------------------------------------------------------------


def test_read_click_logs_jsonl_csv_and_gzip(tmp_path):
    jsonl = write(
        tmp_path / "a.jsonl",
        [
            '{"ts": 100, "user_id": "u1", "domain": "grocery", "item_id": "g1", "clicked": 1}',  # 1
            "not json",  # 2 malformed
            "",  # 3 blank, skipped
            '{"ts": 101, "user_id": "u1", "domain": "toys", "item_id": "t1", "clicked": 0}',  # 4 unknown domain
            '{"ts": 102, "user_id": "u2", "domain": "kitchen", "item_id": "k1", "clicked": 0, "oracle_ctr": 0.5}',  # 5
        ],
    )
    csv = write(
        tmp_path / "b.csv",
        [
            "ts,user_id,domain,item_id,clicked",  # 1 header
            "200,u3,kitchen,k2,1",  # 2
            "201,u3,kitchen",  # 3 wrong column count
            "2024-01-01T00:00:00Z,u3,grocery,g2,0",  # 4
        ],
    )
    gz = write(
        tmp_path / "c.jsonl.gz",
        [
            '{"ts": 300, "user_id": "u4", "domain": "grocery", "item_id": "g3", "clicked": 1}',  # 1
            '{"ts": 301, "user_id": "u4", "domain": "grocery", "item_id": "g3", "clicked": 2}',  # 2 bad label
            '{"ts": 302, "user_id": "u4", "domain": "grocery", "clicked": 1}',  # 3 missing item_id
        ],
        compress=True,
    )
    options = ParseOptions(domains=("grocery", "kitchen"))
    with test_pipeline.TestPipeline() as p:
        good, dead = p | bp.ReadClickLogs([jsonl, csv, str(tmp_path / "*.gz")], options)
        assert_that(
            good,
            equal_to(
                [
                    Impression(100, "u1", "grocery", "g1", 1),
                    Impression(102, "u2", "kitchen", "k1", 0, 0.5),
                    Impression(200, "u3", "kitchen", "k2", 1),
                    Impression(1_704_067_200, "u3", "grocery", "g2", 0),
                    Impression(300, "u4", "grocery", "g3", 1),
                ]
            ),
            label="Good",
        )
        assert_that(
            dead | beam.Map(lambda d: (d.reason, d.line, d.source, d.field)),
            equal_to(
                [
                    (R.MALFORMED, 2, jsonl, ""),
                    (R.UNKNOWN_DOMAIN, 4, jsonl, F.LOG_DOMAIN),
                    (R.MALFORMED, 3, csv, ""),
                    (R.BAD_LABEL, 2, gz, F.LOG_CLICKED),
                    (R.MISSING_FIELD, 3, gz, F.LOG_ITEM_ID),
                ]
            ),
            label="Dead",
        )


def test_read_click_logs_parquet(tmp_path):
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"ts": 100, "user_id": "u1", "domain": "grocery", "item_id": "g1", "clicked": 1},  # row 1
        {"ts": 101, "user_id": "u1", "domain": "grocery", "item_id": "g2", "clicked": 7},  # row 2 bad label
        {"ts": 102, "user_id": "u2", "domain": "kitchen", "item_id": None, "clicked": 0},  # row 3 null item_id
        {"ts": 103, "user_id": "u2", "domain": "kitchen", "item_id": "k1", "clicked": 0},  # row 4
    ]
    plain = str(tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows), plain)
    # A timestamp column (no zone: UTC) and an oracle_ctr column.
    stamped = str(tmp_path / "b.parquet")
    pq.write_table(
        pa.table({
            "ts": pa.array([datetime.datetime(2024, 1, 1, 0, 1)], pa.timestamp("s")),
            "user_id": ["u3"], "domain": ["kitchen"], "item_id": ["k2"], "clicked": [1], "oracle_ctr": [0.25],
        }),
        stamped,
    )
    with test_pipeline.TestPipeline() as p:
        good, dead = p | bp.ReadClickLogs([str(tmp_path / "*.parquet")], ParseOptions())
        assert_that(
            good,
            equal_to([
                Impression(100, "u1", "grocery", "g1", 1),
                Impression(103, "u2", "kitchen", "k1", 0),
                Impression(1_704_067_260, "u3", "kitchen", "k2", 1, 0.25),  # 2024-01-01T00:01:00Z
            ]),
            label="Good",
        )
        # The "line" of a Parquet dead letter is the 1-based row number; raw is the row as JSON.
        assert_that(
            dead | beam.Map(lambda d: (d.reason, d.line, d.source, d.field, json.loads(d.raw))),
            equal_to([
                (R.BAD_LABEL, 2, plain, F.LOG_CLICKED, rows[1]),
                (R.MISSING_FIELD, 3, plain, F.LOG_ITEM_ID, rows[2]),
            ]),
            label="Dead",
        )


# ---- (2) The whole run ---------------------------------------------------------------------------

# Two users, history_length 2. Timestamps 1000..1400; eval_fraction 0.25 puts the cutoff at
# int(1400 - 0.25 * (1400 - 1000)) = 1300: ts >= 1300 is eval.
LOG = [
    '{"ts": 1000, "user_id": "u1", "domain": "grocery", "item_id": "g1", "clicked": 1}',  # 1
    '{"ts": 1000, "user_id": "u1", "domain": "grocery", "item_id": "g1", "clicked": 1}',  # 2 exact duplicate
    '{"ts": 1100, "user_id": "u1", "domain": "kitchen", "item_id": "k1", "clicked": 0}',  # 3
    "{broken",  # 4 malformed
    '{"ts": 1200, "user_id": "u1", "domain": "grocery", "item_id": "g2", "clicked": 1}',  # 5
    '{"ts": 1400, "user_id": "u1", "domain": "kitchen", "item_id": "k2", "clicked": 1}',  # 6
    '{"ts": 1000, "user_id": "u2", "domain": "kitchen", "item_id": "k1", "clicked": 1}',  # 7
    '{"ts": 1250, "user_id": "u2", "domain": "kitchen", "item_id": "k9", "clicked": "yes"}',  # 8 bad label
    '{"ts": 1300, "user_id": "u2", "domain": "kitchen", "item_id": "k3", "clicked": 0}',  # 9
    '{"ts": 1400, "user_id": "u2", "domain": "kitchen", "item_id": "k1", "clicked": 1}',  # 10
    '{"ts": 1400, "user_id": "  ", "domain": "kitchen", "item_id": "k1", "clicked": 1}',  # 11 empty id
]
G, K = b"grocery", b"kitchen"
# The contract: domains sorted (none configured), so the domain rows are [grocery, kitchen];
# domain_history_length 1 (not 2, so that swapping the two lengths would show).
CONTRACT = F.Contract(("grocery", "kitchen"), history_length=2, domain_history_length=1)
# (user, item, domain, ts, history items, history domains, history ts, history length,
#  domain history rows (flattened), domain history lengths, target-domain clicks,
#  other-domain clicks, label), worked out by hand.
TRAIN = [
    (b"u1", b"g1", G, 1000, [PAD, PAD], [PAD, PAD], [0, 0], 0, [PAD, PAD], [0, 0], 0, 0, 1),
    # the g1 click is in grocery
    (b"u1", b"k1", K, 1100, [PAD, b"g1"], [PAD, G], [0, 1000], 1, [b"g1", PAD], [1, 0], 0, 1, 0),
    # k1 was not clicked
    (b"u1", b"g2", G, 1200, [PAD, b"g1"], [PAD, G], [0, 1000], 1, [b"g1", PAD], [1, 0], 1, 0, 1),
    (b"u2", b"k1", K, 1000, [PAD, PAD], [PAD, PAD], [0, 0], 0, [PAD, PAD], [0, 0], 0, 0, 1),
]
EVAL = [
    # no kitchen click yet, 2 grocery clicks, of which the grocery row keeps the later one
    (b"u1", b"k2", K, 1400, [b"g1", b"g2"], [G, G], [1000, 1200], 2, [b"g2", PAD], [1, 0], 0, 2, 1),
    (b"u2", b"k3", K, 1300, [PAD, b"k1"], [PAD, K], [0, 1000], 1, [PAD, b"k1"], [0, 1], 1, 0, 0),
    # k3 (ts 1300) was not clicked
    (b"u2", b"k1", K, 1400, [PAD, b"k1"], [PAD, K], [0, 1000], 1, [PAD, b"k1"], [0, 1], 1, 0, 1),
]
ORDER = (F.USER_ID, F.ITEM_ID, F.DOMAIN, F.TIMESTAMP, F.HISTORY_ITEM_IDS, F.HISTORY_DOMAINS, F.HISTORY_TIMESTAMPS,
         F.HISTORY_LENGTH, F.DOMAIN_HISTORY_ITEM_IDS, F.DOMAIN_HISTORY_LENGTHS, F.TARGET_DOMAIN_CLICKS,
         F.OTHER_DOMAIN_CLICKS, F.LABEL)


def read_split(output_dir, split, contract):
    files = sorted(glob.glob(os.path.join(bp.split_dir(output_dir, split), "data_tfrecord-*.gz")))
    assert files
    spec = contract.feature_spec()
    rows = []
    for serialized in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        parsed = tf.io.parse_single_example(serialized, spec)
        values = (parsed[name].numpy() for name in ORDER)  # a scalar string comes back as bytes
        # Lists as written: the (num_domains, domain_history_length) matrix flattened row-major.
        rows.append(tuple(v if isinstance(v, bytes) else v.tolist() if v.ndim < 2 else v.ravel().tolist() for v in values))
    return sorted(rows)


def read_examples(output_dir, split):
    """Every feature of every example (oracle_ctr included), as sorted hashable tuples."""
    files = sorted(glob.glob(os.path.join(bp.split_dir(output_dir, split), "data_tfrecord-*.gz")))
    assert files
    return sorted(example_tuple(tf.train.Example.FromString(s.numpy()))
                  for s in tf.data.TFRecordDataset(files, compression_type="GZIP"))


def example_tuple(example):
    rows = []
    for name, feature in sorted(example.features.feature.items()):
        kind = feature.WhichOneof("kind")
        rows.append((name, tuple(getattr(feature, kind).value) if kind else ()))
    return tuple(rows)


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_dead_letters(output_dir):
    files = glob.glob(os.path.join(output_dir, bp.DEAD_LETTER_DIR, "*.jsonl"))
    rows = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return sorted(rows, key=lambda d: d["line"])


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ingest")
    log = write(tmp / "log.jsonl", LOG)
    # 100-second blocks: every timestamp of the log is a block of its own, so each example's
    # history comes from the per-user prefix of block states.
    # heavy_user_events=0: every user goes through the block path.
    config = bp.IngestConfig(input_patterns=(log,), history_length=2, domain_history_length=1, block_seconds=100,
                             heavy_user_events=0,
                             eval_fraction=0.25, split_by="time", max_bad_fraction=0.5)
    out = str(tmp / "out")
    return log, out, bp.run(config, out)


def test_run_summary(ingested):
    _, out, summary = ingested
    assert summary == {
        "contract": {"domains": ["grocery", "kitchen"], "history_length": 2, "domain_history_length": 1},
        "rows": {F.TRAIN_SPLIT: 4, F.EVAL_SPLIT: 3},
        "dead_letter": {R.MALFORMED: 1, R.BAD_LABEL: 1, R.EMPTY_ID: 1},
        "duplicates_dropped": 1,
        "eval_cutoff_ts": 1300,
        "good_records": 7,
        "bad_records": 3,
        "records_read": 11,  # 7 written + 3 dead letters + 1 duplicate: nothing unaccounted for
        "files_read": 1,
    }
    assert bp.read_summary(out) == summary
    assert bp.read_contract(out) == CONTRACT


def test_run_writes_exact_examples_split_by_time(ingested):
    _, out, summary = ingested
    train = read_split(out, F.TRAIN_SPLIT, CONTRACT)
    evaluation = read_split(out, F.EVAL_SPLIT, CONTRACT)
    assert train == sorted(TRAIN)
    assert evaluation == sorted(EVAL)
    ts = ORDER.index(F.TIMESTAMP)
    assert min(row[ts] for row in evaluation) >= summary["eval_cutoff_ts"] > max(row[ts] for row in train)


def test_run_writes_exact_stats_per_split(ingested):
    _, out, _ = ingested
    # train: u1 g1 (clicked), u1 g2 (clicked) in grocery; u1 k1 (not clicked; cold start: no
    # kitchen click but one grocery click) and u2 k1 (clicked; no clicks at all, so not cold) in
    # kitchen. History lengths 0, 1, 1, 0.
    assert read_json(os.path.join(out, bp.STATS_DIR, f"{F.TRAIN_SPLIT}.json")) == {
        "domains": {
            "grocery": {"rows": 2, "clicks": 2, "ctr": 1.0, "cold_start_rows": 0, "users": 1},
            "kitchen": {"rows": 2, "clicks": 1, "ctr": 0.5, "cold_start_rows": 1, "users": 2},
        },
        "history_lengths": {"0": 2, "1": 2},
        "rows": 4,
        "cold_start": 1,
        "cold_start_fraction": 0.25,
        "oracle_auc": None,  # no oracle_ctr in this log
    }
    # eval: kitchen only; u1 k2 is cold start (2 grocery clicks, no kitchen one). Lengths 2, 1, 1.
    assert read_json(os.path.join(out, bp.STATS_DIR, f"{F.EVAL_SPLIT}.json")) == {
        "domains": {"kitchen": {"rows": 3, "clicks": 2, "ctr": 2 / 3, "cold_start_rows": 1, "users": 2}},
        "history_lengths": {"1": 2, "2": 1},
        "rows": 3,
        "cold_start": 1,
        "cold_start_fraction": 1 / 3,
        "oracle_auc": None,
    }


def test_run_writes_a_schema_of_every_contract_feature(ingested):
    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import schema_pb2

    _, out, _ = ingested
    with open(os.path.join(out, bp.SCHEMA_FILE), encoding="utf-8") as f:
        schema = text_format.Parse(f.read(), schema_pb2.Schema())
    types = {tf.string: schema_pb2.BYTES, tf.int64: schema_pb2.INT}
    features = {feature.name: feature for feature in schema.feature}
    spec = CONTRACT.feature_spec()
    assert set(features) == set(spec)
    for name, feature_spec in spec.items():
        assert features[name].type == types[feature_spec.dtype], name
        assert [d.size for d in features[name].shape.dim] == list(feature_spec.shape), name
    # The per-domain histories are (num_domains, domain_history_length) = (2, 1).
    assert [d.size for d in features[F.DOMAIN_HISTORY_ITEM_IDS].shape.dim] == [2, 1]
    assert features[F.LABEL].type == schema_pb2.INT and not features[F.LABEL].shape.dim


def test_run_writes_dead_letters_with_reasons(ingested):
    log, out, _ = ingested
    dead = read_dead_letters(out)
    assert [(d["line"], d["reason"], d["field"], d["raw"], d["source"]) for d in dead] == [
        (4, R.MALFORMED, "", LOG[3], log),
        (8, R.BAD_LABEL, F.LOG_CLICKED, LOG[7], log),
        (11, R.EMPTY_ID, F.LOG_USER_ID, LOG[10], log),
    ]
    assert set(dead[0]) == {f.name for f in dataclasses.fields(R.DeadLetter)}
    assert dead[1]["detail"] == "expected 0 or 1, got 'yes'"


def test_configured_domains_fix_the_contract_order(tmp_path):
    # Configured domains keep their given order (not sorted), and a domain without events still
    # gets its (all-padding) row.
    log = write(tmp_path / "log.jsonl", LOG)
    out = str(tmp_path / "out")
    config = bp.IngestConfig(input_patterns=(log,), history_length=2, domain_history_length=1, eval_fraction=0.25,
                             split_by="time", max_bad_fraction=0.5, parse=ParseOptions(domains=("kitchen", "grocery", "toys")))
    summary = bp.run(config, out)
    contract = F.Contract(("kitchen", "grocery", "toys"), history_length=2, domain_history_length=1)
    assert bp.read_contract(out) == contract
    assert summary["contract"]["domains"] == ["kitchen", "grocery", "toys"]
    # EVAL with the domain rows in [kitchen, grocery, toys] order.
    rows, lengths = ORDER.index(F.DOMAIN_HISTORY_ITEM_IDS), ORDER.index(F.DOMAIN_HISTORY_LENGTHS)
    assert [(r[0], r[1], r[3], r[rows], r[lengths]) for r in read_split(out, F.EVAL_SPLIT, contract)] == [
        (b"u1", b"k2", 1400, [PAD, b"g2", PAD], [0, 1, 0]),
        (b"u2", b"k1", 1400, [b"k1", PAD, PAD], [1, 0, 0]),
        (b"u2", b"k3", 1300, [b"k1", PAD, PAD], [1, 0, 0]),
    ]


@pytest.fixture(scope="module")
def generated_log(tmp_path_factory):
    """A generated log with timestamps rounded to the hour, so that a user has same-ts events."""
    from components.ingest import generator

    config = generator.GeneratorConfig(num_users=12, items_per_domain=10, mean_events_per_user=12, num_days=3, seed=5)
    records = list(generator.LogGenerator(config).records())
    for r in records:
        r[F.LOG_TS] = r[F.LOG_TS] // 3600 * 3600
    path = write(tmp_path_factory.mktemp("generated") / "log.jsonl", [json.dumps(r) for r in records])
    return path, records


def test_block_seconds_do_not_change_the_output(generated_log, tmp_path):
    # Users with more than `heavy` events are cut into blocks of `block_seconds`: 60-second blocks
    # for everyone, for some users (the median user has fewer than 30 events), and for nobody.
    path, records = generated_log
    outputs = {}
    for block_seconds, heavy in ((60, 0), (60, 30), (10**9, 0), (60, 10**9)):
        out = str(tmp_path / f"{block_seconds}-{heavy}")
        config = bp.IngestConfig(input_patterns=(path,), history_length=3, domain_history_length=2,
                                 block_seconds=block_seconds, heavy_user_events=heavy)
        summary = bp.run(config, out)
        outputs[(block_seconds, heavy)] = (
            summary,
            {split: read_examples(out, split) for split in (F.TRAIN_SPLIT, F.EVAL_SPLIT)},
            {split: read_json(os.path.join(out, bp.STATS_DIR, f"{split}.json")) for split in (F.TRAIN_SPLIT, F.EVAL_SPLIT)},
        )
    assert outputs[(60, 0)] == outputs[(60, 30)] == outputs[(10**9, 0)] == outputs[(60, 10**9)]
    summary, examples, _ = outputs[(60, 0)]
    assert summary["rows"][F.TRAIN_SPLIT] > 0 and summary["rows"][F.EVAL_SPLIT] > 0
    # All equal the examples of each user's whole (deduplicated) timeline at once.
    contract = bp.read_contract(str(tmp_path / "60-0"))
    by_user = {}
    for r in records:
        event = Impression(r[F.LOG_TS], r[F.LOG_USER_ID], r[F.LOG_DOMAIN], r[F.LOG_ITEM_ID], r[F.LOG_CLICKED],
                           r[F.LOG_ORACLE_CTR])
        by_user.setdefault(event.user_id, {})[event] = None
    expected = sorted(
        example_tuple(sequences.to_tf_example(ex))
        for user, events in by_user.items()
        for ex in sequences.user_examples(user, list(events), contract)
    )
    assert sorted(examples[F.TRAIN_SPLIT] + examples[F.EVAL_SPLIT]) == expected
    assert len(expected) == len(records) - summary["duplicates_dropped"]
    # The run is a meaningful check: 60-second blocks cut timelines, and same-ts events exist.
    assert any(len({r[F.LOG_TS] for r in records if r[F.LOG_USER_ID] == u}) > 1 for u in by_user)
    assert len({(r[F.LOG_USER_ID], r[F.LOG_TS]) for r in records}) < len(records)


# ---- (3) Too many bad records --------------------------------------------------------------------


def summary(good, bad, duplicates=0, reasons=None):
    return {"good_records": good, "bad_records": bad, "duplicates_dropped": duplicates, "dead_letter": reasons or {}}


def test_check_bad_fraction():
    bp.check_bad_fraction(summary(90, 10, reasons={R.MALFORMED: 10}), max_bad_fraction=0.1)  # 10% is allowed
    with pytest.raises(bp.IngestError) as error:
        bp.check_bad_fraction(summary(85, 10, 5, {R.MALFORMED: 6, R.BAD_LABEL: 4}), max_bad_fraction=0.05)
    message = str(error.value)
    assert message.startswith("10 of 100 records (10.0%) were rejected (bad_label=4, malformed=6)")
    assert "max_bad_fraction=5.0%" in message
    with pytest.raises(bp.IngestError, match="no records were read"):
        bp.check_bad_fraction(summary(0, 0), max_bad_fraction=1.0)


def test_check_complete_fails_when_records_go_missing():
    complete = {**summary(85, 10, 5), "records_read": 100, "files_read": 2}
    bp.check_complete(complete)
    bp.check_summary(complete, max_bad_fraction=0.2)
    with pytest.raises(bp.IngestError) as error:
        bp.check_summary({**complete, "records_read": 130}, max_bad_fraction=1.0)
    assert str(error.value).startswith("30 of 130 records read from 2 file(s) are missing from the output "
                                       "(written 85, dead letters 10, duplicates 5)")


def test_run_raises_on_one_bad_record_with_zero_tolerance(tmp_path):
    log = write(
        tmp_path / "log.jsonl",
        [
            '{"ts": 1, "user_id": "u1", "domain": "grocery", "item_id": "g1", "clicked": 1}',
            '{"ts": 2, "user_id": "u1", "domain": "grocery", "item_id": "g2", "clicked": "maybe"}',
            '{"ts": 3, "user_id": "u1", "domain": "grocery", "item_id": "g3", "clicked": 0}',
        ],
    )
    out = str(tmp_path / "out")
    config = bp.IngestConfig(input_patterns=(log,), history_length=2, max_bad_fraction=0.0)
    with pytest.raises(bp.IngestError, match=r"^1 of 3 records \(33\.3%\) were rejected \(bad_label=1\)"):
        bp.run(config, out)
    # The summary is still written, for the user to inspect.
    assert bp.read_summary(out)["dead_letter"] == {R.BAD_LABEL: 1}


def test_run_raises_ingest_error_when_every_record_is_bad(tmp_path):
    # No good records at all (e.g. the wrong file format) is a user mistake, not a crash.
    log = write(tmp_path / "log.jsonl", ["ts,user_id", '{"ts": 1}'])
    out = str(tmp_path / "out")
    with pytest.raises(bp.IngestError, match=r"^2 of 2 records \(100\.0%\) were rejected \(malformed=1, missing_field=1\)"):
        bp.run(bp.IngestConfig(input_patterns=(log,), history_length=2), out)
    assert bp.read_summary(out)["rows"] == {F.TRAIN_SPLIT: 0, F.EVAL_SPLIT: 0}
    assert bp.read_summary(out)["contract"] is None  # no records, no domains


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(input_patterns=()), "input_patterns"),
        (dict(input_patterns=("x",), eval_fraction=1.0), "eval_fraction"),
        (dict(input_patterns=("x",), max_bad_fraction=-0.1), "max_bad_fraction"),
        (dict(input_patterns=("x",), history_length=0), "history_length"),
        (dict(input_patterns=("x",), domain_history_length=0), "domain_history_length"),
        (dict(input_patterns=("x",), block_seconds=0), "block_seconds"),
        (dict(input_patterns=("x",), heavy_user_events=-1), "heavy_user_events"),
        (dict(input_patterns=("x",), split_by="random"), "split_by"),
    ],
)
def test_ingest_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        bp.IngestConfig(**kwargs)


def test_split_by_events_puts_the_latest_fraction_of_events_in_eval(tmp_path):
    # 900 events one second apart, then 100 events 1000 s apart (ts 1..900, 1900..100900).
    # By time range, the last 20% is ts >= int(100900 - 0.2 * 100899) = 80720: 21 events.
    # By events, the last 20% is the latest 200 events (the quantile is approximate).
    times = list(range(1, 901)) + [900 + 1000 * k for k in range(1, 101)]
    lines = [json.dumps({"ts": t, "user_id": f"u{t % 7}", "domain": "ab"[t % 2], "item_id": f"i{t}",
                         "clicked": int(t % 3 == 0)}) for t in times]
    log = write(tmp_path / "log.jsonl", lines)
    by_events = bp.run(bp.IngestConfig(input_patterns=(log,), eval_fraction=0.2), str(tmp_path / "events"))
    by_time = bp.run(bp.IngestConfig(input_patterns=(log,), eval_fraction=0.2, split_by="time"), str(tmp_path / "time"))
    assert by_time["rows"] == {F.TRAIN_SPLIT: 979, F.EVAL_SPLIT: 21}
    assert by_time["eval_cutoff_ts"] == 80720
    assert abs(by_events["rows"][F.EVAL_SPLIT] - 200) <= 3
    assert by_events["rows"][F.TRAIN_SPLIT] + by_events["rows"][F.EVAL_SPLIT] == 1000
