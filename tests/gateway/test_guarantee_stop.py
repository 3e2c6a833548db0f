"""README "Security model": "a stop flushes every sink": what was handed to a sink and not acknowledged by its broker
when the gateway stops is in that sink's spool once `stop()` returns. A real gateway and a frozen Mosquitto."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from pathlib import Path

from gateway.app import Gateway
from gateway.config import load_config
from gateway.types import Message

from configs import Section, broker, config, device, line, point, sim_line, sim_slave, simulator, sink, write
from helpers import record_queued
from mosquitto import Mosquitto


# No embedded broker: its stop takes time of its own, in which a background commit could still save the spool.
def stop_config(url: str) -> Section:
    """A plc ramping every 50 ms, published to one sink: the broker at `url`."""
    plc = device("plc", 1, poll="50ms", points=[point("ramp", "holding", 0, "uint16")])
    ramp = {"wave": "ramp", "period": "100ms", "min": 0, "max": 60000}
    return config(
        id="st",
        broker=broker(enabled=False),
        northbound=[sink("up", url)],
        buses=[line("line", "./ttyA", plc)],
        simulator=simulator(modbus=[sim_line("./ttyA", sim_slave(1, {"ramp": ramp}))]),
    )


def spooled(path: Path) -> set[tuple[str, bytes]]:
    """(topic, payload) of every message in a spool file, read as it lies on disk."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {(t, bytes(p)) for t, p in db.execute("SELECT topic, payload FROM messages")}
    finally:
        db.close()


async def test_what_a_frozen_broker_never_acknowledged_is_in_the_spool_when_stop_returns(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    path = write(stop_config(mosquitto.url), tmp_path)
    gw = Gateway(load_config(path))
    await gw.start()
    frozen = False
    try:
        up = gw.outboxes[0]
        deadline = time.monotonic() + 20
        while not (up.sink.connected and up.stats.live > 5):
            assert time.monotonic() < deadline, "the sink never got going"
            await asyncio.sleep(0.05)
        queued: list[Message] = record_queued(up)
        # Frozen, not gone: the connection stays up and nothing is acknowledged any more.
        assert mosquitto.pid is not None
        os.kill(mosquitto.pid, signal.SIGSTOP)
        frozen = True
        deadline = time.monotonic() + 20
        while len([m for m in queued if not m.retain]) < 5:
            assert time.monotonic() < deadline, f"only {len(queued)} messages queued for the frozen broker"
            await asyncio.sleep(0.05)
        await gw.stop()
        on_disk = spooled(gw.cfg.spool_path(gw.cfg.northbound[0]))
    finally:
        if frozen and mosquitto.pid is not None:
            os.kill(mosquitto.pid, signal.SIGCONT)
    telemetry = [m for m in queued if not m.retain]
    missing = [m.topic for m in telemetry if (m.topic, m.payload) not in on_disk]
    assert missing == [], f"{len(missing)} of {len(telemetry)} messages queued for the frozen broker not spooled"
    assert ("plc/status", b"offline") in on_disk  # the device's `offline` on the way out waits there too
