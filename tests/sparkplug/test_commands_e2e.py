"""DCMD end to end: a host's write reaches the Modbus slave through `fieldgate run`, is audited, and the host sees
the new value in a DDATA; a refused write is audited and the host sees the device's value again.

Real parts: Mosquitto, the gateway as a process with its simulated Modbus line on a pty, a host that is either a
plain paho client publishing DCMDs built with our protobuf module or the independent decoder's host mode
(pysparkplug). Everything the node published is decoded by both decoders.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from sparkplug.e2e_parts import JSON_PREFIX, Rig, decode, independent_host, rig, topic
from sparkplug.sparkplug_decode import decode_independently

from bridge.sparkplug.sparkplug_b_pb2 import Payload
from gateway.types import now_ms

from helpers import until

DCMD = topic("DCMD", "boiler")


def dcmd(*metrics: Payload.Metric) -> bytes:
    """A DCMD payload as a host builds it (metrics by alias or by name, no datatype)."""
    return Payload(timestamp=now_ms(), metrics=list(metrics)).SerializeToString()


def close(a: float, b: float) -> bool:
    """Equal as a 0.1-scaled register reads back."""
    return math.isclose(a, b, abs_tol=1e-6)


async def born(r: Rig) -> dict[str, int]:
    """The boiler's aliases from its DBIRTH (waited for)."""
    await r.sub.wait_for(lambda ms: r.sub.sparkplug("DBIRTH", "boiler"), 30)
    birth = decode(r.sub.sparkplug("DBIRTH", "boiler")[-1].payload)
    return {m.name: m.alias for m in birth.metrics}


async def ddata_value(r: Rig, metric: str, want: float, after: int) -> Any:
    """The first DDATA metric of the boiler's `metric` equal to `want` among its values after index `after`."""

    def found() -> Any:
        return next((x for x, p in r.sub.values("boiler", metric, since=after) if close(x.double_value, want)), None)

    return await until(found, 20, f"a DDATA with {metric} = {want}")


async def slave_reads(r: Rig, point: str, want: float, after: float) -> None:
    """A poll after monotonic time `after` read `want` from the slave (the JSON sink publishes what it read)."""
    await r.sub.wait_for(
        lambda ms: any(
            m.topic == f"{JSON_PREFIX}/boiler/{point}" and m.at > after and close(float(m.payload), want) for m in ms
        ),
        20,
    )


def audited(r: Rig, point: str, value: Any) -> list[dict[str, Any]]:
    """The audit records of writes to boiler.`point` asking for `value`."""
    return [
        x
        for x in r.audit()
        if x["device"] == "boiler" and x["point"] == point and x["value"] is not None and close(x["value"], value)
    ]


def assert_both_decoders_agree(r: Rig) -> None:
    """Every message of the node decodes with the independent decoder too, to the same metric values."""
    msgs = r.sub.sparkplug(cmds=False)
    theirs = decode_independently([(m.topic, m.payload) for m in msgs])
    for m, t in zip(msgs, theirs, strict=True):
        assert "error" not in t, (m.topic, t)
        ours = decode(m.payload)
        assert t["seq"] == (ours.seq if ours.HasField("seq") else None), (m.topic, t)
        for a, b in zip(ours.metrics, t["metrics"], strict=True):
            which = a.WhichOneof("value")
            if which in ("double_value", "float_value"):
                assert math.isclose(getattr(a, which), b["value"], rel_tol=1e-6), (m.topic, a, b)


async def test_a_dcmd_by_alias_and_by_name_reaches_the_slave_is_audited_and_comes_back_in_a_ddata(
    tmp_path: Path,
) -> None:
    """A DCMD to the writable setpoint (by alias, by name, and from an independent host) writes the slave, is
    audited as a request and an ok outcome (origin the sink, topic the DCMD), and a DDATA carries the new value."""
    async with rig(tmp_path) as r:
        aliases = await born(r)
        writes = [
            (55.5, Payload.Metric(alias=aliases["setpoint"], double_value=55.5)),
            (33.3, Payload.Metric(name="setpoint", double_value=33.3)),
        ]
        for want, metric in writes:
            index, since = len(r.sub.values("boiler", "setpoint")), time.monotonic()
            r.sub.publish_raw(DCMD, dcmd(metric))
            x = await ddata_value(r, "setpoint", want, index)
            assert x.HasField("timestamp") and not x.is_historical
            await slave_reads(r, "setpoint", want, since)
            records = await until(lambda w=want: len(audited(r, "setpoint", w)) >= 2 and audited(r, "setpoint", w))
            request, outcome = records
            for rec in records:
                assert rec["origin"] == "scada" and rec["topic"] == DCMD and rec["action"] == "set", rec
            assert request["stage"] == "request" and request["ok"] is None, request
            assert outcome.get("stage") is None and outcome["ok"] is True and outcome["error"] is None, outcome
            assert close(outcome["result"], want), outcome

        # A host that owes nothing to our codec: pysparkplug's DCMD, with the datatype its last DBIRTH gave.
        async with independent_host(r.mosquitto.port) as host:
            # It joined after the births: it asks for them (NCMD rebirth) to learn the datatypes.
            await host.command({"cmd": "rebirth", "edge": "line-a"})
            await until(lambda: host.decoded("DBIRTH", "boiler"), 20, "the independent host to see a DBIRTH")
            index, since = len(r.sub.values("boiler", "setpoint")), time.monotonic()
            write = {"name": "setpoint", "value": 22.5}
            await host.command({"cmd": "dcmd", "edge": "line-a", "device": "boiler", "metrics": [write]})
            await ddata_value(r, "setpoint", 22.5, index)
            await slave_reads(r, "setpoint", 22.5, since)
            await until(lambda: len(audited(r, "setpoint", 22.5)) == 2, 10, "the independent host's write audited")

            def seen_by_host() -> bool:
                return any(
                    m["name"] == "setpoint" and close(m["value"], 22.5)
                    for d in host.decoded("DDATA", "boiler")
                    for m in d["metrics"]
                )

            await until(seen_by_host, 10, "the independent host to decode the DDATA with 22.5")
            assert not host.errors(), host.errors()
        assert_both_decoders_agree(r)


async def test_a_refused_dcmd_is_audited_leaves_the_slave_alone_and_the_host_sees_the_value_again(
    tmp_path: Path,
) -> None:
    """A DCMD to a read-only metric, out of min/max, to an unknown alias or an unknown device is refused, logged and
    audited (ok false, the error); nothing reaches the slave; for a known point a DDATA brings the current value."""
    async with rig(tmp_path) as r:
        aliases = await born(r)
        await r.sub.wait_for(lambda ms: any(m.topic == f"{JSON_PREFIX}/boiler/setpoint" for m in ms), 20)
        cases: list[tuple[str, str, Payload.Metric, str]] = [
            (
                "temperature",
                "temperature",
                Payload.Metric(alias=aliases["temperature"], double_value=70.0),
                "read-only",
            ),
            ("setpoint", "setpoint", Payload.Metric(alias=aliases["setpoint"], double_value=95.0), "80"),
            ("setpoint", "setpoint", Payload.Metric(name="setpoint", double_value=-3.0), "5"),
        ]
        current = {"temperature": 60.0, "setpoint": 45.0}
        for point, name, metric, says in cases:
            index = len(r.sub.values("boiler", name))
            sent = time.time()
            r.sub.publish_raw(DCMD, dcmd(metric))
            value = metric.double_value
            [outcome] = await until(
                lambda p=point, v=value: [x for x in audited(r, p, v) if x["ok"] is not None] or None, 10, "the outcome"
            )
            assert outcome["ok"] is False and says in outcome["error"], outcome
            assert outcome["origin"] == "scada" and outcome["topic"] == DCMD, outcome
            # The revert: the host, which may show what it asked for, is told the device's value again.
            x = await ddata_value(r, name, current[name], index)
            assert x.timestamp >= int(sent * 1000) - 1000, x
            await r.gw.logged(f"set boiler.{point} = ")

        # A metric the birth did not give, and a device the node does not have: refused and audited, nothing written.
        r.sub.publish_raw(DCMD, dcmd(Payload.Metric(alias=9999, double_value=50.0)))
        r.sub.publish_raw(topic("DCMD", "nosuch"), dcmd(Payload.Metric(name="setpoint", double_value=50.0)))

        def outcomes() -> list[dict[str, Any]]:
            return [x for x in r.audit() if x["value"] == 50.0 and x["ok"] is not None]

        await until(lambda: len(outcomes()) == 2, 10, "both refusals audited")
        by_device = {x["device"]: x for x in outcomes()}
        assert by_device["boiler"]["point"] == "alias 9999" and by_device["boiler"]["ok"] is False, by_device
        assert "no point 'alias 9999'" in by_device["boiler"]["error"], by_device
        assert by_device["nosuch"]["ok"] is False and "unknown device" in by_device["nosuch"]["error"], by_device
        assert by_device["nosuch"]["topic"] == topic("DCMD", "nosuch"), by_device

        # The slave still holds 45.0: the line polled on for two more counts of the meter (the boiler with it), and
        # neither the polls (the JSON sink publishes a changed value) nor any DDATA ever carried another value.
        since = time.monotonic()
        await r.sub.wait_for(
            lambda ms: len([m for m in ms if m.topic == f"{JSON_PREFIX}/meter/count" and m.at > since]) >= 2, 20
        )
        seen = {round(x.double_value, 3) for x, _ in r.sub.values("boiler", "setpoint")}
        assert seen == {45.0}, seen
        polled = {m.payload for m in r.sub.on(f"{JSON_PREFIX}/boiler/setpoint")}
        assert polled == {b"45.0"}, polled
        assert_both_decoders_agree(r)


async def test_odd_dcmd_values_are_refused_and_audited_and_write_nothing(tmp_path: Path) -> None:
    """Values a Double metric cannot take (NaN, infinities, null, a boolean, a string, a 64-bit integer far out of
    range) written to the setpoint are each refused and audited with the error; the slave keeps its value."""
    odd = [
        Payload.Metric(name="setpoint", double_value=float("nan")),
        Payload.Metric(name="setpoint", double_value=float("inf")),
        Payload.Metric(name="setpoint", float_value=float("-inf")),
        Payload.Metric(name="setpoint", is_null=True),
        Payload.Metric(name="setpoint", boolean_value=True),
        Payload.Metric(name="setpoint", string_value="50"),
        Payload.Metric(name="setpoint", long_value=2**64 - 1),
        Payload.Metric(name="setpoint", datatype=4, long_value=2**63),  # Int64 -2**63
    ]
    async with rig(tmp_path) as r:
        await born(r)
        await r.sub.wait_for(lambda ms: any(m.topic == f"{JSON_PREFIX}/boiler/setpoint" for m in ms), 20)
        for metric in odd:
            r.sub.publish_raw(DCMD, dcmd(metric), qos=1)

        def outcomes() -> list[dict[str, Any]]:
            return [x for x in r.audit() if x["point"] == "setpoint" and x["ok"] is not None]

        await until(lambda: len(outcomes()) == len(odd), 20, "every odd write's outcome audited")
        assert [x["ok"] for x in outcomes()] == [False] * len(odd), outcomes()
        assert all(x["error"] for x in outcomes()), outcomes()
        since = time.monotonic()
        await r.sub.wait_for(
            lambda ms: len([m for m in ms if m.topic == f"{JSON_PREFIX}/meter/count" and m.at > since]) >= 2, 20
        )
        polled = {m.payload for m in r.sub.on(f"{JSON_PREFIX}/boiler/setpoint")}
        assert polled == {b"45.0"}, polled
