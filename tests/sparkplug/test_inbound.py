"""What a Sparkplug host sends an edge node, read (bridge/sparkplug/inbound.py): STATE, NCMD rebirth, DCMD writes.

All of it is network input: whatever the bytes, the readers answer or refuse with ValueError/CommandRefused saying
why, and never hand on a value the gateway's JSON cannot carry or a number the host did not send."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.sparkplug import payload as p
from bridge.sparkplug.inbound import HostState, device_writes, read_state, rebirth_requested
from bridge.sparkplug.payload import CommandRefused, MetricSpec, Payload
from bridge.sparkplug.session import REBIRTH, EdgeSession
from gateway.jsonsafe import dumps_safe

NOW = 1_765_119_600_000
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def born_session() -> EdgeSession:
    """A session whose node and device `pump1` (setpoint Int16, on Boolean, mode String) are born."""
    session = EdgeSession("g", "e")
    session.nbirth(0, [], NOW)
    specs = [MetricSpec("setpoint", p.INT16, writable=True), MetricSpec("on", p.BOOLEAN), MetricSpec("mode", p.STRING)]
    session.dbirth("pump1", specs, {}, NOW, NOW)
    return session


def command(*metrics: dict[str, object]) -> bytes:
    """A DCMD/NCMD payload with these metric fields."""
    payload = Payload(timestamp=NOW)
    for fields in metrics:
        payload.metrics.add(**fields)
    return payload.SerializeToString()


# --- STATE --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "state"),
    [
        (b'{"online": true, "timestamp": 1700000000000}', HostState(True, 1700000000000)),
        (b'{"online":false,"timestamp":0}', HostState(False, 0)),
        (b'{"timestamp": 5, "online": false, "extra": [1]}', HostState(False, 5)),
        (b'{"online": true}', HostState(True, 0)),
        (b"ONLINE", HostState(True, 0)),
        (b"OFFLINE\n", HostState(False, 0)),
        (b" ONLINE ", HostState(True, 0)),
    ],
)
def test_read_state_takes_3_0_json_and_2_2_online_offline(data: bytes, state: HostState) -> None:
    """A 3.0 STATE (JSON online + timestamp) and a 2.2 one (ONLINE/OFFLINE text) both read."""
    assert read_state(data) == state


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b'{"online": true, "timestamp": ' + b"1" * 2000 + b"}", "bytes; a STATE has a few dozen"),
        (b"online", "not JSON"),
        (b"", "not JSON"),
        (b"\xff\xfe{}", "not JSON"),
        (b'{"online": "true"}', "online"),
        (b'{"online": 1}', "online"),
        (b'{"online": null}', "online"),
        (b"[true]", "online"),
        (b"true", "online"),
        (b'"ONLINE"', "online"),
        (b'{"online": true, "timestamp": -1}', "not unix milliseconds"),
        (b'{"online": true, "timestamp": 1.5}', "not unix milliseconds"),
        (b'{"online": true, "timestamp": 1e3}', "not unix milliseconds"),
        (b'{"online": true, "timestamp": true}', "not unix milliseconds"),
        (b'{"online": true, "timestamp": "1"}', "not unix milliseconds"),
        (b'{"online": true, "timestamp": null}', "not unix milliseconds"),
        (b'{"online": true, "timestamp": 9223372036854775808}', "not unix milliseconds"),
        (b'{"online": true, "timestamp": ' + b"9" * 900 + b"}", "not unix milliseconds"),
        (b'{"online": true, "timestamp": NaN}', "not JSON"),
        (b"[" * 500 + b"]" * 500, "not JSON"),
        (b'{"a":' * 150 + b"1" + b"}" * 150, "not JSON"),
        (b'{"online": true, "x": "\\ud800"}', "not JSON"),
    ],
)
def test_read_state_refuses_hostile_states_with_a_value_error_saying_why(data: bytes, why: str) -> None:
    """Huge, not JSON, wrong types, negative/float/bool timestamps, deep nesting, non-UTF-8: ValueError only."""
    with pytest.raises(ValueError, match=why) as info:
        read_state(data)
    assert len(str(info.value)) < 200  # the message goes into a log line: bounded whatever came in


# --- NCMD -----------------------------------------------------------------------------------------------------


def test_rebirth_requested_only_by_the_rebirth_metric_set_true() -> None:
    """Node Control/Rebirth = true asks for a rebirth; false, another metric, an alias or another type do not."""
    session = born_session()
    assert rebirth_requested(session, command({"name": REBIRTH, "boolean_value": True}))
    assert rebirth_requested(
        session, command({"name": "other", "int_value": 1}, {"name": REBIRTH, "boolean_value": True})
    )
    assert not rebirth_requested(session, command({"name": REBIRTH, "boolean_value": False}))
    assert not rebirth_requested(session, command({"name": REBIRTH, "int_value": 1}))
    assert not rebirth_requested(session, command({"name": REBIRTH, "string_value": "true"}))
    assert not rebirth_requested(session, command({"name": "Node Control/rebirth", "boolean_value": True}))
    assert not rebirth_requested(session, command())
    with pytest.raises(CommandRefused):
        rebirth_requested(session, b"\x0a\xff")


# --- DCMD -----------------------------------------------------------------------------------------------------


def test_device_writes_by_name_and_by_alias_in_order_with_the_births_datatype() -> None:
    """A write names its metric or gives the alias its birth gave; an Int16 without datatype is read as Int16."""
    session = born_session()
    setpoint = session.alias("pump1", "setpoint")
    data = command(
        {"alias": setpoint, "int_value": 65535},  # Int16 -1, the datatype from the birth
        {"name": "on", "datatype": p.BOOLEAN, "boolean_value": True},
        {"name": "mode", "string_value": "auto"},
        {"name": "setpoint", "datatype": p.INT16, "int_value": 0xFFFFFFD6},  # sign-extended -42
        {"name": "setpoint", "datatype": p.INT16, "int_value": 70000},  # no Int16: no value, not 4464
        {"name": "unknown", "double_value": 2.5},
    )
    assert device_writes(session, "pump1", data) == [
        ("setpoint", -1),
        ("on", True),
        ("mode", "auto"),
        ("setpoint", -42),
        ("setpoint", None),
        ("unknown", 2.5),
    ]


def test_an_unknown_alias_or_a_metric_without_name_or_alias_is_named_so_the_write_is_refused() -> None:
    """An alias no birth of this device gave is `alias <n>`; another device's alias does not resolve here."""
    session = born_session()
    session.dbirth("pump2", [MetricSpec("speed", p.DOUBLE)], {}, NOW, NOW)
    other = session.alias("pump2", "speed")
    data = command({"alias": 999, "int_value": 1}, {"alias": other, "double_value": 1.0}, {"double_value": 3.0})
    assert device_writes(session, "pump1", data) == [("alias 999", 1), (f"alias {other}", 1.0), ("(no name)", 3.0)]
    assert device_writes(session, "unborn", command({"alias": other, "double_value": 1.0})) == [(f"alias {other}", 1.0)]


def test_device_writes_refuses_garbage_too_many_metrics_too_many_bytes_and_an_empty_command() -> None:
    """Not protobuf, 65 metrics, over 64 KiB, no metric at all, a name that is not UTF-8: CommandRefused."""
    session = born_session()
    cases = {
        b"\xff" * 10: "not a Sparkplug B payload",
        command(*({"name": "on", "boolean_value": True} for _ in range(65))): "65 metrics",
        command({"name": "mode", "string_value": "x" * (64 * 1024)}): "at most 65536",
        command(): "without metrics",
        b"\x12\x04\x0a\x02\xff\xfe": "not UTF-8",  # metric 2 {name: 0xff 0xfe}
    }
    for data, why in cases.items():
        with pytest.raises(CommandRefused, match=why):
            device_writes(session, "pump1", data)


def test_a_dcmd_to_an_empty_device_name_is_refused_not_read_with_the_nodes_aliases() -> None:
    """`spBv1.0/g/DCMD/e/` (an empty last level, which `DCMD/+` matches) is no device: the node's bdSeq alias must
    not turn it into a write of `bdSeq`."""
    session = born_session()
    with pytest.raises(CommandRefused, match="without a device"):
        device_writes(session, "", command({"alias": session.alias("", "bdSeq"), "long_value": 1}))


def test_a_string_value_that_is_not_utf8_is_written_as_no_value() -> None:
    """A string_value in bad UTF-8 reaches the set path as null (refused there), never as the text "b'..'"."""
    data = b"\x12\x0a\x0a\x04mode\x7a\x02\xff\xfe"  # metric {name: "mode", string_value: 0xff 0xfe}
    assert device_writes(born_session(), "pump1", data) == [("mode", None)]


def json_safe(value: object) -> bool:
    """A value the gateway's set path can take as JSON."""
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, bool | int | str)


def check_network_input(session: EdgeSession, data: bytes) -> None:
    """Every reader on `data`: an answer or a ValueError (CommandRefused is one); writes are (str, JSON value)."""
    for reader in (
        lambda: device_writes(session, "pump1", data),
        lambda: rebirth_requested(session, data),
        lambda: read_state(data),
    ):
        try:
            result = reader()
        except ValueError as exc:  # CommandRefused included
            assert str(exc)
            continue
        if isinstance(result, list):
            for name, value in result:
                assert isinstance(name, str) and json_safe(value), (name, value)
                dumps_safe(value)


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_ever_answer_or_raise_value_error(data: bytes) -> None:
    """Random bytes to the DCMD, NCMD and STATE readers: nothing but an answer or ValueError/CommandRefused."""
    check_network_input(born_session(), data)


wire_metric = st.fixed_dictionaries(
    {},
    optional={
        "name": st.text(max_size=20) | st.sampled_from(["setpoint", "on", "mode", REBIRTH]),
        "alias": st.integers(0, 2**64 - 1),
        "timestamp": st.integers(0, 2**64 - 1),
        "datatype": st.integers(0, 2**32 - 1) | st.sampled_from(sorted(p.NAMES)),
        "is_null": st.booleans(),
        "is_historical": st.booleans(),
        "int_value": st.integers(0, 2**32 - 1),
        "long_value": st.integers(0, 2**64 - 1),
        "float_value": st.floats(width=32),
        "double_value": st.floats(),
        "boolean_value": st.booleans(),
        "string_value": st.text(max_size=20),
        "bytes_value": st.binary(max_size=20),
    },
)


@FUZZ
@given(st.lists(wire_metric, max_size=70), st.binary(max_size=8), st.integers(0, 8))
def test_well_formed_hostile_commands_and_their_mutations_only_answer_or_refuse(
    metrics: list[dict[str, object]], splice: bytes, cut: int
) -> None:
    """Valid protobuf with hostile fields (huge aliases, unknown datatypes, NaN, every value field), and the same
    bytes cut or spliced: writes carry a str name and a JSON value, or the command is refused."""
    session = born_session()
    data = command(*metrics)
    check_network_input(session, data)
    check_network_input(session, data[: len(data) - cut] + splice)


def test_deeply_nested_property_sets_are_refused_not_a_crash() -> None:
    """A metric's PropertySet nested 2,000 deep (within 64 KiB) is refused as no payload, not a RecursionError."""
    value = b""  # a PropertyValue, wrapped again and again: {propertyset_value (9): {values (2): value}}
    for _ in range(2000):
        pset = b"\x12" + _varint(len(value)) + value
        value = b"\x4a" + _varint(len(pset)) + pset
    top = b"\x12" + _varint(len(value)) + value  # the metric's PropertySet
    metric = b"\x0a\x01x" + b"\x4a" + _varint(len(top)) + top  # {name: "x", properties (9): top}
    data = b"\x12" + _varint(len(metric)) + metric  # Payload{metrics (2): metric}
    assert len(data) <= 64 * 1024
    with pytest.raises(CommandRefused, match="not a Sparkplug B payload"):
        device_writes(born_session(), "pump1", data)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
