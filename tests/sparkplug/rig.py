"""A Sparkplug test rig of real parts: Mosquitto, a `fieldgate run` process, simulated field devices, a recorder.

    from sparkplug.rig import Rig, decode_independent   # (the `tests` folder is on pytest's pythonpath)

    with Rig(tmp_path) as rig:            # Mosquitto + recorder + field devices + the gateway, started
        rig.wait(lambda: rig.recorder.of("DBIRTH", "plc"), what="plc's DBIRTH")
        nbirth = rig.recorder.of("NBIRTH")[-1]
        payload = nbirth.decoded()          # our own decoder: bridge.sparkplug.sparkplug_b_pb2.Payload
        metrics = nbirth.metrics()          # {name: Metric} (births: every metric carries its name)
        independent = decode_independent(rig.recorder.messages())   # pysparkplug's reading, one dict each

The API (kept small and stable: other test files import it):

- `Rig(tmp_path, *, poll="100ms", mcp_interval=0.1, sparkplug=None, start=True)`: `rig.config` is the
  gateway's config dict (tests/configs.py), `rig.write_config()` writes it, `rig.start_gateway()`,
  `rig.stop_gateway()` (SIGTERM, its exit code), `rig.kill_gateway()` (SIGKILL), `rig.reload()` (write the
  config and SIGHUP), `rig.gateway` (the `GatewayProcess`, its log in `rig.dir / "gateway.log"`),
  `rig.bdseq_path`, `rig.mosquitto`, `rig.recorder`, `rig.field`, `rig.close()`. `Rig.wait(cond, timeout,
  what)` polls a condition (synchronous: the rig needs no event loop of the test's).
- The gateway (id `t1`, group `plant1`, edge node `line-a`, sink `scada` to Mosquitto, `format: sparkplug`)
  polls line `rs485` (a pty with a pymodbus server): `plc` (unit 1: `level` int16 ramp, `temp` int16 x0.1 °C
  0..100 writable, `flow` float32, `status` bitfield bits 0 running / 1 alarm, `serial` string:8) and `aux`
  (unit 2: `count` uint16 ramp); MCP device `pump-1` (declared points `flow_lpm` number l/min, `running` bool)
  pushes every `mcp_interval` s. The field devices run in the test process (`rig.field`, on a thread of its
  own), so a test can silence a Modbus unit (`field.set_dead(2)`), set a point (`field.set(1, "flow", 2.5)`),
  drop the MCP device (`field.mcp_disconnect()` / `field.mcp_connect()`) or make it push other values
  (`field.mcp_hold({...})`).
- `rig.recorder` (`SpbRecorder`): a paho client subscribed to `spBv1.0/#` at QoS 1 (so a message arrives at the
  QoS it was published with, up to 1) recording every message as a `Recorded` (topic, payload, qos, retain,
  at, and its parts: kind, group, edge, device, `decoded()`, `seq`, `metrics()`, `bdseq()`); `of(kind,
  device=None)`, `messages()`, `mark()` / `since(mark)`, `publish(topic, payload, qos=0, retain=False)`.
- `decode_independent(messages)`: the same messages read by the independent decoder (pysparkplug, through
  `sparkplug.sparkplug_decode.decode_independently`): one dict per message, in order.
- `ncmd_rebirth()` / `payload_of(metrics)`: an NCMD `Node Control/Rebirth` = true encoded with our protobuf
  module.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from sparkplug.sparkplug_decode import decode_independently

from bridge.sparkplug import sparkplug_b_pb2 as pb
from gateway.config import load_config
from gateway.simulation import Simulation, start_mcp_simulation, start_simulation

import configs
from configs import Section
from helpers import GatewayProcess, free_port
from mosquitto import Mosquitto

ROOT = Path(__file__).resolve().parents[2]

GROUP = "plant1"
EDGE = "line-a"
SINK = "scada"
T = TypeVar("T")


# --- what the broker delivered ---------------------------------------------------------------


@dataclass
class Recorded:
    """One message as the recorder received it, with its Sparkplug topic parts and our own decoding."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    at: float  # time.monotonic() at arrival
    index: int  # its place in the recording

    @property
    def parts(self) -> list[str]:
        """The topic's levels."""
        return self.topic.split("/")

    @property
    def kind(self) -> str:
        """NBIRTH, DDATA, ... (STATE for a host's state)."""
        parts = self.parts
        return parts[1] if parts[1] == "STATE" else parts[2]

    @property
    def device(self) -> str | None:
        """The device a D* message is about (None for the node's)."""
        parts = self.parts
        return parts[4] if len(parts) > 4 else None

    def decoded(self) -> pb.Payload:
        """The payload read by our own protobuf module."""
        return pb.Payload.FromString(self.payload)

    @property
    def seq(self) -> int | None:
        """The payload's seq (None when absent, as in an NDEATH)."""
        p = self.decoded()
        return p.seq if p.HasField("seq") else None

    def metrics(self) -> dict[str, pb.Payload.Metric]:
        """The payload's metrics by name (a birth's; data metrics travel by alias, without a name)."""
        return {m.name: m for m in self.decoded().metrics}

    def bdseq(self) -> int:
        """The bdSeq metric's value (NBIRTH, NDEATH)."""
        return int(self.metrics()["bdSeq"].long_value)


class SpbRecorder:
    """A paho client on its own thread recording every `spBv1.0/#` message with its QoS and retain flag."""

    def __init__(self, port: int, topic: str = "spBv1.0/#") -> None:
        self.port = port
        self._messages: list[Recorded] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"spb-recorder-{port}-{id(self)}")
        c.on_connect = lambda cl, *_: cl.subscribe(topic, qos=1)
        c.on_subscribe = lambda *_: self._subscribed.set()
        c.on_message = self._on_message
        self.client = c

    def _on_message(self, _c: mqtt.Client, _u: object, m: mqtt.MQTTMessage) -> None:
        with self._lock:
            self._messages.append(
                Recorded(m.topic, bytes(m.payload), m.qos, bool(m.retain), time.monotonic(), len(self._messages))
            )

    def start(self) -> None:
        """Connect and subscribe; returns once the broker confirmed the subscription."""
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("the Sparkplug recorder did not subscribe")

    def stop(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()

    def messages(self) -> list[Recorded]:
        """Everything received so far, in arrival order."""
        with self._lock:
            return list(self._messages)

    def mark(self) -> int:
        """A place in the recording, for `since`."""
        with self._lock:
            return len(self._messages)

    def since(self, mark: int) -> list[Recorded]:
        """What arrived after `mark`."""
        with self._lock:
            return self._messages[mark:]

    def of(self, kind: str, device: str | None = None, since: int = 0) -> list[Recorded]:
        """The messages of one kind (and device, if given) received after `since`, oldest first."""
        return [m for m in self.since(since) if m.kind == kind and (device is None or m.device == device)]

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> None:
        """Publish as a host would (waits until paho has handed it to the socket)."""
        self.client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(10)


def payload_of(metrics: Iterable[tuple[str, int, Any]], *, timestamp: int | None = None) -> bytes:
    """A command payload made with our protobuf module: (name, datatype number, value) per metric."""
    p = pb.Payload(timestamp=timestamp if timestamp is not None else int(time.time() * 1000))
    for name, datatype, value in metrics:
        m = p.metrics.add()
        m.name = name
        m.datatype = datatype
        if datatype == pb.Boolean:
            m.boolean_value = bool(value)
        elif datatype == pb.String:
            m.string_value = str(value)
        elif datatype in (pb.Float,):
            m.float_value = float(value)
        elif datatype == pb.Double:
            m.double_value = float(value)
        elif datatype in (pb.Int64, pb.UInt64, pb.DateTime):
            m.long_value = int(value) % (1 << 64)
        else:
            m.int_value = int(value) % (1 << 32)
    return p.SerializeToString()


def ncmd_rebirth(value: bool = True) -> bytes:
    """An NCMD payload asking for a rebirth (`Node Control/Rebirth` = value)."""
    return payload_of([("Node Control/Rebirth", pb.Boolean, value)])


def decode_independent(messages: Iterable[Recorded], timeout: float = 60.0) -> list[dict[str, Any]]:
    """The messages as the independent decoder (pysparkplug) reads them, one dict per message, in order."""
    return decode_independently([(m.topic, m.payload) for m in messages], timeout)


# --- the field devices -----------------------------------------------------------------------


class Field:
    """The simulated Modbus line and MCP device, on an event loop of their own (a thread), so tests may be sync."""

    def __init__(self, config_path: Path, mcp_port: int) -> None:
        self.config_path = config_path
        self.mcp_port = mcp_port
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="spb-rig-field", daemon=True)
        self._sim: Simulation | None = None
        self._cfg: Any = None

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        """Create the line (its pty linked where the gateway's bus opens it) and start its slaves."""
        self._thread.start()
        self._cfg = load_config(self.config_path).config
        self._sim = self._run(start_simulation(self._cfg, self.config_path.parent))

    def set_dead(self, unit: int, dead: bool = True) -> None:
        """Silence (or revive) one Modbus unit, as a device losing power."""
        assert self._sim is not None
        sim = next(iter(self.sim_values()))
        self.loop.call_soon_threadsafe(sim.set_dead, unit, dead)

    def set(self, unit: int, point: str, value: Any) -> None:
        """Make a Modbus unit's point hold `value` from now on (encoded with the point's own codec)."""
        sim = next(iter(self.sim_values()))
        self.loop.call_soon_threadsafe(sim.set, unit, point, value)

    def sim_values(self) -> Iterable[Any]:
        """The ModbusSimulators (one per line)."""
        assert self._sim is not None
        return self._sim.simulators.values()

    def mcp_connect(self) -> None:
        """Connect the simulated MCP device(s) and start pushing."""
        assert self._sim is not None
        self._run(start_mcp_simulation(self._cfg, self._sim, self.mcp_port))

    def mcp_hold(self, values: dict[str, Any]) -> None:
        """From the next push on, the MCP device(s) send these values (beside their waves, replacing any of the
        same name), as a device's `set` command would hold them; a name that is no wave is a new metric."""
        assert self._sim is not None
        for device in self._sim.mcp_devices:
            self.loop.call_soon_threadsafe(device.held.update, dict(values))

    def mcp_disconnect(self) -> None:
        """Disconnect the simulated MCP device(s)."""
        assert self._sim is not None
        self._run(self._sim.stop_mcp())

    def stop(self) -> None:
        """Stop every device, remove the line, end the thread."""
        if self._sim is not None:
            self._run(self._sim.stop())
            self._sim = None
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        self.loop.close()


# --- the rig ---------------------------------------------------------------------------------


def plc_points() -> list[Section]:
    """The `plc`'s points: one of each kind a Sparkplug datatype is chosen for."""
    return [
        configs.point("level", "holding", 0, "int16"),
        configs.point("temp", "holding", 1, "int16", scale=0.1, unit="°C", min=0, max=100, writable=True),
        configs.point("flow", "holding", 2, "float32", unit="l/s"),
        configs.point("status", "holding", 4, "bitfield", bits={0: "running", 1: "alarm"}),
        configs.point("serial", "holding", 10, "string:8"),
    ]


class Rig:
    """Mosquitto, a recorder on it, the simulated field devices and a `fieldgate run` process (see the module)."""

    recorder: SpbRecorder
    field: Field

    def __init__(
        self,
        tmp_path: Path,
        *,
        poll: str = "100ms",
        mcp_interval: float = 0.1,
        sparkplug: Section | None = None,
        start: bool = True,
    ) -> None:
        self.poll = poll
        self.mcp_interval = mcp_interval
        self.sparkplug = sparkplug
        self.dir = tmp_path / "rig"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.mosquitto = Mosquitto(self.dir / "mosquitto", free_port())
        self.mcp_port = free_port()
        self.gateway: GatewayProcess | None = None
        self.config: Section = self._config()
        self._started: list[Callable[[], object]] = []
        if start:
            try:
                self.start_all()
            except BaseException:
                self.close()
                raise

    def _config(self) -> Section:
        sp = self.sparkplug if self.sparkplug is not None else {"group_id": GROUP, "edge_node_id": EDGE}
        plc = configs.device("plc", 1, poll=self.poll, points=plc_points())
        aux = configs.device("aux", 2, poll=self.poll, points=[configs.point("count", "holding", 0, "uint16")])
        pump = configs.mcp_device(
            "pump-1", points=[{"name": "flow_lpm", "unit": "l/min"}, {"name": "running", "type": "bool"}]
        )
        ramp = {"wave": "ramp", "period": self.poll, "min": 0, "max": 30000}
        slaves = [
            configs.sim_slave(
                1,
                {
                    "level": ramp,
                    "temp": {"value": 21.5},
                    "flow": {"value": 1.25},
                    "status": {"wave": "bits", "period": "1s"},
                    "serial": {"value": "SN-42"},
                },
            ),
            configs.sim_slave(2, {"count": ramp}),
        ]
        waves = {
            "flow_lpm": {"wave": "ramp", "period": "100ms", "min": 0, "max": 100000, "step": 1},
            "running": {"wave": "toggle", "period": "1s"},
        }
        return configs.config(
            id="t1",
            state_dir=str(self.dir / "state"),
            log_level="INFO",
            broker=configs.broker(enabled=False),
            northbound=[configs.sink(SINK, self.mosquitto.url, format="sparkplug", sparkplug=sp)],
            buses=[configs.line("rs485", str(self.dir / "ttyA"), plc, aux)],
            mcp=configs.mcp(self.mcp_port, devices=[pump]),
            simulator=configs.simulator(
                modbus=[configs.sim_line(str(self.dir / "ttyA"), *slaves)],
                mcp=[configs.sim_mcp("pump-1", f"{int(self.mcp_interval * 1000)}ms", waves)],
            ),
        )

    @property
    def config_path(self) -> Path:
        """The gateway's config file."""
        return self.dir / "config.yaml"

    @property
    def bdseq_path(self) -> Path:
        """Where the sink's bdSeq is kept."""
        return self.dir / "state" / "sparkplug" / f"{SINK}.bdseq"

    def write_config(self) -> Path:
        """Write `config` for the gateway (without its `simulator` section: the rig runs the field devices)."""
        gateway_cfg = {k: v for k, v in self.config.items() if k != "simulator"}
        configs.write(gateway_cfg, self.config_path)
        configs.write(self.config, self.dir / "field.yaml")
        return self.config_path

    def start_all(self) -> None:
        """Broker, recorder, field devices, gateway; then the MCP device."""
        self.mosquitto.start()
        self._started.append(self.mosquitto.stop)
        self.recorder = SpbRecorder(self.mosquitto.port)
        self.recorder.start()
        self._started.append(self.recorder.stop)
        self.write_config()
        self.field = Field(self.dir / "field.yaml", self.mcp_port)
        self.field.start()
        self._started.append(self.field.stop)
        self.start_gateway()
        self.field.mcp_connect()

    def start_gateway(self) -> GatewayProcess:
        """`fieldgate run` on the config written; returns once it listens for MCP (its sink connects on its own)."""
        if self.gateway is not None and self.gateway.proc.poll() is None:
            return self.gateway
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.gateway = GatewayProcess(
            ["run", "-c", str(self.config_path)], self.dir / "gateway.log", cwd=self.dir, env=env
        )
        self.wait(self._mcp_listening, 20, "the gateway's MCP listener")
        return self.gateway

    def _mcp_listening(self) -> bool:
        assert self.gateway is not None
        assert self.gateway.proc.poll() is None, self.gateway.output()
        try:
            with socket.create_connection(("127.0.0.1", self.mcp_port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop_gateway(self) -> int:
        """SIGTERM and wait for the exit; its exit code."""
        assert self.gateway is not None
        return self.gateway.stop()

    def kill_gateway(self) -> None:
        """SIGKILL: no goodbye, the broker publishes the will."""
        assert self.gateway is not None
        self.gateway.proc.send_signal(signal.SIGKILL)
        self.gateway.proc.wait(10)

    def reload(self) -> None:
        """Write `config` and send SIGHUP."""
        assert self.gateway is not None
        self.write_config()
        self.gateway.proc.send_signal(signal.SIGHUP)

    def log(self) -> str:
        """The gateway's output so far."""
        return self.gateway.output() if self.gateway is not None else ""

    @staticmethod
    def wait(condition: Callable[[], T], timeout: float = 15.0, what: str = "") -> T:
        """Poll `condition` every 20 ms until it is truthy; its value. AssertionError naming `what` after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            result = condition()
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what or condition}")
            time.sleep(0.02)

    def close(self) -> None:
        """Stop the gateway (SIGTERM, SIGKILL if it hangs) and every part the rig started, in reverse."""
        if self.gateway is not None and self.gateway.proc.poll() is None:
            try:
                self.gateway.stop()
            except TimeoutError:
                pass
        while self._started:
            try:
                self._started.pop()()
            except Exception:  # noqa: BLE001 - the rest must still be stopped
                pass

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
