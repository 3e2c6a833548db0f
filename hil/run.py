"""Run the HIL fault scenarios from the command line: on the virtual line, or on two real adapters.

    .venv/bin/python -m hil.run                                   # every scenario, virtual line
    .venv/bin/python -m hil.run --scenario noise,late --seconds 60
    .venv/bin/python -m hil.run --gateway-port /dev/ttyUSB0 --device-port /dev/ttyUSB1 --baud 19200

On real adapters Fieldgate's ModbusBus opens the gateway port with the real format (parity included)
and the pymodbus slaves answer on the device port through a fault relay that injects the faults at
the device end; the unplug scenario asks the operator to pull the adapter (hil/README.md). Prints one
row per scenario; exits 1 when a check failed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python hil/run.py): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.errors import ConfigError  # noqa: E402
from hil import scenarios  # noqa: E402
from hil.line import FrameFormat  # noqa: E402
from hil.scenarios import Hardware, Result, Rigs  # noqa: E402

#: The baud rate of real adapters unless --baud says otherwise (the virtual scenarios pick their own).
REAL_BAUD = 19200


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of `python -m hil.run`."""
    p = argparse.ArgumentParser(
        prog="python -m hil.run",
        description="Fault scenarios against a real ModbusBus: virtual RS-485 line by default, or two real "
        "USB-RS-485 adapters wired A-A, B-B (see hil/README.md).",
    )
    p.add_argument(
        "--scenario",
        default="all",
        help=f"comma-separated, from {','.join(scenarios.SCENARIOS)}; or all (default)",
    )
    p.add_argument("--seconds", type=float, help="how long each scenario's faults last (default: 3-5 s each)")
    p.add_argument(
        "--baud",
        type=int,
        help=f"baud rate (default: each scenario's own on the virtual line, {REAL_BAUD} on real adapters)",
    )
    p.add_argument("--format", default="8E1", help="frame format, e.g. 8E1 (default), 8N1, 8N2")
    p.add_argument("--seed", type=int, help="seed of the injected faults (default: each scenario's own)")
    p.add_argument("--gateway-port", help="real mode: the adapter Fieldgate opens, e.g. /dev/ttyUSB0")
    p.add_argument("--device-port", help="real mode: the adapter the pymodbus slaves answer on, e.g. /dev/ttyUSB1")
    p.add_argument(
        "--frame-gap",
        type=float,
        help="real mode: seconds of silence that end a frame read from the device port (default: t3.5, at least 20 ms)",
    )
    p.add_argument(
        "--operator-timeout",
        type=float,
        default=60.0,
        help="real mode: seconds to wait for each step of a manual unplug (default 60)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log the bus's INFO messages too")
    return p.parse_args(argv)


def _check(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, if anything."""
    try:
        args.scenarios = scenarios.parse_scenarios(args.scenario)
        fmt = FrameFormat.parse(args.format)
    except ValueError as exc:
        return str(exc)
    if fmt.bytesize not in (7, 8) or fmt.parity not in "NEO" or fmt.stopbits not in (1, 2):
        return f"a bus takes 7 or 8 data bits, parity N, E or O and 1 or 2 stop bits, not {fmt}"
    if (args.gateway_port is None) != (args.device_port is None):
        return "real mode needs both --gateway-port and --device-port"
    for port in (args.gateway_port, args.device_port):
        if port is not None and not os.path.exists(port):
            return f"no such port: {port} (ls -l /dev/serial/by-id/ lists the adapters plugged in)"
    if args.seconds is not None and args.seconds < 0:
        return "--seconds cannot be negative"
    return None


def _say(message: str) -> None:
    print(f"\a>>> {message}", flush=True)


async def run(args: argparse.Namespace, out: Callable[[str], None] = print) -> list[Result]:
    """Run the chosen scenarios one after the other; their results."""
    hardware = Hardware(args.gateway_port, args.device_port) if args.gateway_port else None
    baud = args.baud if args.baud is not None or hardware is None else REAL_BAUD
    # Only a person can pull an adapter: ask one when someone is at the terminal.
    operator = _say if hardware is not None and sys.stdin.isatty() else None
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="fieldgate-hil-") as workdir:
        async with Rigs(
            workdir, hardware=hardware, baudrate=baud, frame_format=args.format, frame_gap=args.frame_gap
        ) as rigs:
            if hardware is None:
                out(f"virtual line (Rs485Line between ptys), format {args.format}, baud {baud or 'per scenario'}")
            else:
                out(
                    f"real adapters: Fieldgate on {hardware.gateway_port}, slaves on {hardware.device_port} through "
                    f"the fault relay; {baud} baud {args.format}; faults injected at the device end"
                )
            for name in args.scenarios:
                started = time.monotonic()
                try:
                    batch = await scenarios.run(
                        name,
                        rigs,
                        seconds=args.seconds,
                        seed=args.seed,
                        operator=operator,
                        operator_timeout=args.operator_timeout,
                    )
                except (OSError, ConfigError) as exc:
                    # A port that cannot be opened, a format the bus refuses: this scenario fails, the next runs.
                    batch = [Result(name, failures=[f"could not run: {exc}"], seconds=time.monotonic() - started)]
                for result in batch:
                    out(result.summary or f"{result.name}: {result.skipped or '; '.join(result.failures)}")
                results.extend(batch)
    return results


_COLUMNS = (
    ("transactions", "transactions"),
    ("values", "values"),
    ("wrong", "wrong_values"),
    ("CRC err", "crc_errors"),
    ("timeouts", "timeouts"),
)


def table(results: Sequence[Result]) -> str:
    """The results as a plain-text table, failures listed below it."""
    head = ["scenario", "result", "seconds", *(title for title, _ in _COLUMNS), "faults injected"]
    rows = [head]
    for r in results:
        verdict = "skipped" if r.skipped else "PASS" if r.passed else "FAIL"
        counts = [str(r.counts[key]) if key in r.counts else "-" for _, key in _COLUMNS]
        rows.append([r.name, verdict, f"{r.seconds:.1f}", *counts, scenarios.injected(r.counts) if r.counts else "-"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in results:
        lines += [f"{r.name}: {failure}" for failure in r.failures]
        if r.skipped:
            lines.append(f"{r.name}: skipped: {r.skipped}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m hil.run`."""
    args = parse_args(argv)
    problem = _check(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    results = asyncio.run(run(args, lambda line: print(line, flush=True)))
    print()
    print(table(results))
    bad = scenarios.failed(results)
    print(f"\n{len(bad)} of {len(results)} failed" if bad else f"\nall {len(results)} passed (skipped ones aside)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
