"""Parsing and validation of click-log records.

Every line either becomes a `Impression` or a `DeadLetter` that names the file, the line, the
field and what was expected. Nothing is dropped silently.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import functools
import io
import json
from typing import Iterable, NamedTuple, Optional, Sequence, Union

import numpy as np

from xdctr import features as F

# Dead-letter reasons.
MALFORMED = "malformed"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
BAD_LABEL = "bad_label"
EMPTY_ID = "empty_id"
BAD_TIMESTAMP = "bad_timestamp"
UNKNOWN_DOMAIN = "unknown_domain"


class Impression(NamedTuple):
    """One validated impression; `ts` is epoch seconds.

    Beam pickles NamedTuples (its fast tuple coder takes only plain tuples, and pickling is about
    4x slower), so the pipeline ships `tuple(impression)` between stages, or columnar blocks.
    """

    ts: int
    user_id: str
    domain: str
    item_id: str
    clicked: int
    oracle_ctr: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """A rejected record and why: `reason` is one of the module's reason constants."""

    source: str
    line: int
    reason: str
    field: str
    detail: str
    raw: str

    def message(self) -> str:
        where = f"{self.source}:{self.line}"
        field = f" field '{self.field}'" if self.field else ""
        return f"{where}:{field} {self.reason}: {self.detail}"


@dataclasses.dataclass(frozen=True)
class ParseOptions:
    """Validation settings.

    Attributes:
      domains: when non-empty, only these domains are accepted.
      min_ts / max_ts: accepted timestamp range in epoch seconds (inclusive).
    """

    domains: tuple = ()
    min_ts: int = 0
    max_ts: int = 4102444800  # 2100-01-01


def parse_timestamp(value) -> int:
    """Epoch seconds (int, float or digit string) or ISO 8601 -> epoch seconds; ValueError else."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a timestamp")
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, datetime.datetime):  # e.g. a Parquet timestamp column
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        return int(value.timestamp())
    text = str(value).strip()
    try:
        return int(float(text))
    except ValueError:
        pass
    parsed = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.timezone.utc)
    return int(parsed.timestamp())


def validate(record: dict, source: str, line: int, raw: str, options: ParseOptions) -> Union[Impression, DeadLetter]:
    """A parsed record (field -> value) -> Impression, or DeadLetter naming what is wrong."""

    def dead(reason, field, detail):
        return DeadLetter(source, line, reason, field, detail, raw)

    for field in F.LOG_REQUIRED_FIELDS:
        if field not in record or record[field] is None:
            return dead(MISSING_FIELD, field, "required field is missing")
    ids = {}
    for field in (F.LOG_USER_ID, F.LOG_DOMAIN, F.LOG_ITEM_ID):
        value = record[field]
        if isinstance(value, (dict, list, bool, float)):
            return dead(WRONG_TYPE, field, f"expected a string id, got {type(value).__name__}")
        ids[field] = str(value).strip()
        if not ids[field]:
            return dead(EMPTY_ID, field, "expected a non-empty id")
    clicked = record[F.LOG_CLICKED]
    if isinstance(clicked, str):
        clicked = clicked.strip()
    if clicked in (0, 1, "0", "1") and not isinstance(clicked, (bool, float)):
        clicked = int(clicked)
    else:
        return dead(BAD_LABEL, F.LOG_CLICKED, f"expected 0 or 1, got {record[F.LOG_CLICKED]!r}")
    try:
        ts = parse_timestamp(record[F.LOG_TS])
    except (ValueError, TypeError, OverflowError):
        return dead(BAD_TIMESTAMP, F.LOG_TS, f"expected epoch seconds or ISO 8601, got {record[F.LOG_TS]!r}")
    if not options.min_ts <= ts <= options.max_ts:
        return dead(BAD_TIMESTAMP, F.LOG_TS, f"{ts} is outside [{options.min_ts}, {options.max_ts}]")
    if options.domains and ids[F.LOG_DOMAIN] not in options.domains:
        return dead(UNKNOWN_DOMAIN, F.LOG_DOMAIN, f"{ids[F.LOG_DOMAIN]!r} is not one of {list(options.domains)}")
    oracle = record.get(F.LOG_ORACLE_CTR)
    try:
        oracle = None if oracle in (None, "") else float(oracle)
    except (TypeError, ValueError):
        return dead(WRONG_TYPE, F.LOG_ORACLE_CTR, f"expected a number, got {oracle!r}")
    return Impression(ts, ids[F.LOG_USER_ID], ids[F.LOG_DOMAIN], ids[F.LOG_ITEM_ID], clicked, oracle)


def parse_json_line(text: str, source: str, line: int, options: ParseOptions) -> Union[Impression, DeadLetter]:
    """One JSON Lines record."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return DeadLetter(source, line, MALFORMED, "", f"invalid JSON: {e.msg} at column {e.colno}", text)
    if not isinstance(record, dict):
        return DeadLetter(source, line, MALFORMED, "", f"expected a JSON object, got {type(record).__name__}", text)
    return validate(record, source, line, text, options)


def parse_csv_line(text: str, header: Sequence[str], source: str, line: int, options: ParseOptions) -> Union[Impression, DeadLetter]:
    """One CSV data line, given the file's header."""
    try:
        values = next(csv.reader(io.StringIO(text)))
    except (csv.Error, StopIteration) as e:
        return DeadLetter(source, line, MALFORMED, "", f"invalid CSV: {e}", text)
    if len(values) != len(header):
        return DeadLetter(source, line, MALFORMED, "", f"expected {len(header)} columns, got {len(values)}", text)
    return validate(dict(zip(header, values)), source, line, text, options)


def is_csv_source(source: str) -> bool:
    """CSV when the file name (not a directory) says so; JSON Lines otherwise."""
    return ".csv" in source.rsplit("/", 1)[-1]


def _line_text(raw: Union[str, bytes], source: str, number: int) -> Union[str, DeadLetter, None]:
    """A line as text without its line end; a DeadLetter when not UTF-8; None when blank."""
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return DeadLetter(source, number, MALFORMED, "", f"not UTF-8 at byte {e.start}", repr(raw))
    else:
        text = raw
    text = text.rstrip("\r\n")
    return text if text.strip() else None


def csv_header(text: str) -> list:
    return [h.strip() for h in next(csv.reader(io.StringIO(text)))]


def parse_line(raw: Union[str, bytes], number: int, source: str, options: ParseOptions,
               header: Optional[Sequence[str]] = None) -> Union[Impression, DeadLetter, None]:
    """One data line (its line end included or not): a CSV line when `header` is given, else JSON.

    None for a blank line.
    """
    text = _line_text(raw, source, number)
    if text is None or isinstance(text, DeadLetter):
        return text
    if header is not None:
        return parse_csv_line(text, header, source, number, options)
    return parse_json_line(text, source, number, options)


def parse_lines(lines: Iterable[Union[str, bytes]], source: str, options: ParseOptions):
    """Parses a whole text file (JSON Lines, or CSV when the name says so); yields results.

    Lines may be `bytes` (UTF-8) or `str`. Blank lines are skipped; line numbers are 1-based and
    count every line. The first non-blank line of a CSV file is its header.
    """
    is_csv = is_csv_source(source)
    header = None
    for number, raw in enumerate(lines, start=1):
        if is_csv and header is None:
            text = _line_text(raw, source, number)
            if isinstance(text, str):
                header = csv_header(text)
            elif text is not None:
                yield text
            continue
        result = parse_line(raw, number, source, options, header)
        if result is not None:
            yield result


# ---- Columnar parsing: blocks of lines -> pyarrow tables -----------------------------------------
#
# pyarrow parses a block of lines at once and the checks of `validate` run on whole columns. A
# row goes through the columnar path only when every check clearly passes; anything else (a
# line pyarrow cannot parse, an unusual type, a value a check rejects or that needs `validate`'s
# conversions) is parsed by `parse_line` above, which gives the exact Impression or DeadLetter
# (reason, detail, raw) of the row path. The columnar path only makes the common case fast.

EVENT_FIELDS = (F.LOG_TS, F.LOG_USER_ID, F.LOG_DOMAIN, F.LOG_ITEM_ID, F.LOG_CLICKED, F.LOG_ORACLE_CTR)
_ASCII_SPACE = b" \t\n\r\x0b\x0c"  # bytes.strip(); str.strip() strips these and more
_BOM = b"\xef\xbb\xbf"  # json.loads rejects it, pyarrow skips it
_SMALL_RANGE = 8  # a failing pyarrow block is halved down to this many lines, then parsed line by line


def event_schema():
    import pyarrow as pa

    return pa.schema([(F.LOG_TS, pa.int64()), (F.LOG_USER_ID, pa.string()), (F.LOG_DOMAIN, pa.string()),
                      (F.LOG_ITEM_ID, pa.string()), (F.LOG_CLICKED, pa.int8()), (F.LOG_ORACLE_CTR, pa.float64())])


def events_table(events: Sequence[Impression]):
    """Impressions -> a pyarrow table of `event_schema()`."""
    import pyarrow as pa

    columns = list(zip(*events)) if events else [[] for _ in EVENT_FIELDS]
    return pa.Table.from_arrays([pa.array(c, t) for c, t in zip(columns, event_schema().types)], schema=event_schema())


def table_events(table) -> list:
    """A pyarrow table of `event_schema()` -> Impressions."""
    return [Impression(*row) for row in zip(*(table.column(f).to_pylist() for f in EVENT_FIELDS))]


@functools.lru_cache(maxsize=None)
def _edge_space_regex() -> str:
    """An RE2 pattern matching strings that start or end with a character str.strip() removes."""
    spaces = "".join(f"\\x{{{ord(c):x}}}" for c in map(chr, range(0x3001)) if c.isspace())
    return f"^[{spaces}]|[{spaces}]$"


def _accept(table, options: ParseOptions, kind: str):
    """Rows of `table` that `validate` accepts as they are, normalised to `event_schema()`.

    Returns (accepted mask, table of the accepted rows), or None when a column's type needs the
    row path for every row. `kind`: "csv" (every value is a string), "json" or "parquet" (typed
    values; timestamp columns only from Parquet, where pyarrow does not guess them from text).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    names = set(table.column_names)
    if not set(F.LOG_REQUIRED_FIELDS) <= names:
        return None
    text_values = kind == "csv"
    ok = pa.array(np.ones(table.num_rows, bool))
    columns = {}

    def string_like(t):
        return pa.types.is_string(t) or pa.types.is_large_string(t)

    for field in (F.LOG_USER_ID, F.LOG_DOMAIN, F.LOG_ITEM_ID):
        column = table.column(field)
        if pa.types.is_integer(column.type) and not text_values:
            values, good = pc.cast(column, pa.string()), pc.is_valid(column)
        elif string_like(column.type):
            values = pc.cast(column, pa.string())
            good = pc.invert(pc.or_(pc.equal(pc.utf8_length(values), 0), pc.match_substring_regex(values, _edge_space_regex())))
        else:
            return None
        columns[field], ok = values, pc.and_(ok, pc.fill_null(good, False))

    ts = table.column(F.LOG_TS)
    if text_values and string_like(ts.type):
        digits = pc.fill_null(pc.match_substring_regex(ts, r"^[0-9]{1,15}$"), False)
        ts, good = pc.cast(pc.if_else(digits, ts, "0"), pa.int64()), digits
    elif pa.types.is_integer(ts.type) and not text_values:
        ts, good = pc.cast(ts, pa.int64()), pc.is_valid(ts)
    elif pa.types.is_floating(ts.type) and not text_values:  # int() truncates toward zero
        good = pc.fill_null(pc.and_(pc.is_finite(ts), pc.less(pc.abs(ts), 1e15)), False)
        ts = pc.cast(pc.trunc(pc.if_else(good, ts, 0.0)), pa.int64())
    elif pa.types.is_timestamp(ts.type) and kind == "parquet":  # no zone means UTC
        per_second = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[ts.type.unit]
        raw = pc.cast(ts, pa.int64()).to_numpy(zero_copy_only=False)
        good = pc.is_valid(ts)
        raw = np.where(np.asarray(good), raw, 0)
        ts = pa.array(np.sign(raw) * (np.abs(raw) // per_second))
    else:
        return None
    good = pc.and_(good, pc.and_(pc.greater_equal(ts, options.min_ts), pc.less_equal(ts, options.max_ts)))
    ok = pc.and_(ok, pc.fill_null(good, False))
    columns[F.LOG_TS] = ts

    clicked = table.column(F.LOG_CLICKED)
    if text_values and string_like(clicked.type):
        good = pc.is_in(clicked, pa.array(["0", "1"]))
        clicked = pc.cast(pc.if_else(good, clicked, "0"), pa.int8())
    elif pa.types.is_integer(clicked.type) and not text_values:
        good = pc.is_in(clicked, pa.array([0, 1], clicked.type))
        clicked = pc.cast(pc.if_else(good, clicked, 0), pa.int8())
    else:
        return None
    ok = pc.and_(ok, pc.fill_null(good, False))
    columns[F.LOG_CLICKED] = clicked

    if options.domains:
        ok = pc.and_(ok, pc.fill_null(pc.is_in(columns[F.LOG_DOMAIN], pa.array(list(options.domains), pa.string())), False))

    if F.LOG_ORACLE_CTR not in names or pa.types.is_null(table.column(F.LOG_ORACLE_CTR).type):
        oracle = pa.nulls(table.num_rows, pa.float64())
    else:
        oracle = table.column(F.LOG_ORACLE_CTR)
        if text_values and string_like(oracle.type):
            empty = pc.equal(oracle, "")
            number = pc.match_substring_regex(oracle, r"^[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$")
            ok = pc.and_(ok, pc.fill_null(pc.or_(empty, number), False))
            oracle = pc.cast(pc.if_else(number, oracle, pa.scalar(None, pa.string())), pa.float64())
        elif (pa.types.is_integer(oracle.type) or pa.types.is_floating(oracle.type)) and not text_values:
            oracle = pc.cast(oracle, pa.float64())
        else:
            return None
    columns[F.LOG_ORACLE_CTR] = oracle

    if isinstance(ok, pa.ChunkedArray):
        ok = ok.combine_chunks()
    accepted = ok.to_numpy(zero_copy_only=False).astype(bool)
    out = pa.Table.from_arrays([pc.cast(columns[f], t) for f, t in zip(EVENT_FIELDS, event_schema().types)],
                               schema=event_schema())
    return accepted, out.filter(pa.array(accepted))


class ParsedBlock(NamedTuple):
    """Results of a block: good events (a table of `event_schema()`), dead letters, records read."""

    events: object
    dead: list
    read: int


class _Lines:
    """The lines of a block of bytes: where each starts and ends (its newline included), which are
    blank (ASCII whitespace only, a subset of what the row path skips) and which start with a BOM."""

    def __init__(self, data: bytes):
        pieces = data.split(b"\n")
        if pieces and pieces[-1] == b"":  # no line after the last newline
            pieces.pop()
        lengths = np.fromiter(map(len, pieces), np.int64, len(pieces)) + 1
        ends = np.cumsum(lengths)
        self.starts = ends - lengths
        self.ends = np.minimum(ends, len(data))  # the last line may lack its newline
        self.blank = np.fromiter((not p.strip() for p in pieces), bool, len(pieces))
        self.bom = (np.fromiter((p.startswith(_BOM) for p in pieces), bool, len(pieces)) if _BOM in data
                    else np.zeros(len(pieces), bool))
        self.quoted = (np.fromiter((b'"' in p for p in pieces), bool, len(pieces)) if b'"' in data
                       else np.zeros(len(pieces), bool))

    def __len__(self):
        return len(self.starts)


def parse_block(data: bytes, first_line: int, source: str, options: ParseOptions,
                header: Optional[Sequence[str]] = None) -> ParsedBlock:
    """Complete lines of a JSON Lines or CSV file (CSV: `header` given) -> ParsedBlock.

    `first_line` is the line number of the block's first line. Gives the results of `parse_line`
    on every line, good events as a table.
    """
    import pyarrow as pa

    lines = _Lines(data)
    odd = lines.bom | lines.quoted if header is not None else lines.bom  # quoted CSV: Python's csv module decides
    tables, row_path = [], []  # row_path: indices of the lines `parse_line` parses
    # Ranges of lines for pyarrow, in order; a range it cannot take whole is halved. A work list,
    # not a recursive closure: a closure that calls itself is a reference cycle, which would keep
    # every block's bytes and tables alive until Python's cycle collector happens to run.
    ranges, lo = [], 0
    for i in np.flatnonzero(odd):
        ranges.append((lo, i, i))
        lo = i + 1
    ranges.append((lo, len(lines), None))
    pending = list(reversed(ranges))  # (lo, hi, the odd line after the range or None)
    while pending:
        lo, hi, odd_line = pending.pop()
        expected = np.flatnonzero(~lines.blank[lo:hi]) + lo
        accepted = None
        if len(expected):
            table = _read_block(memoryview(data)[lines.starts[lo]:lines.ends[hi - 1]], header)
            if table is not None and table.num_rows == len(expected):
                accepted = _accept(table, options, "json" if header is None else "csv")
            if accepted is None and hi - lo > _SMALL_RANGE:  # unparseable, or a type only the row path takes
                mid = (lo + hi) // 2
                pending += [(mid, hi, odd_line), (lo, mid, None)]
                continue
            if accepted is None:
                row_path.extend(expected)
            else:
                mask, good = accepted
                tables.append(good)
                row_path.extend(expected[~mask])
        if odd_line is not None:
            row_path.append(odd_line)
    read = sum(len(t) for t in tables)
    dead, events = [], []
    for i in sorted(row_path):
        result = parse_line(data[lines.starts[i]:lines.ends[i]], first_line + int(i), source, options, header)
        if result is None:
            continue
        read += 1
        if isinstance(result, DeadLetter):
            dead.append(result)
        else:
            events.append(result)
    if events:
        tables.append(events_table(events))
    return ParsedBlock(pa.concat_tables(tables) if tables else events_table([]), dead, read)


def _read_block(buffer, header):
    """pyarrow's table of a block of JSON Lines (or CSV lines without their header); None when it fails."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson

    size = max(1 << 20, len(buffer) + 1)
    try:
        if header is None:
            return pjson.read_json(pa.BufferReader(buffer), read_options=pjson.ReadOptions(block_size=size))
        return pcsv.read_csv(
            pa.BufferReader(buffer),
            read_options=pcsv.ReadOptions(column_names=list(header), block_size=size),
            parse_options=pcsv.ParseOptions(newlines_in_values=False, ignore_empty_lines=True),
            convert_options=pcsv.ConvertOptions(column_types={h: pa.string() for h in header},
                                                strings_can_be_null=False, quoted_strings_can_be_null=False),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError):
        return None


def parse_arrow_batch(batch, first_row: int, source: str, options: ParseOptions) -> ParsedBlock:
    """A batch of Parquet rows -> ParsedBlock; the "line" of a dead letter is its 1-based row number."""
    import pyarrow as pa

    table = pa.Table.from_batches([batch])
    accepted = _accept(table, options, "parquet")
    if accepted is None:
        mask, tables = np.zeros(table.num_rows, bool), []
    else:
        mask, good = accepted
        tables = [good]
    dead, events = [], []
    rows = np.flatnonzero(~mask)
    for i, record in zip(rows, table.take(pa.array(rows, pa.int64())).to_pylist()):
        result = validate(record, source, first_row + int(i), json.dumps(record, default=str), options)
        (dead if isinstance(result, DeadLetter) else events).append(result)
    if events:
        tables.append(events_table(events))
    return ParsedBlock(pa.concat_tables(tables) if tables else events_table([]), dead, table.num_rows)
