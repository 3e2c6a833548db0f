"""Benchmark of MCP/1 end to end: device clients -> gateway (MCP server, router, sink, embedded amqtt) -> subscriber.

For each number of concurrent device clients (default 1, 100, 1,000 and as many sessions as the
file-descriptor limit allows), every client keeps a full window (32) of DATA frames outstanding.
Measured: ACKed frames/s counted by an MQTT subscriber on `+/telemetry`, DATA->ACK latency seen by
the devices, CPU of every process, and gateway RSS per idle session. In the same run, a bare paho
publisher (QoS 1, window = the Outbox's) feeds the same embedded amqtt broker run in a process of
its own; our rate is printed as a fraction of it (goal >= 0.8). The gateway process is then
profiled under load and its time grouped by component.

Processes (spawned, so /proc CPU figures belong to one role each): the gateway with its embedded
broker; one or more device-client processes; a paho subscriber; the orchestrator (this process,
asleep during measurements). Baseline: broker, publisher, subscriber.

Run from the repository root:  .venv/bin/python hil/bench/mcp_bench.py [--clients 1,100,1000,max] [--seconds N]
hil/bench/README.md says what each figure means.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import inspect
import math
import resource
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# benchlib first: it puts the repository on sys.path for the imports below.
import benchlib
from benchlib import (
    heading,
    note,
    package_version,
    percentile,
    print_header,
    progress,
    record,
    rss_kb,
    run_summary,
    summary,
)
from benchlib.children import Child, Pid, stop_all
from benchlib.configs import config, gateway_section, loopback_listener, mcp_device, mcp_section, write_config
from benchlib.fleet import clients_child, publisher_child, warm_up
from benchlib.gateway_child import gateway_child, gateway_status, wait_quiet
from benchlib.mqtt import broker_child, free_port, subscriber_child
from benchlib.procs import open_fds
from benchlib.profiling import report_profile

from drivers.mcp.protocol import MAX_OUTSTANDING

GATEWAY_ID = "bench"
PREFIX = f"fieldgate/{GATEWAY_ID}"  # the default prefix of the default sink
TELEMETRY = f"{PREFIX}/+/telemetry"  # what the subscriber counts
BARE_TOPIC = f"{PREFIX}/d0/telemetry"
GOAL = 0.8  # our ACKed frames/s as a share of the bare paho -> amqtt rate
DEFAULT_SECONDS = 6.0
FD_RESERVE = 64  # descriptors the gateway keeps free for its broker, sink reconnects, spool, executor
CLIENT_FDS_PER_PROC = 10_000  # sockets per device-client process
READY_TIMEOUT = 120.0
# Where the broker runs: config `broker.process: inline | separate`, or a process the bench spawns (what-if).
LAYOUTS = {"inline": "in gw", "separate": "gw child", "external": "own proc"}
STATUS_TIMEOUT = 5.0  # s to wait for a (swamped) gateway's counters during a measurement
MAX_WARMUP = 3.0  # s of warm-up at max sessions, where a steady state is minutes away


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print rows under headers: numbers right-aligned with thousands separators, "-" for a missing value."""
    benchlib.print_table(headers, rows, thousands=True, blank="-")


# --- one measured configuration ----------------------------------------------------------------------------


@dataclass
class Row:
    """What one run measured."""

    label: str
    impl: str
    changing: int
    broker: str = "inline"  # a key of LAYOUTS
    clients: int = 0
    sessions: int = 0
    connect_s: float = 0.0
    failed: int = 0
    first_error: str = ""
    nofile: tuple[int, int] = (0, 0)
    fds_idle0: int = 0
    fds_loaded: int = 0
    rss0_kb: int = 0
    rss_idle_kb: int = 0
    rss_loaded_kb: int = 0
    warmup_s: float = 0.0
    steady: bool = True
    wall_s: float = 0.0
    sub_count: int = 0
    acked: int = 0
    nacked: int = 0
    lost: int = 0
    published: int = 0
    gw_nacks: int = 0
    gw_lag: float = 0.0  # longest wait for the gateway's answer to a status request (s)
    dropped: int = 0
    queued: int = 0
    latencies: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # role -> CPU seconds in the window
    profiles: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Frames/s as counted by the subscriber."""
        return self.sub_count / self.wall_s if self.wall_s else float("nan")

    def per_frame_us(self, role: str) -> float:
        """CPU of a role per ACKed frame, in µs."""
        if not self.sub_count:
            return float("nan")
        return self.cpu.get(role, float("nan")) / self.sub_count * 1e6

    def core(self, role: str) -> float:
        """Share of one core a role used during the window, in %."""
        if role not in self.cpu or not self.wall_s:
            return float("nan")
        return self.cpu[role] / self.wall_s * 100

    @property
    def title(self) -> str:
        """The row's label with what differs from the default run."""
        extra = [self.impl] if self.impl != "raw" else []
        extra += [f"broker {LAYOUTS[self.broker]}"] if self.broker != "inline" else []
        extra += [f"{self.changing} chg"] if self.changing != 1 else []
        return self.label + (f" ({', '.join(extra)})" if extra else "")

    def lat_ms(self, q: float) -> float:
        """A DATA->ACK latency quantile in ms."""
        return percentile(self.latencies, q) * 1000


def measure(
    row: Row,
    drivers: list[Child],
    sub: Child,
    procs: Mapping[str, Sequence[Child | Pid]],
    gw: Child | None,
    seconds: float,
) -> None:
    """One measurement window: counters and CPU at the start and the end."""
    for d in drivers:
        d.call("mark")
    s0 = gateway_status(gw, timeout=STATUS_TIMEOUT) if gw else None
    cpu0 = {role: sum(p.cpu() for p in ps) for role, ps in procs.items()}
    c0, t0 = sub.call("count")
    time.sleep(seconds)
    c1, t1 = sub.call("count")
    cpu1 = {role: sum(p.cpu() for p in ps) for role, ps in procs.items()}
    if gw:
        row.rss_loaded_kb, row.fds_loaded = rss_kb(gw.pid), open_fds(gw.pid)
    got = [d.call("collect") for d in drivers]
    s1 = gateway_status(gw, timeout=STATUS_TIMEOUT) if gw else None
    if gw and (s0 is None or s1 is None):
        row.gw_lag = float("inf")  # swamped: its counters are lost
    row.wall_s = t1 - t0
    row.sub_count = c1 - c0
    row.acked = sum(g["acked"] for g in got)
    row.nacked = sum(g["nacked"] for g in got)
    row.lost = sum(g["lost"] for g in got)
    row.latencies = sorted(x for g in got for x in g["latencies"])
    row.cpu = {role: cpu1[role] - cpu0[role] for role in procs}
    if s0 and s1:
        # The gateway answers on its own loop, late when it is swamped: scale its counters to the window.
        scale = row.wall_s / max(1e-9, s1["time"] - s0["time"])
        row.published = round((s1["published"] - s0["published"]) * scale)
        row.gw_nacks = round((s1["nacks"] - s0["nacks"]) * scale)
        row.dropped = round((s1["dropped"] - s0["dropped"]) * scale)
        row.gw_lag = max(s0["lag"], s1["lag"])
        row.queued = s1["queued"]


def run_bare(window: int, changing: int, seconds: float) -> Row:
    """paho publisher -> EmbeddedBroker (own process) -> paho subscriber."""
    row = Row("bare paho", "paho", changing, clients=1)
    port = free_port()
    children: list[Child] = []
    try:
        broker = Child("broker", broker_child, [loopback_listener(port)])
        children.append(broker)
        broker.wait(READY_TIMEOUT)
        sub = Child("subscriber", subscriber_child, port, TELEMETRY)
        pub = Child("publisher", publisher_child, port, BARE_TOPIC, window, changing)
        children += [sub, pub]
        sub.wait(READY_TIMEOUT)
        pub.wait(READY_TIMEOUT)
        pub.call("go")
        row.warmup_s, row.steady = warm_up([pub], 4 * window, 1.5, 10)
        measure(row, [pub], sub, {"broker": [broker], "clients": [pub], "subscriber": [sub]}, None, seconds)
        row.published = row.acked
        row.rss_loaded_kb = rss_kb(broker.pid)
    finally:
        stop_all(children)
    return row


def gateway_config(state: Path, mqtt_port: int, mcp_port: int, devices: int, broker: str) -> dict[str, Any]:
    """A gateway config: embedded broker (`broker.process` inline or separate) and default sink, or (external) a
    sink to a broker the bench runs; MCP with `devices` allowed devices."""
    embedded: dict[str, Any]
    if broker == "external":
        embedded = {"enabled": False}
        northbound = [{"name": "local", "url": f"mqtt://127.0.0.1:{mqtt_port}"}]
    else:
        embedded = {"process": broker, "listeners": [loopback_listener(mqtt_port)]}
        northbound = None
    mcp = mcp_section(
        f"127.0.0.1:{mcp_port}",
        [mcp_device(f"d{i}", f"token-{i:010d}") for i in range(devices)],
        max_sessions=1_000_000,
        # Every bench client connects from 127.0.0.1, all at once: the per-address login limits that hold off
        # a flood would hold off the bench (hostile_bench.py measures those limits).
        max_pending=100_000,
        max_pending_per_ip=100_000,
    )
    return config(gateway=gateway_section(GATEWAY_ID, state), broker=embedded, northbound=northbound, mcp=mcp)


def run_mcp(
    clients: int | None,
    impl: str,
    changing: int,
    seconds: float,
    tmp: Path,
    profile: float = 0.0,
    warmup_max: float = 25.0,
    broker: str = "inline",
) -> Row:
    """Gateway + device clients + subscriber; `clients` None: as many sessions as descriptors allow.

    `broker`: a key of LAYOUTS. "external" is a what-if: EmbeddedBroker in a process the bench spawns and the
    gateway's sink pointed at it (`broker.enabled: false` and a northbound URL)."""
    label = f"{'max' if clients is None else clients}"
    row = Row(label, impl, changing, broker=broker)
    mqtt_port, mcp_port = free_port(), free_port()
    config = tmp / f"mcp-{label}-{impl}-{changing}-{broker}.yaml"
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    write_config(
        config, gateway_config(tmp / "state", mqtt_port, mcp_port, hard if clients is None else clients, broker)
    )
    children: list[Child] = []
    try:
        brokers: list[Child | Pid] = []
        if broker == "external":
            spawned = Child("broker", broker_child, [loopback_listener(mqtt_port)])
            children.append(spawned)
            brokers.append(spawned)
            spawned.wait(READY_TIMEOUT)
        gw = Child("gateway", gateway_child, str(config))
        children.append(gw)
        info = gw.wait(READY_TIMEOUT)
        row.nofile = tuple(info["nofile"])
        if info["broker_pid"]:  # process: separate, the gateway's own child
            brokers.append(Pid(info["broker_pid"]))
        sub = Child("subscriber", subscriber_child, mqtt_port, TELEMETRY)
        children.append(sub)
        sub.wait(READY_TIMEOUT)
        idle0 = wait_quiet(gw, 30)
        row.rss0_kb, row.fds_idle0 = idle0["rss_kb"], idle0["fds"]
        n = clients if clients is not None else row.nofile[0] - idle0["fds"] - FD_RESERVE
        row.clients = n
        nprocs = max(1, math.ceil(n / CLIENT_FDS_PER_PROC))
        devices = [(f"d{i}", f"token-{i:010d}") for i in range(n)]
        drivers = [
            Child(f"clients{k}", clients_child, impl, devices[k::nprocs], MAX_OUTSTANDING, changing)
            for k in range(nprocs)
        ]
        children += drivers
        for d in drivers:
            d.wait(READY_TIMEOUT)
        progress(f"  {n} {impl} client(s) in {nprocs} process(es) connecting ...")
        t0 = time.monotonic()
        for d in drivers:
            d.send("connect", mcp_port)
        done = [d.wait(READY_TIMEOUT * 3, "connect") for d in drivers]
        row.connect_s = time.monotonic() - t0
        row.failed = sum(x["failed"] for x in done)
        row.first_error = next((x["first_error"] for x in done if x["first_error"]), "")
        idle = wait_quiet(gw, 120)
        row.sessions = idle["sessions"]
        row.rss_idle_kb = idle["rss_kb"]
        progress(f"  {row.sessions} sessions held; full windows for {seconds:g} s ...")
        for d in drivers:
            d.call("go")
        # At max sessions the first windows alone would take minutes to answer: a short fixed warm-up.
        longest = MAX_WARMUP if clients is None else warmup_max
        row.warmup_s, row.steady = warm_up(drivers, row.sessions * MAX_OUTSTANDING, min(3.0, longest), longest)
        procs: dict[str, Sequence[Child | Pid]] = {
            "gateway": [gw],
            "broker": brokers,
            "clients": drivers,
            "subscriber": [sub],
        }
        measure(row, drivers, sub, procs, gw, seconds)
        if profile:
            for kind in ("pyinstrument", "cprofile"):
                if kind == "pyinstrument" and importlib.util.find_spec("pyinstrument") is None:
                    continue
                progress(f"  profiling the gateway with {kind} for {profile:g} s ...")
                row.profiles.append(gw.call("profile", (kind, profile), timeout=profile + 120))
    finally:
        stop_all(children)
    return row


# --- the report -------------------------------------------------------------------------------------------


def header(args: argparse.Namespace) -> None:
    """What ran where, so that the numbers can be compared later."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    print_header(
        "MCP",
        {name: package_version(name) for name in ("amqtt", "paho-mqtt", "pyinstrument")},
        [
            f"window {MAX_OUTSTANDING} DATA per device, measurement windows {args.seconds:g} s, DATA values: "
            f"{args.changing} changing + 1 constant; RLIMIT_NOFILE {soft}/{hard} (children raise soft to hard)"
        ],
        skews="every figure",
    )


def report_bare(bare: Row, window: int) -> None:
    """Figure 1."""
    heading(f"1. Bare baseline: paho publisher (QoS 1, window {window}) -> EmbeddedBroker process -> paho subscriber")
    print_table(
        [
            "msgs/s",
            "p50 ms",
            "p99 ms",
            "broker µs/msg",
            "publisher µs/msg",
            "sub µs/msg",
            "broker core%",
            "broker RSS MB",
        ],
        [
            [
                bare.rate,
                bare.lat_ms(0.5),
                bare.lat_ms(0.99),
                bare.per_frame_us("broker"),
                bare.per_frame_us("clients"),
                bare.per_frame_us("subscriber"),
                bare.core("broker"),
                bare.rss_loaded_kb / 1024,
            ]
        ],
    )
    note("msgs/s: counted by the subscriber; latency: publish -> PUBACK at the publisher; CPU: /proc over the window.")


def report_mcp(rows: list[Row], bare: Row | None, high_water: int) -> None:
    """Figure 2: throughput, latency, CPU."""
    heading("2. MCP end to end: devices (full window) -> gateway (MCP, router, sink, embedded amqtt) -> subscriber")
    table = []
    for r in rows:
        table.append(
            [
                r.label,
                "McpClient" if r.impl == "mcpclient" else r.impl,
                LAYOUTS[r.broker],
                r.changing,
                r.sessions,
                r.rate,
                r.acked / r.wall_s if r.wall_s else float("nan"),
                (r.rate / bare.rate) if bare and bare.rate else float("nan"),
                r.lat_ms(0.5),
                r.lat_ms(0.99),
                r.nacked / r.wall_s if r.wall_s else float("nan"),
                r.published / r.sub_count if r.sub_count else float("nan"),
                r.per_frame_us("gateway"),
                r.core("gateway"),
                r.core("broker") if r.broker != "inline" else "-",
                r.per_frame_us("clients"),
                r.core("clients"),
                r.core("subscriber"),
                f"{r.warmup_s:.0f}s" + ("" if r.steady else " NO"),
            ]
        )
    print_table(
        [
            "clients",
            "client",
            "broker",
            "chg",
            "sessions",
            "ACKed/s",
            "dev ACK/s",
            "÷ bare",
            "p50 ms",
            "p99 ms",
            "NACK/s",
            "pub/fr",
            "gw µs/fr",
            "gw core%",
            "brk core%",
            "cli µs/fr",
            "cli core%",
            "sub core%",
            "warm-up",
        ],
        table,
    )
    note("client: raw = a task per device speaking the codec; McpClient = drivers/mcp/client.py with 32 senders each.")
    note("broker: in gw = broker.process: inline, the embedded amqtt on the gateway's loop; gw child = broker.process:")
    note("separate, the gateway runs it as a child process; own proc = what-if: EmbeddedBroker in a process the bench")
    note("spawns, the sink pointed at it (broker.enabled: false). chg: DATA values that change on every frame.")
    note("ACKed/s: telemetry counted by the subscriber per second; dev ACK/s: ACKs the devices read (should match).")
    note("÷ bare: ACKed/s over figure 1's msgs/s. p50/p99: DATA written -> its ACK read, at the device;")
    note("with full windows they follow Little's law: sessions x 32 / rate.")
    note("pub/fr: the sink's PUBACKed publishes per ACKed frame (telemetry + one retained message per changed value).")
    note("µs/fr: CPU per ACKed frame of the gateway / device-client processes; core%: share of one core (2 in all).")
    note("warm-up: from go until as many frames were answered as there are in flight (NO: cut short, not steady).")
    for r in rows:
        if r.failed or r.lost:
            note(f"{r.title}: {r.failed} connects failed {r.first_error[:80]}; {r.lost} connections lost")
        if r.gw_lag == float("inf"):
            note(f"{r.title}: the gateway's loop did not answer a status request within {STATUS_TIMEOUT:g} s (swamped)")
        elif r.dropped or r.gw_nacks:
            note(
                f"{r.title}: in the window the gateway NACKed {r.gw_nacks:,} DATA and its outbox dropped {r.dropped:,} "
                f"messages (queued at the end: {r.queued:,}); its loop answered a status request after {r.gw_lag:.1f} s"
            )
    # Every shipped-layout run is a row, whatever its rate: 0 frames/s is a missed goal, a run that failed or a
    # baseline that did not measure (NaN) is "not measured"; none may drop out of the table.
    base = bare.rate if bare and math.isfinite(bare.rate) and bare.rate > 0 else float("nan")
    base_text = "bare paho -> amqtt: failed" if math.isnan(base) else f"bare paho -> amqtt {base:,.0f} msg/s"
    shipped = [r for r in rows if r.impl == "raw" and r.broker == rows[0].broker and r.changing == rows[0].changing]
    for r in shipped:
        record(
            "mcp",
            f"ACKed DATA frames/s, {clients_text(r)} x window {MAX_OUTSTANDING}",
            r.rate,
            "frames/s",
            ratio=r.rate / base,
            versus=base_text,
            goal=GOAL if r.label != "max" else None,
        )
    if math.isnan(base):
        return
    shipped = [r for r in shipped if r.rate > 0]
    if shipped:
        best = max(shipped, key=lambda r: r.rate)
        verdict = "meets" if best.rate / base >= GOAL else "is BELOW"
        summary(
            f"best as shipped: {best.rate:,.0f} ACKed frames/s at {best.label} client(s) = "
            f"{best.rate / base:.2f} of bare paho ({base:,.0f} msgs/s): {verdict} the goal of {GOAL}"
        )
    for r in rows:
        in_flight = r.sessions * MAX_OUTSTANDING
        messages = in_flight * (1 + r.changing)
        if messages > high_water and (r.gw_nacks or r.nacked or r.gw_lag == float("inf") or not r.rate):
            summary(
                f"{r.title}: {r.sessions:,} sessions x {MAX_OUTSTANDING} = {in_flight:,} DATA in flight x "
                f"{1 + r.changing} messages > the outbox's high-water mark {high_water:,}: the rest goes through "
                f"the spool, and {r.rate:,.0f} frames/s got through"
            )
    for r in rows:
        if r.broker != "inline" or r.impl != "raw" or r.changing == rows[0].changing:
            continue
        summary(
            f"{r.title}: {r.rate:,.0f} frames/s = {r.rate / base:.2f} of bare, {r.per_frame_us('gateway'):.0f} µs/frame"
        )
    for r in rows:
        if r.broker != "inline":
            summary(
                f"{r.title}: {r.rate:,.0f} frames/s = {r.rate / base:.2f} of bare; "
                f"gateway {r.per_frame_us('gateway'):.0f} µs/frame at {r.core('gateway'):.0f}% of a core, "
                f"broker {r.per_frame_us('broker'):.0f} µs/frame at "
                f"{r.core('broker'):.0f}%"
            )


def clients_text(r: Row) -> str:
    """The client count a run asked for, as the suite's table names it: "1,000 clients", or the
    descriptor limit's count, which the machine sets."""
    if r.label == "max":
        return f"as many clients as descriptors allow ({r.sessions:,})"
    n = int(r.label)
    return f"{n:,} client{'' if n == 1 else 's'}"


def report_sessions(rows: list[Row]) -> None:
    """Figure 3: sessions and memory."""
    heading("3. Sessions and memory (gateway process)")
    table = []
    for r in rows:
        if r.impl != "raw" or r.changing != rows[0].changing or r.broker != rows[0].broker:
            continue
        per = (r.rss_idle_kb - r.rss0_kb) / r.sessions if r.sessions else float("nan")
        table.append(
            [
                r.label,
                r.clients,
                r.sessions,
                r.connect_s,
                r.rss0_kb / 1024,
                r.rss_idle_kb / 1024,
                per,
                r.rss_loaded_kb / 1024,
                r.fds_idle0,
                r.fds_loaded,
                f"{r.nofile[0]}/{r.nofile[1]}",
            ]
        )
    print_table(
        [
            "clients",
            "opened",
            "held",
            "connect s",
            "RSS 0 MB",
            "RSS idle MB",
            "KiB/idle session",
            "RSS loaded MB",
            "fds at 0",
            "fds loaded",
            "NOFILE",
        ],
        table,
    )
    note("RSS idle: K sessions after HELLO, outbox drained, gc.collect(); KiB/idle session = (RSS idle - RSS 0) / K;")
    note(f"it includes amqtt's retained `status` per device. max = NOFILE soft limit - fds at 0 - {FD_RESERVE}.")
    for r in rows:
        if r.label != "max" or r.impl != "raw" or r.changing != rows[0].changing or r.broker != rows[0].broker:
            continue
        # A max run that held no session has no per-session figure: NaN, "not measured", never a dropped row.
        per = (r.rss_idle_kb - r.rss0_kb) / r.sessions if r.sessions else float("nan")
        record("mcp", "concurrent sessions held (limit: file descriptors)", r.sessions or float("nan"), "sessions")
        record("mcp", "gateway RSS per idle session", per, "KiB")
        if r.sessions:
            summary(
                f"{r.sessions:,} concurrent sessions held (limit: file descriptors, RLIMIT_NOFILE hard "
                f"{r.nofile[1]:,}); {per:.1f} KiB per idle session -> 100,000 sessions would need "
                f"~{per * 100_000 / 1024**2:.1f} GiB "
                f"and NOFILE > 100k"
            )


def main(argv: list[str] | None = None) -> int:
    """Run the baseline and every client count, print the report."""
    from bridge.outbox import Outbox
    from gateway.config.schema import BrokerSection

    outbox_window = inspect.signature(Outbox).parameters["window"].default
    shipped_layout = BrokerSection.model_fields["process"].default
    parser = argparse.ArgumentParser(description="MCP end-to-end benchmark (see hil/bench/README.md).")
    parser.add_argument("--clients", default="1,100,1000,max", help="client counts, comma-separated; max = fd limit")
    parser.add_argument(
        "--seconds", type=float, default=DEFAULT_SECONDS, help=f"measurement window (default {DEFAULT_SECONDS:g})"
    )
    parser.add_argument("--changing", type=int, default=1, help="DATA values that change on every frame (default 1)")
    parser.add_argument(
        "--window",
        type=int,
        default=outbox_window,
        help=f"bare publisher's window (default: Outbox's, {outbox_window})",
    )
    parser.add_argument("--profile-at", default="100", help="client count whose gateway is profiled ('' for none)")
    parser.add_argument("--profile-seconds", type=float, default=4.0, help="length of each profile (default 4)")
    parser.add_argument(
        "--compare-at",
        default="100",
        help="client count also run with McpClient, constant values, the broker in its own process ('' for none)",
    )
    parser.add_argument(
        "--broker",
        choices=list(LAYOUTS),
        default=shipped_layout,
        help=f"the embedded broker's layout for the main runs (default: the config's, {shipped_layout})",
    )
    parser.add_argument("--warmup-max", type=float, default=25.0, help="longest warm-up per run (default 25 s)")
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be > 0")
    counts: list[int | None] = []
    for c in args.clients.split(","):
        c = c.strip()
        if c:
            counts.append(None if c == "max" else int(c))
    started = time.monotonic()
    header(args)
    rows: list[Row] = []
    failures = 0

    def attempt(run: Callable[[], Row], failed: Row) -> Row:
        """One run; when it fails, its traceback and `failed` (no window: rate NaN) instead, and on to the next,
        so that the table shows the failure as "not measured" rows and the other runs still count."""
        nonlocal failures
        try:
            return run()
        except Exception:
            failures += 1
            traceback.print_exc()
            return failed

    with tempfile.TemporaryDirectory(prefix="fieldgate-mcpbench-") as tmp_name:
        tmp = Path(tmp_name)
        progress("bare paho baseline ...")
        bare = attempt(
            lambda: run_bare(args.window, args.changing, args.seconds), Row("bare paho", "paho", args.changing)
        )
        for n in counts:
            label = "max" if n is None else str(n)
            progress(f"MCP, {label} client(s) ...")
            profiled = args.profile_at and label == args.profile_at
            profile = args.profile_seconds if profiled else 0.0
            rows.append(
                attempt(
                    functools.partial(
                        run_mcp, n, "raw", args.changing, args.seconds, tmp, profile, args.warmup_max, args.broker
                    ),
                    Row(label, "raw", args.changing, broker=args.broker),
                )
            )
        if args.compare_at:
            n = None if args.compare_at == "max" else int(args.compare_at)
            others = [b for b in LAYOUTS if b != args.broker]
            variants = [("mcpclient", args.changing, args.broker)] + [("raw", args.changing, b) for b in others]
            if args.changing:
                variants += [("raw", 0, b) for b in [args.broker, *others]]
            for impl, changing, broker in variants:
                what = f"{impl}, {changing} changing value(s), broker {LAYOUTS[broker]}"
                progress(f"MCP, {args.compare_at} client(s), {what} ...")
                rows.append(run_mcp(n, impl, changing, args.seconds, tmp, 0.0, args.warmup_max, broker))
    report_bare(bare, args.window)
    report_mcp(rows, bare, inspect.signature(Outbox).parameters["high_water"].default)
    report_sessions(rows)
    for r in rows:
        title = f"4. Where the gateway's time goes ({r.label} clients, full windows)"
        report_profile(title, r.profiles, r.per_frame_us("gateway"))
    print()
    if failures:
        print(f"{failures} run(s) failed: their figures are not measured (tracebacks above)")
    print(run_summary(started))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
