"""Tests for the RS-485 wire-time budget, against the line-limit figures in STACK-NOTES."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.modbus.budget import (
    OVERLOAD_THRESHOLD,
    LineBudget,
    char_bits,
    line_budget,
    read_request_bytes,
    read_response_bytes,
    response_timeout,
    t35,
    transaction_time,
    write_request_bytes,
    write_response_bytes,
)

MS = 1e-3
BITS_8E1 = 11


# --- the oracle: STACK-NOTES "RS-485 line limit, read 10 registers, 8E1" ---------------


def read_10_registers(baudrate: int) -> float:
    """Seconds one 10-register read transaction holds an 8E1 line."""
    return transaction_time(read_request_bytes(), read_response_bytes("holding", 10), baudrate, BITS_8E1)


def test_read_10_registers_at_9600_8e1_matches_stack_notes() -> None:
    seconds = read_10_registers(9600)
    assert seconds == pytest.approx(45.8 * MS, abs=0.1 * MS)
    assert 1 / seconds == pytest.approx(21.8, abs=0.05)


def test_read_10_registers_at_115200_8e1_matches_stack_notes() -> None:
    seconds = read_10_registers(115200)
    assert seconds == pytest.approx(6.65 * MS, abs=0.1 * MS)
    assert 1 / seconds == pytest.approx(150, abs=1)


def test_125_register_response_wire_time() -> None:
    response = read_response_bytes("holding", 125)
    assert response == 255
    assert response * BITS_8E1 / 1200 > 2.0
    # The brief's "about 22 ms" at 115200 is the 8N1 figure; 8E1 is about 24 ms.
    assert response * char_bits(8, "N", 1) / 115200 == pytest.approx(22.1 * MS, abs=0.1 * MS)
    assert response * BITS_8E1 / 115200 == pytest.approx(24.3 * MS, abs=0.1 * MS)


# --- characters and t3.5 ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("bytesize", "parity", "stopbits", "bits"),
    [
        (8, "E", 1, 11),
        (8, "O", 1, 11),
        (8, "N", 1, 10),
        (8, "N", 2, 11),
        (8, "E", 2, 12),
        (7, "E", 1, 10),
        (7, "N", 2, 10),
        (5, "N", 1.5, 8),  # rounded up: a budget errs towards a busier line
    ],
)
def test_char_bits(bytesize: int, parity: str, stopbits: float, bits: int) -> None:
    assert char_bits(bytesize, parity, stopbits) == bits


def test_char_bits_defaults_to_the_modbus_default_8e1() -> None:
    assert char_bits() == 11


@pytest.mark.parametrize(("bytesize", "parity", "stopbits"), [(9, "E", 1), (8, "X", 1), (8, "E", 3)])
def test_char_bits_rejects_impossible_framing(bytesize: int, parity: str, stopbits: float) -> None:
    with pytest.raises(ValueError):
        char_bits(bytesize, parity, stopbits)


def test_t35_scales_with_the_character_time_up_to_19200() -> None:
    assert t35(9600, 11) == pytest.approx(3.5 * 11 / 9600)  # ~4 ms, as in STACK-NOTES
    assert t35(9600, 11) == pytest.approx(4.01 * MS, abs=0.01 * MS)
    assert t35(19200, 11) == pytest.approx(3.5 * 11 / 19200)
    assert t35(1200, 10) == pytest.approx(3.5 * 10 / 1200)


@pytest.mark.parametrize("baudrate", [19201, 38400, 57600, 115200, 921600])
def test_t35_is_fixed_above_19200(baudrate: int) -> None:
    assert t35(baudrate, 11) == 0.00175
    assert t35(baudrate, 10) == 0.00175


@pytest.mark.parametrize(("baudrate", "bits"), [(0, 11), (-9600, 11), (9600, 0)])
def test_line_parameters_must_be_positive(baudrate: int, bits: int) -> None:
    with pytest.raises(ValueError):
        t35(baudrate, bits)


# --- frame sizes -----------------------------------------------------------------------


def test_read_request_is_eight_bytes() -> None:
    assert read_request_bytes() == 8


@pytest.mark.parametrize(
    ("table", "count", "nbytes"),
    [
        ("holding", 1, 7),
        ("input", 10, 25),
        ("holding", 125, 255),
        ("coil", 1, 6),
        ("coil", 8, 6),
        ("coil", 9, 7),
        ("discrete", 2000, 255),
    ],
)
def test_read_response_bytes(table: str, count: int, nbytes: int) -> None:
    assert read_response_bytes(table, count) == nbytes


@pytest.mark.parametrize(
    ("table", "count"),
    [("holding", 0), ("holding", 126), ("coil", 2001), ("register", 1)],
)
def test_read_response_rejects_impossible_reads(table: str, count: int) -> None:
    with pytest.raises(ValueError):
        read_response_bytes(table, count)


@pytest.mark.parametrize(
    ("table", "count", "nbytes"),
    [
        ("coil", 1, 8),  # FC5
        ("holding", 1, 8),  # FC6
        ("coil", 2, 10),  # FC15: 9 + 1 data byte
        ("coil", 9, 11),  # FC15: 9 + 2 data bytes
        ("holding", 2, 13),  # FC16: 9 + 4 data bytes
        ("holding", 123, 255),  # FC16 at its limit
        ("coil", 1968, 255),  # FC15 at its limit
    ],
)
def test_write_frames(table: str, count: int, nbytes: int) -> None:
    assert write_request_bytes(table, count) == nbytes
    assert write_response_bytes(table, count) == 8


@pytest.mark.parametrize(
    ("table", "count"),
    [("input", 1), ("discrete", 1), ("holding", 124), ("coil", 1969), ("holding", 0)],
)
def test_write_rejects_impossible_writes(table: str, count: int) -> None:
    with pytest.raises(ValueError):
        write_request_bytes(table, count)
    with pytest.raises(ValueError):
        write_response_bytes(table, count)


# --- transaction time and timeouts ------------------------------------------------------


def test_transaction_time_is_both_frames_plus_two_silences() -> None:
    assert transaction_time(8, 25, 9600, 11) == pytest.approx(33 * 11 / 9600 + 2 * 3.5 * 11 / 9600)
    assert transaction_time(8, 8, 115200, 10) == pytest.approx(16 * 10 / 115200 + 2 * 0.00175)


@given(
    st.integers(1, 125),
    st.sampled_from([1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200]),
    st.sampled_from([10, 11, 12]),
)
def test_transaction_time_grows_with_count_and_shrinks_with_baudrate(count: int, baudrate: int, bits: int) -> None:
    here = transaction_time(8, read_response_bytes("holding", count), baudrate, bits)
    if count < 125:
        assert transaction_time(8, read_response_bytes("holding", count + 1), baudrate, bits) > here
    assert transaction_time(8, read_response_bytes("holding", count), 2 * baudrate, bits) < here


def test_timeout_for_125_registers_at_1200_baud_exceeds_two_seconds() -> None:
    timeout = response_timeout(read_response_bytes("holding", 125), 1200, BITS_8E1)
    assert timeout > 2.0
    # (255 + 8) chars on the wire + t3.5 + 0.1 s margin
    assert timeout == pytest.approx(263 * 11 / 1200 + 3.5 * 11 / 1200 + 0.1)


def test_timeout_margin_and_request_size() -> None:
    base = response_timeout(25, 9600, 11, margin=0.0)
    assert response_timeout(25, 9600, 11) == pytest.approx(base + 0.1)
    assert base == pytest.approx(33 * 11 / 9600 + 3.5 * 11 / 9600)
    bigger = response_timeout(8, 9600, 11, margin=0.0, request_bytes=write_request_bytes("holding", 123))
    assert bigger == pytest.approx(263 * 11 / 9600 + 3.5 * 11 / 9600)


def test_timeout_covers_the_transaction_at_every_common_baudrate() -> None:
    # A timeout shorter than the exchange itself would fail every healthy poll.
    for baudrate in (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200):
        for count in (1, 10, 125):
            response = read_response_bytes("holding", count)
            assert response_timeout(response, baudrate, 11) > transaction_time(8, response, baudrate, 11) - t35(
                baudrate, 11
            )


# --- line budget -----------------------------------------------------------------------


def test_line_budget_sums_jobs_over_their_intervals() -> None:
    tx = (read_request_bytes(), read_response_bytes("holding", 10))
    one = transaction_time(*tx, 9600, 11)
    budget = line_budget([(1.0, [tx, tx]), (0.5, [tx])], 9600, 11)
    assert budget.cycle_seconds == pytest.approx((2 * one, one))
    assert budget.busy_per_second == pytest.approx(2 * one / 1.0 + one / 0.5)
    assert budget.utilisation == budget.busy_per_second
    assert budget.transactions == 3
    assert budget.intervals == (1.0, 0.5)


def test_line_budget_accepts_generators() -> None:
    jobs = ((1.0, [(8, 25)]) for _ in range(3))
    assert line_budget(jobs, 9600, 11).cycle_seconds == pytest.approx((read_10_registers(9600),) * 3)


def test_line_budget_oracle_rate() -> None:
    # 21 reads of 10 registers per second fit a 9600 8E1 line; 22 do not (21.8 tx/s).
    tx = [(8, 25)]
    assert line_budget([(1 / 21, tx)], 9600, 11).utilisation < 1
    assert line_budget([(1 / 22, tx)], 9600, 11).utilisation > 1


def test_utilisation_may_exceed_one_and_flags_overload() -> None:
    tx = [(8, 255)] * 10  # ten full 125-register reads, ~2.3 s of wire time
    budget = line_budget([(1.0, tx)], 9600, 11)
    assert budget.utilisation > 1
    assert budget.overloaded
    assert OVERLOAD_THRESHOLD == 0.8


def test_overload_threshold_boundary() -> None:
    cycle = transaction_time(8, 25, 9600, 11)
    at = line_budget([(cycle / 0.8, [(8, 25)])], 9600, 11)
    above = line_budget([(cycle / 0.81, [(8, 25)])], 9600, 11)
    below = line_budget([(cycle / 0.79, [(8, 25)])], 9600, 11)
    assert at.utilisation == pytest.approx(0.8)
    assert above.overloaded and not below.overloaded


def test_describe_gives_the_numbers() -> None:
    # 29 reads of 10 registers every 1.5 s: 29 * 45.83 ms = 1.329 s, 89% of the line.
    budget = line_budget([(1.5, [(8, 25)] * 29)], 9600, 11, framing="8E1")
    text = budget.describe()
    assert text.startswith("needs 89% of the line: 1.33 s of wire time per 1.50 s (1 job, 29 tran")
    assert text.endswith("at 9600 baud 8E1 (11 bits/char)")
    assert "\n" not in text


def test_describe_scales_to_the_slowest_interval() -> None:
    budget = line_budget([(1.0, [(8, 25)]), (10.0, [(8, 25)])], 9600, 11)
    busy = budget.busy_per_second
    assert f"{busy:.0%}".rstrip("%") in budget.describe()
    assert f"{busy * 10:.2f} s of wire time per 10.00 s (2 jobs" in budget.describe()
    assert budget.describe().endswith("at 9600 baud (11 bits/char)")


def test_empty_line() -> None:
    budget = line_budget([], 19200, 11)
    assert budget == LineBudget(0, 0, (), (), 0, 19200, 11)
    assert not budget.overloaded
    assert budget.describe().startswith("needs 0% of the line")


@pytest.mark.parametrize("interval", [0.0, -1.0])
def test_line_budget_rejects_non_positive_intervals(interval: float) -> None:
    with pytest.raises(ValueError, match="interval"):
        line_budget([(interval, [(8, 25)])], 9600, 11)


def test_line_budget_is_immutable() -> None:
    budget = line_budget([(1.0, [(8, 25)])], 9600, 11)
    with pytest.raises(AttributeError):
        budget.utilisation = 0.0  # type: ignore[misc]
