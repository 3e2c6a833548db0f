"""RawCache: the raw values of a device's polled reads, looked up as the Modbus TCP server's cache hits."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.modbus.cache import RawCache

TABLES = ("holding", "coil")


def model_lookup(
    blocks: list[tuple[str, int, list[int], float]], table: str, address: int, count: int, fresh_since: float
) -> list[int] | None:
    """Per value: the freshest block read at or after `fresh_since` that holds it; None when one has none."""
    out = []
    for at in range(address, address + count):
        holding = [
            (t, data[at - start]) for tb, start, data, t in blocks if tb == table and start <= at < start + len(data)
        ]
        holding = [(t, v) for t, v in holding if t >= fresh_since]
        if not holding:
            return None
        out.append(max(holding)[1])
    return out if count > 0 else None


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[str, object]]:
    """Stores (each later than the one before, as the line's clock runs) and invalidations, in any order."""
    steps: list[tuple[str, object]] = []
    now = 0.0
    for _ in range(draw(st.integers(0, 12))):
        table = draw(st.sampled_from(TABLES))
        address = draw(st.integers(0, 40))
        if draw(st.integers(0, 4)) == 0:
            steps.append(("invalidate", (table, address, draw(st.integers(1, 10)))))
            continue
        now += draw(st.floats(0.001, 10.0))
        data = draw(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=12))
        steps.append(("store", (table, address, data, now)))
    return steps


@settings(max_examples=400, deadline=None)
@given(
    histories(),
    st.sampled_from(TABLES),
    st.integers(0, 50),
    st.integers(0, 20),
    st.floats(0.0, 60.0),
)
def test_lookup_gives_each_value_from_the_freshest_block_that_holds_it(
    history: list[tuple[str, object]], table: str, address: int, count: int, fresh_since: float
) -> None:
    cache = RawCache()
    kept: list[tuple[str, int, list[int], float]] = []
    for kind, args in history:
        if kind == "store":
            tb, start, data, now = args  # type: ignore[misc]
            cache.store(tb, start, list(data), now)
            # A read of the same block replaces the one before.
            kept = [b for b in kept if (b[0], b[1], len(b[2])) != (tb, start, len(data))] + [(tb, start, data, now)]
        else:
            tb, start, n = args  # type: ignore[misc]
            cache.invalidate(tb, start, n)
            kept = [b for b in kept if not (b[0] == tb and b[1] < start + n and start < b[1] + len(b[2]))]
    assert cache.lookup(table, address, count, fresh_since) == model_lookup(kept, table, address, count, fresh_since)


def test_a_fresher_block_inside_an_older_one_wins_for_the_values_it_holds() -> None:
    cache = RawCache()
    cache.store("holding", 0, [1] * 10, 1.0)  # a planned block
    cache.store("holding", 4, [7, 8], 2.0)  # a write's read-back, later
    assert cache.lookup("holding", 0, 10, 0.0) == [1, 1, 1, 1, 7, 8, 1, 1, 1, 1]


def test_stale_partly_missing_or_written_blocks_are_no_hit() -> None:
    cache = RawCache()
    cache.store("holding", 0, [1, 2, 3, 4], 5.0)
    cache.store("coil", 0, [True, False], 5.0)
    assert cache.lookup("holding", 1, 2, 5.0) == [2, 3]
    assert cache.lookup("holding", 1, 2, 5.1) is None  # older than asked for
    assert cache.lookup("holding", 2, 3, 0.0) is None  # register 4 was never read
    assert cache.lookup("input", 0, 1, 0.0) is None  # another table
    assert cache.lookup("holding", 0, 0, 0.0) is None
    assert cache.lookup("coil", 0, 2, 0.0) == [True, False]
    cache.invalidate("holding", 3, 1)  # written: the block holding register 3 goes
    assert cache.lookup("holding", 0, 1, 0.0) is None
    assert cache.lookup("coil", 0, 1, 0.0) == [True]
    cache.clear()
    assert cache.lookup("coil", 0, 1, 0.0) is None
