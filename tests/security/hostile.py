"""The hostile-input tests' parts: a whole `fieldgate run` process on free ports, a raw MCP peer, /metrics, the log.

Every test here talks to a real gateway process over real sockets, as an attacker on the network
would. `FG_SECURITY_GATEWAY_ROOT` runs the gateway from another source tree (e.g. an export of an
older commit) so that the same tests can be seen failing against code without the fixes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from drivers.mcp.codec import DecodeError, Frame, FrameType

from helpers import GatewayProcess, Subscriber, free_port, now_ms
from mcp_peer import RawPeer
from mosquitto import Mosquitto

ROOT = Path(__file__).resolve().parents[2]
GATEWAY_ROOT = Path(os.environ.get("FG_SECURITY_GATEWAY_ROOT") or ROOT)
#: Set with FG_SECURITY_GATEWAY_ROOT on a tree older than issue 11: the mcp keys it added are left out of the
#: config (such a tree refuses them as unknown), so that the test fails on the behaviour, not on the key.
OLD_SCHEMA = bool(os.environ.get("FG_SECURITY_OLD_SCHEMA"))
ISSUE_11_MCP_KEYS = {
    "hello_timeout",
    "max_hello_payload",
    "max_hello_errors",
    "max_pending",
    "max_pending_per_ip",
    "auth_ban_failures",
    "auth_ban_window",
    "auth_ban_time",
    "max_points",
    "max_string",
    "max_unread",
    "max_future_ts",
}
GATEWAY_ID = "sec"
PREFIX = f"fieldgate/{GATEWAY_ID}"

#: The MCP devices every test gateway allows; tokens are at least 16 characters (shorter is a config error).
TOKENS = {
    "pump-1": "pump-1-token-0123456789",
    "pump-2": "pump-2-token-0123456789",
    "pump-3": "pump-3-token-0123456789",
}


# --- HTTP ------------------------------------------------------------------------------------------


@dataclass
class HttpAnswer:
    """Status and body of one HTTP response."""

    status: int
    body: str


async def http_get(port: int, path: str, timeout: float = 5.0) -> HttpAnswer:
    """GET http://127.0.0.1:port/path with a plain HTTP/1.0 request (no client library in between)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    return HttpAnswer(int(status_line.split()[1]), body.decode("utf-8", errors="replace"))


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text as {(sample name, labels): value}."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


# --- the gateway process ---------------------------------------------------------------------------


@dataclass
class RunningGateway:
    """A `fieldgate run` process, its ports, files and ways to look at it from outside."""

    proc: GatewayProcess
    config_path: Path
    state_dir: Path
    mqtt_port: int
    mcp_port: int
    http_port: int
    tokens: dict[str, str]
    upstream: Mosquitto | None = None

    @property
    def pid(self) -> int:
        """The gateway's process id."""
        return self.proc.proc.pid

    def log(self) -> str:
        """Everything it logged so far."""
        return self.proc.output()

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.proc.poll() is None

    def rss_kib(self) -> int:
        """Resident set size of the gateway process, from /proc/<pid>/status."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS in /proc status")

    async def get(self, path: str, timeout: float = 5.0) -> HttpAnswer:
        """GET a path of its HTTP listener (/, /metrics, /healthz)."""
        return await http_get(self.http_port, path, timeout)

    async def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """/metrics parsed (fails unless it answers 200)."""
        answer = await self.get("/metrics")
        assert answer.status == 200, f"/metrics answered {answer.status}: {answer.body[:500]}"
        return parse_metrics(answer.body)

    async def metric(self, name: str, **labels: str) -> float | None:
        """One sample of /metrics (None when it is not there)."""
        return (await self.metrics()).get((name, frozenset(labels.items())))

    async def logged(self, text: str, timeout: float = 10.0) -> None:
        """Wait until `text` appears in its log."""
        await self.proc.logged(text, timeout)

    def stop(self) -> int:
        """SIGTERM; its exit code."""
        return self.proc.stop()

    def spool(self, sink: str) -> Path:
        """The spool file of a sink."""
        return self.state_dir / "spool" / f"{sink}.sqlite"

    def audit_records(self) -> list[str]:
        """The lines of the audit log (rotated files included)."""
        lines: list[str] = []
        for path in sorted(self.state_dir.glob("audit.log*")):
            lines += path.read_text(errors="replace").splitlines()
        return lines


StartGateway = Callable[..., Awaitable[RunningGateway]]


def gateway_config(
    tmp_path: Path,
    *,
    mqtt_port: int,
    mcp_port: int,
    http_port: int,
    mcp: dict[str, Any] | None = None,
    upstream: Mosquitto | None = None,
    broker: dict[str, Any] | None = None,
    devices: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The config of a test gateway as a dict: embedded broker (inline), sink `local`, optional sink `up`."""
    sinks: list[dict[str, Any]] = [{"name": "local", "spool": {"commit_window": "20ms"}}]
    if upstream is not None:
        sinks.append({"name": "up", "url": upstream.url, "spool": {"commit_window": "20ms", "replay_rate": 5000}})
    devices = TOKENS if devices is None else devices
    if OLD_SCHEMA:
        mcp = {k: v for k, v in (mcp or {}).items() if k not in ISSUE_11_MCP_KEYS}
    cfg: dict[str, Any] = {
        "gateway": {"id": GATEWAY_ID, "state_dir": str(tmp_path / "state"), "http": f"127.0.0.1:{http_port}"},
        # Inline: one process to watch (RSS, CPU), and broker logins run on the gateway's own loop.
        "broker": {"process": "inline", "listeners": [f"tcp://127.0.0.1:{mqtt_port}"], **(broker or {})},
        "northbound": sinks,
        "mcp": {
            "listen": f"127.0.0.1:{mcp_port}",
            **(mcp or {}),
            "devices": [{"id": d, "token": t} for d, t in devices.items()],
        },
    }
    for key, value in (extra or {}).items():
        cfg[key] = value
    return cfg


@contextlib.asynccontextmanager
async def gateway_starter(tmp_path: Path) -> AsyncIterator[StartGateway]:
    """Yields `start(mcp={...}, upstream=mosquitto, broker={...})`; every gateway it started is stopped at the end."""
    running: list[RunningGateway] = []

    async def start(
        *,
        mcp: dict[str, Any] | None = None,
        upstream: Mosquitto | None = None,
        broker: dict[str, Any] | None = None,
        devices: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
        up_timeout: float = 20.0,
    ) -> RunningGateway:
        for attempt in itertools.count(1):
            mqtt_port, mcp_port, http_port = free_port(), free_port(), free_port()
            cfg = gateway_config(
                tmp_path,
                mqtt_port=mqtt_port,
                mcp_port=mcp_port,
                http_port=http_port,
                mcp=mcp,
                upstream=upstream,
                broker=broker,
                devices=devices,
                extra=extra,
            )
            path = tmp_path / "config.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            env = {**os.environ, "PYTHONPATH": str(GATEWAY_ROOT)}
            log = tmp_path / f"gateway-{attempt}.log"
            proc = GatewayProcess(["run", "-c", str(path)], log, cwd=GATEWAY_ROOT, env=env, stop_timeout=12)
            gw = RunningGateway(
                proc, path, tmp_path / "state", mqtt_port, mcp_port, http_port, dict(devices or TOKENS), upstream
            )
            running.append(gw)
            deadline = time.monotonic() + up_timeout
            while f"fieldgate {GATEWAY_ID} up" not in proc.output():
                if proc.proc.poll() is not None:
                    break
                assert time.monotonic() < deadline, (
                    f"the gateway did not come up in {up_timeout:g} s:\n" + proc.output()
                )
                await asyncio.sleep(0.05)
            else:
                return gw
            # A free port can be taken by another process between free_port() and the bind: try other ports.
            if "address already in use" in proc.output() and attempt < 3:
                continue
            raise AssertionError(f"the gateway exited with {proc.proc.returncode}:\n" + proc.output())
        raise AssertionError("unreachable")

    try:
        yield start
    finally:
        for gw in running:
            with contextlib.suppress(TimeoutError):
                gw.stop()


# --- a raw MCP peer --------------------------------------------------------------------------------


class McpPeer(RawPeer):
    """tests/mcp_peer.py's raw device, that can bind its source address and numbers its own frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        self.seq = itertools.count(1)

    @property
    def events(self) -> list[Frame | DecodeError]:
        """Frames and errors received and not yet taken by recv()."""
        return self.frames

    @classmethod
    async def open(cls, port: int, source: str = "127.0.0.1", timeout: float = 5.0) -> McpPeer:
        """Connect to the gateway's MCP port from `source` (any 127.x.y.z on Linux loopback)."""
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        return cls(reader, writer)

    async def hello(
        self, device_id: str = "pump-1", token: str | None = None, seq: int | None = None, **extra: object
    ) -> Frame:
        """Say HELLO (the device's configured token unless given) and return the gateway's answer."""
        body = {"boot_id": "b1", "device_id": device_id, "token": TOKENS.get(device_id, "x" * 20), **extra}
        if token is not None:
            body["token"] = token
        await self.send(Frame.json(FrameType.HELLO, next(self.seq) if seq is None else seq, body))
        return await self.recv()

    async def data_raw(self, payload: bytes, timeout: float = 5.0) -> Frame:
        """Send a DATA frame with exactly this payload; the gateway's answer."""
        await self.send(Frame(FrameType.DATA, next(self.seq), payload))
        return await self.recv(timeout)

    async def data(self, values: dict[str, Any], ts: int | None = None, timeout: float = 5.0) -> Frame:
        """Send DATA {"ts": ts (now by default), "values": values}; the gateway's answer."""
        body = {"ts": now_ms() if ts is None else ts, "values": values}
        return await self.send_json(FrameType.DATA, body, timeout)

    async def send_json(self, type_: int, body: dict[str, Any], timeout: float = 5.0) -> Frame:
        """Send a frame whose payload is `body` as JSON; the gateway's answer."""
        await self.send(Frame.json(type_, next(self.seq), body))
        return await self.recv(timeout)


def nack_code(frame: Frame) -> int | None:
    """The code of a NACK frame, None for anything else."""
    if frame.type != FrameType.NACK:
        return None
    return int(frame.body()["code"])


def nack_reason(frame: Frame) -> str:
    """The reason of a NACK frame ('' for anything else)."""
    return str(frame.body().get("reason", "")) if frame.type == FrameType.NACK else ""


@dataclass
class GoodDevice:
    """A well-behaved device sending DATA every `interval` and timing each ACK, in the background."""

    port: int
    device_id: str = "pump-2"
    source: str = "127.0.0.1"
    interval: float = 0.1
    latencies: list[float] = field(default_factory=list)
    acked_ts: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _peer: McpPeer | None = None
    _n: int = 0
    _waiting_since: float | None = None
    local_port: int = 0

    async def start(self) -> GoodDevice:
        """Log in (failing the test if it cannot) and start sending."""
        self._peer = await McpPeer.open(self.port, self.source)
        answer = await self._peer.hello(self.device_id)
        assert answer.type == FrameType.ACK, f"{self.device_id} could not log in: {answer}"
        self.local_port = int(self._peer.writer.get_extra_info("sockname")[1])
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        assert self._peer is not None
        while True:
            self._n += 1
            ts = now_ms()
            sent = self._waiting_since = time.monotonic()
            try:
                answer = await self._peer.data({"n": self._n}, ts=ts, timeout=30)
            except (TimeoutError, ConnectionError, OSError) as exc:
                self.failures.append(f"DATA n={self._n}: {type(exc).__name__} {exc}")
                return
            self._waiting_since = None
            self.latencies.append(time.monotonic() - sent)
            if answer.type == FrameType.ACK:
                self.acked_ts.append(ts)
            else:
                self.failures.append(f"DATA n={self._n}: answered type {answer.type}: {answer.payload[:200]!r}")
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        """Stop sending and close (a DATA still unanswered then counts as a failure)."""
        if self._waiting_since is not None and time.monotonic() - self._waiting_since > 2.0:
            waited = time.monotonic() - self._waiting_since
            self.failures.append(f"DATA n={self._n}: still unanswered after {waited:.1f} s")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._peer is not None:
            self._peer.close()

    def check(self, *, within: float = 2.0, at_least: int = 3) -> None:
        """Every DATA was ACKed within `within` seconds, and at least `at_least` of them."""
        assert not self.failures, self.failures[:5]
        slow = [round(x, 2) for x in self.latencies if x > within]
        assert not slow, f"{self.device_id}: {len(slow)} ACKs slower than {within} s: {slow[:10]}"
        assert len(self.acked_ts) >= at_least, f"{self.device_id}: only {len(self.acked_ts)} ACKs"


@contextlib.asynccontextmanager
async def good_device(port: int, device_id: str = "pump-2", source: str = "127.0.0.1") -> AsyncIterator[GoodDevice]:
    """A GoodDevice sending while the block runs."""
    dev = await GoodDevice(port, device_id, source).start()
    try:
        yield dev
    finally:
        await dev.stop()


@contextlib.asynccontextmanager
async def embedded_subscriber(gw: RunningGateway, *topics: str) -> AsyncIterator[Subscriber]:
    """A paho subscriber on the gateway's embedded broker (to `topics`, default everything under the prefix)."""
    sub = Subscriber(gw.mqtt_port, topics or (f"{PREFIX}/#",))
    await asyncio.to_thread(sub.start)
    try:
        yield sub
    finally:
        await asyncio.to_thread(sub.stop)
