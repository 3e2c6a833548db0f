"""The parts of hil/fleet.py: a fleet of `fieldgate run` processes on one Mosquitto, what each gateway logs and
shows on /metrics, and a subscriber that records when the broker delivers each message."""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import json
import re
import shutil
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from hil.bench.benchlib.configs import config, gateway_section, mcp_device, mcp_section, write_config
from hil.bench.benchlib.mqtt import Mosquitto
from hil.bench.benchlib.procs import GatewayProcess, cpu_seconds, rss_kb
from hil.ports import free_port

SINK = "up"
DEVICE = "dev"
COUNTER_ID = "fleet-counter"
STOP_TIMEOUT = 20.0
_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ [\w.]+: sink " + SINK + r": (.*)$")
_REPLAY = re.compile(r"starts in ([\d.]+) s")
_SERIES = re.compile(r'^(fieldgate_\w+)\{sink="' + SINK + r'"\} (\S+)$', re.M)


@dataclass(frozen=True)
class Policy:
    """How every gateway of one fleet reconnects and replays (the sink's keys of the same names)."""

    name: str
    reconnect_base: float
    reconnect_cap: float
    replay_delay: float
    replay_rate: float


class FleetBroker(Mosquitto):
    """The benches' Mosquitto (anonymous, no queue limits), but keeping sessions across its restart.

    The subscriber that counts (Counter) has a persistent session: what gateways publish after the restart and
    before it is back is queued for it, not lost to the count (the baseline's gateways are back within 0.1 s).
    """

    def _config_text(self) -> str:
        # The later `persistence` line wins over the shared config's `persistence false`.
        return super()._config_text() + f"persistence true\npersistence_location {self.workdir}/\n"


@dataclass
class Member:
    """One gateway of the fleet: its id, directory, ports and process."""

    gateway_id: str
    workdir: Path
    http_port: int
    mcp_port: int
    process: GatewayProcess | None = None

    @property
    def log(self) -> Path:
        """What the gateway wrote on stderr."""
        return self.workdir / "gateway.log"

    @property
    def pid(self) -> int:
        """The gateway's process id."""
        assert self.process is not None
        return self.process.pid

    def events(self, what: str, since: float) -> list[tuple[float, str]]:
        """(wall-clock time, text) of the sink's log lines whose text starts with `what`, at or after `since`."""
        out = []
        with contextlib.suppress(FileNotFoundError), self.log.open(errors="replace") as fh:
            for line in fh:
                m = _LINE.match(line)
                if m and m.group(2).startswith(what):
                    # logging's asctime is local time; strptime + timestamp() reads it back the same way.
                    t = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                    if t >= since:
                        out.append((t, m.group(2)))
        return out

    def scrape(self, timeout: float = 5.0) -> dict[str, float] | None:
        """The sink's series on the gateway's /metrics (`fieldgate_spool_messages`, ...), or None if it won't answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=timeout) as r:
                text = r.read().decode()
        except OSError:
            return None
        return {name: float(value) for name, value in _SERIES.findall(text)}


def device_token(i: int) -> str:
    """The MCP token of gateway `i`'s simulated device (16 characters at least, as the schema asks)."""
    return f"fleet-token-{i:08d}"


def member_config(m: Member, index: int, broker_url: str, policy: Policy, interval: float) -> dict[str, Any]:
    """One gateway's config: no embedded broker, one MCP device simulated in-process, one QoS 1 sink to the broker."""
    cfg = config(
        gateway=gateway_section(m.gateway_id, m.workdir / "state", http=f"127.0.0.1:{m.http_port}", log_level="INFO"),
        broker={"enabled": False},
        northbound=[
            {
                "name": SINK,
                "url": broker_url,
                "qos": 1,
                "reconnect_base": policy.reconnect_base,
                "reconnect_cap": policy.reconnect_cap,
                "spool": {"replay_rate": policy.replay_rate, "replay_delay": policy.replay_delay},
            }
        ],
        mcp=mcp_section(f"127.0.0.1:{m.mcp_port}", [mcp_device(DEVICE, device_token(index))]),
    )
    # Two values that move at every sample: each DATA frame is a telemetry message and two retained point values.
    cfg["simulator"] = {
        "mcp": [
            {
                "id": DEVICE,
                "interval": interval,
                "values": {
                    "flow": {"wave": "sine", "min": 10, "max": 14, "period": 40},
                    "count": {"wave": "ramp", "min": 0, "max": 1_000_000, "step": 1, "period": interval},
                },
            }
        ]
    }
    return cfg


class Fleet:
    """N `fieldgate run` processes, each with its own config, state dir, status page and simulated MCP device."""

    def __init__(self, root: Path, n: int, broker_url: str, policy: Policy, interval: float) -> None:
        """Write every gateway's config under `root` (nothing starts yet)."""
        self.policy = policy
        self.members: list[Member] = []
        for i in range(n):
            m = Member(f"{policy.name}-{i:03d}", root / f"gw{i:03d}", free_port(), free_port())
            m.workdir.mkdir(parents=True)
            write_config(m.workdir / "config.yaml", member_config(m, i, broker_url, policy, interval))
            self.members.append(m)
        self._pool = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="fleet-scrape")

    def start(self) -> None:
        """Spawn every gateway (journald's stream unset: the log lines carry their own times)."""
        # Each gateway gets SIGTERM when the harness dies, even by SIGKILL: no fleet outlives it.
        orphan_guard = ["setpriv", "--pdeathsig", "TERM", "--"] if shutil.which("setpriv") else []
        for m in self.members:
            m.process = GatewayProcess(
                m.workdir / "config.yaml",
                m.log,
                command=[*orphan_guard, sys.executable, "-m", "gateway"],
                unset=("JOURNAL_STREAM", "NOTIFY_SOCKET"),
            )

    def dead(self) -> list[str]:
        """Ids of gateways whose process has exited."""
        return [m.gateway_id for m in self.members if m.process is not None and not m.process.alive]

    def stop(self) -> list[str]:
        """SIGTERM every gateway at once, wait for each (SIGKILL after STOP_TIMEOUT); ids of those killed."""
        for m in self.members:
            if m.process is not None and m.process.alive:
                with contextlib.suppress(ProcessLookupError):
                    m.process.proc.send_signal(signal.SIGTERM)
        killed = [m.gateway_id for m in self.members if m.process is not None and not m.process.stop(STOP_TIMEOUT)]
        self._pool.shutdown(wait=True)
        return killed

    def scrape(self, members: Sequence[Member]) -> list[dict[str, float] | None]:
        """/metrics of each of `members`, a few at a time."""
        return list(self._pool.map(Member.scrape, members))

    def cpu(self) -> list[float]:
        """CPU seconds (user + system) of each gateway so far."""
        return [cpu_seconds(m.pid) for m in self.members]

    def rss_mib(self) -> list[float]:
        """Resident memory of each gateway, MiB."""
        return [rss_kb(m.pid) / 1024 for m in self.members]

    def first_after(self, what: str, since: float) -> list[float | None]:
        """Per gateway, the time of its first `what` log line at or after `since` (None: none yet)."""
        return [next((t for t, _ in m.events(what, since)), None) for m in self.members]

    def error_lines(self) -> list[str]:
        """Every gateway's log lines at ERROR or above (a fleet that only restarted its broker should have none)."""
        out = []
        for m in self.members:
            with contextlib.suppress(FileNotFoundError), m.log.open(errors="replace") as fh:
                out += [f"{m.gateway_id}: {line.rstrip()}" for line in fh if " ERROR " in line or " CRITICAL " in line]
        return out

    def replay_starts(self, since: float) -> list[float | None]:
        """Per gateway, when its first replay after `since` began: the time of the line "replay of the backlog
        starts in X s" (logged at the connect) + X; None without one (replay_delay 0 logs none)."""
        out: list[float | None] = []
        for m in self.members:
            found = [(t, _REPLAY.search(text)) for t, text in m.events("replay of the backlog starts in", since)]
            out.append(next((t + float(x.group(1)) for t, x in found if x), None))
        return out


@dataclass
class Arrivals:
    """What the subscriber saw: each message's arrival (time.time()) and, for telemetry, its sample time."""

    times: list[float] = field(default_factory=list)
    sampled: list[float | None] = field(default_factory=list)


class Counter:
    """A paho subscriber to `fieldgate/#` (QoS 1, a persistent session) that reconnects within 0.1 s of the broker's
    return; what the broker queued for it meanwhile arrives at once."""

    def __init__(self, port: int) -> None:
        """Connect and subscribe (TimeoutError after 20 s)."""
        self.seen = Arrivals()
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=COUNTER_ID, protocol=mqtt.MQTTv311, clean_session=False)
        c.max_inflight_messages_set(1000)
        c.reconnect_delay_set(0.05, 0.1)  # type: ignore[arg-type]  # paho waits a float; its hint says int
        c.on_connect = lambda cl, *_: cl.subscribe("fieldgate/#", qos=1)
        c.on_subscribe = lambda *_: self._subscribed.set()
        c.on_message = self._on_message
        c.connect("127.0.0.1", port, keepalive=30)
        c.loop_start()
        self._client = c
        if not self._subscribed.wait(20):
            self.close()
            raise TimeoutError("the fleet's subscriber did not subscribe")

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        sampled = None
        if msg.topic.endswith("/telemetry"):
            with contextlib.suppress(ValueError, TypeError, KeyError):
                sampled = json.loads(msg.payload)["ts"] / 1000
        with self._lock:
            self.seen.times.append(now)
            self.seen.sampled.append(sampled)

    def snapshot(self) -> Arrivals:
        """A copy of what was seen so far."""
        with self._lock:
            return Arrivals(list(self.seen.times), list(self.seen.sampled))

    def close(self) -> None:
        """Disconnect and stop its thread."""
        self._client.disconnect()
        self._client.loop_stop()
