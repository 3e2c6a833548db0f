"""Does running the embedded amqtt broker in its own process pay?

amqtt is single-core bound. Today the gateway runs it in its own process and event loop, next to
the sink that publishes to it. This benchmark measures QoS 1 publishing through our MqttSink +
Outbox in two layouts:

  (a) in-process: EmbeddedBroker on the publisher's event loop (how the gateway runs it now);
  (b) separate:   EmbeddedBroker in a child process with its own event loop.

and for each, without and with a simulated gateway workload on the publisher's loop (a task that
burns ~30 % of a core in 2 ms slices: polling, decoding, routing). One paho subscriber (QoS 1)
counts the messages until all have arrived: on a thread of the publisher process (default, as
the original question asked) or in its own process (`--subscriber process`, closer to a real
deployment where the consumers are elsewhere).

Two kinds of run:
  throughput  N messages (default 20,000 x 100 B) as fast as the sink takes them: msg/s end to end;
  fixed rate  the gateway's realistic range (default 200 and 1,000 msg/s): CPU per message,
              share of a core used by the gateway process, end-to-end latency (submit -> subscriber).

CPU is read from /proc (utime+stime): "gw" is the publisher process minus the subscriber thread
and minus the simulated workload itself, so in layout (a) it includes the broker; "broker" is the
child process in layout (b). RSS is VmRSS at the end of the run. Every scenario runs in a fresh
interpreter.

Run from the repository root:  .venv/bin/python hil/bench/broker_bench.py [-n 20000] [--subscriber thread|process]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import paho.mqtt.client as mqtt

# benchlib first: it puts the repository on sys.path for the imports below.
from benchlib import (
    ROOT,
    cpu_seconds,
    free_port,
    latency_summary,
    note,
    package_version,
    print_header,
    print_table,
    run_summary,
    subscribe,
)
from benchlib.children import Child
from benchlib.mqtt import broker_child as embedded_broker_child
from benchlib.procs import quiet_logs, rss_mb, run_fresh

from bridge.outbox import Outbox
from bridge.sink import MqttSink
from gateway.types import Message

PREFIX = "bench/gw"
TOPIC = "data"  # measured messages: PREFIX/data
WARM_TOPIC = "warm"
QUEUE_HIGH_WATER = 1_000  # the throughput producer keeps at most this many messages queued


# --- the subscriber -------------------------------------------------------------------------------


class Counter:
    """A paho subscriber (QoS 1) on its own thread that counts measured messages and their latency."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.count = 0
        self.expected = 0
        self.first_at = 0.0
        self.last_at = 0.0
        self.latencies: list[float] = []
        self.tid = 0
        self.done = threading.Event()
        self.client: mqtt.Client | None = None

    def start(self) -> None:
        """Connect, subscribe and wait for the SUBACK (blocking: call it off the broker's loop)."""
        self.client = subscribe(self.port, f"{PREFIX}/#", self._on_message, timeout=10)

    def expect(self, n: int) -> None:
        """Count the next n measured messages."""
        self.count, self.expected, self.latencies = 0, n, []
        self.done.clear()

    def _on_message(self, _c: mqtt.Client, _u: Any, m: mqtt.MQTTMessage) -> None:
        if not self.tid:
            self.tid = threading.get_native_id()
        if not m.topic.endswith(TOPIC):
            return
        now = time.monotonic()
        if self.count == 0:
            self.first_at = now
        self.count += 1
        self.last_at = now
        # CLOCK_MONOTONIC is system-wide, so a send time from another process compares.
        self.latencies.append(now - float(bytes(m.payload[:24]).split()[1]))
        if self.count >= self.expected:
            self.done.set()

    def stop(self) -> None:
        """Disconnect."""
        assert self.client is not None
        self.client.disconnect()
        self.client.loop_stop()


def subscriber_child(port: int, conn: Connection) -> None:
    """A Counter in a benchlib Child: ("expect", n), then ("wait", timeout) answers what it counted."""
    sub = Counter(port)
    sub.start()
    conn.send(("ok", os.getpid()))
    while True:
        cmd, arg = conn.recv()
        if cmd == "expect":
            sub.expect(arg)
            conn.send(("ok", None))
        elif cmd == "wait":
            finished = sub.done.wait(arg)
            got = {"finished": finished, "count": sub.count, "last_at": sub.last_at}
            conn.send(("ok", {**got, "latencies": latency_summary(sub.latencies)}))
        elif cmd == "stop":
            sub.stop()
            conn.send(("ok", None))
            return


# --- one scenario --------------------------------------------------------------------------------


@dataclass
class Scenario:
    """What one fresh interpreter measures."""

    layout: str  # "a" in-process, "b" separate process
    load: float  # share of a core burnt on the publisher's loop (0: none)
    rate: float  # 0: as fast as possible
    n: int
    size: int
    window: int
    subscriber: str  # "thread" or "process"


@dataclass
class Result:
    """What one scenario measured."""

    scenario: Scenario
    finished: bool = False
    received: int = 0
    wall_s: float = 0.0
    msg_s: float = 0.0
    gw_cpu_s: float = 0.0  # publisher process minus subscriber thread minus simulated workload
    load_cpu_s: float = 0.0  # the simulated workload itself
    broker_cpu_s: float = 0.0  # layout (b) only
    sub_cpu_s: float = 0.0
    rss_gw_mb: float = 0.0
    rss_broker_mb: float = 0.0
    rss_sub_mb: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)


class Burner:
    """Simulated gateway work on the publisher's loop: busy 2 ms slices at a given share of a core."""

    def __init__(self, share: float) -> None:
        self.share = share
        self.cpu = 0.0
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """Burn until cancelled."""
        busy = 0.002
        idle = busy * (1 - self.share) / self.share
        while True:
            t, c = time.perf_counter(), time.thread_time()
            while time.perf_counter() - t < busy:
                pass
            self.cpu += time.thread_time() - c
            await asyncio.sleep(idle)


def payload(seq: int, size: int) -> bytes:
    """`seq send-time` padded to size bytes."""
    return f"{seq} {time.monotonic():.6f} ".encode().ljust(size, b"x")


async def run_scenario(sc: Scenario) -> Result:
    """Set up the layout, warm up, measure, tear down."""
    res = Result(sc)
    port = free_port()
    listeners = [f"tcp://127.0.0.1:{port}"]
    me = os.getpid()
    broker = None
    broker_child: Child | None = None
    broker_pid = 0
    if sc.layout == "a":
        # Imported only here, so that in layout (b) the publisher process does not carry amqtt.
        from bridge.broker import EmbeddedBroker

        broker = EmbeddedBroker(listeners)
        await broker.start()
    else:
        broker_child = Child("broker", embedded_broker_child, listeners)
        broker_pid = await asyncio.to_thread(broker_child.wait, 60)

    counter: Counter | None = None
    sub_child: Child | None = None
    sub_pid = 0
    if sc.subscriber == "thread":
        counter = Counter(port)
        await asyncio.to_thread(counter.start)
    else:
        sub_child = Child("subscriber", subscriber_child, port)
        sub_pid = await asyncio.to_thread(sub_child.wait, 60)

    async def sub_call(cmd: str, arg: Any, timeout: float = 60.0) -> Any:
        assert sub_child is not None
        return await asyncio.to_thread(sub_child.call, cmd, arg, timeout)

    sink = MqttSink("bench", f"mqtt://127.0.0.1:{port}", PREFIX, client_id=f"bench-pub-{me}", qos=1)
    box = Outbox(sink, window=sc.window)
    await box.start()
    await sink.start()
    if not await sink.wait_connected(10):
        raise RuntimeError("the sink did not connect")

    burner = Burner(sc.load) if sc.load > 0 else None
    if burner:
        burner.task = asyncio.create_task(burner.run())

    # Warm up: allocations, paho's and amqtt's first-time paths, the burner's steady state.
    for i in range(1_000):
        box.put(Message(WARM_TOPIC, payload(i, sc.size)))
    await box.flush(60)
    await asyncio.sleep(0.2)

    if counter:
        counter.expect(sc.n)
    else:
        await sub_call("expect", sc.n)

    sub_tid = counter.tid if counter else 0
    c_proc0 = cpu_seconds(me)
    c_sub0 = cpu_seconds(me, sub_tid) if sub_tid else 0.0
    c_load0 = burner.cpu if burner else 0.0
    c_broker0 = cpu_seconds(broker_pid) if broker_pid else 0.0
    c_subp0 = cpu_seconds(sub_pid) if sub_pid else 0.0
    t0 = time.monotonic()

    timeout = max(60.0, sc.n / 300)
    if sc.rate <= 0:
        sent = 0
        while sent < sc.n:
            room = min(QUEUE_HIGH_WATER - len(box), sc.n - sent)
            for _ in range(room):
                box.put(Message(TOPIC, payload(sent, sc.size)))
                sent += 1
            await asyncio.sleep(0.002)
    else:
        sent = 0
        while sent < sc.n:
            due = min(sc.n, int((time.monotonic() - t0) * sc.rate) + 1)
            while sent < due:
                box.put(Message(TOPIC, payload(sent, sc.size)))
                sent += 1
            await asyncio.sleep(0.005)

    if counter:
        deadline = time.monotonic() + timeout
        while not counter.done.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        res.finished = counter.done.is_set()
        res.received, last_at = counter.count, counter.last_at
        res.latency_ms = latency_summary(counter.latencies) if sc.rate > 0 else {}
    else:
        got = await sub_call("wait", timeout, timeout + 60)
        res.finished, res.received, last_at = got["finished"], got["count"], got["last_at"]
        res.latency_ms = got["latencies"] if sc.rate > 0 else {}

    c_proc1 = cpu_seconds(me)
    c_sub1 = cpu_seconds(me, sub_tid) if sub_tid else 0.0
    res.load_cpu_s = (burner.cpu if burner else 0.0) - c_load0
    res.broker_cpu_s = (cpu_seconds(broker_pid) - c_broker0) if broker_pid else 0.0
    res.sub_cpu_s = (cpu_seconds(sub_pid) - c_subp0) if sub_pid else (c_sub1 - c_sub0)
    res.gw_cpu_s = (c_proc1 - c_proc0) - (c_sub1 - c_sub0) - res.load_cpu_s
    res.wall_s = max(1e-9, (last_at or time.monotonic()) - t0)
    res.msg_s = res.received / res.wall_s
    res.rss_gw_mb = rss_mb(me)
    res.rss_broker_mb = rss_mb(broker_pid) if broker_pid else 0.0
    res.rss_sub_mb = rss_mb(sub_pid) if sub_pid else 0.0

    # Tear down.
    if burner and burner.task:
        burner.task.cancel()
    await box.stop()
    await sink.stop()
    if counter:
        await asyncio.to_thread(counter.stop)
    else:
        await sub_call("stop", None)
        assert sub_child is not None
        await asyncio.to_thread(sub_child.stop, 5)
    if broker:
        await broker.stop()
    if broker_child:
        await asyncio.to_thread(broker_child.stop, 5)
    return res


def run_one(spec: str) -> None:
    """Entry point of the fresh interpreter: one scenario, result as JSON on the last line."""
    quiet_logs()
    sc = Scenario(**json.loads(spec))
    res = asyncio.run(run_scenario(sc))
    print(json.dumps(asdict(res)))


# --- the table -----------------------------------------------------------------------------------


def launch(sc: Scenario) -> Result:
    """Run one scenario in a fresh interpreter."""
    data = run_fresh([__file__, "--one", json.dumps(asdict(sc))], f"scenario {sc}", timeout=600, cwd=ROOT)
    data["scenario"] = Scenario(**data["scenario"])
    return Result(**data)


def us(seconds: float, n: int) -> float:
    """CPU seconds per message, in µs."""
    return seconds / max(1, n) * 1e6


def median_run(runs: list[Result]) -> tuple[Result, str]:
    """The run with the median msg/s, and the min-max range of msg/s over all runs."""
    ordered = sorted(runs, key=lambda r: r.msg_s)
    spread = f"{ordered[0].msg_s:.0f}-{ordered[-1].msg_s:.0f}" if len(runs) > 1 else ""
    return ordered[len(ordered) // 2], spread


def report(rows: list[tuple[Result, str]]) -> None:
    """One line per scenario; ratio (b)/(a) against the matching layout-(a) line."""
    results = [r for r, _ in rows]
    spreads = {id(r): s for r, s in rows}
    base = {(r.scenario.load, r.scenario.rate): r for r in results if r.scenario.layout == "a"}
    table: list[list[object]] = []
    for r in results:
        sc = r.scenario
        a = base.get((sc.load, sc.rate))
        n = r.received
        lat = r.latency_ms
        table.append(
            [
                "(a) in-proc" if sc.layout == "a" else "(b) separate",
                f"{sc.load:.0%}",
                f"{r.load_cpu_s / r.wall_s:.0%}",
                "max" if sc.rate <= 0 else f"{sc.rate:.0f}/s",
                r.msg_s,
                f"({spreads[id(r)]})" if spreads[id(r)] else "",
                r.msg_s / a.msg_s if a and sc.layout == "b" and a.msg_s else float("nan"),
                us(r.gw_cpu_s, n),
                us(r.broker_cpu_s, n) if sc.layout == "b" else "(in gw)",
                us(r.gw_cpu_s + r.broker_cpu_s, n),
                (r.gw_cpu_s + r.load_cpu_s) / r.wall_s * 100,
                lat.get("p50", float("nan")),
                lat.get("p99", float("nan")),
                f"{r.rss_gw_mb:.1f}M",
                f"{r.rss_broker_mb:.1f}M" if r.rss_broker_mb else "-",
                f"{r.rss_sub_mb:.1f}M" if r.rss_sub_mb else "(in gw)",
            ]
        )
    headers = ["layout", "load", "got", "target", "msg/s", "(range)", "b/a", "gw µs/msg", "brk µs/msg", "total µs"]
    print_table([*headers, "gw core%", "p50 ms", "p99 ms", "RSS gw", "RSS brk", "RSS sub"], table, blank="")
    for r in results:
        if not r.finished:
            sc = r.scenario
            note(f"INCOMPLETE: layout {sc.layout}, load {sc.load:.0%}: {r.received}/{sc.n} messages arrived")


def main(argv: list[str] | None = None) -> int:
    """Run every scenario and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=20_000, help="messages per throughput run (default 20000)")
    ap.add_argument("--size", type=int, default=100, help="payload bytes (default 100)")
    ap.add_argument("--window", type=int, default=64, help="Outbox window of publishes in flight (default 64)")
    ap.add_argument("--load", type=float, default=0.3, help="simulated gateway load, share of a core (default 0.3)")
    ap.add_argument("--rates", default="200,1000", help="fixed rates in msg/s, comma-separated ('' for none)")
    ap.add_argument("--rate-seconds", type=float, default=8.0, help="length of each fixed-rate run (default 8)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each throughput scenario; the median is shown")
    ap.add_argument(
        "--subscriber",
        choices=("thread", "process"),
        default="thread",
        help="where the counting subscriber runs (default: a thread of the publisher process)",
    )
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        run_one(args.one)
        return 0

    print_header(
        "broker layout",
        {name: package_version(name) for name in ("amqtt", "paho-mqtt")},
        [f"payload {args.size} B, QoS 1, Outbox window {args.window}, subscriber on a {args.subscriber}"],
        skews="every rate and CPU figure",
    )
    started = time.monotonic()
    loads = [0.0, args.load] if args.load > 0 else [0.0]
    scenarios = [
        Scenario(layout, load, 0.0, args.n, args.size, args.window, args.subscriber)
        for load in loads
        for layout in ("a", "b")
    ]
    for rate in [float(r) for r in args.rates.split(",") if r.strip()]:
        for load in loads:
            for layout in ("a", "b"):
                n = int(rate * args.rate_seconds)
                scenarios.append(Scenario(layout, load, rate, n, args.size, args.window, args.subscriber))
    rows = []
    for sc in scenarios:
        runs = []
        for _ in range(max(1, args.repeat) if sc.rate <= 0 else 1):
            print(
                f"  running layout {sc.layout}, load {sc.load:.0%}, "
                f"{'max rate' if sc.rate <= 0 else f'{sc.rate:.0f} msg/s'}, {sc.n} messages ...",
                file=sys.stderr,
            )
            runs.append(launch(sc))
        rows.append(median_run(runs))
    print()
    report(rows)
    note("msg/s: end to end, median of the runs (range over them); got: share of a core the simulated load")
    note("actually got; gw µs/msg: publisher process CPU per message minus the subscriber thread and the")
    note("simulated load (includes the broker in (a)); brk: broker process (b); total = gw + brk; gw core%:")
    note("the publisher process's share of one core, simulated load included; p50/p99: submit -> subscriber")
    note("latency at fixed rates; RSS: VmRSS at the end of the run.")
    print()
    print(run_summary(started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
