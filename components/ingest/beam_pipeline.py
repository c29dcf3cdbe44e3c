"""The Beam ingestion: click-log files -> per-user leakage-free examples as gzip TFRecords.

One implementation, run standalone by `xdctr ingest` and as the executor of the pipeline's
ExampleGen component (`components/ingest/component.py`).

Output layout under `output_dir`:
  Split-train/data_tfrecord-*.gz, Split-eval/data_tfrecord-*.gz   tf.Examples (features.py)
  dead_letter/dead_letter-*.jsonl                                   rejected records with reasons
  summary.json     the feature contract (domains, lengths), counts per split and per reject reason
  stats/<split>.json   rows, CTR and users per domain, history lengths, cold-start fraction
  schema/schema.pbtxt  the tf.Example schema (tensorflow_metadata), the same for every split

Elements are blocks, not events. Files are read in shards (byte ranges of plain JSON Lines and
CSV files, aligned to line starts, so several workers parse one large file; gzip and Parquet
files are read whole, as gzip cannot be split); each shard is parsed a block of lines at a time
by pyarrow (`records.parse_block`), and its good events are cut by user into `user_shards`
pieces (Arrow IPC, zstd), written one after the other to a file a block under the output
directory's `.temp/` (`spill_pieces`; the DirectRunner's shuffle holds what goes through it in
memory, so only (path, offset, length) does; the files are removed when the run completes, not
when read, so a retried bundle finds them). A GroupByKey brings each user shard's pieces
together; there the events are sorted by (user, ts, ...), exact duplicates dropped, the features
of whole users computed column-wise (`sequences.columnar_examples`), the tf.Examples encoded
from the arrays and written as gzip TFRecords, one file per user shard and split. No side input
is read by a stage fed by the reader: Beam's DirectRunner loses records in that shape
(`scripts/beam_data_loss.py`). The eval cutoff and the contract are read after the GroupByKey,
the counts of the summary by a one-element stage.

Memory: a heavy user's events (more than `heavy_user_events`) are grouped by (user, time block),
not kept in their user shard, so no worker ever holds a whole heavy user's timeline. Each block's
`UserState` (bounded by the history lengths) is summed up per user in block order, and each
block is then expanded with the state at its start. A worker holds one user shard's light users,
one block's events, or one user's per-block states (blocks x history lengths).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import struct
import uuid
import zlib
from typing import Iterable, NamedTuple, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from xdctr import features as F

from components.ingest import records, sequences

DEAD_LETTER_DIR = "dead_letter"
SUMMARY_FILE = "summary.json"
STATS_DIR = "stats"
SPLIT_MODES = ("events", "time")
SCHEMA_FILE = os.path.join("schema", "schema.pbtxt")
TEMP_DIR = ".temp"  # spilled pieces, and example files being written (renamed into the splits when complete)
SHARD_BYTES = 64 << 20  # plain text files are parsed in byte ranges of this size
BLOCK_BYTES = 8 << 20  # a shard is parsed this many bytes of lines at a time
EVENTS_PER_USER_SHARD = 100_000  # the default number of user shards aims at this many events each
MAX_USER_SHARDS = 4096
CHUNK_EVENTS = 65_536  # the features of this many events (of whole users) are computed at once
GZIP_LEVEL = 1  # zlib level of the example files: 2.3x faster than 6, about 10% larger
HEAVY_FILE_PREFIX = "data_tfrecord-heavy"


def split_dir(output_dir: str, split: str) -> str:
    """TFX's layout for a split of an Examples artifact."""
    return os.path.join(output_dir, f"Split-{split}")


@dataclasses.dataclass(frozen=True)
class IngestConfig:
    """Settings of one ingestion run.

    Attributes:
      input_patterns: file patterns of JSON Lines, CSV (plain or gzip) or Parquet logs.
      history_length: length of the mixed-domain history.
      domain_history_length: length of each per-domain history.
      block_seconds: length of the time blocks a heavy user's timeline is cut into.
      heavy_user_events: users with more events than this are processed in time blocks (memory
        bound); the others with their user shard (fast: column-wise).
      eval_fraction: the size of the eval split, the latest part of the data.
      split_by: "events": eval is the last `eval_fraction` of the events by time (the cutoff is
        a quantile of the timestamps, exact up to 2^17 distinct ones; events at the cutoff time
        go to eval); "time": eval is the last `eval_fraction` of the time range.
      max_bad_fraction: the run fails when more than this fraction of records is rejected.
      parse: validation settings (domains, timestamp range).
      user_shards: number of user shards (0: from the input size, about 100,000 events each).
      shard_bytes: byte range one worker parses of a plain text file.
      spill_pieces: the parsed pieces go from the parse stage to the user shards through files
        under the output directory (`.temp/pieces-*.arrows`, removed when the run completes),
        and the shuffle carries only (path, offset, length); False: the pieces themselves go
        through the shuffle, which the DirectRunner holds in memory (measured: about 70 bytes an
        event more at the peak).
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
    user_shards: int = 0
    shard_bytes: int = SHARD_BYTES
    spill_pieces: bool = True

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
        if not 0 <= self.user_shards <= MAX_USER_SHARDS:
            raise ValueError(f"`user_shards` must be in [0, {MAX_USER_SHARDS}]. Received: user_shards={self.user_shards}")
        if self.shard_bytes <= 0:
            raise ValueError(f"`shard_bytes` must be positive. Received: shard_bytes={self.shard_bytes}")
        F.Contract(("check",), self.history_length, self.domain_history_length)

    def contract(self, domains) -> F.Contract:
        return F.Contract(tuple(domains), self.history_length, self.domain_history_length)


class IngestError(RuntimeError):
    """The run finished but its input was unacceptable (e.g. too many bad records)."""


# ---- Reading: files -> shards -> blocks of events, cut by user shard ----------------------------


class _Shard(NamedTuple):
    """Lines of `path` that start in [start, end); end None: to the end of the file."""

    path: str
    start: int
    end: Optional[int]


def _splittable(path: str) -> bool:
    return not path.endswith(".parquet") and CompressionTypes.detect_compression_type(path) == CompressionTypes.UNCOMPRESSED


def _file_shards(metadata, shard_bytes: int):
    """A file's shards: byte ranges of a plain text file, else the whole file."""
    path, size = metadata.path, metadata.size_in_bytes
    if not _splittable(path) or size <= shard_bytes:
        yield _Shard(path, 0, None)
        return
    starts = list(range(0, size, shard_bytes))
    for start, end in zip(starts, starts[1:] + [None]):
        yield _Shard(path, start, end)


def _owned_blocks(handle, start: int, end: Optional[int], block_bytes: int):
    """Blocks of the whole lines of `handle` (at `start`) that start in [start, end)."""
    if start > 0:
        handle.seek(start - 1)
        if handle.read(1) != b"\n":  # a line that began before `start`: the previous shard's
            start += len(handle.readline())
    if end is not None and start >= end:
        return
    carry, carry_start = b"", start  # carry: the bytes from carry_start on not yet yielded
    while True:
        data = handle.read(block_bytes)
        if not data:
            if carry:
                yield carry
            return
        buf = carry + data
        if end is not None and carry_start + len(buf) >= end:
            stop = buf.find(b"\n", end - carry_start - 1)  # the end of the line holding byte end - 1
            if stop != -1:
                yield buf[:stop + 1]
                return
            carry = buf
            continue
        cut = buf.rfind(b"\n") + 1
        if cut:
            yield buf[:cut]
        carry, carry_start = buf[cut:], carry_start + cut


def _line_count(block: bytes) -> int:
    return block.count(b"\n") + (0 if block.endswith(b"\n") else 1)


def user_shard_of(users, shards: int) -> np.ndarray:
    """The user shard of each user id (a pyarrow string array): crc32 of the UTF-8 id, mod `shards`."""
    import pyarrow.compute as pc

    encoded = pc.dictionary_encode(users)
    if hasattr(encoded, "combine_chunks"):
        encoded = encoded.combine_chunks()
    hashes = np.array([zlib.crc32(u.encode()) for u in encoded.dictionary.to_pylist()], np.int64)
    return (hashes % shards)[encoded.indices.to_numpy()] if len(hashes) else np.zeros(0, np.int64)


def to_ipc(table) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(data: bytes):
    import pyarrow as pa

    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def _ts_summary(ts: np.ndarray):
    """Timestamps -> (distinct values, counts): the input of `_TsQuantile` and `_MinMax`."""
    values, counts = np.unique(ts, return_counts=True)
    return values, counts


def _spill_pieces(spill_dir: str, pieces):
    """[(user shard, IPC bytes)] -> [(user shard, (path, offset, length))]: the pieces written one
    after the other to one new file under `spill_dir` (a parse block's pieces: one file a block)."""
    path = FileSystems.join(spill_dir, f"pieces-{uuid.uuid4().hex}.arrows")
    refs, offset = [], 0
    with FileSystems.create(path, mime_type="application/octet-stream",
                            compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        for shard, data in pieces:
            handle.write(data)
            refs.append((shard, (path, offset, len(data))))
            offset += len(data)
    return refs


def _load_pieces(pieces) -> list:
    """Pieces as IPC bytes: in-memory ones as they are, spilled ones read from their files (the
    ranges of one file in a single pass)."""
    loaded, by_path = [None] * len(pieces), collections.defaultdict(list)
    for i, piece in enumerate(pieces):
        if isinstance(piece, bytes):
            loaded[i] = piece
        else:
            by_path[piece[0]].append((piece[1], piece[2], i))
    for path, ranges in by_path.items():
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            for offset, length, i in sorted(ranges):
                handle.seek(offset)
                data = handle.read(length)
                if len(data) != length:
                    raise IOError(f"{path}: the piece at byte {offset} has {len(data)} of its {length} bytes; "
                                  f"the spilled file is truncated")
                loaded[i] = data
    return loaded


class _ParseShard(beam.DoFn):
    """_Shard -> (user shard, Arrow IPC piece of its good events), plus tagged outputs:

    'dead': (path, (shard start, DeadLetter numbered from the shard's first line)),
    'lines': (path, (shard start, lines the shard owns)), 'read': (path, records read),
    'ts': a block's timestamp summary, 'domains': a block's distinct domains.

    With `spill_dir`, a piece is (path, offset, length) of its bytes in a file there, not the bytes.
    """

    DEAD, LINES, READ, TS, DOMAINS = "dead", "lines", "read", "ts", "domains"

    def __init__(self, options: records.ParseOptions, user_shards: int, block_bytes: int = BLOCK_BYTES,
                 spill_dir: Optional[str] = None):
        self._options, self._user_shards, self._block_bytes = options, user_shards, block_bytes
        self._spill_dir = spill_dir

    def process(self, shard: _Shard):
        path = shard.path
        read, lines = 0, 0
        if path.endswith(".parquet"):
            blocks = self._parquet(path)
        elif shard.end is None and shard.start == 0:
            blocks = self._text(FileSystems.open(path), shard)  # gzip detected from the name
        else:
            blocks = self._text(FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED), shard)
        for parsed, block_lines in blocks:
            yield from self._emit(parsed, shard)
            read += parsed.read
            lines += block_lines
        yield beam.pvalue.TaggedOutput(self.READ, (path, read))
        yield beam.pvalue.TaggedOutput(self.LINES, (path, (shard.start, lines)))

    def _parquet(self, path):
        import pyarrow.parquet as pq

        row = 0
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=65536):
                yield records.parse_arrow_batch(batch, row + 1, path, self._options), batch.num_rows
                row += batch.num_rows

    def _text(self, handle, shard: _Shard):
        """(ParsedBlock, lines) of the lines the shard owns; a CSV file's lines up to its header first."""
        with handle:
            start, header, owned = shard.start, None, 0
            if records.is_csv_source(shard.path):
                header, header_end, preamble = _csv_preamble(handle, shard.path)
                mine = [(start_, dead) for start_, dead in preamble
                        if start_ >= shard.start and (shard.end is None or start_ < shard.end)]
                dead = [d for _, d in mine if d is not None]
                owned = len(mine)
                yield records.ParsedBlock(records.events_table([]), dead, len(dead)), owned
                if shard.start == 0 and shard.end is None:
                    start = None  # read on from the header: a gzip handle cannot seek
                else:
                    start = max(start, header_end)
                    handle.seek(0)
            if start is None:
                blocks = _owned_blocks(handle, 0, None, self._block_bytes)
            else:
                blocks = _owned_blocks(handle, start, shard.end, self._block_bytes)
            for block in blocks:
                count = _line_count(block)
                yield records.parse_block(block, owned + 1, shard.path, self._options, header), count
                owned += count

    def _emit(self, parsed: records.ParsedBlock, shard: _Shard):
        for dead in parsed.dead:
            yield beam.pvalue.TaggedOutput(self.DEAD, (shard.path, (shard.start, dead)))
        events = parsed.events
        if not events.num_rows:
            return
        yield beam.pvalue.TaggedOutput(self.TS, _ts_summary(events.column(F.LOG_TS).to_numpy()))
        yield beam.pvalue.TaggedOutput(self.DOMAINS, tuple(sorted(set(events.column(F.LOG_DOMAIN).unique().to_pylist()))))
        shards = user_shard_of(events.column(F.LOG_USER_ID), self._user_shards)
        order = np.argsort(shards, kind="stable")
        sorted_shards = shards[order]
        bounds = np.flatnonzero(np.diff(sorted_shards)) + 1
        pieces = [(int(sorted_shards[lo]), to_ipc(events.take(order[lo:hi])))
                  for lo, hi in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(order)]]))]
        yield from (_spill_pieces(self._spill_dir, pieces) if self._spill_dir else pieces)


def _csv_preamble(handle, source: str):
    """A CSV file's lines up to its header, the first non-blank line.

    Returns (header or None, byte offset after it, [(line start, DeadLetter or None)] for every
    line up to and including the header; dead letters are lines that are not UTF-8).
    """
    offset, lines = 0, []
    for number, raw in enumerate(iter(handle.readline, b""), start=1):
        text = records._line_text(raw, source, number)
        lines.append((offset, text if isinstance(text, records.DeadLetter) else None))
        offset += len(raw)
        if isinstance(text, str):
            return records.csv_header(text), offset, lines
    return None, offset, lines


def _number_dead_letters(element):
    """(path, {dead: [(shard start, local DeadLetter)], lines: [(shard start, lines)]}) -> DeadLetters
    numbered in the file: a shard's lines come after those of the shards before it."""
    _, joined = element
    offsets, total = {}, 0
    for start, count in sorted(joined["lines"]):
        offsets[start] = total
        total += count
    for start, dead in joined["dead"]:
        yield dataclasses.replace(dead, line=dead.line + offsets[start])


class _Read(NamedTuple):
    """What `_ReadEvents` gives: PCollections of pieces, dead letters, (path, records read),
    timestamp summaries and domain tuples."""

    pieces: object
    dead: object
    read: object
    timestamps: object
    domains: object


class _ReadEvents(beam.PTransform):
    """File patterns -> `_Read`."""

    def __init__(self, patterns: Sequence[str], options: records.ParseOptions, user_shards: int,
                 shard_bytes: int = SHARD_BYTES, spill_dir: Optional[str] = None):
        super().__init__()
        self._patterns, self._options = list(patterns), options
        self._user_shards, self._shard_bytes, self._spill_dir = user_shards, shard_bytes, spill_dir

    def expand(self, pbegin):
        parsed = (
            pbegin
            | "Patterns" >> beam.Create(self._patterns)
            | "Match" >> fileio.MatchAll(fileio.EmptyMatchTreatment.DISALLOW)
            | "Shards" >> beam.FlatMap(_file_shards, self._shard_bytes)
            | "Reshuffle" >> beam.Reshuffle()  # shards spread over the workers
            | "Parse" >> beam.ParDo(
                _ParseShard(self._options, self._user_shards, spill_dir=self._spill_dir)).with_outputs(
                _ParseShard.DEAD, _ParseShard.LINES, _ParseShard.READ, _ParseShard.TS, _ParseShard.DOMAINS,
                main="pieces")
        )
        dead = (
            {"dead": parsed[_ParseShard.DEAD], "lines": parsed[_ParseShard.LINES]}
            | "JoinLines" >> beam.CoGroupByKey()
            | "NumberDead" >> beam.FlatMap(_number_dead_letters)
        )
        return _Read(parsed.pieces, dead, parsed[_ParseShard.READ], parsed[_ParseShard.TS], parsed[_ParseShard.DOMAINS])


def _piece_events(element):
    _, data = element
    return [tuple(e) for e in records.table_events(from_ipc(data))]


class ReadClickLogs(beam.PTransform):
    """File patterns -> (good events as tuples, dead letters), plus ((path, records read), ...) with `with_counts`.

    A row view of the reader the ingestion uses (which keeps events in columnar pieces).
    """

    def __init__(self, patterns: Sequence[str], options: records.ParseOptions, with_counts: bool = False,
                 shard_bytes: int = SHARD_BYTES):
        super().__init__()
        self._patterns, self._options, self._with_counts, self._shard_bytes = list(patterns), options, with_counts, shard_bytes

    def expand(self, pbegin):
        read = pbegin | "ReadEvents" >> _ReadEvents(self._patterns, self._options, 1, self._shard_bytes)
        good = read.pieces | "Rows" >> beam.FlatMap(_piece_events)
        if self._with_counts:
            return good, read.dead, read.read
        return good, read.dead


def _dead_letter_json(dead: records.DeadLetter) -> str:
    return json.dumps(dataclasses.asdict(dead), sort_keys=True)


def default_user_shards(patterns: Sequence[str]) -> int:
    """User shards for about EVENTS_PER_USER_SHARD events each, guessed from the input size
    (about 100 bytes an event; gzip and Parquet about 6x smaller)."""
    total = 0
    for result in FileSystems.match(list(patterns)):
        for metadata in result.metadata_list:
            total += metadata.size_in_bytes * (1 if _splittable(metadata.path) else 6)
    return int(np.clip(np.ceil(total / 100 / EVENTS_PER_USER_SHARD), 1, MAX_USER_SHARDS))


# ---- The eval cutoff -----------------------------------------------------------------------------


def _eval_cutoff(bounds, eval_fraction: float) -> Optional[int]:
    """split_by="time": the last `eval_fraction` of the time range [low, high]."""
    low, high = bounds
    if low is None:  # no good records: no cutoff; check_bad_fraction reports the input
        return None
    return int(high - eval_fraction * (high - low))


class _MinMax(beam.CombineFn):
    """Timestamp summaries -> (lowest, highest) timestamp, (None, None) for none."""

    def create_accumulator(self):
        return (None, None)

    def add_input(self, acc, summary):
        values, _ = summary
        return self.merge_accumulators([acc, (int(values[0]), int(values[-1]))])

    def merge_accumulators(self, accs):
        lows = [low for low, _ in accs if low is not None]
        highs = [high for _, high in accs if high is not None]
        return (min(lows), max(highs)) if lows else (None, None)

    def extract_output(self, acc):
        return acc


class _TsQuantile(beam.CombineFn):
    """Timestamp summaries -> the cutoff with the last `eval_fraction` of the events at or after it.

    The accumulator is (distinct timestamps, counts); past `capacity` distinct timestamps it keeps
    `capacity` of them, each with the count of the stretch it starts, so a rank is off by at most
    a 1/capacity share of the events per compaction.
    """

    def __init__(self, eval_fraction: float, capacity: int = 1 << 17):
        self._fraction, self._capacity = eval_fraction, capacity

    def create_accumulator(self):
        return (np.zeros(0, np.int64), np.zeros(0, np.int64))

    def add_input(self, acc, summary):
        return self.merge_accumulators([acc, summary])

    def merge_accumulators(self, accs):
        values = np.concatenate([np.asarray(v, np.int64) for v, _ in accs])
        counts = np.concatenate([np.asarray(c, np.int64) for _, c in accs])
        values, inverse = np.unique(values, return_inverse=True)
        counts = np.bincount(inverse, weights=counts, minlength=len(values)).astype(np.int64)
        if len(values) > self._capacity:
            stretch = np.cumsum(counts) * self._capacity // (counts.sum() + 1)  # (monotone) stretch of each value
            first = np.concatenate([[True], stretch[1:] != stretch[:-1]])
            values, counts = values[first], np.add.reduceat(counts, np.flatnonzero(first))
        return values, counts

    def extract_output(self, acc):
        values, counts = acc
        if not len(values):
            return None
        rank = int((1 - self._fraction) * counts.sum())  # the events of rank >= this one are eval
        return int(values[np.searchsorted(np.cumsum(counts), rank, side="right")])


# ---- Writing gzip TFRecords in batches -----------------------------------------------------------


def _masked_crc32c(crcs: np.ndarray) -> np.ndarray:
    """TFRecord's masked CRC32C of each crc (uint64 array)."""
    crcs = np.asarray(crcs, np.uint64)
    rotated = ((crcs >> np.uint64(15)) | (crcs << np.uint64(17))) & np.uint64(0xFFFFFFFF)
    return (rotated + np.uint64(0xA282EAD8)) & np.uint64(0xFFFFFFFF)


class GzipTFRecordWriter:
    """Writes TFRecord files (gzip) a batch of records at a time, through Beam's filesystems.

    A batch is framed (length, masked CRC32C of the length, record, masked CRC32C of the record)
    with one CRC call per record, and compressed in one zlib call on a background thread, so
    compression overlaps the making of the next batch. The file is one gzip member, as
    `tf.io.TFRecordWriter` writes with GZIP.
    """

    def __init__(self, path: str, level: int = GZIP_LEVEL):
        self.path = path
        self._file = FileSystems.create(path, mime_type="application/octet-stream",
                                        compression_type=CompressionTypes.UNCOMPRESSED)
        self._zip = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._pending = None
        self._headers = {}  # record length -> its 12 header bytes
        self.records = 0

    def _header(self, length: int) -> bytes:
        header = self._headers.get(length)
        if header is None:
            import google_crc32c

            encoded = struct.pack("<Q", length)
            header = encoded + struct.pack("<I", int(_masked_crc32c([google_crc32c.value(encoded)])[0]))
            self._headers[length] = header
        return header

    def write(self, records: Sequence[bytes]) -> None:
        """Writes a batch of records."""
        import google_crc32c

        footers = _masked_crc32c([google_crc32c.value(r) for r in records]).astype("<u4").tobytes()
        parts = []
        for i, record in enumerate(records):
            parts += (self._header(len(record)), record, footers[4 * i:4 * i + 4])
        self._wait()
        self._pending = self._thread.submit(self._compress, b"".join(parts))
        self.records += len(records)

    def _compress(self, framed: bytes) -> None:
        self._file.write(self._zip.compress(framed))

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def close(self) -> None:
        self._wait()
        self._thread.shutdown()
        self._file.write(self._zip.flush())
        self._file.close()


def _ensure_dir(path: str) -> None:
    if not FileSystems.exists(path):
        try:
            FileSystems.mkdirs(path)
        except IOError:  # made meanwhile by another worker
            pass


# ---- Examples of a user shard --------------------------------------------------------------------

ORACLE_BINS = 100_000


def _empty_stats() -> dict:
    """Stats of no examples: what `_SplitStats` sums up. "oracle": per label, (score bins, counts)."""
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    return {"domains": {}, "history_lengths": {}, "cold_start": 0, "rows": 0, "oracle": [empty, empty], "users": {}}


def _bin_counts(bins, counts=None):
    """Score bins (with counts, or one each) -> (distinct bins, summed counts)."""
    bins = np.asarray(bins, np.int64)
    values, inverse = np.unique(bins, return_inverse=True)
    weights = np.ones(len(bins), np.int64) if counts is None else np.asarray(counts, np.int64)
    return values, np.bincount(inverse, weights=weights, minlength=len(values)).astype(np.int64)


def _add(counts: dict, key, n) -> None:
    counts[key] = counts.get(key, 0) + n


def _columns_stats(c: sequences.ExampleColumns, contract: F.Contract) -> dict:
    """Stats of a block of examples of whole users (users counted per domain: no user is in two blocks)."""
    stats = _empty_stats()
    n, num_domains = c.size, len(contract.domains)
    rows = np.bincount(c.domain, minlength=num_domains)
    clicks = np.bincount(c.domain, weights=c.label, minlength=num_domains)
    cold = np.bincount(c.domain, weights=c.cold_start, minlength=num_domains)
    users = np.bincount(np.unique(c.user * num_domains + c.domain) % num_domains, minlength=num_domains)
    for d in np.flatnonzero(rows):
        name = contract.domains[d]
        stats["domains"][name] = {"rows": int(rows[d]), "clicks": int(clicks[d]), "cold_start_rows": int(cold[d])}
        stats["users"][name] = int(users[d])
    lengths = np.bincount(c.event_hist_length())
    stats["history_lengths"] = {str(k): int(v) for k, v in enumerate(lengths) if v}
    stats["rows"], stats["cold_start"] = n, int(c.cold_start.sum())
    scored = c.has_oracle & np.isfinite(c.oracle)
    bins = np.minimum(np.trunc(c.oracle[scored] * ORACLE_BINS).astype(np.int64), ORACLE_BINS - 1)
    stats["oracle"] = [_bin_counts(bins[c.label[scored] == label]) for label in (0, 1)]
    return stats


def _row_stats(rows: Iterable[tuple]) -> dict:
    """Stats of example rows (see `_stats_row`); users are counted apart (a heavy user spans blocks)."""
    stats, bins = _empty_stats(), ([], [])
    for domain, _, label, history_length, target_clicks, other_clicks, oracle in rows:
        if oracle is not None and np.isfinite(oracle):
            bins[label].append(min(int(oracle * ORACLE_BINS), ORACLE_BINS - 1))
        d = stats["domains"].setdefault(domain, {"rows": 0, "clicks": 0, "cold_start_rows": 0})
        cold = int(target_clicks == 0 and other_clicks > 0)
        d["rows"] += 1
        d["clicks"] += label
        d["cold_start_rows"] += cold
        stats["cold_start"] += cold
        stats["rows"] += 1
        _add(stats["history_lengths"], str(history_length), 1)
    stats["oracle"] = [_bin_counts(b) for b in bins]
    return stats


def _user_chunks(user: np.ndarray, size: int):
    """(start, stop) of runs of about `size` events that never cut a user (sorted `user` codes)."""
    n = len(user)
    starts = np.flatnonzero(np.concatenate([[True], user[1:] != user[:-1]])) if n else np.zeros(0, np.int64)
    lo = 0
    while lo < n:
        k = np.searchsorted(starts, lo + size, side="left")
        hi = int(starts[k]) if k < len(starts) else n
        hi = hi if hi > lo else (int(starts[k + 1]) if k + 1 < len(starts) else n)
        yield lo, hi
        lo = hi


class _ShardExamples(beam.DoFn):
    """(user shard, pieces) -> its examples written to one file per split; tagged outputs:

    'stats': (split, stats of its examples), 'dup': duplicates dropped, 'heavy': ((user, block),
    event tuple) of each event of a heavy user, for the block stages.
    """

    STATS, DUPLICATES, HEAVY = "stats", "dup", "heavy"

    def __init__(self, output_dir: str, user_shards: int, heavy_user_events: int, block_seconds: int):
        self._output_dir, self._user_shards = output_dir, user_shards
        self._heavy_user_events, self._block_seconds = heavy_user_events, block_seconds

    def process(self, element, contract, cutoff):
        import pyarrow as pa
        import pyarrow.compute as pc

        shard, pieces = element
        pieces = _load_pieces(list(pieces))
        users = pa.chunked_array([from_ipc(p).column(F.LOG_USER_ID) for p in pieces])
        counts = pc.value_counts(users).flatten()
        heavy = pc.filter(counts[0], pc.greater(counts[1], self._heavy_user_events))
        tables = []
        for piece in pieces:
            table = from_ipc(piece)
            if len(heavy):
                is_heavy = pc.is_in(table.column(F.LOG_USER_ID), value_set=heavy)
                for event in records.table_events(table.filter(is_heavy)):
                    yield beam.pvalue.TaggedOutput(
                        self.HEAVY, ((event.user_id, event.ts // self._block_seconds), tuple(event)))
                table = table.filter(pc.invert(is_heavy))
            tables.append(table)
        table, duplicates = sequences.sort_and_dedupe(pa.concat_tables(tables))
        if duplicates:
            yield beam.pvalue.TaggedOutput(self.DUPLICATES, duplicates)
        if not table.num_rows:
            return
        writers = {}
        user_codes = pc.dictionary_encode(table.column(F.LOG_USER_ID)).combine_chunks().indices.to_numpy()
        try:
            for lo, hi in _user_chunks(user_codes, CHUNK_EVENTS):
                columns = sequences.columnar_examples(table.slice(lo, hi - lo), contract)
                is_eval = columns.ts >= cutoff
                for split, rows in ((F.TRAIN_SPLIT, np.flatnonzero(~is_eval)), (F.EVAL_SPLIT, np.flatnonzero(is_eval))):
                    if not len(rows):
                        continue
                    part = columns.take(rows)
                    yield beam.pvalue.TaggedOutput(self.STATS, (split, _columns_stats(part, contract)))
                    if split not in writers:
                        writers[split] = GzipTFRecordWriter(
                            os.path.join(self._output_dir, TEMP_DIR, f"{split}-{shard}-{uuid.uuid4().hex}.gz"))
                    for _, examples in sequences.encode_examples(part, contract):
                        writers[split].write(examples)
        finally:
            for writer in writers.values():
                writer.close()
        for split, writer in writers.items():
            final_dir = split_dir(self._output_dir, split)
            _ensure_dir(final_dir)
            FileSystems.rename([writer.path], [os.path.join(
                final_dir, f"data_tfrecord-{shard:05d}-of-{self._user_shards:05d}.gz")])


# ---- Heavy users: (user, time block) groups ------------------------------------------------------


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
    """Joined (user, block) -> serialized examples tagged by split; (split, stats) of the block
    (tag 'stats'); (split, (domain, user)) of every example (tag 'users')."""

    STATS, USERS = "stats", "users"

    def process(self, element, contract, cutoff):
        (user, _), joined = element
        (events,), (state,) = joined["events"], joined["state"]
        rows = {F.TRAIN_SPLIT: [], F.EVAL_SPLIT: []}
        for example in sequences.user_examples(user, events, contract, state):
            split = F.EVAL_SPLIT if example[F.TIMESTAMP] >= cutoff else F.TRAIN_SPLIT
            yield beam.pvalue.TaggedOutput(split, sequences.serialize_example(example))
            rows[split].append(_stats_row(example))
        for split, split_rows in rows.items():
            if split_rows:
                yield beam.pvalue.TaggedOutput(self.STATS, (split, _row_stats(split_rows)))
                for domain in {row[0] for row in split_rows}:
                    yield beam.pvalue.TaggedOutput(self.USERS, (split, (domain, user)))


def _stats_row(example: dict) -> tuple:
    """(domain, user, label, history length, target-domain clicks, other-domain clicks, oracle ctr)."""
    return (example[F.DOMAIN].decode(), example[F.USER_ID], example[F.LABEL], example[F.HISTORY_LENGTH],
            example[F.TARGET_DOMAIN_CLICKS], example[F.OTHER_DOMAIN_CLICKS], example.get(F.ORACLE_CTR))


# ---- Stats and summary ---------------------------------------------------------------------------


def _binned_auc(positives, negatives):
    """AUC from (bins, counts) of positive and negative scores (ties within a bin count half)."""
    total_pos, total_neg = int(positives[1].sum()), int(negatives[1].sum())
    if not total_pos or not total_neg:
        return None
    bins = np.union1d(positives[0], negatives[0])
    p, n = np.zeros(len(bins)), np.zeros(len(bins))
    p[np.searchsorted(bins, positives[0])] = positives[1]
    n[np.searchsorted(bins, negatives[0])] = negatives[1]
    below = np.cumsum(n) - n  # negatives in lower bins
    return float(np.sum(p * (below + 0.5 * n))) / (total_pos * total_neg)


class _SplitStats(beam.CombineFn):
    """Stats of blocks of one split's examples -> rows, clicks and CTR per domain, history lengths,
    cold start, and (generated logs) the AUC of the true click probability `oracle_ctr`, the
    ceiling for models.

    Cold start: no earlier click in the target domain but some elsewhere. The oracle AUC is
    computed from 100,000 score bins, so memory stays constant.
    """

    def create_accumulator(self):
        return _empty_stats()

    def add_input(self, acc, stats):
        return self.merge_accumulators([acc, stats])

    def merge_accumulators(self, accs):
        result, accs = _empty_stats(), list(accs)
        result["oracle"] = [_bin_counts(np.concatenate([acc["oracle"][label][0] for acc in accs] + [[]]),
                                        np.concatenate([acc["oracle"][label][1] for acc in accs] + [[]]))
                            for label in (0, 1)]
        for acc in accs:
            result["rows"] += acc["rows"]
            result["cold_start"] += acc["cold_start"]
            for k, n in acc["history_lengths"].items():
                _add(result["history_lengths"], k, n)
            for domain, n in acc["users"].items():
                _add(result["users"], domain, n)
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


def _stats_json(stats, heavy_users):
    """The split's stats as JSON, users per domain = those of the user shards + the heavy ones."""
    users = stats.pop("users")
    for domain, n in heavy_users:
        _add(users, domain, n)
    for domain, n in users.items():
        stats["domains"].setdefault(domain, {})["users"] = n
    return json.dumps(stats, sort_keys=True, indent=2)


def _summarise(split_stats, dead_counts, duplicates, cutoff, contract, read=()):
    rows = {F.TRAIN_SPLIT: 0, F.EVAL_SPLIT: 0}
    for split, stats in split_stats:
        rows[split] += stats["rows"]
    summary = {
        "records_read": sum(n for _, n in read),
        "files_read": len({path for path, _ in read}),
        "contract": contract.to_dict() if contract else None,
        "rows": rows,
        "dead_letter": {reason: n for reason, n in dead_counts},
        "duplicates_dropped": sum(duplicates),
        "eval_cutoff_ts": cutoff,
    }
    summary["good_records"] = sum(summary["rows"].values())
    summary["bad_records"] = sum(summary["dead_letter"].values())
    return json.dumps(summary, sort_keys=True, indent=2)


def _finish(output_dir: str, *summary_args) -> str:
    """The summary JSON, once every example file is in place; removes the temporary files."""
    temp = os.path.join(output_dir, TEMP_DIR)
    leftovers = FileSystems.match([FileSystems.join(temp, "*")])[0].metadata_list  # from failed attempts
    if leftovers:
        FileSystems.delete([m.path for m in leftovers])
    if FileSystems.exists(temp):  # a local directory (object stores have none)
        FileSystems.delete([temp])
    return _summarise(*summary_args)


def schema_text(contract: F.Contract) -> str:
    """The tf.Example schema of the contract, as a tensorflow_metadata Schema in text format."""
    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import schema_pb2

    types = {"bytes": schema_pb2.BYTES, "int64": schema_pb2.INT}
    schema = schema_pb2.Schema()
    for name, (kind, shape, _) in sorted(contract.feature_layout().items()):
        feature = schema.feature.add(name=name, type=types[kind])
        for size in shape:
            feature.shape.dim.add(size=size)
        feature.presence.min_fraction = 1.0
    return text_format.MessageToString(schema)


def build(pipeline: beam.Pipeline, config: IngestConfig, output_dir: str):
    """Adds the ingestion to `pipeline`; returns nothing (it writes under `output_dir`)."""
    user_shards = config.user_shards or default_user_shards(config.input_patterns)
    spill_dir = os.path.join(output_dir, TEMP_DIR) if config.spill_pieces else None
    read = pipeline | "Read" >> _ReadEvents(config.input_patterns, config.parse, user_shards, config.shard_bytes, spill_dir)

    if config.split_by == "time":
        cutoff = (read.timestamps | "MinMax" >> beam.CombineGlobally(_MinMax())
                  | "Cutoff" >> beam.Map(_eval_cutoff, config.eval_fraction))
    else:
        cutoff = read.timestamps | "Cutoff" >> beam.CombineGlobally(_TsQuantile(config.eval_fraction))
    if config.parse.domains:
        domains = pipeline | "Domains" >> beam.Create([tuple(config.parse.domains)])
    else:
        domains = (
            read.domains
            | "DomainSets" >> beam.Map(set)
            | "AllDomains" >> beam.CombineGlobally(lambda sets: set().union(*sets))
            | "Sort" >> beam.Map(lambda ds: tuple(sorted(ds)))
        )
    contract = domains | "Contract" >> beam.Map(lambda ds: config.contract(ds) if ds else None)
    contract_side, cutoff_side = beam.pvalue.AsSingleton(contract), beam.pvalue.AsSingleton(cutoff)

    shards = (
        read.pieces
        | "GroupShards" >> beam.GroupByKey()
        | "ShardExamples" >> beam.ParDo(
            _ShardExamples(output_dir, user_shards, config.heavy_user_events, config.block_seconds),
            contract_side, cutoff_side).with_outputs(_ShardExamples.STATS, _ShardExamples.DUPLICATES,
                                                     _ShardExamples.HEAVY, main="none")
    )
    # Heavy users: grouped by (user, time block); each block's state at its start is the sum of
    # the states of the user's earlier blocks.
    blocks = (
        shards[_ShardExamples.HEAVY]
        | "GroupBlock" >> beam.GroupByKey()
        | "Dedupe" >> beam.ParDo(_Block()).with_outputs(_Block.DUPLICATES, main="blocks")
    )
    starts = (
        blocks.blocks
        | "BlockState" >> beam.Map(lambda kv, c: (kv[0][0], (kv[0][1], sequences.block_state(kv[1], c))), contract_side)
        | "GroupUser" >> beam.GroupByKey()
        | "Prefix" >> beam.FlatMap(_block_states, contract_side)
    )
    splits = [F.TRAIN_SPLIT, F.EVAL_SPLIT]
    heavy = (
        {"events": blocks.blocks, "state": starts}
        | "Join" >> beam.CoGroupByKey()
        | "HeavyExamples" >> beam.ParDo(_BlockExamples(), contract_side, cutoff_side).with_outputs(
            _BlockExamples.STATS, _BlockExamples.USERS, *splits)
    )
    stats = (shards[_ShardExamples.STATS], heavy[_BlockExamples.STATS]) | "AllStats" >> beam.Flatten()
    split_stats = []
    for split in splits:
        # Beam's writer makes a file even for no examples, so every split has one.
        heavy[split] | f"Write{split}" >> beam.io.WriteToTFRecord(
            os.path.join(split_dir(output_dir, split), HEAVY_FILE_PREFIX), file_name_suffix=".gz")
        heavy_users = (
            heavy[_BlockExamples.USERS]
            | f"Users{split}" >> beam.Filter(lambda kv, s=split: kv[0] == s)
            | f"UserDomain{split}" >> beam.Map(lambda kv: kv[1])
            | f"DistinctUsers{split}" >> beam.Distinct()
            | f"CountUsers{split}" >> beam.combiners.Count.PerKey()
            | f"UserDomains{split}" >> beam.Map(lambda kv: (kv[0], kv[1]))
        )
        merged = (
            stats
            | f"Of{split}" >> beam.Filter(lambda kv, s=split: kv[0] == s)
            | f"Values{split}" >> beam.Map(lambda kv: kv[1])
            | f"Stats{split}" >> beam.CombineGlobally(_SplitStats())
        )
        split_stats.append(merged | f"Key{split}" >> beam.Map(lambda s, split=split: (split, s)))
        (
            merged
            | f"StatsJson{split}" >> beam.Map(lambda s, users: _stats_json(dict(s), users), beam.pvalue.AsList(heavy_users))
            | f"WriteStats{split}" >> beam.io.WriteToText(os.path.join(output_dir, STATS_DIR, f"{split}.json"),
                                                          shard_name_template="")
        )

    dead = read.dead
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
    all_split_stats = split_stats | "Splits" >> beam.Flatten()
    duplicates = (shards[_ShardExamples.DUPLICATES], blocks[_Block.DUPLICATES]) | "AllDuplicates" >> beam.Flatten()
    dead_counts = dead | "Reason" >> beam.Map(lambda d: d.reason) | "CountReasons" >> beam.combiners.Count.PerElement()
    (
        pipeline
        | "One" >> beam.Create([None])
        | "Summary" >> beam.Map(
            lambda _, splits, reasons, dups, cut, c, read: _finish(output_dir, splits, reasons, dups, cut, c, read),
            splits=beam.pvalue.AsList(all_split_stats),
            reasons=beam.pvalue.AsList(dead_counts),
            dups=beam.pvalue.AsList(duplicates),
            cut=cutoff_side,
            c=contract_side,
            read=beam.pvalue.AsList(read.read),
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
