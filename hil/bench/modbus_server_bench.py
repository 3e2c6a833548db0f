"""Benchmark of the gateway's Modbus TCP server sharing a baud-accurate RS-485 line at 19200 8E1 with its polls.

A `fieldgate run` process polls two devices through `hil/line.py`'s line (in a child process, on a precise
loop, with pymodbus slaves behind it) and serves them on its Modbus TCP server; this process is the SCADA
side (pymodbus clients over loopback). Every baseline is measured in the same run:

1. Cache-hit latency: reads of polled registers, answered from the poll cache, against the same client's
   reads from a bare pymodbus Modbus TCP server (in a child process) on the same loopback.
2. Pass-through latency: reads of registers no point polls, carried out on the line, against a direct
   pymodbus serial client on the same line without the gateway (the line's own transaction time), with the
   wire time computed beside it (request + response characters + t3.5, by the spec's arithmetic); with the
   devices polled every 100 ms and without polling.
3. The polled devices' cycle rate while 10 clients pass through at once, against none (goal >= 0.9); the
   polls are counted on the line (the requests it carried), not taken from the gateway.
4. The same while one client floods (requests pipelined without waiting, far past `max_queue`: answered
   busy, then held back by TCP), then while one sends malformed MBAP frames, reconnecting after each close,
   then while 10 clients read a configured device that died (polled hourly, so still taken as online), then
   while 10 clients read one that answers 80 ms late.

The line's frame log is checked for a second master (`hil.line.one_master`) over the whole run.

Run from the repository root:  .venv/bin/python hil/bench/modbus_server_bench.py [--seconds N] [--reads N]
hil/bench/README.md says what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from benchlib import (
    free_port,
    heading,
    latency_summary,
    note,
    percentile,
    print_header,
    print_table,
    record,
    run_summary,
    summary,
)

# benchlib first: it puts the repository on sys.path for the imports below.
from benchlib.children import Child, serve_pipe
from benchlib.configs import config, gateway_section, modbus_device, modbus_line, write_config
from benchlib.procs import GatewayProcess, quiet_logs
from line_bench import precise_loop
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.framer import FramerSocket
from pymodbus.pdu import DecodePDU, ExceptionResponse
from pymodbus.pdu.register_message import ReadHoldingRegistersRequest

from drivers.modbus.codec import PointCodec
from drivers.modbus.settings import TcpEndpoint
from drivers.sim.modbus import ModbusSimulator, SimPoint, SimSlave
from drivers.sim.waves import Wave
from hil.line import Faults, FrameRecord, Rs485Line, char_bits, one_master, t35

BENCH = "server"
BAUD = 19200
FORMAT = "8E1"  # the line's timing; the ptys carry 8N1 and the gateway opens them 8N2 (the same 11 bits)
BITS = char_bits(8, "E", 1)
T35 = t35(BAUD, BITS)
UNITS = (1, 2)
POLLED = 10  # holding registers 0..9 of each unit: one polled read
UNPOLLED = 100  # holding registers 100..109: in no point, so every read of them passes through
POLL = "100ms"
NO_POLL = "1h"  # polled once at start, then not within the run
CLIENTS = 10
#: A configured, exposed device that died: polled hourly (a nameplate, say), so the gateway still takes it as
#: online when the clients come, and their reads wait out their response timeout on the line until it is offline.
DEAD_UNIT = 3
DEAD_POLL = "1h"
#: A configured, exposed device that answers, but SLOW_DELAY late (a slow controller, a radio link), polled hourly too.
SLOW_UNIT = 4
SLOW_DELAY = 0.08
GOAL = 0.9  # polled cycle rate with 10 clients passing through over none
READY_TIMEOUT = 60.0
DEFAULT_SECONDS = 10.0
SETTLE = 3.0  # seconds between the gateway's first polls and the baseline window
DEFAULT_READS = 300
CACHE_READS = 1000
#: Seconds the cache-hit client waits between reads (100 reads/s, as a SCADA polling one unit flat out): the server
#: paces each connection's requests (a few hundred per second), and a client past that would time the pacing.
CACHE_PAUSE = 0.01
CACHE_MISS_SLACK = 1.1
WARMUP_READS = 20
LOG_FRAMES = 500_000


def held(unit: int, address: int) -> int:
    """What a simulated holding register holds: distinct per unit and address."""
    return unit * 1000 + address


def slaves() -> list[SimSlave]:
    """The devices behind the line (and behind the bare TCP server): the polled block and the unpolled one; and
    DEAD_UNIT, which never answers, and SLOW_UNIT, which holds the same registers as the others (the line makes it
    answer late)."""
    codec = PointCodec("uint16")
    addresses = [*range(POLLED), *range(UNPOLLED, UNPOLLED + 10)]
    return [
        SimSlave(unit, [SimPoint(f"r{a}", "holding", a, codec, Wave(value=held(unit, a))) for a in addresses])
        for unit in UNITS
    ] + [
        SimSlave(DEAD_UNIT, [SimPoint("r0", "holding", 0, codec)], dead=True),
        SimSlave(
            SLOW_UNIT, [SimPoint(f"r{a}", "holding", a, codec, Wave(value=held(SLOW_UNIT, a))) for a in addresses]
        ),
    ]


def wire_latency(registers: int) -> float:
    """Seconds a read of `registers` holding registers takes on the wire, request sent to answer received:
    the request's and the answer's characters and the t3.5 silence before the slave may answer."""
    request, answer = 8, 5 + 2 * registers
    return (request + answer) * BITS / BAUD + T35


# --- the line and its slaves, in their own process ---------------------------------------------------


def serve_line(link: str, conn: Connection) -> None:
    """A Child target: the line at `link` (19200 8E1, logging every frame) with the slaves behind it, on a
    precise loop. Answers "stats" and "frames" (the log since a time, as tuples); "stop", or EOF, stops it."""
    logging.basicConfig(level=logging.ERROR)
    with asyncio.Runner(loop_factory=precise_loop) as runner:
        runner.run(_serve_line(link, conn))


async def _serve_line(link: str, conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    slow = Faults(late_rate=1.0, late_delay=SLOW_DELAY, late_units=frozenset({SLOW_UNIT}))
    line = Rs485Line(link, baudrate=BAUD, frame_format=FORMAT, log_frames=LOG_FRAMES, faults=slow)
    await line.start()
    sim = ModbusSimulator(line.device_port, slaves(), baudrate=BAUD)

    async def stats(_: object) -> tuple[float, dict[str, Any]]:
        return loop.time(), asdict(line.stats)

    async def frames(since: float) -> list[tuple[str, float, float, float, bytes]]:
        assert line.frame_log is not None
        return [(f.source, f.sent, f.start, f.end, f.data) for f in line.frame_log if f.sent >= since]

    try:
        await sim.start()
        conn.send(("ok", line.t35))
        await serve_pipe(conn, {"stats": stats, "frames": frames})
    finally:
        await sim.stop()
        await line.stop()


def serve_tcp(port: int, conn: Connection) -> None:
    """A Child target: the same slaves behind a bare pymodbus Modbus TCP server on 127.0.0.1:`port`."""
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(_serve_tcp(port, conn))


async def _serve_tcp(port: int, conn: Connection) -> None:
    sim = ModbusSimulator(TcpEndpoint("127.0.0.1", port), slaves(), framing="tcp")
    try:
        await sim.start()
        conn.send(("ok", None))
        await serve_pipe(conn, {})
    finally:
        await sim.stop()


# --- clients ------------------------------------------------------------------------------------------


@dataclass
class Reads:
    """Round trips of one client's reads (seconds) and what came back wrong."""

    latencies: list[float] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)

    def p(self, q: float) -> float:
        """The q-quantile of the round trips in ms (NaN when there are none)."""
        return percentile(sorted(self.latencies), q) * 1000

    def merge(self, other: Reads) -> None:
        """Add another client's reads."""
        self.latencies += other.latencies
        self.wrong += other.wrong


ReadFn = Callable[[int, int, int], Awaitable[Any]]


async def timed_reads(
    read: ReadFn,
    n: int,
    unit: int,
    first: int,
    *,
    pause: float = 0.0,
    until: float | None = None,
    warmup: int = WARMUP_READS,
) -> Reads:
    """`n` reads of 10 holding registers from `first` (or reads until `until`, monotonic), each timed and
    checked against what the slave holds; the first `warmup` are not counted."""
    out = Reads()
    want = [held(unit, a) for a in range(first, first + 10)]
    k = 0
    while (k < n + warmup) if until is None else (time.monotonic() < until):
        t0 = time.perf_counter()
        try:
            rr = await read(first, 10, unit)
        except Exception as exc:  # a client that failed counts its failure, the others go on
            out.wrong.append(f"{type(exc).__name__}: {exc}")
            rr = None
        dt = time.perf_counter() - t0
        if rr is not None and (rr.isError() or list(rr.registers) != want):
            out.wrong.append(f"unit {unit} {first}+10: {rr}")
        elif rr is not None and k >= warmup:
            out.latencies.append(dt)
        k += 1
        if pause:
            await asyncio.sleep(pause)
    return out


async def tcp_client(port: int, deadline: float) -> AsyncModbusTcpClient:
    """A pymodbus Modbus TCP client connected to 127.0.0.1:`port`, retried until `deadline` (monotonic)."""
    while True:
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=5, retries=0)
        if await client.connect():
            return client
        client.close()
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing accepts Modbus TCP connections on port {port}")
        await asyncio.sleep(0.2)


def tcp_read(client: AsyncModbusTcpClient) -> ReadFn:
    """A client's read of holding registers, as timed_reads calls it."""

    async def read(address: int, count: int, unit: int) -> Any:
        return await client.read_holding_registers(address, count=count, device_id=unit)

    return read


async def direct_reads(port: str, n: int) -> Reads:
    """A pymodbus serial client on the line's gateway side, no gateway: reads of the unpolled registers, each
    after a 2 x t3.5 silence (the t3.5 a master owes the line, and as much again for the loop's lateness)."""
    client = AsyncModbusSerialClient(port, baudrate=BAUD, bytesize=8, parity="N", stopbits=2, timeout=2, retries=0)
    if not await client.connect():
        raise RuntimeError(f"the direct client cannot open {port}")
    try:

        async def read(address: int, count: int, unit: int) -> Any:
            return await client.read_holding_registers(address, count=count, device_id=unit)

        return await timed_reads(read, n, 1, UNPOLLED, pause=2 * T35)
    finally:
        client.close()


@dataclass
class Abuse:
    """What the flooding and the malformed-frame clients saw."""

    sent: int = 0  # requests the flooder's socket accepted (most wait in the kernel's buffers, unread)
    answered: int = 0  # normal answers it read
    busy: int = 0  # exception 0x06 answers
    other: int = 0  # any other answer
    malformed_sent: int = 0  # malformed frames sent, one per connection
    closed: int = 0  # of those connections, closed by the gateway
    unit_answers: dict[int, dict[str, int]] = field(default_factory=dict)  # unit -> its readers' answers -> count
    errors: list[str] = field(default_factory=list)


FLOOD_BATCH = 64  # requests the flooder writes at once, far past max_queue (8 by default)


async def flood(port: int, until: float, abuse: Abuse) -> None:
    """Pipeline reads of the unpolled registers without waiting for answers, until `until` (monotonic); count
    what comes back. The gateway answers busy past max_queue, and stops reading the socket beyond that."""
    framer = FramerSocket(DecodePDU(is_server=False))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def read_answers() -> None:
        buffer = b""
        while chunk := await reader.read(65536):
            buffer += chunk
            while True:
                used, _, _, pdu_bytes = framer.decode(buffer)
                if not used:
                    break
                buffer = buffer[used:]
                pdu = framer.decoder.decode(pdu_bytes)
                if isinstance(pdu, ExceptionResponse) and pdu.exception_code == 6:
                    abuse.busy += 1
                elif pdu is not None and not pdu.isError():
                    abuse.answered += 1
                else:
                    abuse.other += 1

    answers = asyncio.create_task(read_answers())
    tid = 0
    try:
        while time.monotonic() < until:
            batch = b""
            for _ in range(FLOOD_BATCH):
                tid = tid % 0xFFFF + 1
                request = ReadHoldingRegistersRequest(
                    address=UNPOLLED, count=10, dev_id=UNITS[tid % 2], transaction_id=tid
                )
                batch += framer.buildFrame(request)
            writer.write(batch)
            try:
                # The gateway's TCP back-pressure holds this drain: that is the point.
                await asyncio.wait_for(writer.drain(), max(0.01, until - time.monotonic()))
            except TimeoutError:
                break
            abuse.sent += FLOOD_BATCH
    except OSError as exc:
        abuse.errors.append(f"flooder: {type(exc).__name__}: {exc}")
    finally:
        writer.transport.abort()
        answers.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await answers


#: Malformed MBAP frames, in turn: a protocol id that is not Modbus's, a length past any PDU, a length of 0.
MALFORMED = (
    bytes.fromhex("0001 0001 0006 01 03 0064 000a".replace(" ", "")),
    bytes.fromhex("0002 0000 ffff 01 03 0064 000a".replace(" ", "")),
    bytes.fromhex("0003 0000 0000 01".replace(" ", "")),
)


#: How long the malformed client waits for the gateway to close its connection before it counts one left open.
MALFORMED_CLOSE_WAIT = 5.0


async def malformed(port: int, until: float, abuse: Abuse) -> None:
    """Send one malformed frame per connection and wait for the gateway to close it; again until `until`."""
    k = 0
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            abuse.errors.append(f"malformed client: {type(exc).__name__}: {exc}")
            await asyncio.sleep(0.1)
            continue
        try:
            writer.write(MALFORMED[k % len(MALFORMED)])
            abuse.malformed_sent += 1
            k += 1
            with contextlib.suppress(TimeoutError, OSError):
                async with asyncio.timeout(MALFORMED_CLOSE_WAIT):
                    while await reader.read(4096):
                        pass
                    abuse.closed += 1
        finally:
            writer.transport.abort()


async def unit_readers(unit: int, port: int, until: float, abuse: Abuse) -> None:
    """CLIENTS clients reading `unit`'s unpolled registers in a loop until `until`; what they were answered."""
    answers = abuse.unit_answers.setdefault(unit, {})
    want = [held(unit, a) for a in range(UNPOLLED, UNPOLLED + 10)]

    async def one() -> None:
        client = await tcp_client(port, until + READY_TIMEOUT)
        try:
            while time.monotonic() < until:
                try:
                    rr = await client.read_holding_registers(UNPOLLED, count=10, device_id=unit)
                except Exception as exc:  # counted: a client that failed is an answer of its own
                    what = type(exc).__name__
                else:
                    if rr.isError():
                        what = f"exception {rr.exception_code:#04x}"
                    else:
                        what = "data" if list(rr.registers) == want else "wrong data"
                answers[what] = answers.get(what, 0) + 1
        finally:
            client.close()

    await asyncio.gather(*(one() for _ in range(CLIENTS)))


async def dead_unit(port: int, until: float, abuse: Abuse) -> None:
    """CLIENTS clients reading DEAD_UNIT in a loop until `until`."""
    await unit_readers(DEAD_UNIT, port, until, abuse)


async def slow_unit(port: int, until: float, abuse: Abuse) -> None:
    """CLIENTS clients reading SLOW_UNIT in a loop until `until`."""
    await unit_readers(SLOW_UNIT, port, until, abuse)


# --- the gateway ---------------------------------------------------------------------------------------


def gateway_config(tmp: Path, link: str, poll: str, server: int) -> Path:
    """Two devices on the line, polled every `poll`, both exposed on the Modbus TCP server (cache_max_age 2 s)."""
    points = [{"name": f"r{a}", "table": "holding", "address": a, "type": "uint16"} for a in range(POLLED)]
    devices = [modbus_device(f"d{u}", u, points, poll) for u in UNITS]
    devices.append(modbus_device(f"d{DEAD_UNIT}", DEAD_UNIT, points, DEAD_POLL))
    devices.append(modbus_device(f"d{SLOW_UNIT}", SLOW_UNIT, points, DEAD_POLL))
    cfg = config(
        gateway=gateway_section("bench", tmp / f"state-{poll}", http=None),
        broker={"listeners": [f"tcp://127.0.0.1:{free_port()}"]},
        northbound=[{"name": "local"}],
        modbus=[modbus_line("rs485", link, devices, baudrate=BAUD, parity="N", stopbits=2)],
    )
    cfg["modbus"]["server"] = {
        "listen": f"127.0.0.1:{server}",
        "max_connections": 32,
        "cache_max_age": "2s",
        "expose": [{"unit": u, "device": f"d{u}"} for u in (*UNITS, DEAD_UNIT, SLOW_UNIT)],
    }
    return write_config(tmp / f"config-{poll}.yaml", cfg)


class Rig:
    """The line child, and at most one gateway at a time on it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.link = str(tmp / "ttyRS485")
        self.line = Child("line", serve_line, self.link)
        self.gateway: GatewayProcess | None = None
        self.port = 0

    async def start(self) -> None:
        """Wait for the line and its slaves."""
        line_t35 = await asyncio.to_thread(self.line.wait, READY_TIMEOUT, "start")
        assert abs(line_t35 - T35) < 1e-9, (line_t35, T35)

    async def frames(self, since: float) -> list[FrameRecord]:
        """The line's frames handed over since `since` (monotonic)."""
        rows = await asyncio.to_thread(self.line.call, "frames", since, READY_TIMEOUT)
        return [FrameRecord(*row) for row in rows]

    async def stats(self) -> dict[str, Any]:
        """The line's counters."""
        _, stats = await asyncio.to_thread(self.line.call, "stats", None, READY_TIMEOUT)
        return dict(stats)

    async def start_gateway(self, poll: str) -> None:
        """`fieldgate run` polling every `poll`; back once its server answers and both devices were polled."""
        self.port = free_port()
        cfg = gateway_config(self.tmp, self.link, poll, self.port)
        since = time.monotonic()
        self.gateway = GatewayProcess(cfg, self.tmp / f"gateway-{poll}.log")
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            frames = await self.frames(since)
            if all(any(is_poll(f, u) for f in frames) for u in UNITS):
                break
            if not self.gateway.alive or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway never polled both devices:\n{self.gateway.output()[-3000:]}")
            await asyncio.sleep(0.2)
        client = await tcp_client(self.port, deadline)
        client.close()

    def stop_gateway(self) -> None:
        """Stop the gateway (SIGTERM); say so when it had to be killed."""
        if self.gateway is not None:
            if not self.gateway.stop():
                print(f"  the gateway had to be killed; its log: {self.gateway.log}")
            self.gateway = None

    def close(self) -> None:
        """Stop everything."""
        self.stop_gateway()
        self.line.stop(10)


def is_poll(f: FrameRecord, unit: int) -> bool:
    """Whether a frame is the gateway's poll of `unit`: function 3, address 0, POLLED registers."""
    return f.source == "gateway" and f.data[:6] == bytes((unit, 3, 0, 0, 0, POLLED))


def is_unpolled_read(f: FrameRecord) -> bool:
    """Whether a frame is a read of the unpolled registers (a pass-through, or the direct client's)."""
    return f.source == "gateway" and f.data[1:2] == b"\x03" and int.from_bytes(f.data[2:4], "big") >= UNPOLLED


def poll_rate(frames: list[FrameRecord], start: float, end: float) -> float:
    """Poll requests per second per device, counted on the line in [start, end)."""
    n = sum(1 for f in frames if start <= f.sent < end for u in UNITS if is_poll(f, u))
    return n / len(UNITS) / (end - start)


def poll_gaps(frames: list[FrameRecord], start: float, end: float) -> list[float]:
    """Seconds between one device's consecutive polls handed over in [start, end), every device's together."""
    gaps: list[float] = []
    for unit in UNITS:
        sent = [f.sent for f in frames if start <= f.sent < end and is_poll(f, unit)]
        gaps += [b - a for a, b in zip(sent, sent[1:], strict=False)]
    return gaps


def line_capacity() -> float:
    """Transactions/s the line carries of 10-register reads, by the spec's arithmetic: both frames' characters
    and two t3.5 silences (before the answer and before the next request)."""
    return 1 / (wire_latency(10) + T35)


# --- the measurements ----------------------------------------------------------------------------------


@dataclass
class Attack:
    """One attack's window: the polls' rate and the pass-throughs the line carried meanwhile."""

    rate: float
    seconds: float
    line_reads: int

    @property
    def passthrough_rate(self) -> float:
        """Pass-throughs per second the line carried in the window."""
        return self.line_reads / self.seconds if self.seconds else float("nan")


@dataclass
class Results:
    """Every figure of a run."""

    direct: Reads = field(default_factory=Reads)
    bare_tcp: Reads = field(default_factory=Reads)
    cache: Reads = field(default_factory=Reads)
    cache_line_reads: int = 0  # reads of unit 1's polled block the line carried during the cache-hit reads
    cache_line_expected: float = 0.0  # as many as its polls alone would have made in that time
    pass_idle: Reads = field(default_factory=Reads)
    pass_polled: Reads = field(default_factory=Reads)
    rate_alone: float = float("nan")
    rate_shared: float = float("nan")
    gaps_alone: list[float] = field(default_factory=list)  # seconds between a device's polls, no clients
    gaps_shared: list[float] = field(default_factory=list)  # the same with 10 clients passing through
    shared: Reads = field(default_factory=Reads)
    shared_seconds: float = 0.0
    shared_line_reads: int = 0  # pass-throughs the line carried in that window
    abuse: Abuse = field(default_factory=Abuse)
    attacks: dict[str, Attack] = field(default_factory=dict)  # by name: "flood", "malformed"
    faults: list[str] = field(default_factory=list)  # one_master over the whole run

    @property
    def cache_hits_only(self) -> bool:
        """Whether the cache-hit reads stayed off the line: it carried no more reads of the polled block than the
        polls make (a tenth more, and 3, for a poll that fell in or out of the window)."""
        return self.cache_line_reads <= CACHE_MISS_SLACK * self.cache_line_expected + 3

    short_gaps: int = 0


async def measure(tmp: Path, seconds: float, reads: int) -> Results:
    """Every phase in turn, on one line."""
    res = Results()
    rig = Rig(tmp)
    run_start = time.monotonic()
    try:
        await rig.start()
        print(f"  direct client on the line: {reads} reads", file=sys.stderr)
        res.direct = await direct_reads(rig.link, reads)

        port = free_port()
        bare = Child("bare-tcp", serve_tcp, port)
        try:
            await asyncio.to_thread(bare.wait, READY_TIMEOUT, "start")
            client = await tcp_client(port, time.monotonic() + READY_TIMEOUT)
            try:
                res.bare_tcp = await timed_reads(tcp_read(client), CACHE_READS, 1, 0, pause=CACHE_PAUSE)
            finally:
                client.close()
        finally:
            bare.stop(10)

        print("  gateway without polling: pass-through latency", file=sys.stderr)
        await rig.start_gateway(NO_POLL)
        client = await tcp_client(rig.port, time.monotonic() + READY_TIMEOUT)
        try:
            res.pass_idle = await timed_reads(tcp_read(client), reads, 1, UNPOLLED)
        finally:
            client.close()
        rig.stop_gateway()

        print(f"  gateway polling every {POLL}: alone, cache hits, pass-through, {CLIENTS} clients", file=sys.stderr)
        await rig.start_gateway(POLL)
        # The dead unit's first poll, at start, waits out its timeouts: not in the baseline's window.
        await asyncio.sleep(SETTLE)
        alone_start = time.monotonic()
        await asyncio.sleep(seconds)
        alone_end = time.monotonic()

        client = await tcp_client(rig.port, time.monotonic() + READY_TIMEOUT)
        try:
            cache_start = time.monotonic()
            res.cache = await timed_reads(tcp_read(client), CACHE_READS, 1, 0, pause=CACHE_PAUSE)
            cache_end = time.monotonic()
            res.pass_polled = await timed_reads(tcp_read(client), reads, 1, UNPOLLED)
        finally:
            client.close()

        clients = [await tcp_client(rig.port, time.monotonic() + READY_TIMEOUT) for _ in range(CLIENTS)]
        try:
            shared_start = time.monotonic()
            end = shared_start + seconds
            runs = await asyncio.gather(
                *(
                    timed_reads(tcp_read(c), 0, UNITS[k % 2], UNPOLLED, until=end, warmup=0)
                    for k, c in enumerate(clients)
                )
            )
            shared_end = time.monotonic()
        finally:
            for c in clients:
                c.close()
        for r in runs:
            res.shared.merge(r)

        windows: dict[str, tuple[float, float]] = {}
        for name, attack in (("flood", flood), ("malformed", malformed), ("dead", dead_unit), ("slow", slow_unit)):
            await asyncio.sleep(1.0)  # the last answers drain
            start = time.monotonic()
            await attack(rig.port, start + seconds, res.abuse)
            windows[name] = (start, time.monotonic())
        await asyncio.sleep(0.5)
        rig.stop_gateway()

        frames = await rig.frames(run_start)
        res.rate_alone = poll_rate(frames, alone_start, alone_end)
        res.rate_shared = poll_rate(frames, shared_start, shared_end)
        res.gaps_alone = poll_gaps(frames, alone_start, alone_end)
        res.gaps_shared = poll_gaps(frames, shared_start, shared_end)
        res.shared_seconds = shared_end - shared_start
        res.shared_line_reads = sum(1 for f in frames if shared_start <= f.sent < shared_end and is_unpolled_read(f))
        for name, (start, end) in windows.items():
            line_reads = sum(1 for f in frames if start <= f.sent < end and is_unpolled_read(f))
            res.attacks[name] = Attack(poll_rate(frames, start, end), end - start, line_reads)
        res.cache_line_reads = sum(1 for f in frames if cache_start <= f.sent < cache_end and is_poll(f, 1))
        res.cache_line_expected = res.rate_alone * (cache_end - cache_start)
        res.faults = one_master(frames, T35)
        res.short_gaps = int((await rig.stats())["short_gaps"])
    finally:
        rig.close()
    return res


# --- the report ----------------------------------------------------------------------------------------


def report(res: Results, headline: bool) -> None:
    """The tables, the conclusions and the suite's figures."""
    wire = wire_latency(10) * 1000
    heading("1. Read latency, client round trip (ms): 10 holding registers")
    rows: list[list[object]] = []
    for name, reads in (
        ("cache hit, gateway (polled every 100 ms, cache_max_age 2 s)", res.cache),
        ("bare pymodbus Modbus TCP server, same loopback", res.bare_tcp),
        ("pass-through, gateway not polling", res.pass_idle),
        ("pass-through, gateway polling 2 devices every 100 ms", res.pass_polled),
        ("direct pymodbus serial client on the line, no gateway", res.direct),
        (f"{CLIENTS} clients passing through at once, polling on", res.shared),
    ):
        lat = latency_summary(reads.latencies)
        rows.append(
            [
                name,
                len(reads.latencies),
                lat.get("p50", float("nan")),
                lat.get("p99", float("nan")),
                lat.get("max", float("nan")),
                len(reads.wrong),
            ]
        )
    print_table(["reads", "n", "p50", "p99", "max", "wrong"], rows, blank="-")
    note(
        f"wire time of one such read at {BAUD} 8E1, computed: (8 + 25) chars x {BITS} bits / {BAUD} + t3.5 "
        f"{T35 * 1000:.3f} ms = {wire:.2f} ms"
    )
    note("The direct client waits 2 x t3.5 after each answer before its next request (the gateway keeps t3.5).")
    note(
        f"During the cache-hit reads the line carried {res.cache_line_reads} reads of unit 1's polled block; "
        f"its polls alone make {res.cache_line_expected:.0f} in that time (a miss would add one per read)."
    )
    for name, reads in (
        ("cache", res.cache),
        ("pass-through", res.pass_idle),
        ("polled pass-through", res.pass_polled),
        ("direct", res.direct),
        ("bare", res.bare_tcp),
        ("shared", res.shared),
    ):
        for w in reads.wrong[:3]:
            note(f"{name}: wrong answer: {w}")

    heading(f"2. Polled devices' cycle rate while {CLIENTS} clients pass through (counted on the line)")
    ratio = res.rate_shared / res.rate_alone
    pt_rate = res.shared_line_reads / res.shared_seconds if res.shared_seconds else float("nan")
    print_table(
        [
            "polls/s per device alone",
            f"with {CLIENTS} clients",
            "ratio",
            "pass-throughs/s on the line",
            "short gaps",
            "second master",
        ],
        [[res.rate_alone, res.rate_shared, ratio, pt_rate, res.short_gaps, len(res.faults)]],
        blank="-",
    )
    note(f"2 devices, one read of 10 registers each, polled every {POLL}; the clients read 10 unpolled registers in a")
    note("loop each. 'second master': frames of the whole run that hil.line.one_master flags (must be 0).")
    alone, shared = latency_summary(res.gaps_alone), latency_summary(res.gaps_shared)
    if alone and shared:
        note(
            f"a device's poll interval p50/p99/max: {alone['p50']:.1f}/{alone['p99']:.1f}/{alone['max']:.1f} ms alone, "
            f"{shared['p50']:.1f}/{shared['p99']:.1f}/{shared['max']:.1f} ms with {CLIENTS} clients"
        )
    capacity = line_capacity()
    spare = capacity - len(UNITS) * res.rate_shared
    note(
        f"the line carries {capacity:.1f} such reads/s (computed: 33 chars x {BITS} bits / {BAUD} + 2 x t3.5); "
        f"the polls took {len(UNITS) * res.rate_shared:.1f}/s, leaving {spare:.1f}/s: the clients got {pt_rate:.1f} "
        f"({pt_rate / spare:.2f} of it)"
    )
    for f in res.faults[:5]:
        note(f"second master: {f}")

    heading("3. Polled devices' cycle rate under a flood, malformed frames, clients of a dead and of a slow device")
    a = res.abuse
    nan = float("nan")
    flooded = res.attacks.get("flood", Attack(nan, 0.0, 0))
    broken = res.attacks.get("malformed", Attack(nan, 0.0, 0))
    dead = res.attacks.get("dead", Attack(nan, 0.0, 0))
    slow = res.attacks.get("slow", Attack(nan, 0.0, 0))

    def seen(unit: int) -> str:
        return ", ".join(f"{n} {what}" for what, n in sorted(a.unit_answers.get(unit, {}).items())) or "nothing"

    print_table(
        ["attack", "polls/s alone", "attacked", "ratio", "pass-throughs/s", "what the attacker saw"],
        [
            [
                "flood",
                res.rate_alone,
                flooded.rate,
                flooded.rate / res.rate_alone,
                flooded.passthrough_rate,
                f"{a.sent} sent, {a.answered} answered, {a.busy} busy 0x06, {a.other} other",
            ],
            [
                "malformed",
                res.rate_alone,
                broken.rate,
                broken.rate / res.rate_alone,
                broken.passthrough_rate,
                f"{a.malformed_sent} connections with a malformed frame, {a.closed} closed by the gateway",
            ],
            [
                "dead unit",
                res.rate_alone,
                dead.rate,
                dead.rate / res.rate_alone,
                dead.passthrough_rate,
                f"{CLIENTS} clients reading unit {DEAD_UNIT}: {seen(DEAD_UNIT)}",
            ],
            [
                "slow unit",
                res.rate_alone,
                slow.rate,
                slow.rate / res.rate_alone,
                slow.passthrough_rate,
                f"{CLIENTS} clients reading unit {SLOW_UNIT}: {seen(SLOW_UNIT)}",
            ],
        ],
        blank="-",
    )
    note(f"flood: one connection, {FLOOD_BATCH} pipelined reads written at a time without waiting for answers")
    note("(max_queue 8: the rest are answered busy, and past that the gateway stops reading its socket, so the")
    note("writes wait). 'sent': requests its socket accepted; the unread ones wait in the kernels' socket buffers.")
    note("malformed: one malformed MBAP frame per connection (protocol id 1, length 0xffff, length 0), and a new")
    note("connection as soon as the gateway has closed the last one (each waited for up to 5 s).")
    note(f"dead unit: {CLIENTS} clients read unit {DEAD_UNIT}, a configured device polled every {DEAD_POLL} that never")
    note("answers; its pass-throughs on the line are counted in the same column. slow unit: the same, with unit")
    note(f"{SLOW_UNIT}, which answers every request {SLOW_DELAY * 1000:.0f} ms late (within its timeout).")
    for e in a.errors[:3]:
        note(e)

    valid = not res.faults and not res.short_gaps
    why = "" if valid else f"the line saw a second master ({len(res.faults)} frames, {res.short_gaps} short gaps)"
    summary(
        f"cache hit p50 {res.cache.p(0.5):.2f} ms, p99 {res.cache.p(0.99):.2f} ms "
        f"(bare pymodbus server {res.bare_tcp.p(0.5):.2f} / {res.bare_tcp.p(0.99):.2f} ms)"
    )
    summary(
        f"pass-through p50 {res.pass_idle.p(0.5):.1f} ms without polling, {res.pass_polled.p(0.5):.1f} ms with "
        f"(direct client {res.direct.p(0.5):.1f} ms, wire {wire:.1f} ms)"
    )
    verdict = "meets" if ratio >= GOAL else "MISSES"
    summary(
        f"polled cycle rate with {CLIENTS} clients passing through: {ratio:.3f} of alone ({verdict} the >= {GOAL} goal)"
        + (f"; NOT MEASURED: {why}" if why else "")
    )
    for name, attack in (
        ("flooded", flooded),
        ("sent malformed frames", broken),
        ("reading a dead unit", dead),
        ("reading a slow unit", slow),
    ):
        share = attack.rate / res.rate_alone
        verdict = "meets" if share >= GOAL else "MISSES"
        summary(f"polled cycle rate while {name}: {share:.3f} of alone ({verdict} the >= {GOAL} goal)")
    if not headline:
        return
    bare = f"bare pymodbus TCP server {res.bare_tcp.p(0.5):.2f} ms p50 / {res.bare_tcp.p(0.99):.2f} ms p99"
    hits = res.cache_hits_only
    missed = f"not cache hits: the line carried {res.cache_line_reads} reads, the polls {res.cache_line_expected:.0f}"
    for q, label in ((0.5, "p50"), (0.99, "p99")):
        ref = res.bare_tcp.p(q)
        record(
            BENCH,
            f"cache-hit latency {label}, loopback",
            round(res.cache.p(q), 3),
            "ms",
            ratio=res.cache.p(q) / ref if res.cache.latencies and not res.cache.wrong and hits else nan,
            versus=bare if hits else missed,
        )
    direct = f"direct serial client {res.direct.p(0.5):.1f} ms p50 (wire {wire:.1f} ms computed)"
    for reads, label in ((res.pass_idle, "without polling"), (res.pass_polled, "with polling")):
        ok = reads.latencies and not reads.wrong and valid
        record(
            BENCH,
            f"pass-through latency p50 over the line at {BAUD} 8E1, {label}",
            round(reads.p(0.5), 2),
            "ms",
            ratio=reads.p(0.5) / res.direct.p(0.5) if ok else nan,
            versus=direct,
        )
        record(
            BENCH,
            f"pass-through latency p99 over the line at {BAUD} 8E1, {label}",
            round(reads.p(0.99), 2),
            "ms",
            ratio=reads.p(0.99) / res.direct.p(0.99) if ok else nan,
            versus=f"direct serial client {res.direct.p(0.99):.1f} ms p99",
        )
    record(
        BENCH,
        f"polled devices' cycles/s while {CLIENTS} clients pass through",
        round(res.rate_shared, 2),
        "cycles/s",
        ratio=ratio if valid and not res.shared.wrong else nan,
        versus=f"no clients: {res.rate_alone:.2f} cycles/s" if valid else why[:90],
        goal=GOAL,
    )
    alone = f"no clients: {res.rate_alone:.2f} cycles/s"
    flood_ok = valid and a.sent > 0 and not a.other
    record(
        BENCH,
        "polled devices' cycles/s while a client floods past max_queue",
        round(flooded.rate, 2),
        "cycles/s",
        ratio=flooded.rate / res.rate_alone if flood_ok else nan,
        versus=alone if flood_ok else (why or f"the flood got {a.other} answers that were neither data nor busy")[:90],
        goal=GOAL,
    )
    broken_ok = valid and a.malformed_sent > 0 and a.closed == a.malformed_sent
    record(
        BENCH,
        "polled devices' cycles/s while a client sends malformed frames, reconnecting",
        round(broken.rate, 2),
        "cycles/s",
        ratio=broken.rate / res.rate_alone if broken_ok else nan,
        versus=alone if broken_ok else (why or "a malformed frame's connection stayed open")[:90],
        goal=GOAL,
    )
    record_unit_readers(res, dead, why, "a dead device", DEAD_UNIT, ok_answer=False)
    record_unit_readers(
        res, slow, why, f"a device answering {SLOW_DELAY * 1000:.0f} ms late", SLOW_UNIT, ok_answer=True
    )


def record_unit_readers(res: Results, attack: Attack, why: str, what: str, unit: int, *, ok_answer: bool) -> None:
    """The figure of CLIENTS clients reading one unit: not measured when the line saw a second master, or when the
    unit's readers got other answers than it gives (data for the slow unit, none for the dead one)."""
    answers = res.abuse.unit_answers.get(unit, {})
    right = set(answers) == {"data"} if ok_answer else bool(answers) and not {"data", "wrong data"} & set(answers)
    ok = not why and right
    record(
        BENCH,
        f"polled devices' cycles/s while {CLIENTS} clients read {what} polled every {DEAD_POLL}",
        round(attack.rate, 2),
        "cycles/s",
        ratio=attack.rate / res.rate_alone if ok else float("nan"),
        versus=f"no clients: {res.rate_alone:.2f} cycles/s"
        if ok
        else (why or f"unit {unit}'s readers got {answers}")[:90],
        goal=GOAL,
    )


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, measure, print every figure."""
    parser = argparse.ArgumentParser(description="The Modbus TCP server on a baud-accurate line (hil/bench/README.md).")
    parser.add_argument(
        "--seconds",
        type=float,
        default=DEFAULT_SECONDS,
        help=f"the poll-rate windows, alone and with {CLIENTS} clients (default {DEFAULT_SECONDS:g})",
    )
    parser.add_argument(
        "--reads",
        type=int,
        default=DEFAULT_READS,
        help=f"timed reads per pass-through latency figure (default {DEFAULT_READS})",
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.reads <= 0:
        parser.error("--seconds and --reads must be > 0")
    quiet_logs()
    import pymodbus

    started = time.monotonic()
    print_header(
        "Modbus TCP server",
        {"pymodbus": pymodbus.__version__},
        [
            f"line {BAUD} baud 8E1 (t3.5 {T35 * 1000:.3f} ms) in a child process on the precise loop; windows "
            f"{args.seconds:g} s; {args.reads} timed pass-through reads per figure, {CACHE_READS} cache reads "
            f"{CACHE_PAUSE * 1000:g} ms apart"
        ],
        skews="every latency and rate",
    )
    with tempfile.TemporaryDirectory(prefix="fieldgate-server-bench-") as tmp:
        res = asyncio.run(measure(Path(tmp), args.seconds, args.reads))
    report(res, headline=True)
    print()
    print(run_summary(started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
