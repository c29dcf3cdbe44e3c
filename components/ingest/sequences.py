"""Per-user, time-ordered examples with leakage-free history features.

Order of events: by timestamp; events that share a timestamp are ordered by (domain, item_id,
clicked, oracle_ctr) only to make the output deterministic, and they never see each other: a history feature
only ever contains clicks with a strictly earlier timestamp. The target is therefore never in its
own history unless the user clicked the same item at an earlier time.

Memory: a user's timeline can be cut into blocks of time. `UserState` holds only what the
features need (the last L mixed clicks, the last Ld clicks per domain, click counts), and the
state after a block depends only on the state before it and the block's own `UserState`
(`absorb`), so each block is processed on its own once the states of earlier blocks are summed up.
"""

from __future__ import annotations

import collections
import itertools
from typing import Iterable, Iterator, NamedTuple, Optional

import numpy as np

from xdctr import features as F

from components.ingest.records import Impression


def event_order(event: Impression):
    return (event.ts, event.domain, event.item_id, event.clicked, -1.0 if event.oracle_ctr is None else event.oracle_ctr)


class UserState:
    """What the history features of a user's next event depend on.

    Attributes:
      mixed: deque of (item_id, domain, ts) of the last `history_length` clicks, oldest first.
      per_domain: {domain: deque of (item_id, ts)} of the last `domain_history_length` clicks.
      clicks: Counter of clicks per domain (all of them, not only the kept ones).
    """

    def __init__(self, contract: F.Contract):
        self.contract = contract
        self.mixed = collections.deque(maxlen=contract.history_length)
        self.per_domain = {d: collections.deque(maxlen=contract.domain_history_length) for d in contract.domains}
        self.clicks = collections.Counter()

    def add_click(self, event: Impression) -> None:
        self.mixed.append((event.item_id, event.domain, event.ts))
        self.per_domain.setdefault(
            event.domain, collections.deque(maxlen=self.contract.domain_history_length)
        ).append((event.item_id, event.ts))
        self.clicks[event.domain] += 1

    def absorb(self, later: "UserState") -> None:
        """Appends a later block's state: the result equals adding all its clicks one by one."""
        self.mixed.extend(later.mixed)
        for domain, entries in later.per_domain.items():
            self.per_domain.setdefault(domain, collections.deque(maxlen=self.contract.domain_history_length)).extend(entries)
        self.clicks.update(later.clicks)

    def copy(self) -> "UserState":
        state = UserState(self.contract)
        state.absorb(self)
        return state

    def __eq__(self, other):
        return (isinstance(other, UserState) and self.contract == other.contract and list(self.mixed) == list(other.mixed)
                and {d: list(v) for d, v in self.per_domain.items() if v} == {d: list(v) for d, v in other.per_domain.items() if v}
                and self.clicks == other.clicks)

    def features(self) -> dict:
        """History features for an event that comes after every click absorbed so far."""
        c = self.contract
        pad = c.history_length - len(self.mixed)
        domain_items, domain_lengths = [], []
        for domain in c.domains:
            entries = self.per_domain[domain]
            domain_items.extend([F.PAD_ID] * (c.domain_history_length - len(entries)) + [i.encode() for i, _ in entries])
            domain_lengths.append(len(entries))
        return {
            F.HISTORY_ITEM_IDS: [F.PAD_ID] * pad + [item.encode() for item, _, _ in self.mixed],
            F.HISTORY_DOMAINS: [F.PAD_ID] * pad + [domain.encode() for _, domain, _ in self.mixed],
            F.HISTORY_TIMESTAMPS: [0] * pad + [ts for _, _, ts in self.mixed],
            F.HISTORY_LENGTH: len(self.mixed),
            F.DOMAIN_HISTORY_ITEM_IDS: domain_items,
            F.DOMAIN_HISTORY_LENGTHS: domain_lengths,
        }


def block_state(events: Iterable[Impression], contract: F.Contract) -> UserState:
    """The state built from one block's events alone (to be absorbed by later blocks)."""
    state = UserState(contract)
    for event in sorted(events, key=event_order):
        if event.clicked:
            state.add_click(event)
    return state


def user_examples(user_id: str, events: Iterable[Impression], contract: F.Contract,
                  state: Optional[UserState] = None) -> Iterator[dict]:
    """Yields one example dict (feature name -> Python value) per impression of one user.

    `state` is the user's state before the first of `events` (a fresh one when None); it is
    advanced in place.
    """
    state = state if state is not None else UserState(contract)
    total_clicks = sum(state.clicks.values())
    for _, same_ts in itertools.groupby(sorted(events, key=event_order), key=lambda e: e.ts):
        same_ts = list(same_ts)
        history = state.features()
        for event in same_ts:
            target_clicks = state.clicks[event.domain]
            example = {
                F.USER_ID: user_id.encode(),
                F.ITEM_ID: event.item_id.encode(),
                F.DOMAIN: event.domain.encode(),
                F.TIMESTAMP: event.ts,
                **history,
                F.TARGET_DOMAIN_CLICKS: target_clicks,
                F.OTHER_DOMAIN_CLICKS: total_clicks - target_clicks,
                F.LABEL: event.clicked,
                F.COLD_START: int(target_clicks == 0 and total_clicks > 0),
                F.ACTIVITY_BUCKET: F.activity_bucket(total_clicks).encode(),
            }
            if event.oracle_ctr is not None:
                example[F.ORACLE_CTR] = event.oracle_ctr
            yield example
        for event in same_ts:
            if event.clicked:
                state.add_click(event)
                total_clicks += 1


def to_tf_example(example: dict):
    """Example dict -> `tf.train.Example` (lists become repeated values, scalars one value)."""
    from tensorflow.core.example import example_pb2

    message = example_pb2.Example()
    features = message.features.feature
    for name, value in example.items():
        values = value if isinstance(value, list) else [value]
        if not values:
            features[name].SetInParent()
        elif isinstance(values[0], bytes):
            features[name].bytes_list.value.extend(values)
        elif isinstance(values[0], float):
            features[name].float_list.value.extend(values)
        else:
            features[name].int64_list.value.extend(values)
    return message


def serialize_example(example: dict) -> bytes:
    """Example dict -> serialized tf.Example (filling the message in place: 2.5x faster than
    building Feature objects, which led the ingestion's profile)."""
    return to_tf_example(example).SerializeToString()


# ---- Columnar: the same examples for a block of whole users at once ------------------------------
#
# `columnar_examples` computes every feature of `user_examples` with numpy over a table of events
# sorted by (user, ts, domain, item_id, clicked, oracle_ctr), and `encode_examples` writes the
# tf.Examples' wire format directly from those arrays (the bytes of `SerializeToString(
# deterministic=True)`), so no Python object is made per event or per feature value.


class ExampleColumns(NamedTuple):
    """The features of n examples as arrays; ids are codes into the vocabularies.

    The history features depend only on the user's clicks before the event's timestamp, so they
    are kept once per history state (a user and a number of earlier clicks): events between two
    clicks of a user share one.

    Attributes:
      users, items: vocabularies (bytes); `items[-1]` is the padding id F.PAD_ID.
      user, item, domain: (n,) codes (domain: index into contract.domains).
      ts, label, target_clicks, other_clicks, cold_start, activity: (n,) ints (activity: index
        into F.ACTIVITY_BUCKETS).
      oracle: (n,) float64, NaN where `has_oracle` is False.
      state: (n,) the event's history state, a row of the arrays below.
      hist_items, hist_domains (domain code, D = padding), hist_ts: (S, L); hist_length: (S,).
      domain_hist_items: (S, D * Ld), the (D, Ld) matrix row-major; domain_hist_lengths: (S, D).
    """

    users: list
    items: list
    user: np.ndarray
    item: np.ndarray
    domain: np.ndarray
    ts: np.ndarray
    label: np.ndarray
    target_clicks: np.ndarray
    other_clicks: np.ndarray
    cold_start: np.ndarray
    activity: np.ndarray
    oracle: np.ndarray
    has_oracle: np.ndarray
    state: np.ndarray
    hist_items: np.ndarray
    hist_domains: np.ndarray
    hist_ts: np.ndarray
    hist_length: np.ndarray
    domain_hist_items: np.ndarray
    domain_hist_lengths: np.ndarray

    EVENT_FIELDS = ("user", "item", "domain", "ts", "label", "target_clicks", "other_clicks", "cold_start", "activity",
                    "oracle", "has_oracle", "state")

    @property
    def size(self) -> int:
        """The number of examples (len() stays the tuple's, which NamedTuple relies on)."""
        return len(self.ts)

    def take(self, rows: np.ndarray) -> "ExampleColumns":
        """The examples at `rows` (vocabularies and history states unchanged)."""
        return self._replace(**{name: getattr(self, name)[rows] for name in self.EVENT_FIELDS})

    def event_hist_length(self) -> np.ndarray:
        return self.hist_length[self.state]

    def to_dicts(self, contract: F.Contract) -> Iterator[dict]:
        """The example dicts of `user_examples`, for tests and the reference path."""
        domains = [d.encode() for d in contract.domains] + [F.PAD_ID]
        for i in range(self.size):
            s = self.state[i]
            example = {
                F.USER_ID: self.users[self.user[i]], F.ITEM_ID: self.items[self.item[i]],
                F.DOMAIN: domains[self.domain[i]], F.TIMESTAMP: int(self.ts[i]),
                F.HISTORY_ITEM_IDS: [self.items[c] for c in self.hist_items[s]],
                F.HISTORY_DOMAINS: [domains[c] for c in self.hist_domains[s]],
                F.HISTORY_TIMESTAMPS: self.hist_ts[s].tolist(), F.HISTORY_LENGTH: int(self.hist_length[s]),
                F.DOMAIN_HISTORY_ITEM_IDS: [self.items[c] for c in self.domain_hist_items[s]],
                F.DOMAIN_HISTORY_LENGTHS: self.domain_hist_lengths[s].tolist(),
                F.TARGET_DOMAIN_CLICKS: int(self.target_clicks[i]), F.OTHER_DOMAIN_CLICKS: int(self.other_clicks[i]),
                F.LABEL: int(self.label[i]), F.COLD_START: int(self.cold_start[i]),
                F.ACTIVITY_BUCKET: F.ACTIVITY_BUCKETS[self.activity[i]][1].encode(),
            }
            if self.has_oracle[i]:
                example[F.ORACLE_CTR] = float(self.oracle[i])
            yield example


def sort_and_dedupe(table):
    """Events (records.event_schema()) -> (sorted by user, then `event_order`, without exact duplicates; duplicates dropped).

    Events without an oracle_ctr come before those with one of the same other fields, so that
    exact duplicates are always neighbours.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    oracle = table.column(F.LOG_ORACLE_CTR)
    keyed = table.append_column("_has_oracle", pc.is_valid(oracle)).append_column("_oracle", pc.fill_null(oracle, -1.0))
    keys = [F.LOG_USER_ID, F.LOG_TS, F.LOG_DOMAIN, F.LOG_ITEM_ID, F.LOG_CLICKED, "_has_oracle", "_oracle"]
    table = table.take(pc.sort_indices(keyed, sort_keys=[(k, "ascending") for k in keys]))
    n = table.num_rows
    if n < 2:
        return table, 0
    same = np.ones(n - 1, bool)
    for field in (F.LOG_USER_ID, F.LOG_TS, F.LOG_DOMAIN, F.LOG_ITEM_ID, F.LOG_CLICKED):
        column = table.column(field)
        same &= pc.equal(column.slice(1), column.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    oracle = table.column(F.LOG_ORACLE_CTR)
    valid = oracle.is_valid().to_numpy(zero_copy_only=False)
    values = oracle.fill_null(0.0).to_numpy()
    same &= (~valid[1:] & ~valid[:-1]) | (valid[1:] & valid[:-1] & (values[1:] == values[:-1]))
    keep = np.concatenate([[True], ~same])
    return table.filter(pa.array(keep)), int(n - keep.sum())


def _run_starts(new_run: np.ndarray) -> np.ndarray:
    """For each position, the index where its run (a stretch without a True of `new_run`) starts."""
    return np.maximum.accumulate(np.where(new_run, np.arange(len(new_run)), 0))


def _last_clicks(clicks: np.ndarray, group_start: np.ndarray, user_start: np.ndarray, length: int):
    """The last `length` clicks (event indices) strictly before each event's timestamp, by its user.

    Returns (indices (n, length), valid (n, length), count (n,)): left-padded like the histories,
    most recent last; `count` is all the earlier clicks, not only the kept ones.
    """
    before = np.concatenate([[0], np.cumsum(clicks)])  # before[i]: clicks at positions < i
    positions = np.flatnonzero(clicks)
    first, stop = before[user_start], before[group_start]  # the user's earlier clicks are ordinals [first, stop)
    ordinals = stop[:, None] - length + np.arange(length)[None, :]
    valid = ordinals >= first[:, None]
    indices = positions[np.where(valid, ordinals, 0)] if len(positions) else np.zeros(ordinals.shape, np.int64)
    return indices, valid, stop - first


def columnar_examples(table, contract: F.Contract) -> ExampleColumns:
    """The examples of `user_examples` for every user of `table`, computed column-wise.

    `table`: a pyarrow table of events (records.event_schema()) holding each of its users' whole
    (deduplicated) timeline, sorted by `sort_and_dedupe`. Same-timestamp events share their
    history: every feature counts only clicks at strictly earlier timestamps.
    """
    import pyarrow.compute as pc

    user_codes = pc.dictionary_encode(table.column(F.LOG_USER_ID)).combine_chunks()
    item_codes = pc.dictionary_encode(table.column(F.LOG_ITEM_ID)).combine_chunks()
    domain_index = {d: i for i, d in enumerate(contract.domains)}
    domain_codes = pc.dictionary_encode(table.column(F.LOG_DOMAIN)).combine_chunks()
    unknown = [d for d in domain_codes.dictionary.to_pylist() if d not in domain_index]
    if unknown:
        raise ValueError(f"events of domains {unknown} are not in the contract's domains {list(contract.domains)}")
    to_contract = np.array([domain_index[d] for d in domain_codes.dictionary.to_pylist()], np.int64)

    user = user_codes.indices.to_numpy().astype(np.int64)
    item = item_codes.indices.to_numpy().astype(np.int64)
    domain = to_contract[domain_codes.indices.to_numpy()] if len(to_contract) else np.zeros(0, np.int64)
    ts = table.column(F.LOG_TS).to_numpy()
    label = table.column(F.LOG_CLICKED).to_numpy().astype(np.int64)
    oracle_column = table.column(F.LOG_ORACLE_CTR)
    has_oracle = oracle_column.is_valid().to_numpy(zero_copy_only=False)
    oracle = oracle_column.fill_null(np.nan).to_numpy()
    n, num_domains = len(ts), len(contract.domains)
    pad_item = len(item_codes.dictionary)

    new_user = np.ones(n, bool)
    new_user[1:] = user[1:] != user[:-1]
    new_ts = new_user.copy()
    new_ts[1:] |= ts[1:] != ts[:-1]
    user_start, group_start = _run_starts(new_user), _run_starts(new_ts)
    # A history state per user and number of earlier clicks; `reps` is its first event.
    clicks_before = np.concatenate([[0], np.cumsum(label)])[group_start]
    new_state = new_user.copy()
    new_state[1:] |= clicks_before[1:] != clicks_before[:-1]
    reps, state = np.flatnonzero(new_state), np.cumsum(new_state) - 1
    rep_groups, rep_users = group_start[reps], user_start[reps]

    indices, valid, total = _last_clicks(label, rep_groups, rep_users, contract.history_length)
    per_domain_items, per_domain_counts = [], []
    for d in range(num_domains):
        d_indices, d_valid, d_count = _last_clicks(label * (domain == d), rep_groups, rep_users,
                                                   contract.domain_history_length)
        per_domain_items.append(np.where(d_valid, item[d_indices], pad_item))
        per_domain_counts.append(d_count)
    num_states = len(reps)
    counts = np.stack(per_domain_counts, axis=1) if num_states else np.zeros((0, num_domains), np.int64)  # (S, D)
    target, total = counts[state, domain], total[state]
    bounds = np.array([lower for lower, _ in F.ACTIVITY_BUCKETS])
    return ExampleColumns(
        users=[u.encode() for u in user_codes.dictionary.to_pylist()],
        items=[i.encode() for i in item_codes.dictionary.to_pylist()] + [F.PAD_ID],
        user=user, item=item, domain=domain, ts=ts, label=label,
        target_clicks=target, other_clicks=total - target,
        cold_start=((target == 0) & (total > 0)).astype(np.int64),
        activity=np.searchsorted(bounds, total, side="right") - 1,
        oracle=oracle, has_oracle=has_oracle, state=state,
        hist_items=np.where(valid, item[indices], pad_item),
        hist_domains=np.where(valid, domain[indices], num_domains),
        hist_ts=np.where(valid, ts[indices], 0),
        hist_length=valid.sum(axis=1),
        domain_hist_items=(np.concatenate(per_domain_items, axis=1) if num_states
                           else np.zeros((0, num_domains * contract.domain_history_length), np.int64)),
        domain_hist_lengths=np.minimum(counts, contract.domain_history_length),
    )


# ---- The tf.Example wire format, written from arrays ---------------------------------------------
#
# Example = field 1 (Features); Features = repeated field 1 (map entry); entry = key (field 1) and
# Feature (field 2); Feature = bytes_list (1) | float_list (2) | int64_list (3); each list holds
# field 1: bytes values one by one, floats and ints packed. Every piece of an example is a
# "token" (a byte string in a pool); an example is a row of token ids, and the bytes of all
# examples come from one gather over the pool.

_BYTES, _FLOAT, _INT = 0x0A, 0x12, 0x1A  # the Feature field tags (field number << 3 | 2)
_SMALL = 1 << 14  # varints of 0..16383 (1-2 bytes) are tokens 0..16383 of every pool


def varints(values: np.ndarray):
    """Protobuf varints of int64 values (negative ones as 10 bytes): (bytes (m, 10) uint8, lengths (m,))."""
    v = np.asarray(values, np.int64).astype(np.uint64)
    shifts = np.arange(10, dtype=np.uint64) * np.uint64(7)
    groups = ((v[:, None] >> shifts[None, :]) & np.uint64(0x7F)).astype(np.uint8)  # (m, 10)
    lengths = 1 + (v[:, None] >= (np.uint64(1) << shifts[None, 1:])).sum(axis=1)
    more = np.arange(10)[None, :] < (lengths[:, None] - 1)
    return groups | (more.astype(np.uint8) << 7), lengths


def _varint(value: int) -> bytes:
    """One non-negative varint."""
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL_VARINTS = None  # the varints of 0.._SMALL-1 as bytes, made once


class _Pool:
    """Byte strings ("tokens") with ids; `add` and `ints` return ids, `gather` joins rows of them."""

    def __init__(self):
        global _SMALL_VARINTS
        if _SMALL_VARINTS is None:
            rows, lengths = varints(np.arange(_SMALL))
            _SMALL_VARINTS = [row[:length].tobytes() for row, length in zip(rows, lengths)]
        self._size = 0
        self._objects, self._lengths = np.empty(2 * _SMALL, object), np.zeros(2 * _SMALL, np.int64)
        self.add(_SMALL_VARINTS)

    def add(self, values: list, lengths: Optional[np.ndarray] = None) -> np.ndarray:
        """Tokens of byte strings (`lengths`: their lengths, when known)."""
        start, stop = self._size, self._size + len(values)
        if stop > len(self._lengths):  # grow by doubling
            capacity = max(stop, 2 * len(self._lengths))
            objects, lengths_ = np.empty(capacity, object), np.zeros(capacity, np.int64)
            objects[:start], lengths_[:start] = self._objects[:start], self._lengths[:start]
            self._objects, self._lengths = objects, lengths_
        self._objects[start:stop] = values
        self._lengths[start:stop] = [len(v) for v in values] if lengths is None else lengths
        self._size = stop
        return np.arange(start, stop)

    def add_rows(self, rows: np.ndarray, lengths) -> np.ndarray:
        """Tokens from the first `lengths[i]` bytes of each row of `rows` (m, width) uint8."""
        lengths = np.asarray(lengths, np.int64)
        raw = rows[np.arange(rows.shape[1])[None, :] < lengths[:, None]].tobytes()
        ends = np.cumsum(lengths).tolist()
        return self.add([raw[a:b] for a, b in zip([0] + ends[:-1], ends)], lengths)

    def ints(self, values) -> np.ndarray:
        """Varint tokens of int `values` (any shape): small ones from the table, others added."""
        flat = np.asarray(values, np.int64).ravel()
        ids = flat.copy()
        large = (flat < 0) | (flat >= _SMALL)
        if large.any():
            unique, inverse = np.unique(flat[large], return_inverse=True)
            ids[large] = self.add_rows(*varints(unique))[inverse]
        return ids.reshape(np.shape(values))

    def fork(self) -> "_Pool":
        """A pool that starts with this one's tokens; what is added to it stays out of this one."""
        pool = _Pool.__new__(_Pool)
        pool._size, pool._objects, pool._lengths = self._size, self._objects.copy(), self._lengths.copy()
        return pool

    def length(self, tokens: np.ndarray) -> np.ndarray:
        return self._lengths[tokens]

    def gather(self, tokens: np.ndarray):
        """Rows of token ids (n, K) -> (the bytes of each row, their lengths)."""
        lengths = self._lengths[tokens].sum(axis=1)
        ends = np.cumsum(lengths).tolist()
        joined = b"".join(self._objects[tokens.ravel()].tolist())
        return [joined[a:b] for a, b in zip([0] + ends[:-1], ends)], lengths


class _Feature(NamedTuple):
    name: str
    kind: int  # _BYTES, _FLOAT or _INT
    values: np.ndarray  # (n, w) token ids: BytesList entries, or the packed varints / floats
    present: Optional[np.ndarray] = None  # (n,) bool; None: every example has the feature
    few: bool = False  # few distinct rows: each is encoded once and becomes a single token


def _entries(pool: _Pool, feature: _Feature):
    """A feature's map entries: (token rows (n, k), byte length of each row)."""
    n = len(feature.values)
    field1, kind = pool.add([b"\x0a", bytes([feature.kind])])
    key = feature.name.encode()
    key_part = pool.add([b"\x0a" + _varint(len(key)) + key + b"\x12"])[0]  # entry field 1 (key), then field 2's tag
    payload = pool.length(feature.values).sum(axis=1)
    if feature.kind == _BYTES:  # BytesList: the value entries themselves
        head, list_len = [], payload
    else:  # Int64List / FloatList: field 1, packed
        packed = pool.ints(payload)
        head, list_len = [np.full(n, field1), packed], 1 + pool.length(packed) + payload
    list_tokens = pool.ints(list_len)
    feature_len = 1 + pool.length(list_tokens) + list_len
    feature_tokens = pool.ints(feature_len)
    entry_len = pool.length(key_part) + pool.length(feature_tokens) + feature_len
    entry_tokens = pool.ints(entry_len)
    rows = np.column_stack([np.full(n, field1), entry_tokens, np.full(n, key_part), feature_tokens, np.full(n, kind),
                            list_tokens, *head, feature.values])
    return rows, 1 + pool.length(entry_tokens) + entry_len


def _distinct_rows(values: np.ndarray):
    """(index of a row of each distinct row, which distinct row each row is) of an (n, w) int array.

    Rows are numbered as base-(max + 1) numbers when they fit in int64; otherwise column by
    column, renumbering (distinct prefix, next value) densely each time (np.unique with axis=0
    sorts row views, much slower).
    """
    base = int(values.max(initial=0)) + 1
    if base ** values.shape[1] < 2**62:
        key = values @ (base ** np.arange(values.shape[1], dtype=np.int64))
    else:
        key = np.zeros(len(values), np.int64)
        for column in values.T:
            _, column = np.unique(column, return_inverse=True)
            _, key = np.unique(key * (column.max(initial=0) + 1) + column, return_inverse=True)
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    return first, inverse.reshape(-1)


def _encode(pool: _Pool, features: list, n: int, outside: Optional[np.ndarray] = None):
    """Rows of `features` (map entries of a Features message, in key order) -> (their bytes, lengths).

    With `outside` (the byte length of more entries that follow each row), each row starts with
    the Example's header (field 1, the length of all the entries), so that it and its `outside`
    entries are one serialized Example.
    """
    empty = pool.add([b""])[0]
    blocks, entries_len = [], np.zeros(n, np.int64)
    for feature in sorted(features, key=lambda f: f.name):
        if feature.few:
            first, inverse = _distinct_rows(feature.values)
            rows, lengths = _entries(pool, feature._replace(values=feature.values[first]))
            tokens = pool.add(pool.gather(rows)[0], lengths)
            rows, lengths = tokens[inverse][:, None], lengths[inverse]
        else:
            rows, lengths = _entries(pool, feature)
        if feature.present is not None:
            rows[~feature.present] = empty
            lengths = np.where(feature.present, lengths, 0)
        blocks.append(rows)
        entries_len += lengths
    if outside is not None:
        blocks.insert(0, np.column_stack([np.full(n, pool.add([b"\x0a"])[0]), pool.ints(entries_len + outside)]))
    return pool.gather(np.column_stack(blocks))


def encode_examples(columns: ExampleColumns, contract: F.Contract, chunk: int = 4096) -> Iterator[tuple]:
    """Serialized tf.Examples of `columns`, `chunk` at a time: yields (rows, list of bytes).

    `rows` are the indices in `columns` of the chunk's examples. An example is its event's own
    features followed by its history state's, encoded once per state in the chunk.
    """
    base = _Pool()

    def entries(pool: _Pool, values: list) -> np.ndarray:  # BytesList value entries: field 1, length, bytes
        return pool.add([b"\x0a" + _varint(len(v)) + v for v in values])

    items = entries(base, columns.items)  # the last one is the padding id
    users = entries(base, columns.users)
    domains = entries(base, [d.encode() for d in contract.domains] + [F.PAD_ID])
    buckets = entries(base, [name.encode() for _, name in F.ACTIVITY_BUCKETS])

    def scalar(tokens):
        return tokens[:, None]

    for start in range(0, columns.size, chunk):
        rows = np.arange(start, min(columns.size, start + chunk))
        c, n = columns.take(rows), len(rows)
        states, local = np.unique(c.state, return_inverse=True)
        pool = base.fork()
        histories, history_lengths = _encode(pool, [
            _Feature(F.HISTORY_ITEM_IDS, _BYTES, items[columns.hist_items[states]]),
            _Feature(F.HISTORY_DOMAINS, _BYTES, domains[columns.hist_domains[states]], few=True),
            _Feature(F.HISTORY_TIMESTAMPS, _INT, pool.ints(columns.hist_ts[states])),
            _Feature(F.HISTORY_LENGTH, _INT, scalar(pool.ints(columns.hist_length[states])), few=True),
            _Feature(F.DOMAIN_HISTORY_ITEM_IDS, _BYTES, items[columns.domain_hist_items[states]]),
            _Feature(F.DOMAIN_HISTORY_LENGTHS, _INT, pool.ints(columns.domain_hist_lengths[states]), few=True),
        ], len(states))
        floats = np.ascontiguousarray(np.nan_to_num(c.oracle).astype("<f4")).view(np.uint8).reshape(n, 4)
        pool = base.fork()
        own, _ = _encode(pool, [
            _Feature(F.USER_ID, _BYTES, scalar(users[c.user]), few=True),
            _Feature(F.ITEM_ID, _BYTES, scalar(items[c.item]), few=True),
            _Feature(F.DOMAIN, _BYTES, scalar(domains[c.domain]), few=True),
            _Feature(F.TIMESTAMP, _INT, scalar(pool.ints(c.ts))),
            _Feature(F.TARGET_DOMAIN_CLICKS, _INT, scalar(pool.ints(c.target_clicks)), few=True),
            _Feature(F.OTHER_DOMAIN_CLICKS, _INT, scalar(pool.ints(c.other_clicks)), few=True),
            _Feature(F.LABEL, _INT, scalar(pool.ints(c.label)), few=True),
            _Feature(F.COLD_START, _INT, scalar(pool.ints(c.cold_start)), few=True),
            _Feature(F.ACTIVITY_BUCKET, _BYTES, scalar(buckets[c.activity]), few=True),
            _Feature(F.ORACLE_CTR, _FLOAT, scalar(pool.add_rows(floats, np.full(n, 4))), c.has_oracle),
        ], n, outside=history_lengths[local])
        yield rows, [head + histories[j] for head, j in zip(own, local.tolist())]
