"""The Sparkplug edge node's session end to end: births, rebirths, device deaths and returns, the will, seq, reloads.

Real parts (tests/sparkplug/rig.py): a Mosquitto, a `fieldgate run` process, a pty Modbus line with a pymodbus
server and an MCP device run by the test, and a recorder subscribed to `spBv1.0/#` at QoS 1. Every payload is
read twice: by our protobuf module and by the independent decoder (pysparkplug), and the two readings must agree.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sparkplug.rig import EDGE, GROUP, Recorded, Rig, SpbRecorder, decode_independent, ncmd_rebirth, payload_of
from sparkplug.sparkplug_decode import DECODER, SPB_PYTHON

from bridge.sparkplug import sparkplug_b_pb2 as pb
from bridge.sparkplug.node import REBIRTH_INTERVAL
from gateway import __version__
from gateway.cli import main

import configs

NS = f"spBv1.0/{GROUP}"
NCMD = f"{NS}/NCMD/{EDGE}"
#: The message kinds that carry the node's seq.
SEQUENCED = {"NBIRTH", "DBIRTH", "NDATA", "DDATA", "DDEATH"}
DEVICES = ("plc", "aux", "pump-1")
DATATYPE = {name: pb.DataType.Value(name) for name in pb.DataType.keys()}

# --- reading what was recorded ---------------------------------------------------------------


def sequenced(messages: Iterable[Recorded]) -> list[Recorded]:
    """The node's messages that carry seq, in arrival order."""
    return [m for m in messages if m.kind in SEQUENCED]


def seq_breaks(messages: Iterable[Recorded]) -> list[str]:
    """Where seq does not run on by one (mod 256) from message to message; an NBIRTH must be 0 and starts again."""
    out = []
    last: int | None = None
    for m in sequenced(messages):
        seq = m.seq
        if m.kind == "NBIRTH":
            if seq != 0:
                out.append(f"#{m.index} NBIRTH seq {seq}")
        elif last is None or seq != (last + 1) % 256:
            out.append(f"#{m.index} {m.topic} seq {seq} after {last}")
        last = seq
    return out


def births_after(rec: SpbRecorder, nbirth: Recorded) -> Iterator[Recorded]:
    """The DBIRTHs that came after `nbirth` and before any later NBIRTH."""
    for m in rec.since(nbirth.index + 1):
        if m.kind == "NBIRTH":
            return
        if m.kind == "DBIRTH":
            yield m


def aliases(birth: Recorded) -> dict[str, int]:
    """A birth's metric aliases by name (metrics without one left out)."""
    return {m.name: m.alias for m in birth.decoded().metrics if m.HasField("alias")}


def value_of(metric: pb.Payload.Metric) -> Any:
    """A metric's value as Python, from the field its datatype travels in (None for a null)."""
    if metric.is_null:
        return None
    kind = metric.WhichOneof("value")
    return None if kind is None else getattr(metric, kind)


def shape_errors(messages: Iterable[Recorded]) -> list[str]:
    """Where a message breaks the specification's shape: every metric has a timestamp; births give name, datatype
    and an alias (but `Node Control/Rebirth`); DATA gives an alias only (no name, no datatype); DDEATH has seq."""
    out = []
    for m in messages:
        if m.kind not in SEQUENCED:
            continue
        p = m.decoded()
        if not p.HasField("timestamp") or not p.HasField("seq"):
            out.append(f"#{m.index} {m.topic}: no payload timestamp or seq")
        for metric in p.metrics:
            where = f"#{m.index} {m.topic} {metric.name or metric.alias}"
            if not metric.HasField("timestamp"):
                out.append(f"{where}: no timestamp")
            if m.kind in ("NBIRTH", "DBIRTH"):
                if not metric.name or not metric.HasField("datatype"):
                    out.append(f"{where}: a birth metric without name or datatype")
                if metric.HasField("alias") == (metric.name == "Node Control/Rebirth"):
                    out.append(f"{where}: alias wrong (only Rebirth has none)")
                if metric.WhichOneof("value") is None and not metric.is_null:
                    out.append(f"{where}: neither a value nor is_null")
            elif m.kind in ("NDATA", "DDATA"):
                if metric.HasField("name") or metric.HasField("datatype") or not metric.HasField("alias"):
                    out.append(f"{where}: DATA metric not by alias only")
    return out


def wait_births(rig: Rig, since: int = 0, devices: Iterable[str] = DEVICES) -> Recorded:
    """The NBIRTH after `since` once a DBIRTH of each of `devices` followed it."""
    rec = rig.recorder

    def born() -> Recorded | None:
        for nbirth in rec.of("NBIRTH", since=since):
            if set(devices) <= {b.device for b in births_after(rec, nbirth)}:
                return nbirth
        return None

    return rig.wait(born, 30, f"an NBIRTH after #{since} and DBIRTHs of {', '.join(devices)}")


def wait_ddata(rig: Rig, device: str, count: int, since: int, timeout: float = 20) -> list[Recorded]:
    """At least `count` DDATA of `device` after `since`."""
    return rig.wait(
        lambda: (found := rig.recorder.of("DDATA", device, since)) and len(found) >= count and found,
        timeout,
        f"{count} DDATA of {device} after #{since}",
    )


def agree_with_the_independent_decoder(messages: list[Recorded]) -> None:
    """pysparkplug reads every message of the node without error, with our names, aliases, datatypes, seq and
    values (what hosts sent, STATE and commands, is left out)."""
    messages = [m for m in messages if m.kind in SEQUENCED or m.kind == "NDEATH"]
    theirs = decode_independent(messages)
    names: dict[tuple[str | None, int], str] = {}  # (device, alias) -> name, from our reading of the births
    for ours, their in zip(messages, theirs, strict=True):
        assert "error" not in their, (ours.topic, their)
        p = ours.decoded()
        assert their["seq"] == (p.seq if p.HasField("seq") else None), ours.topic
        assert their["timestamp"] == p.timestamp
        assert len(their["metrics"]) == len(p.metrics), ours.topic
        for m, t in zip(p.metrics, their["metrics"], strict=True):
            if ours.kind in ("NBIRTH", "DBIRTH"):
                if m.HasField("alias"):
                    names[(ours.device, m.alias)] = m.name
                assert t["name"] == m.name and t["datatype"] == pb.DataType.Name(m.datatype), (ours.topic, t)
            elif ours.kind in ("DDATA", "NDATA"):
                assert t["name"] == names[(ours.device, m.alias)], (ours.topic, t)
            assert t["alias"] == (m.alias if m.HasField("alias") else None)
            assert t["timestamp"] == m.timestamp
            assert t["is_historical"] == m.is_historical
            ours_value = value_of(m)
            if isinstance(ours_value, float):
                assert t["value"] == pytest.approx(ours_value, rel=1e-6), (ours.topic, t)
            elif ours.kind != "NDEATH":
                assert t["value"] == ours_value or (t["is_null"] and ours_value is None), (ours.topic, t)


# --- 1. births on connect --------------------------------------------------------------------


def test_births_on_connect_declare_every_metric_and_data_carries_only_changes_by_alias(tmp_path: Path) -> None:
    """NBIRTH (seq 0, bdSeq Int64, Rebirth false without alias, node metrics), a DBIRTH per online device with
    every point's datatype and properties, aliases unique across the node, QoS 0 and no retain; then DDATA of the
    changed values only, by alias, each with its sample's ts (as the JSON sink publishes it)."""
    rig = Rig(tmp_path, start=False)
    rig.config["northbound"].append(configs.sink("local", rig.mosquitto.url, topic_prefix="fg"))
    with rig:
        rig.start_all()
        telemetry = SpbRecorder(rig.mosquitto.port, "fg/plc/telemetry")
        telemetry.start()
        try:
            nbirth = wait_births(rig)
            since = rig.recorder.mark()
            ddata = wait_ddata(rig, "plc", 10, since)
            wait_ddata(rig, "pump-1", 3, since)
            json_samples = {
                body["ts"]: body["values"] for body in (json.loads(m.payload) for m in telemetry.messages())
            }
        finally:
            telemetry.stop()
        messages = rig.recorder.messages()

    # The NBIRTH comes first, at seq 0.
    assert messages[0].kind == "NBIRTH" and messages[0] is nbirth and nbirth.seq == 0
    node = nbirth.metrics()
    assert node["bdSeq"].datatype == DATATYPE["Int64"] and node["bdSeq"].long_value == 0  # a first run
    rebirth = node["Node Control/Rebirth"]
    assert rebirth.datatype == DATATYPE["Boolean"] and rebirth.boolean_value is False
    assert not rebirth.HasField("alias")
    assert node["Properties/Software Version"].string_value == __version__
    assert node["Properties/Software Version"].datatype == DATATYPE["String"]
    assert node["Node Info/Uptime"].datatype == DATATYPE["Double"]
    for counter in ("Lines/rs485/Transactions", "Lines/rs485/Timeouts"):
        assert node[counter].datatype == DATATYPE["UInt64"], counter

    births = {b.device: b for b in births_after(rig.recorder, nbirth)}
    assert set(births) == set(DEVICES)
    # Every metric a device reports is in its birth: no value it pushed or was polled for births it again.
    assert sorted(m.device or "" for m in rig.recorder.of("DBIRTH")) == sorted(DEVICES)
    plc = births["plc"].metrics()
    expected = {
        "level": "Int16",
        "temp": "Double",  # int16 scaled by 0.1
        "flow": "Float",
        "status.running": "Boolean",
        "status.alarm": "Boolean",
        "serial": "String",
    }
    assert {name: pb.DataType.Name(m.datatype) for name, m in plc.items()} == expected
    assert (
        plc["temp"].double_value == 21.5 and plc["flow"].float_value == 1.25 and plc["serial"].string_value == "SN-42"
    )
    assert properties(plc["temp"]) == {"engUnit": "°C", "min": 0, "max": 100, "writable": True}
    assert properties(plc["level"]).get("writable", False) is False
    assert pb.DataType.Name(births["aux"].metrics()["count"].datatype) == "UInt16"
    pump = births["pump-1"].metrics()
    assert {n: pb.DataType.Name(m.datatype) for n, m in pump.items()} == {"flow_lpm": "Double", "running": "Boolean"}
    assert properties(pump["flow_lpm"]) == {"engUnit": "l/min"}

    # Aliases: unique across the node (its metrics and every device's).
    every_alias = [alias for b in [nbirth, *births.values()] for alias in aliases(b).values()]
    assert len(every_alias) == len(set(every_alias))

    # QoS 0, not retained, every one of them.
    assert {(m.qos, m.retain) for m in messages} == {(0, False)}

    # DDATA: by alias only, aliases of the device's birth, only the values that move, each at its sample's ts.
    plc_alias = aliases(births["plc"])
    by_alias = {a: n for n, a in plc_alias.items()}
    matched = 0
    for m in rig.recorder.of("DDATA", "plc"):
        for metric in m.decoded().metrics:
            assert metric.name == "" and metric.HasField("alias"), m.topic
            name = by_alias[metric.alias]
            assert name not in ("temp", "flow", "serial"), f"an unchanged {name} sent again"
            assert not metric.is_historical
            sample = json_samples.get(metric.timestamp)
            if sample is not None and name == "level":
                assert sample["level"] == metric.int_value  # the ramp stays within 0..30000
                matched += 1
    assert matched >= len(ddata) // 2, "the DDATA metric timestamps are not the samples' ts"
    assert all(m.device in DEVICES for m in rig.recorder.of("DDATA"))
    # Only changes: no metric is sent with the value it last had (in the birth or a DDATA), MCP's whole frames too.
    # Historical ones are left out: samples taken before a birth (an MCP frame spooled while the sink connected) go
    # after it, and may well hold the value the birth carried.
    last: dict[tuple[str | None, int], Any] = {}
    for m in messages:
        if m.kind in ("DBIRTH", "DDATA"):
            for metric in m.decoded().metrics:
                key = (m.device, metric.alias)
                if metric.is_historical:
                    continue
                if m.kind == "DDATA":
                    assert key not in last or last[key] != value_of(metric), f"{m.topic} resent {metric}"
                last[key] = value_of(metric)
    assert seq_breaks(messages) == []
    assert shape_errors(messages) == []
    agree_with_the_independent_decoder(messages)


def properties(metric: pb.Payload.Metric) -> dict[str, Any]:
    """A metric's properties as {name: Python value}."""
    out = {}
    for key, v in zip(metric.properties.keys, metric.properties.values, strict=True):
        kind = v.WhichOneof("value")
        out[key] = None if kind is None else getattr(v, kind)
    return out


# --- 2. rebirth on request -------------------------------------------------------------------


class HostApp:
    """The independent decoder's host mode (pysparkplug): a Sparkplug host application on the broker."""

    def __init__(self, port: int, host_id: str = "test-host") -> None:
        self.proc = subprocess.Popen(
            [str(SPB_PYTHON), str(DECODER), "--host", "127.0.0.1", str(port), GROUP, host_id],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip():
                self.lines.put(json.loads(line))

    def expect(self, predicate: Any, timeout: float = 15) -> dict[str, Any]:
        """The first line from now on that `predicate` accepts (the ones before it are kept in `seen`)."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                err = self.proc.stderr.read() if self.proc.poll() is not None and self.proc.stderr else ""
                raise AssertionError(f"the host application printed nothing expected; stderr: {err}") from None
            self.seen.append(line)
            if predicate(line):
                return line

    def command(self, cmd: dict[str, Any]) -> None:
        """Send one command and wait for its acknowledgement."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        answer = self.expect(lambda line: line.get("event") in ("sent", "error"))
        assert answer["event"] == "sent", answer

    def close(self) -> None:
        """Quit (STATE offline, clean disconnect); killed if it hangs."""
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(10)
        except (subprocess.TimeoutExpired, BrokenPipeError):
            self.proc.kill()
            self.proc.wait()


def test_a_rebirth_request_births_the_node_and_every_device_again_with_the_same_bdseq(tmp_path: Path) -> None:
    """NCMD `Node Control/Rebirth` = true (sent by the independent host) -> NBIRTH seq 0 with the same bdSeq and
    aliases, a DBIRTH of every online device, then data with seq running on; `false`, a String "true", garbage and
    an NCMD for another edge node birth nothing."""
    with Rig(tmp_path) as rig:
        rec = rig.recorder
        first = wait_births(rig)
        # Past the rebirth interval, so that a rebirth (wrongly) asked below would go out at once, not be deferred.
        rig.wait(
            lambda: [m for m in rec.of("DDATA", "plc") if m.at > first.at + REBIRTH_INTERVAL + 0.2],
            20,
            "data past the rebirth interval",
        )
        mark = rec.mark()
        # All from one connection at QoS 1: the broker hands them to the node in this order, the DCMD last. Its
        # read-back (a DDATA of temp 33.3) is the node's answer to a message after every refused request.
        rec.publish(NCMD, ncmd_rebirth(False), qos=1)
        rec.publish(NCMD, b"\xff\xff\xff\x0fnot protobuf", qos=1)
        rec.publish(NCMD, payload_of([("Node Control/Rebirth", DATATYPE["String"], "true")]), qos=1)
        rec.publish(f"{NS}/NCMD/another-edge", ncmd_rebirth(True), qos=1)
        rec.publish(f"{NS}/DCMD/{EDGE}/plc", payload_of([("temp", DATATYPE["Double"], 33.3)]), qos=1)
        temp = aliases(next(b for b in births_after(rec, first) if b.device == "plc"))["temp"]
        written = rig.wait(
            lambda: next(
                (
                    m
                    for m in rec.of("DDATA", "plc", mark)
                    if any(x.alias == temp and x.double_value == 33.3 for x in m.decoded().metrics)
                ),
                None,
            ),
            20,
            "the read-back of the DCMD after the refused requests",
        )
        refused = [m.topic for m in rec.since(mark)[: written.index - mark] if m.kind in ("NBIRTH", "DBIRTH")]
        assert refused == [], f"a request that is no rebirth request made {refused}"
        host = HostApp(rig.mosquitto.port)
        try:
            host.expect(lambda line: line.get("event") == "online")
            host.command({"cmd": "rebirth", "edge": EDGE})
            again = wait_births(rig, since=mark)
            wait_ddata(rig, "plc", 5, again.index)
            seen_by_host = host.expect(lambda line: line.get("topic", {}).get("type") == "NBIRTH")
        finally:
            host.close()
        assert rig.gateway is not None and rig.gateway.proc.poll() is None
        messages = rec.messages()

    assert [m.index for m in rec.of("NBIRTH")] == [first.index, again.index], "one rebirth, for the one request"
    assert again.seq == 0 and again.bdseq() == first.bdseq()
    assert seen_by_host["seq"] == 0
    assert aliases(again) == aliases(first)
    before = {b.device: aliases(b) for b in births_after(rec, first)}
    after = {b.device: aliases(b) for b in births_after(rec, again)}
    assert set(after) == set(DEVICES) and after == before, "every device born again, with the aliases it had"
    assert seq_breaks(messages) == []
    agree_with_the_independent_decoder(messages)


# --- 3. a device that goes and comes back ----------------------------------------------------


def test_a_device_that_goes_gets_a_ddeath_and_a_dbirth_when_it_returns(tmp_path: Path) -> None:
    """A Modbus unit that stops answering gets a DDEATH (no DDATA of it after; a rebirth meanwhile leaves it out), a
    DBIRTH with its values when it answers again; the MCP device's disconnect is a DDEATH, its return a DBIRTH; the
    node is not born again for either."""
    with Rig(tmp_path) as rig:
        rec = rig.recorder
        nbirth = wait_births(rig)
        wait_ddata(rig, "aux", 3, nbirth.index)
        mark = rec.mark()
        rig.field.set_dead(2)
        death = rig.wait(lambda: rec.of("DDEATH", "aux", mark), 20, "aux's DDEATH")[0]
        # Later data of the other devices, so that a DDATA of aux after its death would have come by now.
        wait_ddata(rig, "plc", 5, death.index)
        # A rebirth meanwhile births the devices that are online only.
        rec.publish(NCMD, ncmd_rebirth(True), qos=1)
        while_dead = wait_births(rig, since=death.index, devices=("plc", "pump-1"))
        wait_ddata(rig, "plc", 3, while_dead.index)
        rig.field.set_dead(2, False)
        back = rig.wait(lambda: rec.of("DBIRTH", "aux", death.index), 20, "aux's DBIRTH on its return")[0]
        wait_ddata(rig, "aux", 3, back.index)

        mark = rec.mark()
        rig.field.mcp_disconnect()
        gone = rig.wait(lambda: rec.of("DDEATH", "pump-1", mark), 20, "pump-1's DDEATH")[0]
        wait_ddata(rig, "plc", 5, gone.index)
        rig.field.mcp_connect()
        returned = rig.wait(lambda: rec.of("DBIRTH", "pump-1", gone.index), 20, "pump-1's DBIRTH")[0]
        wait_ddata(rig, "pump-1", 3, returned.index)
        messages = rec.messages()

    between = [m for m in messages[death.index + 1 : back.index] if m.device == "aux"]
    assert between == [], [m.topic for m in between]
    assert [m.topic for m in messages[gone.index + 1 : returned.index] if m.device == "pump-1"] == []
    assert value_of(back.metrics()["count"]) is not None, "the returning device is born with its values"
    assert pb.DataType.Name(back.metrics()["count"].datatype) == "UInt16"
    assert aliases(back) == aliases(next(b for b in births_after(rec, nbirth) if b.device == "aux"))
    assert set(returned.metrics()) == {"flow_lpm", "running"}
    for m in (death, gone):
        assert m.seq is not None and m.decoded().timestamp > 0 and (m.qos, m.retain) == (0, False)
    assert [m.index for m in rec.of("NBIRTH")] == [nbirth.index, while_dead.index], "a device's death is not the node's"
    assert {b.device for b in births_after(rec, while_dead) if b.index < back.index} == {"plc", "pump-1"}
    assert seq_breaks(messages) == []
    agree_with_the_independent_decoder(messages)


# --- 4. death certificates -------------------------------------------------------------------


def test_kill_9_leaves_the_will_ndeath_and_the_next_run_takes_the_next_bdseq(tmp_path: Path) -> None:
    """kill -9: the broker publishes the will, an NDEATH (QoS 1, not retained) with the last NBIRTH's bdSeq; the
    next run's NBIRTH has bdSeq + 1 (kept in state_dir/sparkplug/<sink>.bdseq); SIGTERM then publishes a DDEATH of
    each device born and an NDEATH with that run's bdSeq, in that order, before it disconnects."""
    with Rig(tmp_path) as rig:
        rec = rig.recorder
        first = wait_births(rig)
        bd = first.bdseq()
        assert rig.bdseq_path.read_text().strip() == str(bd)
        mark = rec.mark()
        rig.kill_gateway()
        will = rig.wait(lambda: rec.of("NDEATH", since=mark), 15, "the will NDEATH")[0]
        assert (will.qos, will.retain) == (1, False)
        assert will.bdseq() == bd and will.seq is None
        assert pb.DataType.Name(will.metrics()["bdSeq"].datatype) == "Int64"

        rig.start_gateway()
        second = wait_births(rig, since=will.index)
        assert second.bdseq() == (bd + 1) % 256 and second.seq == 0
        assert rig.bdseq_path.read_text().strip() == str(second.bdseq())
        wait_ddata(rig, "plc", 3, second.index)
        # The MCP device reconnects on its own back-off after the kill: every device is born again before the stop.
        rig.wait(
            lambda: {m.device for m in rec.of("DBIRTH", since=second.index)} >= set(DEVICES),
            30,
            "every device's DBIRTH in the second run",
        )
        mark = rec.mark()
        assert rig.stop_gateway() == 0
        goodbye = rig.wait(lambda: rec.of("NDEATH", since=mark), 15, "the goodbye NDEATH")[0]
        messages = rec.messages()

    assert (goodbye.qos, goodbye.retain) == (1, False) and goodbye.bdseq() == second.bdseq()
    # The process has exited and the broker delivers one client's messages in order: this is all of them.
    after = messages[mark:]
    deaths = [m.device for m in after if m.kind == "DDEATH"]
    assert sorted(deaths) == sorted(DEVICES), "a DDEATH for each device born"
    assert after[-1] is goodbye, [m.topic for m in after]
    assert seq_breaks(messages) == []
    agree_with_the_independent_decoder(messages)


# --- 5. seq over a long run ------------------------------------------------------------------


def test_seq_runs_on_by_one_across_hundreds_of_messages_and_wraps_at_255(tmp_path: Path) -> None:
    """On a live run, seq runs 0, 1, ... 255, 0 across every NBIRTH/DBIRTH/DDATA/NDATA of the node, wrapping more
    than once (600+ messages, one NBIRTH), as both decoders read it; the NDATA carries the node metrics that
    changed (uptime, the line's transactions), by alias."""
    with Rig(tmp_path, poll="20ms", mcp_interval=0.02) as rig:
        nbirth = wait_births(rig)
        rig.wait(lambda: len(sequenced(rig.recorder.messages())) >= 600, 45, "600 messages of the node")
        # The node's own metrics go out every 10 s (the gateway's metrics interval): one NDATA in the run too.
        ndata = rig.wait(lambda: rig.recorder.of("NDATA"), 45, "an NDATA of the node's metrics")[0]
        messages = rig.recorder.messages()

    seqs = [m.seq for m in sequenced(messages)]
    assert seq_breaks(messages) == []
    assert shape_errors(messages) == []
    wraps = [i for i in range(1, len(seqs)) if seqs[i - 1] == 255 and seqs[i] == 0]
    assert len(wraps) >= 2, f"seq wrapped {len(wraps)} time(s)"
    assert [m.index for m in messages if m.kind == "NBIRTH"] == [nbirth.index]
    theirs = decode_independent(sequenced(messages))
    assert [t["seq"] for t in theirs] == seqs
    # NDATA: the node's metrics that changed, by the NBIRTH's aliases, with their ts.
    by_alias = {a: n for n, a in aliases(nbirth).items()}
    sent = {by_alias[m.alias] for m in ndata.decoded().metrics}
    assert {"Node Info/Uptime", "Lines/rs485/Transactions"} <= sent
    assert not sent & {"Properties/Software", "Properties/Software Version", "bdSeq", "Node Control/Rebirth"}
    assert all(m.name == "" and m.timestamp > 0 for m in ndata.decoded().metrics)
    assert (ndata.qos, ndata.retain) == (0, False)


# --- 6. reloads ------------------------------------------------------------------------------


def reloaded(rig: Rig, count: int) -> bool:
    """Whether the gateway has finished `count` reloads."""
    return rig.log().count("INFO gateway.app: reload: ") >= count


def test_a_reload_that_changes_the_metrics_rebirths_and_one_that_does_not_births_nothing(tmp_path: Path) -> None:
    """A point added by SIGHUP -> NBIRTH seq 0 (same bdSeq) and every DBIRTH, the plc's with the new metric and
    the old aliases; a reload that changes nothing a host sees (an MCP device's write rate), or one refused, -> no
    birth at all; a device removed -> births of the others only, and no more data of it; another edge_node_id ->
    the old node's NDEATH and the new one's NBIRTH with the next bdSeq."""
    with Rig(tmp_path) as rig:
        rec = rig.recorder
        first = wait_births(rig)
        wait_ddata(rig, "plc", 3, first.index)
        mark = rec.mark()
        plc = rig.config["modbus"]["buses"][0]["devices"][0]
        plc["points"].append(configs.point("extra", "holding", 20, "uint16", unit="rpm"))
        rig.reload()
        again = wait_births(rig, since=mark)
        rig.wait(lambda: reloaded(rig, 1), 15, "the first reload")
        wait_ddata(rig, "plc", 3, again.index)

        mark = rec.mark()
        rig.config["mcp"]["devices"][0]["write_rate"] = 7.0
        rig.reload()
        rig.wait(lambda: reloaded(rig, 2), 15, "the second reload")
        # Data published after the reload: a birth it made would have come before it.
        after = rec.mark()
        wait_ddata(rig, "plc", 5, after)
        wait_ddata(rig, "pump-1", 3, after)
        # A config the gateway refuses (a topic_prefix on the sparkplug sink) changes nothing either.
        assert rig.gateway is not None
        refused = {**rig.config, "northbound": [{**rig.config["northbound"][0], "topic_prefix": "x/y"}]}
        configs.write({k: v for k, v in refused.items() if k != "simulator"}, rig.config_path)
        rig.gateway.proc.send_signal(signal.SIGHUP)
        rig.wait(lambda: "config reload refused" in rig.log(), 15, "the refused reload")
        after = rec.mark()
        wait_ddata(rig, "plc", 5, after)

        removed = rec.mark()
        rig.config["modbus"]["buses"][0]["devices"].pop(1)  # aux
        rig.reload()
        third = wait_births(rig, since=removed, devices=("plc", "pump-1"))
        rig.wait(lambda: reloaded(rig, 3), 15, "the third reload")
        wait_ddata(rig, "plc", 5, third.index)

        renamed = rec.mark()
        rig.config["northbound"][0]["sparkplug"]["edge_node_id"] = "line-b"
        rig.reload()
        ended = rig.wait(lambda: rec.of("NDEATH", since=renamed), 15, "the old edge node's NDEATH")[0]
        fourth = rig.wait(lambda: [m for m in rec.of("NBIRTH", since=renamed) if "/line-b" in m.topic], 15, "line-b")[0]
        messages = rec.messages()

    assert again.seq == 0 and again.bdseq() == first.bdseq()
    births = {b.device: b for b in births_after(rec, again)}
    assert set(births) == set(DEVICES)
    extra = births["plc"].metrics()["extra"]
    assert pb.DataType.Name(extra.datatype) == "UInt16"
    assert properties(extra) == {"engUnit": "rpm"}
    old = aliases(next(b for b in births_after(rec, first) if b.device == "plc"))
    new = aliases(births["plc"])
    assert {n: a for n, a in new.items() if n in old} == old
    assert new["extra"] not in [
        a for b in [again, *births.values()] if b is not births["plc"] for a in aliases(b).values()
    ]
    late = [m.topic for m in messages[mark:removed] if m.kind in ("NBIRTH", "DBIRTH", "DDEATH")]
    assert late == [], f"a reload that changes no metric made {late}"
    assert third.seq == 0 and third.bdseq() == first.bdseq()
    assert {b.device for b in births_after(rec, third)} == {"plc", "pump-1"}
    assert [m.topic for m in messages[third.index :] if m.device == "aux"] == []
    # Another edge node id is another session: the old one's NDEATH (its bdSeq), the new one's on the next number.
    assert ended.topic == f"{NS}/NDEATH/{EDGE}" and ended.bdseq() == first.bdseq()
    assert fourth.seq == 0 and fourth.bdseq() == (first.bdseq() + 1) % 256
    assert seq_breaks(messages) == []
    agree_with_the_independent_decoder(messages)


# --- what a device pushes, what the state dir holds ------------------------------------------


def past_the_birth_interval(rig: Rig, birth: Recorded) -> None:
    """Wait for data that arrived REBIRTH_INTERVAL (and a margin) after `birth`: a device is born again once in it."""
    rig.wait(
        lambda: [m for m in rig.recorder.of("DDATA", since=birth.index) if m.at > birth.at + REBIRTH_INTERVAL + 0.2],
        20,
        "data past the birth interval",
    )


def test_an_mcp_device_pushing_a_new_metric_or_another_type_is_born_again_alone(tmp_path: Path) -> None:
    """An MCP device that pushes a metric its birth lacks, or a value its metric's datatype cannot hold (a string
    for a number), gets a DBIRTH of its own carrying it (the old aliases kept); the node and the other devices are
    not born again, and a number afterwards births the declared Double back."""
    with Rig(tmp_path) as rig:
        rec = rig.recorder
        nbirth = wait_births(rig)
        born = next(b for b in births_after(rec, nbirth) if b.device == "pump-1")
        # Each change past the interval in which a device is born once at most (see the next test for within it).
        past_the_birth_interval(rig, born)
        mark = rec.mark()
        rig.field.mcp_hold({"vibration": 1.5})
        grown = rig.wait(lambda: rec.of("DBIRTH", "pump-1", mark), 15, "pump-1 born with vibration")[0]
        past_the_birth_interval(rig, grown)
        rig.field.mcp_hold({"flow_lpm": "jammed"})
        texted = rig.wait(lambda: rec.of("DBIRTH", "pump-1", grown.index + 1), 15, "pump-1 born with a string")[0]
        past_the_birth_interval(rig, texted)
        rig.field.mcp_hold({"flow_lpm": 12.5})
        back = rig.wait(lambda: rec.of("DBIRTH", "pump-1", texted.index + 1), 15, "pump-1 born a number again")[0]
        wait_ddata(rig, "plc", 3, back.index)
        messages = rec.messages()

    vibration = grown.metrics()["vibration"]
    assert pb.DataType.Name(vibration.datatype) == "Double" and vibration.double_value == 1.5
    assert {n: a for n, a in aliases(grown).items() if n != "vibration"} == aliases(born)
    before = [nbirth, *(b for b in births_after(rec, nbirth) if b.index < mark)]
    node_aliases = [a for b in before for a in aliases(b).values()]
    assert aliases(grown)["vibration"] not in node_aliases
    flow = texted.metrics()["flow_lpm"]
    assert pb.DataType.Name(flow.datatype) == "String" and flow.string_value == "jammed"
    flow = back.metrics()["flow_lpm"]
    assert pb.DataType.Name(flow.datatype) == "Double" and flow.double_value == 12.5
    assert properties(flow) == {"engUnit": "l/min"}
    reborn = [m.topic for m in messages[mark:] if m.kind in ("NBIRTH", "DBIRTH", "DDEATH") and m.device != "pump-1"]
    assert reborn == [], "only the device whose metrics changed is born again"
    assert [m.kind for m in messages[mark:] if m.device == "pump-1" and m.kind != "DDATA"] == ["DBIRTH"] * 3
    assert seq_breaks(messages) == []
    agree_with_the_independent_decoder(messages)


def test_the_bdseq_file_wraps_after_255_and_a_damaged_one_is_moved_aside(tmp_path: Path) -> None:
    """A bdseq file holding 255 makes the next session's bdSeq 0; one that holds garbage is moved aside (the node
    starts at 0 and runs); each session's NBIRTH and goodbye NDEATH carry the same number, the one on disk."""
    rig = Rig(tmp_path, start=False)
    with rig:
        rig.bdseq_path.parent.mkdir(parents=True)
        rig.bdseq_path.write_text("255\n")
        rig.start_all()
        first = wait_births(rig)
        assert first.bdseq() == 0 and rig.bdseq_path.read_text().strip() == "0"
        mark = rig.recorder.mark()
        assert rig.stop_gateway() == 0
        goodbye = rig.wait(lambda: rig.recorder.of("NDEATH", since=mark), 15, "the goodbye NDEATH")[0]
        assert goodbye.bdseq() == 0

        rig.bdseq_path.write_bytes(b"\xff\xfe7 not a number" * 100)
        rig.start_gateway()
        second = wait_births(rig, since=goodbye.index)
        assert second.bdseq() == 0 and rig.bdseq_path.read_text().strip() == "0"
        aside = list(rig.bdseq_path.parent.glob("scada.bdseq.corrupt-*"))
        assert len(aside) == 1 and aside[0].read_bytes().startswith(b"\xff\xfe7 not a number")
        assert "corrupt" in rig.log()


def test_after_the_broker_comes_back_the_new_session_and_its_will_carry_a_new_bdseq(tmp_path: Path) -> None:
    """The broker restarts: the node connects again with a new bdSeq (the one on disk), births with seq 0 and
    that bdSeq, and the will of that connection (seen after kill -9) carries it too, not the first session's; the
    new session starts with its births, then what was spooled meanwhile as historical DDATA, in order."""
    with Rig(tmp_path) as rig:
        first = wait_births(rig)
        bd = first.bdseq()
        rig.mosquitto.stop()
        time.sleep(1.0)  # not a bound: the devices report meanwhile, and the node spools it
        rig.mosquitto.start()
        # A recorder of its own, subscribed at once (the node retries after 0.5 s at the soonest); the rebirth asked
        # below shows the session's NBIRTH even if the node reconnected before the recorder did.
        rec = SpbRecorder(rig.mosquitto.port)
        rec.start()
        try:
            rig.wait(lambda: len(rec.of("DDATA", "plc")) >= 10, 30, "data after the broker came back")
            natural = bool(rec.of("NBIRTH"))
            if not natural:
                rec.publish(NCMD, ncmd_rebirth(True), qos=1)
            second = rig.wait(lambda: rec.of("NBIRTH"), 15, "an NBIRTH of the new session")[0]
            mark = rec.mark()
            rig.kill_gateway()
            will = rig.wait(lambda: rec.of("NDEATH", since=mark), 15, "the will NDEATH")[0]
        finally:
            rec.stop()

    assert second.seq == 0 and second.bdseq() != bd
    assert second.bdseq() == int(rig.bdseq_path.read_text())
    assert will.bdseq() == second.bdseq(), "the will of the new connection carries its bdSeq"
    assert (will.qos, will.retain) == (1, False)
    if natural:
        # Seen from the session's start: births first, then what was spooled as historical DDATA older than the
        # device's birth values (in sample order), then live data.
        messages = sequenced(rec.messages()[:mark])
        assert messages[0] is second
        assert seq_breaks(messages) == [] and shape_errors(messages) == []
        born = {m.device: m for m in births_after(rec, second)}
        historical = []
        for m in messages:
            if m.kind == "DDATA":
                assert m.device in born and born[m.device].index < m.index, f"{m.topic} before its DBIRTH"
                birth_ts = max(x.timestamp for x in born[m.device].decoded().metrics)
                for x in m.decoded().metrics:
                    assert x.is_historical == (x.timestamp < birth_ts) and x.timestamp != birth_ts, (m.topic, x)
                    if x.is_historical:
                        historical.append((m.device, x.timestamp))
        assert historical, "nothing the devices reported during the outage came as historical data"
        for device in DEVICES:
            stamps = [ts for d, ts in historical if d == device]
            assert stamps == sorted(stamps), device


def test_a_devices_odd_readings_reach_the_host_as_both_decoders_read_them(tmp_path: Path) -> None:
    """A device reading Int16's minimum goes out as its 16-bit two's complement (pysparkplug reads -32768), a float
    that is NaN as a null (and the next number after it), an empty and a non-ASCII string as they are."""
    with Rig(tmp_path) as rig:
        rec = rig.recorder
        nbirth = wait_births(rig)
        plc = aliases(next(b for b in births_after(rec, nbirth) if b.device == "plc"))
        mark = rec.mark()
        rig.field.set(1, "level", -32768)
        rig.field.set(1, "flow", float("nan"))
        rig.field.set(1, "serial", "")

        def carrying(alias: int, test: Any) -> Recorded | None:
            return next(
                (
                    m
                    for m in rec.of("DDATA", "plc", mark)
                    if any(x.alias == alias and test(x) for x in m.decoded().metrics)
                ),
                None,
            )

        nulled = rig.wait(lambda: carrying(plc["flow"], lambda x: x.is_null), 15, "flow as a null")
        rig.wait(lambda: carrying(plc["level"], lambda x: x.int_value == 0x8000), 15, "level -32768")
        rig.wait(
            lambda: carrying(plc["serial"], lambda x: x.HasField("string_value") and x.string_value == ""),
            15,
            "an empty serial",
        )
        rig.field.set(1, "flow", 2.5)
        rig.field.set(1, "serial", "ÄÖ-7")
        rig.wait(lambda: carrying(plc["flow"], lambda x: x.float_value == 2.5 and not x.is_null), 15, "flow 2.5 again")
        rig.wait(lambda: carrying(plc["serial"], lambda x: x.string_value == "ÄÖ-7"), 15, "serial ÄÖ-7")
        messages = rec.messages()

    flow = next(x for x in nulled.decoded().metrics if x.alias == plc["flow"])
    assert flow.WhichOneof("value") is None and flow.timestamp > 0
    node = [m for m in messages if m.kind in SEQUENCED]
    theirs = decode_independent(node)
    values = [
        (x["name"], x["value"], x["is_null"])
        for m, t in zip(node, theirs, strict=True)
        if m.index >= mark and m.device == "plc"
        for x in t["metrics"]
        if x["name"] in ("level", "flow", "serial")
    ]
    for wanted in [("level", -32768, False), ("flow", None, True), ("serial", "", False), ("flow", 2.5, False)]:
        assert wanted in values, (wanted, values)
    assert ("serial", "ÄÖ-7", False) in values
    assert seq_breaks(messages) == [] and shape_errors(messages) == []


# --- 7. config errors ------------------------------------------------------------------------
# Each refused key has its case in tests/config_cases/sparkplug_*; this one runs with the embedded broker off, where
# check used to add an error about the default sink in place of the pruned section.


def test_check_names_only_the_sparkplug_key_when_the_embedded_broker_is_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fieldgate check` on a sparkplug sink with a topic_prefix (broker off, the sink has a url) exits 2 with one
    error, naming topic_prefix, and nothing about sinks the file does not have."""
    (tmp_path / "config.yaml").write_text(
        "broker: {enabled: false}\n"
        "northbound:\n"
        "  - {name: scada, url: 'mqtt://10.0.0.5:1883', format: sparkplug, topic_prefix: a/b,\n"
        "     sparkplug: {group_id: plant1}}\n"
    )
    assert main(["check", "-c", str(tmp_path / "config.yaml")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and "topic_prefix" in errors[0], errors


def test_a_type_change_right_after_a_birth_still_reaches_the_host(tmp_path: Path) -> None:
    """An MCP device that pushes a string for its number metric right after its DBIRTH (within the interval in
    which a device is born once) and keeps it gets a DBIRTH carrying the string all the same, later."""
    with Rig(tmp_path) as rig:
        rec = rig.recorder
        nbirth = wait_births(rig)
        born = next(b for b in births_after(rec, nbirth) if b.device == "pump-1")
        past_the_birth_interval(rig, born)
        mark = rec.mark()
        rig.field.mcp_hold({"vibration": 1.5})
        grown = rig.wait(lambda: rec.of("DBIRTH", "pump-1", mark), 15, "pump-1 born with vibration")[0]
        rig.field.mcp_hold({"flow_lpm": "jammed"})  # at once: within the interval after that birth
        texted = rig.wait(
            lambda: [
                b
                for b in rec.of("DBIRTH", "pump-1", grown.index + 1)
                if b.metrics()["flow_lpm"].datatype == DATATYPE["String"]
            ],
            15,
            "pump-1 born with the string it has held since",
        )[0]
    flow = texted.metrics()["flow_lpm"]
    assert pb.DataType.Name(flow.datatype) == "String" and flow.string_value == "jammed"
