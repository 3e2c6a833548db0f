"""EdgeSession (bridge/sparkplug/session.py), the pure part of a Sparkplug edge node: seq, aliases, births, the
historical flag, and when a device must be born again."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.sparkplug import payload as p
from bridge.sparkplug.payload import MetricSpec, Payload
from bridge.sparkplug.session import BDSEQ, REBIRTH, EdgeSession, specs_for
from gateway.types import Value

NOW = 1_765_119_600_000
DEVICES = ["pump1", "pump2", "tank"]
POOL = ["flow", "temp", "on", "state", "x/y", "Flow"]  # "Flow": case differs, still another metric

# One operation on the session: (kind, device, metric names, value).
ops: st.SearchStrategy[tuple[str, str, list[str]]] = st.one_of(
    st.tuples(st.just("nbirth"), st.just(""), st.lists(st.sampled_from(POOL), unique=True, max_size=3)),
    st.tuples(st.just("dbirth"), st.sampled_from(DEVICES), st.lists(st.sampled_from(POOL), unique=True, max_size=4)),
    st.tuples(st.just("ddata"), st.sampled_from(DEVICES), st.lists(st.sampled_from(POOL), unique=True, max_size=4)),
    st.tuples(st.just("ddeath"), st.sampled_from(DEVICES), st.just([])),
    st.tuples(st.just("ndata"), st.just(""), st.lists(st.sampled_from(POOL), unique=True, max_size=3)),
)


def decode(message: tuple[str, bytes] | None) -> tuple[str, Payload] | None:
    """A session's (topic, bytes) as (topic, parsed payload)."""
    return None if message is None else (message[0], Payload.FromString(message[1]))


@settings(max_examples=60, deadline=None)
@given(st.lists(ops, min_size=1, max_size=80), st.integers(1, 4), st.integers(0, 300), st.integers(0, 255))
def test_seq_and_aliases_over_any_sequence_of_messages(
    script: list[tuple[str, str, list[str]]], repeat: int, warm_up: int, bd: int
) -> None:
    """seq is 0 on each NBIRTH and +1 mod 256 on every other message; an alias names one metric of one device (or
    the node) for the whole process, across rebirths; DATA carries born aliases only, with no name or datatype."""
    session = EdgeSession("g", "e")
    expected_seq: int | None = None
    owner: dict[int, tuple[str, str]] = {}  # alias -> (device, metric), over the whole run
    alias_of: dict[tuple[str, str], int] = {}
    born: dict[str, dict[int, str]] = {}  # this session's births: device -> alias -> metric
    now = NOW
    sent = 0
    # Up to 300 DDATA first and the script repeated: runs of hundreds of messages, so that seq wraps in the script.
    warm: list[tuple[str, str, list[str]]] = [("dbirth", "tank", ["flow"]), *[("ddata", "tank", ["flow"])] * warm_up]
    for kind, device, names in [("nbirth", "", []), *warm, *script * repeat]:
        now += 1
        values: dict[str, Value] = {n: float(i) for i, n in enumerate(names)}
        specs = [MetricSpec(n, p.DOUBLE) for n in names]
        out: tuple[str, bytes] | None
        if kind == "nbirth":
            out = session.nbirth(bd, list(zip(specs, values.values(), strict=True)), now)
        elif kind == "dbirth":
            out = session.dbirth(device, specs, values, now, now)
        elif kind == "ddata":
            out = session.ddata(device, values, now, now)
        elif kind == "ddeath":
            out = session.ddeath(device, now)
        else:
            out = session.ndata(values, now)
        got = decode(out)
        if got is None:
            # Nothing to say: an unborn device, or no born metric among the values (or a device not born to die).
            known = born.get(device if kind != "ndata" else "", {})
            if kind == "ddeath":
                assert device not in born
            elif kind in ("ddata", "ndata"):
                assert device not in born or not set(names) & set(known.values())
            continue
        sent += 1
        topic, payload = got
        assert topic.split("/")[:3] == ["g", kind.upper(), "e"]
        assert payload.HasField("seq") and payload.timestamp == now
        if kind == "nbirth":
            assert payload.seq == 0
            born = {"": {}}
        else:
            assert expected_seq is not None and payload.seq == expected_seq
        expected_seq = (payload.seq + 1) % 256
        if kind in ("nbirth", "dbirth"):
            key = "" if kind == "nbirth" else device
            born[key] = {}
            for m in payload.metrics:
                assert m.HasField("datatype") and m.timestamp == now
                if m.name == REBIRTH:
                    assert kind == "nbirth" and not m.HasField("alias")
                    continue
                assert m.HasField("alias")
                assert owner.setdefault(m.alias, (key, m.name)) == (key, m.name), "an alias names two metrics"
                assert alias_of.setdefault((key, m.name), m.alias) == m.alias, "a metric's alias changed"
                born[key][m.alias] = m.name
        elif kind == "ddeath":
            assert not payload.metrics
            del born[device]
        else:
            key = "" if kind == "ndata" else device
            aliases = [m.alias for m in payload.metrics]
            assert {born[key][a] for a in aliases} == set(names) & set(born[key].values())
            for m in payload.metrics:
                assert not m.HasField("name") and not m.HasField("datatype") and m.HasField("alias")
    assert sent >= 1


def test_seq_wraps_after_255_through_300_messages_and_a_rebirth_resets_it() -> None:
    """0..255 then 0 again over 300+ DDATA; an NBIRTH starts again at 0; NDEATH has no seq and takes none."""
    session = EdgeSession("g", "e")
    seqs = [Payload.FromString(session.nbirth(0, [], NOW)[1]).seq]
    seqs.append(Payload.FromString(session.dbirth("d", [MetricSpec("v", p.INT32)], {"v": 0}, NOW, NOW)[1]).seq)
    for i in range(1, 320):
        if i == 100:
            EdgeSession.ndeath(0, NOW)  # the will: made at connect time, takes no seq
        out = session.ddata("d", {"v": i}, NOW + i, NOW + i)
        assert out is not None
        seqs.append(Payload.FromString(out[1]).seq)
    assert seqs == [n % 256 for n in range(len(seqs))]
    assert Payload.FromString(session.nbirth(1, [], NOW + 999)[1]).seq == 0
    assert Payload.FromString(session.dbirth("d", [MetricSpec("v", p.INT32)], {}, NOW, NOW)[1]).seq == 1


def test_nbirth_leads_with_rebirth_false_without_alias_then_bdseq_int64() -> None:
    """Node Control/Rebirth: Boolean false, no alias; bdSeq: Int64 with the connection's number; then the node's."""
    session = EdgeSession("g", "e")
    topic, raw = session.nbirth(42, [(MetricSpec("Node Info/Uptime", p.INT64, unit="s"), 12)], NOW)
    payload = Payload.FromString(raw)
    assert topic == "g/NBIRTH/e" and payload.seq == 0
    rebirth, bdseq, uptime = payload.metrics
    assert (rebirth.name, rebirth.datatype, rebirth.boolean_value) == (REBIRTH, p.BOOLEAN, False)
    assert not rebirth.HasField("alias") and not rebirth.is_null
    assert (bdseq.name, bdseq.datatype, p.get_value(bdseq)) == (BDSEQ, p.INT64, 42)
    assert uptime.name == "Node Info/Uptime" and p.get_value(uptime) == 12


def test_ndeath_has_no_seq_and_exactly_one_metric_bdseq_int64() -> None:
    """NDEATH (the will and the goodbye): a timestamp, no seq, and bdSeq as Int64 only."""
    payload = Payload.FromString(EdgeSession.ndeath(255, NOW))
    assert not payload.HasField("seq") and payload.timestamp == NOW
    assert len(payload.metrics) == 1
    (m,) = payload.metrics
    assert (m.name, m.datatype, p.get_value(m), m.timestamp) == (BDSEQ, p.INT64, 255, NOW)


def test_aliases_are_unique_across_the_node_and_devices_and_stable_across_rebirths() -> None:
    """The same metric name on two devices and the node gets three aliases; a rebirth gives each the same again."""
    session = EdgeSession("g", "e")
    spec = MetricSpec("flow", p.DOUBLE)

    def aliases() -> list[int]:
        out = [m.alias for m in Payload.FromString(session.nbirth(0, [(spec, 1.0)], NOW)[1]).metrics[1:]]
        for device in ("a", "b"):
            out += [m.alias for m in Payload.FromString(session.dbirth(device, [spec], {}, NOW, NOW)[1]).metrics]
        return out

    first = aliases()
    assert len(first) == len(set(first)) == 4  # bdSeq, node flow, a/flow, b/flow
    assert aliases() == first
    assert session.name_of("a", first[2]) == "flow" and session.name_of("b", first[2]) is None
    assert session.name_of("", first[1]) == "flow"


def test_needs_birth_for_an_unborn_device_a_new_metric_or_a_value_its_datatype_cannot_hold() -> None:
    """A DBIRTH is needed before data of an unborn device, of a metric its birth lacks, or that does not fit."""
    session = EdgeSession("g", "e")
    session.nbirth(0, [], NOW)
    assert session.needs_birth("d", {})
    session.dbirth("d", [MetricSpec("n", p.INT16), MetricSpec("s", p.STRING)], {}, NOW, NOW)
    assert not session.needs_birth("d", {"n": -32768, "s": "x"})
    assert not session.needs_birth("d", {"n": None, "s": None})  # a null fits any datatype
    assert session.needs_birth("d", {"n": 32768})
    assert session.needs_birth("d", {"n": 1.5})
    assert session.needs_birth("d", {"s": 1})
    assert session.needs_birth("d", {"new": 1})
    session.ddeath("d", NOW)
    assert session.needs_birth("d", {"n": 1})
    session.dbirth("d", [MetricSpec("n", p.INT16)], {}, NOW, NOW)
    session.nbirth(1, [], NOW)  # a new NBIRTH: every device must be born again
    assert session.needs_birth("d", {"n": 1})


def test_ddata_is_historical_iff_sampled_before_the_birth_and_none_when_the_birth_carried_it() -> None:
    """ts < birth ts: is_historical; == birth ts: nothing (the birth held that sample); > : live."""
    session = EdgeSession("g", "e")
    session.nbirth(0, [], NOW)
    session.dbirth("d", [MetricSpec("v", p.DOUBLE)], {"v": 1.0}, NOW - 10, NOW)
    assert session.ddata("d", {"v": 1.0}, NOW - 10, NOW) is None
    flags = {}
    for ts in (NOW - 11, NOW - 9):
        out = session.ddata("d", {"v": 2.0}, ts, NOW)
        assert out is not None
        payload = Payload.FromString(out[1])
        assert payload.timestamp == NOW and payload.metrics[0].timestamp == ts
        flags[ts] = payload.metrics[0].is_historical
    assert flags == {NOW - 11: True, NOW - 9: False}
    assert session.ddata("d", {"unborn": 1.0}, NOW + 1, NOW) is None
    assert session.ddata("other", {"v": 1.0}, NOW + 1, NOW) is None


def test_a_dbirth_carries_every_spec_with_its_value_or_a_null_at_the_sample_time() -> None:
    """Metrics without a value yet are nulls of their datatype; metric timestamps are the values' sample time."""
    session = EdgeSession("g", "e")
    session.nbirth(0, [], NOW)
    topic, raw = session.dbirth("d", [MetricSpec("a", p.INT8), MetricSpec("b", p.DOUBLE)], {"a": -1}, NOW - 5, NOW)
    payload = Payload.FromString(raw)
    assert topic == "g/DBIRTH/e/d" and payload.timestamp == NOW
    a, b = payload.metrics
    assert p.get_value(a) == -1 and b.is_null and b.datatype == p.DOUBLE
    assert a.timestamp == b.timestamp == NOW - 5


def test_specs_for_merges_declared_and_seen() -> None:
    """Declared specs come first as declared; a seen value no spec declares gets its own datatype; one the declared
    datatype cannot hold replaces it (keeping the unit)."""
    declared = [MetricSpec("t", p.INT16, unit="°C", min=-40, max=125, writable=True), MetricSpec("s", p.STRING)]
    out = specs_for(declared, {"t": 20, "s": "ok", "new": 1, "flag": True, "txt": "x"})
    assert out[:2] == declared
    assert [(s.name, s.datatype) for s in out[2:]] == [("new", p.DOUBLE), ("flag", p.BOOLEAN), ("txt", p.STRING)]
    grown = specs_for(declared, {"t": 40000})
    assert grown[0] == MetricSpec("t", p.DOUBLE, unit="°C", min=-40, max=125, writable=True)
    assert specs_for(None, {}) == [] and specs_for(None, {"v": None}) == [MetricSpec("v", p.STRING)]


def test_ndata_before_an_nbirth_and_a_ddeath_of_an_unborn_device_are_nothing() -> None:
    """No NDATA without a born node; no DDEATH for a device this session never born (and no seq is used)."""
    session = EdgeSession("g", "e")
    assert session.ndata({"x": 1}, NOW) is None
    session.nbirth(0, [(MetricSpec("x", p.DOUBLE), 0.0)], NOW)
    assert session.ddeath("nobody", NOW) is None
    out = session.ndata({"x": 2.0, "unborn": 3.0}, NOW + 1)
    assert out is not None and out[0] == "g/NDATA/e"
    payload = Payload.FromString(out[1])
    assert payload.seq == 1 and len(payload.metrics) == 1 and p.get_value(payload.metrics[0], p.DOUBLE) == 2.0


any_value: st.SearchStrategy[Value] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(2**1100), 2**1100),
    st.floats(),
    st.text(max_size=5),
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(p.NAMES)), any_value, any_value)
def test_a_birth_made_for_a_value_holds_it_so_births_never_loop(declared: int, value: Value, then: Value) -> None:
    """After the birth specs_for makes for a value, that value needs no other birth: a device whose values do not
    fit its declaration costs one DBIRTH, not one per message."""
    session = EdgeSession("g", "e")
    session.nbirth(0, [], NOW)
    specs = specs_for([MetricSpec("v", declared)], {"v": value})
    (spec,) = specs
    assert p.fits(spec.datatype, value)
    session.dbirth("d", specs, {"v": value}, NOW, NOW)
    assert not session.needs_birth("d", {"v": value})
    if session.needs_birth("d", {"v": then}):
        session.dbirth("d", specs_for(specs, {"v": then}), {"v": then}, NOW, NOW)
        assert not session.needs_birth("d", {"v": then})
