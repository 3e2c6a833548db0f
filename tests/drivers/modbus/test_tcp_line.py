"""A line on Modbus TCP (MBAP) against real pymodbus servers on loopback: many units behind one endpoint, and the
faults of a network: a dead endpoint, a refused port, a connection dropped mid-transaction, a late answer."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import struct
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

import pytest
from pymodbus.framer import FramerSocket
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.pdu.register_message import ReadHoldingRegistersResponse

from drivers.modbus.bus import ModbusBus
from drivers.modbus.device import MBAP_TIMEOUT, Device
from drivers.modbus.settings import LineSettings, TcpEndpoint
from drivers.modbus.transport import ModbusLink
from drivers.sim.modbus import ModbusSimulator, SimPoint, SimSlave
from gateway.config.settings import modbus_line
from gateway.errors import BusUnavailable, DeviceException, DeviceTimeout
from gateway.types import Write
from hil import scenarios
from hil.ports import free_port

from configs import Section, device, point
from helpers import Recorder, until


def tcp_line(port: int, devices: str | list[Section], **bus: object) -> LineSettings:
    """A `tcp://` bus validated like a user's, with the default framing (Modbus TCP)."""
    return modbus_line(scenarios.bus_config(devices, port=f"tcp://127.0.0.1:{port}", **bus))


def slaves_of(cfg: LineSettings, dead: Iterable[int] = ()) -> list[SimSlave]:
    """Simulated units holding every point of the line's devices."""
    return [
        SimSlave(d.unit, [SimPoint(p.name, p.table, p.address, p.codec) for p in d.points], dead=d.unit in set(dead))
        for d in cfg.devices
    ]


@dataclass
class Scripted:
    """A Modbus TCP endpoint on loopback that a test makes misbehave; pymodbus frames and decodes everything.

    It answers each holding-register read with the request's sequence number in every register, so an answer
    tells which request it was for.
    """

    port: int = field(default_factory=free_port)
    silent: set[int] = field(default_factory=set)  # units that never answer
    gateway_fault: set[int] = field(default_factory=set)  # units the "converter" answers 0x0B for
    undecodable: set[int] = field(default_factory=set)  # units answered with a function pymodbus does not know
    trickle: dict[int, float] = field(default_factory=dict)  # unit -> the second half of its answers this late
    lag: dict[int, float] = field(default_factory=dict)  # unit -> every answer this late
    late: dict[int, float] = field(default_factory=dict)  # request number -> answer this many seconds late
    held: set[int] = field(default_factory=set)  # request numbers answered only with the next answer, in one write
    mute: bool = False  # accept connections, read requests, never answer
    drop_at: int | None = None  # request number on whose arrival the connection is closed
    connections: int = 0
    requests: int = 0
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> None:
        """Listen."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def stop(self) -> None:
        """Close every connection and stop listening."""
        for w in self._writers:
            w.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        framer = FramerSocket(DecodePDU(True))
        buffer = holding = b""
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(4096):
                buffer += data
                while True:
                    used, request = framer.handleFrame(buffer, 0, 0)
                    buffer = buffer[used:]
                    if request is None:
                        break
                    self.requests += 1
                    if self.drop_at == self.requests:
                        writer.close()
                        return
                    if self.mute or request.dev_id in self.silent:
                        continue
                    response: ModbusPDU
                    if request.dev_id in self.gateway_fault:
                        response = ExceptionResponse(request.function_code, 0x0B)
                    else:
                        response = ReadHoldingRegistersResponse(registers=[self.requests] * request.count)
                    response.dev_id, response.transaction_id = request.dev_id, request.transaction_id
                    frame = framer.buildFrame(response)
                    if request.dev_id in self.undecodable:
                        frame = framer.encode(b"\x64\x02\x00\x00", request.dev_id, request.transaction_id)
                    if self.requests in self.held:
                        holding += frame
                        continue
                    frame, holding = holding + frame, b""
                    delay = self.late.get(self.requests, 0.0) or self.lag.get(request.dev_id, 0.0)
                    loop = asyncio.get_running_loop()
                    if request.dev_id in self.trickle:
                        # Half the answer now, the rest after the client's timeout.
                        writer.write(frame[: len(frame) // 2])
                        loop.call_later(self.trickle[request.dev_id], writer.write, frame[len(frame) // 2 :])
                    elif delay:
                        loop.call_later(delay, writer.write, frame)
                    else:
                        writer.write(frame)
        writer.close()


@pytest.fixture
async def scripted() -> AsyncIterator[Scripted]:
    """A running scripted endpoint, stopped after the test."""
    server = Scripted()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def buses() -> AsyncIterator[list[ModbusBus]]:
    """Buses appended here are stopped after the test."""
    started: list[ModbusBus] = []
    yield started
    for bus in started:
        await bus.stop()


async def run_bus(buses: list[ModbusBus], cfg: LineSettings) -> tuple[ModbusBus, Recorder]:
    rec = Recorder()
    bus = ModbusBus(cfg, rec.sample, rec.state)
    buses.append(bus)
    await bus.start()
    return bus, rec


def latest(rec: Recorder, name: str) -> dict[str, object]:
    """Every value `name` published, the last one of each point."""
    values: dict[str, object] = {}
    for s in rec.samples:
        if s.device == name:
            values.update(s.values)
    return values


# --- the line works like a serial one ------------------------------------------------------------


EVERY_TYPE = [
    point("i16", "holding", 0, "int16"),
    point("u16", "holding", 1, "uint16", scale=0.1),
    point("i32", "holding", 2, "int32", word_order="little"),
    point("u32", "holding", 4, "uint32"),
    point("i64", "holding", 8, "int64", byte_order="little"),
    point("u64", "holding", 12, "uint64", word_order="little"),
    point("f32", "holding", 16, "float32", byte_order="little", word_order="little"),
    point("f64", "holding", 20, "float64"),
    point("name", "holding", 30, "string:8"),
    point("state", "holding", 40, "bitfield", bits={0: "running", 3: "alarm"}),
    point("in", "input", 5, "int32", offset=-10),
    point("pump", "coil", 3),
    point("door", "discrete", 9),
    point("sp", "holding", 50, "int16", scale=0.1, writable=True, min=10, max=80),
]
HELD: dict[str, object] = {
    "i16": -1234,
    "u16": 6553.4,
    "i32": -70000,
    "u32": 4_000_000_000,
    "i64": -(2**40) - 5,
    "u64": 2**63 + 11,
    "f32": 21.5,
    "f64": -1.0e300,
    "name": "PUMP-7",
    "in": 99990,
    "pump": True,
    "door": True,
    "sp": 20.5,
}


async def test_many_units_behind_one_endpoint_every_point_type_and_a_write(buses: list[ModbusBus]) -> None:
    port = free_port()
    cfg = tcp_line(port, [device(f"d{unit}", unit, poll="50ms", points=EVERY_TYPE) for unit in (1, 7, 200)])
    assert cfg.mbap and cfg.framing == "tcp"
    sim = ModbusSimulator(TcpEndpoint("127.0.0.1", port), slaves_of(cfg), framing="tcp")
    await sim.start()
    try:
        for unit in (1, 7, 200):
            for name, value in HELD.items():
                sim.set(unit, name, value)
            sim.set(unit, "state", {"running": True, "alarm": unit == 7})
        bus, rec = await run_bus(buses, cfg)
        for unit in (1, 7, 200):
            await until(lambda u=unit: len(latest(rec, f"d{u}")) == len(HELD) + 2, what=f"unit {unit}'s values")
            got = latest(rec, f"d{unit}")
            assert {k: got[k] for k in HELD} == HELD
            assert (got["state.running"], got["state.alarm"]) == (True, unit == 7)
        # A write goes to its own unit only, and the value read back is published.
        result = await bus.write(Write("d7", "sp", 42.5))
        assert result.ok and result.value == 42.5
        assert (sim.get(7, "sp"), sim.get(1, "sp"), sim.get(200, "sp")) == (42.5, 20.5, 20.5)
        refused = await bus.write(Write("d7", "sp", 99))
        assert not refused.ok and sim.get(7, "sp") == 42.5
        # One connection for the whole line, no reconnects.
        assert bus.stats.reopen_attempts == 1
        snap = bus.snapshot()
        assert snap.counters.wire_seconds == 0.0  # no serial wire time on Modbus TCP
    finally:
        await sim.stop()


async def test_units_0_and_255_of_devices_addressed_directly_are_polled_on_modbus_tcp(buses: list[ModbusBus]) -> None:
    # A Modbus TCP device on its own IP often answers only to unit 255 or 0 (neither is a unit on an RTU line).
    port = free_port()
    cfg = tcp_line(
        port, [device(f"d{unit}", unit, poll="50ms", points=[point("v", "holding", 3)]) for unit in (0, 255)]
    )
    sim = ModbusSimulator(TcpEndpoint("127.0.0.1", port), slaves_of(cfg), framing="tcp")
    await sim.start()
    try:
        sim.set(0, "v", 100)
        sim.set(255, "v", 255)
        bus, rec = await run_bus(buses, cfg)
        await until(lambda: latest(rec, "d0").get("v") == 100 and latest(rec, "d255").get("v") == 255, what="both")
    finally:
        await sim.stop()


def test_timeouts_on_modbus_tcp_are_not_derived_from_a_baud_rate() -> None:
    one = "[{name: d, unit: 1, points: [{name: v, table: holding, address: 0}]}]"
    slow = tcp_line(1502, one, baudrate=1200)
    fast = tcp_line(1502, one, baudrate=115200)
    for cfg in (slow, fast):
        dev = Device(cfg.devices[0], cfg)
        assert dev.timeout("holding", 125) == dev.timeout("holding", 1) == MBAP_TIMEOUT
    configured = tcp_line(1502, one, timeout="300ms", connect_timeout="7s")
    dev = Device(configured.devices[0], configured)
    assert dev.timeout("holding", 125) == 0.3 and configured.connect_timeout == 7.0


# --- transaction ids ----------------------------------------------------------------------------


async def test_a_late_answer_is_never_taken_for_the_next_requests(scripted: Scripted) -> None:
    # Request 1 is answered after the client gave up on it, while request 2 (same unit, function, address
    # and length: only the transaction id tells them apart) waits: request 2 must get its own answer.
    scripted.late[1] = 0.4  # arrives while request 2 waits
    scripted.late[2] = 1.0
    link = ModbusLink(TcpEndpoint("127.0.0.1", scripted.port), framing="tcp")
    await link.open()
    try:
        with pytest.raises(DeviceTimeout):
            await link.read("holding", 1, 0, 2, timeout=0.2)
        assert await link.read("holding", 1, 0, 2, timeout=5.0) == [2, 2]
        # The late answer came during request 2 and was dropped; the next ones are in step.
        assert await link.read("holding", 1, 0, 2, timeout=5.0) == [3, 3]
    finally:
        link.close()


@pytest.mark.parametrize("late_answers", [1, 4])
async def test_late_answers_arriving_with_the_awaited_one_do_not_crowd_it_out(
    scripted: Scripted, late_answers: int
) -> None:
    # The largest answers (125 registers, 259 bytes each): the late ones and the awaited one in one segment.
    scripted.held.update(range(1, late_answers + 1))
    link = ModbusLink(TcpEndpoint("127.0.0.1", scripted.port), framing="tcp")
    await link.open()
    try:
        for _ in range(late_answers):
            with pytest.raises(DeviceTimeout):
                await link.read("holding", 1, 0, 125, timeout=0.1)
        assert await link.read("holding", 1, 0, 125, timeout=5.0) == [late_answers + 1] * 125
    finally:
        link.close()


async def test_an_undecodable_answer_fails_its_request_and_keeps_the_connection(scripted: Scripted) -> None:
    scripted.undecodable.add(4)
    link = ModbusLink(TcpEndpoint("127.0.0.1", scripted.port), framing="tcp")
    await link.open()
    try:
        with pytest.raises(DeviceTimeout, match="undecodable answer"):
            await link.read("holding", 4, 0, 1, timeout=0.5)
        assert link.connected
        assert await link.read("holding", 1, 0, 1, timeout=5.0) == [2]
        assert scripted.connections == 1
    finally:
        link.close()


async def test_a_unit_behind_a_gateway_that_answers_0x0b_is_silent_not_alive(scripted: Scripted) -> None:
    scripted.gateway_fault.add(3)
    link = ModbusLink(TcpEndpoint("127.0.0.1", scripted.port), framing="tcp")
    await link.open()
    try:
        with pytest.raises(DeviceTimeout, match="exception 11"):
            await link.read("holding", 3, 0, 1, timeout=1.0)
        assert await link.read("holding", 1, 0, 1, timeout=1.0) == [2]
    finally:
        link.close()


# --- a dead unit, a dead endpoint, a refused port, a dropped connection ----------------------------


async def test_a_dead_unit_among_live_ones_costs_no_reconnects(scripted: Scripted, buses: list[ModbusBus]) -> None:
    # pymodbus would close the connection after five timeouts in a row; behind a TCP-to-RTU converter those
    # come from one dead unit while the others answer, and reconnecting cannot help it.
    scripted.silent.add(9)
    cfg = tcp_line(
        scripted.port,
        [
            device("live", 1, poll="2s", points=[point("v", "holding", 0)]),
            device("dead", 9, poll="20ms", offline_after=20, retries=0, points=[point("v", "holding", 0)]),
        ],
        timeout="50ms",
    )
    bus, rec = await run_bus(buses, cfg)
    await until(lambda: bus.devices["dead"].stats.timeouts >= 8, what="eight timeouts in a row from unit 9")
    await until(lambda: bus.devices["live"].stats.cycles >= 2, what="the live unit's second cycle")
    assert scripted.connections == 1 and bus.stats.reopen_attempts == 1
    assert bus.devices["live"].online is True
    assert [s.online for s in rec.states if s.device == "live"] == [True]


async def test_a_dead_unit_behind_a_serial_device_server_costs_no_reconnects(buses: list[ModbusBus]) -> None:
    # The same for RTU framing over TCP: a serial device server's dead unit is a timeout like on a serial line.
    port = free_port()
    cfg = tcp_line(
        port,
        [
            device("live", 1, poll="2s", points=[point("v", "holding", 0)]),
            device("dead", 9, poll="20ms", offline_after=20, retries=0, points=[point("v", "holding", 0)]),
        ],
        framing="rtu",
        timeout="50ms",
    )
    assert not cfg.mbap
    sim = ModbusSimulator(TcpEndpoint("127.0.0.1", port), slaves_of(cfg, dead=[9]), framing="rtu")
    await sim.start()
    try:
        bus, rec = await run_bus(buses, cfg)
        await until(lambda: bus.devices["dead"].stats.timeouts >= 8, what="eight timeouts in a row from unit 9")
        await until(lambda: bus.devices["live"].stats.cycles >= 2, what="the live unit's second cycle")
        assert bus.stats.reopen_attempts == 1
        assert [s.online for s in rec.states if s.device == "live"] == [True]
    finally:
        await sim.stop()


async def test_a_dead_endpoint_marks_its_devices_offline_and_holds_up_no_other_bus(
    scripted: Scripted, buses: list[ModbusBus]
) -> None:
    scripted.mute = True  # accepts, reads, never answers
    dead_cfg = tcp_line(
        scripted.port,
        [device(f"d{u}", u, poll="20ms", offline_after=1, points=[point("v", "holding", 0)]) for u in (1, 2, 3)],
        timeout="100ms",
    )
    live_port = free_port()
    live_cfg = tcp_line(live_port, [device("ok", 5, poll="20ms", points=[point("v", "holding", 0)])])
    sim = ModbusSimulator(TcpEndpoint("127.0.0.1", live_port), slaves_of(live_cfg), framing="tcp")
    await sim.start()
    try:
        dead, dead_rec = await run_bus(buses, dead_cfg)
        live, _ = await run_bus(buses, live_cfg)
        await until(lambda: all(d.online is False for d in dead.devices.values()), what="the dead endpoint's units")
        cycles_then = live.devices["ok"].stats.cycles
        timeouts_then = dead.stats.timeouts
        await until(lambda: dead.stats.timeouts >= timeouts_then + 2, timeout=30, what="two probes")
        # The live bus polled on meanwhile: many cycles for each of the dead one's timeouts.
        assert live.devices["ok"].stats.cycles - cycles_then >= 5
        assert [s.online for s in dead_rec.states] == [False] * 3
        # Silence alone never drops the connection (probes go on it, TCP watches the peer).
        assert scripted.connections == 1 and dead.port_open
    finally:
        await sim.stop()


async def test_a_refused_port_marks_devices_offline_and_they_come_back_when_it_listens(
    buses: list[ModbusBus],
) -> None:
    port = free_port()  # nothing listens yet
    cfg = tcp_line(port, [device("d", 4, poll="50ms", points=[point("v", "input", 3, "int32")])])
    bus, rec = await run_bus(buses, cfg)
    await until(lambda: bus.devices["d"].online is False, what="offline at once")
    assert "cannot open tcp://127.0.0.1:" in rec.states[-1].reason
    attempts = bus.stats.reopen_attempts
    sim = ModbusSimulator(TcpEndpoint("127.0.0.1", port), slaves_of(cfg), framing="tcp")
    await sim.start()
    try:
        sim.set(4, "v", -70000)
        await until(lambda: latest(rec, "d").get("v") == -70000, timeout=20, what="values after the reconnect")
        assert bus.devices["d"].online is True and bus.stats.reopen_attempts > attempts
    finally:
        await sim.stop()


async def test_a_connection_dropped_mid_transaction_fails_fast_and_is_reconnected(
    scripted: Scripted, buses: list[ModbusBus]
) -> None:
    scripted.drop_at = 3  # the endpoint closes the connection as the third request arrives
    cfg = tcp_line(scripted.port, [device("d", 1, poll="50ms", points=[point("v", "holding", 0)])], timeout="30s")
    bus, rec = await run_bus(buses, cfg)
    await until(lambda: scripted.connections == 2, timeout=20, what="a second connection")
    await until(lambda: scripted.requests >= 5, timeout=20, what="polling on the new connection")
    # The request in flight failed as the line being lost, at once: not after its 30 s timeout.
    assert bus.devices["d"].stats.timeouts == 0
    assert bus.devices["d"].online is True
    assert [s.online for s in rec.states] == [True]


def hanging_listener(port: int) -> list[socket.socket]:
    """A listener on `port` whose accept queue is full: the kernel drops new SYNs, so connecting hangs."""
    full = socket.socket()
    full.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    full.bind(("127.0.0.1", port))
    full.listen(0)
    held = [full]
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        held.append(s)
    return held


async def test_the_connect_timeout_is_kept_after_requests_set_their_own(scripted: Scripted) -> None:
    link = ModbusLink(TcpEndpoint("127.0.0.1", scripted.port), framing="tcp", connect_timeout=1.0)
    await link.open()
    await link.read("holding", 1, 0, 1, timeout=0.05)  # pymodbus keeps one timeout: this sets it to 50 ms
    link.close()
    await scripted.stop()
    held = hanging_listener(scripted.port)
    try:
        await asyncio.sleep(0.2)
        started = time.monotonic()
        with pytest.raises(BusUnavailable):
            await link.open()
        # Connecting was given the connect timeout (1 s), not the last response timeout (50 ms).
        assert time.monotonic() - started >= 0.9
    finally:
        link.close()
        for s in held:
            s.close()


async def test_an_exception_response_keeps_a_modbus_tcp_unit_online(buses: list[ModbusBus]) -> None:
    port = free_port()
    cfg = tcp_line(port, [device("d", 2, poll="50ms", max_gap=0, points=[point("v", "holding", 0)])])
    # The simulator's unit holds 128 registers past its last point: 5000 is beyond them (exception 2).
    bad = tcp_line(
        port, [device("d", 2, poll="50ms", max_gap=0, points=[point("v", "holding", 0), point("x", "holding", 5000)])]
    )
    sim = ModbusSimulator(TcpEndpoint("127.0.0.1", port), slaves_of(cfg), framing="tcp")
    await sim.start()
    try:
        sim.set(2, "v", 17)
        bus, rec = await run_bus(buses, bad)
        await until(lambda: latest(rec, "d").get("v") == 17, what="the readable block")
        await until(lambda: bus.devices["d"].stats.exceptions >= 2, what="exceptions for the other block")
        assert bus.devices["d"].online is True
        with pytest.raises(DeviceException):
            link = ModbusLink(TcpEndpoint("127.0.0.1", port), framing="tcp")
            await link.open()
            try:
                await link.read("holding", 2, 5000, 1, timeout=1.0)
            finally:
                link.close()
    finally:
        await sim.stop()


async def test_a_device_flooding_bytes_holds_up_no_other_bus_and_costs_no_memory(buses: list[ModbusBus]) -> None:
    # A broken or hostile endpoint: an MBAP header with a foreign protocol id that claims the longest frame, then
    # bytes without end (pymodbus waits for a frame that never completes).
    flood_port, live_port = free_port(), free_port()
    sent = 0

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        junk = struct.pack(">HHHB", 1, 0x0101, 0xFFFF, 1) + bytes(range(256)) * 256
        with contextlib.suppress(ConnectionError):
            while True:
                writer.write(junk)
                sent += len(junk)
                await writer.drain()

    server = await asyncio.start_server(flood, "127.0.0.1", flood_port)
    live_cfg = tcp_line(live_port, [device("live", 1, poll="20ms", points=[point("v", "holding", 0)])])
    sim = ModbusSimulator(TcpEndpoint("127.0.0.1", live_port), slaves_of(live_cfg), framing="tcp")
    await sim.start()
    try:
        live, _ = await run_bus(buses, live_cfg)
        await until(lambda: live.devices["live"].online is True, what="the live unit")

        async def rate(seconds: float = 2.0) -> float:
            before, started = live.devices["live"].stats.cycles, time.monotonic()
            await asyncio.sleep(seconds)
            return (live.devices["live"].stats.cycles - before) / (time.monotonic() - started)

        alone = await rate()
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        flooded_cfg = tcp_line(flood_port, [device("flooded", 1, poll="20ms", points=[point("v", "holding", 0)])])
        flooded, _ = await run_bus(buses, flooded_cfg)
        await until(lambda: sent > 50_000_000, timeout=30, what="50 MB of flood read by the gateway")
        beside = await rate()
        assert flooded.devices["flooded"].online is not True
        # The live bus keeps its pace (a paced poll; 0.8 leaves room for a loaded machine).
        assert beside >= 0.8 * alone, (alone, beside)
        # pymodbus drops a receive buffer past one frame's size: the flood is never held.
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 20_000  # KiB
    finally:
        server.close()
        await sim.stop()


async def test_reconnects_back_off_and_a_connect_that_hangs_marks_devices_offline(buses: list[ModbusBus]) -> None:
    # An endpoint whose accept queue is full: every connect hangs until the bus's connect timeout.
    port = free_port()
    held = hanging_listener(port)
    try:
        cfg = tcp_line(port, [device("d", 1, poll="50ms", points=[point("v", "holding", 0)])], connect_timeout="300ms")
        bus, rec = await run_bus(buses, cfg)
        attempts: list[float] = []

        async def watch() -> None:
            seen = 0
            while True:
                if bus.stats.reopen_attempts > seen:
                    seen = bus.stats.reopen_attempts
                    attempts.append(time.monotonic())
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        try:
            await until(lambda: bus.devices["d"].online is False, what="offline after the first connect timed out")
            assert "cannot open" in rec.states[-1].reason
            await until(lambda: len(attempts) >= 4, timeout=30, what="four connect attempts")
        finally:
            watcher.cancel()
        # Each wait doubles (1 s, 2 s, 4 s ... up to a minute): the gaps grow, each well past the one before.
        gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
        assert all(later > 1.4 * earlier for earlier, later in zip(gaps, gaps[1:], strict=False)), gaps
    finally:
        for s in held:
            s.close()


async def test_an_offline_unit_is_probed_with_back_off_while_the_others_poll(
    scripted: Scripted, buses: list[ModbusBus]
) -> None:
    scripted.silent.add(9)
    cfg = tcp_line(
        scripted.port,
        [
            device("live", 1, poll="20ms", points=[point("v", "holding", 0)]),
            device("dead", 9, poll="20ms", offline_after=2, retries=0, points=[point("v", "holding", 0)]),
        ],
        timeout="50ms",
    )
    bus, rec = await run_bus(buses, cfg)
    dead = bus.devices["dead"]
    await until(lambda: dead.online is False, what="unit 9 offline")
    tried: list[float] = []

    async def watch() -> None:
        seen = dead.stats.timeouts
        while True:
            if dead.stats.timeouts > seen:
                seen = dead.stats.timeouts
                tried.append(time.monotonic())
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    try:
        await until(lambda: len(tried) >= 3, timeout=30, what="three probes")
    finally:
        watcher.cancel()
    gaps = [b - a for a, b in zip(tried, tried[1:], strict=False)]
    assert gaps[1] > 1.4 * gaps[0], gaps
    assert bus.devices["live"].online is True and scripted.connections == 1
    assert [s.online for s in rec.states if s.device == "dead"] == [False]


async def test_an_answer_cut_short_does_not_put_the_other_units_out_of_step(
    scripted: Scripted, buses: list[ModbusBus]
) -> None:
    # Unit 5 sends half its answer, the rest after the timeout: that rest would arrive during the next request,
    # in front of its answer, and TCP has no silence to find a frame's start by.
    scripted.trickle[5] = 0.15
    scripted.lag[1] = 0.03  # the live unit's requests wait most of the time: the rest lands in one of them
    cfg = tcp_line(
        scripted.port,
        [
            device("live", 1, poll="20ms", points=[point("v", "holding", 0)]),
            device("slow", 5, poll="20ms", offline_after=100, retries=0, points=[point("v", "holding", 0)]),
        ],
        timeout="100ms",
    )
    bus, rec = await run_bus(buses, cfg)
    live, slow = bus.devices["live"], bus.devices["slow"]
    await until(lambda: slow.stats.timeouts >= 5, timeout=30, what="five answers cut short")
    await until(lambda: live.stats.cycles >= 20, timeout=30, what="the live unit's cycles")
    assert live.stats.timeouts == 0 and live.stats.errors == 0
    assert [s.online for s in rec.states if s.device == "live"] == [True]
    assert scripted.connections > 1  # each answer cut short ends its connection: the next one starts in step


async def test_a_serial_device_server_closing_under_a_request_fails_it_at_once() -> None:
    # RTU over TCP too: pymodbus would leave the request waiting its whole (30 s) timeout.
    async def close_on_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.close()

    server = await asyncio.start_server(close_on_request, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    link = ModbusLink(TcpEndpoint("127.0.0.1", port), framing="rtu")
    try:
        await link.open()
        async with asyncio.timeout(10):
            with pytest.raises(BusUnavailable, match="closed by the peer"):
                await link.read("holding", 1, 0, 1, timeout=30.0)
    finally:
        link.close()
        server.close()
        await server.wait_closed()
