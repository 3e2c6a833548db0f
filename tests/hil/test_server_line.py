"""The gateway's Modbus TCP server through the baud-accurate line at 19200 8E1: SCADA and the gateway share one wire.

A `fieldgate run` process polls two devices through `hil/line.py`'s line and exposes them on its Modbus TCP
server; Modbus TCP clients read registers the gateway does not poll (so every read passes through to the
line) and write a setpoint. The line's own frame log proves that the line stayed one master's: no request was
handed to it before the previous frame had ended plus t3.5, each answer came from the unit just asked. The
clients check that each answer is their own (transaction id and content), and the polled devices keep their
poll rate.

The gateway opens the pty as 8N2: the kernel refuses parity on a pty, and 8N2 takes the same 11 bits per
character as 8E1, so the gateway's t3.5 and timeouts are those of 8E1, which the line times.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import tty
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.framer import FramerRTU, FramerSocket
from pymodbus.pdu import DecodePDU
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    ReadHoldingRegistersResponse,
    WriteMultipleRegistersRequest,
)

from drivers.modbus.codec import PointCodec
from drivers.sim.modbus import ModbusSimulator, SimPoint, SimSlave
from drivers.sim.waves import Wave
from hil.line import FrameRecord, Rs485Line, one_master

import configs
from helpers import GatewayProcess, free_port, until

BAUD = 19200
UNITS = (1, 2)
POLLED = 10  # holding registers 0..9 of each unit, polled by the gateway in one read
POLL = 0.2  # seconds between a device's polls
UNPOLLED = 100  # holding registers 100..109 are in no configured point: every read of them passes through
SETPOINT = 20  # d2's writable point, written by a client
CLIENTS = 4
READS_PER_CLIENT = 25
PIPELINED = 6  # requests one raw client sends before reading any answer (within max_queue)
WINDOW = 4.0  # seconds of polling alone, the baseline of the poll rate
WRITES = (11, 22, 33, 44, 55)  # what the writer writes to d2's setpoint, in turn


def held(unit: int, address: int) -> int:
    """What a simulated holding register holds: distinct per unit and address."""
    return unit * 1000 + address


def slaves() -> list[SimSlave]:
    """The devices behind the line: the polled block, the unpolled one, d2's setpoint."""
    codec = PointCodec("uint16")
    out = []
    for unit in UNITS:
        addresses = [*range(POLLED), *range(UNPOLLED, UNPOLLED + 10)]
        points = [SimPoint(f"r{a}", "holding", a, codec, Wave(value=held(unit, a))) for a in addresses]
        if unit == 2:
            points.append(SimPoint("sp", "holding", SETPOINT, codec, Wave(value=0)))
        out.append(SimSlave(unit, points))
    return out


def gateway_config(link: str, broker: int, server: int, state: Path) -> configs.Section:
    """Two polled devices on the line (8N2 = 8E1's timing), both exposed on the Modbus TCP server, d2 writable."""
    devices = []
    for unit in UNITS:
        points = [configs.point(f"r{a}", "holding", a, "uint16") for a in range(POLLED)]
        if unit == 2:
            points.append(configs.point("sp", "holding", SETPOINT, "uint16", writable=True))
        devices.append(configs.device(f"d{unit}", unit, poll=f"{POLL * 1000:.0f}ms", write_rate=100, points=points))
    cfg = configs.config(
        id="srv",
        state_dir=state,
        broker=configs.broker(broker, process="inline"),
        northbound=[configs.sink("local")],
        buses=[configs.line("rs485", link, *devices, baudrate=BAUD, parity="N", stopbits=2)],
    )
    cfg["modbus"]["server"] = {
        "listen": f"127.0.0.1:{server}",
        "cache_max_age": "2s",
        "expose": [{"unit": 1, "device": "d1"}, {"unit": 2, "device": "d2", "writes": True}],
    }
    return cfg


@dataclass
class Field:
    """The line (logging every frame), its slaves, the gateway process and its server's port."""

    line: Rs485Line
    sim: ModbusSimulator
    gateway: GatewayProcess
    port: int
    state: Path  # the gateway's state dir: its audit log


@pytest.fixture
async def field(tmp_path: Path) -> AsyncIterator[Field]:
    """The line at 19200 8E1 with its slaves, and the gateway polling through it, its server answering."""
    line = Rs485Line(tmp_path / "ttyRS485", baudrate=BAUD, frame_format="8E1", log_frames=200_000)
    await line.start()
    sim = ModbusSimulator(line.device_port, slaves(), baudrate=BAUD)
    await sim.start()
    port = free_port()
    config = configs.write(gateway_config(line.gateway_port, free_port(), port, tmp_path / "state"), tmp_path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    with GatewayProcess(["run", "-c", str(config)], tmp_path / "gateway.log", cwd=tmp_path, env=env) as gw:
        try:
            yield Field(line, sim, gw, port, tmp_path / "state")
        finally:
            gw.stop()
            await sim.stop()
            await line.stop()


def polls(frames: list[FrameRecord], unit: int, since: float, until_: float) -> int:
    """The gateway's poll requests to `unit` (its read of registers 0..POLLED-1) handed over in [since, until_)."""
    return sum(1 for f in frames if f.source == "gateway" and is_poll(f.data, unit) and since <= f.sent < until_)


def is_poll(data: bytes, unit: int) -> bool:
    """Whether a request frame is the gateway's poll of `unit`: function 3 from address 0 (d2's block reaches its
    setpoint too: the planner merges it across the gap)."""
    return data[:4] == bytes((unit, 3, 0, 0))


def unpolled_reads(frames: list[FrameRecord], since: float) -> int:
    """Read requests of the unpolled registers the line carried since `since`: the pass-throughs."""
    return sum(
        1
        for f in frames
        if f.source == "gateway"
        and f.data[1] == 3
        and int.from_bytes(f.data[2:4], "big") >= UNPOLLED
        and f.sent >= since
    )


def written(frames: list[FrameRecord]) -> list[tuple[int, int]]:
    """(address, value) of every single-register write request the line carried, decoded by pymodbus."""
    framer = FramerRTU(DecodePDU(is_server=True))
    out = []
    for f in frames:
        if f.source != "gateway" or f.data[1:2] != b"\x06":
            continue
        used, _, _, pdu_bytes = framer.decode(f.data)
        pdu = framer.decoder.decode(pdu_bytes) if used else None
        assert pdu is not None, f.data.hex()
        out.append((pdu.address, pdu.registers[0]))
    return out


def audited_writes(state: Path) -> list[dict[str, object]]:
    """The outcome records of writes in the gateway's audit log (its `request` lines left out)."""
    path = state / "audit.log"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("action") == "write" and r.get("stage") != "request"]


async def connected(port: int) -> AsyncModbusTcpClient:
    """A pymodbus client connected to the gateway's server (retried until it listens)."""
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=5, retries=0)
    await until(client.connect, 30, "the gateway's Modbus TCP server to accept a connection", every=0.2)
    return client


async def reader(port: int, k: int) -> list[str]:
    """A client that reads unpolled registers of both units in turn; what it got wrong."""
    client = await connected(port)
    wrong = []
    try:
        for i in range(READS_PER_CLIENT):
            unit = UNITS[(k + i) % len(UNITS)]
            address, count = UNPOLLED + (k + i) % 5, 1 + (i % 5)
            rr = await client.read_holding_registers(address, count=count, device_id=unit)
            want = [held(unit, a) for a in range(address, address + count)]
            if rr.isError() or rr.registers != want:
                wrong.append(f"client {k} read {i}: unit {unit} {address}+{count}: {rr}")
            elif not rr.transaction_id:
                wrong.append(f"client {k} read {i}: answered with transaction id 0")
    finally:
        client.close()
    return wrong


async def writer(port: int, sim: ModbusSimulator) -> list[str]:
    """A client that writes d2's setpoint and reads it back; what went wrong."""
    client = await connected(port)
    wrong = []
    try:
        for value in WRITES:
            wr = await client.write_register(SETPOINT, value, device_id=2)
            if wr.isError():
                wrong.append(f"write {value}: {wr}")
                continue
            rr = await client.read_holding_registers(SETPOINT, count=1, device_id=2)
            if rr.isError() or rr.registers != [value]:
                wrong.append(f"read back of {value}: {rr}")
            if sim.get(2, "sp") != value:
                wrong.append(f"the slave holds {sim.get(2, 'sp')} after writing {value}")
    finally:
        client.close()
    return wrong


async def pipelined(port: int) -> list[str]:
    """A client that sends PIPELINED reads with transaction ids of its own choosing before reading any answer,
    framed by pymodbus; what was answered wrong (each id must come back once, with its own registers)."""
    framer = FramerSocket(DecodePDU(is_server=False))
    asked: dict[int, tuple[int, int, int]] = {}
    frames = b""
    for k in range(PIPELINED):
        tid, unit, address, count = 0x4D00 + 37 * k, UNITS[k % 2], UNPOLLED + k, 1 + k % 3
        asked[tid] = (unit, address, count)
        request = ReadHoldingRegistersRequest(address=address, count=count, dev_id=unit, transaction_id=tid)
        frames += framer.buildFrame(request)
    reader_, writer_ = await asyncio.open_connection("127.0.0.1", port)
    wrong: list[str] = []
    try:
        writer_.write(frames)
        await writer_.drain()
        buffer = b""
        answered: list[int] = []
        async with asyncio.timeout(30):
            while len(answered) < PIPELINED:
                chunk = await reader_.read(4096)
                if not chunk:
                    wrong.append(f"connection closed after {len(answered)} answers")
                    break
                buffer += chunk
                while True:
                    used, unit, tid, pdu_bytes = framer.decode(buffer)
                    if not used:
                        break
                    buffer = buffer[used:]
                    pdu = framer.decoder.decode(pdu_bytes)
                    answered.append(tid)
                    if tid not in asked:
                        wrong.append(f"answer with transaction id {tid:#x}, which was never asked")
                        continue
                    want_unit, address, count = asked[tid]
                    want = [held(want_unit, a) for a in range(address, address + count)]
                    if unit != want_unit or pdu is None or pdu.isError() or pdu.registers != want:
                        wrong.append(f"transaction {tid:#x}: unit {unit}, {pdu}; wanted unit {want_unit} {want}")
        if sorted(answered) != sorted(asked):
            wrong.append(f"transaction ids answered {[hex(t) for t in answered]}, asked {[hex(t) for t in asked]}")
    finally:
        writer_.close()
        with contextlib.suppress(OSError):
            await writer_.wait_closed()
    return wrong


@pytest.mark.timeout(180)
async def test_scada_clients_pass_through_the_line_and_it_stays_one_master(field: Field) -> None:
    line, loop = field.line, asyncio.get_running_loop()
    assert line.frame_log is not None
    log = line.frame_log

    def both_polled() -> bool:
        return all(any(is_poll(f.data, u) for f in log if f.source == "gateway") for u in UNITS)

    await until(both_polled, 30, "the gateway to poll both devices through the line")
    probe = await connected(field.port)
    probe.close()

    # The poll rate alone, on the line's clock.
    alone_from = loop.time()
    await asyncio.sleep(WINDOW)
    alone_to = loop.time()
    before = line.stats.short_gaps

    # Several SCADA masters at once: readers, a writer, a pipelining client.
    shared_from = loop.time()
    results = await asyncio.gather(
        *(reader(field.port, k) for k in range(CLIENTS)), writer(field.port, field.sim), pipelined(field.port)
    )
    shared_to = loop.time()
    await asyncio.sleep(0.2)  # the last answers' t3.5 and the next poll
    frames = list(log)

    # Every client got its own answers.
    assert [w for ws in results for w in ws] == []
    # Each write crossed the line once, as the client asked it, and was audited as a Modbus TCP client's.
    assert written(frames) == [(SETPOINT, v) for v in WRITES]
    await until(lambda: len(audited_writes(field.state)) >= len(WRITES), 10, "the writes' outcomes in the audit log")
    outcomes = audited_writes(field.state)
    assert len(outcomes) == len(WRITES), outcomes
    assert all(r["device"] == "d2" and r["ok"] is True for r in outcomes), outcomes
    assert all(str(r["origin"]).startswith("modbus-tcp 127.0.0.1:") for r in outcomes), outcomes
    # Every unpolled read crossed the line once: pass-through, not a cache's answer, and not twice.
    assert unpolled_reads(frames, shared_from) == CLIENTS * READS_PER_CLIENT + PIPELINED
    # The line stayed one master's, by its own log and by its own count of short gaps.
    assert one_master(frames, line.t35) == []
    assert line.stats.short_gaps == before == 0
    # The polled devices kept polling (one pass-through between two poll cycles leaves their rate; a loaded
    # machine stretches both windows alike).
    for unit in UNITS:
        alone = polls(frames, unit, alone_from, alone_to) / (alone_to - alone_from)
        shared = polls(frames, unit, shared_from, shared_to) / (shared_to - shared_from)
        print(
            f"unit {unit}: {alone:.2f} polls/s alone, {shared:.2f} while {CLIENTS + 2} clients passed through "
            f"({shared_to - shared_from:.1f} s)"
        )
        assert shared >= 0.7 * alone, (unit, alone, shared)
    assert field.gateway.proc.poll() is None, field.gateway.output()


async def test_the_frame_log_shows_a_master_that_talks_before_the_answer_and_t35_have_passed(tmp_path: Path) -> None:
    # The checker itself, on a real line. A second master that sends while a long answer is still arriving is
    # flagged whatever the machine's load (it is handed over before that answer ends); the next request, handed
    # over 2 x t3.5 after the previous frame reached the device, is not.
    framer = FramerRTU(DecodePDU(is_server=False))
    request = framer.buildFrame(ReadHoldingRegistersRequest(address=0, count=125, dev_id=1))
    answer = framer.buildFrame(ReadHoldingRegistersResponse(registers=list(range(125)), dev_id=1))
    async with Rs485Line(tmp_path / "tty", baudrate=BAUD, frame_format="8E1", log_frames=100) as line:
        gateway, device = await raw_ends(line)
        try:
            os.write(gateway, request)
            await read_exactly(device, len(request))
            os.write(device, answer)  # 255 bytes: 146 ms on the wire
            await read_exactly(gateway, 10)
            os.write(gateway, request)  # talks over the answer
            await read_exactly(gateway, len(answer) - 10)
            await read_exactly(device, len(request))  # it reached the device after the answer, at its end
            await asyncio.sleep(2 * line.t35)
            os.write(gateway, request)
            await read_exactly(device, len(request))
        finally:
            os.close(gateway)
            os.close(device)
        assert line.frame_log is not None
        frames = list(line.frame_log)
        assert [f.source for f in frames] == ["gateway", "device", "gateway", "gateway"]
        faults = one_master(frames, line.t35)
        assert len(faults) == 1, faults
        assert faults[0].startswith(f"request {request.hex()} handed over -"), faults


async def test_the_frame_log_keeps_a_frame_that_arrives_in_pieces_as_one(tmp_path: Path) -> None:
    # A sender's second write while its first is still on the wire continues the frame (as on a real line): one
    # record, or one_master would take its rest for a request handed over with no silence at all.
    framer = FramerRTU(DecodePDU(is_server=False))
    request = framer.buildFrame(WriteMultipleRegistersRequest(address=0, registers=list(range(100)), dev_id=1))
    async with Rs485Line(tmp_path / "tty", baudrate=BAUD, frame_format="8E1", log_frames=100) as line:
        gateway, device = await raw_ends(line)
        try:
            os.write(gateway, request[:100])  # 57 ms on the wire
            await asyncio.sleep(0.005)
            os.write(gateway, request[100:])
            await read_exactly(device, len(request))
        finally:
            os.close(gateway)
            os.close(device)
        assert line.frame_log is not None
        frames = list(line.frame_log)
        assert [(f.source, f.data) for f in frames] == [("gateway", request)]
        assert one_master(frames, line.t35) == []


async def raw_ends(line: Rs485Line) -> tuple[int, int]:
    """Both sides of a line, opened raw and non-blocking: (gateway side, device side)."""
    fds = []
    for path in (line.gateway_port, line.device_port):
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(fd)
        fds.append(fd)
    return fds[0], fds[1]


async def read_exactly(fd: int, n: int, timeout: float = 5.0) -> bytes:
    """Read n bytes from a non-blocking fd without blocking the loop."""
    got = b""
    deadline = time.monotonic() + timeout
    while len(got) < n:
        with contextlib.suppress(BlockingIOError):
            got += os.read(fd, n - len(got))
        assert time.monotonic() < deadline, f"only {got.hex()} of {n} bytes"
        await asyncio.sleep(0.0005)
    return got
