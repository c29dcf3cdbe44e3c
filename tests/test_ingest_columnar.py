"""The columnar path: block parsing, shard reading, column-wise features and example encoding all
give exactly what the row path (parse_lines, user_examples, to_tf_example) gives."""

from __future__ import annotations

import collections
import gzip
import io
import json
import os
import sys

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
import tensorflow as tf
from google.protobuf.internal import encoder

from components.ingest import beam_pipeline as bp
from components.ingest import generator, sequences
from components.ingest import records as R
from components.ingest.records import Impression, ParseOptions
from xdctr import features as F

# Lines the columnar checks must not take at face value; each is parsed by the row path.
ODD_JSON = [
    '{"ts": 100, "user_id": "u1", "domain": "grocery", "item_id": "g1", "clicked": 1}',
    "not json",
    "",
    "   ",
    "\x0b",  # blank to Python, not JSON whitespace
    '{"ts": 101, "user_id": "u1", "domain": "toys", "item_id": "t1", "clicked": 0}',
    '{"ts": 102, "user_id": "u2", "domain": "kitchen", "item_id": "k1", "clicked": 0, "oracle_ctr": 0.5}',
    '{"ts": 1.5e2, "user_id": 7, "domain": "kitchen", "item_id": "k1", "clicked": 1}',  # float ts, int id
    '{"ts": "2024-01-01T00:00:00Z", "user_id": "u3", "domain": "kitchen", "item_id": "k1", "clicked": 1}',
    '{"ts": "1700000000", "user_id": "u3", "domain": "kitchen", "item_id": "k1", "clicked": "1"}',
    '{"ts": 103, "user_id": " u4", "domain": "kitchen", "item_id": "k1", "clicked": 1}',  # stripped
    '{"ts": 103, "user_id": "u4\u00a0", "domain": "kitchen", "item_id": "k1", "clicked": 1}',  # no-break space
    '{"ts": 103, "user_id": "u4\u3000", "domain": "kitchen", "item_id": "k2", "clicked": 1}',
    '{"ts": 104, "user_id": "u5", "domain": "kitchen", "item_id": "k1", "clicked": true}',
    '{"ts": 104, "user_id": "u5", "domain": "kitchen", "item_id": "k1", "clicked": 2}',
    '{"ts": 104, "user_id": "u5", "domain": "kitchen", "item_id": "k1", "clicked": 1.0}',
    '{"ts": 105, "user_id": "u5", "domain": "kitchen", "clicked": 1}',
    '{"ts": 105, "user_id": "u5", "domain": "kitchen", "item_id": null, "clicked": 1}',
    '\ufeff{"ts": 106, "user_id": "u5", "domain": "kitchen", "item_id": "k1", "clicked": 1}',  # BOM
    '{"ts": 107, "user_id": "u5", "domain": "kitchen", "item_id": "k1", "clicked": 1} {"ts": 1}',
    '{"ts": 108, "ts": 109, "user_id": "u5", "domain": "kitchen", "item_id": "k1", "clicked": 1}',
    '{"ts": NaN, "user_id": "u5", "domain": "kitchen", "item_id": "k1", "clicked": 1}',
    '{"ts": 110, "user_id": "u5", "domain": "kitchen", "item_id": "k1", "clicked": 1, "oracle_ctr": "0.25"}',
    '{"ts": 110, "user_id": "u5", "domain": "kitchen", "item_id": "k1", "clicked": 1, "oracle_ctr": true}',
    '{"ts": 110, "user_id": "u5", "domain": "kitchen", "item_id": "k3", "clicked": 1, "oracle_ctr": "x"}',
    '{"ts": -5, "user_id": "u5", "domain": "kitchen", "item_id": "k1", "clicked": 1}',
    '{"ts": 99999999999999999999, "user_id": "u5", "domain": "kitchen", "item_id": "k1", "clicked": 1}',
    '{"ts": 111, "user_id": ["u"], "domain": "kitchen", "item_id": "k1", "clicked": 1}',
    '{"ts": 111, "user_id": {"id": 1}, "domain": "kitchen", "item_id": "k1", "clicked": 1}',
    "[1, 2]",
    "{}",
    '{"ts": 111, "user_id": "", "domain": "kitchen", "item_id": "k1", "clicked": 1}',
    '{"ts": 112, "user_id": "u\\n6", "domain": "kitchen", "item_id": "k\\u00e9", "clicked": 0}',
]


def generated_lines(num_users=30, seed=1):
    config = generator.GeneratorConfig(num_users=num_users, items_per_domain=10, mean_events_per_user=10, num_days=3,
                                       seed=seed)
    return [json.dumps(r) for r in generator.LogGenerator(config).records()]


def results_by_kind(results):
    """(sorted good events, sorted dead letters as tuples); events as repr, so NaN equals NaN."""
    good = sorted(repr(tuple(r)) for r in results if isinstance(r, Impression))
    dead = sorted((d.source, d.line, d.reason, d.field, d.detail, d.raw) for d in results if isinstance(d, R.DeadLetter))
    return good, dead


def block_results(block):
    return sorted(repr(tuple(e)) for e in R.table_events(block.events)), sorted(
        (d.source, d.line, d.reason, d.field, d.detail, d.raw) for d in block.dead)


@pytest.mark.parametrize("options", [ParseOptions(), ParseOptions(domains=("grocery", "kitchen", "A")),
                                     ParseOptions(min_ts=101, max_ts=1_800_000_000)])
def test_parse_block_gives_the_row_path_results_for_json_lines(options):
    # Odd lines among good ones, a line that is not UTF-8 and a last line without a newline.
    lines = generated_lines()[:40] + ODD_JSON + generated_lines(seed=2)[:40]
    data = ("\n".join(lines) + "\n").encode() + b'{"ts": 1\xff}\r\n' + \
        b'{"ts": 5, "user_id": "z", "domain": "A", "item_id": "b", "clicked": 0}'
    expected = list(R.parse_lines(io.BytesIO(data).readlines(), "f.jsonl", options))
    block = R.parse_block(data, 1, "f.jsonl", options)
    assert block_results(block) == results_by_kind(expected)
    assert block.read == len(expected)
    good, dead = results_by_kind(expected)
    assert len(dead) >= 18 and len(good) >= 80  # the log is a meaningful check
    # Line numbers start where the block does.
    shifted = R.parse_block(data, 101, "f.jsonl", options)
    assert sorted(d.line for d in shifted.dead) == sorted(d.line + 100 for d in block.dead)


def test_parse_block_gives_the_row_path_results_for_csv():
    header = "ts,user_id,domain,item_id,clicked,oracle_ctr"
    lines = [
        "200,u3,kitchen,k2,1,",
        "201,u3,kitchen",  # wrong column count
        "2024-01-01T00:00:00Z,u3,grocery,g2,0,0.5",
        " 202 ,u3, grocery ,g2, 1 ,.5",  # spaces: the row path strips
        '203,"u,4",grocery,g3,0,1e-2',  # quoted field
        '204,"u""5",grocery,g3,0,',
        "205,u6,grocery,g3,2,",
        "206,u6,grocery,g3,1,NaN",  # pyarrow's default null, float() says nan
        "207,u6,grocery,g3,1,nan",
        "208,u6,,g3,1,",
        "209,u6,grocery,g3,1,1_0",  # float("1_0") == 10.0: the row path accepts it
        "",
        "1e3,u7,grocery,g4,0,0.125",
        "210,u7,grocery,g4,0,0.125,extra",
        "211,u7,grocery,g4,0,-0.0",
    ] + [f"{300 + i},u{i % 5},{'ab'[i % 2]},i{i},{i % 2},{i / 100}" for i in range(50)]
    data = ("\n".join(lines) + "\n").encode()
    expected = list(R.parse_lines([header.encode() + b"\n"] + io.BytesIO(data).readlines(), "f.csv", ParseOptions()))
    block = R.parse_block(data, 2, "f.csv", ParseOptions(), header=R.csv_header(header))
    assert block_results(block) == results_by_kind(expected)
    assert block.read == len(expected)
    good, dead = results_by_kind(expected)
    assert len(dead) == 4 and len(good) == 60  # "1_0" is a float to Python


def test_edge_space_pattern_covers_every_python_whitespace():
    import pyarrow.compute as pc

    spaces = [chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()]
    assert max(map(ord, spaces)) < 0x3001  # the pattern is made from the characters below
    values = pa.array([f"{c}x" for c in spaces] + [f"x{c}" for c in spaces] + ["x", "x y", "\u00e9", "\u200b"])
    matched = pc.match_substring_regex(values, R._edge_space_regex()).to_pylist()
    assert matched == [True] * (2 * len(spaces)) + [False] * 4  # U+200B is not whitespace to Python


def test_parquet_batches_give_the_row_path_results(tmp_path):
    import datetime

    import pyarrow.parquet as pq

    rows = [
        {"ts": 100, "user_id": "u1", "domain": "grocery", "item_id": "g1", "clicked": 1},
        {"ts": 101, "user_id": "u1", "domain": "grocery", "item_id": "g2", "clicked": 7},
        {"ts": 102, "user_id": "u2", "domain": "kitchen", "item_id": None, "clicked": 0},
        {"ts": 103, "user_id": " u2 ", "domain": "kitchen", "item_id": "k1", "clicked": 0},
    ]
    batch = pa.Table.from_pylist(rows).to_batches()[0]
    parsed = R.parse_arrow_batch(batch, 1, "a.parquet", ParseOptions())
    expected = [R.validate(r, "a.parquet", i, json.dumps(r), ParseOptions()) for i, r in enumerate(rows, start=1)]
    assert block_results(parsed) == results_by_kind(expected)
    # Timestamp columns: seconds, truncated toward zero like int(datetime.timestamp()).
    stamps = [datetime.datetime(2024, 1, 1, 0, 1, 0, 999_999), datetime.datetime(1969, 12, 31, 23, 59, 59, 500_000)]
    table = pa.table({"ts": pa.array(stamps, pa.timestamp("us")), "user_id": ["u3", "u4"], "domain": ["k", "k"],
                      "item_id": ["k2", "k3"], "clicked": [1, 0]})
    parsed = R.parse_arrow_batch(table.to_batches()[0], 1, "b.parquet", ParseOptions(min_ts=-10))
    expected = [R.validate(r, "b.parquet", i, "", ParseOptions(min_ts=-10)) for i, r in enumerate(table.to_pylist(), 1)]
    assert sorted(tuple(e) for e in R.table_events(parsed.events)) == sorted(tuple(e) for e in expected)
    assert sorted(e.ts for e in expected) == [0, 1_704_067_260]


# ---- Shards of a file ----------------------------------------------------------------------------


@pytest.mark.parametrize("shard_bytes", [1, 7, 40, 41, 100, 10_000])
@pytest.mark.parametrize("block_bytes", [3, 64])
def test_shards_own_every_line_once(shard_bytes, block_bytes):
    data = b"".join(f"line {i} {'x' * (i % 13)}\n".encode() for i in range(40)) + b"\n\nlast without newline"
    shards = list(bp._file_shards(type("M", (), {"path": "f.jsonl", "size_in_bytes": len(data)})(), shard_bytes))
    owned = [b"".join(bp._owned_blocks(io.BytesIO(data), s.start, s.end, block_bytes)) for s in shards]
    assert b"".join(owned) == data
    assert all(block == b"" or (s.start == 0 or data[s.start - 1:s.start] == b"\n" or
                                data.index(block) > s.start) for s, block in zip(shards, owned))


def test_gzip_and_parquet_files_are_not_split():
    def meta(path):
        return type("M", (), {"path": path, "size_in_bytes": 10_000})()

    assert list(bp._file_shards(meta("a.jsonl.gz"), 100)) == [bp._Shard("a.jsonl.gz", 0, None)]
    assert list(bp._file_shards(meta("a.parquet"), 100)) == [bp._Shard("a.parquet", 0, None)]
    assert len(list(bp._file_shards(meta("a.csv"), 100))) == 100


# ---- Column-wise features ------------------------------------------------------------------------


def reference_examples(events, contract):
    by_user = collections.defaultdict(dict)
    for e in events:
        by_user[e.user_id][e] = None
    return [ex for user, evs in sorted(by_user.items()) for ex in sequences.user_examples(user, list(evs), contract)]


def columnar(events, contract):
    table, duplicates = sequences.sort_and_dedupe(R.events_table(events))
    return sequences.columnar_examples(table, contract), duplicates


def hourly_events(num_users=40, seed=3):
    config = generator.GeneratorConfig(num_users=num_users, items_per_domain=10, mean_events_per_user=15, num_days=3,
                                       domains=("A", "B", "C"), seed=seed)
    return [Impression(r["ts"] // 3600 * 3600, r["user_id"], r["domain"], r["item_id"], r["clicked"], r["oracle_ctr"])
            for r in generator.LogGenerator(config).records()]


@pytest.mark.parametrize("lengths", [(3, 2), (1, 1), (20, 10)])
def test_columnar_examples_equal_user_examples(lengths):
    events = hourly_events()
    # Exact duplicates, an event without oracle_ctr next to its twin with one, and ties.
    events += events[:5] + [events[7]._replace(oracle_ctr=None)]
    contract = F.Contract(("C", "A", "B", "D"), *lengths)  # an unused domain, not in sorted order
    columns, duplicates = columnar(events, contract)
    expected = reference_examples(events, contract)
    assert duplicates == len(events) - len(set(events)) >= 6
    assert list(columns.to_dicts(contract)) == expected
    assert len({(e[F.USER_ID], e[F.TIMESTAMP]) for e in expected}) < len(expected)  # same-ts events exist


def test_columnar_examples_of_the_golden_sequences():
    from tests.test_ingest_sequences import ABC_EVENTS, ABC_EXAMPLES, CONTRACT_A, CONTRACT_ABC, GOLDEN_EVENTS, GOLDEN_EXAMPLES

    for events, contract, expected in ((GOLDEN_EVENTS, CONTRACT_A, GOLDEN_EXAMPLES), (ABC_EVENTS, CONTRACT_ABC, ABC_EXAMPLES)):
        columns, _ = columnar(events, contract)
        assert list(columns.to_dicts(contract)) == expected


def test_sort_and_dedupe_keeps_events_that_differ_only_in_oracle():
    e = Impression(5, "u", "A", "i", 1, None)
    events = [e, e._replace(oracle_ctr=-1.0), e, e._replace(oracle_ctr=-1.0), e._replace(oracle_ctr=0.5)]
    table, duplicates = sequences.sort_and_dedupe(R.events_table(events))
    assert duplicates == 2
    assert sorted(R.table_events(table), key=repr) == sorted([e, e._replace(oracle_ctr=-1.0), e._replace(oracle_ctr=0.5)], key=repr)


# ---- Encoding ------------------------------------------------------------------------------------


def test_varints_equal_protobuf_encoding():
    values = [0, 1, 127, 128, 300, 16383, 16384, 2**31, 1_700_000_000, 2**62, -1, -300]
    data, lengths = sequences.varints(np.array(values))
    assert [data[i, :lengths[i]].tobytes() for i in range(len(values))] == [
        encoder._VarintBytes(v) if v >= 0 else encoder._VarintBytes(v + 2**64) for v in values]
    assert [sequences._varint(v) for v in values if v >= 0] == [encoder._VarintBytes(v) for v in values if v >= 0]


def decoded(columns, contract, chunk):
    out = []
    for rows, examples in sequences.encode_examples(columns, contract, chunk):
        out += [(int(r), tf.train.Example.FromString(e)) for r, e in zip(rows, examples)]
    return out


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_encoded_examples_parse_to_the_examples_of_to_tf_example(chunk):
    events = hourly_events(num_users=12)
    events = [e._replace(oracle_ctr=None) if i % 3 == 0 else e for i, e in enumerate(events)]  # mixed presence
    contract = F.Contract(("A", "B", "C"), 4, 2)
    columns, _ = columnar(events, contract)
    examples = decoded(columns, contract, chunk)
    assert [r for r, _ in examples] == list(range(columns.size))
    expected = list(columns.to_dicts(contract))
    assert [e for _, e in examples] == [sequences.to_tf_example(x) for x in expected]
    assert any(F.ORACLE_CTR not in x for x in expected) and any(F.ORACLE_CTR in x for x in expected)


def test_encoding_of_long_values_and_large_counts():
    # 17,000 clicks of one user (counts past the 2-byte varint table), long ids, negative ts.
    n = 17_000
    events = [Impression(-n + i, "u" * 300, "A", f"item-{i % 7}" * 20, 1, 0.25) for i in range(n)]
    contract = F.Contract(("A",), 2, 1)
    columns, _ = columnar(events, contract)
    rows = [0, 1, n - 1]
    examples = decoded(columns.take(np.array(rows)), contract, 4096)
    expected = [x for i, x in enumerate(columns.to_dicts(contract)) if i in rows]
    assert [e for _, e in examples] == [sequences.to_tf_example(x) for x in expected]
    assert expected[-1][F.TARGET_DOMAIN_CLICKS] == n - 1


def test_gzip_tfrecord_writer_round_trip(tmp_path):
    path = str(tmp_path / "records.gz")
    writer = bp.GzipTFRecordWriter(path)
    batches = [[b"a", b"", b"x" * 300], [bytes(range(256)) * 70], [b"last"]]
    for batch in batches:
        writer.write(batch)
    writer.close()
    with gzip.open(path) as f:
        assert f.read(8) == (1).to_bytes(8, "little")  # one gzip member, TFRecord framing inside
    assert [r.numpy() for r in tf.data.TFRecordDataset(path, compression_type="GZIP")] == sum(batches, [])


# ---- Pipeline helpers ----------------------------------------------------------------------------


def test_ts_quantile_is_exact_below_capacity_and_close_above():
    ts = np.arange(1000)
    exact = bp._TsQuantile(0.2)
    acc = exact.merge_accumulators([exact.add_input(exact.create_accumulator(), bp._ts_summary(ts[i::3])) for i in range(3)])
    assert exact.extract_output(acc) == 800  # ts 800..999 (200 events) are eval
    rng = np.random.default_rng(0)
    ts = rng.integers(0, 10**6, size=200_000)
    small = bp._TsQuantile(0.2, capacity=1000)
    acc = small.create_accumulator()
    for part in np.array_split(ts, 20):
        acc = small.add_input(acc, bp._ts_summary(part))
    cutoff = small.extract_output(acc)
    assert abs(np.mean(ts >= cutoff) - 0.2) < 0.005
    assert exact.extract_output(exact.create_accumulator()) is None


def test_user_chunks_never_cut_a_user():
    user = np.repeat(np.arange(6), [1, 5, 2, 9, 1, 1])
    chunks = list(bp._user_chunks(user, 4))
    assert chunks[0][0] == 0 and chunks[-1][1] == len(user)
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    assert all(lo == 0 or user[lo - 1] != user[lo] for lo, _ in chunks)
    # A chunk ends at the first user start at or after `size` events: (6, 17) holds two users.
    assert chunks == [(0, 6), (6, 17), (17, 19)]


def test_user_shard_of_is_stable_and_spread():
    users = pa.array([f"u{i}" for i in range(2000)] + ["u7"])
    shards = bp.user_shard_of(users, 8)
    assert shards[7] == shards[-1] == __import__("zlib").crc32(b"u7") % 8
    assert np.bincount(shards, minlength=8).min() > 150


# ---- The whole run: the columnar path gives the row path's output --------------------------------


@pytest.fixture(scope="module")
def mixed_logs(tmp_path_factory):
    """A JSON Lines file (plain), a CSV file (plain) and a gzip JSON Lines file with bad records,
    exact duplicates, same-timestamp events and one heavy user (u-heavy, 300 events)."""
    from tests.test_ingest_beam import write

    tmp = tmp_path_factory.mktemp("mixed")
    config = generator.GeneratorConfig(num_users=40, items_per_domain=10, mean_events_per_user=12, num_days=3, seed=11)
    rows = list(generator.LogGenerator(config).records())
    for r in rows:
        r[F.LOG_TS] = r[F.LOG_TS] // 3600 * 3600
    rng = np.random.default_rng(0)
    rows += [{"ts": 1_700_000_000 + int(t) * 600, "user_id": "u-heavy", "domain": "grocery", "item_id": f"g{t % 9}",
              "clicked": int(rng.random() < 0.4), "oracle_ctr": 0.4} for t in range(300)]
    rows += rows[:10]  # exact duplicates
    order = rng.permutation(len(rows))
    rows = [rows[i] for i in order]
    third = len(rows) // 3
    jsonl = [json.dumps(r) for r in rows[:third]]
    jsonl[5:5] = ["{broken", '{"ts": 1, "user_id": "x", "domain": "grocery", "item_id": "i", "clicked": 3}', ""]
    jsonl[60:60] = ['{"ts": "soon", "user_id": "x", "domain": "grocery", "item_id": "i", "clicked": 1}']
    csv = ["ts,user_id,domain,item_id,clicked,oracle_ctr"] + [
        ",".join(str(r[k]) for k in ("ts", "user_id", "domain", "item_id", "clicked", "oracle_ctr")) for r in rows[third:2 * third]]
    csv[40:40] = ["1,u1,grocery", '2,"u 1",grocery,g1,1,0.5']
    gz = [json.dumps(r) for r in rows[2 * third:]] + ['{"ts": 3, "user_id": "", "domain": "kitchen", "item_id": "k", "clicked": 0}']
    paths = [write(tmp / "a.jsonl", jsonl), write(tmp / "b.csv", csv), write(tmp / "c.jsonl.gz", gz, compress=True)]
    return tmp, paths


def row_path_reference(paths, contract):
    """Examples (as tuples) and dead letters of parse_lines + user_examples + to_tf_example."""
    from tests.test_ingest_beam import example_tuple

    results = []
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            results += list(R.parse_lines(f.readlines(), path, ParseOptions()))
    events = [r for r in results if isinstance(r, Impression)]
    examples = sorted(example_tuple(sequences.to_tf_example(x)) for x in reference_examples(events, contract))
    dead = sorted((d.source, d.line, d.reason, d.field, d.detail, d.raw) for d in results if isinstance(d, R.DeadLetter))
    return examples, dead, len(events) - len(set(events))


def test_columnar_run_gives_the_row_path_output(mixed_logs):
    import glob
    import os

    from tests.test_ingest_beam import read_dead_letters, read_examples, read_json

    tmp, paths = mixed_logs
    outputs = {}
    # One user shard and whole files, every user column-wise; then 3 user shards, the plain files
    # parsed in 2,000-byte shards, and u-heavy through the block stages; then the same with the
    # pieces through the shuffle instead of spilled to files.
    for name, shards, shard_bytes, heavy, spill in (("one", 1, bp.SHARD_BYTES, 10**9, True), ("split", 3, 2_000, 100, True),
                                                    ("shuffled", 3, 2_000, 100, False)):
        out = str(tmp / name)
        config = bp.IngestConfig(input_patterns=tuple(paths), history_length=4, domain_history_length=2,
                                 block_seconds=7200, heavy_user_events=heavy, user_shards=shards, shard_bytes=shard_bytes,
                                 max_bad_fraction=0.1, spill_pieces=spill)
        summary = bp.run(config, out)
        dead = [(d["source"], d["line"], d["reason"], d["field"], d["detail"], d["raw"]) for d in read_dead_letters(out)]
        outputs[name] = (summary, {s: read_examples(out, s) for s in (F.TRAIN_SPLIT, F.EVAL_SPLIT)}, sorted(dead),
                         {s: read_json(os.path.join(out, bp.STATS_DIR, f"{s}.json")) for s in (F.TRAIN_SPLIT, F.EVAL_SPLIT)})
    assert outputs["one"] == outputs["split"] == outputs["shuffled"]
    summary, examples, dead, stats = outputs["split"]
    expected_examples, expected_dead, duplicates = row_path_reference(paths, bp.read_contract(str(tmp / "split")))
    assert sorted(examples[F.TRAIN_SPLIT] + examples[F.EVAL_SPLIT]) == expected_examples
    assert dead == expected_dead and len(dead) == 5
    assert summary["duplicates_dropped"] == duplicates >= 10
    assert summary["records_read"] == len(expected_examples) + len(dead) + duplicates
    assert summary["files_read"] == 3
    assert stats[F.TRAIN_SPLIT]["rows"] + stats[F.EVAL_SPLIT]["rows"] == len(expected_examples)
    # The split run wrote a file per user shard and split, and u-heavy's examples with Beam's writer.
    files = sorted(os.path.basename(f) for f in glob.glob(os.path.join(bp.split_dir(str(tmp / "split"), F.TRAIN_SPLIT), "*")))
    assert [f for f in files if not f.startswith(bp.HEAVY_FILE_PREFIX)] == [
        f"data_tfrecord-{s:05d}-of-00003.gz" for s in range(3)]
    heavy_rows = [r for f in glob.glob(os.path.join(bp.split_dir(str(tmp / "split"), F.TRAIN_SPLIT), bp.HEAVY_FILE_PREFIX + "*"))
                  for r in tf.data.TFRecordDataset(f, compression_type="GZIP")]
    assert heavy_rows and all(tf.train.Example.FromString(r.numpy()).features.feature[F.USER_ID].bytes_list.value == [b"u-heavy"]
                              for r in heavy_rows)
    assert not os.path.exists(os.path.join(str(tmp / "split"), bp.TEMP_DIR))  # spilled pieces removed too


def _parse_outputs(path, spill_dir=None, shards=3):
    parse = bp._ParseShard(ParseOptions(), shards, spill_dir=spill_dir)
    return [x for x in parse.process(bp._Shard(path, 0, None)) if not isinstance(x, beam.pvalue.TaggedOutput)]


def test_spilled_pieces_are_references_to_the_same_bytes(mixed_logs, tmp_path):
    """With a spill directory the parse stage emits (shard, (path, offset, length)), one file for
    the block's pieces, and the bytes there are the pieces it emits without one."""
    _, paths = mixed_logs
    in_memory = _parse_outputs(paths[0])
    spilled = _parse_outputs(paths[0], str(tmp_path / "spill"))
    assert [shard for shard, _ in spilled] == [shard for shard, _ in in_memory] and len(spilled) == 3
    assert all(isinstance(ref, tuple) and len(ref) == 3 and isinstance(ref[0], str) for _, ref in spilled)
    assert len({ref[0] for _, ref in spilled}) == 1  # one file for the block
    assert bp._load_pieces([ref for _, ref in spilled]) == [data for _, data in in_memory]
    mixed = [in_memory[0][1], spilled[1][1], in_memory[2][1]]  # in-memory and spilled pieces mixed, order kept
    assert bp._load_pieces(mixed) == [data for _, data in in_memory]
    assert sum(ref[2] for _, ref in spilled) == os.path.getsize(spilled[0][1][0])


def test_a_truncated_spill_file_is_an_error_that_names_it(mixed_logs, tmp_path):
    _, paths = mixed_logs
    spilled = _parse_outputs(paths[0], str(tmp_path / "spill"))
    path, offset, length = spilled[-1][1]
    with open(path, "r+b") as f:
        f.truncate(offset + length - 1)
    with pytest.raises(IOError, match=r"pieces-.*\.arrows: the piece at byte \d+ has \d+ of its \d+ bytes"):
        bp._load_pieces([ref for _, ref in spilled])


def test_finish_removes_files_left_by_failed_attempts(tmp_path):
    import os

    temp = tmp_path / bp.TEMP_DIR
    temp.mkdir()
    (temp / "train-0-abc.gz").write_bytes(b"partial")
    summary = json.loads(bp._finish(str(tmp_path), [(F.TRAIN_SPLIT, {"rows": 3})], [("malformed", 1)], [2], 10, None,
                                    [("a", 4), ("a", 2)]))
    assert not os.path.exists(temp)
    assert summary["rows"] == {F.TRAIN_SPLIT: 3, F.EVAL_SPLIT: 0}
    assert (summary["records_read"], summary["files_read"], summary["good_records"], summary["bad_records"]) == (6, 1, 3, 1)
