"""Real parts for the Sparkplug end-to-end tests of commands, the primary host and hostile hosts.

A Mosquitto, a `fieldgate run` process with a simulated Modbus line on a pty (a boiler with a read-only
`temperature` and a writable `setpoint`, a meter whose `count` moves at every poll) and an MCP server for a
device the test drives (pump-1), two sinks on that Mosquitto (`local`: JSON, `scada`: Sparkplug), and a recording
subscriber. Decoding is ours (`sparkplug_b_pb2`) and, where a test says so, the independent decoder's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from sparkplug.sparkplug_decode import DECODER, SPB_PYTHON

from bridge.sparkplug.sparkplug_b_pb2 import Payload
from drivers.mcp.client import McpClient
from hil.ports import free_port

from configs import broker, config, device, line, mcp, mcp_device, point, sim_line, sim_slave, simulator, sink, write
from helpers import GatewayProcess, Received, Subscriber, until
from mosquitto import Mosquitto, MosquittoError

ROOT = Path(__file__).resolve().parents[2]
GROUP, EDGE, HOST = "plant1", "line-a", "scada-main"
NS = f"spBv1.0/{GROUP}"
STATE_TOPIC = f"spBv1.0/STATE/{HOST}"
JSON_PREFIX = "fieldgate/t1"
#: The writable point: holding int16, scale 0.1, 5..80 (the demo template's setpoint).
SETPOINT = point("setpoint", "holding", 30, "int16", scale=0.1, min=5, max=80, writable=True, unit="C")
TEMPERATURE = point("temperature", "input", 0, "int16", scale=0.1, unit="C")
COUNT = point("count", "holding", 0, "uint16")
RAMP = {"wave": "ramp", "period": "1s", "min": 0, "max": 60000}


def env() -> dict[str, str]:
    """The environment of a child gateway: this tree's code first."""
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def topic(kind: str, device: str | None = None) -> str:
    """The full Sparkplug topic of our edge node (and device)."""
    return f"{NS}/{kind}/{EDGE}" + (f"/{device}" if device else "")


def decode(payload: bytes) -> Any:
    """Our own decoding of a Sparkplug payload."""
    return Payload.FromString(payload)


def state(online: bool, ts: int) -> bytes:
    """A Sparkplug 3.0 STATE payload."""
    return json.dumps({"online": online, "timestamp": ts}).encode()


def gateway_config(
    tmp_path: Path,
    mqtt_url: str,
    mcp_port: int,
    *,
    primary_host: str | None = None,
    mcp_points: bool = False,
    boiler_dead: bool = False,
) -> Path:
    """The config: one line (boiler, meter) on a simulated pty, pump-1 over MCP, a JSON and a Sparkplug sink."""
    sparkplug = {"group_id": GROUP, "edge_node_id": EDGE} | ({"primary_host": primary_host} if primary_host else {})
    pump = mcp_device("pump-1", points=[{"name": "n", "type": "number"}]) if mcp_points else mcp_device("pump-1")
    cfg = config(
        broker=broker(enabled=False),
        northbound=[
            sink("local", mqtt_url),
            sink("scada", mqtt_url, format="sparkplug", sparkplug=sparkplug),
        ],
        buses=[
            line(
                "field",
                "./ttyA",
                device("boiler", 1, points=[TEMPERATURE, SETPOINT], poll="200ms", write_rate=50),
                device("meter", 2, points=[COUNT], poll="200ms"),
            )
        ],
        mcp=mcp(mcp_port, ack_timeout="2s", devices=[pump]),
        simulator=simulator(
            modbus=[
                sim_line(
                    "./ttyA",
                    sim_slave(1, {"temperature": {"value": 60}, "setpoint": {"value": 45}}, dead=boiler_dead or None),
                    sim_slave(2, {"count": RAMP}),
                )
            ]
        ),
    )
    return write(cfg, tmp_path)


class Recorder(Subscriber):
    """Every message on spBv1.0/# and the JSON sink's topics, in arrival order."""

    def __init__(self, port: int) -> None:
        super().__init__(port, ("spBv1.0/#", f"{JSON_PREFIX}/#"))

    def sparkplug(self, kind: str | None = None, device: str | None = None, *, cmds: bool = True) -> list[Received]:
        """Our node's Sparkplug messages (of one type, of one device; without NCMD/DCMD unless `cmds`), in arrival
        order."""
        with self._lock:
            snapshot = list(self.messages)
        prefix = f"{NS}/"
        out = []
        for m in snapshot:
            if not m.topic.startswith(prefix) or m.topic.split("/")[3] != EDGE:
                continue
            parts = m.topic.split("/")
            if kind is not None and parts[2] != kind or not cmds and parts[2] in ("NCMD", "DCMD"):
                continue
            if device is not None and (len(parts) < 5 or parts[4] != device):
                continue
            out.append(m)
        return out

    def values(self, device: str, metric: str, *, since: int = 0) -> list[tuple[Any, Any]]:
        """(decoded metric, its payload) of every DBIRTH/DDATA metric named `metric` of `device` (by name or the
        alias its last birth gave), from message index `since` on."""
        out: list[tuple[Any, Any]] = []
        alias: int | None = None
        for m in self.sparkplug(device=device):
            kind = m.topic.split("/")[2]
            if kind not in ("DBIRTH", "DDATA"):
                continue
            p = decode(m.payload)
            for x in p.metrics:
                if kind == "DBIRTH" and x.name == metric:
                    alias = x.alias
                if x.name == metric or (kind == "DDATA" and alias is not None and x.alias == alias):
                    out.append((x, p))
        return out[since:]

    def publish_raw(self, topic_: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> None:
        """Publish as a host would (this recorder's own connection)."""
        self.client.publish(topic_, payload, qos=qos, retain=retain)


def value_of(metric: Any) -> Any:
    """A metric's value, whatever field holds it."""
    which = metric.WhichOneof("value")
    return getattr(metric, which) if which else None


@dataclass
class Rig:
    """The running parts of one test."""

    tmp: Path
    mosquitto: Mosquitto
    config: Path
    mcp_port: int
    sub: Recorder
    gw: GatewayProcess
    primary_host: str | None = None

    def rewrite(self, **keys: Any) -> None:
        """Write the config again with `keys` of gateway_config changed (for the next start)."""
        gateway_config(self.tmp, self.mosquitto.url, self.mcp_port, primary_host=self.primary_host, **keys)

    @property
    def state_dir(self) -> Path:
        """The gateway's state dir."""
        return self.tmp / "state"

    def audit(self) -> list[dict[str, Any]]:
        """The audit log's records."""
        path = self.state_dir / "audit.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def start_gateway(self) -> GatewayProcess:
        """Start `fieldgate run` (again) on the same config and state."""
        self.gw = GatewayProcess(["run", "-c", str(self.config)], self.tmp / "gateway.log", cwd=self.tmp, env=env())
        return self.gw

    def kill9(self) -> None:
        """SIGKILL the gateway and reap it."""
        self.gw.proc.kill()
        self.gw.proc.wait()

    @contextlib.asynccontextmanager
    async def pump(self) -> AsyncIterator[McpClient]:
        """MCP device pump-1 with a session up."""
        client = McpClient(
            "127.0.0.1",
            self.mcp_port,
            "pump-1",
            "s3cret-token-0001",
            ack_timeout=3.0,
            backoff_start=0.1,
            backoff_max=0.5,
        )
        await client.start()
        try:
            ok = await client.wait_connected(30)
            assert ok, f"no MCP session: {client.last_error}"
            yield client
        finally:
            await client.stop()


def _mosquitto(tmp_path: Path) -> Mosquitto:
    try:
        return Mosquitto(tmp_path / "mosquitto", free_port())
    except MosquittoError as exc:  # fail, not skip (tests/README.md)
        raise AssertionError(str(exc)) from None


@contextlib.asynccontextmanager
async def rig(
    tmp_path: Path, *, primary_host: str | None = None, mcp_points: bool = False, retained_state: bytes | None = None
) -> AsyncIterator[Rig]:
    """Mosquitto, the recorder (subscribed before the gateway starts), then the gateway; all stopped after."""
    mosq = _mosquitto(tmp_path)
    mosq.start()
    sub = Recorder(mosq.port)
    try:
        sub.start()
        if retained_state is not None:
            sub.client.publish(STATE_TOPIC, retained_state, qos=1, retain=True).wait_for_publish(5)
        mcp_port = free_port()
        path = gateway_config(tmp_path, mosq.url, mcp_port, primary_host=primary_host, mcp_points=mcp_points)
        gw = GatewayProcess(["run", "-c", str(path)], tmp_path / "gateway.log", cwd=tmp_path, env=env())
        r = Rig(tmp_path, mosq, path, mcp_port, sub, gw, primary_host)
        try:
            await r.gw.logged("fieldgate t1 up", timeout=60)
            yield r
        finally:
            if r.gw.proc.poll() is None:
                with contextlib.suppress(TimeoutError):
                    r.gw.stop()
    finally:
        sub.stop()
        mosq.stop()
        # For a post-mortem of a failed run: what the recorder saw, in order.
        with (tmp_path / "recorded.jsonl").open("w") as out:
            for m in sub.messages:
                out.write(json.dumps({"topic": m.topic, "payload": m.payload.hex(), "at": m.at}) + "\n")


@contextlib.contextmanager
def host_client(port: int, client_id: str = "test-host") -> Iterator[mqtt.Client]:
    """A plain paho client as a host application (publishes STATE and commands)."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{client_id}-{time.monotonic_ns()}")
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        yield c
    finally:
        c.disconnect()
        c.loop_stop()


class IndependentHost:
    """The independent decoder's host mode (pysparkplug) as a process: STATE online, commands, decoded messages."""

    def __init__(self, port: int, host_id: str = HOST) -> None:
        self.port = port
        self.host_id = host_id
        self.lines: list[dict[str, Any]] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start it and wait until it says it is online (subscribed, STATE published)."""
        self.proc = await asyncio.create_subprocess_exec(
            str(SPB_PYTHON),
            str(DECODER),
            "--host",
            "127.0.0.1",
            str(self.port),
            GROUP,
            self.host_id,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        self._reader = asyncio.create_task(self._read())
        await until(lambda: any(x.get("event") == "online" for x in self.lines), 30, "the independent host online")

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.lines.append(json.loads(line))

    async def command(self, cmd: dict[str, Any]) -> None:
        """Send one stdin command and wait for its acknowledgement (`sent`; an `error` fails)."""
        assert self.proc is not None and self.proc.stdin is not None
        before = len(self.lines)
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()
        done = await until(
            lambda: next((x for x in self.lines[before:] if x.get("event") in ("sent", "error")), None), 10, "an ack"
        )
        assert done["event"] == "sent", done

    def decoded(self, kind: str, device: str | None = None) -> list[dict[str, Any]]:
        """Messages of our node it decoded, of one type (and device)."""
        return [
            x
            for x in self.lines
            if "topic" in x
            and x["topic"].get("edge") == EDGE
            and x["topic"].get("type") == kind
            and (device is None or x["topic"].get("device") == device)
        ]

    def errors(self, *, after_birth: bool = True) -> list[dict[str, Any]]:
        """Messages it could not decode (by default from our node's first NBIRTH it saw on: before that a host that
        joined late cannot resolve an alias, as the specification expects)."""
        start = 0
        if after_birth:
            start = next((i for i, x in enumerate(self.lines) if x.get("topic", {}).get("type") == "NBIRTH"), 0)
        return [x for x in self.lines[start:] if "error" in x]

    async def stop(self) -> None:
        """Quit (STATE offline, clean disconnect) and reap it."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                assert self.proc.stdin is not None
                self.proc.stdin.write(b'{"cmd": "quit"}\n')
                await self.proc.stdin.drain()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            await self._reader


@contextlib.asynccontextmanager
async def independent_host(port: int, host_id: str = HOST) -> AsyncIterator[IndependentHost]:
    """An IndependentHost, started and stopped."""
    host = IndependentHost(port, host_id)
    try:
        await host.start()
        yield host
    finally:
        await host.stop()
