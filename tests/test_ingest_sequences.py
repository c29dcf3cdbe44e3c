"""Per-user examples: golden sequences worked out by hand, and leakage properties on generated logs."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorflow as tf

from components.ingest import generator, sequences
from components.ingest.records import Impression
from xdctr import features as F

PAD = F.PAD_ID
USER = "u"


def imp(ts, item, clicked, domain="A", user=USER, oracle=None):
    return Impression(ts, user, domain, item, clicked, oracle)


def example(ts, item, label, hist, hist_domains, hist_ts, domain_hist, domain_lengths, target, other, domain="A",
            user=USER):
    """The expected example dict; every list is written out in full, padding included.

    `domain_hist` is the flattened (num_domains, domain_history_length) matrix: row d, the most
    recent clicks in `contract.domains[d]`, left-padded, then row d + 1.
    """
    return {
        F.USER_ID: user.encode(),
        F.ITEM_ID: item.encode(),
        F.DOMAIN: domain.encode(),
        F.TIMESTAMP: ts,
        F.HISTORY_ITEM_IDS: hist,
        F.HISTORY_DOMAINS: hist_domains,
        F.HISTORY_TIMESTAMPS: hist_ts,
        F.HISTORY_LENGTH: sum(1 for h in hist if h != PAD),
        F.DOMAIN_HISTORY_ITEM_IDS: domain_hist,
        F.DOMAIN_HISTORY_LENGTHS: domain_lengths,
        F.TARGET_DOMAIN_CLICKS: target,
        F.OTHER_DOMAIN_CLICKS: other,
        F.LABEL: label,
        F.COLD_START: int(target == 0 and other > 0),
        F.ACTIVITY_BUCKET: F.activity_bucket(target + other).encode(),
    }


# One user, one domain "A", history_length 3, domain_history_length 2. Two clicks share ts=30;
# a5 (ts=40) is not clicked.
CONTRACT_A = F.Contract(("A",), history_length=3, domain_history_length=2)
GOLDEN_EVENTS = [
    imp(10, "a1", 1),
    imp(20, "a2", 0),
    imp(30, "a4", 1),  # given out of order: the output is sorted by (ts, domain, item, clicked)
    imp(30, "a3", 1),
    imp(40, "a5", 0),
    imp(50, "a6", 1),
    imp(60, "a7", 0),
]
A3 = [b"A", b"A", b"A"]
GOLDEN_EXAMPLES = [
    # ts=10: nothing earlier -> all padding.
    example(10, "a1", 1, [PAD, PAD, PAD], [PAD, PAD, PAD], [0, 0, 0], [PAD, PAD], [0], target=0, other=0),
    # ts=20: the click on a1, left-padded.
    example(20, "a2", 0, [PAD, PAD, b"a1"], [PAD, PAD, b"A"], [0, 0, 10], [PAD, b"a1"], [1], target=1, other=0),
    # ts=30: a3 and a4 share the timestamp, so neither sees the other; both see only a1.
    example(30, "a3", 1, [PAD, PAD, b"a1"], [PAD, PAD, b"A"], [0, 0, 10], [PAD, b"a1"], [1], target=1, other=0),
    example(30, "a4", 1, [PAD, PAD, b"a1"], [PAD, PAD, b"A"], [0, 0, 10], [PAD, b"a1"], [1], target=1, other=0),
    # ts=40: both ts=30 clicks now visible, in (item) order; a2 was not clicked so is absent. The
    # A row keeps only the 2 most recent of the 3 clicks.
    example(40, "a5", 0, [b"a1", b"a3", b"a4"], A3, [10, 30, 30], [b"a3", b"a4"], [2], target=3, other=0),
    # ts=50: a5 was not clicked -> same history as ts=40.
    example(50, "a6", 1, [b"a1", b"a3", b"a4"], A3, [10, 30, 30], [b"a3", b"a4"], [2], target=3, other=0),
    # ts=60: a6 pushes out the oldest click a1 (truncation keeps the 3 most recent, most recent
    # last); the count features still count all 4 earlier clicks.
    example(60, "a7", 0, [b"a3", b"a4", b"a6"], A3, [30, 30, 50], [b"a4", b"a6"], [2], target=4, other=0),
]


def test_golden_sequence():
    assert list(sequences.user_examples(USER, GOLDEN_EVENTS, CONTRACT_A)) == GOLDEN_EXAMPLES


def test_same_timestamp_clicks_do_not_see_each_other():
    events = [imp(5, "x", 1), imp(5, "y", 1), imp(6, "z", 0)]
    assert list(sequences.user_examples(USER, events, CONTRACT_A)) == [
        example(5, "x", 1, [PAD, PAD, PAD], [PAD, PAD, PAD], [0, 0, 0], [PAD, PAD], [0], target=0, other=0),
        example(5, "y", 1, [PAD, PAD, PAD], [PAD, PAD, PAD], [0, 0, 0], [PAD, PAD], [0], target=0, other=0),
        # Both clicks of ts=5 are in the next event's history.
        example(6, "z", 0, [PAD, b"x", b"y"], [PAD, b"A", b"A"], [0, 5, 5], [b"x", b"y"], [2], target=2, other=0),
    ]


def test_non_clicks_never_enter_history():
    events = [imp(1, "n1", 0), imp(2, "n2", 0), imp(3, "c1", 1), imp(4, "n3", 0), imp(5, "last", 0)]
    last = list(sequences.user_examples(USER, events, CONTRACT_A))[-1]
    # Only the click on c1 (ts=3) is history for ts=5.
    assert last == example(5, "last", 0, [PAD, PAD, b"c1"], [PAD, PAD, b"A"], [0, 0, 3], [PAD, b"c1"], [1], target=1, other=0)


def test_cold_start_in_a_new_domain():
    contract = F.Contract(("A", "B"), history_length=3, domain_history_length=2)
    events = [
        imp(1, "a1", 1, domain="A"),
        imp(2, "a2", 1, domain="A"),
        imp(3, "a3", 0, domain="A"),
        imp(4, "b1", 1, domain="B"),  # first impression in B: 2 earlier A clicks, none in B
        imp(5, "b2", 0, domain="B"),
        imp(6, "a4", 0, domain="A"),
    ]
    out = list(sequences.user_examples(USER, events, contract))
    # Cold start in B: the B row (second) is all padding, the A row holds both A clicks.
    assert out[3] == example(4, "b1", 1, [PAD, b"a1", b"a2"], [PAD, b"A", b"A"], [0, 1, 2],
                             [b"a1", b"a2", PAD, PAD], [2, 0], target=0, other=2, domain="B")
    # After the B click: 1 in B, 2 in A.
    assert out[4] == example(5, "b2", 0, [b"a1", b"a2", b"b1"], [b"A", b"A", b"B"], [1, 2, 4],
                             [b"a1", b"a2", PAD, b"b1"], [2, 1], target=1, other=2, domain="B")
    # Back in A: 2 in A, 1 in B; the rows stay in contract order whatever the target domain.
    assert out[5] == example(6, "a4", 0, [b"a1", b"a2", b"b1"], [b"A", b"A", b"B"], [1, 2, 4],
                             [b"a1", b"a2", PAD, b"b1"], [2, 1], target=2, other=1, domain="A")


# A user active in A and B, with one unclicked impression in C; domain_history_length 2.
CONTRACT_ABC = F.Contract(("A", "B", "C"), history_length=4, domain_history_length=2)
ABC_EVENTS = [
    imp(1, "a1", 1, domain="A"),
    imp(2, "b1", 1, domain="B"),
    imp(3, "a2", 1, domain="A"),
    imp(4, "a3", 1, domain="A"),
    imp(5, "c1", 0, domain="C"),
    imp(6, "b2", 1, domain="B"),
    imp(7, "a4", 0, domain="A"),
]
ABC_EXAMPLES = [
    example(1, "a1", 1, [PAD, PAD, PAD, PAD], [PAD, PAD, PAD, PAD], [0, 0, 0, 0],
            [PAD, PAD, PAD, PAD, PAD, PAD], [0, 0, 0], target=0, other=0, domain="A"),
    example(2, "b1", 1, [PAD, PAD, PAD, b"a1"], [PAD, PAD, PAD, b"A"], [0, 0, 0, 1],
            [PAD, b"a1", PAD, PAD, PAD, PAD], [1, 0, 0], target=0, other=1, domain="B"),
    example(3, "a2", 1, [PAD, PAD, b"a1", b"b1"], [PAD, PAD, b"A", b"B"], [0, 0, 1, 2],
            [PAD, b"a1", PAD, b"b1", PAD, PAD], [1, 1, 0], target=1, other=1, domain="A"),
    example(4, "a3", 1, [PAD, b"a1", b"b1", b"a2"], [PAD, b"A", b"B", b"A"], [0, 1, 2, 3],
            [b"a1", b"a2", PAD, b"b1", PAD, PAD], [2, 1, 0], target=2, other=1, domain="A"),
    # The A row keeps the 2 most recent of the 3 A clicks (a1 is dropped there, not in the mixed
    # history); C has no clicks, so its row is all padding.
    example(5, "c1", 0, [b"a1", b"b1", b"a2", b"a3"], [b"A", b"B", b"A", b"A"], [1, 2, 3, 4],
            [b"a2", b"a3", PAD, b"b1", PAD, PAD], [2, 1, 0], target=0, other=4, domain="C"),
    # c1 was not clicked: same history as ts=5.
    example(6, "b2", 1, [b"a1", b"b1", b"a2", b"a3"], [b"A", b"B", b"A", b"A"], [1, 2, 3, 4],
            [b"a2", b"a3", PAD, b"b1", PAD, PAD], [2, 1, 0], target=1, other=3, domain="B"),
    example(7, "a4", 0, [b"b1", b"a2", b"a3", b"b2"], [b"B", b"A", b"A", b"B"], [2, 3, 4, 6],
            [b"a2", b"a3", b"b1", b"b2", PAD, PAD], [2, 2, 0], target=3, other=2, domain="A"),
]


def test_per_domain_histories_golden():
    assert list(sequences.user_examples(USER, ABC_EVENTS, CONTRACT_ABC)) == ABC_EXAMPLES


def test_domain_rows_follow_contract_order_not_click_order():
    # The same events with the domain vocabulary reversed: rows swap, the mixed history does not.
    contract = F.Contract(("C", "B", "A"), history_length=4, domain_history_length=2)
    last = list(sequences.user_examples(USER, ABC_EVENTS, contract))[-1]
    assert last[F.DOMAIN_HISTORY_ITEM_IDS] == [PAD, PAD, b"b1", b"b2", b"a2", b"a3"]
    assert last[F.DOMAIN_HISTORY_LENGTHS] == [0, 2, 2]
    assert last[F.HISTORY_ITEM_IDS] == ABC_EXAMPLES[-1][F.HISTORY_ITEM_IDS]


def test_single_domain_user_has_no_other_domain_clicks():
    events = [imp(t, f"k{t}", t % 2, domain="kitchen") for t in range(1, 9)]
    out = list(sequences.user_examples(USER, events, F.Contract(("kitchen",), history_length=3)))
    assert [e[F.OTHER_DOMAIN_CLICKS] for e in out] == [0] * 8
    # Clicks at t = 1, 3, 5, 7: counts before t = 1..8.
    assert [e[F.TARGET_DOMAIN_CLICKS] for e in out] == [0, 1, 1, 2, 2, 3, 3, 4]


def test_history_truncation_keeps_most_recent_clicks_last():
    events = [imp(t, f"i{t}", 1) for t in range(1, 7)] + [imp(7, "target", 0)]
    contract = F.Contract(("A",), history_length=2, domain_history_length=4)
    last = list(sequences.user_examples(USER, events, contract))[-1]
    assert last[F.HISTORY_ITEM_IDS] == [b"i5", b"i6"]
    assert last[F.HISTORY_TIMESTAMPS] == [5, 6]
    assert last[F.HISTORY_LENGTH] == 2
    assert last[F.TARGET_DOMAIN_CLICKS] == 6
    # The per-domain row has its own length.
    assert last[F.DOMAIN_HISTORY_ITEM_IDS] == [b"i3", b"i4", b"i5", b"i6"]
    assert last[F.DOMAIN_HISTORY_LENGTHS] == [4]


def test_target_in_history_only_if_clicked_earlier():
    events = [imp(1, "same", 1), imp(2, "same", 1)]
    out = list(sequences.user_examples(USER, events, F.Contract(("A",), history_length=2)))
    assert out[0][F.HISTORY_ITEM_IDS] == [PAD, PAD]
    assert out[1][F.HISTORY_ITEM_IDS] == [PAD, b"same"]  # the earlier click, not the target itself


def test_oracle_ctr_is_passed_through_only_when_present():
    events = [imp(1, "a", 1, oracle=0.25), imp(2, "b", 0)]
    out = list(sequences.user_examples(USER, events, F.Contract(("A",), history_length=1)))
    assert out[0][F.ORACLE_CTR] == pytest.approx(0.25)
    assert F.ORACLE_CTR not in out[1]


# ---- UserState: blocks of a timeline --------------------------------------------------------------


def test_absorb_equals_adding_the_clicks_one_by_one():
    first, second = ABC_EVENTS[:3], ABC_EVENTS[3:]
    state = sequences.block_state(first, CONTRACT_ABC)
    state.absorb(sequences.block_state(second, CONTRACT_ABC))
    assert state == sequences.block_state(ABC_EVENTS, CONTRACT_ABC)
    # The state after every click is exactly the history of the next event.
    assert state.features() == {name: ABC_EXAMPLES[-1][name] for name in state.features()}
    assert set(state.features()) == {F.HISTORY_ITEM_IDS, F.HISTORY_DOMAINS, F.HISTORY_TIMESTAMPS, F.HISTORY_LENGTH,
                                     F.DOMAIN_HISTORY_ITEM_IDS, F.DOMAIN_HISTORY_LENGTHS}
    assert state.clicks == {"A": 3, "B": 2}  # every click counted, not only the kept ones


def test_copy_is_independent_and_user_examples_advances_the_state_in_place():
    state = sequences.block_state(ABC_EVENTS[:2], CONTRACT_ABC)
    copy = state.copy()
    assert copy == state and copy is not state
    out = list(sequences.user_examples(USER, ABC_EVENTS[2:], CONTRACT_ABC, state=copy))
    assert out == ABC_EXAMPLES[2:]
    assert copy == sequences.block_state(ABC_EVENTS, CONTRACT_ABC)
    assert state == sequences.block_state(ABC_EVENTS[:2], CONTRACT_ABC)  # the original is untouched


# ---- Properties over generated logs -------------------------------------------------------------

GENERATED_DOMAINS = ("A", "B", "C")
CONTRACT = F.Contract(GENERATED_DOMAINS, history_length=4, domain_history_length=3)
# Timestamps are coarsened to the hour so that a user often has several events at one ts.
HOUR = 3600


@pytest.fixture(scope="module")
def generated_events():
    config = generator.GeneratorConfig(
        num_users=25, items_per_domain=15, mean_events_per_user=20, num_days=2, seed=3, domains=GENERATED_DOMAINS
    )
    by_user = collections.defaultdict(list)
    for r in generator.LogGenerator(config).records():
        ts = r[F.LOG_TS] // HOUR * HOUR
        by_user[r[F.LOG_USER_ID]].append(
            Impression(ts, r[F.LOG_USER_ID], r[F.LOG_DOMAIN], r[F.LOG_ITEM_ID], r[F.LOG_CLICKED], r[F.LOG_ORACLE_CTR])
        )
    return dict(by_user)


def test_generated_logs_exercise_the_hard_cases(generated_events):
    # The property checks below are only meaningful if ties, truncation and multi-domain users occur.
    ties = sum(len(evs) - len({e.ts for e in evs}) for evs in generated_events.values())
    clicks = [sum(e.clicked for e in evs) for evs in generated_events.values()]
    domain_clicks = [sum(e.clicked for e in evs if e.domain == d) for evs in generated_events.values() for d in GENERATED_DOMAINS]
    assert ties > 10
    assert max(clicks) > CONTRACT.history_length
    assert max(domain_clicks) > CONTRACT.domain_history_length
    assert any(len({e.domain for e in evs}) > 1 for evs in generated_events.values())
    # Timelines span several days, so day blocks cut them.
    assert any(len({e.ts // 86_400 for e in evs}) > 1 for evs in generated_events.values())


def test_history_is_exactly_the_earlier_clicks(generated_events):
    """Reconstructs every feature from scratch: only same-user clicks with strictly earlier ts."""
    L, Ld = CONTRACT.history_length, CONTRACT.domain_history_length
    checked = 0
    for user, events in generated_events.items():
        out = list(sequences.user_examples(user, reversed(events), CONTRACT))
        # One example per impression, nothing invented or lost.
        assert sorted((e[F.TIMESTAMP], e[F.ITEM_ID], e[F.DOMAIN], e[F.LABEL]) for e in out) == sorted(
            (e.ts, e.item_id.encode(), e.domain.encode(), e.clicked) for e in events
        )
        for ex in out:
            assert ex[F.USER_ID] == user.encode()
            earlier = sorted(
                (e for e in events if e.clicked and e.ts < ex[F.TIMESTAMP]), key=lambda e: (e.ts, e.domain, e.item_id)
            )
            kept = earlier[-L:]
            pad = [PAD] * (L - len(kept))
            assert ex[F.HISTORY_ITEM_IDS] == pad + [e.item_id.encode() for e in kept]
            assert ex[F.HISTORY_DOMAINS] == pad + [e.domain.encode() for e in kept]
            assert ex[F.HISTORY_TIMESTAMPS] == [0] * len(pad) + [e.ts for e in kept]
            assert ex[F.HISTORY_LENGTH] == len(kept)
            rows, lengths = [], []
            for domain in GENERATED_DOMAINS:
                in_domain = [e.item_id.encode() for e in earlier if e.domain == domain][-Ld:]
                rows += [PAD] * (Ld - len(in_domain)) + in_domain
                lengths.append(len(in_domain))
            assert ex[F.DOMAIN_HISTORY_ITEM_IDS] == rows
            assert ex[F.DOMAIN_HISTORY_LENGTHS] == lengths
            same = sum(e.domain.encode() == ex[F.DOMAIN] for e in earlier)
            assert ex[F.TARGET_DOMAIN_CLICKS] == same
            assert ex[F.OTHER_DOMAIN_CLICKS] == len(earlier) - same
            checked += 1
    assert checked == sum(len(evs) for evs in generated_events.values())


def test_no_future_event_changes_any_feature(generated_events):
    """Dropping everything after ts T leaves the examples at ts <= T unchanged."""
    for user, events in generated_events.items():
        full = list(sequences.user_examples(user, events, CONTRACT))
        times = sorted({e.ts for e in events})
        for cut in times[:: max(1, len(times) // 4)]:
            prefix = list(sequences.user_examples(user, [e for e in events if e.ts <= cut], CONTRACT))
            assert prefix == [ex for ex in full if ex[F.TIMESTAMP] <= cut]
            # The examples at the cut itself are unchanged when the other events at the cut go too:
            # same-timestamp events never see each other.
            for event in (e for e in events if e.ts == cut):
                alone = [e for e in events if e.ts < cut] + [event]
                last = list(sequences.user_examples(user, alone, CONTRACT))[-1]
                assert last in prefix


@pytest.mark.parametrize("block_seconds", [1, HOUR, 5000, 86_400, 10**12])
def test_blocks_give_the_same_examples_as_the_whole_timeline(generated_events, block_seconds):
    """What the Beam ingestion does: each block expanded from the sum of the earlier blocks' states."""
    multi_block_users = 0
    for user, events in generated_events.items():
        blocks = collections.defaultdict(list)
        for event in reversed(events):  # the order within a block must not matter
            blocks[event.ts // block_seconds].append(event)
        multi_block_users += len(blocks) > 1
        prefix = sequences.UserState(CONTRACT)
        out = []
        for block in sorted(blocks):
            start = prefix.copy()
            out += sequences.user_examples(user, blocks[block], CONTRACT, state=start)
            prefix.absorb(sequences.block_state(blocks[block], CONTRACT))
            # user_examples advanced `start` to exactly the summed-up state.
            assert start == prefix
        whole = sequences.UserState(CONTRACT)
        expected = list(sequences.user_examples(user, events, CONTRACT, state=whole))
        # Compared as multisets: events equal but for oracle_ctr tie in event_order, and their
        # examples (equal but for oracle_ctr) may come out in input order.
        assert sorted(out, key=repr) == sorted(expected, key=repr)
        assert [ex[F.TIMESTAMP] for ex in out] == [ex[F.TIMESTAMP] for ex in expected]
        assert whole == prefix
    # Small blocks do cut timelines; the huge one never does.
    assert (multi_block_users > 0) == (block_seconds < 10**12)


# ---- tf.Example round trip -----------------------------------------------------------------------


def test_to_tf_example_round_trip():
    original = GOLDEN_EXAMPLES[5]  # ts=50: a full history
    serialized = sequences.to_tf_example(original).SerializeToString()
    parsed = tf.io.parse_single_example(serialized, CONTRACT_A.feature_spec())
    assert set(parsed) == set(original)
    for name, value in original.items():
        got = parsed[name].numpy()
        if isinstance(value, list):
            assert got.ravel().tolist() == value, name
        else:
            assert got == value, name
    assert parsed[F.HISTORY_ITEM_IDS].numpy().tolist() == [b"a1", b"a3", b"a4"]
    assert parsed[F.HISTORY_TIMESTAMPS].numpy().tolist() == [10, 30, 30]
    assert parsed[F.TIMESTAMP].dtype == tf.int64
    # Padding survives the round trip, and oracle_ctr (not in the contract's spec) is a float.
    with_pad = dict(GOLDEN_EXAMPLES[1], **{F.ORACLE_CTR: 0.375})
    spec = dict(CONTRACT_A.feature_spec(), **{F.ORACLE_CTR: tf.io.FixedLenFeature([], tf.float32)})
    parsed = tf.io.parse_single_example(sequences.to_tf_example(with_pad).SerializeToString(), spec)
    assert parsed[F.HISTORY_ITEM_IDS].numpy().tolist() == [PAD, PAD, b"a1"]
    assert parsed[F.HISTORY_DOMAINS].numpy().tolist() == [PAD, PAD, b"A"]
    assert parsed[F.HISTORY_TIMESTAMPS].numpy().tolist() == [0, 0, 10]
    assert parsed[F.HISTORY_LENGTH].numpy() == 1
    assert parsed[F.DOMAIN_HISTORY_ITEM_IDS].numpy().tolist() == [[PAD, b"a1"]]
    np.testing.assert_allclose(parsed[F.ORACLE_CTR].numpy(), 0.375)


def test_domain_histories_parse_row_major():
    # The flattened list comes back as a (num_domains, domain_history_length) matrix, row d = domains[d].
    serialized = sequences.to_tf_example(ABC_EXAMPLES[-1]).SerializeToString()
    parsed = tf.io.parse_single_example(serialized, CONTRACT_ABC.feature_spec())
    assert parsed[F.DOMAIN_HISTORY_ITEM_IDS].numpy().tolist() == [[b"a2", b"a3"], [b"b1", b"b2"], [PAD, PAD]]
    assert parsed[F.DOMAIN_HISTORY_LENGTHS].numpy().tolist() == [2, 2, 0]
    assert parsed[F.HISTORY_TIMESTAMPS].numpy().tolist() == [2, 3, 4, 6]


def test_slice_features_cold_start_and_activity_bucket():
    # Clicks a1 (A), a2 (A), then an impression in B: cold start there (0 in B, 2 elsewhere).
    events = [imp(1, "a1", 1), imp(2, "a2", 1), imp(3, "b1", 0, domain="B"), imp(4, "a3", 0)]
    contract = F.Contract(("A", "B"), history_length=2, domain_history_length=1)
    out = list(sequences.user_examples(USER, events, contract))
    assert [e[F.COLD_START] for e in out] == [0, 0, 1, 0]  # the first event has no clicks anywhere
    assert [e[F.ACTIVITY_BUCKET] for e in out] == [b"0", b"1-4", b"1-4", b"1-4"]
    assert [F.activity_bucket(n) for n in (0, 1, 4, 5, 19, 20, 500)] == ["0", "1-4", "1-4", "5-19", "5-19", "20+", "20+"]
