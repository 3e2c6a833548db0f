"""Benchmark of the whole `fieldgate run` process on the shipped config: start-up time, idle RSS, memory growth.

Run from the repository root:  .venv/bin/python hil/bench/gateway_bench.py [--runs N] [--idle S] [--soak S]
hil/bench/README.md says what each figure means.

Each run copies the shipped `config.yaml` into a fresh temp dir (its `var/` state dir and the
simulator's pty link live there) with the listeners moved to free loopback ports (the broker's
1883, MCP's 7720 and the status page's 9720 may be taken on this machine), and starts the
`fieldgate` command with that dir as its working dir and `NOTIFY_SOCKET` pointing at a datagram
socket of the bench's, as systemd would:

- **start-up** is timed from just before the exec to (a) `READY=1` arriving on that socket (the
  gateway sends it once the broker, the sinks, the lines and the MCP server are up) and (b) the first
  value of every simulated device (boiler1, boiler2, meter over the virtual RS-485 line; pump-1 and
  weather over MCP) arriving at a paho subscriber on the embedded broker: a retained per-point
  topic, so a subscriber that connects after it was published still sees it, at its connection;
- **idle RSS** is VmRSS of the gateway and of its broker child (`broker.process: separate`, as
  shipped) `--idle` seconds (default 10) after READY, polling the shipped devices at their
  configured intervals.

Then `--soak` seconds (default 60; 0 skips it) of hil/soak.py's compressed traffic, with outages
and MCP reconnects every few seconds (`SoakSettings.screening`), give the gateway's RSS growth after
warm-up and its steady growth per message (hil/soak.py's docstring has the method). A minute
cannot judge the < 1 % goal (replay bursts leave high-water steps for the first minutes; the 20
minute soak, `python -m hil.soak`, judges it): the suite's table judges the steady growth per
message against STEADY_GOAL_BYTES and shows the % without a goal.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import yaml

# benchlib first: it puts the repository on sys.path for the imports below.
from benchlib import ROOT, free_port, heading, note, print_header, print_table, record, rss_kb, run_summary, summary
from benchlib.configs import write_config
from benchlib.procs import GatewayProcess, fieldgate_command
from paho.mqtt.enums import CallbackAPIVersion

from hil.soak import SoakSettings, record_growth, soak

SHIPPED = ROOT / "config.yaml"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
DEFAULT_RUNS = 3
DEFAULT_IDLE = 10.0
DEFAULT_SOAK = 60.0
#: Devices whose values count as "the gateway is ready": what the shipped simulator section serves.
SHIPPED_DEVICES = ("boiler1", "boiler2", "meter", "pv-meter", "inverter", "pump-1", "weather")
#: Steady RSS growth per message the short soak may show. Measured 0.0-0.1 bytes; the least a per-message leak
#: can cost is one Python object and its slot (an empty bytes and a list slot, 41 bytes), 10x this. hil/soak.py's
#: own verdict allows 16 (its self-check); the bench holds the gateway to what it does.
STEADY_GOAL_BYTES = 4.0


def shipped_copy(workdir: Path) -> Path:
    """The shipped config in `workdir`, its broker, MCP, status page, Modbus TCP server and simulated Modbus TCP
    endpoints on free loopback ports."""
    cfg = yaml.safe_load(SHIPPED.read_text())
    cfg["broker"]["listeners"] = [f"tcp://127.0.0.1:{free_port()}"]
    cfg["mcp"]["listen"] = f"127.0.0.1:{free_port()}"
    cfg["gateway"]["http"] = f"127.0.0.1:{free_port()}"
    if cfg["modbus"].get("server"):
        cfg["modbus"]["server"]["listen"] = f"127.0.0.1:{free_port()}"
    for endpoint in cfg.get("simulator", {}).get("modbus_tcp", []):
        moved = f"127.0.0.1:{free_port()}"
        for bus in cfg["modbus"]["buses"]:  # the bus that polls the endpoint follows it
            if bus["port"] == f"tcp://{endpoint['listen']}":
                bus["port"] = f"tcp://{moved}"
        endpoint["listen"] = moved
    return write_config(workdir / "config.yaml", cfg)


def broker_port(config: Path) -> int:
    """The port of the copied config's broker listener."""
    listener = yaml.safe_load(config.read_text())["broker"]["listeners"][0]
    return int(listener.rsplit(":", 1)[1])


class FirstValues:
    """A paho subscriber, connecting again and again until the broker is there, noting each device's first value."""

    def __init__(self, port: int, prefix: str, devices: Sequence[str]) -> None:
        self.port, self.prefix = port, prefix
        self.devices = set(devices)
        self.first: dict[str, float] = {}
        self.done = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="first-values", daemon=True)

    def start(self) -> None:
        """Start connecting in the background."""
        self._thread.start()

    def _on_message(self, _c: mqtt.Client, _u: object, m: mqtt.MQTTMessage) -> None:
        at = time.monotonic()
        device, _, point = m.topic.removeprefix(self.prefix + "/").partition("/")
        # A value: a retained point or a telemetry message, not a status.
        if device in self.devices and point and point != "status" and device not in self.first:
            self.first[device] = at
            if self.devices <= self.first.keys():
                self.done.set()

    def _run(self) -> None:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"gateway-bench-{os.getpid()}", protocol=mqtt.MQTTv311)
        c.on_connect = lambda cl, *_: cl.subscribe(f"{self.prefix}/#", qos=1)
        c.on_message = self._on_message
        while not self._stop.is_set():
            try:
                c.connect("127.0.0.1", self.port, keepalive=30)
                break
            except OSError:
                time.sleep(0.02)
        else:
            return
        c.loop_start()
        self._stop.wait()
        c.disconnect()
        c.loop_stop()

    def stop(self) -> None:
        """Disconnect."""
        self._stop.set()
        self._thread.join(5)


@dataclass(frozen=True)
class StartRun:
    """One start of the shipped config."""

    ready_s: float  # exec → READY=1
    values_s: float  # exec → the last device's first value
    gateway_kb: int
    broker_kb: int
    exit_code: int


def start_once(idle: float) -> StartRun:
    """Start `fieldgate run` on a copy of the shipped config, time its start-up, read RSS after `idle` s, stop it."""
    workdir = Path(tempfile.mkdtemp(prefix="fieldgate-bench-"))
    try:
        config = shipped_copy(workdir)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(workdir / "notify.sock"))
        notify.settimeout(READY_TIMEOUT)
        values = FirstValues(broker_port(config), "fieldgate/demo", SHIPPED_DEVICES)
        values.start()
        started = time.monotonic()
        gw = GatewayProcess(
            config,
            workdir / "gateway.log",
            command=fieldgate_command(),
            env={"NOTIFY_SOCKET": str(workdir / "notify.sock")},
            unset=["WATCHDOG_USEC"],
        )
        try:
            ready_at = None
            while ready_at is None:
                if b"READY=1" in notify.recv(4096):
                    ready_at = time.monotonic()
            if not values.done.wait(READY_TIMEOUT):
                missing = sorted(set(SHIPPED_DEVICES) - values.first.keys())
                raise RuntimeError(f"no value from {', '.join(missing)} within {READY_TIMEOUT:g} s")
            last_value = max(values.first.values())
            time.sleep(max(0.0, ready_at + idle - time.monotonic()))
            if not gw.alive:
                raise RuntimeError(f"the gateway exited with {gw.proc.returncode}")
            broker = gw.broker_pid()
            gateway_kb = rss_kb(gw.pid)
            broker_kb = rss_kb(broker) if broker else 0
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(f"{exc}\n{gw.output()[-3000:]}") from exc
        finally:
            values.stop()
            notify.close()
            gw.stop(STOP_TIMEOUT)
        return StartRun(ready_at - started, last_value - started, gateway_kb, broker_kb, gw.proc.returncode)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the figures and print the report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--runs", type=int, default=DEFAULT_RUNS, help=f"starts of the shipped config (default {DEFAULT_RUNS})"
    )
    p.add_argument("--idle", type=float, default=DEFAULT_IDLE, help="s after READY before RSS is read (default 10)")
    p.add_argument("--soak", type=float, default=DEFAULT_SOAK, help="s of the short soak (default 60; 0: skip)")
    args = p.parse_args(argv)
    began = time.monotonic()
    from importlib.metadata import version

    print_header(
        "gateway",
        {"amqtt": version("amqtt"), "paho-mqtt": version("paho-mqtt"), "pymodbus": version("pymodbus")},
        [f"command: {' '.join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])}"],
        skews="start-up times and the soak's rates",
    )

    heading(f"1. Start-up and idle RSS, shipped config.yaml ({args.runs} runs)")
    runs = []
    for _ in range(args.runs):
        runs.append(start_once(args.idle))
    print_table(
        ["run", "exec → READY s", "exec → all first values s", "gateway RSS MiB", "broker child RSS MiB", "exit"],
        [
            [i + 1, r.ready_s, r.values_s, r.gateway_kb / 1024, r.broker_kb / 1024, r.exit_code]
            for i, r in enumerate(runs)
        ],
    )
    ready = sorted(r.ready_s for r in runs)
    first = sorted(r.values_s for r in runs)
    gw = statistics.median(r.gateway_kb for r in runs) / 1024
    broker = statistics.median(r.broker_kb for r in runs) / 1024
    note(f"READY: median {statistics.median(ready):.2f} s, min {ready[0]:.2f} s; all five devices' first values:")
    note(f"median {statistics.median(first):.2f} s, min {first[0]:.2f} s. RSS read {args.idle:g} s after READY.")
    summary(
        f"start-up {statistics.median(ready):.2f} s to READY, {statistics.median(first):.2f} s to live data; "
        f"idle RSS {gw:.1f} MiB gateway + {broker:.1f} MiB broker child"
    )
    record("gateway", "start-up, exec → READY=1 (median)", round(statistics.median(ready), 2), "s")
    record("gateway", "start-up, exec → first value of every device (median)", round(statistics.median(first), 2), "s")
    record("gateway", "idle RSS, gateway process", round(gw, 1), "MiB")
    record("gateway", "idle RSS, broker child", round(broker, 1), "MiB")

    if args.soak > 0:
        heading(f"2. Memory growth, {args.soak:g} s of compressed traffic (hil/soak.py)")
        settings = SoakSettings.screening(args.soak)
        workdir = Path(tempfile.mkdtemp(prefix="fieldgate-bench-soak-"))
        try:
            result = asyncio.run(soak(settings, workdir))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        result.report()
        record_growth(result, STEADY_GOAL_BYTES)
    else:
        # Asked not to soak: the suite still owes these rows, as not measured.
        record("gateway", "RSS growth after warm-up (no soak)", float("nan"), "%")
        record("gateway", "steady RSS growth per message published (no soak)", float("nan"), "bytes")
    print()
    print(run_summary(began))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
