"""The Modbus TCP server with clients written apart from pymodbus: pyModbusTCP (pure Python) and mbpoll (libmodbus)."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import pytest
from pyModbusTCP.client import ModbusClient

from drivers.modbus.settings import ExposeSettings

from configs import device, point
from helpers import until

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_rig import line_config, server_rig  # noqa: E402

EXPOSE = (ExposeSettings(1, "d1"), ExposeSettings(2, "d2", writes=True), ExposeSettings(3, "d3", passthrough="all"))


def devices():  # type: ignore[no-untyped-def]
    """Three devices with four holding registers, a float, a coil and a writable register each."""
    points = [point(f"r{i}", "holding", i) for i in range(4)]
    points += [point("f", "holding", 10, "float32"), point("c", "coil", 3), point("w", "holding", 20, writable=True)]
    return line_config([device(f"d{u}", u, poll="50ms", points=points) for u in (1, 2, 3)])


async def polled(rig) -> None:  # type: ignore[no-untyped-def]
    """Every device answered a poll."""
    await until(lambda: all(d.online for d in rig.bus.devices.values()), 20, "polls")


async def test_pymodbustcp_reads_writes_and_gets_the_exceptions(tmp_path: Path) -> None:
    async with server_rig(tmp_path, devices(), EXPOSE, cache_max_age=30.0) as rig:
        rig.sim.set(1, "r2", 0xABCD)
        rig.sim.set(2, "f", -2.5)
        await polled(rig)
        await until(lambda: rig.bus.devices["d1"].cache.lookup("holding", 2, 1, 0.0) == [0xABCD], 20, "r2 polled")

        def session() -> dict[str, object]:
            # pyModbusTCP is blocking: it runs in a thread while the server runs on this loop.
            seen: dict[str, object] = {}
            one = ModbusClient("127.0.0.1", rig.port, unit_id=1, timeout=10)
            seen["regs"] = one.read_holding_registers(0, 4)
            seen["coil"] = one.read_coils(3, 1)
            seen["write1"] = one.write_single_register(20, 9)
            seen["write1_except"] = one.last_except
            one.close()
            two = ModbusClient("127.0.0.1", rig.port, unit_id=2, timeout=10)
            seen["float_words"] = two.read_holding_registers(10, 2)
            seen["write2"] = two.write_multiple_registers(20, [321])
            seen["after"] = two.read_holding_registers(20, 1)
            two.close()
            nine = ModbusClient("127.0.0.1", rig.port, unit_id=9, timeout=10)
            seen["nine"] = nine.read_holding_registers(0, 1)
            seen["nine_except"] = nine.last_except
            nine.close()
            return seen

        seen = await asyncio.to_thread(session)
        regs = seen["regs"]
        assert isinstance(regs, list) and regs[2] == 0xABCD
        assert seen["coil"] == [rig.sim.get(1, "c")]
        assert seen["write1"] is False and seen["write1_except"] == 0x01
        assert seen["float_words"] == rig.bus.devices["d2"].points["f"].codec.encode(-2.5)
        assert seen["write2"] is True and seen["after"] == [321] and rig.sim.get(2, "w") == 321
        assert seen["nine"] is None and seen["nine_except"] == 0x0A


async def _mbpoll(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "mbpoll", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(errors="replace")


@pytest.mark.skipif(shutil.which("mbpoll") is None, reason="mbpoll is not installed (Debian package mbpoll)")
async def test_mbpoll_reads_registers_and_coils_and_sees_the_exceptions(tmp_path: Path) -> None:
    async with server_rig(tmp_path, devices(), EXPOSE, cache_max_age=30.0) as rig:
        rig.sim.set(1, "r1", 0x1234)
        await polled(rig)
        await until(lambda: rig.bus.devices["d1"].cache.lookup("holding", 1, 1, 0.0) == [0x1234], 20, "r1 polled")
        port = str(rig.port)
        # mbpoll counts references from 1: reference 1 is register 0.
        code, out = await _mbpoll(
            "-m", "tcp", "-a", "1", "-r", "1", "-c", "4", "-t", "4:hex", "-1", "-p", port, "127.0.0.1"
        )
        assert code == 0, out
        assert "[2]: \t0x1234" in out, out
        hits = rig.server.stats.cache_hits
        assert hits >= 1
        code, out = await _mbpoll(
            "-m", "tcp", "-a", "1", "-r", "4", "-c", "1", "-t", "0", "-1", "-p", port, "127.0.0.1"
        )
        assert code == 0 and f"[4]: \t{int(bool(rig.sim.get(1, 'c')))}" in out, out
        # Beyond what is polled: through the line, the slave's words.
        code, out = await _mbpoll("-m", "tcp", "-a", "3", "-r", "41", "-c", "2", "-1", "-p", port, "127.0.0.1")
        assert code == 0 and "[41]:" in out and "[42]:" in out, out
        # libmodbus names the exceptions it gets back.
        code, out = await _mbpoll("-m", "tcp", "-a", "7", "-r", "1", "-1", "-p", port, "127.0.0.1")
        assert code != 0 and "Gateway path unavailable" in out, out
        code, out = await _mbpoll("-m", "tcp", "-a", "1", "-r", "21", "-1", "-p", port, "127.0.0.1", "5")
        assert code != 0 and "Illegal function" in out, out
        code, out = await _mbpoll("-m", "tcp", "-a", "2", "-r", "21", "-1", "-p", port, "127.0.0.1", "4711")
        assert code == 0, out
        assert rig.sim.get(2, "w") == 4711
