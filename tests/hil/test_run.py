"""hil/run.py end to end: the scenarios from the command line, on the virtual line and in real-hardware
mode with two pty-backed stand-ins for the USB–RS-485 adapters joined by a line that plays the wire."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from hil import run, scenarios
from hil.line import Rs485Line

ROOT = Path(__file__).resolve().parents[2]


async def hil_run(*args: str, timeout: float = 90) -> tuple[int, str]:
    """`python -m hil.run ARGS` with stdin not a terminal; its exit code and output."""
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "hil.run", *args),
        stdin=subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def row(output: str, scenario: str) -> list[str]:
    """The cells of one scenario's row in the result table."""
    table = output[output.index("scenario  ") :]
    line = next(ln for ln in table.splitlines() if ln.startswith(scenario + "  "))
    return line[len(scenario) :].split()


@pytest.mark.timeout(120)
async def test_virtual_mode_runs_the_scenarios_and_prints_a_result_table() -> None:
    code, out = await hil_run("--scenario", "noise,unplug", "--seconds", "2", "--seed", "11")
    assert code == 0, out
    assert "virtual line (Rs485Line between ptys)" in out
    noise, unplug = row(out, "noise"), row(out, "unplug")
    assert noise[0] == unplug[0] == "PASS", out
    # transactions, values, wrong values, CRC errors, timeouts, then the faults injected.
    assert int(noise[2]) > 100 and noise[4] == "0" and int(noise[5]) > 0 and "flips" in out
    assert "1 unplugs" in out and "all 2 passed" in out


async def test_a_failed_scenario_makes_the_exit_code_non_zero_also_as_a_script() -> None:
    # Zero seconds of noise: not a byte crosses while it is on, so "CRC errors counted" cannot hold.
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "hil/run.py", "--scenario", "noise", "--seconds", "0"),
        stdin=subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=ROOT,
    )
    out = (await asyncio.wait_for(proc.communicate(), 60))[0].decode()
    assert proc.returncode == 1, out
    assert row(out, "noise")[0] == "FAIL"
    assert "noise: no CRC error counted" in out and "1 of 1 failed" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scenario", "jam"], "unknown scenario jam"),
        (["--format", "8X1"], "8E1"),
        (["--format", "8N1.5"], "1 or 2 stop bits"),
        (["--gateway-port", "/dev/null"], "both --gateway-port and --device-port"),
        (["--gateway-port", "/nonexistent/usb0", "--device-port", "/dev/null"], "/dev/serial/by-id"),
    ],
)
def test_usage_errors_exit_2_before_anything_runs(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run.main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.timeout(120)
async def test_real_mode_injects_the_faults_at_the_device_end_through_the_relay(tmp_path: Path) -> None:
    # Two "adapters": the pty pair behind ttyUSB0 (Fieldgate's) and the one behind ttyUSB1 (the
    # device's), joined by a fault-free, baud-accurate line that plays the real wire. Every fault the
    # scenarios need must come from run.py's relay in front of the slaves: without it, noise counts no
    # CRC error and no reply is late.
    async with Rs485Line(
        tmp_path / "ttyUSB0", device_link=tmp_path / "ttyUSB1", baudrate=115200, frame_format="8N1"
    ) as wire:
        code, out = await hil_run(
            *("--gateway-port", str(tmp_path / "ttyUSB0"), "--device-port", str(tmp_path / "ttyUSB1")),
            *("--baud", "115200", "--format", "8N1", "--scenario", "noise,late,unplug", "--seconds", "2"),
        )
    assert code == 0, out
    assert "through the fault relay" in out
    for scenario in ("noise", "late, retries 0", "late, retries 1", "late, same unit"):
        assert row(out, scenario)[0] == "PASS", (scenario, out)
    assert row(out, "unplug")[0] == "skipped" and "stdin is not a terminal" in out
    assert "late in another unit's turn" in out
    # The wire carried every frame and broke none.
    assert wire.stats.frames_to_device > 200 and wire.stats.frames_to_gateway > 200
    assert not wire.faults.any and wire.stats.flipped_bytes == wire.stats.late_replies == 0


@pytest.mark.timeout(60)
async def test_real_mode_unplug_follows_the_operator(tmp_path: Path) -> None:
    # The "operator" pulls and replugs the stand-in for the gateway's adapter when asked to.
    async with Rs485Line(
        tmp_path / "ttyUSB0", device_link=tmp_path / "ttyUSB1", baudrate=115200, frame_format="8N1"
    ) as wire:
        asked: list[str] = []

        def operator(message: str) -> None:
            asked.append(message)
            if message.startswith("Pull"):
                wire.unplug()
            else:
                asyncio.get_running_loop().call_later(0.5, wire.replug)

        hardware = scenarios.Hardware(str(tmp_path / "ttyUSB0"), str(tmp_path / "ttyUSB1"))
        async with scenarios.Rigs(tmp_path, hardware=hardware, baudrate=115200, frame_format="8N1") as rigs:
            result = await scenarios.unplug(rigs, operator=operator, operator_timeout=5)
    assert result.passed, (result.failures, asked)
    assert [m.split()[0] for m in asked] == ["Pull", "All"]
    assert result.counts["offline_after_s"] < 5 and result.counts["back_after_s"] < 15
