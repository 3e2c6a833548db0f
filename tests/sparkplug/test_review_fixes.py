"""One test per fix of a code review of the Sparkplug edge node, the host input and the gateway's request path.

Real parts: a Mosquitto per test, a recording paho subscriber (tests/sparkplug/rig.py `SpbRecorder`), and either a
`SparkplugNode` run in-process over a real `MqttSink` and `Outbox` on a real SQLite spool (the decisions under test
depend on what is stored while the host is away, and in-process the test chooses it and the clock exactly), or
`fieldgate run` itself (tests/sparkplug/e2e_parts.py) for the DCMD audit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sparkplug.e2e_parts import rig, topic
from sparkplug.rig import Recorded, SpbRecorder, ncmd_rebirth

import bridge.sparkplug.node as node_module
from bridge.outbox import Outbox
from bridge.sink import MqttSink
from bridge.sparkplug.bdseq import BdSeqFile
from bridge.sparkplug.node import NAMESPACE, SparkplugNode
from bridge.sparkplug.payload import DOUBLE, UINT64, MetricSpec
from bridge.sparkplug.sparkplug_b_pb2 import Payload
from bridge.sparkplug.view import DeviceNow
from bridge.spool import SQLiteSpool
from gateway.types import Message, Value, now_ms
from hil.ports import free_port

from helpers import until
from mosquitto import Mosquitto

GROUP, EDGE, HOST = "plant1", "line-a", "scada-main"
UPTIME = MetricSpec("Node Info/Uptime", DOUBLE, "s")
T0 = 1_800_000_000_000  # the test clock's start (unix ms): every timestamp below is chosen, not read


def state(online: bool, ts: int) -> bytes:
    """A Sparkplug 3.0 STATE payload."""
    return json.dumps({"online": online, "timestamp": ts}).encode()


def telemetry(device: str, ts: int, **values: Value) -> Message:
    """A device's telemetry as the gateway hands it to its sinks."""
    return Message(f"{device}/telemetry", json.dumps({"ts": ts, "values": values}).encode(), ts=ts)


@dataclass
class Edge:
    """A SparkplugNode over a real MqttSink and Outbox (SQLite spool), what it reads of the gateway, a test clock."""

    node: SparkplugNode
    outbox: Outbox
    recorder: SpbRecorder
    devices: list[DeviceNow]
    uptime: list[float]
    now: list[int]
    writes: list[tuple[str, bytes]] = field(default_factory=list)

    def put(self, message: Message) -> None:
        """Hand a message over as the gateway does."""
        self.outbox.put(message)

    def advance(self, ms: int) -> int:
        """Move the test clock on; the new time."""
        self.now[0] += ms
        return self.now[0]

    def host(self, online: bool, ts: int, *, retain: bool = False) -> None:
        """The primary host publishes its STATE."""
        self.recorder.publish(f"{NAMESPACE}/STATE/{HOST}", state(online, ts), qos=1, retain=retain)

    def of(self, kind: str, device: str | None = None) -> list[Recorded]:
        """Our node's messages of one kind (and device) as the broker delivered them."""
        return [m for m in self.recorder.of(kind, device) if m.parts[3] == EDGE]

    def set_device(self, name: str, online: bool, values: dict[str, Value], ts: int) -> None:
        """The gateway's view of a device changes."""
        old = next(d for d in self.devices if d.name == name)
        self.devices[self.devices.index(old)] = DeviceNow(name, online, old.specs, values, ts)


@contextlib.asynccontextmanager
async def edge(
    tmp_path: Path,
    devices: list[DeviceNow],
    *,
    primary_host: str | None = HOST,
    spool: Path | None = None,
    buffer: str = "sqlite",
) -> AsyncIterator[Edge]:
    """A Mosquitto, a recorder on it, and the edge node connected to it (born unless a primary host is awaited);
    its outbox on a SQLite spool as the gateway's (`buffer="memory"`: on the in-memory buffer)."""
    mosq = Mosquitto(tmp_path / "mosquitto", free_port())
    mosq.start()
    recorder = SpbRecorder(mosq.port)
    now, uptime = [T0], [1.0]
    listed = list(devices)
    e: Edge | None = None
    try:
        recorder.start()
        node = SparkplugNode(
            "scada",
            group=GROUP,
            edge=EDGE,
            primary_host=primary_host,
            bdseq=BdSeqFile(tmp_path / "state" / "scada.bdseq"),
            devices=lambda: list(listed),
            node_metrics=lambda: [(UPTIME, uptime[0])],
            on_set=lambda t, p: e.writes.append((t, p)) if e is not None else None,
            clock=lambda: now[0],
        )
        mqtt = node.connect_to(mosq.url, client_id=f"review-{time.monotonic_ns()}")
        store = SQLiteSpool(spool or tmp_path / "scada.spool") if buffer == "sqlite" else None
        outbox = Outbox(
            node,
            store,
            order="strict",
            prepare=node.prepare,
            commit_window=0.01,
        )
        e = Edge(node, outbox, recorder, listed, uptime, now)
        await outbox.start()
        await node.start()
        await until(lambda: mqtt.connected, 20, "the node's MQTT connection")
        try:
            yield e
        finally:
            await node.stop()
            await outbox.stop()
    finally:
        recorder.stop()
        mosq.stop()


def values_of(m: Recorded) -> list[tuple[Payload.Metric, Any]]:
    """Each metric of a payload with its value (None when null)."""
    out = []
    for metric in m.decoded().metrics:
        which = metric.WhichOneof("value")
        out.append((metric, None if metric.is_null or which is None else getattr(metric, which)))
    return out


async def test_node_metrics_stored_before_the_nbirth_are_not_published_after_it(tmp_path: Path) -> None:
    """Node metrics spooled while the host was away are older than the NBIRTH, which carried newer ones: they are
    not replayed as NDATA (the host saw the uptime go backwards); metrics taken after the NBIRTH go out."""
    async with edge(tmp_path, []) as e:
        e.uptime[0] = 5.0
        e.put(Message("metrics", b"{}"))  # the gateway's P/metrics: prepare() reads the node metrics now
        e.advance(1000)
        e.uptime[0] = 6.0
        e.put(Message("metrics", b"{}"))
        await until(lambda: e.outbox.backlog == 2, 10, "both metrics spooled")
        e.advance(1000)
        e.uptime[0] = 7.0
        e.host(True, now_ms())
        [nbirth] = await until(lambda: e.of("NBIRTH"), 20, "the NBIRTH")
        e.advance(1000)
        e.uptime[0] = 8.0
        e.put(Message("metrics", b"{}"))
        await until(lambda: e.of("NDATA"), 20, "the NDATA of the metrics taken after the NBIRTH")
        assert nbirth.metrics()["Node Info/Uptime"].double_value == 7.0
        sent = [v for m in e.of("NDATA") for _, v in values_of(m)]
        assert sent == [8.0], f"NDATA after an NBIRTH with uptime 7: {sent}"


def aux(online: bool, values: dict[str, Value], ts: int) -> DeviceNow:
    """A Modbus-like device with one declared UInt64 metric."""
    return DeviceNow("aux", online, (MetricSpec("count", UINT64),), values, ts)


#: A stored status keeps its time in either buffer (from the SQLite spool: the row's sampled_ms, bridge/spool_schema.py
#: `to_entry`; it was lost there until the tests below found it).
BUFFERS = ["memory", "sqlite"]


@contextlib.asynccontextmanager
async def stored_then_offline(tmp_path: Path, buffer: str) -> AsyncIterator[tuple[Edge, int]]:
    """While the host is away aux sends two samples and goes offline (all stored); then the host comes back. Yields
    the edge once an NDATA put after the NBIRTH (strict order: after everything stored) arrived, and the offline
    status's time."""
    async with edge(tmp_path, [aux(True, {"count": 1}, T0)], buffer=buffer) as e:
        e.put(telemetry("aux", e.advance(100), count=2))
        e.put(telemetry("aux", e.advance(100), count=3))
        offline_at = e.advance(100)
        e.put(Message("aux/status", b"offline"))  # prepare() stamps it with the clock: when it went offline
        e.set_device("aux", False, {"count": 3}, T0 + 200)
        await until(lambda: e.outbox.backlog == 3, 10, "the stored data and status")
        e.advance(5000)
        e.host(True, now_ms())
        await until(lambda: e.of("NBIRTH"), 20, "the NBIRTH")
        e.advance(1000)
        e.uptime[0] = 2.0
        e.put(Message("metrics", b"{}"))  # a marker: no live telemetry, which would bury aux another way
        await until(lambda: e.of("NDATA"), 20, "the marker NDATA")
        yield e, offline_at


# Before the SQLite spool kept a message's ts, only [memory] guarded the stale-status decision: [sqlite]'s status came
# back dated now, so it got its DDEATH whatever that decision said.
@pytest.mark.parametrize("buffer", ["memory", "sqlite"])
async def test_a_device_born_for_its_stored_data_dies_by_its_stored_offline_status(tmp_path: Path, buffer: str) -> None:
    """A device offline when the host came back is born only for its stored data (DBIRTH, historical DDATA); its
    stored `offline` status then gives the DDEATH, with no live data needed (it stayed online at the host)."""
    async with stored_then_offline(tmp_path, buffer) as (e, _):
        order = [m.kind for m in e.recorder.messages() if m.kind != "STATE" and m.parts[3] == EDGE]
        assert order == ["NBIRTH", "DBIRTH", "DDATA", "DDEATH", "NDATA"], order
        [ddata] = e.of("DDATA", "aux")
        assert [(m.is_historical, v) for m, v in values_of(ddata)] == [(True, 2)]
        assert e.node.stats.device_deaths == 1


@pytest.mark.parametrize("buffer", BUFFERS)
async def test_a_replayed_ddeath_carries_the_time_the_device_went_offline(tmp_path: Path, buffer: str) -> None:
    """A DDEATH's timestamp is the stored status's time (before the NBIRTH), not the time it was published."""
    async with stored_then_offline(tmp_path, buffer) as (e, offline_at):
        [nbirth], [ddeath] = e.of("NBIRTH"), e.of("DDEATH", "aux")
        assert ddeath.decoded().timestamp == offline_at < nbirth.decoded().timestamp


@pytest.mark.parametrize("buffer", BUFFERS)
async def test_a_stored_offline_of_a_device_online_again_kills_nothing(tmp_path: Path, buffer: str) -> None:
    """A device that went offline and came back while the host was away is born online; its stored `offline` and
    `online` statuses are older than the births, which say how it is now: no DDEATH, no second DBIRTH."""
    async with edge(tmp_path, [aux(True, {"count": 1}, T0)], buffer=buffer) as e:
        e.put(Message("aux/status", b"offline"))
        e.advance(100)
        e.put(Message("aux/status", b"online"))
        await until(lambda: e.outbox.backlog == 2, 10, "the stored statuses")
        e.advance(1000)
        e.host(True, now_ms())
        await until(lambda: e.of("DBIRTH", "aux"), 20, "the births")
        e.advance(1000)
        e.uptime[0] = 2.0
        e.put(Message("metrics", b"{}"))
        await until(lambda: e.of("NDATA"), 20, "the marker NDATA")
        order = [m.kind for m in e.recorder.messages() if m.kind != "STATE" and m.parts[3] == EDGE]
        assert order == ["NBIRTH", "DBIRTH", "NDATA"], order


async def test_a_stored_value_of_another_type_goes_out_null_and_does_not_re_declare_the_metric(
    tmp_path: Path,
) -> None:
    """A value the birth's datatype cannot hold, sampled before the birth (an MCP "ERR" stored while the host was
    away, a number now), goes out historical and null: no DBIRTH re-declares the metric as String."""
    pump = DeviceNow("pump-1", True, (MetricSpec("flow", DOUBLE),), {"flow": 1.0}, T0)
    async with edge(tmp_path, [pump]) as e:
        err_at = e.advance(100)
        e.put(telemetry("pump-1", err_at, flow="ERR"))
        await until(lambda: e.outbox.backlog == 1, 10, "the stored ERR")
        e.devices[0] = DeviceNow("pump-1", True, pump.specs, {"flow": 2.5}, e.advance(100))
        e.advance(1000)
        e.host(True, now_ms())
        await until(lambda: e.of("DDATA", "pump-1"), 20, "the stored sample's DDATA")
        # Longer than a device's rebirth interval: a DBIRTH deferred to its end would be out by now.
        await asyncio.sleep(node_module.REBIRTH_INTERVAL + 0.5)
        e.uptime[0] = 2.0
        e.advance(1000)
        e.put(Message("metrics", b"{}"))
        await until(lambda: e.of("NDATA"), 20, "the marker NDATA")
        births = e.of("DBIRTH", "pump-1")
        assert len(births) == 1, [b.metrics() for b in births]
        assert births[0].metrics()["flow"].datatype == DOUBLE
        [ddata] = e.of("DDATA", "pump-1")
        [(metric, value)] = values_of(ddata)
        assert metric.is_historical and metric.is_null and value is None, metric
        assert metric.timestamp == err_at


async def test_spool_entries_not_sparkplugs_are_dropped_with_a_warning_and_the_sink_runs_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A sink whose format was json before finds the JSON sink's messages in its spool (P/metrics, retained points,
    a damaged telemetry): each is dropped with a warning, no traceback, and the node births and publishes data."""
    spool = tmp_path / "scada.spool"
    json_sink = MqttSink("scada", "mqtt://127.0.0.1:1", "fieldgate/t1", client_id="json-before")  # never started
    before = Outbox(json_sink, SQLiteSpool(spool), order="strict", commit_window=0.01)
    await before.start()
    for m in [
        Message("metrics", json.dumps({"uptime_s": 12.5, "sinks": {}, "lines": {}}).encode(), retain=True),
        Message("aux/count", b"7", retain=True),
        Message("aux/telemetry", b"{not json"),
        Message("aux/telemetry", json.dumps({"ts": T0, "values": [1, 2]}).encode()),
        Message("metrics", json.dumps({"ts": T0, "uptime_s": 3}).encode()),
    ]:
        before.put(m)
    await until(lambda: before.backlog == 5, 10, "the JSON sink's messages spooled")
    await before.stop()
    caplog.set_level(logging.INFO)
    async with edge(tmp_path, [aux(True, {"count": 1}, T0)], primary_host=None, spool=spool) as e:
        await until(lambda: e.of("DBIRTH", "aux"), 20, "the births")
        e.put(telemetry("aux", e.advance(1000), count=9))
        ddata = await until(lambda: e.of("DDATA", "aux"), 20, "live data after the stored entries")
        assert [v for _, v in values_of(ddata[-1])] == [9]
        await until(lambda: e.outbox.backlog == 0, 10, "the spool drained")
    dropped = [r for r in caplog.records if "not Sparkplug's to send" in r.getMessage()]
    assert len(dropped) == 4 and all(r.levelno == logging.WARNING for r in dropped), [r.getMessage() for r in dropped]
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]
    assert len(e.of("NBIRTH")) == 1


async def test_a_deferred_rebirth_stops_data_at_once_and_the_data_follows_the_births(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An NCMD rebirth within the rebirth interval of the last births is deferred to its end; from the NCMD on no
    DDATA goes out before the new NBIRTH, and what the devices sent meanwhile follows the births (historical)."""
    monkeypatch.setattr(node_module, "REBIRTH_INTERVAL", 3.0)  # the NCMD surely comes within it
    async with edge(tmp_path, [aux(True, {"count": 1}, T0)], primary_host=None) as e:
        await until(lambda: e.of("DBIRTH", "aux"), 20, "the births")
        e.recorder.publish(f"{NAMESPACE}/{GROUP}/NCMD/{EDGE}", ncmd_rebirth(), qos=1)
        await until(lambda: e.node.stats.rebirth_requests == 1, 10, "the NCMD read")
        sent = []
        for count in range(100, 105):
            ts = e.advance(100)
            e.put(telemetry("aux", ts, count=count))
            e.set_device("aux", True, {"count": count}, ts)
            sent.append(count)
            await asyncio.sleep(0.1)
        births = await until(lambda: len(e.of("NBIRTH")) == 2 and e.of("NBIRTH"), 20, "the deferred NBIRTH")
        await until(lambda: len(e.of("DDATA", "aux")) >= 4, 20, "the data sent meanwhile")
        between = [m for m in e.recorder.messages() if births[0].index < m.index < births[1].index]
        assert [m.kind for m in between if m.kind not in ("NCMD", "STATE")] == ["DBIRTH"], [m.topic for m in between]
        after = [(m.is_historical, v) for d in e.of("DDATA", "aux") for m, v in values_of(d)]
        assert after == [(True, c) for c in sent[:-1]], after  # the last one is the DBIRTH's value
        assert e.of("DBIRTH", "aux")[-1].metrics()["count"].long_value == sent[-1]


async def test_an_online_state_read_while_disconnecting_births_nothing_on_that_connection(tmp_path: Path) -> None:
    """A host's `offline` STATE ends the session (NDEATH, disconnect); an `online` one read right after it, before
    the disconnect completed, births nothing on the dying connection: the next NBIRTH is the new connection's, with
    a new bdSeq."""
    async with edge(tmp_path, [aux(True, {"count": 1}, T0)]) as e:
        online_at = now_ms()
        e.host(True, online_at, retain=True)  # retained: the new connection reads it again and births there
        [first] = await until(lambda: e.of("NBIRTH"), 20, "the first NBIRTH")
        births = e.node.stats.births
        # Both as the MQTT connection hands them over, back to back, before the disconnect is through.
        e.node.on_message(f"STATE/{HOST}", state(False, online_at + 1))
        e.node.on_message(f"STATE/{HOST}", state(True, online_at + 2))
        # The births counter (P/metrics) is what shows it here: such an NBIRTH (the old bdSeq), made after the
        # connection's disconnect() call, did not reach this broker in our runs, but it was made and counted.
        assert e.node.stats.births == births, "an NBIRTH was made on the connection being closed"
        second = await until(lambda: e.of("NBIRTH")[1:], 20, "the next connection's NBIRTH")
        [ndeath] = [m for m in e.of("NDEATH") if m.bdseq() == first.bdseq()]
        assert ndeath.index < second[0].index
        assert [m.bdseq() for m in e.of("NBIRTH")] == [first.bdseq(), first.bdseq() + 1]


async def test_a_dcmd_metric_named_with_a_slash_is_refused_and_audited(tmp_path: Path) -> None:
    """A DCMD metric whose name has a `/` (a Sparkplug folder, e.g. `Device Control/Reboot`) is refused as a point
    the device does not have, and audited (origin the sink, topic the DCMD): not dropped unseen."""
    async with rig(tmp_path) as r:
        await r.sub.wait_for(lambda ms: r.sub.sparkplug("DBIRTH", "boiler"), 30)
        dcmd = topic("DCMD", "boiler")
        metric = Payload.Metric(name="Device Control/Reboot", boolean_value=True)
        r.sub.publish_raw(dcmd, Payload(timestamp=now_ms(), metrics=[metric]).SerializeToString())

        def outcome() -> list[dict[str, Any]]:
            return [x for x in r.audit() if x["point"] == "Device Control/Reboot" and x["ok"] is not None]

        [record] = await until(outcome, 15, "the refusal audited")
        assert record["device"] == "boiler" and record["ok"] is False, record
        assert "no point" in record["error"] and "Device Control/Reboot" in record["error"], record
        assert record["origin"] == "scada", record


async def test_the_refusal_of_a_dcmd_metric_named_with_a_slash_is_audited_under_its_dcmd_topic(
    tmp_path: Path,
) -> None:
    """The audit names a refused DCMD by the DCMD's own topic, also when its metric name has a `/`."""
    async with rig(tmp_path) as r:
        await r.sub.wait_for(lambda ms: r.sub.sparkplug("DBIRTH", "boiler"), 30)
        dcmd = topic("DCMD", "boiler")
        metric = Payload.Metric(name="Device Control/Reboot", boolean_value=True)
        r.sub.publish_raw(dcmd, Payload(timestamp=now_ms(), metrics=[metric]).SerializeToString())
        [record] = await until(
            lambda: [x for x in r.audit() if x["point"] == "Device Control/Reboot" and x["ok"] is not None],
            15,
            "the refusal audited",
        )
        assert record["topic"] == dcmd, record
