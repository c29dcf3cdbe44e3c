"""Raw tf.Example features -> model inputs: id hashing, domain lookup, time-gap buckets, shapes."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from components.ingest import sequences
from components.ingest.records import Impression
from components.trainer import preprocess
from models.config import InputConfig
from xdctr import features as F

PAD = F.PAD_ID
T = 1_704_067_200  # 2024-01-01T00:00:00Z
MINUTE = 60


def test_hash_ids_keeps_padding_at_zero():
    ids = tf.constant([[b"", b"a", b"b", b"a"], [b"b", b"", b"", b"c"]])
    out = preprocess.hash_ids(ids, 1000)
    assert out.dtype == tf.int32 and out.shape == (2, 4)
    out = out.numpy()
    assert out[0, 0] == out[1, 1] == out[1, 2] == 0
    # Same id, same index, wherever it is; real ids land in [1, buckets).
    assert out[0, 1] == out[0, 3] and out[0, 2] == out[1, 0]
    assert np.all((out[out != 0] >= 1) & (out[out != 0] < 1000))


def test_hash_ids_with_two_buckets_maps_every_real_id_to_one():
    # buckets - 1 = 1 real bucket: the smallest config still separates padding from ids.
    out = preprocess.hash_ids(tf.constant([b"", b"x", b"y"]), 2).numpy()
    assert out.tolist() == [0, 1, 1]


def test_domain_index_exact_indices_and_known_flags():
    domains = ("grocery", "kitchen", "toys")
    names = tf.constant([[b"kitchen", b"", b"toys"], [b"grocery", b"books", b"kitchen"]])
    index, known = preprocess.domain_index(names, domains)
    assert index.dtype == tf.int32 and known.dtype == tf.bool
    # Unknown names (padding, "books") map to 0 and are flagged unknown.
    assert index.numpy().tolist() == [[1, 0, 2], [0, 0, 1]]
    assert known.numpy().tolist() == [[True, False, True], [True, False, True]]


def test_time_gap_buckets_by_hand():
    # bucket = floor(log2(gap_minutes + 1)) + 1 on whole minutes, capped at NUM_TIME_GAP_BUCKETS - 1
    # = 23; padding (ts 0) is bucket 0.
    history = tf.constant(
        [
            [
                0,  # padding -> 0
                T,  # 0 min: floor(log2 1) + 1 = 1
                T - 1 * MINUTE,  # 1 min: floor(log2 2) + 1 = 2
                T - 3 * MINUTE,  # 3 min: floor(log2 4) + 1 = 3
                T - 7 * MINUTE,  # 7 min: floor(log2 8) + 1 = 4 (a bucket edge)
                T - 60 * MINUTE,  # 60 min: floor(log2 61) + 1 = 5 + 1 = 6
            ],
            [
                T - 59,  # 59 s is 0 whole minutes -> 1
                T - 2 * MINUTE,  # 2 min: floor(log2 3) + 1 = 2
                T - (2**15 - 1) * MINUTE,  # 32767 min: log2 32768 = 15 exactly -> 16
                T - (2**15 - 2) * MINUTE,  # 32766 min: log2 32767 < 15 -> 15
                T - 10**9,  # 16,666,666 min: floor(log2) + 1 = 24 -> capped at 23
                T + MINUTE,  # a "history" click after the target: the gap is clipped to 0 -> 1
            ],
        ],
        tf.int64,
    )
    buckets = preprocess.time_gap_buckets(tf.constant([T, T], tf.int64), history)
    assert buckets.dtype == tf.int32 and buckets.shape == (2, 6)
    assert buckets.numpy().tolist() == [[0, 1, 2, 3, 4, 6], [1, 2, 16, 15, 23, 1]]
    assert F.NUM_TIME_GAP_BUCKETS - 1 == 23


def test_time_gap_buckets_edges_are_exact():
    # Every edge 2^k - 1 minutes starts bucket k + 1 and one minute less is still bucket k.
    k = np.arange(1, F.NUM_TIME_GAP_BUCKETS - 1)
    gaps = np.stack([(2**k - 1) * MINUTE, (2**k - 2) * MINUTE])  # (2, 22)
    buckets = preprocess.time_gap_buckets(tf.constant([T, T], tf.int64), tf.constant(T - gaps, tf.int64)).numpy()
    assert buckets[0].tolist() == (k + 1).tolist()
    assert buckets[1].tolist() == k.tolist()


# One user in domains A and B; history_length 3, domain_history_length 2.
CONFIG = InputConfig(domains=("A", "B"), history_length=3, domain_history_length=2, item_buckets=101, user_buckets=11)
EVENTS = [
    Impression(T, "u", "A", "a1", 1),
    Impression(T + 2 * MINUTE, "u", "B", "b1", 1),
    Impression(T + 5 * MINUTE, "u", "B", "b2", 0),
]


def _serialized(events, config=CONFIG):
    contract = preprocess.contract_of(config)
    return [sequences.to_tf_example(ex).SerializeToString() for ex in sequences.user_examples("u", events, contract)]


def test_to_model_inputs_shapes_dtypes_and_values():
    first, _, last = _serialized(EVENTS)
    batch = tf.constant([last, first])  # ts T+5min in B with 2 earlier clicks; ts T with none
    raw = preprocess.parse(batch, CONFIG)
    assert raw[F.DOMAIN_HISTORY_ITEM_IDS].shape == (2, 2, 2)  # (batch, num_domains, domain_history_length)
    inputs = preprocess.to_model_inputs(raw, CONFIG)
    expected = {  # name: (shape, dtype)
        F.USER_ID: ((2,), tf.int32),
        F.ITEM_ID: ((2,), tf.int32),
        F.DOMAIN: ((2,), tf.int32),
        F.HISTORY_ITEM_IDS: ((2, 3), tf.int32),
        F.HISTORY_DOMAINS: ((2, 3), tf.int32),
        F.HISTORY_MASK: ((2, 3), tf.bool),
        F.HISTORY_TIME_GAPS: ((2, 3), tf.int32),
        F.DOMAIN_HISTORY_ITEM_IDS: ((2, 2, 2), tf.int32),
        F.DOMAIN_HISTORY_MASK: ((2, 2, 2), tf.bool),
        F.TARGET_DOMAIN_CLICKS: ((2,), tf.int32),
        F.OTHER_DOMAIN_CLICKS: ((2,), tf.int32),
    }
    assert {name: (tuple(t.shape), t.dtype) for name, t in inputs.items()} == expected
    values = {name: t.numpy().tolist() for name, t in inputs.items()}
    assert values[F.DOMAIN] == [1, 0]
    # Row 0: mixed history [PAD, a1 (A, 5 min before), b1 (B, 3 min before)].
    assert values[F.HISTORY_MASK] == [[False, True, True], [False, False, False]]
    assert values[F.HISTORY_DOMAINS] == [[0, 0, 1], [0, 0, 0]]
    assert values[F.HISTORY_TIME_GAPS] == [[0, 3, 3], [0, 0, 0]]  # 5 and 3 min: floor(log2 6), floor(log2 4) + 1
    # Per-domain rows [A: PAD, a1], [B: PAD, b1]; the first example has none.
    assert values[F.DOMAIN_HISTORY_MASK] == [[[False, True], [False, True]], [[False, False], [False, False]]]
    assert values[F.TARGET_DOMAIN_CLICKS] == [1, 0] and values[F.OTHER_DOMAIN_CLICKS] == [1, 0]
    # Ids are 0 exactly where they are padding, and hashed the same in both histories.
    for ids, mask in ((F.HISTORY_ITEM_IDS, F.HISTORY_MASK), (F.DOMAIN_HISTORY_ITEM_IDS, F.DOMAIN_HISTORY_MASK)):
        np.testing.assert_array_equal(inputs[ids].numpy() != 0, inputs[mask].numpy())
    assert values[F.HISTORY_ITEM_IDS][0][1:] == [values[F.DOMAIN_HISTORY_ITEM_IDS][0][0][1],
                                                  values[F.DOMAIN_HISTORY_ITEM_IDS][0][1][1]]
    assert values[F.USER_ID][0] == values[F.USER_ID][1] and 1 <= values[F.USER_ID][0] < CONFIG.user_buckets


def test_unknown_target_domain_is_an_invalid_argument():
    serialized = tf.constant(_serialized([Impression(T, "u", "C", "c1", 0)]))  # C is not in ("A", "B")
    raw = preprocess.parse(serialized, CONFIG)
    with pytest.raises(tf.errors.InvalidArgumentError, match="unknown target domain"):
        preprocess.to_model_inputs(raw, CONFIG)
    # The check is part of the graph too (training input and exported signatures).
    in_graph = tf.function(lambda s: preprocess.to_model_inputs(preprocess.parse(s, CONFIG), CONFIG))
    with pytest.raises(tf.errors.InvalidArgumentError, match="unknown target domain"):
        in_graph(serialized)


# --- item hashing: sizing and collisions -------------------------------------------------------


def test_distinct_item_ids_of_targets_and_histories(tmp_path):
    path = str(tmp_path / "part.gz")
    events = EVENTS + [Impression(T + 9 * MINUTE, "v", "B", "b7", 0)]
    with tf.io.TFRecordWriter(path, options="GZIP") as writer:
        for serialized in _serialized(events):
            writer.write(serialized)
    ids = preprocess.distinct_item_ids([path], preprocess.contract_of(CONFIG), batch_size=2)
    assert ids.tolist() == sorted({e.item_id.encode() for e in events})  # no padding id


def test_auto_item_buckets_is_the_next_power_of_two_above_factor_times_items():
    # n = 4, factor 2: 8 real buckets + the padding row -> 16; n = 3: 6 + 1 -> 8; n = 0 -> the minimum 4.
    assert [preprocess.auto_item_buckets(n, 2) for n in (4, 3, 0)] == [16, 8, 4]
    assert preprocess.auto_item_buckets(25_836, 8) == 1 << 18  # food-kitchen's train items
    with pytest.raises(ValueError, match="factor=0"):
        preprocess.auto_item_buckets(10, 0)


def _buckets(n, vocabulary=()):
    return dataclasses.replace(CONFIG, item_buckets=n, item_vocabulary=tuple(vocabulary))


def test_hashing_stats_by_hand():
    ids = [b"x", b"y", b"z"]
    # 2 buckets = padding + one real bucket: all 3 items in it; 2 of 3 merged away.
    assert preprocess.hashing_stats(ids, _buckets(2)) == {
        "distinct_items": 3, "item_buckets": 2, "occupied_buckets": 1, "colliding_item_fraction": 1.0,
        "merged_item_fraction": pytest.approx(2 / 3), "merged_bucket_fraction": 1.0, "item_vocabulary": 0}
    # Many buckets: these three land apart.
    assert len(set(preprocess.hash_ids(tf.constant(ids), 1 << 20).numpy().tolist())) == 3
    stats = preprocess.hashing_stats(ids, _buckets(1 << 20))
    assert (stats["occupied_buckets"], stats["colliding_item_fraction"], stats["merged_bucket_fraction"]) == (3, 0.0, 0.0)
    # Two of four items sharing a bucket: find a pair that collides in 5 buckets (4 real).
    pool = [f"i{k}".encode() for k in range(6)]
    index = preprocess.hash_ids(tf.constant(pool), 5).numpy().tolist()
    pair = next((a, b) for a in range(6) for b in range(a + 1, 6) if index[a] == index[b])
    others = [k for k in range(6) if index[k] != index[pair[0]]]
    singles = [others[0]] + [k for k in others[1:] if index[k] != index[others[0]]][:1]
    chosen = [pool[k] for k in (*pair, *singles)]  # 4 items, 3 buckets: one pair, two alone
    stats = preprocess.hashing_stats(chosen, _buckets(5))
    assert (stats["distinct_items"], stats["occupied_buckets"]) == (4, 3)
    assert stats["colliding_item_fraction"] == pytest.approx(2 / 4)
    assert stats["merged_item_fraction"] == pytest.approx(1 / 4)
    assert stats["merged_bucket_fraction"] == pytest.approx(1 / 3)


def _user_sorted_file(path, prefix, users, rows_per_user):
    """A gzip TFRecord written as the ingestion writes it: each user's rows together; every row's
    target item is unique (`<prefix>-<user>-<row>`)."""
    contract = preprocess.contract_of(CONFIG)
    names = []
    with tf.io.TFRecordWriter(path, options="GZIP") as writer:
        for user in range(users):
            events = [Impression(T + r * MINUTE, f"{prefix}{user}", "A", f"{prefix}-{user}-{r}", r % 2)
                      for r in range(rows_per_user)]
            for example in sequences.user_examples(f"{prefix}{user}", events, contract):
                writer.write(sequences.to_tf_example(example).SerializeToString())
            names += [(prefix, user) for _ in events]
    return names


def test_shuffled_batches_mix_users_from_every_file_and_from_far_apart(tmp_path):
    """The ingestion writes users' rows together; a shuffled batch must not be a few neighbouring
    users of one file (a 10,000-row buffer over the files in order gave exactly that)."""
    config = InputConfig(domains=("A", "B"), history_length=3, domain_history_length=2, item_buckets=1 << 22,
                         user_buckets=11)
    users, per_user = 1500, 10
    files = [str(tmp_path / f"part-{i}.gz") for i in range(2)]
    owners = {}
    for i, path in enumerate(files):
        for row, (prefix, user) in enumerate(_user_sorted_file(path, f"f{i}", users, per_user)):
            owners[f"{prefix}-{user}-{row % per_user}"] = (i, user)
    names = list(owners)
    hashed = preprocess.hash_ids(tf.constant(names), config.item_buckets).numpy()
    by_bucket = {int(h): owners[n] for h, n in zip(hashed, names)}
    x, _ = next(iter(preprocess.dataset(files, config, 512, shuffle=True, seed=0)))
    rows = [by_bucket[int(b)] for b in x[F.ITEM_ID].numpy()]
    second_file = np.mean([f == 1 for f, _ in rows])
    last_fifth = np.mean([u >= users * 4 // 5 for _, u in rows])
    assert 0.35 < second_file < 0.65, second_file  # both files, about equally
    assert 0.1 < last_fifth < 0.3, last_fifth  # about a fifth of the rows come from each file's last fifth of users
    assert len({r for r in rows}) > 300  # hundreds of users in one batch of 512 rows
    with pytest.raises(ValueError, match="shuffle_buffer"):
        preprocess.dataset(files, config, 512, shuffle=True, shuffle_buffer=0)


def test_item_vocabulary_looks_its_ids_up_and_hashes_the_others_into_the_rows_after_it():
    config = _buckets(8, ["x", "y", "z"])  # rows: 0 padding, 1-3 the vocabulary, 4-7 other ids
    ids = tf.constant([[b"y", b"x", b"z"], [F.PAD_ID, b"q", b"w"]])
    expected_other = (tf.strings.to_hash_bucket_fast([b"q", b"w"], 4) + 4).numpy().tolist()
    assert preprocess.item_indices(ids, config).numpy().tolist() == [[2, 1, 3], [0, *expected_other]]
    assert all(4 <= i <= 7 for i in expected_other)
    # The same inside a tf.data pipeline (a traced function), through the one cached table.
    mapped = tf.data.Dataset.from_tensor_slices(ids).map(lambda row: preprocess.item_indices(row, config))
    assert [row.numpy().tolist() for row in mapped] == [[2, 1, 3], [0, *expected_other]]
    assert preprocess.item_table(config) is preprocess.item_table(config)
    # Without a vocabulary nothing changes: the ids are hashed.
    np.testing.assert_array_equal(preprocess.item_indices(ids, _buckets(8)), preprocess.hash_ids(ids, 8))
    # No two vocabulary ids share a row, whatever the table's size.
    stats = preprocess.hashing_stats([b"x", b"y", b"z"], config)
    assert (stats["occupied_buckets"], stats["colliding_item_fraction"], stats["item_vocabulary"]) == (3, 0.0, 3)


def test_item_vocabulary_needs_room_for_other_ids_and_no_repeats():
    with pytest.raises(ValueError, match=r"item_buckets` must be >= len\(item_vocabulary\) \+ 2 = 5"):
        _buckets(4, ["x", "y", "z"])
    with pytest.raises(ValueError, match="must not repeat"):
        _buckets(9, ["x", "y", "x"])
    with pytest.raises(ValueError, match="item_vocabulary` is empty"):
        preprocess.item_table(_buckets(8))
    assert "item_vocabulary" not in repr(_buckets(8, ["x"]))  # long lists stay out of logs
