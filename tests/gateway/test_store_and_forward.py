"""Store-and-forward end to end: a whole gateway publishing to a real Mosquitto that goes away and comes back.

The upstream sink is a Mosquitto process (tests/mosquitto.py) without persistence: a subscriber only
sees what arrives while it is subscribed. After an outage `restore` starts the broker again and
subscribes *before* the gateway can reconnect, so that nothing the gateway replays is missed.

Data comes from a simulated Modbus slave polled every 100 ms (a ramp that changes at every poll)
and an MCP device (`Sender`) pushing DATA frames with strictly increasing `ts`. What the gateway
promised is known exactly: an ACKed MCP frame, and every telemetry message the router handed to
the sink's outbox (`Handed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import bridge.outbox_limits
import bridge.sink
import gateway.app
from bridge.outbox import Outbox
from drivers.mcp.client import McpClient
from drivers.mcp.codec import NackCode
from drivers.sim.modbus import ModbusSimulator
from gateway.app import Gateway
from gateway.config import load_config
from gateway.types import Message

import configs  # qualified: `device` and `simulator` name this file's own helpers
from configs import Section
from helpers import GatewayProcess, Received, Sender, Subscriber, free_port, now_ms, spool_rows, subscribed, until
from mosquitto import Mosquitto

ROOT = Path(__file__).resolve().parents[2]
P = "fieldgate/sf"
PUMP = f"{P}/pump-1/telemetry"
PLC = f"{P}/plc/telemetry"
FROZEN = 4242  # the ramp's last value, set while the broker is down

# --- building and running --------------------------------------------------------------------


@dataclass
class Setup:
    """A config file written for one test, and the MCP port it names."""

    path: Path
    mcp_port: int


def write_config(
    tmp_path: Path,
    url: str,
    *,
    modbus: bool = True,
    order: str = "live",
    replay_rate: float = 5000,
    spool: Section | None = None,
    tls: Section | None = None,
    state_dir: str = "./state",
) -> Setup:
    """The test gateway's config in tmp_path: sink `up` to `url`, MCP device pump-1, optionally the Modbus slave
    (a plc whose ramp changes at every 100 ms poll); `spool` and `tls` add keys to the sink's."""
    mcp_port = free_port()
    up_spool = {"commit_window": "50ms", "replay_rate": replay_rate, "order": order, **(spool or {})}
    plc = configs.device(
        "plc",
        1,
        poll="100ms",
        points=[
            configs.point("ramp", "holding", 0, "uint16"),
            configs.point("sp", "holding", 10, "uint16", writable=True),
        ],
    )
    ramp = {"wave": "ramp", "period": "100ms", "min": 0, "max": 60000}
    cfg = configs.config(
        id="sf",
        state_dir=state_dir,
        broker=configs.broker(enabled=False),
        northbound=[configs.sink("up", url, **(tls or {}), spool=up_spool)],
        mcp=configs.mcp(mcp_port, devices=[configs.mcp_device("pump-1")]),
        buses=[configs.line("line", "./ttyA", plc)] if modbus else None,
        simulator=configs.simulator(modbus=[configs.sim_line("./ttyA", configs.sim_slave(1, {"ramp": ramp}))])
        if modbus
        else None,
    )
    return Setup(configs.write(cfg, tmp_path), mcp_port)


@contextlib.asynccontextmanager
async def running(setup: Setup) -> AsyncIterator[Gateway]:
    """A gateway started in-process from the config file, stopped at the end."""
    gw = Gateway(load_config(setup.path))
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


@contextlib.asynccontextmanager
async def device(setup: Setup, **kwargs: Any) -> AsyncIterator[McpClient]:
    """MCP device pump-1 with a session up."""
    client = McpClient(
        "127.0.0.1",
        setup.mcp_port,
        "pump-1",
        "s3cret-token-0001",
        ack_timeout=3.0,
        backoff_start=0.1,
        backoff_max=0.5,
        **kwargs,
    )
    await client.start()
    try:
        assert await client.wait_connected(15), f"no MCP session: {client.last_error}"
        yield client
    finally:
        await client.stop()


def restore(mosquitto: Mosquitto) -> Subscriber:
    """Start the broker again and subscribe to everything before the gateway can publish to it.

    Not run in a thread on purpose: it blocks the event loop the gateway runs on, so the gateway
    cannot handle a CONNACK (let alone publish) before the subscriber is in place.
    """
    mosquitto.start()
    sub = Subscriber(mosquitto.port)
    sub.start()
    return sub


@pytest.fixture(autouse=True)
def prompt_reconnect(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process gateways retry their sink every 0.2 s (the real back-off is jittered up to 60 s)."""
    monkeypatch.setattr(bridge.sink, "backoff", lambda _attempt, **_: 0.2)


def simulator(gw: Gateway) -> ModbusSimulator:
    """The simulated slave line of a gateway."""
    assert gw.simulation is not None
    return next(iter(gw.simulation.simulators.values()))


# --- what was promised, what arrived ---------------------------------------------------------


class Handed:
    """Records every message the router hands to an outbox without waiting (polled telemetry, retained values)."""

    def __init__(self, outbox: Outbox, monkeypatch: pytest.MonkeyPatch) -> None:
        self.messages: list[Message] = []
        original = outbox.put

        def put(message: Message, *, awaited: bool = False) -> asyncio.Future[None]:
            if not awaited:
                self.messages.append(message)
            return original(message, awaited=awaited)

        monkeypatch.setattr(outbox, "put", put)

    def telemetry_ts(self, device: str) -> set[int]:
        """The ts of every telemetry message of `device` handed over so far."""
        return {json.loads(m.payload)["ts"] for m in self.messages if m.topic == f"{device}/telemetry"}

    def payloads(self, topic: str) -> list[object]:
        """The payloads handed over on a prefix-relative topic, parsed."""
        return [json.loads(m.payload) for m in self.messages if m.topic == topic]


def ts_of(messages: Iterable[Received], topic: str) -> list[int]:
    """The `ts` of each telemetry message on `topic`, in arrival order."""
    return [int(m.json()["ts"]) for m in messages if m.topic == topic]  # type: ignore[index]


def first_arrivals(ts: Iterable[int]) -> list[int]:
    """Each ts at its first arrival only: at-least-once means the window in flight at a drop may come twice."""
    seen: set[int] = set()
    out = []
    for t in ts:
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


def missing(expected: Iterable[int], messages: Iterable[Received], topic: str) -> set[int]:
    """The expected ts that have not arrived on `topic`."""
    return set(expected) - set(ts_of(messages, topic))


async def retained(port: int, topics: tuple[str, ...]) -> dict[str, object]:
    """What a subscriber that connects now is given on each topic (the retained values)."""
    marker = "test/marker"  # a topic the gateway neither reads nor writes
    async with subscribed(port, *topics, marker) as late:
        await late.wait_for(lambda ms: {m.topic for m in ms} >= set(topics), timeout=5)
        # A marker from this subscriber, after its SUBSCRIBEs: the broker hands out the retained set before it
        # takes the next packet, so a stale duplicate in that set would be here before the marker comes back.
        late.publish(marker, b"after")
        await late.wait_for(lambda ms: any(m.topic == marker for m in ms), timeout=5)
        got = [m for m in late.messages if m.topic != marker]
        assert all(m.retain for m in got), [m.topic for m in got if not m.retain]
        assert len(got) == len(topics), [(m.topic, m.payload) for m in got]
        return {m.topic: m.json() for m in got}


# --- 1. outage while Modbus and MCP data flow -------------------------------------------------


@dataclass
class Outage:
    """What one outage run saw."""

    sender: Sender
    handed: Handed
    before: list[Received]  # on the subscriber of the first broker run
    after: list[Received]  # on the subscriber connected when the broker came back
    outage_ms: tuple[int, int]  # wall-clock ms when the broker went down and came back
    backlog: int  # messages spooled when the broker came back
    retained: dict[str, object] = field(default_factory=dict)

    @property
    def all(self) -> list[Received]:
        """Everything received, in arrival order."""
        return self.before + self.after


async def outage(
    tmp_path: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch, *, order: str, replay_rate: float
) -> Outage:
    """Run the gateway with data flowing, stop the broker until ~250 messages are spooled, start it again, drain."""
    setup = write_config(tmp_path, mosquitto.url, order=order, replay_rate=replay_rate)
    before = Subscriber(mosquitto.port)
    await asyncio.to_thread(before.start)  # before the gateway: it sees everything published live
    async with running(setup) as gw, device(setup) as client:
        outbox = gw.outboxes[0]
        handed = Handed(outbox, monkeypatch)
        sender = Sender(client, interval=0.01, depth=16)
        sender.start()
        await before.wait_for(lambda ms: ts_of(ms, PUMP) and ts_of(ms, PLC), timeout=5)

        mosquitto.stop()
        before.stop()
        down = now_ms()
        await until(lambda: not gw.sinks[0].connected, 5, "the sink to notice the broker is gone")
        await until(lambda: outbox.backlog >= 250, 10, "a backlog of 250 spooled messages")
        # The ramp stops at a value that only the spool knows of when the broker returns.
        simulator(gw).set(1, "ramp", FROZEN)
        await until(lambda: FROZEN in handed.payloads("plc/ramp"), 5, "the frozen ramp value to be sampled")
        backlog = outbox.backlog

        sub = restore(mosquitto)
        try:
            up = now_ms()
            await sub.wait_for(lambda ms: any(t > up for t in ts_of(ms, PUMP)), timeout=5)
            await sender.stop()
            assert not sender.nacked, sender.nacked
            await until(lambda: outbox.backlog == 0 and len(outbox) == 0, 15, "the backlog to drain")
            plc = handed.telemetry_ts("plc")
            # No failure here: check_complete names what is missing if it never came.
            with contextlib.suppress(AssertionError):
                await until(
                    lambda: (
                        not missing(sender.acked, before.messages + sub.messages, PUMP)
                        and not missing(plc, before.messages + sub.messages, PLC)
                    ),
                    5,
                )
            result = Outage(sender, handed, list(before.messages), list(sub.messages), (down, up), backlog)
            result.retained = await retained(mosquitto.port, (f"{P}/pump-1/n", f"{P}/plc/ramp"))
            return result
        finally:
            sub.stop()


def check_complete(o: Outage) -> None:
    """Every ACKed MCP frame and every handed-over Modbus sample arrived, with its original ts and values."""
    assert len(o.sender.acked) >= 100 and len(o.handed.telemetry_ts("plc")) >= 15
    down, up = o.outage_ms
    held_back = [t for t in o.sender.acked if down < t < up]
    assert len(held_back) >= 30, "the outage did not hold MCP data back"
    assert not missing(o.sender.acked, o.all, PUMP)
    assert not missing(o.handed.telemetry_ts("plc"), o.all, PLC)
    # Replayed messages keep their content, not only their ts.
    for m in o.all:
        if m.topic == PUMP:
            body = m.json()
            assert body == {"ts": body["ts"], "values": {"n": o.sender.acked[body["ts"]]}}  # type: ignore[index]
    # Retained per-point topics end with the newest value, also where the newest was spooled.
    assert o.retained == {f"{P}/pump-1/n": o.sender.last_acked_n, f"{P}/plc/ramp": FROZEN}
    assert [m.json() for m in o.after if m.topic == f"{P}/plc/ramp"][-1] == FROZEN
    assert [m.json() for m in o.after if m.topic == f"{P}/pump-1/n"][-1] == o.sender.last_acked_n


async def test_outage_order_live_delivers_everything_and_live_data_overtakes_the_backlog(
    tmp_path: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 200 msg/s: the backlog of 250+ takes over a second to drain, fresh data must not wait for it.
    o = await outage(tmp_path, mosquitto, monkeypatch, order="live", replay_rate=200)
    check_complete(o)
    down, up = o.outage_ms
    arrival = {t: m.at for m in reversed(o.after) if m.topic == PUMP for t in [int(m.json()["ts"])]}  # type: ignore[index]
    backlog_done = max(at for t, at in arrival.items() if down < t < up)
    first_fresh = min(at for t, at in arrival.items() if t > up)
    assert first_fresh < backlog_done - 0.5, "live data waited behind the replay"


async def test_outage_order_strict_delivers_everything_in_ts_order_per_device(
    tmp_path: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    o = await outage(tmp_path, mosquitto, monkeypatch, order="strict", replay_rate=2000)
    check_complete(o)
    for topic in (PUMP, PLC):
        arrived = first_arrivals(ts_of(o.all, topic))
        assert arrived == sorted(arrived), f"{topic} out of ts order"
    # Strict: nothing sampled after the broker came back arrives before the backlog is through.
    down, up = o.outage_ms
    after = [int(m.json()["ts"]) for m in o.after if m.topic in (PUMP, PLC)]  # type: ignore[index]
    last_spooled = max(i for i, t in enumerate(after) if down < t < up)
    assert all(t < up for t in after[: last_spooled + 1])


# --- 2. kill -9 during an outage --------------------------------------------------------------


@contextlib.contextmanager
def gateway_process(setup: Setup, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`fieldgate run -c config` as its own process; SIGTERM (then SIGKILL) at the end if still alive."""
    with GatewayProcess(["run", "-c", str(setup.path)], log, cwd=ROOT, stop_timeout=10) as gw:
        yield gw.proc


async def test_kill_9_during_an_outage_loses_nothing_acked_or_spooled(tmp_path: Path, mosquitto: Mosquitto) -> None:
    mosquitto.stop()
    setup = write_config(tmp_path, mosquitto.url)
    log = tmp_path / "gateway.log"
    with gateway_process(setup, log) as proc:
        async with device(setup) as client:
            sender = Sender(client, interval=0.002, depth=16)
            sender.start()
            await until(lambda: len(sender.acked) >= 300, 15, "300 ACKed DATA frames")
            # kill -9 while frames are still coming in: whatever was ACKed up to here is committed.
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            await sender.stop(timeout=0)
        acked = set(sender.acked)
    assert not sender.nacked, sender.nacked

    rows = spool_rows(tmp_path / "state" / "spool" / "up.sqlite")
    spooled = {topic: {ts for t, ts in rows if t == topic} for topic in ("pump-1/telemetry", "plc/telemetry")}
    assert acked <= spooled["pump-1/telemetry"], "an ACKed frame is not in the spool"
    assert len(spooled["plc/telemetry"]) >= 5, "the polled device spooled nothing"

    assert (tmp_path / "ttyA").is_symlink()  # the killed gateway left its pty link behind; the restart copes
    mosquitto.start()
    async with subscribed(mosquitto.port) as sub:
        with gateway_process(setup, log):
            await sub.wait_for(
                lambda ms: (
                    not missing(spooled["pump-1/telemetry"], ms, PUMP)
                    and not missing(spooled["plc/telemetry"], ms, PLC)
                ),
                timeout=20,
            )
    assert "Traceback" not in log.read_text(errors="replace")


# --- 3. caps: reject, drop_oldest, max_age ----------------------------------------------------


async def test_reject_nacks_code_8_when_the_spool_is_full_and_the_gateway_serves_again(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    mosquitto.stop()
    setup = write_config(tmp_path, mosquitto.url, modbus=False, spool={"max_size": "2kB", "when_full": "reject"})
    async with running(setup) as gw, device(setup) as client:
        sender = Sender(client)
        for _ in range(100):
            await sender.send()
            if sender.nacked:
                break
        assert sender.nacked, "a 2 kB spool took 100 frames"
        assert len(sender.acked) >= 5, "the spool refused before it was full"
        # Full stays full: the next frame is refused as well, and the session stays up.
        await sender.send()
        assert len(sender.nacked) == 2 and client.connected
        assert {n.code for n in sender.nacked.values()} == {NackCode.OVERLOADED}
        assert all("full" in n.reason for n in sender.nacked.values()), [n.reason for n in sender.nacked.values()]
        assert gw.metrics()["sinks"]["up"]["refused"] >= 2  # type: ignore[index]

        sub = restore(mosquitto)
        try:
            outbox = gw.outboxes[0]
            await until(lambda: outbox.backlog == 0, 10, "the backlog to drain")
            fresh = await sender.send()
            assert fresh in sender.acked
            await sub.wait_for(lambda ms: not missing(sender.acked, ms, PUMP), timeout=5)
            assert not set(ts_of(sub.messages, PUMP)) & set(sender.nacked), "a NACKed frame was published"
        finally:
            sub.stop()


METRICS_LATENCY = 0.1  # seconds a metrics message built before a moment may still take to arrive


async def test_drop_oldest_drops_the_oldest_and_p_metrics_counts_them(
    tmp_path: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway.app, "METRICS_INTERVAL", 0.3)
    mosquitto.stop()
    setup = write_config(tmp_path, mosquitto.url, modbus=False, spool={"max_size": "4kB"})
    async with running(setup) as gw, device(setup) as client:
        sender = Sender(client)
        for _ in range(60):
            await sender.send()
        assert len(sender.acked) == 60, sender.nacked  # drop_oldest makes room, it does not refuse

        sub = restore(mosquitto)
        try:
            await until(lambda: gw.outboxes[0].backlog == 0, 10, "the backlog to drain")
            # Metrics published during the replay (the subscriber was there first) still count a spool.
            drained = time.monotonic() + METRICS_LATENCY

            def live_metrics(ms: list[Received]) -> dict[str, Any] | None:
                for m in ms:
                    if m.topic == f"{P}/metrics" and m.at > drained:
                        up = m.json()["sinks"]["up"]  # type: ignore[index]
                        if up["connected"] and up["dropped"] > 0:
                            return up  # type: ignore[no-any-return]
                return None

            up = await sub.wait_for(live_metrics, timeout=5)
            assert isinstance(up, dict)
        finally:
            sub.stop()
    acked = sorted(sender.acked)
    arrived = set(ts_of(sub.messages, PUMP))
    kept = [t for t in acked if t in arrived]
    assert kept and len(kept) < len(acked), "nothing was dropped from a 4 kB spool"
    assert kept == acked[len(acked) - len(kept) :], "what arrived is not the newest part"
    assert up["dropped"] >= len(acked) - len(kept)
    assert up["spool_messages"] == 0 and up["spool_bytes"] == 0


async def test_max_age_drops_what_waited_too_long_and_counts_it(
    tmp_path: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bridge.outbox_limits, "HOUSEKEEPING_INTERVAL", 0.1)
    mosquitto.stop()
    setup = write_config(tmp_path, mosquitto.url, modbus=False, spool={"max_age": "1s"})
    async with running(setup) as gw, device(setup) as client:
        outbox = gw.outboxes[0]
        sender = Sender(client, depth=16)
        old = await sender.burst(5)
        assert set(old) <= set(sender.acked)
        # 5 telemetry, the newest retained value, the device's status (older retained values were coalesced).
        await until(lambda: outbox.snapshot().dropped >= 7, 5, "the old messages to expire")
        spooled = outbox.stats.spooled
        assert spooled == 7 and outbox.snapshot().dropped == spooled and outbox.snapshot().spool_messages == 0
        assert gw.metrics()["sinks"]["up"]["dropped"] == spooled  # type: ignore[index]

        young = await sender.burst(5)
        assert set(young) <= set(sender.acked)
        sub = restore(mosquitto)
        try:
            await sub.wait_for(lambda ms: not missing(young, ms, PUMP), timeout=5)
            await until(lambda: outbox.backlog == 0, 5, "the backlog to drain")
        finally:
            sub.stop()
        assert not set(ts_of(sub.messages, PUMP)) & set(old), "an expired message was published"
        assert outbox.snapshot().dropped == spooled


# --- 4. a full disk ---------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small tmpfs mounted on path; skips only where mounting is not permitted (not root, no CAP_SYS_ADMIN)."""
    path.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if res.returncode != 0:
        err = res.stderr.decode().strip()
        if os.geteuid() != 0 or "permission denied" in err.lower() or "not permitted" in err.lower():
            pytest.skip(f"mounting a tmpfs is not permitted here (EPERM: needs root/CAP_SYS_ADMIN): {err}")
        pytest.fail(f"mount -t tmpfs failed: {err}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)  # a file left open by a failed stop


@contextlib.asynccontextmanager
async def full_disk(tmp_path: Path, mosquitto: Mosquitto) -> AsyncIterator[tuple[Gateway, Sender, Path]]:
    """A gateway whose state dir is a 1 MB tmpfs, the broker down, and MCP DATA sent until the disk is full."""
    mosquitto.stop()
    with tmpfs(tmp_path / "disk", "1m") as disk:
        spool = {"min_free": 0}  # no floor: the filesystem itself runs out
        setup = write_config(tmp_path, mosquitto.url, modbus=False, state_dir=str(disk), spool=spool)
        async with running(setup) as gw, device(setup) as client:
            st = os.statvfs(disk)
            (disk / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 64 * 1024))
            sender = Sender(client, filler="x" * 1000)  # within mcp.max_string (1 KiB)
            for _ in range(100):
                await sender.send()
                if sender.nacked:
                    break
            assert sender.nacked, "100 frames of 1 kB fitted in 64 kB"
            assert len(sender.acked) >= 3
            [nack] = sender.nacked.values()
            assert nack.code == NackCode.OVERLOADED and "full" in nack.reason, nack
            assert client.connected
            yield gw, sender, disk


async def test_a_full_disk_nacks_8_and_the_spool_takes_messages_again_once_there_is_room(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    async with full_disk(tmp_path, mosquitto) as (gw, sender, disk):
        (disk / "filler").unlink()
        again = await sender.send()
        assert again in sender.acked, sender.nacked
        sub = restore(mosquitto)
        try:
            await sub.wait_for(lambda ms: not missing(sender.acked, ms, PUMP), timeout=5)
            await until(lambda: gw.outboxes[0].backlog == 0, 5, "the spool to empty")
        finally:
            sub.stop()
        assert not set(ts_of(sub.messages, PUMP)) & set(sender.nacked), "a NACKed frame was published"


async def test_the_backlog_drains_after_the_broker_returns_to_a_full_disk(tmp_path: Path, mosquitto: Mosquitto) -> None:
    async with full_disk(tmp_path, mosquitto) as (gw, sender, disk):
        sub = restore(mosquitto)
        try:
            await until(lambda: gw.sinks[0].connected, 5, "the sink to reconnect")
            fresh = await sender.send()  # the live path needs no disk
            assert fresh in sender.acked, sender.nacked
            await sub.wait_for(lambda ms: not missing(sender.acked, ms, PUMP), timeout=5)
            # Delivered but not yet removed from the full spool; with room again the spool lets go of them.
            (disk / "filler").unlink()
            await until(lambda: gw.outboxes[0].backlog == 0, 3, "the spool to empty")
        finally:
            sub.stop()


async def test_the_free_disk_floor_nacks_8_without_filling_the_disk(tmp_path: Path, mosquitto: Mosquitto) -> None:
    mosquitto.stop()
    st = os.statvfs(tmp_path)
    floor = st.f_bavail * st.f_frsize + 2**30  # more than is free: the floor is already reached
    setup = write_config(tmp_path, mosquitto.url, modbus=False, spool={"min_free": floor})
    async with running(setup) as gw, device(setup) as client:
        sender = Sender(client)
        await sender.send()
        [nack] = sender.nacked.values()
        assert nack.code == NackCode.OVERLOADED and "floor" in nack.reason, nack
        assert gw.metrics()["sinks"]["up"]["refused"] >= 1  # type: ignore[index]
        sub = restore(mosquitto)
        try:
            await until(lambda: gw.sinks[0].connected, 5, "the sink to reconnect")
            fresh = await sender.send()
            assert fresh in sender.acked, sender.nacked
            await sub.wait_for(lambda ms: fresh in ts_of(ms, PUMP), timeout=5)
        finally:
            sub.stop()


# --- 5. TLS -----------------------------------------------------------------------------------


@pytest.mark.tls
async def test_tls_with_a_client_certificate_to_an_upstream_mosquitto(tmp_path: Path, mosquitto_tls: Mosquitto) -> None:
    tls = mosquitto_tls.tls
    assert tls is not None
    keys = {"ca": str(tls.ca), "cert": str(tls.client_cert), "key": str(tls.client_key)}
    setup = write_config(tmp_path, mosquitto_tls.url, tls=keys)
    sub = Subscriber(mosquitto_tls.port)
    sub.client.tls_set_context(tls.client_context())
    await asyncio.to_thread(sub.start)
    try:
        async with running(setup), device(setup) as client:
            sent = await Sender(client).burst(3)
            await sub.wait_for(lambda ms: not missing(sent, ms, PUMP) and ts_of(ms, PLC), timeout=5)
            await sub.wait_for(lambda ms: any(m.topic == f"{P}/status" and m.payload == b"online" for m in ms))
    finally:
        await asyncio.to_thread(sub.stop)


# --- 6. set and cmd from the upstream broker ----------------------------------------------------


async def test_set_and_cmd_from_an_upstream_broker_are_answered_there(tmp_path: Path, mosquitto: Mosquitto) -> None:
    async def on_command(name: str, args: dict[str, Any]) -> Any:
        if name != "echo":
            raise ValueError(f"no command {name}")
        return args

    setup = write_config(tmp_path, mosquitto.url)
    async with subscribed(mosquitto.port) as sub, running(setup) as gw, device(setup, on_command=on_command):
        await sub.wait_for(lambda ms: any(m.topic == f"{P}/plc/status" and m.payload == b"online" for m in ms))
        r = await sub.request(f"{P}/plc/set/sp", "123", timeout=5)
        assert r.json() == {"ok": True, "value": 123, "error": None}
        assert simulator(gw).get(1, "sp") == 123
        r = await sub.request(f"{P}/plc/set/ramp", "5", timeout=5)
        assert r.json() == {"ok": False, "value": None, "error": "plc.ramp is read-only"}
        r = await sub.request(f"{P}/pump-1/cmd", json.dumps({"name": "echo", "args": {"x": 1}, "id": "c1"}), timeout=5)
        assert r.json() == {"id": "c1", "ok": True, "result": {"x": 1}, "error": None}
        await sub.wait_for(lambda ms: any(m.topic == f"{P}/plc/sp" and m.json() == 123 for m in ms), timeout=5)


# --- bugs found on the way ----------------------------------------------------------------------


async def test_a_simulator_link_left_by_a_killed_gateway_does_not_stop_the_restart(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    master, slave = os.openpty()
    (tmp_path / "ttyA").symlink_to(os.ttyname(slave))  # as a gateway killed with its line open leaves it
    os.close(master)
    os.close(slave)
    setup = write_config(tmp_path, mosquitto.url)
    async with subscribed(mosquitto.port) as sub, running(setup):
        await sub.wait_for(lambda ms: ts_of(ms, PLC), timeout=5)
