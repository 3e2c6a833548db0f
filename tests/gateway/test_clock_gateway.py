"""A `fieldgate run` process whose clock is set while its broker is away (issue 16, clocks), end to end: a real
Mosquitto, a relay to cut the gateway's way to it, a simulated Modbus slave the gateway stamps the samples of.

The gateway's clock is faked through FIELDGATE_TEST_CLOCK (gateway/clock.py `FileClock`: the machine's wall clock
moved by the file's offset, and the file's sync state); the machine's clock is never touched.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from gateway.clock import TEST_CLOCK_ENV

from configs import broker, config, device, line, point, sim_line, sim_slave, simulator, sink, write
from helpers import GatewayProcess, Received, TcpRelay, free_port, spool_rows, subscribed, until
from mosquitto import Mosquitto

TEN_YEARS = 10 * 365 * 86400.0
TOPIC = "fieldgate/ck/plc/telemetry"


def set_clock(path: Path, offset: float, synchronized: bool | None) -> None:
    """What the gateway's faked clock reads from now on (replaced whole: never read half written)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"offset": offset, "synchronized": synchronized}))
    os.replace(tmp, path)


def samples(messages: list[Received]) -> list[int]:
    """The ts of each plc telemetry message, in arrival order."""
    return [int(m.json()["ts"]) for m in messages if m.topic == TOPIC]


def clock_states(messages: list[Received]) -> list[object]:
    """The P/status/clock payloads, in arrival order (a subscriber already there gets them without the retain flag)."""
    return [m.json() for m in messages if m.topic == "fieldgate/ck/status/clock"]


async def scrape(http: int) -> dict[str, float]:
    """/metrics as {name{sink label}: value}."""

    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    text = await asyncio.to_thread(fetch)
    return {
        s.name + (f"{{{s.labels['sink']}}}" if "sink" in s.labels else ""): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_samples_spooled_before_the_clock_was_set_are_replayed_on_the_set_clock_in_order(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Booted ten years behind, unsynchronised: what goes out live then carries that time and is counted. The
    broker goes away; the clock steps back an hour, then NTP sets it (a step of ten years forward and synchronised);
    the broker comes back: the samples spooled meanwhile arrive dated by the set clock, when they were really taken,
    in the order they were taken (across the step back too), none expired by the ten-year step; the count of what
    went out unsynchronised did not move, and /metrics and the status page show it; P/status/clock said
    unsynchronised, then synchronised."""
    clock = tmp_path / "clock.json"
    set_clock(clock, -TEN_YEARS, False)
    link = TcpRelay(mosquitto.port)
    http = free_port()
    plc = device("plc", 1, poll="100ms", points=[point("ramp", "holding", 0, "uint16")])
    ramp = {"wave": "ramp", "period": "100ms", "min": 0, "max": 60000}
    up = sink(
        "up",
        f"mqtt://127.0.0.1:{link.port}",
        reconnect_base="100ms",
        reconnect_cap="300ms",
        spool={"commit_window": "50ms", "replay_delay": 0, "max_age": "30d"},
    )
    cfg = config(
        id="ck",
        http=f"127.0.0.1:{http}",
        broker=broker(enabled=False),
        northbound=[up],
        buses=[line("line", "./ttyA", plc)],
        simulator=simulator(modbus=[sim_line("./ttyA", sim_slave(1, {"ramp": ramp}))]),
    )
    path = write(cfg, tmp_path)
    spool = tmp_path / "state" / "spool" / "up.sqlite"
    env = {**os.environ, TEST_CLOCK_ENV: str(clock)}
    await link.start()
    async with subscribed(mosquitto.port, "fieldgate/#") as sub:
        with GatewayProcess(["run", "-c", str(path)], tmp_path / "gw.log", cwd=tmp_path, env=env) as gw:
            await until(lambda: len(samples(sub.messages)) >= 3, 30, "live samples before the cut")
            assert "clock faked from" in gw.output()
            unsynced = {"synchronized": False, "source": "test"}
            assert await until(lambda: clock_states(sub.messages), 10, "P/status/clock") == [unsynced]
            live = samples(sub.messages)
            assert all(abs(ts / 1000 - (time.time() - TEN_YEARS)) < 120 for ts in live), "not rewritten"

            await link.close()  # the broker is away for the gateway
            cut_at = time.time()
            telemetry_rows = lambda: [ts for topic, ts in spool_rows(spool) if topic == "plc/telemetry"]  # noqa: E731
            await until(lambda: len(telemetry_rows()) >= 5, 30, "samples spooled")
            set_clock(clock, -TEN_YEARS - 3600, False)  # a step back an hour, still unsynchronised
            await gw.logged("wall clock stepped back by 3600")
            await until(lambda: len(telemetry_rows()) >= 10, 30, "samples spooled after the step back")
            before = await scrape(http)
            counted = before["fieldgate_sink_unsynchronised_total{up}"]
            assert counted >= len(live)  # the telemetry that went out, its per-point values, status and metrics

            set_clock(clock, 0.0, True)  # NTP sets the clock
            synced_at = time.time()
            await gw.logged("clock synchronised (test)")
            await asyncio.sleep(0.3)  # a housekeeping pass and an add on the set clock: nothing may expire
            await link.start()
            await until(lambda: not telemetry_rows(), 30, "the spool replayed")
            synced = {"synchronized": True, "source": "test"}
            await until(lambda: clock_states(sub.messages)[-1] == synced, 10, "P/status/clock synchronised")
            async with subscribed(mosquitto.port, "fieldgate/ck/status/clock") as late:
                kept = await until(lambda: [m.json() for m in late.messages if m.retain], 10, "it retained")
                assert kept == [synced]
            # Ten years apart: a ts is on the unset clock (sent live before the cut) or on the set one.
            arrived = samples(sub.messages)
            unset = [ts < (cut_at - TEN_YEARS / 2) * 1000 for ts in arrived]
            assert unset == sorted(unset, reverse=True), "what went out on the unset clock all came before the rest"
            after = arrived[unset.count(True) :]
            replayed = [ts for ts in after if ts <= synced_at * 1000 + 500]
            assert len(replayed) >= 10, "every spooled sample came back"
            assert all(cut_at * 1000 - 2000 <= ts for ts in replayed), "dated by the set clock"
            assert replayed == sorted(replayed), "in the order they were taken, the step back taken out"

            metrics = await scrape(http)
            assert metrics["fieldgate_sink_unsynchronised_total{up}"] == counted
            assert metrics["fieldgate_spool_dropped_total{up}"] == 0
            assert metrics["fieldgate_clock_synchronized"] == 1
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/", timeout=5) as resp:
                page = resp.read().decode()
            assert f"{int(counted)} message(s) went out unsynchronised" in page

            set_clock(clock, 0.0, False)  # the sync lost while connected: said at once, no reconnect needed
            await until(lambda: clock_states(sub.messages)[-1] == unsynced, 10, "P/status/clock unsynchronised")
            assert gw.stop() == 0
