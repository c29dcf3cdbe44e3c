"""Parsing and validation of click-log lines: every bad line becomes an exact dead letter."""

from __future__ import annotations

import datetime
import json

import pytest

from components.ingest import records as R
from components.ingest.records import DeadLetter, Impression, ParseOptions
from xdctr import features as F

SOURCE = "logs.jsonl"
LINE = 7
JAN_1_2024 = 1_704_067_200  # 2024-01-01T00:00:00Z
GOOD = {F.LOG_TS: JAN_1_2024, F.LOG_USER_ID: "u1", F.LOG_DOMAIN: "grocery", F.LOG_ITEM_ID: "g1", F.LOG_CLICKED: 1}
GOOD_IMPRESSION = Impression(JAN_1_2024, "u1", "grocery", "g1", 1)


_DELETE = object()


def with_fields(**changes) -> str:
    """GOOD as a JSON line with `changes` applied (keys are F.LOG_* names); `_DELETE` removes a field."""
    record = dict(GOOD)
    for field, value in changes.items():
        if value is _DELETE:
            del record[field]
        else:
            record[field] = value
    return json.dumps(record)


def parse(text: str, options: ParseOptions = ParseOptions()):
    return R.parse_json_line(text, SOURCE, LINE, options)


def assert_dead(result, reason: str, field: str, raw: str, line: int = LINE, source: str = SOURCE):
    assert isinstance(result, DeadLetter), result
    assert (result.source, result.line, result.reason, result.field, result.raw) == (source, line, reason, field, raw)
    assert result.detail  # says what was expected


def test_good_line_parses_to_exact_impression():
    assert parse(with_fields()) == GOOD_IMPRESSION
    assert parse(with_fields(**{F.LOG_ORACLE_CTR: 0.25})) == Impression(JAN_1_2024, "u1", "grocery", "g1", 1, 0.25)
    # Ids are stripped; an integer id is accepted as its decimal string; "0"/"1" labels are accepted.
    text = with_fields(**{F.LOG_USER_ID: 42, F.LOG_ITEM_ID: "  g1 ", F.LOG_CLICKED: "0"})
    assert parse(text) == Impression(JAN_1_2024, "42", "grocery", "g1", 0)


@pytest.mark.parametrize("text", ['{"ts": 1704067200,', "not json", "{'ts': 1}", ""])
def test_malformed_json(text):
    result = parse(text)
    assert_dead(result, R.MALFORMED, "", text)
    assert result.detail.startswith("invalid JSON")


@pytest.mark.parametrize("text, type_name", [("[1, 2]", "list"), ('"a string"', "str"), ("42", "int"), ("null", "NoneType")])
def test_json_that_is_not_an_object(text, type_name):
    result = parse(text)
    assert_dead(result, R.MALFORMED, "", text)
    assert result.detail == f"expected a JSON object, got {type_name}"


@pytest.mark.parametrize("field", F.LOG_REQUIRED_FIELDS)
def test_missing_field(field):
    text = with_fields(**{field: _DELETE})
    assert_dead(parse(text), R.MISSING_FIELD, field, text)
    # JSON null counts as missing.
    text = with_fields(**{field: None})
    assert_dead(parse(text), R.MISSING_FIELD, field, text)


@pytest.mark.parametrize(
    "field, value, type_name",
    [
        (F.LOG_USER_ID, ["u1"], "list"),
        (F.LOG_USER_ID, {"id": "u1"}, "dict"),
        (F.LOG_USER_ID, True, "bool"),
        (F.LOG_USER_ID, 1.5, "float"),
        (F.LOG_DOMAIN, ["grocery"], "list"),
        (F.LOG_ITEM_ID, {"id": "g1"}, "dict"),
    ],
)
def test_wrong_type_id(field, value, type_name):
    text = with_fields(**{field: value})
    result = parse(text)
    assert_dead(result, R.WRONG_TYPE, field, text)
    assert result.detail == f"expected a string id, got {type_name}"


def test_wrong_type_oracle_ctr():
    text = with_fields(**{F.LOG_ORACLE_CTR: "high"})
    assert_dead(parse(text), R.WRONG_TYPE, F.LOG_ORACLE_CTR, text)


@pytest.mark.parametrize("value", [2, -1, "yes", "", 0.5, 1.0, True, False, [1]])
def test_clicked_not_zero_or_one(value):
    text = with_fields(**{F.LOG_CLICKED: value})
    result = parse(text)
    assert_dead(result, R.BAD_LABEL, F.LOG_CLICKED, text)
    assert result.detail == f"expected 0 or 1, got {value!r}"


@pytest.mark.parametrize("field", [F.LOG_USER_ID, F.LOG_DOMAIN, F.LOG_ITEM_ID])
@pytest.mark.parametrize("value", ["", "   ", "\t"])
def test_empty_id(field, value):
    text = with_fields(**{field: value})
    assert_dead(parse(text), R.EMPTY_ID, field, text)


@pytest.mark.parametrize("value", ["yesterday", "2024-13-01T00:00:00", "12:00", True, [JAN_1_2024], "nan", "inf", 1e400])
def test_unparseable_timestamp(value):
    text = with_fields(**{F.LOG_TS: value})
    assert_dead(parse(text), R.BAD_TIMESTAMP, F.LOG_TS, text)


def test_timestamp_out_of_range():
    text = with_fields(**{F.LOG_TS: -1})
    result = parse(text)
    assert_dead(result, R.BAD_TIMESTAMP, F.LOG_TS, text)
    assert result.detail == "-1 is outside [0, 4102444800]"
    text = with_fields(**{F.LOG_TS: 4102444801})  # one second after 2100-01-01
    assert_dead(parse(text), R.BAD_TIMESTAMP, F.LOG_TS, text)
    # The range is inclusive and configurable.
    options = ParseOptions(min_ts=JAN_1_2024, max_ts=JAN_1_2024 + 10)
    assert parse(with_fields(**{F.LOG_TS: JAN_1_2024 + 10}), options).ts == JAN_1_2024 + 10
    text = with_fields(**{F.LOG_TS: "2023-12-31T23:59:59Z"})
    assert_dead(parse(text, options), R.BAD_TIMESTAMP, F.LOG_TS, text)


def test_unknown_domain_only_when_domains_configured():
    options = ParseOptions(domains=("grocery", "kitchen"))
    text = with_fields(**{F.LOG_DOMAIN: "toys"})
    result = parse(text, options)
    assert_dead(result, R.UNKNOWN_DOMAIN, F.LOG_DOMAIN, text)
    assert result.detail == "'toys' is not one of ['grocery', 'kitchen']"
    assert parse(with_fields(), options) == GOOD_IMPRESSION
    assert parse(text) == Impression(JAN_1_2024, "u1", "toys", "g1", 1)  # no domains configured


def test_first_failing_check_wins():
    # Missing field is reported before a bad label; a bad label before a bad timestamp.
    text = with_fields(**{F.LOG_ITEM_ID: _DELETE, F.LOG_CLICKED: "yes"})
    assert_dead(parse(text), R.MISSING_FIELD, F.LOG_ITEM_ID, text)
    text = with_fields(**{F.LOG_CLICKED: "yes", F.LOG_TS: "never"})
    assert_dead(parse(text), R.BAD_LABEL, F.LOG_CLICKED, text)


@pytest.mark.parametrize(
    "value, epoch",
    [
        ("2024-01-01T00:00:00Z", JAN_1_2024),
        ("2024-01-01T00:00:00", JAN_1_2024),  # no zone: UTC
        ("2024-01-01T00:00:00+00:00", JAN_1_2024),
        ("2024-01-01T02:00:00+02:00", JAN_1_2024),  # 02:00 at +02:00 is midnight UTC
        # 2024-03-01 is 31 (Jan) + 29 (Feb, leap year) = 60 days after Jan 1: 1704067200 + 60 * 86400
        # = 1709251200; 12:30:15 at -05:00 is 17:30:15 UTC = 63015 s later.
        ("2024-03-01T12:30:15-05:00", 1_709_314_215),
        ("2024-03-01 17:30:15", 1_709_314_215),  # space separator, no zone
        ("1704067200", JAN_1_2024),  # epoch as a digit string
        (" 1704067260 ", JAN_1_2024 + 60),
        ("1704067200.9", JAN_1_2024),  # fractional seconds are truncated
        (1704067200.9, JAN_1_2024),
        (JAN_1_2024, JAN_1_2024),
    ],
)
def test_timestamps(value, epoch):
    assert R.parse_timestamp(value) == epoch
    assert parse(with_fields(**{F.LOG_TS: value})) == Impression(epoch, "u1", "grocery", "g1", 1)


def test_parse_timestamp_accepts_datetimes():
    # What a Parquet timestamp column reads as: naive means UTC, an aware one is converted.
    assert R.parse_timestamp(datetime.datetime(2024, 1, 1)) == JAN_1_2024
    assert R.parse_timestamp(datetime.datetime(2024, 1, 1, 0, 0, 30, 900_000)) == JAN_1_2024 + 30  # truncated
    plus_two = datetime.timezone(datetime.timedelta(hours=2))
    assert R.parse_timestamp(datetime.datetime(2024, 1, 1, 2, 0, tzinfo=plus_two)) == JAN_1_2024


def test_validate_a_parsed_record():
    # The public entry point for readers that parse records themselves (e.g. Parquet rows).
    record = dict(GOOD, **{F.LOG_TS: datetime.datetime(2024, 1, 1), F.LOG_ORACLE_CTR: 0.5})
    assert R.validate(record, "logs.parquet", 3, "raw", ParseOptions()) == Impression(JAN_1_2024, "u1", "grocery", "g1", 1, 0.5)
    result = R.validate(dict(GOOD, **{F.LOG_CLICKED: 7}), "logs.parquet", 4, "raw row", ParseOptions())
    assert result == DeadLetter("logs.parquet", 4, R.BAD_LABEL, F.LOG_CLICKED, "expected 0 or 1, got 7", "raw row")


def test_parse_timestamp_rejects_bool():
    with pytest.raises(ValueError, match="boolean"):
        R.parse_timestamp(True)


CSV_LINES = [
    "ts, user_id ,domain,item_id,clicked",  # header; columns may be padded with spaces
    "1704067200,u1,grocery,g1,1",
    "1704067200,u1,grocery",  # 3 columns
    "2024-01-01T00:01:00Z,u2,kitchen,k1,0\r\n",
    "1704067200,u1,grocery,g1,1,extra",  # 6 columns
    "1704067200,u3,kitchen,k2,yes",
    '1704067320,"u,4",kitchen,k3,1',  # quoted comma
]


def test_csv_with_header():
    results = list(R.parse_lines(CSV_LINES, "logs.csv", ParseOptions()))
    assert results == [
        Impression(JAN_1_2024, "u1", "grocery", "g1", 1),
        DeadLetter("logs.csv", 3, R.MALFORMED, "", "expected 5 columns, got 3", "1704067200,u1,grocery"),
        Impression(JAN_1_2024 + 60, "u2", "kitchen", "k1", 0),
        DeadLetter("logs.csv", 5, R.MALFORMED, "", "expected 5 columns, got 6", "1704067200,u1,grocery,g1,1,extra"),
        DeadLetter("logs.csv", 6, R.BAD_LABEL, F.LOG_CLICKED, "expected 0 or 1, got 'yes'", "1704067200,u3,kitchen,k2,yes"),
        Impression(JAN_1_2024 + 120, "u,4", "kitchen", "k3", 1),
    ]


def test_csv_header_order_and_optional_oracle_column():
    lines = ["clicked,item_id,domain,user_id,ts,oracle_ctr", "0,g9,grocery,u9,1704067200,0.125", "1,g8,grocery,u9,1704067201,"]
    assert list(R.parse_lines(lines, "dir.csv/part.csv.gz", ParseOptions())) == [
        Impression(JAN_1_2024, "u9", "grocery", "g9", 0, 0.125),
        Impression(JAN_1_2024 + 1, "u9", "grocery", "g8", 1),  # an empty oracle_ctr is no oracle_ctr
    ]


def test_csv_is_chosen_by_file_name_not_directory():
    # "x.csv/" is a directory; the file itself is JSON Lines.
    assert list(R.parse_lines([with_fields()], "x.csv/logs.jsonl", ParseOptions())) == [GOOD_IMPRESSION]


def test_non_utf8_line_is_a_dead_letter_and_parsing_goes_on():
    bad = b'{"ts": 1704067200, "user_id": "\xff\xfe"}\n'  # \xff is byte 31 (0-based)
    lines = [with_fields().encode() + b"\n", bad, with_fields(**{F.LOG_USER_ID: "u\u00e9"}).encode("utf-8") + b"\n"]
    results = list(R.parse_lines(lines, SOURCE, ParseOptions()))
    assert results == [
        GOOD_IMPRESSION,
        DeadLetter(SOURCE, 2, R.MALFORMED, "", "not UTF-8 at byte 31", repr(bad)),
        Impression(JAN_1_2024, "u\u00e9", "grocery", "g1", 1),
    ]


def test_blank_lines_are_skipped_but_counted():
    lines = [
        "",  # 1
        with_fields() + "\n",  # 2
        "   \n",  # 3
        "\r\n",  # 4
        '{"ts": 1704067200, "user_id": ["u1"], "domain": "grocery", "item_id": "g1", "clicked": 1}',  # 5
        "\n",  # 6
        '{"ts": 1704067201, "user_id": "u2", "domain": "kitchen", "item_id": "k1", "clicked": 0}\r\n',  # 7
    ]
    results = list(R.parse_lines(lines, SOURCE, ParseOptions()))
    assert [r.line for r in results if isinstance(r, DeadLetter)] == [5]
    assert results[1].reason == R.WRONG_TYPE and results[1].field == F.LOG_USER_ID
    assert [r for r in results if isinstance(r, Impression)] == [
        GOOD_IMPRESSION,
        Impression(JAN_1_2024 + 1, "u2", "kitchen", "k1", 0),
    ]


def test_good_records_after_bad_ones_still_come_out():
    options = ParseOptions(domains=("grocery", "kitchen"))
    lines = [
        "{oops",  # 1 malformed
        '{"ts": 1704067200, "user_id": "u1", "domain": "toys", "item_id": "t1", "clicked": 1}',  # 2 unknown domain
        '{"ts": "soon", "user_id": "u1", "domain": "grocery", "item_id": "g1", "clicked": 1}',  # 3 bad timestamp
        '{"ts": 1704067200, "user_id": "u1", "domain": "grocery", "item_id": "g1", "clicked": 1}',  # 4 good
        '{"ts": 1704067200, "user_id": " ", "domain": "grocery", "item_id": "g1", "clicked": 1}',  # 5 empty id
        '{"ts": "2024-01-01T00:00:05Z", "user_id": "u2", "domain": "kitchen", "item_id": "k1", "clicked": "0",'
        ' "oracle_ctr": 0.5}',  # 6 good
    ]
    results = list(R.parse_lines(lines, SOURCE, options))
    assert [(r.line, r.reason, r.field) for r in results if isinstance(r, DeadLetter)] == [
        (1, R.MALFORMED, ""),
        (2, R.UNKNOWN_DOMAIN, F.LOG_DOMAIN),
        (3, R.BAD_TIMESTAMP, F.LOG_TS),
        (5, R.EMPTY_ID, F.LOG_USER_ID),
    ]
    assert [r for r in results if isinstance(r, Impression)] == [
        Impression(JAN_1_2024, "u1", "grocery", "g1", 1),
        Impression(JAN_1_2024 + 5, "u2", "kitchen", "k1", 0, 0.5),
    ]
    assert results[3] == Impression(JAN_1_2024, "u1", "grocery", "g1", 1)  # order is line order


def test_dead_letter_message_names_file_line_and_field():
    text = with_fields(**{F.LOG_USER_ID: ["u1"]})
    message = R.parse_json_line(text, "/data/logs.jsonl", 12, ParseOptions()).message()
    assert message == f"/data/logs.jsonl:12: field '{F.LOG_USER_ID}' {R.WRONG_TYPE}: expected a string id, got list"
    message = R.parse_json_line("[]", "/data/logs.jsonl", 3, ParseOptions()).message()
    assert message == f"/data/logs.jsonl:3: {R.MALFORMED}: expected a JSON object, got list"


def test_parse_block_leaves_no_reference_cycle():
    """A block's bytes and tables are freed when its result is: nothing waits for the cycle
    collector (which runs rarely during ingestion, so cycles made memory grow with the input)."""
    import gc

    lines = [json.dumps({"user_id": f"u{i}", "domain": "a", "item_id": f"i{i}", "ts": 1000 + i, "clicked": i % 2})
             for i in range(3000)]
    lines[100] = "\ufeff" + lines[100]  # an odd line (the row path) and a bad one: the ranges are split
    lines[2000] = "{bad"
    data = ("\n".join(lines) + "\n").encode()
    gc.collect()
    gc.disable()
    try:
        parsed = R.parse_block(data, 1, "x.jsonl", ParseOptions())
        del parsed
        assert gc.collect() == 0
    finally:
        gc.enable()
    parsed = R.parse_block(data, 1, "x.jsonl", ParseOptions())
    assert parsed.read == 3000 and parsed.events.num_rows + len(parsed.dead) == 3000
    assert 2001 in [d.line for d in parsed.dead]
