"""The strict reader of peers' JSON and the writer that cannot fail (gateway/jsonsafe.py)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.jsonsafe import MAX_DEPTH, JsonRejected, dumps_safe, loads_strict

# Text without lone surrogates: what a well-behaved peer can send.
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | _text
_json = st.recursive(
    _scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(_text, kids, max_size=4), max_leaves=20
)

# Anything at all a driver or an old spool might hand the encoders.
_odd_scalars = (
    _scalars
    | st.floats()
    | st.text(max_size=20)  # lone surrogates included
    | st.integers(min_value=10**4000, max_value=10**5000)
    | st.binary(max_size=8)
    | st.builds(object)
)
_anything = st.recursive(
    _odd_scalars,
    lambda kids: (
        st.lists(kids, max_size=4)
        | st.tuples(kids, kids)
        | st.dictionaries(st.text(max_size=8) | st.integers() | st.floats(), kids, max_size=4)
    ),
    max_leaves=30,
)


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


@given(_json)
def test_what_a_good_peer_sends_reads_back_equal(value: object) -> None:
    if _depth(value) > MAX_DEPTH:
        return
    assert loads_strict(json.dumps(value, ensure_ascii=False).encode()) == value
    assert loads_strict(json.dumps(value)) == value  # \u escapes of real characters are fine


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"NaN", "NaN is not JSON"),
        (b'{"v": -Infinity}', "-Infinity is not JSON"),
        (b"[1e400]", "out of range"),
        (b'{"v": -1e999}', "out of range"),
        (b'"\\ud800"', "lone surrogate"),
        (b'{"\\udfff": 1}', "lone surrogate"),
        (b'["ok", {"deep": "\\ud83d"}]', "lone surrogate"),
        (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "deeper than"),
        (b"[" * 100_000, "deeper than"),
        (b'{"a": "\xff"}', "not UTF-8"),
        (b"1" * 5000, "not JSON"),
        (b"{'a': 1}", "not JSON"),
        (b"", "not JSON"),
    ],
)
def test_what_strict_json_refuses_says_why(raw: bytes, why: str) -> None:
    with pytest.raises(JsonRejected, match=why):
        loads_strict(raw)


def test_depth_limit_is_inclusive_and_surrogate_pairs_are_text() -> None:
    assert loads_strict(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH) is not None
    assert loads_strict(b'"\\ud83d\\ude00"') == "\U0001f600"  # a proper pair is one character


@settings(max_examples=300)
@given(_anything)
def test_dumps_safe_never_raises_and_writes_valid_utf8_json(value: object) -> None:
    text = dumps_safe(value).decode("utf-8")  # strict UTF-8: no surrogate escaped through
    json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} written"))


def test_dumps_safe_on_the_values_that_broke_encoders() -> None:
    assert dumps_safe({"v": "a\ud800b"}) == b'{"v":"a?b"}'
    assert dumps_safe([math.nan, math.inf, -math.inf, 1.5]) == b"[null,null,null,1.5]"
    assert dumps_safe(10**5000) == b'"<int of 16610 bits>"'
    assert dumps_safe({1: 2, None: 3}) == b'{"1":2,"None":3}'
    deep: list[object] = []
    for _ in range(100_000):  # far past the interpreter's recursion limit
        deep = [deep]
    assert dumps_safe(deep) == b'"<list nested too deep to print>"'
