"""A running gateway and its serial ports: held exclusively, a busy port and a refused RS-485 mode said once.

Each test runs `fieldgate run` as a process of its own on simulated lines (pseudo-terminals), and the commissioning
tools as the `fieldgate` command beside it, as a user would during commissioning.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import serial

from drivers.modbus.codec import PointCodec
from drivers.sim.line import VirtualLine
from drivers.sim.modbus import ModbusSimulator, SimPoint, SimSlave
from hil.ports import free_port

from configs import broker, config, device, line, point, sim_line, sim_slave, simulator, write
from helpers import GatewayProcess, subscribed, until

ROOT = Path(__file__).parents[2]
#: A value that moves at every poll, so that each answered poll publishes.
RAMP = {"wave": "ramp", "period": "1s", "min": 0, "max": 60000}
FIELDGATE = Path(sys.executable).parent / "fieldgate"


def env() -> dict[str, str]:
    """The environment of a child gateway: this tree's code first."""
    return {**os.environ, "PYTHONPATH": str(ROOT)}


async def fieldgate(*args: str, cwd: Path) -> tuple[int, str, str]:
    """The `fieldgate` command run as a process: exit status, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        str(FIELDGATE), *args, cwd=cwd, env=env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def metric(http: int, name: str, **labels: str) -> float | None:
    """One sample of the gateway's /metrics (None while it does not answer or has no such sample)."""

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=10) as r:
            return str(r.read().decode())

    try:
        text = await asyncio.to_thread(scrape)
    except OSError:
        return None
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.search(rf"^{re.escape(name)}\{{{re.escape(wanted)}\}} (\S+)$", text, re.M)
    return float(found.group(1)) if found else None


def reopen_attempts(http: int, bus: str, floor: int) -> Callable[[], Awaitable[bool]]:
    """A condition for `until`: the line's reopen attempts (as /metrics says) reached `floor`."""

    async def reached() -> bool:
        count = await metric(http, "fieldgate_modbus_line_reopen_attempts_total", line=bus)
        return count is not None and count >= floor

    return reached


def lines_saying(log: str, text: str) -> list[str]:
    """The lines of a gateway's log that contain `text`."""
    return [entry for entry in log.splitlines() if text in entry]


async def test_a_port_the_running_gateway_holds_is_busy_for_the_cli_and_a_held_port_is_busy_for_the_gateway(
    tmp_path: Path,
) -> None:
    """README: the gateway opens its ports exclusively. `fieldgate scan/read/write` on a port the running service
    polls exit 1 with "port busy" and what to do (stop the service or use its Modbus TCP server), without a frame
    on the line; the gateway's own line whose port another program holds says "port busy" once, keeps retrying,
    and polls once the port is free."""
    mqtt, http = free_port(), free_port()
    spare_line = VirtualLine(tmp_path / "ttyB")
    spare_line.start()
    meter = SimSlave(3, [SimPoint("power", "holding", 0, PointCodec.parse("uint16"))])
    meter_sim = ModbusSimulator(spare_line.device_port, [meter])
    await meter_sim.start()
    # Another program holds the spare line's port before the gateway starts.
    holder: serial.Serial | None = serial.Serial(spare_line.gateway_port, exclusive=True)
    cfg = config(
        broker=broker(mqtt),
        http=f"127.0.0.1:{http}",
        buses=[
            line(
                "field",
                "./ttyA",
                device("plc", 1, poll="100ms", points=[point("t", "holding", 0, "uint16")]),
                device("pump", 2, poll="100ms", points=[point("t", "holding", 0, "uint16")]),
            ),
            line("spare", "./ttyB", device("meter", 3, poll="100ms", points=[point("power", "holding", 0)])),
        ],
        simulator=simulator(modbus=[sim_line("./ttyA", sim_slave(1, {"t": RAMP}), sim_slave(2, {"t": RAMP}))]),
    )
    path = write(cfg, tmp_path)
    try:
        with GatewayProcess(["run", "-c", str(path)], tmp_path / "gateway.log", cwd=tmp_path, env=env()) as gw:
            await gw.logged("fieldgate t1 up")
            async with subscribed(mqtt, "fieldgate/t1/+/+") as sub:
                await sub.next_on("fieldgate/t1/plc/t", timeout=30)
                busy = f"line spare: port busy: {tmp_path / 'ttyB'} is in use by another process"
                await gw.logged(busy)

                # The commissioning tools against the port the gateway polls, each as its own process.
                field = str(tmp_path / "ttyA")
                serial_args = ["--port", field, "--baud", "115200", "--parity", "N"]
                for command in (
                    ["scan", *serial_args, "--units", "1-2"],
                    ["read", *serial_args, "--unit", "1", "--address", "0"],
                    ["write", *serial_args, "--unit", "1", "--address", "0", "--value", "5"],
                ):
                    code, out, err = await fieldgate(*command, cwd=tmp_path)
                    assert code == 1, (command, out, err)
                    said = err.splitlines()
                    assert said[0] == f"fieldgate: port busy: {field} is in use by another process", err
                    assert "systemctl stop fieldgate" in err and "`modbus.server`" in err, err
                    assert "Traceback" not in err and out == "", (out, err)

                # The gateway polled on undisturbed: both devices still answer, and no frame of another master
                # garbled or delayed an answer on the line.
                since = time.monotonic()
                for name in ("plc", "pump"):
                    await sub.next_on(f"fieldgate/t1/{name}/t", timeout=30, after=since)
                for counter in ("crc_errors", "timeouts", "errors"):
                    assert await metric(http, f"fieldgate_modbus_line_{counter}_total", line="field") == 0, counter
                assert "is offline" not in "".join(lines_saying(gw.output(), "on field)"))

                # Several attempts on the held port, one line about it; then the port is let go.
                await until(reopen_attempts(http, "spare", 3), 60, "three attempts to open the spare port")
                assert holder is not None
                holder.close()
                holder = None
                await gw.logged(f"line spare: {tmp_path / 'ttyB'} is open again", timeout=90)
                await sub.next_on("fieldgate/t1/meter/power", timeout=30)
                assert len(lines_saying(gw.output(), "line spare: port busy")) == 1, gw.output()
                assert gw.stop() == 0, gw.output()
    finally:
        if holder is not None:
            holder.close()
        await meter_sim.stop()
        spare_line.close()


async def test_a_gateway_whose_hat_port_refuses_rs485_says_so_once_and_runs_its_other_lines(tmp_path: Path) -> None:
    """README: a port that refuses `rs485:` fails with one line naming the bus and the port; the gateway keeps
    running (it does not refuse to start), retries that line with back-off, and its other lines poll."""
    mqtt, http = free_port(), free_port()
    cfg = config(
        broker=broker(mqtt),
        http=f"127.0.0.1:{http}",
        buses=[
            line(
                "hat",
                "./ttyA",
                device("boiler", 1, poll="100ms", points=[point("t", "holding", 0, "uint16")]),
                rs485={"rts_on_send": True, "rts_after_send": False, "delay_before_tx": "1ms"},
            ),
            line("usb", "./ttyB", device("meter", 2, poll="100ms", points=[point("power", "holding", 0)])),
        ],
        simulator=simulator(
            modbus=[sim_line("./ttyA", sim_slave(1)), sim_line("./ttyB", sim_slave(2, {"power": RAMP}))]
        ),
    )
    path = write(cfg, tmp_path)
    with GatewayProcess(["run", "-c", str(path)], tmp_path / "gateway.log", cwd=tmp_path, env=env()) as gw:
        await gw.logged("fieldgate t1 up")
        async with subscribed(mqtt, "fieldgate/t1/+/+") as sub:
            await sub.next_on("fieldgate/t1/meter/power", timeout=30)
            await until(reopen_attempts(http, "hat", 3), 60, "three attempts to open the HAT's port")
            since = time.monotonic()
            await sub.next_on("fieldgate/t1/meter/power", timeout=30, after=since)
            said = lines_saying(gw.output(), "line hat: ")
            assert len(said) == 1, gw.output()
            port = tmp_path / "ttyA"
            assert f"line hat: {port} refuses the kernel's RS-485 mode (Inappropriate ioctl for device" in said[0]
            assert said[0].endswith("; retrying with back-off"), said[0]
            assert not sub.on("fieldgate/t1/boiler/t")
            assert gw.stop() == 0, gw.output()
