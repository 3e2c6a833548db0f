"""Tests for the Modbus block planner: examples plus brute-force minimality properties."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.modbus.planner import (
    MAX_BITS,
    MAX_REGISTERS,
    TABLES,
    ReadRequest,
    Span,
    plan,
)


def holding(key: str, address: int, count: int = 1) -> Span:
    """A holding-register point."""
    return Span(key, "holding", address, count)


def ranges(requests: Sequence[ReadRequest]) -> list[tuple[str, int, int]]:
    """(table, address, count) of each request, for compact assertions."""
    return [(r.table, r.address, r.count) for r in requests]


def uncovered_runs(lo: int, hi: int, spans: Sequence[Span]) -> list[int]:
    """Lengths of the runs of [lo, hi) that no span covers (leading/trailing included)."""
    covered = [False] * (hi - lo)
    for s in spans:
        for a in range(max(s.address, lo), min(s.address + s.count, hi)):
            covered[a - lo] = True
    runs, current = [], 0
    for c in covered:
        if c:
            if current:
                runs.append(current)
            current = 0
        else:
            current += 1
    if current:
        runs.append(current)
    return runs


def limit_for(table: str, max_registers: int) -> int:
    """The request limit the rules give, written out independently of the planner."""
    return MAX_BITS if table in ("coil", "discrete") else min(MAX_REGISTERS, max_registers)


def brute_force_minimum(spans: Sequence[Span], max_gap: int, max_registers: int) -> int:
    """Fewest valid ranges covering every span, by exhaustive search per table."""
    total = 0
    for table in TABLES:
        mine = [s for s in spans if s.table == table]
        if not mine:
            continue
        limit = limit_for(table, max_registers)
        starts = {s.address for s in mine}
        ends = {s.address + s.count for s in mine}
        masks = set()
        for a in starts:
            for b in ends:
                if not 0 < b - a <= limit:
                    continue
                inside = [i for i, s in enumerate(mine) if a <= s.address and s.address + s.count <= b]
                if not inside:
                    continue
                if any(run > max_gap for run in uncovered_runs(a, b, [mine[i] for i in inside])):
                    continue
                masks.add(sum(1 << i for i in inside))
        # Breadth-first search over covered-sets: the first level reaching "all" is minimal.
        full = (1 << len(mine)) - 1
        level, seen, depth = {0}, {0}, 0
        while full not in level:
            depth += 1
            level = {m | c for m in level for c in masks} - seen
            assert level, "brute force found no cover; the generator made an impossible case"
            seen |= level
        total += depth
    return total


def check_invariants(spans: Sequence[Span], requests: Sequence[ReadRequest], max_gap: int, max_registers: int) -> None:
    """Every structural rule a plan must satisfy."""
    planned = Counter(s for r in requests for s in r.spans)
    assert planned == Counter(spans), "every span must appear in exactly one request"
    for r in requests:
        assert r.spans, "a request with no points is wasted wire time"
        assert 1 <= r.count <= limit_for(r.table, max_registers)
        assert all(s.table == r.table for s in r.spans), "tables mixed in one request"
        for s in r.spans:
            assert r.address <= s.address and s.address + s.count <= r.address + r.count
        # Tight: the request starts at its first point and ends at its last.
        assert r.address == min(s.address for s in r.spans)
        assert r.address + r.count == max(s.address + s.count for s in r.spans)
        assert all(run <= max_gap for run in uncovered_runs(r.address, r.address + r.count, r.spans))
        assert list(r.spans) == sorted(r.spans, key=lambda s: s.address), "spans not by address"
    order = [(TABLES.index(r.table), r.address) for r in requests]
    assert order == sorted(order), "requests not ordered by table then address"


# --- examples -------------------------------------------------------------------------


def test_empty_input_gives_no_requests() -> None:
    assert plan([]) == []


def test_points_five_apart_merge_within_max_gap() -> None:
    a, b = holding("a", 0), holding("b", 6)  # registers 1..5 unread between them
    assert ranges(plan([a, b], max_gap=10)) == [("holding", 0, 7)]
    assert ranges(plan([a, b], max_gap=5)) == [("holding", 0, 7)]
    assert ranges(plan([a, b], max_gap=4)) == [("holding", 0, 1), ("holding", 6, 1)]
    assert ranges(plan([a, b], max_gap=0)) == [("holding", 0, 1), ("holding", 6, 1)]


def test_touching_points_merge_with_max_gap_zero() -> None:
    requests = plan([holding("a", 0, 2), holding("b", 2, 2)], max_gap=0)
    assert ranges(requests) == [("holding", 0, 4)]
    assert [s.key for s in requests[0].spans] == ["a", "b"]


def test_default_max_gap_is_ten() -> None:
    assert len(plan([holding("a", 0), holding("b", 11)])) == 1
    assert len(plan([holding("a", 0), holding("b", 12)])) == 2


def test_gap_is_measured_from_the_farthest_end_so_far() -> None:
    # "c" is 2 past the end of the long point "a", though 8 past the short "b".
    points = [holding("a", 0, 10), holding("b", 1), holding("c", 12)]
    assert ranges(plan(points, max_gap=2)) == [("holding", 0, 13)]
    assert len(plan(points, max_gap=1)) == 2


def test_130_consecutive_uint16_need_two_requests() -> None:
    points = [holding(f"p{i}", i) for i in range(130)]
    requests = plan(points)
    assert ranges(requests) == [("holding", 0, 125), ("holding", 125, 5)]
    assert len(requests[0].spans) == 125 and len(requests[1].spans) == 5


def test_points_are_never_split_across_requests() -> None:
    # 65 uint32: 62 fit in 124 registers; a 63rd would need 126.
    points = [holding(f"p{i}", 2 * i, 2) for i in range(65)]
    assert ranges(plan(points)) == [("holding", 0, 124), ("holding", 124, 6)]


def test_max_registers_caps_the_request_length() -> None:
    points = [holding(f"p{i}", i) for i in range(20)]
    assert ranges(plan(points, max_registers=16)) == [("holding", 0, 16), ("holding", 16, 4)]


def test_max_registers_above_the_protocol_limit_is_clamped() -> None:
    points = [holding(f"p{i}", i) for i in range(130)]
    assert ranges(plan(points, max_registers=1000)) == [("holding", 0, 125), ("holding", 125, 5)]


def test_input_registers_obey_the_same_limits() -> None:
    points = [Span(f"p{i}", "input", i, 1) for i in range(20)]
    assert ranges(plan(points, max_registers=10)) == [("input", 0, 10), ("input", 10, 10)]


@pytest.mark.parametrize("table", ["coil", "discrete"])
def test_bit_tables_read_up_to_2000_bits(table: str) -> None:
    points = [Span(f"c{i}", table, i, 1) for i in range(2000)]
    # max_registers is about registers; it must not cap bit reads.
    assert ranges(plan(points, max_registers=16)) == [(table, 0, 2000)]
    more = [*points, Span("c2000", table, 2000, 1)]
    assert ranges(plan(more)) == [(table, 0, 2000), (table, 2000, 1)]


def test_overlapping_points_share_a_request() -> None:
    # A uint16 and a bitfield on the same register, a uint32 overlapping both.
    value, flags, wide = holding("value", 10), holding("flags", 10), holding("wide", 10, 2)
    requests = plan([wide, flags, value], max_gap=0)
    assert ranges(requests) == [("holding", 10, 2)]
    assert Counter(requests[0].spans) == Counter([value, flags, wide])


def test_identical_spans_under_two_names_are_both_kept() -> None:
    requests = plan([holding("a", 3), holding("b", 3)], max_gap=0)
    assert [s.key for s in requests[0].spans] == ["a", "b"]


def test_tables_are_never_mixed_and_come_in_table_order() -> None:
    points = [
        Span("h", "holding", 0, 1),
        Span("i", "input", 1, 1),
        Span("d", "discrete", 2, 1),
        Span("c", "coil", 3, 1),
    ]
    assert ranges(plan(points)) == [
        ("coil", 3, 1),
        ("discrete", 2, 1),
        ("input", 1, 1),
        ("holding", 0, 1),
    ]


def test_requests_within_a_table_are_ordered_by_address() -> None:
    points = [holding("z", 500), holding("a", 100), holding("m", 300)]
    assert [r.address for r in plan(points)] == [100, 300, 500]


def test_output_does_not_depend_on_input_order() -> None:
    points = [holding(f"p{i}", (i * 37) % 200, 1 + i % 3) for i in range(60)]
    expected = plan(points, max_gap=3, max_registers=20)
    rng = random.Random(7)
    for _ in range(10):
        shuffled = points[:]
        rng.shuffle(shuffled)
        assert plan(shuffled, max_gap=3, max_registers=20) == expected


def test_end_of_address_space() -> None:
    requests = plan([holding("last", 65535), holding("before", 65530, 2)])
    assert ranges(requests) == [("holding", 65530, 6)]


def test_point_longer_than_register_limit_raises() -> None:
    with pytest.raises(ValueError, match=r"'huge'.*126 registers.*\(125\)"):
        plan([holding("huge", 0, 126)])


def test_point_longer_than_max_registers_raises() -> None:
    with pytest.raises(ValueError, match=r"'blob'.*17 registers.*\(16\)"):
        plan([holding("blob", 0, 17)], max_registers=16)


def test_point_longer_than_bit_limit_raises() -> None:
    assert len(plan([Span("ok", "coil", 0, 2000)])) == 1
    with pytest.raises(ValueError, match=r"'bits'.*2001 bits.*\(2000\)"):
        plan([Span("bits", "coil", 0, 2001)])


@pytest.mark.parametrize("kwargs", [{"max_gap": -1}, {"max_registers": 0}])
def test_bad_planner_arguments_raise(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        plan([holding("a", 0)], **kwargs)


@pytest.mark.parametrize(
    ("table", "address", "count"),
    [
        ("register", 0, 1),
        ("holding", -1, 1),
        ("holding", 65536, 1),
        ("holding", 0, 0),
        ("holding", 65535, 2),
    ],
)
def test_invalid_span_is_rejected(table: str, address: int, count: int) -> None:
    with pytest.raises(ValueError, match="'p'"):
        Span("p", table, address, count)


# --- properties -----------------------------------------------------------------------

# Register tables twice as likely: that is where the tunable limit bites.
table_strategy = st.sampled_from(["holding", "holding", "input", "input", "coil", "discrete"])


@st.composite
def cases(draw: st.DrawFn, max_spans: int) -> tuple[list[Span], int, int]:
    """Spans packed into a small address space so overlaps and near-misses are common."""
    max_registers = draw(st.integers(1, 12))
    max_gap = draw(st.integers(0, 4))
    n = draw(st.integers(0, max_spans))
    spans = [
        Span(
            f"p{i}",
            draw(table_strategy),
            draw(st.integers(0, 24)),
            draw(st.integers(1, max_registers)),
        )
        for i in range(n)
    ]
    return spans, max_gap, max_registers


@settings(max_examples=400, deadline=None)
@given(cases(max_spans=7))
def test_plan_is_valid_and_minimal(case: tuple[list[Span], int, int]) -> None:
    spans, max_gap, max_registers = case
    requests = plan(spans, max_gap=max_gap, max_registers=max_registers)
    check_invariants(spans, requests, max_gap, max_registers)
    assert len(requests) == brute_force_minimum(spans, max_gap, max_registers)


@settings(max_examples=150, deadline=None)
@given(cases(max_spans=40), st.randoms(use_true_random=False))
def test_plan_is_valid_and_deterministic_for_many_points(case: tuple[list[Span], int, int], rng: random.Random) -> None:
    spans, max_gap, max_registers = case
    requests = plan(spans, max_gap=max_gap, max_registers=max_registers)
    check_invariants(spans, requests, max_gap, max_registers)
    shuffled = spans[:]
    rng.shuffle(shuffled)
    assert plan(shuffled, max_gap=max_gap, max_registers=max_registers) == requests


@settings(max_examples=100, deadline=None)
@given(cases(max_spans=7))
def test_larger_max_gap_never_needs_more_requests(case: tuple[list[Span], int, int]) -> None:
    spans, max_gap, max_registers = case
    fewer = plan(spans, max_gap=max_gap + 1, max_registers=max_registers)
    assert len(fewer) <= len(plan(spans, max_gap=max_gap, max_registers=max_registers))
