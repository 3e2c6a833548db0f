"""Benchmark of a Sparkplug B sink against the topic contract's JSON sink: gateway CPU and bytes on the wire per
field sample, and the time from the sink's connect to the last DBIRTH of 100 devices x 50 points.

Each comparison runs the same gateway config twice, its one northbound sink (`up`) to a Mosquitto of the bench's
own (the embedded broker disabled in both runs), once `format: json` (the default QoS 1) and once
`format: sparkplug`, and reads in the same window:

- the gateway process's CPU (user + sys: its own time.process_time(), to the nanosecond; /proc counts 10 ms
  ticks) and the field samples its router was handed (one MCP DATA frame, one Modbus poll result: counted in
  the gateway, whichever sink it has). "Per message" below is per field sample, the unit the goal uses: a JSON
  sink publishes several MQTT messages for one sample (its telemetry plus a retained message per changed
  point), a Sparkplug sink one DDATA. CPU per MQTT message is printed too;
- what a paho subscriber on `#` receives: messages, topic + payload bytes, and whole PUBLISH packets (computed
  from those at the QoS they came with). It decodes every Sparkplug payload with our pb2 and every JSON telemetry,
  so that the table shows the metrics a DDATA carries against the values a telemetry message carries.

Scenarios: (1) an MCP load of 1,000 DATA frames/s (paced, round robin over 20 devices; 3 values change on every
frame, one never does; goal: Sparkplug CPU per frame <= 1.5 x JSON's); (2) the shipped config.yaml's devices
(its simulator in a process of its own, ports moved to free ones); (3) 100 MCP devices declaring 50 points each,
online with values, then Mosquitto restarted: time from the sink's "connected" (its log line, in the gateway
process) to the last DBIRTH the subscriber receives; and after an NCMD Node Control/Rebirth, from the NCMD to
the last DBIRTH.

Run from the repository root:  .venv/bin/python hil/bench/sparkplug_bench.py [--short] [--profile]
hil/bench/README.md says what each figure means.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# benchlib first: it puts the repository on sys.path for the imports below.
import benchlib
import yaml
from benchlib import free_port, heading, note, package_version, print_header, progress, record, run_summary, summary
from benchlib.children import Child, Pid, stop_all
from benchlib.configs import config, gateway_section, mcp_device, mcp_section, write_config
from benchlib.mqtt import Mosquitto
from benchlib.sparkplug import counted_gateway_child, paced_child, simulator_child, wire_child
from gateway_bench import shipped_copy

GATEWAY_ID = "bench"
GROUP = "bench"
FORMATS = ("json", "sparkplug")
CPU_GOAL = 1.5  # the issue's: the protobuf path costs at most 1.5x the JSON path's CPU per message
BYTES_GOAL = 1.0  # ours: protobuf with aliases must not put more on the wire than JSON per sample
BIRTH_GOAL = 2.0  # s, ours: a host sees 100 x 50 metrics born within 2 s of the connect
READY_TIMEOUT = 60.0
BIRTH_TIMEOUT = 30.0
RATE = 1000.0
LOAD_DEVICES = 20
CHANGING = 3
WARMUP = 3.0
BIRTH_DEVICES, BIRTH_POINTS = 100, 50
#: Every bench device connects from 127.0.0.1 at once: the per-address login limits would hold them off.
OPEN_LOGINS = {"max_pending": 100_000, "max_pending_per_ip": 100_000}


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print rows under headers, thousands separators, "-" for a missing value."""
    benchlib.print_table(headers, rows, thousands=True, blank="-")


def sink(fmt: str, url: str) -> dict[str, Any]:
    """The one northbound sink of a run."""
    out: dict[str, Any] = {"name": "up", "url": url, "format": fmt}
    if fmt == "sparkplug":
        out["sparkplug"] = {"group_id": GROUP}
    return out


# --- one measured window ---------------------------------------------------------------------------------------


@dataclass
class Run:
    """What one format's window measured."""

    scenario: str
    fmt: str
    wall: float = float("nan")
    samples: int = 0
    values: int = 0
    gw_cpu: float = float("nan")
    broker_cpu: float = float("nan")
    msgs: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    packets: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, int] = field(default_factory=dict)
    historical: int = 0
    errors: int = 0
    load: dict[str, Any] = field(default_factory=dict)  # the paced devices' counts in the window
    queued: int = 0
    profile: dict[str, Any] | None = None

    def per_sample(self, x: float) -> float:
        """x per field sample."""
        return x / self.samples if self.samples else float("nan")

    @property
    def cpu_us(self) -> float:
        """Gateway CPU per field sample, µs."""
        return self.per_sample(self.gw_cpu) * 1e6

    @property
    def total_msgs(self) -> int:
        """MQTT messages the subscriber received."""
        return sum(self.msgs.values())

    @property
    def data_kind(self) -> str:
        """The message that carries a sample's values."""
        return "DDATA" if self.fmt == "sparkplug" else "telemetry"


def _diff(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: b.get(k, 0) - a.get(k, 0) for k in sorted(set(a) | set(b)) if b.get(k, 0) - a.get(k, 0)}


def measure(run: Run, gw: Child, wire: Child, broker: Pid, seconds: float, load: Child | None, profile: float) -> None:
    """Counters and CPU at the start and the end of a window of `seconds`; then a cProfile of `profile` s."""
    s0, w0, l0 = gw.call("status"), wire.call("count"), load.call("count") if load else {}
    bcpu0 = broker.cpu()
    time.sleep(seconds)
    bcpu1 = broker.cpu()
    s1, w1, l1 = gw.call("status"), wire.call("count"), load.call("count") if load else {}
    run.wall = s1["time"] - s0["time"]
    run.samples, run.values = s1["samples"] - s0["samples"], s1["values"] - s0["values"]
    run.gw_cpu, run.broker_cpu = s1["cpu"] - s0["cpu"], bcpu1 - bcpu0
    for name in ("msgs", "bytes", "packets", "metrics"):
        setattr(run, name, _diff(w0[name], w1[name]))
    run.historical, run.errors = w1["historical"] - w0["historical"], w1["errors"]
    run.load = {k: l1.get(k, 0) - l0.get(k, 0) for k in ("sent", "acked", "nacked", "held", "lost")} if load else {}
    run.queued = s1["queued"]
    if profile:
        progress(f"  profiling the gateway ({run.fmt}) with cProfile for {profile:g} s ...")
        run.profile = gw.call("profile", profile, timeout=profile + 120)


def start_wire(port: int) -> Child:
    """The subscriber, ready."""
    wire = Child("wire", wire_child, port, "#")
    wire.wait(READY_TIMEOUT)
    return wire


def start_gateway(path: Path) -> tuple[Child, dict[str, Any]]:
    """The gateway child on a config, ready (its sink connected)."""
    gw = Child("gateway", counted_gateway_child, str(path))
    return gw, gw.wait(READY_TIMEOUT)


# --- (1) MCP at a paced rate -------------------------------------------------------------------------------


def run_mcp(fmt: str, args: argparse.Namespace, tmp: Path, profile: float) -> Run:
    """The paced MCP load through one sink format."""
    run = Run("mcp", fmt)
    mosq = Mosquitto(tmp / f"mosq-mcp-{fmt}", free_port())
    devices = [(f"d{i}", f"token-{i:010d}") for i in range(args.devices)]
    mcp = mcp_section(f"127.0.0.1:{free_port()}", [mcp_device(d, t) for d, t in devices], **OPEN_LOGINS)
    children: list[Child] = []
    try:
        mosq.start()
        gw_cfg = config(
            gateway=gateway_section(GATEWAY_ID, tmp / f"state-mcp-{fmt}"),
            broker={"enabled": False},
            northbound=[sink(fmt, mosq.url)],
            mcp=mcp,
        )
        path = write_config(tmp / f"mcp-{fmt}.yaml", gw_cfg)
        children.append(wire := start_wire(mosq.port))
        gw, info = start_gateway(path)
        children.append(gw)
        children.append(load := Child("devices", paced_child, devices, args.rate, args.changing))
        load.wait(READY_TIMEOUT)
        done = load.call("connect", info["mcp_port"], timeout=READY_TIMEOUT)
        if done["failed"]:
            raise RuntimeError(f"{done['failed']} devices did not connect: {done['first_error']}")
        load.call("go")
        time.sleep(WARMUP)
        assert mosq.pid is not None
        measure(run, gw, wire, Pid(mosq.pid), args.seconds, load, profile)
    finally:
        stop_all(children)
        mosq.stop()
    return run


# --- (2) the shipped demo config ---------------------------------------------------------------------------


def run_demo(fmt: str, args: argparse.Namespace, tmp: Path, profile: float) -> Run:
    """The shipped config's devices (simulated in a process of their own) through one sink format."""
    run = Run("demo", fmt)
    work = tmp / f"demo-{fmt}"
    work.mkdir()
    mosq = Mosquitto(work / "mosq", free_port())
    sim_path = shipped_copy(work)  # the shipped file, its ports moved to free ones
    cfg = yaml.safe_load(sim_path.read_text())
    cfg.pop("simulator")
    cfg["gateway"].update(state_dir=str(work / "var"), http=None)
    cfg["broker"] = {"enabled": False}
    cfg["northbound"] = [sink(fmt, mosq.url)]
    gw_path = write_config(work / "gateway.yaml", cfg)
    children: list[Child] = []
    try:
        mosq.start()
        children.append(sim := Child("simulator", simulator_child, str(sim_path)))
        sim.wait(READY_TIMEOUT)
        children.append(wire := start_wire(mosq.port))
        gw, info = start_gateway(gw_path)
        children.append(gw)
        sim.call("mcp", info["mcp_port"])
        time.sleep(WARMUP + 2)  # every device polled or pushed once (the slowest poll is 2 s)
        assert mosq.pid is not None
        measure(run, gw, wire, Pid(mosq.pid), args.demo_seconds, None, profile)
    finally:
        stop_all(children)
        mosq.stop()
    return run


# --- (3) births of 100 devices x 50 points -------------------------------------------------------------------


@dataclass
class Births:
    """The birth figures."""

    connect_to_nbirth: float = float("nan")
    connect_to_last: float = float("nan")
    dbirths: int = 0
    metrics: tuple[int, int] = (0, 0)  # fewest and most metrics in one DBIRTH
    birth_bytes: int = 0
    rebirth_to_last: float = float("nan")
    rebirths: int = 0
    attempts: int = 0


def birth_points() -> tuple[list[dict[str, Any]], int]:
    """The 50 points each birth device declares (the values fleet.data_values sends) and how many change."""
    changing = BIRTH_POINTS - 1
    names = ["flow_lpm", *(f"flow{i}" for i in range(1, changing))]
    return [{"name": n, "type": "number", "unit": "l/min"} for n in names] + [{"name": "running", "type": "bool"}], (
        changing
    )


def wait_births(wire: Child, after: float, want: int, timeout: float) -> list[tuple[str, str, float, int]]:
    """The births received after `after` (monotonic) once `want` DBIRTHs came (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while True:
        births = [b for b in wire.call("count")["births"] if b[2] > after]
        if sum(1 for b in births if b[0] == "DBIRTH") >= want or time.monotonic() > deadline:
            return births
        time.sleep(0.05)


def run_births(tmp: Path) -> Births:
    """100 MCP devices of 50 declared points online; Mosquitto restarted: the sink's connect -> the last DBIRTH."""
    from bridge.sparkplug.node import REBIRTH_INTERVAL
    from bridge.sparkplug.sparkplug_b_pb2 import Payload

    out = Births()
    points, changing = birth_points()
    devices = [(f"b{i:03d}", f"token-{i:010d}") for i in range(BIRTH_DEVICES)]
    mosq = Mosquitto(tmp / "mosq-births", free_port())
    mcp = mcp_section(f"127.0.0.1:{free_port()}", [mcp_device(d, t, points=points) for d, t in devices], **OPEN_LOGINS)
    gw_cfg = config(
        gateway=gateway_section(GATEWAY_ID, tmp / "state-births"),
        broker={"enabled": False},
        northbound=[sink("sparkplug", mosq.url)],
        mcp=mcp,
    )
    path = write_config(tmp / "births.yaml", gw_cfg)
    children: list[Child] = []
    try:
        mosq.start()
        children.append(wire := start_wire(mosq.port))
        gw, info = start_gateway(path)
        children.append(gw)
        children.append(load := Child("devices", paced_child, devices, 0.0, changing))
        load.wait(READY_TIMEOUT)
        done = load.call("connect", info["mcp_port"], timeout=READY_TIMEOUT)
        if done["failed"]:
            raise RuntimeError(f"{done['failed']} devices did not connect: {done['first_error']}")
        load.call("go")  # one DATA frame each, all 50 values: every device online with values
        first = wait_births(wire, 0.0, BIRTH_DEVICES, BIRTH_TIMEOUT)
        if sum(1 for b in first if b[0] == "DBIRTH") < BIRTH_DEVICES:
            raise RuntimeError("not every device was born at the first connect")
        time.sleep(1.0)  # the last DDATA out
        for attempt in range(1, 4):
            out.attempts = attempt
            mosq.stop()
            time.sleep(0.3)
            restarted = time.monotonic()
            mosq.start()
            births = wait_births(wire, restarted, BIRTH_DEVICES, BIRTH_TIMEOUT)
            connects = [t for t in gw.call("status")["connects"] if t > restarted]
            # The subscriber must have been back before the gateway's sink, or it missed the NBIRTH (QoS 0).
            if connects and any(b[0] == "NBIRTH" for b in births):
                break
        else:
            return out
        dbirths = [b for b in births if b[0] == "DBIRTH"]
        nbirth = min(b[2] for b in births if b[0] == "NBIRTH")
        out.dbirths = len({b[1] for b in dbirths})
        out.metrics = (min(b[3] for b in dbirths), max(b[3] for b in dbirths))
        if out.dbirths >= BIRTH_DEVICES:
            out.connect_to_nbirth = nbirth - connects[0]
            out.connect_to_last = max(b[2] for b in dbirths) - connects[0]
        # Node Control/Rebirth, as a host sends it: NBIRTH and every DBIRTH again. Past the node's rebirth
        # interval since the connect's births: one that comes sooner is answered at the end of the interval.
        time.sleep(REBIRTH_INTERVAL + 0.5)
        ncmd = Payload(timestamp=int(time.time() * 1000))
        m = ncmd.metrics.add()
        m.name, m.datatype, m.boolean_value = "Node Control/Rebirth", 11, True
        w0 = wire.call("count")
        sent = wire.call("publish", (f"spBv1.0/{GROUP}/NCMD/{GATEWAY_ID}", ncmd.SerializeToString(), 0, False))
        again = wait_births(wire, sent, BIRTH_DEVICES, BIRTH_TIMEOUT)
        re_d = [b for b in again if b[0] == "DBIRTH"]
        out.rebirths = len({b[1] for b in re_d})
        if out.rebirths >= BIRTH_DEVICES:
            out.rebirth_to_last = max(b[2] for b in re_d) - sent
        w1 = wire.call("count")
        out.birth_bytes = sum(w1["bytes"].get(k, 0) - w0["bytes"].get(k, 0) for k in ("NBIRTH", "DBIRTH"))
    finally:
        stop_all(children)
        mosq.stop()
    return out


# --- the report --------------------------------------------------------------------------------------------


def report_pair(title: str, runs: dict[str, Run], what: str) -> tuple[float, float]:
    """A scenario's table, JSON then Sparkplug; (CPU ratio, bytes ratio) Sparkplug over JSON."""
    heading(title)
    rows: list[list[object]] = []
    for fmt in FORMATS:
        r = runs.get(fmt)
        if r is None:
            rows.append([fmt, "failed", *(["-"] * 13)])
            continue
        data = r.msgs.get(r.data_kind, 0)
        rows.append(
            [
                fmt,
                r.wall,
                r.samples / r.wall if r.wall else float("nan"),
                r.per_sample(r.values),
                r.per_sample(r.metrics.get(r.data_kind, 0)),
                r.per_sample(data),
                r.per_sample(r.total_msgs),
                r.cpu_us,
                r.gw_cpu / r.total_msgs * 1e6 if r.total_msgs else float("nan"),
                r.gw_cpu / r.wall * 100 if r.wall else float("nan"),
                r.per_sample(r.broker_cpu) * 1e6,
                r.per_sample(sum(r.bytes.values())),
                sum(r.bytes.values()) / r.total_msgs if r.total_msgs else float("nan"),
                r.per_sample(sum(r.packets.values())),
                r.per_sample(r.bytes.get(r.data_kind, 0)),
            ]
        )
    print_table(
        [
            "sink",
            "window s",
            "samples/s",
            "values/smp",
            "data metrics/smp",
            "data msgs/smp",
            "MQTT msgs/smp",
            "gw µs/smp",
            "gw µs/msg",
            "gw core%",
            "broker µs/smp",
            "bytes/smp",
            "bytes/msg",
            "packet B/smp",
            "data B/smp",
        ],
        rows,
    )
    note(f"smp = one field sample ({what}), counted in the gateway as its router is handed it; the goal is per sample.")
    note("data metrics: Sparkplug metrics in DDATA (decoded with our pb2) / values in JSON telemetry (json.loads);")
    note("data msgs: DDATA / telemetry messages. MQTT msgs: all the subscriber got (JSON: telemetry, a retained")
    note("message per changed point, status, metrics; Sparkplug: DDATA, NDATA, births).")
    note("gw µs: gateway process CPU (user+sys, process_time) per sample / per MQTT message. broker: Mosquitto's")
    note("CPU (/proc, 10 ms ticks).")
    note("bytes: topic + payload as received; packet B: whole PUBLISH packets at the QoS they came with;")
    note("data B: DDATA / telemetry bytes only.")
    for r in runs.values():
        kinds = ", ".join(f"{k} {v / r.wall:,.1f}/s" for k, v in sorted(r.msgs.items()))
        note(f"{r.fmt}: received {kinds}; {r.historical} historical metrics; {r.errors} undecodable; queued {r.queued}")
        if r.load:
            lr = {k: v / r.wall for k, v in r.load.items()}
            note(
                f"{r.fmt}: devices sent {lr['sent']:,.0f}/s, ACKed {lr['acked']:,.0f}/s, NACKed {lr['nacked']:,.0f}/s,"
                f" held back (window full) {lr['held']:,.0f}/s"
            )
    j, s = runs.get("json"), runs.get("sparkplug")
    if j is None or s is None:
        return float("nan"), float("nan")
    cpu_ratio = s.cpu_us / j.cpu_us
    bytes_ratio = s.per_sample(sum(s.bytes.values())) / j.per_sample(sum(j.bytes.values()))
    summary(
        f"Sparkplug / JSON per sample: gateway CPU {s.cpu_us:.0f} / {j.cpu_us:.0f} µs = {cpu_ratio:.2f} "
        f"(goal <= {CPU_GOAL}); bytes {bytes_ratio:.2f}; MQTT messages "
        f"{s.per_sample(s.total_msgs):.2f} / {j.per_sample(j.total_msgs):.2f}"
    )
    return cpu_ratio, bytes_ratio


def record_pair(runs: dict[str, Run], label: str, unit_name: str) -> None:
    """The scenario's two headline figures (NaN when a run failed)."""
    j, s = runs.get("json"), runs.get("sparkplug")
    nan = float("nan")
    s_cpu = s.cpu_us if s else nan
    j_cpu = j.cpu_us if j else nan
    s_b = s.per_sample(sum(s.bytes.values())) if s else nan
    j_b = j.per_sample(sum(j.bytes.values())) if j else nan
    record(
        "sparkplug",
        f"gateway CPU per {unit_name}, {label}, Sparkplug",
        s_cpu,
        "µs",
        ratio=s_cpu / j_cpu,
        versus=f"JSON sink {j_cpu:.0f} µs" if j else "JSON sink: failed",
        most=CPU_GOAL,
    )
    record(
        "sparkplug",
        f"bytes on the wire per {unit_name}, {label}, Sparkplug",
        s_b,
        "bytes",
        ratio=s_b / j_b,
        versus=f"JSON sink {j_b:.0f} bytes" if j else "JSON sink: failed",
        most=BYTES_GOAL,
    )


def report_profiles(runs: dict[str, Run]) -> None:
    """Where each format's gateway time went, per sample (cProfile)."""
    for r in runs.values():
        p = r.profile
        if not p:
            continue
        heading(f"Where the gateway's time goes, {r.scenario}, {r.fmt} sink (cProfile, {p['seconds']:.1f} s)")
        print_table(["part", "self µs/sample"], [[k, v] for k, v in p["parts_us"].items()])
        print()
        print_table(["function", "calls/sample", "self µs/sample", "cum µs/sample"], [list(x) for x in p["top"]])
        note("cProfile inflates small Python functions; its µs are larger than the unprofiled figures above.")


def report_births(b: Births | None) -> None:
    """Figure 3."""
    heading(f"3. Births: {BIRTH_DEVICES} MCP devices x {BIRTH_POINTS} declared points, Mosquitto restarted")
    if b is None:
        print("  failed (traceback above)")
    else:
        print_table(
            [
                "connect -> NBIRTH s",
                "connect -> last DBIRTH s",
                "DBIRTHs",
                "metrics/DBIRTH",
                "NCMD -> last DBIRTH s",
                "rebirth DBIRTHs",
                "birth bytes",
                "restarts",
            ],
            [
                [
                    b.connect_to_nbirth,
                    b.connect_to_last,
                    b.dbirths,
                    f"{b.metrics[0]}-{b.metrics[1]}",
                    b.rebirth_to_last,
                    b.rebirths,
                    b.birth_bytes,
                    b.attempts,
                ]
            ],
        )
        note("connect: the gateway logs its sink's `connected` (time.monotonic, one clock for every process here);")
        note("DBIRTH: its arrival at the subscriber. NCMD: Node Control/Rebirth published by the subscriber.")
        note("birth bytes: topic + payload of the NBIRTH and DBIRTHs of one rebirth. restarts: of Mosquitto, until")
        note("the subscriber was back before the gateway's sink (it must see the QoS 0 NBIRTH).")
        summary(f"connect -> last DBIRTH {b.connect_to_last:.2f} s (goal <= {BIRTH_GOAL:g} s)")
    record(
        "sparkplug",
        f"connect → last DBIRTH, {BIRTH_DEVICES} devices x {BIRTH_POINTS} points",
        b.connect_to_last if b else float("nan"),
        "s",
        most=BIRTH_GOAL,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios, print the report."""
    parser = argparse.ArgumentParser(description="Sparkplug B sink against JSON sink (see hil/bench/README.md).")
    parser.add_argument("--short", action="store_true", help="shorter windows (the suite's): 8 s MCP, 12 s demo")
    parser.add_argument("--seconds", type=float, default=None, help="MCP load window (default 20, short 8)")
    parser.add_argument("--demo-seconds", type=float, default=None, help="demo config window (default 30, short 12)")
    parser.add_argument("--rate", type=float, default=RATE, help=f"MCP DATA frames/s (default {RATE:g})")
    parser.add_argument("--devices", type=int, default=LOAD_DEVICES, help=f"MCP devices (default {LOAD_DEVICES})")
    parser.add_argument("--changing", type=int, default=CHANGING, help=f"values changing per frame ({CHANGING})")
    parser.add_argument("--profile", type=float, default=0.0, help="cProfile each MCP run for N s (0: only on a miss)")
    parser.add_argument("--only", default="mcp,demo,births", help="scenarios, comma-separated")
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (8.0 if args.short else 20.0)
    args.demo_seconds = args.demo_seconds or (12.0 if args.short else 30.0)
    only = {s.strip() for s in args.only.split(",")}
    started = time.monotonic()
    print_header(
        "Sparkplug",
        {n: package_version(n) for n in ("protobuf", "paho-mqtt")},
        [
            f"MCP load {args.rate:g} frames/s over {args.devices} devices ({args.changing} changing + 1 constant "
            f"value), windows {args.seconds:g} s; demo config {args.demo_seconds:g} s; one sink to Mosquitto",
        ],
        skews="every CPU figure",
    )
    failures = 0

    def attempt(what: str, fn: Callable[[], Any]) -> Any:
        nonlocal failures
        progress(what + " ...")
        try:
            return fn()
        except Exception:
            failures += 1
            traceback.print_exc()
            return None

    with tempfile.TemporaryDirectory(prefix="fieldgate-spbench-") as tmp_name:
        tmp = Path(tmp_name)
        if "mcp" in only:
            mcp: dict[str, Run] = {}
            for fmt in FORMATS:
                what = f"MCP {args.rate:g} frames/s, {fmt} sink"
                got = attempt(what, functools.partial(run_mcp, fmt, args, tmp, args.profile))
                if got:
                    mcp[fmt] = got
            ratio, _ = report_pair(f"1. MCP load, {args.rate:,.0f} DATA frames/s", mcp, "one MCP DATA frame")
            record_pair(mcp, f"MCP {args.rate:,.0f} frames/s", "MCP DATA frame")
            if ratio > CPU_GOAL and not args.profile:
                for fmt in FORMATS:
                    got = attempt(
                        f"again, profiled: {fmt}", functools.partial(run_mcp, fmt, args, tmp, min(args.seconds, 6))
                    )
                    if got:
                        mcp[fmt] = got
            report_profiles(mcp)
        if "demo" in only:
            demo: dict[str, Run] = {}
            for fmt in FORMATS:
                got = attempt(f"shipped demo config, {fmt} sink", functools.partial(run_demo, fmt, args, tmp, 0.0))
                if got:
                    demo[fmt] = got
            report_pair("2. The shipped demo config (config.yaml's simulated devices)", demo, "one poll or DATA frame")
            record_pair(demo, "shipped demo config", "field sample")
        if "births" in only:
            report_births(attempt("births, 100 x 50", lambda: run_births(tmp)))
    print()
    if failures:
        print(f"{failures} run(s) failed: their figures are not measured (tracebacks above)")
    print(run_summary(started))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
