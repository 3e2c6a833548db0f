"""Correcting what was stamped before the clock was set (issue 16, clocks), as pure functions: the process clock's
anchors under any sequence of steps and sync changes, and `router.restamp` writing a corrected ts into a message.

The clock is faked through the process clock's injectable wall and monotonic clocks, never the machine's.
"""

from __future__ import annotations

import itertools
import json
import math

from hypothesis import given
from hypothesis import strategies as st

from gateway.router import restamp
from gateway.types import Message, ProcessClock

YEAR_S = 365 * 86400


class FakeTime:
    """Wall and monotonic seconds the test moves."""

    def __init__(self, wall: float, mono: float) -> None:
        self.now, self.mono = wall, mono

    def wall(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono


# One event of a Pi's first hour: a sample, time passing, the wall clock stepped (NTP, or a hand), a sync change.
events = st.one_of(
    st.just(("sample", 0.0)),
    st.tuples(st.just("run"), st.floats(0.0, 3600.0)),
    st.tuples(st.just("step"), st.floats(-60.0 * YEAR_S, 60.0 * YEAR_S).filter(lambda s: abs(s) >= 0.001)),
    st.tuples(st.just("sync"), st.sampled_from([True, False, None])),
)


@given(start=st.floats(0.0, 2e9), run=st.lists(events, max_size=60))
def test_corrected_ts_is_the_anchor_on_the_clock_as_it_reads_now_and_keeps_the_order_samples_were_taken_in(
    start: float, run: list[tuple[str, object]]
) -> None:
    """Whatever the steps (years either way, repeatedly) and sync changes: a sample stamped while the clock is known
    not synchronised is anchored, and its corrected ts is anchor + (wall - monotonic) now (its own ts when that is
    a ms from it); the corrected ts of those samples never go backwards from one sample to the next by more than a
    ms; a sample stamped otherwise has no anchor."""
    t = FakeTime(start, 100.0)
    clock = ProcessClock(t.wall, t.monotonic)
    clock.synchronized = False  # booted before NTP
    taken: list[tuple[int, int]] = []  # (ts, anchor) of the anchored samples, in the order they were taken
    for kind, arg in run:
        if kind == "sample":
            ts = clock.now_ms()
            anchor = clock.anchor(ts)
            assert (anchor is None) == (clock.synchronized is not False)
            if anchor is not None:
                assert anchor == math.floor(t.mono * 1000)  # the monotonic clock's ms: no step moves it
                taken.append((ts, anchor))
        elif kind == "run":
            t.now += float(arg)  # type: ignore[arg-type]
            t.mono += float(arg)  # type: ignore[arg-type]
        elif kind == "step":
            t.now += float(arg)  # type: ignore[arg-type]
        else:
            clock.synchronized = arg  # type: ignore[assignment]
    offset = clock.offset_ms()
    assert abs(offset - (math.floor(t.now * 1000) - math.floor(t.mono * 1000))) <= 1  # the ms either clock floors
    corrected = [clock.corrected(ts, anchor) for ts, anchor in taken]
    for (ts, anchor), fixed in zip(taken, corrected, strict=True):
        exact = anchor + offset
        assert fixed == (exact if abs(exact - ts) > 1 else ts)  # a move of one ms is none
    assert all(b >= a - 1 for a, b in itertools.pairwise(corrected)), "in the order taken, within a ms"


@given(start=st.floats(1e9, 2e9), step=st.floats(-50.0 * YEAR_S, 50.0 * YEAR_S))
def test_without_a_step_since_the_corrected_ts_is_the_ts_taken(start: float, step: float) -> None:
    """A sample corrected with no step since is its own ts, to the ms; after a step, it is moved by that step
    (within the ms either clock is floored to)."""
    t = FakeTime(start, 5.0)
    clock = ProcessClock(t.wall, t.monotonic)
    clock.synchronized = False
    ts = clock.now_ms()
    anchor = clock.anchor(ts)
    assert anchor is not None and clock.corrected(ts, anchor) == ts
    t.now += 0.3  # no step: a ms flooring one way or the other changes nothing
    t.mono += 0.3
    assert clock.corrected(ts, anchor) == ts
    t.now += step
    assert abs(clock.corrected(ts, anchor) - (ts + step * 1000)) <= 2


def test_the_ms_each_clock_floors_to_does_not_move_a_ts_or_the_clock() -> None:
    """Wall and monotonic clocks floored to their ms apart: their difference flickers by one as they run, which is
    no step: a sample's corrected ts is its ts, and now_ms() never goes back."""
    t = FakeTime(1_000_000.0004, 5.0008)
    clock = ProcessClock(t.wall, t.monotonic)
    clock.synchronized = False
    ts = clock.now_ms()
    anchor = clock.anchor(ts)
    assert anchor is not None
    seen = [ts]
    for _ in range(10):
        t.now += 0.0003
        t.mono += 0.0003
        assert clock.corrected(ts, anchor) == ts
        seen.append(clock.now_ms())
    assert seen == sorted(seen)


def test_a_gateway_restarted_in_the_same_boot_replays_a_spooled_ts_as_it_was_taken() -> None:
    """The next process of the boot settles wall - monotonic on its own readings, a ms apart from the first's when
    the clocks' ms fall so: with no step between, a ts spooled by the first goes out as it was taken."""
    t = FakeTime(1_000_000.0004, 5.0008)
    first = ProcessClock(t.wall, t.monotonic)
    first.synchronized = False
    ts = first.now_ms()
    anchor = first.anchor(ts)
    assert anchor is not None
    t.now += 0.0003
    t.mono += 0.0003
    second = ProcessClock(t.wall, t.monotonic)
    assert abs(second.offset_ms() - first.offset_ms()) == 1  # the case: their ms fell apart
    assert second.corrected(ts, anchor) == ts


def test_telemetry_is_restamped_in_its_payload_and_every_other_message_in_its_ts_only() -> None:
    """restamp writes the ts into a telemetry (or P/metrics) payload as the router wrote it, its values untouched;
    a per-point value or a status keeps its payload; a JSON payload of another shape gets its "ts" rewritten."""
    body = b'{"ts":1000,"values":{"t":21.5,"s":"{\\"ts\\":1}","big":123456789012345678901234567890}}'
    out = restamp(Message("boiler/telemetry", body, ts=1000, anchor=7), 1_765_000_000_123)
    assert out.ts == 1_765_000_000_123 and out.anchor == 7
    assert out.payload == body.replace(b'"ts":1000', b'"ts":1765000000123', 1)
    assert json.loads(out.payload)["values"] == json.loads(body)["values"]
    point = restamp(Message("boiler/t", b"21.5", retain=True, ts=1000), 5000)
    assert (point.payload, point.ts, point.retain) == (b"21.5", 5000, True)
    spaced = restamp(Message("metrics", b'{"uptime_s": 3, "ts": 1000}', ts=1000), 5000)
    assert json.loads(spaced.payload) == {"uptime_s": 3, "ts": 5000}
    garbage = restamp(Message("x/telemetry", b"not json", ts=1000), 5000)
    assert (garbage.payload, garbage.ts) == (b"not json", 5000)
