"""The DATA and HELLO payload rules, pure: ts range, names by fullmatch, strings, max_points, strict JSON."""

from __future__ import annotations

import json
from typing import Any

import pytest

from drivers.mcp.codec import Frame, FrameType, MalformedPayload
from drivers.mcp.payload import TS_MIN_MS, BadTs, new_names, quoted, read_data, read_hello

NOW = 1_767_225_600_000  # 2026-01-01T00:00Z
DAY = 86_400_000


def data(payload: bytes | dict[str, Any], **kw: int) -> tuple[int | None, dict[str, Any]]:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    limits = {"now_ms": NOW, "max_future_ms": DAY, "max_string": 1024, "max_points": 256} | kw
    return read_data(Frame(FrameType.DATA, 9, raw), **limits)


@pytest.mark.parametrize(
    "ts",
    [TS_MIN_MS - 1, 0, -5, NOW + DAY + 1, 18446744073709551615, 10**400, 1.7e12, "1767225600000", True],
    ids=["1999", "zero", "negative", "past tomorrow", "u64 max", "10^400", "float", "string", "bool"],
)
def test_a_ts_out_of_range_or_of_the_wrong_type_is_bad_ts(ts: object) -> None:
    raw = (
        b'{"ts":%s,"values":{"v":1}}' % json.dumps(ts).encode()
        if ts != 10**400
        else b'{"ts":1' + b"0" * 400 + b',"values":{"v":1}}'
    )
    with pytest.raises(BadTs) as info:
        data(raw)
    assert str(info.value).startswith("ts ") and len(str(info.value)) < 200
    assert info.value.seq == 9


def test_ts_at_the_edges_and_absent() -> None:
    assert data({"ts": TS_MIN_MS, "values": {"v": 1}})[0] == TS_MIN_MS
    assert data({"ts": NOW + DAY, "values": {"v": 1}})[0] == NOW + DAY
    assert data({"values": {"v": 1}})[0] is None
    assert data({"ts": NOW + 2 * DAY, "values": {"v": 1}}, max_future_ms=3 * DAY)[0] == NOW + 2 * DAY


@pytest.mark.parametrize(
    "name", ["temp\n", "\ntemp", "a/b", "+", "#", "$SYS", "-x", ".x", "", "x" * 65, "tëmp", "a b", "\u0000"]
)
def test_names_must_fullmatch(name: str) -> None:
    with pytest.raises(MalformedPayload, match="topic-safe"):
        data({"values": {name: 1}})


def test_good_names_and_values_pass() -> None:
    values = {"a": 1, "B_2.x-y": -2.5, "_s": "text", "b": True, "n": None, "x" * 64: 2**1023}
    assert data({"ts": NOW, "values": values}) == (NOW, values)


@pytest.mark.parametrize(
    "value", [[1], {"a": 1}, 2**1024, -(2**1024)], ids=["list", "object", "int too wide", "negative too wide"]
)
def test_values_of_the_wrong_kind_or_size(value: object) -> None:
    with pytest.raises(MalformedPayload):
        data({"values": {"v": value}})


def test_strings_are_measured_in_utf8_bytes() -> None:
    assert data({"values": {"s": "x" * 1024}}) is not None
    assert data({"values": {"s": "é" * 512}}) is not None  # 1024 bytes
    with pytest.raises(MalformedPayload, match="max_string"):
        data({"values": {"s": "é" * 513}})
    with pytest.raises(MalformedPayload, match="max_string"):
        data({"values": {"s": "x" * 1_000_000}})


@pytest.mark.parametrize(
    "raw",
    [b'{"values":{"v":NaN}}', b'{"values":{"v":Infinity}}', b'{"values":{"v":1e999}}', b'{"values":{"v":"\\ud800"}}'],
    ids=["NaN", "Infinity", "1e999", "lone surrogate"],
)
def test_json_that_is_not_strict_is_refused(raw: bytes) -> None:
    with pytest.raises(MalformedPayload):
        data(raw)


def test_a_frame_with_more_names_than_max_points_is_refused_before_any_per_name_work() -> None:
    with pytest.raises(MalformedPayload, match="max_points"):
        data({"values": {f"v{i}": i for i in range(257)}})
    assert len(data({"values": {f"v{i}": i for i in range(256)}})[1]) == 256


def test_new_names_beyond_max_points_are_refused_whole() -> None:
    known = {f"v{i}" for i in range(200)}
    assert new_names(["v1", "w1"], known, 256, 3) == ["w1"]
    with pytest.raises(MalformedPayload, match=r"max_points \(256"):
        new_names([f"x{i}" for i in range(57)], known, 256, 3)
    assert new_names(["v0", *(f"y{i}" for i in range(56))], known, 256, 3) == [f"y{i}" for i in range(56)]


def test_hello_device_id_by_fullmatch_and_other_fields() -> None:
    def hello(**body: object) -> Frame:
        return Frame.json(FrameType.HELLO, 1, {"boot_id": "b", "device_id": "pump-1", "token": "t" * 16} | body)

    assert read_hello(hello(), 30).device_id == "pump-1"
    assert read_hello(hello(heartbeat_s=5), 30).heartbeat_s == 5
    for bad in ("pump-1\n", "", "x" * 65, "a/b", 5):
        with pytest.raises(MalformedPayload, match="device_id"):
            read_hello(hello(device_id=bad), 30)
    # docs/mcp.md §3.1: boot_id is any string (the HELLO's size is what bounds it).
    assert read_hello(hello(boot_id="b" * 3000), 30).boot_id == "b" * 3000
    with pytest.raises(MalformedPayload, match="boot_id"):
        read_hello(hello(boot_id=5), 30)
    for hb in (0, 3601, True, 1.5):
        with pytest.raises(MalformedPayload, match="heartbeat_s"):
            read_hello(hello(heartbeat_s=hb), 30)


def test_quoted_is_short() -> None:
    assert quoted("abc") == "'abc'"
    assert len(quoted("x" * 10_000)) == 40
