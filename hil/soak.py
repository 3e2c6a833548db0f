"""Memory soak: a whole `fieldgate run` process under hours' worth of traffic, compressed, its RSS sampled.

What runs (Linux only: ptys and /proc):

- the gateway as a subprocess (`python -m gateway run -c soak.yaml`, the config written to a temp
  dir), with its embedded broker in a child process of its own (`broker.process: separate`, the
  default), `http: null`;
- in this process: Modbus slaves on a `VirtualLine` (no baud pacing) polled every `--poll`
  (default 20 ms) by the gateway, whose values change at every read (a counter, a float, a
  bitfield), so every poll publishes a telemetry message and the per-point retained values; MCP
  devices (`McpSimDevice`) pushing a DATA frame every `--mcp-interval`, one of them (all but the
  first, in turn) reconnecting (a new session, a new boot id) every `--mcp-reconnect`; an upstream broker stand-in
  (`AckingBroker`: PUBACKs every publish, keeps nothing) that the second sink publishes to and
  that goes away for `--outage-for` every `--outage-every`, so that the spool takes the traffic
  and replays it; a paho subscriber (QoS 1) consuming everything on the embedded broker, which
  also sends one `set` (to each Modbus device in turn) and one `cmd` (`ping`, to the first MCP
  device) per second: router tasks, the write path, the command path, the audit log.

What is sampled every second: VmRSS of the gateway and of its broker child, the Modbus reads
answered (the simulator's count), the messages consumed on the embedded broker and PUBACKed
upstream, the MCP frames ACKed.

Decisions:

- **Equivalent hours** = Modbus reads answered / the reads one hour of the shipped `config.yaml`
  makes: for every device its simulator section serves, its planned reads per poll × 3600 / its
  poll interval (boiler1 3 per 1 s, boiler2 3 per 2 s, meter 1 per 1 s: 19,800 reads/h). Messages
  and MCP frames are reported alongside; they depend on how much each value moves.
- **Warm-up** = the first `--warmup` (default 30 %) of the run, and at least two outage cycles:
  the outbox, the spool's page cache, amqtt's retained store and the allocator's arenas reach their
  high-water marks once every kind of traffic (including a whole outage and its replay) has been
  seen. CPython rarely hands memory back, so RSS afterwards is a plateau, unless something leaks.
- **Comparison** = the median RSS of the first `--window` (default 15 %) after the warm-up against
  the median of the last `--window` of the run: a median of tens of samples ignores the transient
  peaks of an outage and allocator noise. Growth % = (last − first) / first × 100. The broker child
  (amqtt, third-party) is reported the same way but not part of the verdict.
- **Bytes per message** = the same RSS difference / the messages the gateway published between the
  two windows' midpoints: what a per-message leak would show, independent of the run's length.
- **Steady bytes per message** = the mean one-second RSS increment after the warm-up, the largest
  25 % of increments left out, / the mean messages per second. A leak shows in nearly every second;
  the high-water steps that replay bursts leave (a few, up to ~1.4 MiB each, in the first minutes,
  then none) do not. This is what a short run (the test's default) can judge; `--leak N` makes the
  gateway keep N bytes per message, to check that it does.
- **Verdict**: a run of 10 minutes or more passes when the gateway's growth is < `--goal` (1 %); a
  shorter one when its steady growth is < 16 bytes per message (keeping any Python object per
  message costs more: an empty `bytes` and its list slot, 41).

`--trace` runs the gateway under tracemalloc (this module's `--traced-gateway` entry, never the
product's normal path) and prints the allocation sites that grew between the end of the warm-up and
the end of the run: what to look at when the growth is not flat. The tracing itself costs memory, so
its growth figure is not comparable with an untraced run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from drivers.modbus.device import Device
from drivers.sim.line import VirtualLine
from drivers.sim.mcp import McpSimDevice
from drivers.sim.modbus import ModbusSimulator, SimPoint, SimSlave
from drivers.sim.waves import Wave
from gateway.config import load_config, parse_config
from gateway.config.schema import Config
from gateway.config.settings import modbus_line as line_settings
from gateway.simulation import resolve_path
from hil.bench.benchlib import ROOT, configs, free_port, print_table
from hil.bench.benchlib.configs import (
    gateway_section,
    loopback_listener,
    mcp_device,
    mcp_section,
    modbus_device,
    modbus_line,
)
from hil.bench.benchlib.procs import GatewayProcess, rss_kb_or_zero

PREFIX = "fieldgate/soak"
TOKEN = "soak-token-0123456"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
TRACE_FRAMES = 20
#: The entry that runs `fieldgate` instrumented (argv[1] of `python -m hil.soak`): traced, or leaking on purpose.
INSTRUMENTED_GATEWAY = "--instrumented-gateway"
#: Where a traced gateway dumps its snapshot on SIGUSR2.
TRACE_FILE_ENV = "FIELDGATE_SOAK_TRACE_FILE"
#: Bytes an instrumented gateway keeps for every message handed to a sink (to check that the soak sees a leak).
LEAK_ENV = "FIELDGATE_SOAK_LEAK"
#: The share of the largest one-second RSS increments the steady figure leaves out (replay bursts' high-water steps).
JUMPS = 0.25
#: The steady growth per message a short run accepts: keeping any Python object per message costs more.
MAX_STEADY_BYTES_PER_MESSAGE = 16.0
#: Runs this long (s) are judged by their growth % (< goal); shorter ones by their steady growth per message.
JUDGE_GROWTH_FROM = 600.0


# --- the settings and the gateway's config -----------------------------------------------------------


@dataclass(frozen=True)
class SoakSettings:
    """How long, how fast and how much of each kind of traffic."""

    seconds: float = 20 * 60.0
    devices: int = 3  # Modbus slaves on the line, one planned read of 5 registers each
    poll: float = 0.02
    mcp_devices: int = 3
    mcp_interval: float = 0.05
    mcp_reconnect: float = 10.0  # one MCP device in turn drops its session and starts a new one this often
    outage_every: float = 30.0  # the upstream broker goes away this often...
    outage_for: float = 5.0  # ...for this long
    requests_every: float = 1.0  # one `set` and one `cmd` request this often
    warmup: float = 0.30
    window: float = 0.15
    goal: float = 1.0  # growth %, gateway
    sample_every: float = 1.0
    trace: bool = False
    leak: int = 0  # bytes the gateway is made to keep per message handed to a sink: a check of the soak itself

    @classmethod
    def screening(cls, seconds: float) -> SoakSettings:
        """A run of a minute or less: outages and MCP reconnects several times as often, so that each has been
        seen twice before the warm-up ends, and wider windows."""
        return cls(seconds=seconds, outage_every=6.0, outage_for=2.0, mcp_reconnect=3.0, window=0.2)

    @property
    def warmup_seconds(self) -> float:
        """The warm-up: a share of the run, and at least two whole outage cycles when the run has room for them."""
        cycles = 2 * self.outage_every + self.outage_for
        return max(self.warmup * self.seconds, min(cycles, 0.5 * self.seconds))

    @property
    def window_seconds(self) -> float:
        """Length of each of the two windows compared."""
        return self.window * self.seconds


def device_names(s: SoakSettings) -> tuple[list[str], list[str]]:
    """The Modbus device names and the MCP device ids."""
    return [f"plc{i + 1}" for i in range(s.devices)], [f"pump-{i + 1}" for i in range(s.mcp_devices)]


#: The points of every Modbus device of the soak (simulated_slaves moves each at every read).
SOAK_POINTS = (
    {"name": "counter", "table": "holding", "address": 0, "type": "uint16"},
    {"name": "level", "table": "holding", "address": 1, "type": "float32"},
    {
        "name": "status",
        "table": "holding",
        "address": 3,
        "type": "bitfield",
        "bits": {0: "running", 1: "heating", 2: "pump"},
    },
    {"name": "setpoint", "table": "holding", "address": 4, "type": "int16", "writable": True, "min": 0, "max": 1000},
)


def gateway_config(s: SoakSettings, *, broker: int, upstream: int, mcp: int) -> dict[str, Any]:
    """The gateway's config: fast Modbus line, MCP devices, the embedded broker and an upstream sink with a spool."""
    plcs, pumps = device_names(s)
    line = modbus_line(
        "fast",
        "./ttySOAK",
        [modbus_device(name, i + 1, SOAK_POINTS, poll=f"{s.poll * 1000:g}ms") for i, name in enumerate(plcs)],
        baudrate=115200,
        parity="N",
        timeout="500ms",
        inter_request_delay="0s",
    )
    return configs.config(
        gateway=gateway_section("soak", "./state", http=None, log_level="INFO"),
        broker={"listeners": [loopback_listener(broker)]},
        northbound=[
            {"name": "local"},
            {
                "name": "upstream",
                "url": f"mqtt://127.0.0.1:{upstream}",
                "keepalive": "5s",
                # No replay delay: the short run's outages come every few seconds (the fleet's spreading delay is
                # measured by hil/fleet.py).
                "spool": {"commit_window": "50ms", "replay_rate": 20000, "replay_delay": 0},
            },
        ],
        modbus=[line],
        mcp=mcp_section(f"127.0.0.1:{mcp}", [mcp_device(pid, TOKEN, write_rate=50) for pid in pumps]),
    )


def shipped_reads_per_hour(path: Path = ROOT / "config.yaml") -> float:
    """Modbus reads one hour of a config makes: every device its simulator serves, planned reads × 3600 / poll."""
    cfg = load_config(path).config
    base = path.resolve().parent
    live: set[tuple[str, int]] = set()
    if cfg.simulator:
        for line in cfg.simulator.modbus:
            live |= {(resolve_path(line.link, base), d.unit) for d in line.devices if not d.dead}
        for endpoint in cfg.simulator.modbus_tcp:
            live |= {(f"tcp://{endpoint.listen}", d.unit) for d in endpoint.devices if not d.dead}
    total = 0.0
    for bus in cfg.modbus.buses:
        settings = line_settings(bus)
        for dev in settings.devices:
            if (resolve_path(bus.port, base), dev.unit) in live:
                total += sum(len(job.requests) * 3600.0 / job.interval for job in Device(dev, settings).jobs)
    return total


def simulated_slaves(cfg: Config) -> list[SimSlave]:
    """The slaves behind the soak's line: values that move at every read."""
    waves = {
        "counter": Wave(kind="ramp", min=0, max=65535, step=1, period=0.001),
        "level": Wave(kind="sine", min=0, max=100, period=3.7),
        "status": Wave(kind="bits", period=0.25),
        "setpoint": Wave(value=20),
    }
    bus = line_settings(cfg.modbus.buses[0])
    return [
        SimSlave(d.unit, [SimPoint(p.name, p.table, p.address, p.codec, waves[p.name]) for p in d.points])
        for d in bus.devices
    ]


# --- the upstream broker stand-in -------------------------------------------------------------------


class AckingBroker:
    """An upstream MQTT 3.1.1 broker that accepts any login, PUBACKs every QoS 1 publish and keeps nothing.

    Cheap enough to take the whole soak's traffic on this process's loop; `stop()` makes it go away
    (listener closed, connections reset, as a broker that crashed) and `start()` brings it back.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.published = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def online(self) -> bool:
        """True while it listens."""
        return self._server is not None

    async def start(self) -> None:
        """Listen (again)."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def stop(self) -> None:
        """Stop listening and reset every connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()
        await asyncio.sleep(0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while True:
                head = (await reader.readexactly(1))[0]
                length, shift = 0, 0
                while True:
                    byte = (await reader.readexactly(1))[0]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                body = await reader.readexactly(length)
                reply = self._answer(head, body)
                if reply is None:
                    break
                if reply:
                    writer.write(reply)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    def _answer(self, head: int, body: bytes) -> bytes | None:
        """The reply to one control packet (b"" for none); None to hang up (DISCONNECT)."""
        kind = head >> 4
        if kind == 1:  # CONNECT -> CONNACK, accepted, no session present
            return b"\x20\x02\x00\x00"
        if kind == 3:  # PUBLISH
            self.published += 1
            if (head >> 1) & 3:
                topic_len = int.from_bytes(body[:2], "big")
                return b"\x40\x02" + body[2 + topic_len : 4 + topic_len]
            return b""
        if kind == 8:  # SUBSCRIBE -> SUBACK granting QoS ≤ 1 per filter
            granted, pos = bytearray(), 2
            while pos < len(body):
                pos += 2 + int.from_bytes(body[pos : pos + 2], "big")
                granted.append(min(body[pos], 1))
                pos += 1
            return bytes([0x90, 2 + len(granted)]) + body[:2] + bytes(granted)
        if kind == 10:  # UNSUBSCRIBE -> UNSUBACK
            return b"\xb0\x02" + body[:2]
        if kind == 12:  # PINGREQ -> PINGRESP
            return b"\xd0\x00"
        if kind == 14:  # DISCONNECT
            return None
        return b""


# --- the subscriber ------------------------------------------------------------------------------


class Consumer:
    """A paho subscriber (QoS 1) to everything under the soak's prefix: counts, keeps nothing; sends requests."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.messages = 0
        self.results = 0
        self.failed_results = 0
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"soak-consumer-{os.getpid()}", protocol=mqtt.MQTTv311)
        c.max_inflight_messages_set(100)
        c.on_connect = lambda cl, *_: cl.subscribe(f"{PREFIX}/#", qos=1)
        c.on_subscribe = lambda *_: self._subscribed.set()
        c.on_message = self._on_message
        self.client = c

    def _on_message(self, _c: mqtt.Client, _u: object, m: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages += 1
            if m.topic.endswith("/result"):
                self.results += 1
                if b'"ok":true' not in m.payload:
                    self.failed_results += 1

    def start(self, timeout: float = READY_TIMEOUT) -> None:
        """Connect (retrying while the broker comes up) and subscribe."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.client.connect("127.0.0.1", self.port, keepalive=30)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.client.loop_start()
        if not self._subscribed.wait(timeout):
            raise TimeoutError("the soak's subscriber did not subscribe")

    def stop(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()

    def request(self, topic: str, payload: str) -> None:
        """Publish a request (QoS 1, not waited for)."""
        self.client.publish(f"{PREFIX}/{topic}", payload, qos=1)


# --- the gateway process --------------------------------------------------------------------------


class GatewayRun(GatewayProcess):
    """`python -m gateway run -c CONFIG` (or under tracemalloc) with its output in a log file."""

    def __init__(self, config: Path, log: Path, *, trace_file: Path | None = None, leak: int = 0) -> None:
        self.trace_file = trace_file
        env = {}
        if trace_file is not None:
            env[TRACE_FILE_ENV] = str(trace_file)
        if leak:
            env[LEAK_ENV] = str(leak)
        command = [sys.executable, "-m", "hil.soak", INSTRUMENTED_GATEWAY] if env else None
        super().__init__(config, log, command=command, env=env)

    async def logged(self, text: str, timeout: float = READY_TIMEOUT) -> None:
        """Wait for `text` in its log (RuntimeError if it exits or the time runs out)."""
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway never logged {text!r}:\n{self.output()[-3000:]}")
            await asyncio.sleep(0.05)

    async def snapshot(self, timeout: float = 120.0) -> tracemalloc.Snapshot:
        """Ask a traced gateway for a tracemalloc snapshot (SIGUSR2) and load it."""
        assert self.trace_file is not None
        self.trace_file.unlink(missing_ok=True)
        done = self.trace_file.with_suffix(".done")
        done.unlink(missing_ok=True)
        self.proc.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + timeout
        while not done.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("the traced gateway wrote no snapshot")
            await asyncio.sleep(0.2)
        return await asyncio.to_thread(tracemalloc.Snapshot.load, str(self.trace_file))


def instrumented_gateway(argv: Sequence[str]) -> int:
    """`fieldgate ARGV`, under tracemalloc when $FIELDGATE_SOAK_TRACE_FILE is set (SIGUSR2 dumps a snapshot there),
    keeping $FIELDGATE_SOAK_LEAK bytes per message handed to a sink when that is set."""
    from gateway.cli import main as fieldgate

    if trace := os.environ.get(TRACE_FILE_ENV):
        path = Path(trace)
        tracemalloc.start(TRACE_FRAMES)

        def dump(_sig: int, _frame: object) -> None:
            tracemalloc.take_snapshot().dump(str(path))
            path.with_suffix(".done").touch()

        signal.signal(signal.SIGUSR2, dump)
    if leak := int(os.environ.get(LEAK_ENV) or 0):
        from bridge.outbox import Outbox

        kept: list[bytes] = []
        put = Outbox.put

        def leaky_put(self: Outbox, message: Any, *, awaited: bool = False) -> Any:
            kept.append(bytes(leak))
            return put(self, message, awaited=awaited)

        Outbox.put = leaky_put  # type: ignore[method-assign]
    return fieldgate(list(argv))


# --- the run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One second's readings."""

    t: float  # seconds since the gateway was ready
    gateway_kb: int
    broker_kb: int
    reads: int  # Modbus reads answered by the slaves
    published: int  # messages consumed on the embedded broker + PUBACKed upstream
    mcp_acked: int
    upstream_online: bool


@dataclass
class Growth:
    """RSS of one process: after the warm-up, at the end, and the growth between them."""

    first_kb: float
    last_kb: float
    peak_kb: int

    @property
    def percent(self) -> float:
        """(last − first) / first, in %."""
        return (self.last_kb - self.first_kb) / self.first_kb * 100 if self.first_kb else float("nan")


@dataclass
class SoakResult:
    """What a soak measured."""

    settings: SoakSettings
    samples: list[Sample]
    shipped_reads_per_hour: float
    gateway: Growth
    broker: Growth
    bytes_per_message: float
    steady_bytes_per_message: float
    startup_s: float
    outages: int
    mcp_sessions: int
    requests: int
    results: int
    failed_results: int
    exit_code: int
    trace_top: list[str] = field(default_factory=list)

    @property
    def reads(self) -> int:
        """Modbus reads answered over the run."""
        return self.samples[-1].reads if self.samples else 0

    @property
    def published(self) -> int:
        """Messages the gateway got to the two brokers over the run."""
        return self.samples[-1].published if self.samples else 0

    @property
    def mcp_acked(self) -> int:
        """MCP DATA frames ACKed over the run."""
        return self.samples[-1].mcp_acked if self.samples else 0

    @property
    def duration(self) -> float:
        """Seconds measured."""
        return self.samples[-1].t if self.samples else 0.0

    @property
    def equivalent_hours(self) -> float:
        """Reads answered / reads per hour of the shipped config."""
        return self.reads / self.shipped_reads_per_hour

    @property
    def judges_growth(self) -> bool:
        """Whether the run is long enough for its growth % to be judged (else its steady growth is)."""
        return self.duration >= JUDGE_GROWTH_FROM

    @property
    def passed(self) -> bool:
        """The gateway's growth after the warm-up is under the goal; in a short run, its steady growth per message
        is under MAX_STEADY_BYTES_PER_MESSAGE."""
        if self.judges_growth:
            return self.gateway.percent < self.settings.goal
        return self.steady_bytes_per_message < MAX_STEADY_BYTES_PER_MESSAGE

    def report(self) -> None:
        """Print the soak's figures."""
        s = self.settings
        d = max(self.duration, 1e-9)
        print(f"soak of {d:.0f} s: {self.settings_line()}")
        print_table(
            ["traffic", "total", "per s"],
            [
                ["Modbus reads answered", self.reads, self.reads / d],
                ["messages published (both brokers)", self.published, self.published / d],
                ["MCP frames ACKed", self.mcp_acked, self.mcp_acked / d],
                ["MCP sessions started", self.mcp_sessions, self.mcp_sessions / d],
                ["upstream outages", self.outages, self.outages / d],
                ["set/cmd requests (results, not ok)", f"{self.requests} ({self.results}, {self.failed_results})", ""],
            ],
            thousands=True,
        )
        print(
            f"  equivalent: {self.equivalent_hours:.2f} h of the shipped config's polling "
            f"({self.reads:,} reads / {self.shipped_reads_per_hour:,.0f} reads per hour)"
        )
        print()
        print_table(
            ["RSS MiB", "after warm-up", "at the end", "peak", "growth %"],
            [
                [name, g.first_kb / 1024, g.last_kb / 1024, g.peak_kb / 1024, round(g.percent, 2)]
                for name, g in (("gateway", self.gateway), ("broker child", self.broker))
            ],
        )
        print(
            f"  warm-up {s.warmup_seconds:.0f} s; medians of {s.window_seconds:.0f} s windows; "
            f"gateway retained {self.bytes_per_message:.1f} bytes per message published between them"
        )
        print(
            f"  steady growth after warm-up, the largest {JUMPS:.0%} of one-second steps left out: "
            f"{self.steady_bytes_per_message:.1f} bytes per message"
        )
        if self.trace_top:
            print("\n  tracemalloc: the allocation sites that grew most from the end of the warm-up to the end")
            for line in self.trace_top:
                print(f"    {line}")
        verdict = "PASS" if self.passed else "FAIL"
        if self.judges_growth:
            print(
                f"  => {verdict}: gateway RSS growth {self.gateway.percent:+.2f} % after warm-up (goal < {s.goal:g} %)"
            )
        else:
            print(
                f"  => {verdict}: steady growth {self.steady_bytes_per_message:.1f} bytes per message "
                f"(< {MAX_STEADY_BYTES_PER_MESSAGE:g}); a run under {JUDGE_GROWTH_FROM / 60:g} min does not judge "
                f"the growth % (replay bursts leave high-water steps for the first minutes)"
            )

    def settings_line(self) -> str:
        """The traffic the run was set up with, in one line."""
        s = self.settings
        return (
            f"{s.devices} Modbus devices polled every {s.poll * 1000:g} ms, {s.mcp_devices} MCP devices every "
            f"{s.mcp_interval * 1000:g} ms (one reconnects every {s.mcp_reconnect:g} s), upstream down "
            f"{s.outage_for:g} s every {s.outage_every:g} s"
        )


def _window(samples: list[Sample], start: float, end: float) -> list[Sample]:
    return [x for x in samples if start <= x.t <= end]


def steady_bytes_per_message(samples: list[Sample], s: SoakSettings) -> float:
    """Bytes of gateway RSS gained per message published after the warm-up, the largest one-second steps left out.

    A leak grows RSS a little in nearly every second; the high-water steps of replay bursts come in a
    few seconds with flat RSS between them. Leaving out the largest JUMPS of the increments (and
    averaging the rest) keeps the first and drops the second, so a run of tens of seconds can tell them apart.
    """
    after = [x for x in samples if x.t >= s.warmup_seconds]
    steps = sorted(
        ((b.gateway_kb - a.gateway_kb) * 1024, b.published - a.published)
        for a, b in zip(after, after[1:], strict=False)
    )
    kept = steps[: max(1, int(len(steps) * (1 - JUMPS)))] if steps else []
    messages = sum(m for _, m in steps) / len(steps) if steps else 0
    return statistics.mean(b for b, _ in kept) / messages if kept and messages > 0 else float("nan")


def analyse(samples: list[Sample], s: SoakSettings) -> tuple[Growth, Growth, float]:
    """Gateway and broker growth (median of the window after the warm-up vs the last window), bytes per message."""
    end = samples[-1].t
    first = _window(samples, s.warmup_seconds, s.warmup_seconds + s.window_seconds)
    last = _window(samples, end - s.window_seconds, end)
    if not first or not last:
        raise ValueError("the run is too short for a warm-up and two windows")

    def growth(attr: str) -> Growth:
        return Growth(
            statistics.median(getattr(x, attr) for x in first),
            statistics.median(getattr(x, attr) for x in last),
            max(getattr(x, attr) for x in samples),
        )

    gw, broker = growth("gateway_kb"), growth("broker_kb")
    messages = last[len(last) // 2].published - first[len(first) // 2].published
    per_message = (gw.last_kb - gw.first_kb) * 1024 / messages if messages > 0 else float("nan")
    return gw, broker, per_message


async def soak(s: SoakSettings, workdir: Path, *, progress: bool = False) -> SoakResult:
    """Run the gateway in `workdir` under the soak's traffic for `s.seconds` and measure its RSS."""
    broker_port, upstream_port, mcp_port = free_port(), free_port(), free_port()
    text = configs.dump(gateway_config(s, broker=broker_port, upstream=upstream_port, mcp=mcp_port))
    config = workdir / "soak.yaml"
    config.write_text(text)
    cfg = parse_config(text).config
    plcs, pumps = device_names(s)

    line = VirtualLine(workdir / "ttySOAK")
    line.start()
    sim = ModbusSimulator(line.device_port, simulated_slaves(cfg), baudrate=115200)
    await sim.start()
    upstream = AckingBroker(upstream_port)
    await upstream.start()
    consumer = Consumer(broker_port)
    trace_file = workdir / "trace.snap" if s.trace else None
    gateway = GatewayRun(config, workdir / "gateway.log", trace_file=trace_file, leak=s.leak)
    mcp: list[McpSimDevice] = []
    tasks: list[asyncio.Task[None]] = []
    acked_before = 0  # frames ACKed on clients since replaced
    sessions = 0
    outages = 0
    requests = 0
    samples: list[Sample] = []
    started = time.monotonic()

    def new_pump(pid: str) -> McpSimDevice:
        nonlocal sessions
        sessions += 1
        waves = {"flow": Wave(kind="sine", min=10, max=14, period=2.9), "running": Wave(kind="toggle", period=1.3)}
        return McpSimDevice("127.0.0.1", mcp_port, pid, TOKEN, interval=s.mcp_interval, waves=waves)

    def acked() -> int:
        return acked_before + sum(d.client.stats.acked for d in mcp)

    async def outage_cycle() -> None:
        nonlocal outages
        while True:
            await asyncio.sleep(s.outage_every - s.outage_for)
            await upstream.stop()
            outages += 1
            await asyncio.sleep(s.outage_for)
            await upstream.start()

    async def reconnect_cycle() -> None:
        nonlocal acked_before
        # The first device keeps its session when there are others: the `cmd` requests go to it.
        turns = list(range(1 if len(mcp) > 1 else 0, len(mcp)))
        turn = 0
        while True:
            await asyncio.sleep(s.mcp_reconnect)
            i = turns[turn % len(turns)]
            turn += 1
            old = mcp[i]
            await old.stop()
            acked_before += old.client.stats.acked
            mcp[i] = new_pump(pumps[i])
            await mcp[i].start()

    async def request_cycle() -> None:
        nonlocal requests
        n = 0
        while True:
            await asyncio.sleep(s.requests_every)
            n += 1
            if plcs:
                consumer.request(f"{plcs[n % len(plcs)]}/set/setpoint", str(n % 1000))
                requests += 1
            if pumps:
                consumer.request(f"{pumps[0]}/cmd", json.dumps({"name": "ping", "args": {"n": n}, "id": str(n)}))
                requests += 1

    snapshots: list[tracemalloc.Snapshot] = []
    exit_code = -1
    try:
        await gateway.logged("fieldgate soak up")
        await asyncio.to_thread(consumer.start)
        for pid in pumps:
            mcp.append(new_pump(pid))
            await mcp[-1].start()
        ready = time.monotonic()
        startup = ready - started
        if s.outage_for > 0:
            tasks.append(asyncio.create_task(outage_cycle(), name="soak:outages"))
        if mcp and s.mcp_reconnect > 0:
            tasks.append(asyncio.create_task(reconnect_cycle(), name="soak:mcp-reconnects"))
        if s.requests_every > 0:
            tasks.append(asyncio.create_task(request_cycle(), name="soak:requests"))
        next_at = ready
        traced_warmup = False
        while True:
            next_at += s.sample_every
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if gateway.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited with {gateway.proc.returncode}:\n{gateway.output()[-3000:]}")
            t = time.monotonic() - ready
            samples.append(
                Sample(
                    t,
                    rss_kb_or_zero(gateway.pid),
                    rss_kb_or_zero(gateway.broker_pid()),
                    sim.requests,
                    consumer.messages + upstream.published,
                    acked(),
                    upstream.online,
                )
            )
            if progress and len(samples) % 60 == 0:
                x = samples[-1]
                print(
                    f"  {t:6.0f} s  gateway {x.gateway_kb / 1024:6.1f} MiB  broker {x.broker_kb / 1024:6.1f} MiB  "
                    f"reads {x.reads:,}  published {x.published:,}  MCP {x.mcp_acked:,}",
                    flush=True,
                )
            if s.trace and not traced_warmup and t >= s.warmup_seconds:
                traced_warmup = True
                snapshots.append(await gateway.snapshot())
                next_at = time.monotonic()
            if t >= s.seconds:
                break
        if s.trace:
            snapshots.append(await gateway.snapshot())
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for device in mcp:
            await device.stop()
        await asyncio.to_thread(gateway.stop, STOP_TIMEOUT)
        exit_code = gateway.proc.returncode
        with contextlib.suppress(Exception):
            await asyncio.to_thread(consumer.stop)
        await upstream.stop()
        await sim.stop()
        line.close()

    with (workdir / "samples.csv").open("w") as fh:
        fh.write("t,gateway_kb,broker_kb,reads,published,mcp_acked,upstream_online\n")
        for x in samples:
            fh.write(
                f"{x.t:.1f},{x.gateway_kb},{x.broker_kb},{x.reads},{x.published},{x.mcp_acked},{x.upstream_online:d}\n"
            )
    gw, broker, per_message = analyse(samples, s)
    top: list[str] = []
    if len(snapshots) == 2:
        for stat in snapshots[1].compare_to(snapshots[0], "traceback")[:8]:
            frames = [f"{f.filename.removeprefix(str(ROOT) + '/')}:{f.lineno}" for f in stat.traceback[-4:]]
            top.append(f"{stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d} blocks  " + " <- ".join(frames[::-1]))
    return SoakResult(
        settings=s,
        samples=samples,
        shipped_reads_per_hour=shipped_reads_per_hour(),
        gateway=gw,
        broker=broker,
        bytes_per_message=per_message,
        steady_bytes_per_message=steady_bytes_per_message(samples, s),
        startup_s=startup,
        outages=outages,
        mcp_sessions=sessions,
        requests=requests,
        results=consumer.results,
        failed_results=consumer.failed_results,
        exit_code=exit_code,
        trace_top=top,
    )


# --- the command line ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The soak's options (defaults: SoakSettings)."""
    d = SoakSettings()
    p = argparse.ArgumentParser(prog="python -m hil.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=d.seconds / 60, help="length after start-up (default 20)")
    p.add_argument("--devices", type=int, default=d.devices, help="Modbus slaves on the line")
    p.add_argument("--poll", type=float, default=d.poll * 1000, help="Modbus poll interval, ms")
    p.add_argument("--mcp-devices", type=int, default=d.mcp_devices)
    p.add_argument("--mcp-interval", type=float, default=d.mcp_interval * 1000, help="ms between DATA frames")
    p.add_argument("--mcp-reconnect", type=float, default=d.mcp_reconnect, help="s between MCP reconnects (0: none)")
    p.add_argument("--outage-every", type=float, default=d.outage_every, help="s between upstream outages")
    p.add_argument("--outage-for", type=float, default=d.outage_for, help="s each outage lasts (0: none)")
    p.add_argument("--warmup", type=float, default=d.warmup * 100, help="warm-up, %% of the run (default 30)")
    p.add_argument("--window", type=float, default=d.window * 100, help="each window compared, %% of the run")
    p.add_argument("--goal", type=float, default=d.goal, help="gateway RSS growth %% allowed after warm-up")
    p.add_argument("--trace", action="store_true", help="run the gateway under tracemalloc and show what grew")
    p.add_argument("--leak", type=int, default=0, help="make the gateway keep LEAK bytes per message (a self-check)")
    p.add_argument("--bench", action="store_true", help="hand the growth to `make bench`'s table (benchlib.record)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (config, gateway log, spool)")
    return p


def settings_from(args: argparse.Namespace) -> SoakSettings:
    """SoakSettings from parsed options."""
    return SoakSettings(
        seconds=args.minutes * 60,
        devices=args.devices,
        poll=args.poll / 1000,
        mcp_devices=args.mcp_devices,
        mcp_interval=args.mcp_interval / 1000,
        mcp_reconnect=args.mcp_reconnect,
        outage_every=args.outage_every,
        outage_for=args.outage_for,
        warmup=args.warmup / 100,
        window=args.window / 100,
        goal=args.goal,
        trace=args.trace,
        leak=args.leak,
    )


def record_growth(result: SoakResult, steady_goal: float = MAX_STEADY_BYTES_PER_MESSAGE) -> None:
    """Hand the gateway's growth to the bench suite's table: judged against < 1 % from 10 minutes on; in a shorter
    run the steady part, per message, is what is judged, against `steady_goal` bytes (see the module's docstring)."""
    from hil.bench.benchlib import record

    d = result.duration
    length = f"{d / 60:.0f} min" if d >= 600 else f"{d:.0f} s"
    length += f" soak, {result.equivalent_hours:.1f} h equivalent"
    judged = result.judges_growth
    record(
        "gateway",
        f"RSS growth after warm-up ({length})",
        round(result.gateway.percent, 2),
        "%",
        versus="" if judged else "judged < 1 % in the 20 min soak",
        most=1.0 if judged else None,
    )
    record(
        "gateway",
        f"steady RSS growth per message published ({length})",
        round(result.steady_bytes_per_message, 1),
        "bytes",
        most=steady_goal,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run a soak from the command line; exit 0 when it passes, 1 when the RSS grew too much."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [INSTRUMENTED_GATEWAY]:
        return instrumented_gateway(argv[1:])
    args = build_parser().parse_args(argv)
    s = settings_from(args)
    workdir = Path(tempfile.mkdtemp(prefix="fieldgate-soak-"))
    print(f"soak: {s.seconds / 60:g} min, warm-up {s.warmup_seconds:.0f} s, work dir {workdir}", flush=True)
    try:
        result = asyncio.run(soak(s, workdir, progress=True))
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    result.report()
    if args.bench:
        record_growth(result)
    return 0 if result.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
