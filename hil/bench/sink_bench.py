"""What MQTT 5 costs a sink: CPU per message and messages/s, `protocol: 5` against 3.1.1 in the same run.

One Mosquitto of the bench's own; for each protocol, in a fresh interpreter, an MqttSink and an Outbox (the way the
gateway publishes) send N telemetry-like messages (a ~120-byte JSON body with its sample ts, QoS 1, not retained) as
fast as the outbox's window lets them, until every PUBACK is back. An MQTT 5 sink gives each its `ts` user property
and a message expiry (what is left of a 30-day max_age). Measured in the publishing process: CPU (time.process_time:
user + sys) per message and the rate, each the median of `--rounds` rounds; the ratio is 5 over 3.1.1
(ours: at most 1.5, the per-message properties must not dominate the publish path).

Run from the repository root:  .venv/bin/python hil/bench/sink_bench.py [-n 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# benchlib first: it puts the repository on sys.path for the imports below.
import benchlib
from benchlib import free_port, heading, package_version, print_header, record, run_summary
from benchlib.mqtt import Mosquitto

PROTOCOLS = ("3.1.1", "5")
CPU_GOAL = 1.5  # ours: MQTT 5's properties cost at most 1.5x the CPU per message of 3.1.1
MAX_AGE = 30 * 86400.0


async def _publish(port: int, protocol: str, n: int) -> dict[str, float]:
    """One round in this process: n messages through an Outbox and an MqttSink; CPU and wall time."""
    from bridge.outbox import Outbox
    from bridge.sink import MqttSink
    from gateway.types import Message, now_ms

    sink = MqttSink(
        "bench",
        f"mqtt://127.0.0.1:{port}",
        "bench/sink",
        client_id=f"sink-bench-{protocol}-{time.monotonic_ns()}",
        protocol=protocol,
        message_expiry=MAX_AGE,
    )
    box = Outbox(sink, high_water=n + 1)  # all live: the spool and its replay rate are not what is measured
    await box.start()
    await sink.start()
    try:
        if not await sink.wait_connected(10):
            raise RuntimeError("the sink did not connect")
        body = b'{"ts":%d,"values":{"temperature":21.5,"humidity":40.1,"pressure":1013.2,"state":"running"}}'
        cpu0, t0 = time.process_time(), time.monotonic()
        futures = [box.put(Message(f"d{i % 20}/telemetry", body % now_ms(), ts=now_ms())) for i in range(n)]
        await asyncio.gather(*futures)
        if not await box.flush(60):
            raise RuntimeError("not every message was acknowledged within 60 s")
        cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
    finally:
        await box.stop()
        await sink.stop()
    return {"cpu_us": cpu / n * 1e6, "rate": n / wall, "published": sink.stats.published}


def child(port: int, protocol: str, n: int) -> None:
    """A round in a fresh interpreter: prints its figures as JSON."""
    print(json.dumps(asyncio.run(_publish(port, protocol, n))))


def run_round(port: int, protocol: str, n: int) -> dict[str, float]:
    """Start a child for one round and read its figures."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(port), protocol, str(n)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    figures: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    if figures["published"] < n:
        raise RuntimeError(f"protocol {protocol}: {figures['published']:.0f} of {n} messages acknowledged")
    return figures


def main() -> int:
    """Both protocols, alternating, `rounds` times; the medians and their ratio."""
    parser = argparse.ArgumentParser(description="MQTT 5 against 3.1.1 on a sink (see hil/bench/README.md).")
    parser.add_argument("-n", type=int, default=20_000, help="messages per round (default 20,000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per protocol (default 3; medians reported)")
    parser.add_argument("--child", nargs=3, metavar=("PORT", "PROTOCOL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(int(args.child[0]), args.child[1], int(args.child[2]))
        return 0
    started = time.monotonic()
    print_header("sink protocol", {"paho-mqtt": package_version("paho-mqtt")}, [f"{args.n:,} messages x {args.rounds}"])
    results: dict[str, list[dict[str, float]]] = {p: [] for p in PROTOCOLS}
    with tempfile.TemporaryDirectory(prefix="sink-bench-") as tmp:
        mosq = Mosquitto(Path(tmp) / "mosquitto", free_port())
        mosq.start()
        try:
            for _ in range(args.rounds):
                for protocol in PROTOCOLS:  # alternating: a drift of the machine's load hits both alike
                    results[protocol].append(run_round(mosq.port, protocol, args.n))
        finally:
            mosq.stop()
    heading("per message, median of the rounds")
    cpu = {p: statistics.median(r["cpu_us"] for r in results[p]) for p in PROTOCOLS}
    rate = {p: statistics.median(r["rate"] for r in results[p]) for p in PROTOCOLS}
    for p in PROTOCOLS:
        rounds = ", ".join(f"{r['cpu_us']:.1f}" for r in results[p])
        print(f"  MQTT {p:5}: CPU {cpu[p]:6.1f} µs/message (rounds: {rounds}); {rate[p]:8,.0f} messages/s")
    ratio = cpu["5"] / cpu["3.1.1"]
    print(f"  MQTT 5 / 3.1.1: CPU {ratio:.2f} (goal <= {CPU_GOAL}); rate {rate['5'] / rate['3.1.1']:.2f}")
    record(
        "sink",
        "CPU per message, MQTT 5 sink",
        cpu["5"],
        "µs",
        ratio=ratio,
        versus="3.1.1 sink, same run",
        most=CPU_GOAL,
    )
    print(run_summary(started))
    return 0 if ratio <= CPU_GOAL else 1


if __name__ == "__main__":
    assert benchlib  # imported for its side effect: the repository on sys.path
    sys.exit(main())
