"""Real implicit-feedback interactions -> impression logs with sampled non-clicks.

Input: CSV files with a header naming at least `user_id,item_id,domain,ts` (ts in epoch seconds;
the format of `shared/data/*/interactions.csv`). The data has no impressions, so non-clicks are
sampled. Neither the MAN nor the DASL paper says how their Amazon negatives were made (MAN
speaks of "positive and negative samples", DASL of binarised ratings), so the protocol below is
this project's choice, not theirs:

  - every interaction becomes a clicked impression (clicked=1) at its time; an exact duplicate
    row (same user, item, domain and ts as an earlier one) is dropped and counted
    (`duplicate_interactions`): it would be a duplicate click record, which the ingestion drops,
    leaving its negatives without their click;
  - K non-clicked impressions (clicked=0) are added at the same ts, of items of the same domain
    that the user never interacted with (in any row of the input). They are distinct within one
    interaction's K AND across the user's interactions that share its timestamp: a negative is
    the record (ts, user, domain, item, 0), so the same item drawn twice for one user at one ts
    would be the same record twice (6,528 such duplicates on amazon-food-kitchen before this
    rule), which the ingestion drops as a duplicate. So every interaction has exactly K
    negatives, up to the `negative_shortfall` below;
  - `negative_sampling="popularity"` (the default): drawn by popularity AT THAT TIME:
    probability proportional to the item's count among the last W interactions of the domain
    (`popularity_window`, default 1,000) that are strictly before the interaction's timestamp.
    Interactions sharing a timestamp do not see each other (the ingestion's rule for histories);
    among earlier ones "last" follows (ts, input order). Eligible: the items with a count > 0 in
    that window. When fewer than K items are eligible, all of them are taken and the rest is
    topped up uniformly from the domain's items seen so far (strictly before the timestamp) that
    are not in the window, counted as `negative_topups`; when those run out too, the shortfall
    is counted (`negative_shortfall`). So a domain's very first timestamp has no negatives, the
    ones right after draw from the few items seen so far;
  - `negative_sampling="uniform"`: drawn uniformly from ALL the domain's items in the input
    (the whole catalogue, whatever their time), the sampling of the leave-one-out ranking
    protocol (`components/evaluation/ranking.py`), whose candidates are uniform too. It does not
    look at time, so on a time split an item that only appears late gets non-clicks before its
    first click: fine for training a ranker, not for the time-split AUC protocol (measured in
    the README). Shortfall only when the user holds nearly the whole domain.

Why not all-time popularity: with popularity counted over the whole data set, an item popular
in early years gets its clicks early but its sampled non-clicks spread over all years, so its
click rate is high early and ~0 later (and the reverse for new items). On amazon-food-kitchen
(2000-2014) that made "the item's CTR in the train split" score an AUC of 0.20 on the later eval
split: future popularity leaking into the negatives, which every model then learns. Counting
popularity in a trailing window keeps an item's click rate roughly stationary; the window must be
short, since a click's negatives arrive over the next W interactions of its domain. Measured on
amazon-food-kitchen (AUC of train-split item CTR on the eval split; 0.5 = no leak): W=100 0.500,
1,000 0.495, 10,000 0.435, all-time 0.20. Default 1,000.

Output: JSON Lines (gzip when the path ends in .gz, with a zero mtime so bytes are reproducible)
of records {ts, user_id, domain, item_id, clicked}, in input order: for each interaction, the
click and then its negatives. (Sampling runs in time order; the output keeps the input order so
it lines up with the input, the ingestion sorts by time itself.) Same input and seed give
byte-identical output.

Bad rows (wrong column count, empty id, unparseable ts, not UTF-8, an item already seen under
another domain) become `records.DeadLetter`s written as JSON lines to the dead-letter file,
counted in the summary and skipped; good rows still flow. A header without a required column is
a user mistake: its dead letter is written and `ValueError` names the file and the column.

Three steps: pass 1 reads the files once and keeps the good rows encoded as integers; sampling
walks the rows sorted by (ts, input order), one timestamp group at a time; pass 2 writes in
input order. Memory is O(interactions x K): the encoded rows (user, item, ts), each user's set
of interacted items, the sampled negatives of every row, plus O(users + items) tables and the
windows (O(W) per domain).

Popularity sampling: per domain, a deque of the window's interactions and a Fenwick tree (binary indexed
tree) of the window counts over the domain's items, updated +1 / -1 as interactions enter and
leave the window, so a draw proportional to the counts is one O(log items) descent. Draws that
hit the user's items or an item already drawn are rejected and redrawn, which is exactly
sequential sampling without replacement; after a few rejections the user's items and the drawn
ones are taken out of the tree for the remaining draws (and put back after), so a user who holds
most of the window's popularity costs O(user's items x log items), not an unbounded loop.
Uniform sampling: rejection draws from the domain's item list, with the same exact fallback
(a partial Fisher-Yates shuffle of the eligible items) after a few rejections.

Exactness across a timestamp: while one timestamp group is sampled, each user's picks so far in
the group are added to the user's excluded items (and taken out after the group), so later
interactions of the group cannot draw them again.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import gzip
import io
import json
import logging
import time
from typing import Optional

import numpy as np

from components.ingest import records
from xdctr import features as F

logger = logging.getLogger(__name__)

# CSV columns the importer needs; they are spelled like the log fields they become.
REQUIRED_COLUMNS = (F.LOG_USER_ID, F.LOG_ITEM_ID, F.LOG_DOMAIN, F.LOG_TS)
DEAD_LETTER_SUFFIX = ".dead_letter.jsonl"
PROGRESS_EVERY = 100_000
_CHUNK = 8192  # interactions whose records are written in one batch
POPULARITY, UNIFORM = "popularity", "uniform"
NEGATIVE_SAMPLING = (POPULARITY, UNIFORM)


@dataclasses.dataclass(frozen=True)
class ImportConfig:
    """Settings of `import_interactions`.

    Attributes:
      negatives: non-clicked impressions sampled per interaction (K).
      seed: seed of the negative sampling; same input and seed give identical output.
      popularity_window: W, the number of the domain's latest interactions (strictly before an
        interaction's timestamp) whose item counts give the popularity its negatives are drawn by.
      negative_sampling: "popularity" (by popularity in the trailing window) or "uniform"
        (uniformly from the domain's whole catalogue); see the module docstring.
    """

    negatives: int = 4
    seed: int = 0
    popularity_window: int = 1_000
    negative_sampling: str = POPULARITY

    def __post_init__(self):
        if self.negative_sampling not in NEGATIVE_SAMPLING:
            raise ValueError(f"`negative_sampling` must be one of {list(NEGATIVE_SAMPLING)}. "
                             f"Received: negative_sampling={self.negative_sampling!r}")
        for name, lowest in (("negatives", 0), ("seed", 0), ("popularity_window", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"`{name}` must be an integer. Received: {name}={value!r}")
            if value < lowest:
                bound = ">= 0" if lowest == 0 else "> 0"
                raise ValueError(f"`{name}` must be {bound}. Received: {name}={value!r}")


class _Table:
    """Interned string ids: id -> dense int code, in first-seen order."""

    def __init__(self):
        self.index: dict = {}
        self.names: list = []

    def code(self, name: str) -> int:
        code = self.index.get(name)
        if code is None:
            code = self.index[name] = len(self.names)
            self.names.append(name)
        return code


class _Interactions:
    """Pass 1 result: the good rows as integer codes plus what sampling needs."""

    def __init__(self):
        self.users = _Table()
        self.items = _Table()
        self.domains = _Table()
        self.item_domain: list = []  # item code -> domain code (the first domain seen)
        self.item_origin: list = []  # item code -> "file:line" where it was first seen
        self.row_user: list = []
        self.row_item: list = []
        self.row_ts: list = []
        self.user_items: list = []  # user code -> set of item codes the user interacted with
        self.seen_rows: set = set()  # (user, item, ts) of the rows kept, to drop exact duplicates
        self.duplicates = 0  # exact duplicate rows dropped


def _split(text: str) -> list:
    if '"' not in text:
        return text.split(",")
    return next(csv.reader(io.StringIO(text)), [])


def _read_header(path: str, first_line: Optional[bytes]) -> tuple:
    """-> (header, missing columns, raw header text)."""
    if first_line is None:
        return [], list(REQUIRED_COLUMNS), ""
    text = first_line.decode("utf-8", errors="replace").lstrip("\ufeff").rstrip("\r\n")
    header = [name.strip() for name in _split(text)]
    return header, [c for c in REQUIRED_COLUMNS if c not in header], text


def _check_headers(paths: list, dead_out) -> None:
    """Raises ValueError (after writing its dead letter) for the first file missing a column."""
    for path in paths:
        with open(path, "rb") as f:
            header, missing, raw = _read_header(path, next(iter(f), None))
        if missing:
            dead = records.DeadLetter(path, 1, records.MISSING_FIELD, missing[0],
                                      f"header lacks required column(s) {missing}; expected {list(REQUIRED_COLUMNS)}", raw)
            dead_out.write(_dead_letter_json(dead))
            raise ValueError(f"{path}:1: header lacks required column '{missing[0]}' "
                             f"(got {header}; expected the columns {','.join(REQUIRED_COLUMNS)})")


def _dead_letter_json(dead: records.DeadLetter) -> str:
    return json.dumps(dataclasses.asdict(dead), sort_keys=True) + "\n"


def _read(paths: list, dead_out, dead_counts: collections.Counter) -> _Interactions:
    """Pass 1: validates every row; good rows are encoded, bad ones written as dead letters."""
    data = _Interactions()
    options = records.ParseOptions()
    for path in paths:
        with open(path, "rb") as f:
            header, _, _ = _read_header(path, next(iter(f), None))
            n_columns = len(header)
            u_col, i_col, d_col, t_col = (header.index(c) for c in REQUIRED_COLUMNS)

            def dead(reason, field, detail, raw):
                dead_counts[reason] += 1
                dead_out.write(_dead_letter_json(records.DeadLetter(path, number, reason, field, detail, raw)))

            for number, raw_bytes in enumerate(f, start=2):
                try:
                    text = raw_bytes.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    dead(records.MALFORMED, "", f"not UTF-8 at byte {e.start}", repr(raw_bytes))
                    continue
                if not text.strip():
                    continue  # a blank line holds no row
                try:
                    values = _split(text)
                except csv.Error as e:
                    dead(records.MALFORMED, "", f"invalid CSV: {e}", text)
                    continue
                if len(values) != n_columns:
                    dead(records.MALFORMED, "", f"expected {n_columns} columns, got {len(values)}", text)
                    continue
                user, item, domain = values[u_col].strip(), values[i_col].strip(), values[d_col].strip()
                empty = next((c for c, v in ((F.LOG_USER_ID, user), (F.LOG_ITEM_ID, item), (F.LOG_DOMAIN, domain)) if not v), None)
                if empty:
                    dead(records.EMPTY_ID, empty, "expected a non-empty id", text)
                    continue
                try:
                    ts = records.parse_timestamp(values[t_col])
                except (ValueError, TypeError, OverflowError):
                    dead(records.BAD_TIMESTAMP, F.LOG_TS, f"expected epoch seconds, got {values[t_col]!r}", text)
                    continue
                if not options.min_ts <= ts <= options.max_ts:
                    dead(records.BAD_TIMESTAMP, F.LOG_TS, f"{ts} is outside [{options.min_ts}, {options.max_ts}]", text)
                    continue
                i = data.items.index.get(item)
                if i is None:
                    i = data.items.code(item)
                    data.item_domain.append(data.domains.code(domain))
                    data.item_origin.append(f"{path}:{number}")
                elif data.domains.names[data.item_domain[i]] != domain:
                    first = data.domains.names[data.item_domain[i]]
                    dead(records.MALFORMED, F.LOG_DOMAIN,
                         f"item {item!r} already belongs to domain {first!r} (first seen at "
                         f"{data.item_origin[i]}); an item belongs to exactly one domain, got {domain!r}", text)
                    continue
                u = data.users.code(user)
                if u == len(data.user_items):
                    data.user_items.append(set())
                if (u, i, ts) in data.seen_rows:
                    data.duplicates += 1  # the same click again: one impression, not two
                    continue
                data.seen_rows.add((u, i, ts))
                data.user_items[u].add(i)
                data.row_user.append(u)
                data.row_item.append(i)
                data.row_ts.append(ts)
    data.seen_rows = set()  # only needed while reading
    return data


class _Fenwick:
    """Non-negative integer counts over indices 0..size-1: update, total and a draw proportional
    to the counts, each O(log size)."""

    def __init__(self, size: int):
        self.size = size
        self.tree = [0] * (size + 1)  # 1-based: tree[i] sums the counts of (i - lowbit(i), i]
        self.total = 0
        self._top = 1 << (size.bit_length() - 1) if size else 0  # highest power of two <= size

    def add(self, index: int, delta: int) -> None:
        self.total += delta
        tree, size, i = self.tree, self.size, index + 1
        while i <= size:
            tree[i] += delta
            i += i & -i

    def find(self, target: int) -> int:
        """The index whose count covers `target` in [0, total): prefix(index) <= target <
        prefix(index + 1), so an index is found with probability count / total for a uniform
        target and never one with count 0."""
        tree, size, pos, step = self.tree, self.size, 0, self._top
        while step:
            nxt = pos + step
            if nxt <= size and tree[nxt] <= target:
                pos = nxt
                target -= tree[nxt]
            step >>= 1
        return pos


class _Uniforms:
    """Uniform floats in [0, 1) from one seeded generator, drawn in batches."""

    def __init__(self, seed: int):
        self._rng = np.random.default_rng(seed)
        self._buffer: list = []
        self._next = 0

    def below(self, n: int) -> int:
        """A uniform integer in [0, n), n > 0."""
        if self._next == len(self._buffer):
            self._buffer = self._rng.random(65_536).tolist()
            self._next = 0
        u = self._buffer[self._next]
        self._next += 1
        return min(int(u * n), n - 1)  # min: u * n can round up to n


class _Window:
    """One domain's last W interactions: their items' counts (list and Fenwick tree) and the
    domain's items seen so far, as indices into the domain's item list."""

    def __init__(self, num_items: int, size: int):
        self.size = size
        self.queue: collections.deque = collections.deque()
        self.counts = [0] * num_items
        self.tree = _Fenwick(num_items)
        self.seen: list = []  # items that have entered the window at least once, in that order

    def push(self, local: int) -> None:
        counts, tree, queue = self.counts, self.tree, self.queue
        queue.append(local)
        counts[local] += 1
        tree.add(local, 1)
        if len(queue) > self.size:
            old = queue.popleft()
            counts[old] -= 1
            tree.add(old, -1)


class _SamplerBase:
    """What both samplers hold: K, the rejection budget, the seeded uniforms and each domain's
    item codes (in first-seen order). `draw(user, item)` -> (negatives, top-ups) before
    `push(item)` within a ts group."""

    def __init__(self, data: _Interactions, config: ImportConfig):
        self.data = data
        self.k = config.negatives
        self.tries = 2 * config.negatives + 4  # rejection draws before the exact fallback
        self.uniform = _Uniforms(config.seed)
        self.domain_items: list = [[] for _ in data.domains.names]  # domain -> item codes
        self.item_local: list = []  # item code -> index in its domain's list
        for d in data.item_domain:
            self.item_local.append(len(self.domain_items[d]))
            self.domain_items[d].append(len(self.item_local) - 1)


class _Sampler(_SamplerBase):
    """Negatives by popularity in a trailing window; `draw` before `push` within a ts group."""

    def __init__(self, data: _Interactions, config: ImportConfig):
        super().__init__(data, config)
        self.windows = [_Window(len(items), config.popularity_window) for items in self.domain_items]
        self.entered = bytearray(len(data.item_domain))  # item code -> 1 once in a window

    def push(self, item: int) -> None:
        """Puts one interaction into its domain's window (call after its timestamp's draws)."""
        window = self.windows[self.data.item_domain[item]]
        local = self.item_local[item]
        if not self.entered[item]:
            self.entered[item] = 1
            window.seen.append(local)
        window.push(local)

    def draw(self, user: int, item: int) -> tuple:
        """(negatives as item codes, how many of them are top-ups) for one interaction."""
        d = self.data.item_domain[item]
        window, items, excluded = self.windows[d], self.domain_items[d], self.data.user_items[user]
        picks = self._by_popularity(window, items, excluded, d)
        popular = len(picks)
        if popular < self.k and window.seen:
            self._top_up(window, items, excluded, picks)
        return picks, len(picks) - popular

    def _by_popularity(self, window: _Window, items: list, excluded: set, d: int) -> list:
        k, tree, below = self.k, window.tree, self.uniform.below
        picks: list = []
        if not tree.total:
            return picks
        for _ in range(self.tries):
            candidate = items[tree.find(below(tree.total))]
            if candidate not in excluded and candidate not in picks:
                picks.append(candidate)
                if len(picks) == k:
                    return picks
        # Exact: take the user's items and the ones drawn out of the tree, draw the rest from
        # what is left, put everything back.
        counts, item_local, item_domain = window.counts, self.item_local, self.data.item_domain
        removed = []
        for code in picks + [i for i in excluded if item_domain[i] == d]:
            local = item_local[code]
            if counts[local]:
                tree.add(local, -counts[local])
                removed.append(local)
        while len(picks) < k and tree.total:
            local = tree.find(below(tree.total))
            picks.append(items[local])
            tree.add(local, -counts[local])
            removed.append(local)
        for local in removed:
            tree.add(local, counts[local])
        return picks

    def _top_up(self, window: _Window, items: list, excluded: set, picks: list) -> None:
        """Adds items seen so far but out of the window, uniformly, until K or none is left.
        Every eligible window item is in `picks` already, so seen items with a count are skipped."""
        k, counts, seen, below = self.k, window.counts, window.seen, self.uniform.below
        for _ in range(self.tries):
            local = seen[below(len(seen))]
            candidate = items[local]
            if not counts[local] and candidate not in excluded and candidate not in picks:
                picks.append(candidate)
                if len(picks) == k:
                    return
        rest = [items[local] for local in seen if not counts[local]]
        rest = [c for c in rest if c not in excluded and c not in picks]
        picks.extend(_distinct_uniform(rest, k - len(picks), below))


def _distinct_uniform(rest: list, need: int, below) -> list:
    """`need` items of `rest` uniformly without replacement (a partial Fisher-Yates shuffle; all of
    them when there are not more); `rest` is shuffled in place."""
    if len(rest) <= need:
        return list(rest)
    for j in range(need):
        swap = j + below(len(rest) - j)
        rest[j], rest[swap] = rest[swap], rest[j]
    return rest[:need]


class _UniformSampler(_SamplerBase):
    """Negatives uniformly from the domain's whole catalogue (every item of the domain in the
    input), excluding the user's items; `push` is a no-op (time plays no part)."""

    def push(self, item: int) -> None:
        pass

    def draw(self, user: int, item: int) -> tuple:
        """(negatives as item codes, 0 top-ups) for one interaction."""
        k, below = self.k, self.uniform.below
        items, excluded = self.domain_items[self.data.item_domain[item]], self.data.user_items[user]
        picks: list = []
        for _ in range(self.tries):
            candidate = items[below(len(items))]
            if candidate not in excluded and candidate not in picks:
                picks.append(candidate)
                if len(picks) == k:
                    return picks, 0
        rest = [c for c in items if c not in excluded and c not in picks]
        return picks + _distinct_uniform(rest, k - len(picks), below), 0


_SAMPLERS = {POPULARITY: _Sampler, UNIFORM: _UniformSampler}


def _sample(data: _Interactions, config: ImportConfig, started: float) -> tuple:
    """Negatives of every row (input order), walking the rows by (ts, input order) one
    timestamp group at a time: the group's draws see the windows as they were before it.

    Returns (negatives per row, top-ups, shortfall).
    """
    total = len(data.row_item)
    negatives: list = [()] * total
    if not config.negatives:
        return negatives, 0, 0
    sampler = _SAMPLERS[config.negative_sampling](data, config)
    row_user, row_item, row_ts, user_items = data.row_user, data.row_item, data.row_ts, data.user_items
    order = sorted(range(total), key=row_ts.__getitem__)  # stable: ties keep the input order
    k = config.negatives
    topups = shortfall = 0
    next_progress = PROGRESS_EVERY
    start = 0
    while start < total:
        ts = row_ts[order[start]]
        stop = start + 1
        while stop < total and row_ts[order[stop]] == ts:
            stop += 1
        group = order[start:stop]
        drawn_here = collections.defaultdict(list)  # user -> picks so far at this ts
        for row in group:
            user = row_user[row]
            picks, topped = sampler.draw(user, row_item[row])
            negatives[row] = picks
            topups += topped
            shortfall += k - len(picks)
            if picks:
                # The same (ts, user, item) non-click again would be a duplicate record: the
                # user's later interactions at this ts draw around this one's picks.
                user_items[user].update(picks)
                drawn_here[user].extend(picks)
        for user, picks in drawn_here.items():
            user_items[user].difference_update(picks)  # negatives are never the user's own items
        for row in group:
            sampler.push(row_item[row])
        start = stop
        if start >= next_progress or start == total:
            elapsed = time.monotonic() - started
            logger.info("sampled negatives for %d/%d interactions (%.0f/s)", start, total, start / max(elapsed, 1e-9))
            next_progress = (start // PROGRESS_EVERY + 1) * PROGRESS_EVERY
    return negatives, topups, shortfall


def _open_output(path: str):
    raw = open(path, "wb")
    if path.endswith(".gz"):
        # No file name and a zero mtime in the gzip header: the bytes depend on the data only.
        raw = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0)
    return io.TextIOWrapper(raw, encoding="utf-8", newline="\n")


def _write(data: _Interactions, negatives: list, out) -> int:
    """Pass 2: the click and then its negatives, for each interaction in input order.
    Returns the number of negatives written."""
    key = {name: json.dumps(name) for name in F.LOG_REQUIRED_FIELDS}
    template = (f"{{{key[F.LOG_TS]}:%d,{key[F.LOG_USER_ID]}:%s,{key[F.LOG_DOMAIN]}:%s,"
                f"{key[F.LOG_ITEM_ID]}:%s,{key[F.LOG_CLICKED]}:%d}}\n")
    user_json = [json.dumps(name) for name in data.users.names]
    item_json = [json.dumps(name) for name in data.items.names]
    domain_json = [json.dumps(name) for name in data.domains.names]
    item_domain = data.item_domain
    total = len(data.row_item)
    written = 0
    for start in range(0, total, _CHUNK):
        stop = min(start + _CHUNK, total)
        lines = []
        for u, i, ts, picks in zip(data.row_user[start:stop], data.row_item[start:stop],
                                   data.row_ts[start:stop], negatives[start:stop]):
            uj, dj = user_json[u], domain_json[item_domain[i]]
            lines.append(template % (ts, uj, dj, item_json[i], 1))
            for n in picks:
                lines.append(template % (ts, uj, dj, item_json[n], 0))
            written += len(picks)
        out.write("".join(lines))
    return written


def read_interactions(input_paths: list, dead_letter_path: str) -> tuple:
    """Pass 1 on its own: (the good rows, encoded, exact duplicates dropped; Counter of dead
    letters per reason). Rejected rows are written to `dead_letter_path`.

    The result's `users`, `items`, `domains` are `_Table`s (`.names` in first-seen order),
    `row_user`, `row_item`, `row_ts` the rows in input order, `item_domain` each item's domain
    code, `user_items` each user's set of item codes.

    Raises:
      ValueError: an input's header lacks a required column (the message names file and column).
    """
    dead_counts: collections.Counter = collections.Counter()
    with open(dead_letter_path, "w", encoding="utf-8", newline="\n") as dead_out:
        _check_headers(list(input_paths), dead_out)
        data = _read(list(input_paths), dead_out, dead_counts)
    return data, dead_counts


def import_interactions(input_paths: list, output_path: str, config: ImportConfig,
                        dead_letter_path: Optional[str] = None) -> dict:
    """Turns interaction CSVs into an impression log with sampled negatives.

    Args:
      input_paths: CSV files (header `user_id,item_id,domain,ts`, other columns ignored), read
        in the given order.
      output_path: JSON Lines output; gzip when it ends in .gz.
      config: number of negatives per interaction, the sampling seed, the sampling
        (popularity or uniform) and the popularity window.
      dead_letter_path: where rejected rows go as JSON lines (always written, possibly empty);
        default `<output_path>.dead_letter.jsonl`.

    Returns:
      A summary: interactions (good rows, exact duplicates dropped), duplicate_interactions
      (exact duplicate rows dropped), negative_sampling, impressions (records written), clicks, negatives
      (all non-clicks written, top-ups included), negative_topups (non-clicks drawn uniformly
      from the items seen so far because fewer than K were in the window), negative_shortfall
      (missing non-clicks: K x interactions - negatives), popularity_window, users, items
      (distinct items per domain), dead_letter (count per reason), bad_rows, output_path,
      dead_letter_path, seconds.

    Raises:
      ValueError: an input's header lacks a required column (the message names file and column).
    """
    if isinstance(input_paths, str):
        input_paths = [input_paths]
    input_paths = [str(p) for p in input_paths]
    output_path = str(output_path)
    dead_letter_path = str(dead_letter_path) if dead_letter_path else output_path + DEAD_LETTER_SUFFIX
    started = time.monotonic()
    data, dead_counts = read_interactions(input_paths, dead_letter_path)
    logger.info("read %d interactions (%d users, %d items, %d domains, %d bad rows) from %d file(s)",
                len(data.row_item), len(data.users.names), len(data.items.names), len(data.domains.names),
                sum(dead_counts.values()), len(input_paths))
    negatives, topups, shortfall = _sample(data, config, started)
    with _open_output(output_path) as out:
        written = _write(data, negatives, out)
    interactions = len(data.row_item)
    items_per_domain = collections.Counter(data.domains.names[d] for d in data.item_domain)
    summary = {
        "interactions": interactions,
        "duplicate_interactions": data.duplicates,
        "negative_sampling": config.negative_sampling,
        "impressions": interactions + written,
        "clicks": interactions,
        "negatives": written,
        "negative_topups": topups,
        "negative_shortfall": shortfall,
        "popularity_window": config.popularity_window,
        "users": len(data.users.names),
        "items": {name: items_per_domain[name] for name in data.domains.names},
        "dead_letter": dict(sorted(dead_counts.items())),
        "bad_rows": sum(dead_counts.values()),
        "output_path": output_path,
        "dead_letter_path": dead_letter_path,
        "seconds": round(time.monotonic() - started, 3),
    }
    logger.info("wrote %d impressions (%d clicks, %d exact duplicates dropped, %d %s negatives of which %d "
                "top-ups, shortfall %d; popularity window %d) for %d users to %s in %.1fs; %d bad rows to %s",
                summary["impressions"], interactions, data.duplicates, written, config.negative_sampling, topups,
                shortfall, config.popularity_window, summary["users"], output_path, summary["seconds"],
                summary["bad_rows"], dead_letter_path)
    return summary
