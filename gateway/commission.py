"""One-shot commissioning tools: scan a line for unit ids, read or write a point."""

from __future__ import annotations

import argparse
import json
import sys

from drivers.modbus import budget
from drivers.modbus.codec import PointCodec
from drivers.modbus.device import MBAP_TIMEOUT
from drivers.modbus.planner import BIT_TABLES
from drivers.modbus.transport import ModbusLink
from gateway.config.addresses import is_tcp, modbus_port
from gateway.errors import BusUnavailable, CodecError, ConfigError, DeviceError, DeviceException, PortBusy

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


def parse_units(text: str) -> list[int]:
    """`1-247` or `1,2,10-20` as a sorted list of unit ids; ConfigError when malformed."""
    units: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise ConfigError([f"--units: {part!r} is not a unit id or a range like 1-247"]) from None
        if not 1 <= a <= b <= 247:
            raise ConfigError([f"--units: {part!r} is outside 1-247"])
        units.update(range(a, b + 1))
    return sorted(units)


def parse_json_value(text: str) -> object:
    """A command-line value: JSON when it parses, else the bare text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def framing(args: argparse.Namespace) -> str:
    """The framing `--port` is spoken in: `--framing`, else Modbus TCP on tcp:// and RTU on a serial port (as a bus)."""
    if args.framing is None:
        return "tcp" if is_tcp(args.port) else "rtu"
    if args.framing == "tcp" and not is_tcp(args.port):
        raise ConfigError([f"--framing tcp (Modbus TCP) needs --port tcp://HOST:PORT, not {args.port!r}"])
    return str(args.framing)


def _link(args: argparse.Namespace) -> ModbusLink:
    try:
        port = modbus_port(args.port)
    except ValueError:
        raise ConfigError([f"--port: {args.port!r} has no port number (tcp://HOST:PORT)"]) from None
    return ModbusLink(
        port,
        framing=framing(args),
        baudrate=args.baud,
        parity=args.parity,
        bytesize=args.bytesize,
        stopbits=args.stopbits,
    )


def _timeout(args: argparse.Namespace, table: str, count: int, write: bool = False) -> float:
    if args.timeout is not None:
        return float(args.timeout)
    if framing(args) == "tcp":
        return MBAP_TIMEOUT  # no baud rate to derive one from
    bits = budget.char_bits(args.bytesize, args.parity, args.stopbits)
    req, resp = budget.transaction_bytes(table, count, write=write)
    return budget.response_timeout(resp, args.baud, bits, request_bytes=req)


#: What to do about a port another process holds: most often the running service, polling that very line.
PORT_BUSY_HINT = (
    "  if it is the Fieldgate service: stop it first (sudo systemctl stop fieldgate), or leave it running and reach "
    "the devices through its Modbus TCP server (`modbus.server` in config.yaml)"
)


async def open_link(link: ModbusLink) -> None:
    """Open the link; when another process holds the port, say what to do about it (PortBusy)."""
    try:
        await link.open()
    except PortBusy as exc:
        raise PortBusy(f"{exc}\n{PORT_BUSY_HINT}") from exc


async def scan(args: argparse.Namespace) -> int:
    """Probe each unit id with a one-register read; any answer, even an exception, means present."""
    units = parse_units(args.units)
    link = _link(args)
    await open_link(link)
    timeout = _timeout(args, "holding", 1)
    found: list[int] = []

    async def probe(unit: int, *, again: bool = False) -> None:
        try:
            await link.read("holding", unit, 0, 1, timeout)
        except DeviceException:
            pass  # it answered, with an exception: it is there
        except BusUnavailable:
            # Every unit after this one would look absent. An endpoint may drop the connection (some serial
            # device servers do after a few silent units): reconnect once and ask again.
            if again:
                raise
            link.close()
            await link.open()
            return await probe(unit, again=True)
        except DeviceError:
            return
        found.append(unit)
        if not sys.stdout.isatty():
            print(f"unit {unit}: answers", flush=True)

    try:
        if sys.stdout.isatty():
            from rich.progress import Progress

            with Progress(transient=True) as progress:
                task = progress.add_task(f"scanning {args.port}", total=len(units))
                for unit in units:
                    await probe(unit)
                    progress.update(task, advance=1, description=f"unit {unit}, found {len(found)}")
            for unit in found:
                print(f"unit {unit}: answers")
        else:
            for unit in units:
                await probe(unit)
    finally:
        link.close()
    print(f"{len(found)} of {len(units)} unit ids answered on {args.port}")
    return EXIT_OK


def _codec(args: argparse.Namespace) -> PointCodec:
    spec = args.type or ("bool" if args.table in BIT_TABLES else "uint16")
    if args.table in BIT_TABLES and spec != "bool":
        raise ConfigError([f"--type: a {args.table} is a single bit, use bool"])
    try:
        return PointCodec.parse(
            spec, byte_order=args.byte_order, word_order=args.word_order, scale=args.scale, offset=args.offset
        )
    except CodecError as exc:
        raise ConfigError([f"--type: {exc}"]) from None


async def read(args: argparse.Namespace) -> int:
    """Read `--count` consecutive values and print one per line."""
    codec = _codec(args)
    if args.count < 1:
        raise ConfigError(["--count must be at least 1"])
    total = codec.count * args.count
    link = _link(args)
    await open_link(link)
    try:
        data = await link.read(args.table, args.unit, args.address, total, _timeout(args, args.table, total))
    except DeviceError as exc:
        print(f"fieldgate: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    finally:
        link.close()
    for i in range(args.count):
        chunk = data[i * codec.count : (i + 1) * codec.count]
        value = codec.decode_bits(chunk) if args.table in BIT_TABLES else codec.decode(chunk)  # type: ignore[arg-type]
        print(f"{args.table} {args.address + i * codec.count}: {value}")
    return EXIT_OK


async def write(args: argparse.Namespace) -> int:
    """Write one value, read it back and print what the device holds."""
    if args.table not in ("coil", "holding"):
        raise ConfigError([f"--table: the {args.table} table is read-only"])
    codec = _codec(args)
    value = parse_json_value(args.value)
    try:
        words = codec.encode_bits(value) if args.table in BIT_TABLES else codec.encode(value)
    except CodecError as exc:
        raise ConfigError([f"--value: {exc}"]) from None
    link = _link(args)
    await open_link(link)
    try:
        await link.write(args.table, args.unit, args.address, words, _timeout(args, args.table, len(words), write=True))
        back = await link.read(
            args.table, args.unit, args.address, codec.count, _timeout(args, args.table, codec.count)
        )
    except DeviceError as exc:
        print(f"fieldgate: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    finally:
        link.close()
    held = codec.decode_bits(back) if args.table in BIT_TABLES else codec.decode(back)  # type: ignore[arg-type]
    print(f"{args.table} {args.address}: wrote {value!r}, device holds {held!r}")
    return EXIT_OK
