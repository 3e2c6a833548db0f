"""SIGHUP reload on real parts: simulated lines, the embedded broker, Mosquitto upstream, a gateway subprocess."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge.spool import SQLiteSpool
from drivers.mcp.codec import Frame, FrameType
from gateway.app import Gateway
from gateway.config import Config, load_config, parse_config
from gateway.reload import diff

from configs import (
    Section,
    broker,
    config,
    device,
    line,
    mcp,
    mcp_device,
    point,
    sim_line,
    sim_slave,
    simulator,
    sink,
    text,
    write,
)
from helpers import GatewayProcess, Received, Subscriber, free_port, now_ms, subscribed
from mcp_peer import RawPeer
from mosquitto import Mosquitto

ROOT = Path(__file__).resolve().parents[2]


def boiler(*, unit: int = 1, aux: Section | None = None) -> Section:
    """Unit 1 of line1: `temp` and `aux` (or the point given), polled every 100 ms, read whole every 200 ms."""
    points = [point("temp", "holding", 0), aux or point("aux", "holding", 3)]
    return device("boiler", unit, poll="100ms", full_every="200ms", points=points)


BOILER = boiler()
PUMP = device("pump", 2, poll="100ms", points=[point("level", "holding", 5)])
METER = device("meter", 1, poll="100ms", full_every="200ms", points=[point("kwh", "holding", 0)])


PUMP_STATUS = "fieldgate/t1/pump/status"


async def marker(sub: Subscriber, topic: str) -> None:
    """Publish a marker on `topic` from `sub` and wait for it to come back: the broker handles a client's
    packets in order, so every retained message its earlier SUBSCRIBE was given has been delivered by then."""
    payload = f"marker-{time.monotonic_ns()}".encode()
    sub.publish(topic, payload)
    await sub.wait_for(lambda ms: any(m.topic == topic and m.payload == payload for m in ms))


def outbox_of(gw: Gateway, sink: str) -> Any:
    """The outbox of the sink of that name, or None."""
    return next((o for o in gw.outboxes if o.sink.name == sink), None)


def reload_config(
    port: int,
    line1: list[Section],
    *,
    line2: tuple[Section, ...] = (METER,),
    sinks: tuple[Section, ...] = (sink("local"),),
    gateway_id: str = "t1",
    mcp: Section | None = None,
) -> Section:
    """A gateway with two simulated lines (units 1 and 2 on ttyA, unit 1 on ttyB); the simulator never changes."""
    return config(
        id=gateway_id,
        broker=broker(port),
        northbound=list(sinks),
        buses=[line("line1", "./ttyA", *line1), line("line2", "./ttyB", *line2)],
        mcp=mcp,
        simulator=simulator(
            modbus=[
                sim_line("./ttyA", sim_slave(1, {"temp": {"value": 21}}), sim_slave(2)),
                sim_line("./ttyB", sim_slave(1, {"kwh": {"value": 42}})),
            ]
        ),
    )


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[Gateway, Subscriber, Path, int]]:
    """A running gateway with `boiler` on line1 and `meter` on line2, a subscriber, its config path and broker port."""
    port = free_port()
    path = tmp_path / "config.yaml"
    write(reload_config(port, [BOILER]), path)
    gw = Gateway(load_config(path))
    await gw.start()
    try:
        async with subscribed(port) as sub:
            await sub.next_on("fieldgate/t1/boiler/telemetry")
            yield gw, sub, path, port
    finally:
        await gw.stop()


async def test_a_device_added_publishes_and_the_other_line_runs_on_untouched(
    setup: tuple[Gateway, Subscriber, Path, int], caplog: pytest.LogCaptureFixture
) -> None:
    gw, sub, path, port = setup
    line1, line2 = gw.buses
    await sub.next_on("fieldgate/t1/meter/telemetry")
    before = line2.stats.transactions
    assert sub.on("fieldgate/t1/pump/telemetry") == []
    write(reload_config(port, [BOILER, PUMP]), path)
    caplog.set_level(logging.INFO, logger="gateway.app")
    assert await gw.reload() is True
    msg = await sub.next_on("fieldgate/t1/pump/telemetry")
    assert msg.json()["values"] == {"level": 0}  # unit 2 is simulated with no points: zeros
    assert "reload: +1 device (pump), bus line1 restarted" in caplog.text
    # line1 changed: a new bus; line2 did not: the same object, its counters carrying on from where they were.
    assert gw.buses[0] is not line1 and not line1.running and gw.buses[0].running
    assert gw.buses[1] is line2 and line2.running
    after = time.monotonic()
    await sub.next_on("fieldgate/t1/meter/telemetry", after=after)
    assert line2.stats.transactions > before
    # The boiler keeps publishing on the rebuilt line, and writes go through the new bus.
    await sub.next_on("fieldgate/t1/boiler/telemetry", after=after)
    assert gw.router is not None and gw.router.devices["pump"].profile.writer == gw.buses[0].write


async def test_a_device_removed_stops_publishing_goes_offline_and_its_values_are_cleared(
    setup: tuple[Gateway, Subscriber, Path, int],
) -> None:
    gw, sub, path, port = setup
    write(reload_config(port, [BOILER, PUMP]), path)
    assert await gw.reload()
    await sub.wait_for(lambda ms: any(m.topic == "fieldgate/t1/pump/status" and m.payload == b"online" for m in ms))
    await sub.next_on("fieldgate/t1/pump/level")

    async with subscribed(port, "fieldgate/t1/pump/#") as early:
        await early.next_on("fieldgate/t1/pump/level")  # retained: what the removal must clear
    write(reload_config(port, [BOILER]), path)
    assert await gw.reload()

    def offline_at(ms: list[Received]) -> int | None:
        return next((i for i, m in enumerate(ms) if m.topic == PUMP_STATUS and m.payload == b"offline"), None)

    cut = await sub.wait_for(lambda ms: offline_at(ms))
    assert isinstance(cut, int)
    # Three boiler telemetries after the `offline` (one every 200 ms, on the line the pump was on): a full poll
    # cycle of that line lies between, and a pump still polled would have published in it.
    await sub.wait_for(lambda ms: sum(m.topic == "fieldgate/t1/boiler/telemetry" for m in ms[cut + 1 :]) >= 3)
    # After it only the clearing of the pump's retained values (empty payloads), no new value or telemetry.
    assert [m for m in sub.messages[cut + 1 :] if m.topic.startswith("fieldgate/t1/pump/") and m.payload] == []
    assert gw.router is not None and "pump" not in gw.router.devices
    # A newcomer sees the retained `offline` and no stale value of a point nobody polls any more.
    async with subscribed(port, "fieldgate/t1/pump/#") as late:
        await late.wait_for(lambda ms: any(m.topic == PUMP_STATUS for m in ms))
        await marker(late, "fieldgate/t1/pump/test-marker")
        # (amqtt hands a new subscription retained messages beyond its filter: look at ours only.)
        pump = {
            (m.topic, m.payload, m.retain)
            for m in late.messages
            if m.topic.startswith("fieldgate/t1/pump/") and m.topic != "fieldgate/t1/pump/test-marker"
        }
        assert pump == {("fieldgate/t1/pump/status", b"offline", True)}


async def test_a_changed_point_is_published_and_the_old_one_cleared(
    setup: tuple[Gateway, Subscriber, Path, int],
) -> None:
    gw, sub, path, port = setup
    async with subscribed(port, "fieldgate/t1/boiler/+") as early:
        await early.next_on("fieldgate/t1/boiler/aux")  # retained: what the change must clear
    changed = boiler(aux=point("aux2", "holding", 7))
    write(reload_config(port, [changed]), path)
    assert await gw.reload()
    msg = await sub.next_on("fieldgate/t1/boiler/aux2")
    assert msg.json() == 0
    tele = await sub.next_on("fieldgate/t1/boiler/telemetry", after=time.monotonic())
    assert tele.json()["values"] == {"temp": 21, "aux2": 0}  # type: ignore[index]  # the snapshot forgot aux
    async with subscribed(port, "fieldgate/t1/boiler/+") as late:
        await late.next_on("fieldgate/t1/boiler/aux2")
        await late.next_on("fieldgate/t1/boiler/temp")  # kept: the point did not change
        await marker(late, "fieldgate/t1/boiler/test-marker")
        assert late.on("fieldgate/t1/boiler/aux") == []


async def test_a_bad_file_is_refused_and_the_gateway_runs_on(
    setup: tuple[Gateway, Subscriber, Path, int], caplog: pytest.LogCaptureFixture
) -> None:
    gw, sub, path, port = setup
    cfg, buses = gw.cfg, list(gw.buses)
    bad = reload_config(port, [boiler(unit=300), PUMP])
    bad["modbus"]["buses"][0]["parity"] = "X"
    write(bad, path)
    caplog.set_level(logging.INFO, logger="gateway.app")
    assert await gw.reload() is False
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("line1" not in e and ".unit:" in e and "300" in e for e in errors), errors
    assert any(".parity:" in e for e in errors), errors
    assert errors[-1] == "config reload refused; still running the previous config"
    assert gw.cfg is cfg and gw.buses == buses and all(b.running for b in buses)
    await sub.next_on("fieldgate/t1/boiler/telemetry", after=time.monotonic())
    assert gw.router is not None and "pump" not in gw.router.devices

    # A valid file with a change only a restart can make is refused the same way, naming the key.
    caplog.clear()
    write(reload_config(port, [BOILER, PUMP], gateway_id="t2"), path)
    assert await gw.reload() is False
    assert "gateway.id changed, and that needs a restart" in caplog.text
    assert "config reload refused; still running the previous config" in caplog.text
    assert gw.cfg is cfg and gw.router is not None and "pump" not in gw.router.devices


async def test_a_sink_removed_keeps_its_spool_and_sends_it_when_added_back(
    tmp_path: Path, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    path = tmp_path / "config.yaml"
    up = sink("up", mosquitto.url, keepalive="5s")
    write(reload_config(port, [BOILER], sinks=(sink("local"), up)), path)
    mosquitto.stop()
    caplog.set_level(logging.INFO, logger="gateway.app")
    gw = Gateway(load_config(path))
    await gw.start()
    try:
        # Upstream away: the sink spools.
        deadline = time.monotonic() + 10
        while outbox_of(gw, "up").backlog < 5:
            assert time.monotonic() < deadline, outbox_of(gw, "up").snapshot()
            await asyncio.sleep(0.1)

        # Changed (keepalive): rebuilt on the same spool file, which it takes over whole.
        held = outbox_of(gw, "up").backlog
        old = outbox_of(gw, "up")
        write(reload_config(port, [BOILER], sinks=(sink("local"), up | {"keepalive": "6s"})), path)
        assert await gw.reload()
        assert outbox_of(gw, "up") is not old and old.health() == "stopped"
        assert outbox_of(gw, "up").backlog >= held
        assert len(gw.sinks) == len(gw.outboxes) == 2

        # Removed: its outbox stops, the spool stays on disk with what it holds.
        write(reload_config(port, [BOILER]), path)
        removed_ms = time.time() * 1000
        assert await gw.reload()
        assert outbox_of(gw, "up") is None and [s.name for s in gw.sinks] == ["local"]
        assert "sink up removed: its spool" in caplog.text and "is kept with" in caplog.text
        spool_file = tmp_path / "state" / "spool" / "up.sqlite"
        spool = SQLiteSpool(spool_file)
        try:
            kept = spool.stats().count
        finally:
            spool.close()
        assert kept >= held

        # Back, with its broker up: the new sink sends what was spooled before the removal.
        mosquitto.start()
        async with subscribed(mosquitto.port, "fieldgate/t1/boiler/telemetry") as upstream:
            write(reload_config(port, [BOILER], sinks=(sink("local"), up)), path)
            assert await gw.reload()

            def spooled(ms: list) -> bool:  # type: ignore[type-arg]
                return any(m.json()["ts"] < removed_ms for m in ms)

            await upstream.wait_for(spooled, timeout=20)
        deadline = time.monotonic() + 20
        while outbox_of(gw, "up").backlog:
            assert time.monotonic() < deadline, outbox_of(gw, "up").snapshot()
            await asyncio.sleep(0.1)
    finally:
        await gw.stop()


async def test_mcp_devices_removed_or_rekeyed_lose_their_session(tmp_path: Path) -> None:
    port, mcp_port = free_port(), free_port()
    path = tmp_path / "config.yaml"

    both = [mcp_device("pump-1"), mcp_device("pump-2", token="other-token-00002")]
    write(reload_config(port, [BOILER], mcp=mcp(mcp_port, devices=both)), path)
    gw = Gateway(load_config(path))
    await gw.start()
    try:
        peers = {}
        for device, token in (("pump-1", "s3cret-token-0001"), ("pump-2", "other-token-00002")):
            peers[device] = RawPeer(*await asyncio.open_connection("127.0.0.1", mcp_port))
            assert (await peers[device].hello(device_id=device, token=token)).type == FrameType.ACK
        # pump-1 removed, pump-2 keeps its place but gets a new token, pump-3 is new.
        rekeyed = [mcp_device("pump-2", token="new-token-0000003"), mcp_device("pump-3", token="t3-token-00000004")]
        write(reload_config(port, [BOILER], mcp=mcp(mcp_port, devices=rekeyed)), path)
        assert await gw.reload()
        assert await peers["pump-1"].closed() and await peers["pump-2"].closed()
        assert gw.router is not None and set(gw.router.devices) == {"boiler", "meter", "pump-2", "pump-3"}
        for device, token, ok in (
            ("pump-1", "s3cret-token-0001", False),
            ("pump-2", "other-token-00002", False),
            ("pump-2", "new-token-0000003", True),
        ):
            peer = RawPeer(*await asyncio.open_connection("127.0.0.1", mcp_port))
            answer = await peer.hello(device_id=device, token=token)
            assert (answer.type == FrameType.ACK) is ok, (device, token, answer)
            peer.close()
    finally:
        await gw.stop()


async def test_mcp_data_sent_while_a_sink_is_swapped_is_acked_and_delivered(tmp_path: Path) -> None:
    port, mcp_port = free_port(), free_port()
    path = tmp_path / "config.yaml"
    server = mcp(mcp_port, devices=[mcp_device("pump-1")])
    write(reload_config(port, [BOILER], mcp=server), path)
    gw = Gateway(load_config(path))
    await gw.start()
    try:
        async with subscribed(port, "fieldgate/t1/pump-1/telemetry") as sub:
            peer = RawPeer(*await asyncio.open_connection("127.0.0.1", mcp_port))
            assert (await peer.hello()).type == FrameType.ACK
            reloaded = asyncio.Event()

            async def send() -> int:
                # A frame every loop turn from before the reload until after it: some land mid-swap.
                seq = 1
                while not reloaded.is_set() or seq < 50:
                    seq += 1
                    body = {"ts": now_ms(), "values": {"n": seq}}
                    await peer.send(Frame.json(FrameType.DATA, seq, body))
                    await asyncio.sleep(0)
                return seq - 1

            sending = asyncio.create_task(send())
            await asyncio.sleep(0.02)
            # The only sink changes: between its old outbox and the new one, DATA must wait, not fail.
            write(reload_config(port, [BOILER], sinks=(sink("local", keepalive="20s"),), mcp=server), path)
            assert await gw.reload()
            reloaded.set()
            count = await sending
            answers = [await peer.recv() for _ in range(count)]
            assert [(a.type, a.seq) for a in answers] == [(FrameType.ACK, seq) for seq in range(2, count + 2)]
            await sub.wait_for(lambda ms: len({m.json()["values"]["n"] for m in ms}) == count, timeout=15)
            peer.close()
    finally:
        await gw.stop()


async def test_systemd_hears_reloading_then_ready_and_the_watchdog_follows_the_new_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    path = tmp_path / "config.yaml"
    write(reload_config(port, [BOILER]), path)
    address = tmp_path / "notify.sock"
    monkeypatch.setenv("NOTIFY_SOCKET", str(address))
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(address))
        notify.settimeout(5)
        gw = Gateway(load_config(path))
        await gw.start()
        try:
            assert b"READY=1" in notify.recv(4096).splitlines()
            old_line1 = gw.buses[0]
            write(reload_config(port, [BOILER, PUMP]), path)
            assert await gw.reload()
            reloading = dict(line.split("=", 1) for line in notify.recv(4096).decode().splitlines())
            assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
            assert b"READY=1" in notify.recv(4096).splitlines()
            # The stopped line never moves again: were it still watched, the watchdog would call it stuck.
            old_line1.alive_at -= 1000
            assert gw.systemd.watchdog is not None
            assert gw.systemd.watchdog.check(time.monotonic(), 0.0) is None
            gw.buses[0].alive_at -= 1000
            assert "line1" in (gw.systemd.watchdog.check(time.monotonic(), 0.0) or "")
            gw.buses[0].alive_at += 1000
            # A refused reload also ends in READY=1: systemd must not wait for one that never comes.
            path.write_text("broker: {enabled: maybe}\n")
            assert await gw.reload() is False
            assert b"RELOADING=1" in notify.recv(4096).splitlines()
            assert b"READY=1" in notify.recv(4096).splitlines()
        finally:
            await gw.stop()


def test_the_diff_names_what_changed_and_templates_follow_their_devices() -> None:

    def base(addr: int, *, up: bool = True, state_dir: str = "/tmp/x", http: str | None = None) -> Config:
        lines = [
            line("l1", "/dev/a", device("x", 1, template="t"), baudrate=None, parity=None),
            line("l2", "/dev/b", device("y", 1, points=[point("b", "coil", 0)]), baudrate=None, parity=None),
        ]
        cfg = config(
            id="d",
            state_dir=state_dir,
            http=http,
            northbound=[sink("local"), sink("up", "mqtt://h")] if up else [sink("local")],
            templates={"t": [point("a", "holding", addr)]},
            buses=lines,
        )
        return parse_config(text(cfg)).config

    old = base(0)
    new = base(1, up=False)
    d = diff(old, new)
    assert d.restart_needed == []
    assert (d.buses.changed, d.devices.changed, d.sinks.removed) == (["l1"], ["x"], ["up"])
    assert d.summary() == "~1 device (x), -1 sink (up), bus l1 restarted"
    assert diff(old, old).summary() == "nothing changed"
    moved = base(0, state_dir="/tmp/y", http=":1")
    assert diff(old, moved).restart_needed == ["gateway.state_dir", "gateway.http"]


async def test_sighup_to_a_running_gateway_reloads_it(tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "config.yaml"
    write(reload_config(port, [BOILER]), path)
    log_path = tmp_path / "stderr.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    gw = GatewayProcess(["run", "-c", str(path)], log_path, cwd=tmp_path, env=env)
    proc, logged = gw.proc, gw.logged
    try:
        await logged("fieldgate t1 up")
        async with subscribed(port) as sub:
            await sub.next_on("fieldgate/t1/boiler/telemetry", timeout=20)
            write(reload_config(port, [BOILER, PUMP]), path)
            proc.send_signal(signal.SIGHUP)
            await logged("reload: +1 device (pump), bus line1 restarted")
            await sub.next_on("fieldgate/t1/pump/telemetry")

            path.write_text("modbus: {buses: [{name: line1}]}\n")
            proc.send_signal(signal.SIGHUP)
            await logged("config reload refused; still running the previous config")
            assert "modbus.buses[0].port: is required but missing" in log_path.read_text(errors="replace")
            await sub.next_on("fieldgate/t1/boiler/telemetry", after=time.monotonic())
            assert proc.poll() is None
    finally:
        code = gw.stop()
    assert code == 0, log_path.read_text(errors="replace")
