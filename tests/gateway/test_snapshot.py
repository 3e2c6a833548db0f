"""The gateway's snapshot, its health verdict and the event gate of a reload, in memory: no sockets, no sleeps."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from dataclasses import asdict
from types import SimpleNamespace

import pytest

from gateway.event_gate import EventGate
from gateway.health import HEALTH_PARTS, problems
from gateway.metrics_topic import metrics_payload
from gateway.snapshot import LINES, MCP, SINKS, GatewaySnapshot, SinkSnapshot, TaskSnapshot, take_snapshot
from gateway.supervise import Supervisor
from gateway.types import (
    DeviceState,
    McpDeviceCounters,
    McpDeviceSnapshot,
    McpServerSnapshot,
    ModbusDeviceCounters,
    ModbusDeviceSnapshot,
    ModbusLineCounters,
    ModbusLineSnapshot,
    ModbusServerSnapshot,
    Sample,
)


def line(name: str, *, running: bool = True, stopping: bool = False, alive_at: float = 100.0) -> ModbusLineSnapshot:
    """A line whose task last moved at `alive_at` and whose longest healthy step is 5 s."""
    unit = ModbusDeviceSnapshot("d", 1, True, ModbusDeviceCounters())
    return ModbusLineSnapshot(
        name, "/dev/ttyX", "9600 8E1", running, stopping, alive_at, 5.0, ModbusLineCounters(), (unit,)
    )


class Parts:
    """The running gateway's parts as take_snapshot reads them; `mcp` fails to report."""

    gateway_id = "g1"
    started_at = 10.0
    reloading = False
    router = None
    outboxes: list[object] = []
    sinks: list[object] = []
    broker = None
    modbus_server = None

    def __init__(self) -> None:
        self.supervisor = Supervisor()
        self.buses = [SimpleNamespace(snapshot=lambda: line("l1", running=False))]
        self.mcp = SimpleNamespace(snapshot=self._broken)

    @staticmethod
    def _broken() -> object:
        raise RuntimeError("a bug in the MCP counters")


def test_a_part_that_cannot_be_read_is_kept_as_unreadable_and_the_rest_is_read() -> None:
    snap = take_snapshot(Parts())  # type: ignore[arg-type]
    assert [x.name for x in snap.lines] == ["l1"] and snap.gateway_id == "g1"
    assert snap.mcp is None and list(snap.unreadable) == [MCP]
    snap.require(LINES, SINKS)  # read: nothing raised
    with pytest.raises(RuntimeError, match="a bug in the MCP counters"):
        snap.require(LINES, MCP)


def test_health_names_an_ended_line_and_a_stuck_one_but_not_one_being_stopped() -> None:
    lines = (
        line("ok", alive_at=99.0),
        line("ended", running=False),
        line("stuck", alive_at=90.0),  # 10 s idle, its longest step 5 s
        line("leaving", running=False, stopping=True, alive_at=0.0),  # a reload stopped it: going away, not stuck
    )
    snap = GatewaySnapshot("g", 100.0, 0, 90.0, False, lines=lines, task_problems=("task t: failed",))
    assert problems(snap) == [
        "task t: failed",
        "modbus line ended: its task has ended",
        "modbus line stuck (/dev/ttyX) has not moved for 10.0 s (its longest step is 5.0 s): stuck in I/O",
    ]
    assert problems(snap, lasting=True) == problems(snap)[1:]  # one failure is the supervisor's to fix


class Recorder:
    """A router that records what reaches it."""

    def __init__(self) -> None:
        self.seen: list[object] = []

    def on_sample(self, sample: Sample) -> None:
        self.seen.append(sample)

    def on_state(self, state: DeviceState) -> None:
        self.seen.append(state)

    def deliver(self, sample: Sample) -> asyncio.Future[None]:
        self.seen.append(("delivered", sample))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


async def test_events_during_a_swap_wait_and_then_reach_the_router_in_order_even_when_the_swap_fails() -> None:
    router = Recorder()
    gate = EventGate(lambda: router)  # type: ignore[arg-type, return-value]
    first, second = Sample("a", 1, {"x": 1}), Sample("b", 2, {"y": 2})
    with pytest.raises(RuntimeError), gate.held():
        gate.on_sample(first)
        ack = gate.deliver(second)
        gate.on_state(DeviceState("a", False))
        assert router.seen == [] and not ack.done()  # nothing meets the half-swapped parts
        raise RuntimeError("the swap failed")
    assert router.seen == [first, ("delivered", second), DeviceState("a", False)]
    await asyncio.sleep(0)  # the held delivery's outcome settles the future the driver got
    assert ack.done() and ack.result() is None
    gate.on_sample(first)  # the gate is open again
    assert router.seen[-1] is first


def test_metrics_payload_keeps_its_keys_order_and_json_shapes() -> None:
    counters = ModbusDeviceCounters(transactions=3, response_counts=(1, 2), response_sum_s=0.5)
    unit = ModbusDeviceSnapshot("d1", 1, True, counters)
    lines = (
        ModbusLineSnapshot(
            "l1", "/dev/x", "9600 8E1", True, False, 0.0, 5.0, ModbusLineCounters(transactions=3), (unit,)
        ),
    )
    pump = McpDeviceSnapshot("pump", True, McpDeviceCounters(frames_in=4))
    mcp = McpServerSnapshot((), (pump,), 0, 2, {}, {}, McpDeviceCounters(frames_in=4))
    sink = SinkSnapshot("up", True, {"published": 7}, {"queued": 1, "dropped": 0}, 0, None, 5)
    tasks = (TaskSnapshot("metrics", 1, False),)
    snap = GatewaySnapshot("g", 100.0, 0, 12.34, False, lines=lines, mcp=mcp, sinks=(sink,), tasks=tasks)
    payload = metrics_payload(snap)
    assert payload == {
        "uptime_s": 12.3,
        "buses": {"l1": {**asdict(ModbusLineCounters()), "transactions": 3}},
        "devices": {"d1": {**asdict(counters), "response_counts": [1, 2], "online": True}},
        "mcp": {
            "sessions": 0,
            "rejected": 2,
            **asdict(McpDeviceCounters(frames_in=4)),
            "devices": {"pump": asdict(pump.counters)},
        },
        "sinks": {"up": {"published": 7, "queued": 1, "dropped": 0, "connected": True, "requests_dropped": 5}},
        "tasks": {"metrics": {"failures": 1, "down": False}},
        "modbus_server": None,
        "clock": None,  # no clock watch
    }
    server = ModbusServerSnapshot("127.0.0.1:5020", True, 2, 5, 1, 0, 40, 3, 1, 0, 0, {11: 2, 1: 4}, 0)
    served = metrics_payload(dataclasses.replace(snap, modbus_server=server))["modbus_server"]
    assert served == {**asdict(server), "exceptions": {"0x01": 4, "0x0B": 2}}  # JSON keys, as Modbus writes codes
    assert list(payload["devices"]["d1"]) == [*asdict(counters), "online"]  # type: ignore[index]
    with pytest.raises(RuntimeError, match="a bug in the MCP counters"):
        metrics_payload(take_snapshot(Parts()))  # type: ignore[arg-type]  # a part not read: no half payload


def test_health_reads_only_its_parts_and_a_part_not_read_cannot_pass_for_empty() -> None:
    snap = take_snapshot(Parts(), HEALTH_PARTS)  # type: ignore[arg-type]
    assert snap.unreadable == {}  # the MCP server, which fails to report, was not asked
    assert problems(snap) == ["modbus line l1: its task has ended"]
    with pytest.raises(LookupError, match="the mcp part was not read"):
        snap.require(MCP)
    with pytest.raises(LookupError):
        metrics_payload(snap)


def test_metrics_payload_carries_a_sparkplug_sinks_node_counters_and_its_host_state_as_json() -> None:
    """P/metrics: a Sparkplug sink's counters sit with its other ones; host_online is true/false, or null unheard."""
    from bridge.sparkplug.view import SparkplugStats

    heard = SinkSnapshot("scada", True, asdict(SparkplugStats(births=2, commands=3, host_online=True)), {}, 0, None, 0)
    unheard = SinkSnapshot("hist", False, asdict(SparkplugStats()), {}, 0, None, 0)
    snap = GatewaySnapshot("g", 100.0, 0, 1.0, False, mcp=None, sinks=(heard, unheard))
    sinks = metrics_payload(snap)["sinks"]
    assert sinks["scada"]["births"] == 2 and sinks["scada"]["commands"] == 3  # type: ignore[index]
    assert sinks["scada"]["host_online"] is True and sinks["hist"]["host_online"] is None  # type: ignore[index]
    assert json.loads(json.dumps(sinks))["hist"]["host_online"] is None  # JSON null, not a number


def test_the_clock_part_is_the_watchs_snapshot_none_without_a_watch_and_json_on_p_metrics() -> None:
    """take_snapshot reads a ClockWatch as `clock` (None without one); P/metrics carries it, null when unknown."""
    from gateway.clock import ClockSnapshot, ClockSource, ClockWatch, SyncState

    assert take_snapshot(Parts()).clock is None  # type: ignore[arg-type]
    parts = Parts()
    parts.mcp = SimpleNamespace(snapshot=lambda: None)
    now = {"wall": 100.0, "mono": 5.0}
    source = ClockSource(
        wall=lambda: now["wall"], monotonic=lambda: now["mono"], sync=lambda: SyncState(True, "kernel")
    )
    watch = ClockWatch(Supervisor(), source)
    watch.check()
    now.update(wall=3701.25, mono=6.0)  # 1 s passed, the wall clock moved 3601.25 s
    watch.check()
    parts.clock = watch  # type: ignore[attr-defined]
    snap = take_snapshot(parts)  # type: ignore[arg-type]
    assert snap.clock == ClockSnapshot(True, "kernel", 1, 3600.25, 3701250)
    clock = metrics_payload(snap)["clock"]
    assert clock == {"synchronized": True, "source": "kernel", "steps": 1, "last_step_s": 3600.25}
    unknown = dataclasses.replace(snap, clock=ClockSnapshot(None, "none", 0, None, None))
    assert json.loads(json.dumps(metrics_payload(unknown)["clock"])) == {
        "synchronized": None,
        "source": "none",
        "steps": 0,
        "last_step_s": None,
    }
