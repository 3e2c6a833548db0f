"""The `fieldgate` command line (contract: shared/spec/INTERFACE.md section 1)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Sequence

from gateway import __version__
from gateway.errors import ConfigError, FieldgateError

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2
log = logging.getLogger("fieldgate")


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors exit with our code 2 and one clear line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"fieldgate: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _serial_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", required=True, help="serial device (/dev/ttyUSB0) or tcp://host:port")
    p.add_argument(
        "--framing",
        choices=["tcp", "rtu"],
        default=None,
        help="on tcp://: tcp (Modbus TCP, the default) or rtu (RTU frames to a serial device server)",
    )
    p.add_argument("--baud", type=int, default=9600, help="baud rate (default 9600)")
    p.add_argument("--parity", choices=["N", "E", "O"], default="E", help="parity (default E)")
    p.add_argument("--bytesize", type=int, choices=[7, 8], default=8)
    p.add_argument("--stopbits", type=int, choices=[1, 2], default=1)
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="response timeout in seconds (default: from the baud rate; 1 s on Modbus TCP)",
    )


def _point_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--unit", type=int, required=True, help="unit id 1-247")
    p.add_argument("--table", choices=["coil", "discrete", "input", "holding"], default="holding")
    p.add_argument("--address", type=int, required=True, help="0-based register or bit address")
    p.add_argument(
        "--type", default=None, help="bool, int16, uint16, int32, uint32, int64, uint64, float32, float64, string:N"
    )
    p.add_argument("--byte-order", choices=["big", "little"], default="big")
    p.add_argument("--word-order", choices=["big", "little"], default="big")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--offset", type=float, default=0.0)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = _Parser(prog="fieldgate", description="Fieldgate: Modbus RTU, Modbus TCP and MCP/1 field devices to MQTT.")
    parser.add_argument("--version", action="version", version=f"fieldgate {__version__}")
    parser.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run the gateway in the foreground")
    run.add_argument("-c", "--config", help="config file (default ./config.yaml, then /etc/fieldgate/config.yaml)")

    check = sub.add_parser("check", help="validate a config file")
    check.add_argument("-c", "--config", help="config file (default ./config.yaml, then /etc/fieldgate/config.yaml)")

    scan = sub.add_parser("scan", help="find the unit ids that answer on a serial line or behind a tcp:// endpoint")
    _serial_args(scan)
    scan.add_argument("--units", default="1-247", help="unit ids to try: 1-247, or 1,2,10-20")

    read = sub.add_parser("read", help="read registers or bits once and print the decoded values")
    _serial_args(read)
    _point_args(read)
    read.add_argument("--count", type=int, default=1, help="how many consecutive values of --type")

    write = sub.add_parser("write", help="write one value once")
    _serial_args(write)
    _point_args(write)
    write.add_argument("--value", required=True, help='the value (JSON: 12.5, true, "text")')

    spool = sub.add_parser("spool", help="show each northbound spool: messages held, bytes, oldest age, dropped")
    spool.add_argument("-c", "--config", help="config file (default ./config.yaml, then /etc/fieldgate/config.yaml)")
    spool.add_argument("--json", action="store_true", help="one JSON object keyed by sink name, for scripts")

    passwd = sub.add_parser("passwd", help="add a user of the embedded broker, or set a user's password")
    passwd.add_argument("-c", "--config", help="config file (default ./config.yaml, then /etc/fieldgate/config.yaml)")
    passwd.add_argument("user", help="the MQTT username")
    passwd.add_argument(
        "--password-stdin", action="store_true", help="read the password from the first line of stdin (no prompt)"
    )
    return parser


def _setup_logging(level: str, debug: bool) -> None:
    from gateway.journal import JournalFormatter, stderr_is_journal

    handler = logging.StreamHandler(sys.stderr)
    # Under systemd, journald stamps each line itself and files it under its `<N>` priority prefix.
    journald = stderr_is_journal(sys.stderr)
    handler.setFormatter(
        JournalFormatter() if journald else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=logging.DEBUG if debug else getattr(logging, level), handlers=[handler])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fieldgate` command."""
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return EXIT_USAGE
    except FieldgateError as exc:
        if args.debug:
            raise
        print(f"fieldgate: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return EXIT_RUNTIME


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        return _run(args)
    if args.command == "check":
        return _check(args)
    if args.command == "spool":
        return _spool(args)
    if args.command == "passwd":
        from gateway.broker_access import passwd

        return passwd(args)
    from gateway import commission

    _setup_logging("WARNING", args.debug)
    if args.command == "scan":
        return asyncio.run(commission.scan(args))
    if args.command == "read":
        return asyncio.run(commission.read(args))
    return asyncio.run(commission.write(args))


def _run(args: argparse.Namespace) -> int:
    from gateway.app import Gateway
    from gateway.config import find_config, load_config

    loaded = load_config(find_config(args.config))
    _setup_logging(loaded.config.gateway.log_level, args.debug)
    for warning in loaded.warnings:
        log.warning("%s", warning)
    asyncio.run(Gateway(loaded).run_forever())
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    from gateway.config import find_config, load_config
    from gateway.line_budgets import budget_warnings

    loaded = load_config(find_config(args.config))
    cfg = loaded.config
    for warning in loaded.warnings + budget_warnings(cfg):
        print(f"warning: {warning}", file=sys.stderr)
    devices = [d for b in cfg.modbus.buses for d in b.devices]
    points = sum(len(d.points) for d in devices)
    print(
        f"{loaded.path}: ok — {len(cfg.modbus.buses)} modbus bus(es), {len(devices)} device(s), "
        f"{points} point(s), {len(cfg.mcp.devices) if cfg.mcp else 0} MCP device(s), "
        f"{len(cfg.northbound)} sink(s)"
    )
    return EXIT_OK


def _spool(args: argparse.Namespace) -> int:
    from gateway import spool_report
    from gateway.config import find_config, load_config

    loaded = load_config(find_config(args.config))
    # Reads the files as they are: the gateway may be running and writing them.
    rows, errors = spool_report.collect(loaded.config, time.time())
    if args.json:
        print(spool_report.to_json(rows))
    elif sys.stdout.isatty():
        spool_report.print_table(rows)
    else:
        print(spool_report.to_text(rows))
    for error in errors:
        print(f"fieldgate: {error}", file=sys.stderr)
    return EXIT_RUNTIME if errors else EXIT_OK
