"""What EdgeSession publishes, decoded by an implementation that owes nothing to ours (pysparkplug, in its own venv):
names, datatypes, values (negative integers, nulls, floats), properties, aliases, seq and is_historical agree
with what went in. A mistake our encoder and our decoder share shows here."""

from __future__ import annotations

import json
import math
import subprocess

from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from sparkplug.sparkplug_decode import SPB_PYTHON, decode_independently

from bridge.sparkplug import payload as p
from bridge.sparkplug.inbound import device_writes, rebirth_requested
from bridge.sparkplug.payload import MetricSpec
from bridge.sparkplug.session import EdgeSession
from gateway.types import Value

NOW = 1_765_119_600_000

#: One metric per datatype the gateway publishes, with a value at the edge of its range (negatives for signed).
EDGE_VALUES: list[tuple[MetricSpec, Value]] = [
    (MetricSpec("i8", p.INT8, unit="V", min=-128, max=127, writable=True), -128),
    (MetricSpec("i16", p.INT16, unit="°C", min=-40.5, max=125), -42),
    (MetricSpec("i32", p.INT32), -(2**31)),
    (MetricSpec("i64", p.INT64), -(2**63)),
    (MetricSpec("u8", p.UINT8), 255),
    (MetricSpec("u16", p.UINT16, writable=True), 65535),
    (MetricSpec("u32", p.UINT32), 2**32 - 1),
    (MetricSpec("u64", p.UINT64), 2**64 - 1),
    (MetricSpec("f", p.FLOAT), 1.1),
    (MetricSpec("d", p.DOUBLE, unit="m³/h"), -13.25),
    (MetricSpec("b", p.BOOLEAN, writable=True), True),
    (MetricSpec("s", p.STRING), "ok ✓"),
    (MetricSpec("unknown yet", p.DOUBLE), None),
    (MetricSpec("too big", p.INT16), 40000),  # not an Int16: a null, never a wrapped number
]


def spb(topic: str) -> str:
    return f"spBv1.0/{topic}"


def same(datatype: str, got: object, want: object) -> bool:
    """Equal, Float within float32's precision (pysparkplug widens the float32 to a double)."""
    if datatype == "Float" and isinstance(got, float) and isinstance(want, float):
        return math.isclose(got, want, rel_tol=1e-6)
    return got == want and type(got) is type(want)


def test_a_birth_and_data_of_every_datatype_decode_independently_to_what_went_in() -> None:
    """NBIRTH, DBIRTH and DDATA (live and historical) of every datatype: the host reads the same names and values."""
    session = EdgeSession("plant1", "line-a")
    specs = [spec for spec, _ in EDGE_VALUES]
    values = {spec.name: value for spec, value in EDGE_VALUES}
    node_metrics = [(MetricSpec("Properties/Software", p.STRING), "fieldgate")]
    msgs = [session.nbirth(7, node_metrics, NOW)]
    msgs.append(session.dbirth("pump1", specs, values, NOW - 500, NOW))
    later: dict[str, Value] = {"i16": -1, "i64": -1, "f": -2.5, "b": False, "s": "", "unknown yet": 0.5, "u64": 0}
    live = session.ddata("pump1", later, NOW + 1000, NOW + 1000)
    old = session.ddata("pump1", {"i8": -1, "d": 1e300}, NOW - 900, NOW + 1001)
    assert live is not None and old is not None
    msgs += [live, old]

    decoded = decode_independently([(spb(t), b) for t, b in msgs])
    assert [d.get("error") for d in decoded] == [None] * 4
    nbirth, dbirth, ddata, hist = decoded
    assert [d["seq"] for d in decoded] == [0, 1, 2, 3]
    assert nbirth["topic"] == {"group": "plant1", "type": "NBIRTH", "edge": "line-a", "device": None}
    node = {m["name"]: m for m in nbirth["metrics"]}
    assert node["bdSeq"]["value"] == 7 and node["bdSeq"]["datatype"] == "Int64"
    assert node["Node Control/Rebirth"]["value"] is False and node["Node Control/Rebirth"]["alias"] is None
    assert node["Properties/Software"]["value"] == "fieldgate"

    born = {m["name"]: m for m in dbirth["metrics"]}
    assert list(born) == [s.name for s in specs]
    for spec, value in EDGE_VALUES:
        m = born[spec.name]
        assert m["datatype"] == p.NAMES[spec.datatype]
        assert m["timestamp"] == NOW - 500 and not m["is_historical"]
        if value is None or spec.name == "too big":
            assert m["is_null"] and m["value"] is None, spec.name
        else:
            assert same(m["datatype"], m["value"], value), (spec.name, m["value"], value)
        want_props: dict[str, object] = {}
        if spec.unit:
            want_props["engUnit"] = spec.unit
        if spec.min is not None:
            want_props["min"] = float(spec.min)
        if spec.max is not None:
            want_props["max"] = float(spec.max)
        if spec.writable:
            want_props["writable"] = True
        assert m["properties"] == want_props, spec.name
        assert set(m["property_types"].values()) <= {"String", "Double", "Boolean"}
    aliases = [m["alias"] for m in nbirth["metrics"] + dbirth["metrics"] if m["alias"] is not None]
    assert len(aliases) == len(set(aliases)) == len(nbirth["metrics"]) - 1 + len(specs)

    for msg, sent, historical, ts in (
        (ddata, later, False, NOW + 1000),
        (hist, {"i8": -1, "d": 1e300}, True, NOW - 900),
    ):
        got = {m["name"]: m for m in msg["metrics"]}
        assert set(got) == set(sent)
        for name, value in sent.items():
            m = got[name]
            assert not m["name_on_wire"] and not m["datatype_on_wire"], name  # alias only
            assert m["alias"] == born[name]["alias"] and m["datatype"] == born[name]["datatype"]
            assert m["is_historical"] is historical and m["timestamp"] == ts
            assert same(m["datatype"], m["value"], value), (name, m["value"], value)


def test_ndeath_and_ddeath_decode_independently() -> None:
    """NDEATH: bdSeq only, no seq; DDEATH: the next seq, no metrics."""
    session = EdgeSession("g", "e")
    msgs = [session.nbirth(255, [], NOW), session.dbirth("d", [MetricSpec("x", p.INT8)], {"x": -5}, NOW, NOW)]
    death = session.ddeath("d", NOW + 1)
    assert death is not None
    msgs += [death, ("g/NDEATH/e", EdgeSession.ndeath(255, NOW + 2))]
    decoded = decode_independently([(spb(t), b) for t, b in msgs])
    assert [d.get("error") for d in decoded] == [None] * 4
    ddeath, ndeath = decoded[2:]
    assert ddeath["seq"] == 2 and ddeath["metrics"] == []
    assert ndeath["seq"] is None
    assert [(m["name"], m["datatype"], m["value"]) for m in ndeath["metrics"]] == [("bdSeq", "Int64", 255)]


INT_SPECS = [
    (p.INT8, 8, True),
    (p.INT16, 16, True),
    (p.INT32, 32, True),
    (p.INT64, 64, True),
    (p.UINT8, 8, False),
    (p.UINT16, 16, False),
    (p.UINT32, 32, False),
    (p.UINT64, 64, False),
]


def int_values(bits: int, signed: bool) -> st.SearchStrategy[int]:
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return st.integers(low, high)


values_per_type = st.tuples(
    *(st.lists(int_values(bits, signed), min_size=1, max_size=5) for _, bits, signed in INT_SPECS)
)


# Each example runs one decoder process (about 0.3 s): few examples, and no shrinking (it ran minutes on a failure).
@settings(max_examples=10, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(values_per_type, st.lists(st.floats(width=32) | st.none(), min_size=1, max_size=5))
def test_random_integers_of_every_width_and_floats_decode_independently(
    ints: tuple[list[int], ...], floats: list[float | None]
) -> None:
    """Random integers at every width (negatives included) and float32s/nulls: pysparkplug reads what went in."""
    session = EdgeSession("g", "e")
    specs = [MetricSpec(f"m{dt}", dt) for dt, _, _ in INT_SPECS] + [MetricSpec("f", p.FLOAT)]
    first = {f"m{dt}": vals[0] for (dt, _, _), vals in zip(INT_SPECS, ints, strict=True)}
    msgs = [session.nbirth(0, [], NOW), session.dbirth("d", specs, {**first, "f": floats[0]}, NOW, NOW)]
    sent: list[dict[str, Value]] = []
    for i in range(max(len(floats), *(len(v) for v in ints))):
        values: dict[str, Value] = {
            f"m{dt}": vals[i] for (dt, _, _), vals in zip(INT_SPECS, ints, strict=True) if i < len(vals)
        }
        if i < len(floats):
            values["f"] = floats[i]
        data = session.ddata("d", values, NOW + 1 + i, NOW + 1 + i)
        assert data is not None
        msgs.append(data)
        sent.append(values)
    decoded = decode_independently([(spb(t), b) for t, b in msgs])
    assert [d.get("error") for d in decoded] == [None] * len(msgs)
    for msg, values in zip(decoded[2:], sent, strict=True):
        got = {m["name"]: m["value"] for m in msg["metrics"]}
        for name, value in values.items():
            if isinstance(value, float) and math.isnan(value):
                assert got[name] is not None and math.isnan(got[name])
            else:
                assert got[name] == value, (name, got[name], value)


#: Runs in the decoder's venv: encodes the commands given as JSON on stdin with pysparkplug, one hex payload a line.
ENCODE_COMMANDS = """
import json, sys
import pysparkplug as spb
for line in sys.stdin:
    spec = json.loads(line)
    metrics = tuple(
        spb.Metric(timestamp=1, name=m.get("name"), alias=m.get("alias"),
                   datatype=spb.DataType[m["datatype"].upper()], value=m["value"])
        for m in spec["metrics"]
    )
    cls = spb.NCmd if spec["kind"] == "NCMD" else spb.DCmd
    print(cls(timestamp=1, metrics=metrics).encode(include_dtypes=spec["dtypes"]).hex(), flush=True)
"""


def encode_independently(commands: list[dict[str, object]]) -> list[bytes]:
    """NCMD/DCMD payloads as pysparkplug encodes them (its own protobuf module and value encoding)."""
    proc = subprocess.run(
        [str(SPB_PYTHON), "-c", ENCODE_COMMANDS],
        input="".join(json.dumps(c) + "\n" for c in commands),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [bytes.fromhex(line) for line in proc.stdout.split()]


def test_commands_encoded_independently_are_read_as_the_host_meant_them() -> None:
    """A host's DCMD (by name and by alias, negative Int8/16/32/64, UInt64, Float, Double, Boolean, String; with and
    without datatypes) and its NCMD rebirth, encoded by pysparkplug, read by our inbound as what the host sent."""
    session = EdgeSession("g", "e")
    session.nbirth(0, [], NOW)
    types = {"i8": p.INT8, "i16": p.INT16, "i32": p.INT32, "i64": p.INT64, "u64": p.UINT64, "f": p.FLOAT}
    types |= {"d": p.DOUBLE, "b": p.BOOLEAN, "s": p.STRING}
    session.dbirth("pump1", [MetricSpec(n, dt, writable=True) for n, dt in types.items()], {}, NOW, NOW)
    sent: list[tuple[str, str, Value]] = [
        ("i8", "Int8", -128),
        ("i16", "Int16", -42),
        ("i32", "Int32", -(2**31)),
        ("i64", "Int64", -1),
        ("u64", "UInt64", 2**64 - 1),
        ("f", "Float", 0.5),
        ("d", "Double", -13.25),
        ("b", "Boolean", True),
        ("s", "String", "auto ✓"),
    ]
    by_name = [{"name": n, "datatype": dt, "value": v} for n, dt, v in sent]
    by_alias = [{"alias": session.alias("pump1", n), "datatype": dt, "value": v} for n, dt, v in sent]
    rebirth = [{"name": "Node Control/Rebirth", "datatype": "Boolean", "value": True}]
    commands: list[dict[str, object]] = [
        {"kind": "DCMD", "dtypes": True, "metrics": by_name},
        {"kind": "DCMD", "dtypes": False, "metrics": by_alias},  # our reader takes each datatype from the birth
        {"kind": "NCMD", "dtypes": True, "metrics": rebirth},
    ]
    named, aliased, ncmd = encode_independently(commands)
    want = [(n, v) for n, _, v in sent]
    assert device_writes(session, "pump1", named) == want
    assert device_writes(session, "pump1", aliased) == want
    assert rebirth_requested(session, ncmd)
