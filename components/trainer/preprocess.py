"""Raw tf.Example features -> model inputs, inside the TensorFlow graph, for training input and
exported signatures alike.

Ids are hashed (`tf.strings.to_hash_bucket_fast`, FarmHash) into `buckets - 1` buckets, shifted by
one so that index 0 stays the padding id. Hashing needs no vocabulary artifact, so the exported
model is self-contained and an unseen id at serving time is just another bucket; collisions are
the price: with n items in B buckets a fraction of about 1 - exp(-n / B) of the items shares its
bucket with another (57% of Amazon food-kitchen's 28,095 items at B = 2^15). The Trainer sizes
B from the train split's distinct item ids (`distinct_item_ids`, `auto_item_buckets`) and reports
the collisions (`hashing_stats`).

With an item vocabulary (`InputConfig.item_vocabulary`, the train split's distinct ids) item ids
are looked up instead: the k-th id of the vocabulary is index k + 1, so no two known items share
a row, and the table needs n + 1 rows rather than 8n. Ids outside the vocabulary are hashed into
the rows after it (`item_indices`). The vocabulary is a lookup table inside the graph, saved with
the SavedModel, which stays self-contained.

Domains, few and known, are looked up in the contract's domain list; an unknown target domain is
an InvalidArgument error.
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf

from models.config import InputConfig
from xdctr import features as F


def hash_ids(ids: tf.Tensor, buckets: int) -> tf.Tensor:
    """String ids -> int32 indices in [1, buckets); the padding id maps to 0."""
    hashed = tf.strings.to_hash_bucket_fast(ids, buckets - 1) + 1
    return tf.cast(tf.where(tf.equal(ids, F.PAD_ID), tf.zeros_like(hashed), hashed), tf.int32)


def item_table(config: InputConfig):
    """The lookup table of `config.item_vocabulary` (id -> position), built once per vocabulary.

    Created eagerly (`tf.init_scope`) even when first asked for inside a traced function, so that
    tf.data pipelines and the export module share one table resource; an object that saves the
    table (the export module) must hold it as an attribute.
    """
    if not config.item_vocabulary:
        raise ValueError("`item_vocabulary` is empty: item ids are hashed, there is no table")
    return _vocabulary_table(config.item_vocabulary)


@functools.lru_cache(maxsize=None)
def _vocabulary_table(vocabulary: tuple):
    with tf.init_scope():
        keys = tf.constant(list(vocabulary), tf.string)
        values = tf.range(len(vocabulary), dtype=tf.int64)
        return tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(keys, values), default_value=-1)


def item_indices(ids: tf.Tensor, config: InputConfig) -> tf.Tensor:
    """String item ids -> int32 rows of the item table: hashed (`hash_ids`) without a vocabulary;
    with one, the k-th vocabulary id -> k + 1, other ids -> n + 1 + hash mod (item_buckets - n - 1)
    (the rows after the vocabulary); the padding id -> 0 either way."""
    if not config.item_vocabulary:
        return hash_ids(ids, config.item_buckets)
    n = len(config.item_vocabulary)
    position = item_table(config).lookup(ids)
    unknown = tf.strings.to_hash_bucket_fast(ids, config.item_buckets - n - 1) + n + 1
    index = tf.where(position >= 0, position + 1, unknown)
    return tf.cast(tf.where(tf.equal(ids, F.PAD_ID), tf.zeros_like(index), index), tf.int32)


ITEM_ID_FEATURES = (F.ITEM_ID, F.HISTORY_ITEM_IDS)  # every item a row names (the per-domain rows repeat these)


def distinct_item_ids(files, contract: F.Contract, batch_size: int = 8192) -> np.ndarray:
    """The distinct non-padding item ids of gzip TFRecords (targets and mixed histories), sorted bytes.

    One tf.data pass that parses only `ITEM_ID_FEATURES`; every history entry was the target of
    an earlier row, so this also covers the per-domain histories.
    """
    spec = contract.feature_spec()
    spec = {name: spec[name] for name in ITEM_ID_FEATURES}

    def ids(serialized):
        raw = tf.io.parse_example(serialized, spec)
        flat = tf.concat([tf.reshape(raw[name], [-1]) for name in ITEM_ID_FEATURES], axis=0)
        return tf.unique(flat).y

    ds = tf.data.TFRecordDataset(sorted(files), compression_type="GZIP").batch(batch_size)
    seen = set()
    for batch in ds.map(ids, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE):
        seen.update(batch.numpy().tolist())
    seen.discard(F.PAD_ID)
    return np.array(sorted(seen), dtype=object)


def domain_item_ids(files, contract: F.Contract, batch_size: int = 8192) -> dict:
    """{domain: sorted distinct non-padding target item ids (bytes)} of gzip TFRecords, one entry
    per contract domain (empty when a domain has no rows); targets of clicks and non-clicks alike."""
    spec = contract.feature_spec()
    spec = {name: spec[name] for name in (F.ITEM_ID, F.DOMAIN)}

    def pairs(serialized):
        raw = tf.io.parse_example(serialized, spec)
        return tf.unique(tf.strings.join([raw[F.DOMAIN], raw[F.ITEM_ID]], separator="\x1f")).y

    ds = tf.data.TFRecordDataset(sorted(files), compression_type="GZIP").batch(batch_size)
    seen = set()
    for batch in ds.map(pairs, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE):
        seen.update(batch.numpy().tolist())
    items = {domain: set() for domain in contract.domains}
    for pair in seen:
        domain, item = pair.split(b"\x1f", 1)
        if item != F.PAD_ID and domain.decode() in items:
            items[domain.decode()].add(item)
    return {domain: np.array(sorted(ids), dtype=object) for domain, ids in items.items()}


def auto_item_buckets(num_items: int, factor: int) -> int:
    """The smallest power of two >= factor * num_items + 1 (the padding row), at least 4."""
    if num_items < 0 or factor <= 0:
        raise ValueError(f"`num_items` must be >= 0 and `factor` positive. Received: num_items={num_items}, "
                         f"factor={factor}")
    return max(4, 1 << int(factor * num_items).bit_length())


def hashing_stats(item_ids, config: InputConfig) -> dict:
    """How the distinct `item_ids` (bytes) fall into the rows of `config`'s item table (its
    `item_buckets` hash buckets, or its vocabulary; see `item_indices`).

    Returns distinct_items, item_buckets, occupied_buckets; colliding_item_fraction (items that
    share their bucket with another item); merged_item_fraction (1 - occupied / items: the items
    the model cannot tell apart any more, as a share) and merged_bucket_fraction (occupied buckets
    holding more than one item).
    """
    item_ids = list(item_ids)
    n = len(item_ids)
    indices = item_indices(tf.constant(item_ids, tf.string), config).numpy() if n else np.zeros(0, np.int32)
    _, counts = np.unique(indices, return_counts=True)
    occupied = int(len(counts))
    return {
        "distinct_items": n, "item_buckets": int(config.item_buckets), "occupied_buckets": occupied,
        "item_vocabulary": len(config.item_vocabulary),
        "colliding_item_fraction": float(counts[counts > 1].sum() / n) if n else 0.0,
        "merged_item_fraction": float(1.0 - occupied / n) if n else 0.0,
        "merged_bucket_fraction": float((counts > 1).sum() / occupied) if occupied else 0.0,
    }


def domain_index(names: tf.Tensor, domains) -> tuple:
    """Domain names (any shape) -> (int32 index into `domains`, bool known); unknown -> 0."""
    vocabulary = tf.constant([d.encode() for d in domains])
    matches = tf.equal(tf.expand_dims(names, -1), vocabulary)  # (..., D)
    return tf.cast(tf.argmax(tf.cast(matches, tf.int32), axis=-1), tf.int32), tf.reduce_any(matches, axis=-1)


def time_gap_buckets(target_ts: tf.Tensor, history_ts: tf.Tensor) -> tf.Tensor:
    """(B,) and (B, L) epoch seconds -> (B, L) int32 log2 buckets of the gap in minutes; padding 0."""
    # floor(log2(g + 1)) >= k  <=>  g >= 2^k - 1  <=>  floor(g) >= 2^k - 1: exact in whole minutes,
    # where a float32 log2 misplaces gaps next to the bucket edges.
    gap_minutes = tf.maximum(tf.expand_dims(target_ts, -1) - history_ts, 0) // 60  # (B, L) int64
    edges = tf.constant([2**k - 1 for k in range(1, F.NUM_TIME_GAP_BUCKETS - 1)], gap_minutes.dtype)
    bucket = 1 + tf.reduce_sum(tf.cast(tf.expand_dims(gap_minutes, -1) >= edges, tf.int32), axis=-1)  # capped
    return tf.where(tf.equal(history_ts, 0), tf.zeros_like(bucket), bucket)


def contract_of(config: InputConfig) -> F.Contract:
    return F.Contract(config.domains, config.history_length, config.domain_history_length)


def parse(serialized: tf.Tensor, config: InputConfig) -> dict:
    """Serialized tf.Examples (batch,) -> raw feature tensors."""
    return tf.io.parse_example(serialized, contract_of(config).feature_spec())


def to_model_inputs(raw: dict, config: InputConfig) -> dict:
    """Raw features -> the model input dict (see `models/base.py` for shapes)."""
    domain, known = domain_index(raw[F.DOMAIN], config.domains)
    check = tf.debugging.assert_equal(
        known, True, message=f"unknown target domain; this model knows domains {list(config.domains)}"
    )
    with tf.control_dependencies([check]):
        domain = tf.identity(domain)
    history_domain, _ = domain_index(raw[F.HISTORY_DOMAINS], config.domains)
    return {
        F.USER_ID: hash_ids(raw[F.USER_ID], config.user_buckets),
        F.ITEM_ID: item_indices(raw[F.ITEM_ID], config),
        F.DOMAIN: domain,
        F.HISTORY_ITEM_IDS: item_indices(raw[F.HISTORY_ITEM_IDS], config),
        F.HISTORY_DOMAINS: history_domain,
        F.HISTORY_MASK: tf.not_equal(raw[F.HISTORY_ITEM_IDS], F.PAD_ID),
        F.HISTORY_TIME_GAPS: time_gap_buckets(raw[F.TIMESTAMP], raw[F.HISTORY_TIMESTAMPS]),
        F.DOMAIN_HISTORY_ITEM_IDS: item_indices(raw[F.DOMAIN_HISTORY_ITEM_IDS], config),
        F.DOMAIN_HISTORY_MASK: tf.not_equal(raw[F.DOMAIN_HISTORY_ITEM_IDS], F.PAD_ID),
        F.TARGET_DOMAIN_CLICKS: tf.cast(raw[F.TARGET_DOMAIN_CLICKS], tf.int32),
        F.OTHER_DOMAIN_CLICKS: tf.cast(raw[F.OTHER_DOMAIN_CLICKS], tf.int32),
    }


HOLDOUTS = ("all", "train", "validation")


def validation_cut(files, fraction: float, batch_size: int = 65536) -> int:
    """The impression time from which rows are held out for validation: the latest `fraction`.

    Rows with ts >= the cut are the validation rows (`in_validation`); the cut is the ts of the row
    at quantile 1 - `fraction` of the files' timestamps, so ties at the cut make the validation
    share a little larger. A time cut, like the ingestion's eval split, keeps the holdout free of
    leakage: a click enters only the histories of the same user's later rows, so no training row
    (ts < cut) shows a validation row's click. A holdout of random rows would: the click of a held-out
    row is in the histories of the user's later, trained-on rows, and a model that learns from
    history items (RecGURU's reconstruction, a next-item objective) sees the held-out labels.

    Reads only the timestamps, one pass; holds 8 bytes per row.

    Raises:
      ValueError: `fraction` outside (0, 1), no rows, or so few distinct times that nothing would
        be left to train on.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"`fraction` must be in (0, 1). Received: fraction={fraction}")
    spec = {F.TIMESTAMP: tf.io.FixedLenFeature([], tf.int64)}
    ds = tf.data.TFRecordDataset(sorted(files), compression_type="GZIP").batch(batch_size)
    ds = ds.map(lambda s: tf.io.parse_example(s, spec)[F.TIMESTAMP], num_parallel_calls=tf.data.AUTOTUNE)
    times = np.concatenate([np.zeros(0, np.int64)] + list(ds.as_numpy_iterator()))
    if not times.size:
        raise ValueError(f"no rows in {len(files)} train file(s): nothing to hold out for validation")
    cut = int(np.partition(times, int(times.size * (1 - fraction)))[int(times.size * (1 - fraction))])
    if cut <= int(times.min()):
        raise ValueError(f"the latest {fraction:.0%} of the train rows starts at the earliest ts ({cut}): "
                         f"a time holdout would leave no rows to train on ({times.size} rows)")
    return cut


def in_validation(raw: dict, cut: int) -> tf.Tensor:
    """(batch,) bool: the rows held out for validation, those at or after `cut` (`validation_cut`)."""
    return tf.greater_equal(raw[F.TIMESTAMP], tf.constant(cut, tf.int64))


SHUFFLE_BUFFER = 1 << 18  # serialized rows held to shuffle (~100 MB at ~400 bytes a row)


def dataset(file_pattern, config: InputConfig, batch_size: int, shuffle: bool = False, repeat: bool = False,
            seed: int = 0, only_domain: str = "", holdout: str = "all",
            validation_fraction: float = 0.1, validation_cut_ts: int | None = None, clicks_only: bool = False,
            shuffle_buffer: int = SHUFFLE_BUFFER, with_user_ids: bool = False) -> tf.data.Dataset:
    """Gzip TFRecords of tf.Examples -> (model inputs, label) batches.

    The ingestion writes each user's rows together, so `shuffle` has to mix far: the files are
    read in a shuffled order, interleaved row by row, through a `shuffle_buffer`-row buffer (the
    whole set when it is smaller). A 10,000-row buffer over one file at a time made batches of a
    few hundred users' consecutive clicks, and SASRec lost 0.03-0.04 HR@10 on food-kitchen's
    leave-one-out protocol to it (README, "Shuffling the train rows").

    `only_domain` keeps only rows whose target domain it names (single-domain baselines).
    `holdout` "train" drops, and "validation" keeps only, the latest `validation_fraction` of the
    rows: those at or after `validation_cut_ts` (computed from the files by `validation_cut` when
    not given; callers that build both datasets compute it once). `clicks_only` keeps only rows
    labelled 1 (the sampled-softmax objective draws its own negatives). Batches of the train
    holdout are smaller than `batch_size`; the validation holdout and click rows are batched again.
    `with_user_ids` adds each row's raw (unhashed) user id as a third element, for per-user
    metrics such as the validation GAUC (`validation.py`).
    """
    if holdout not in HOLDOUTS:
        raise ValueError(f"`holdout` must be one of {HOLDOUTS}. Received: holdout={holdout!r}")
    if only_domain and only_domain not in config.domains:
        raise ValueError(f"`only_domain` must be one of {list(config.domains)}. Received: only_domain={only_domain!r}")
    files = tf.io.gfile.glob(file_pattern) if isinstance(file_pattern, str) else list(file_pattern)
    if not files:
        raise ValueError(f"no TFRecord files match {file_pattern!r}")
    if holdout != "all" and validation_cut_ts is None:
        validation_cut_ts = validation_cut(files, validation_fraction)
    if shuffle:
        if shuffle_buffer < 1:
            raise ValueError(f"`shuffle_buffer` must be positive. Received: shuffle_buffer={shuffle_buffer}")
        ds = tf.data.Dataset.from_tensor_slices(sorted(files)).shuffle(len(files), seed=seed,
                                                                      reshuffle_each_iteration=True)
        ds = ds.interleave(lambda path: tf.data.TFRecordDataset(path, compression_type="GZIP"),
                           cycle_length=len(files), block_length=1)
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    else:
        ds = tf.data.TFRecordDataset(sorted(files), compression_type="GZIP")
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size)

    def split(serialized):
        raw = parse(serialized, config)
        keep = tf.ones_like(raw[F.LABEL], dtype=tf.bool)
        if only_domain:
            keep = tf.logical_and(keep, tf.equal(raw[F.DOMAIN], only_domain.encode()))
        if holdout != "all":
            validation = in_validation(raw, validation_cut_ts)
            keep = tf.logical_and(keep, validation if holdout == "validation" else tf.logical_not(validation))
        if clicks_only:
            keep = tf.logical_and(keep, tf.equal(raw[F.LABEL], 1))
        if only_domain or holdout != "all" or clicks_only:
            raw = {name: tf.boolean_mask(value, keep) for name, value in raw.items()}
        batch = (to_model_inputs(raw, config), tf.cast(raw[F.LABEL], tf.float32))
        return batch + (raw[F.USER_ID],) if with_user_ids else batch

    ds = ds.map(split, num_parallel_calls=tf.data.AUTOTUNE)
    if clicks_only or holdout == "validation":
        # Full batches again: a batch of one user's early rows holds no validation row at all.
        ds = ds.unbatch().batch(batch_size)
    return ds.prefetch(tf.data.AUTOTUNE)


def count_clicks(files, batch_size: int = 8192) -> int:
    """Rows labelled 1 in gzip TFRecords (one tf.data pass that parses only the label)."""
    spec = {F.LABEL: tf.io.FixedLenFeature([], tf.int64)}
    ds = tf.data.TFRecordDataset(sorted(files), compression_type="GZIP").batch(batch_size)
    counts = ds.map(lambda s: tf.reduce_sum(tf.cast(tf.equal(tf.io.parse_example(s, spec)[F.LABEL], 1), tf.int64)),
                    num_parallel_calls=tf.data.AUTOTUNE)
    return int(sum(int(c) for c in counts.as_numpy_iterator()))
