"""The planner's refusals at the edges of the address space and of its arguments, word for word."""

from __future__ import annotations

import re

import pytest

from drivers.modbus.planner import Span, plan


@pytest.mark.parametrize(
    ("address", "count", "message"),
    [
        (65536, 1, "point 'p': address 65536 outside 0..65535"),
        (-1, 1, "point 'p': address -1 outside 0..65535"),
        (65535, 2, "point 'p': 2 from address 65535 runs past the end of the holding table (65535)"),
        (0, 0, "point 'p': count must be >= 1, got 0"),
    ],
    ids=["first address past the end", "negative address", "runs past the end", "empty"],
)
def test_a_span_outside_the_address_space_is_refused_saying_where_the_space_ends(
    address: int, count: int, message: str
) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        Span("p", "holding", address, count)


def test_the_last_address_holds_a_one_register_point() -> None:
    assert Span("p", "holding", 65535, 1).end == 65536


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_gap": -1}, "max_gap must be >= 0, got -1"),
        ({"max_registers": 0}, "max_registers must be >= 1, got 0"),
    ],
)
def test_bad_planner_arguments_are_refused_saying_which_and_why(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        plan([Span("p", "holding", 0, 1)], **kwargs)
