"""The Modbus TCP server in front of a real line (pty, pymodbus slaves), with real Modbus TCP clients."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.framer import FramerSocket
from pymodbus.pdu import DecodePDU, ModbusPDU
from pymodbus.pdu.bit_message import ReadCoilsRequest, WriteMultipleCoilsRequest, WriteSingleCoilRequest
from pymodbus.pdu.mei_message import ReadDeviceInformationRequest
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    ReadHoldingRegistersResponse,
    WriteMultipleRegistersRequest,
    WriteSingleRegisterRequest,
)

import drivers.modbus.server_conn
from drivers.modbus.device import Device
from drivers.modbus.server import ModbusTcpServer
from drivers.modbus.server_requests import RequestHandler, ServerStats, describe, exposed_units, reencodable
from drivers.modbus.settings import ExposeSettings, ServerSettings
from gateway.errors import FieldgateError, ProtocolError
from hil.ports import free_port

from configs import device, point
from helpers import until

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_rig import RawClient, StubGate, line_config, server_rig  # noqa: E402

EXPOSE = (ExposeSettings(1, "d1"), ExposeSettings(2, "d2", writes=True))


def two_devices(poll: str = "50ms", **bus: object):  # type: ignore[no-untyped-def]
    """d1 (unit 1) and d2 (unit 2), each with four holding registers, a float and a coil polled."""
    points = [point(f"r{i}", "holding", i) for i in range(4)]
    points += [point("f", "holding", 10, "float32", word_order="little"), point("c", "coil", 3, writable=True)]
    points += [point("w", "holding", 20, writable=True)]
    return line_config([device("d1", 1, poll=poll, points=points), device("d2", 2, poll=poll, points=points)], **bus)


async def polled(rig) -> None:  # type: ignore[no-untyped-def]
    """Every device answered a poll since now."""
    marks = {name: dev.stats.cycles for name, dev in rig.bus.devices.items()}
    await until(lambda: all(dev.stats.cycles > marks[n] + 1 for n, dev in rig.bus.devices.items()), 20, "polls")


async def test_a_covered_fresh_read_is_a_cache_hit_without_a_line_transaction(tmp_path: Path) -> None:
    async with server_rig(tmp_path, two_devices(poll="50ms"), EXPOSE, cache_max_age=30.0) as rig:
        rig.sim.set(1, "f", 1234.5)
        await polled(rig)
        client = AsyncModbusTcpClient("127.0.0.1", port=rig.port, timeout=10)
        await client.connect()
        try:
            passthrough = rig.bus.stats.passthrough
            for _ in range(20):
                rr = await client.read_holding_registers(10, count=2, device_id=1)
                assert not rr.isError(), rr
                # The raw words as the slave holds them (the float, low word first), not a re-encoding.
                point_codec = rig.bus.devices["d1"].points["f"].codec
                assert list(rr.registers) == point_codec.encode(1234.5)
                bits = await client.read_coils(3, count=1, device_id=1)
                assert not bits.isError()
            assert rig.server.stats.cache_hits == 40
            assert rig.bus.stats.passthrough == passthrough  # the line carried out none of them
        finally:
            client.close()


async def test_reads_the_polls_do_not_cover_or_that_are_stale_pass_through_the_line(tmp_path: Path) -> None:
    # Polled once an hour: after the first poll the cache is stale within cache_max_age.
    async with server_rig(tmp_path, two_devices(poll="1h"), EXPOSE, cache_max_age=0.2) as rig:
        await until(lambda: rig.bus.devices["d1"].online, 20, "d1 polled")
        client = AsyncModbusTcpClient("127.0.0.1", port=rig.port, timeout=10)
        await client.connect()
        try:
            # Beyond the polled registers (the slave has them): the line reads them for the client.
            before = rig.bus.stats.passthrough
            rr = await client.read_holding_registers(40, count=3, device_id=1)
            assert not rr.isError() and len(rr.registers) == 3
            assert rig.bus.stats.passthrough == before + 1
            # Half covered (registers 19-22: the polls' block ends with the point at 20): not a cache hit.
            rr = await client.read_holding_registers(19, count=4, device_id=1)
            assert not rr.isError()
            assert rig.bus.stats.passthrough == before + 2
            # Covered but stale: the value the slave holds now, read through the line.
            await asyncio.sleep(0.3)
            rig.sim.set(1, "r0", 4321)
            rr = await client.read_holding_registers(0, count=1, device_id=1)
            assert list(rr.registers) == [4321]
            assert rig.bus.stats.passthrough == before + 3
            assert rig.server.stats.cache_hits == 0
        finally:
            client.close()


async def test_exceptions_unit_not_exposed_writes_refused_device_exception_and_dead_device(tmp_path: Path) -> None:
    cfg = two_devices(poll="100ms", timeout="100ms")
    gate = StubGate()
    expose = (*EXPOSE, ExposeSettings(3, "d3"))
    cfg = line_config(
        [
            device("d1", 1, poll="100ms", points=[point("r0", "holding", 0)]),
            device("d2", 2, poll="100ms", points=[point("w", "holding", 20, writable=True)]),
            device("d3", 3, poll="100ms", offline_after=100, points=[point("r0", "holding", 0)]),
        ],
        timeout="100ms",
    )
    async with server_rig(tmp_path, cfg, expose, dead=(3,), gate=gate) as rig:
        await until(lambda: rig.bus.devices["d1"].online, 20, "d1 polled")
        client = AsyncModbusTcpClient("127.0.0.1", port=rig.port, timeout=10)
        await client.connect()
        try:
            rr = await client.read_holding_registers(0, count=1, device_id=9)
            assert rr.isError() and rr.exception_code == 0x0A  # gateway path unavailable
            rr = await client.write_register(0, 7, device_id=1)
            assert rr.isError() and rr.exception_code == 0x01  # d1 takes no writes
            assert gate.admitted == []  # refused before the rate limit
            assert gate.records[-1][0] == "d1" and gate.records[-1][3] is False
            assert gate.records[-1][2] == "write_register 0 7"
            rr = await client.read_holding_registers(60000, count=2, device_id=1)
            assert rr.isError() and rr.exception_code == 0x02  # the slave's own, passed on
            rr = await client.read_holding_registers(40, count=1, device_id=3)
            assert rr.isError() and rr.exception_code == 0x0B  # the slave is silent: target failed to respond
            # passthrough: reads (the default) takes no other function than 1-4 and the writes.
            rr = await client.report_device_id(device_id=1)
            assert rr.isError() and rr.exception_code == 0x01
        finally:
            client.close()
        snap = rig.server.snapshot()
        assert snap.exceptions == {0x0A: 1, 0x01: 2, 0x02: 1, 0x0B: 1}


async def test_an_offline_device_is_0x0b_at_once_and_never_a_cache_hit(tmp_path: Path) -> None:
    cfg = line_config([device("d1", 1, poll="20ms", points=[point("r0", "holding", 0)])], timeout="50ms", retries=0)
    async with server_rig(tmp_path, cfg, (ExposeSettings(1, "d1"),), cache_max_age=3600.0) as rig:
        await until(lambda: rig.bus.devices["d1"].online, 20, "d1 polled")
        rig.sim.set_dead(1)
        await until(lambda: rig.bus.devices["d1"].online is False, 20, "d1 offline")
        client = await RawClient.connect(rig.port)
        try:
            await client.send(client.frame(ReadHoldingRegistersRequest(address=0, count=1), 5, 1))
            rr = await client.response()
            assert rr.isError() and rr.exception_code == 0x0B
            assert rig.server.stats.cache_hits == 0
        finally:
            client.close()


async def test_answers_carry_the_clients_transaction_and_unit_ids_in_request_order(tmp_path: Path) -> None:
    async with server_rig(tmp_path, two_devices(), EXPOSE, cache_max_age=30.0) as rig:
        await polled(rig)
        client = await RawClient.connect(rig.port)
        try:
            # Pipelined in one segment: cache hits, pass-throughs and exceptions, for two units.
            requests: list[tuple[int, int, ModbusPDU]] = [
                (0xBEEF, 1, ReadHoldingRegistersRequest(address=40, count=2)),  # pass-through
                (0x0001, 2, ReadHoldingRegistersRequest(address=0, count=4)),  # cache hit
                (0xFFFF, 9, ReadHoldingRegistersRequest(address=0, count=1)),  # 0x0A
                (0x0000, 1, ReadCoilsRequest(address=3, count=1)),  # cache hit
                (0x1234, 2, ReadHoldingRegistersRequest(address=50, count=1)),  # pass-through
            ]
            await client.send(b"".join(client.frame(req, tid, unit) for tid, unit, req in requests))
            answers = [await client.response() for _ in requests]
            assert [(a.transaction_id, a.dev_id) for a in answers] == [(t, u) for t, u, _ in requests]
            assert [a.function_code for a in answers] == [3, 3, 0x83, 1, 3]
        finally:
            client.close()


async def test_malformed_frames_close_only_that_connection(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="drivers.modbus.server")
    async with server_rig(tmp_path, two_devices(), EXPOSE, cache_max_age=30.0) as rig:
        await polled(rig)
        good = await RawClient.connect(rig.port)
        bad_frames = {
            "protocol id 1 ": bytes.fromhex("0001 0001 0006 01 03 0000 0001"),
            # A header announcing 65535 bytes: closed at once, not awaited.
            "MBAP length 65535 ": bytes.fromhex("0001 0000 ffff 01"),
            "MBAP length 1 ": bytes.fromhex("0001 0000 0001 01"),  # no room for a function code
            "function 3: pymodbus cannot decode": bytes.fromhex("0001 0000 0003 01 03 00"),  # cut off
            # (A whole read of 0 registers is no malformed frame: 0x03, see test_a_read_with_a_count_out_of_range_...)
            "function code 131 in a request": bytes.fromhex("0001 0000 0003 01 83 02"),  # an exception response
        }
        try:
            for n, (why, data) in enumerate(bad_frames.items(), 1):
                bad = await RawClient.connect(rig.port)
                await bad.send(data)
                assert await bad.closed(), data.hex()
                bad.close()
                assert rig.server.stats.malformed == n
                assert why in caplog.records[-1].getMessage(), caplog.records[-1].getMessage()
                # The neighbour's connection is untouched.
                await good.send(good.frame(ReadHoldingRegistersRequest(address=0, count=1), n, 1))
                rr = await good.response()
                assert not rr.isError() and rr.transaction_id == n
            # A function pymodbus does not know is no malformed frame: exception 1, the connection stays.
            await good.send(bytes.fromhex("0077 0000 0002 01 64"))
            rr = await good.response()
            assert rr.transaction_id == 0x77 and rr.exception_code == 0x01
            # Logged once per peer at WARNING: a client looping on bad frames cannot flood the journal.
            warned = [r for r in caplog.records if r.levelno == logging.WARNING and "malformed" in r.getMessage()]
            assert len(warned) == 1 and "127.0.0.1:" in warned[0].getMessage()
        finally:
            good.close()


async def test_max_connections_refuses_more_at_accept(tmp_path: Path) -> None:
    async with server_rig(tmp_path, two_devices(), EXPOSE, max_connections=2) as rig:
        first, second = await RawClient.connect(rig.port), await RawClient.connect(rig.port)
        await until(lambda: len(rig.server.connections) == 2, 20, "two connections")
        third = await RawClient.connect(rig.port)
        assert await third.closed()
        assert rig.server.snapshot().refused == 1
        first.close()
        await until(lambda: len(rig.server.connections) == 1, 20, "one connection left")
        fourth = await RawClient.connect(rig.port)
        try:
            await fourth.send(fourth.frame(ReadHoldingRegistersRequest(address=0, count=1), 4, 1))
            assert (await fourth.response()).transaction_id == 4
        finally:
            for c in (second, third, fourth):
                c.close()


async def test_a_silent_client_is_closed_after_idle_timeout_and_frees_its_slot(tmp_path: Path) -> None:
    # A SCADA host gone without a word must not hold one of max_connections for ever.
    async with server_rig(tmp_path, two_devices(), EXPOSE, max_connections=1, idle_timeout=1.0) as rig:
        talking = await RawClient.connect(rig.port)
        for tid in range(1, 6):  # a client that keeps asking stays, however long it has been connected
            await talking.send(talking.frame(ReadHoldingRegistersRequest(address=0, count=1), tid, 1))
            assert (await talking.response()).transaction_id == tid
            await asyncio.sleep(0.3)
        assert len(rig.server.connections) == 1
        assert await talking.closed()  # then it goes quiet: closed
        late = await RawClient.connect(rig.port)  # and its slot is free
        try:
            await late.send(late.frame(ReadHoldingRegistersRequest(address=0, count=1), 9, 1))
            assert (await late.response()).transaction_id == 9
        finally:
            talking.close()
            late.close()


async def test_a_client_beyond_its_queue_gets_busy_answers_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # All six taken at once (the request rate is not under test): faster than the line serves them.
    monkeypatch.setattr(drivers.modbus.server_conn, "REQUEST_RATE", 1e9)
    async with server_rig(tmp_path, two_devices(), EXPOSE, max_queue=2, cache_max_age=30.0) as rig:
        await polled(rig)
        client = await RawClient.connect(rig.port)
        try:
            # Five pass-throughs at once: two may wait for the line, three are busy; then a cache hit.
            frames = [client.frame(ReadHoldingRegistersRequest(address=40 + i, count=1), 100 + i, 1) for i in range(5)]
            frames.append(client.frame(ReadHoldingRegistersRequest(address=0, count=1), 200, 1))
            await client.send(b"".join(frames))
            answers = [await client.response() for _ in frames]
            assert [a.transaction_id for a in answers] == [100, 101, 102, 103, 104, 200]
            assert [a.function_code for a in answers] == [3, 3, 0x83, 0x83, 0x83, 3]
            assert [a.exception_code for a in answers[2:5]] == [6, 6, 6]
            assert rig.server.snapshot().busy == 3
        finally:
            client.close()


async def test_writes_go_through_the_gate_to_the_slave_and_are_audited(tmp_path: Path) -> None:
    gate = StubGate(tokens=1)
    async with server_rig(tmp_path, two_devices(poll="100ms"), EXPOSE, gate=gate, cache_max_age=30.0) as rig:
        await polled(rig)
        client = AsyncModbusTcpClient("127.0.0.1", port=rig.port, timeout=10)
        await client.connect()
        try:
            rr = await client.write_register(20, 555, device_id=2)
            assert not rr.isError(), rr
            assert rig.sim.get(2, "w") == 555
            # A read right behind it sees the written value (the line dropped the cached block).
            rr = await client.read_holding_registers(20, count=1, device_id=2)
            assert list(rr.registers) == [555]
            local = client.ctx.transport.get_extra_info("sockname")  # type: ignore[union-attr]
            origin = f"modbus-tcp 127.0.0.1:{local[1]}"
            assert gate.admitted == [("d2", origin, "write_register 20 555")]
            assert gate.records == [("d2", origin, "write_register 20 555", True, None)]
            # The gate's rate is spent: busy, audited as refused, nothing written.
            rr = await client.write_register(20, 666, device_id=2)
            assert rr.isError() and rr.exception_code == 0x06
            assert gate.records[-1] == ("d2", origin, "write_register 20 666", False, "rate limited: d2")
            assert rig.sim.get(2, "w") == 555
        finally:
            client.close()


async def test_a_write_and_the_read_behind_it_in_one_segment_see_the_write(tmp_path: Path) -> None:
    async with server_rig(tmp_path, two_devices(poll="50ms"), EXPOSE, cache_max_age=30.0) as rig:
        await polled(rig)
        client = await RawClient.connect(rig.port)
        try:
            frames = client.frame(WriteSingleRegisterRequest(address=20, registers=[777]), 1, 2)
            frames += client.frame(ReadHoldingRegistersRequest(address=20, count=1), 2, 2)
            await client.send(frames)
            write, read = await client.response(), await client.response()
            assert not write.isError() and list(read.registers) == [777]
        finally:
            client.close()


async def test_start_fails_clearly_on_a_taken_address_and_on_an_unknown_device(tmp_path: Path) -> None:
    async with server_rig(tmp_path, two_devices(), EXPOSE) as rig:
        port = rig.port
        taken = ServerSettings(listen=f"127.0.0.1:{port}", host="127.0.0.1", port=port, expose=EXPOSE)
        second = ModbusTcpServer(taken, [rig.bus], StubGate())
        with pytest.raises(FieldgateError, match=rf"cannot listen on 127.0.0.1:{port}: the address is taken"):
            await second.start()
        with pytest.raises(FieldgateError, match="exposes 'nope', which no bus has"):
            ModbusTcpServer(
                ServerSettings(listen="x", host="127.0.0.1", port=0, expose=(ExposeSettings(1, "nope"),)),
                [rig.bus],
                StubGate(),
            )


async def test_passthrough_all_forwards_other_functions_and_still_guards_the_ones_that_write(tmp_path: Path) -> None:
    cfg = two_devices(poll="100ms")
    expose = (ExposeSettings(1, "d1", passthrough="all"), ExposeSettings(2, "d2", writes=True, passthrough="all"))
    gate = StubGate()
    async with server_rig(tmp_path, cfg, expose, gate=gate) as rig:
        await polled(rig)
        client = AsyncModbusTcpClient("127.0.0.1", port=rig.port, timeout=10)
        await client.connect()
        try:
            # Diagnostics "return query data" reads nothing and writes nothing: forwarded, echoed by the slave.
            passthrough = rig.bus.stats.passthrough
            rr = await client.diag_query_data(b"\x12\x34", device_id=1)
            assert not rr.isError() and rig.bus.stats.passthrough == passthrough + 1
            # Device identification (0x2B/0x0E): the slave's objects, as it answered them.
            rr = await client.read_device_information(read_code=1, object_id=0, device_id=1)
            assert not rr.isError() and rr.function_code == 0x2B, rr
            passthrough += 1
            # Functions that write need `writes: true` as well: refused on d1 without reaching its line...
            before = rig.line_transactions()
            rr = await client.readwrite_registers(
                read_address=0, read_count=2, write_address=20, values=[99], device_id=1
            )
            assert rr.isError() and rr.exception_code == 0x01
            rr = await client.mask_write_register(address=20, and_mask=0, or_mask=5, device_id=1)
            assert rr.isError() and rr.exception_code == 0x01
            # ... and "force listen-only mode" would take the device off the line's polls.
            rr = await client.diag_force_listen_only(device_id=1, no_response_expected=False)
            assert rr.isError() and rr.exception_code == 0x01
            assert rig.bus.stats.passthrough == passthrough + 1
            assert [r[2] for r in gate.records] == [
                "function 0x17 ReadWriteMultipleRegistersRequest",
                "function 0x16 MaskWriteRegisterRequest",
                "function 0x08/0x04 ForceListenOnlyModeRequest",
            ]
            # ... and carried out as writes, through the gate, on d2.
            rr = await client.readwrite_registers(
                read_address=20, read_count=1, write_address=20, values=[4242], device_id=2
            )
            assert not rr.isError(), rr
            assert list(rr.registers) == [4242] and rig.sim.get(2, "w") == 4242
            assert gate.admitted[-1][0] == "d2" and gate.records[-1][3] is True
            assert rig.line_transactions() > before
        finally:
            client.close()


async def test_a_flood_of_refused_writes_is_answered_but_its_audit_records_are_bounded(tmp_path: Path) -> None:
    gate = StubGate()
    async with server_rig(tmp_path, two_devices(), EXPOSE, gate=gate) as rig:
        client = await RawClient.connect(rig.port)
        try:
            many = WriteMultipleRegistersRequest(address=20, registers=list(range(123)))
            frames = [client.frame(WriteSingleRegisterRequest(address=20, registers=[i]), i, 1) for i in range(300)]
            frames.append(client.frame(many, 999, 1))
            for frame in frames:  # one at a time: the connection's queue is not the bound under test
                await client.send(frame)
                assert (await client.response()).exception_code == 0x01
        finally:
            client.close()
        # Each refused, none audited beyond the bucket's burst (and its refill while this ran).
        assert 20 <= len(gate.records) < 100, len(gate.records)
        assert rig.server.snapshot().unaudited == 301 - len(gate.records)
        assert gate.admitted == []
        assert all(len(r[2]) <= 200 for r in gate.records)


async def test_a_write_whose_counts_disagree_is_0x03_and_never_reaches_the_gate(tmp_path: Path) -> None:
    gate = StubGate()
    async with server_rig(tmp_path, two_devices(), EXPOSE, gate=gate) as rig:
        client = await RawClient.connect(rig.port)
        try:
            # Write 2 registers at 20, byte count 4, but one register's bytes: pymodbus decodes it, a device must not
            # get it re-encoded as something else.
            await client.send(bytes.fromhex("0009 0000 0009 02 10 0014 0002 04 0001"))
            rr = await client.response()
            assert rr.transaction_id == 9 and rr.exception_code == 0x03
            # 10 coils in one byte.
            await client.send(bytes.fromhex("000a 0000 0008 02 0f 0014 000a 01 ff"))
            rr = await client.response()
            assert rr.transaction_id == 10 and rr.exception_code == 0x03
        finally:
            client.close()
        assert gate.admitted == [] and rig.server.stats.writes == 0


async def test_stop_closes_every_connection_and_fails_what_waits(tmp_path: Path) -> None:
    cfg = line_config(
        [device("d1", 1, poll="1h", offline_after=100, points=[point("r0", "holding", 0)])], timeout="3s", retries=0
    )
    async with server_rig(tmp_path, cfg, (ExposeSettings(1, "d1"),), dead=(1,)) as rig:
        client = await RawClient.connect(rig.port)
        await client.send(client.frame(ReadHoldingRegistersRequest(address=40, count=1), 1, 1))
        await until(lambda: rig.server.snapshot().waiting == 1, 20, "a request waiting for the line")
        await rig.server.stop()
        assert await client.closed()
        snap = rig.server.snapshot()
        assert not snap.running and snap.connections == 0 and snap.waiting == 0
        client.close()


def test_an_audit_record_names_a_write_in_bounded_words() -> None:
    many = WriteMultipleRegistersRequest(address=20, registers=list(range(123)))
    shown = ", ".join(str(v) for v in range(16))
    assert describe(many) == f"write_registers 20 [{shown}, ... (123 values)]"
    coils = WriteMultipleCoilsRequest(address=7, bits=[True, False] * 984)
    assert describe(coils).endswith(", ... (1968 values)]") and len(describe(coils)) <= 200
    assert describe(WriteSingleCoilRequest(address=3, bits=[True])) == "write_coil 3 True"


def test_a_device_identification_answer_is_framed_again_as_the_device_sent_it() -> None:
    sent = bytes.fromhex("2b 0e 01 83 00 00 03 00 06 56656e646f72 01 04 50726f64 02 03 312e30")
    response = DecodePDU(is_server=False).decode(sent)
    assert response is not None
    again = reencodable(response)
    assert bytes([again.function_code]) + again.encode() == sent

    cfg = two_devices()

    class Line:
        """A line whose device answers the identification request with `sent`."""

        name = "line"
        devices = {"d1": Device(cfg.devices[0], cfg)}

        async def pass_through(self, device: str, request: ModbusPDU, timeout: float | None = None) -> ModbusPDU:
            """The device's answer, decoded as the line's pymodbus client decodes it."""
            decoded = DecodePDU(is_server=False).decode(sent)
            assert decoded is not None
            return decoded

        async def raw_write(self, device: str, request: ModbusPDU, origin: str) -> ModbusPDU:
            """Not asked for."""
            raise AssertionError(request)

    units = exposed_units([ExposeSettings(1, "d1", passthrough="all")], [Line()])
    handler = RequestHandler(units, StubGate(), ServerStats(), cache_max_age=1.0)
    request = ReadDeviceInformationRequest(read_code=1, object_id=0)
    answer = asyncio.run(handler.on_line(units[1], request, "test"))
    assert bytes([answer.function_code]) + answer.encode() == sent


async def test_an_admitted_write_whose_client_vanishes_is_still_carried_out_and_audited(tmp_path: Path) -> None:
    gate = StubGate()
    # A client's read of a silent unit holds the line for its timeout: the write waits for the line meanwhile.
    cfg = line_config(
        [
            device("silent", 1, poll="1h", timeout="2s", offline_after=100, points=[point("r0", "holding", 0)]),
            device("d2", 2, poll="1h", points=[point("w", "holding", 20, writable=True)]),
        ],
        retries=0,
    )
    expose = (ExposeSettings(1, "silent"), ExposeSettings(2, "d2", writes=True))
    async with server_rig(tmp_path, cfg, expose, dead=(1,), gate=gate) as rig:
        await until(lambda: rig.bus.devices["d2"].online, 20, "d2 polled")
        reader = await RawClient.connect(rig.port)
        await reader.send(reader.frame(ReadHoldingRegistersRequest(address=0, count=1), 1, 1))
        await until(lambda: rig.server.snapshot().waiting == 1 and rig.bus.passthrough_waiting == 0, 20, "on the line")
        client = await RawClient.connect(rig.port)
        await client.send(client.frame(WriteSingleRegisterRequest(address=20, registers=[31337]), 1, 2))
        await until(lambda: gate.admitted, 20, "the write admitted")
        client.close()
        await until(lambda: len(rig.server.connections) == 1, 20, "the writing client gone")
        assert not gate.records  # its write was still waiting for the line
        assert (await reader.response()).exception_code == 0x0B
        reader.close()
        await until(lambda: gate.records, 20, "the write audited")
        assert gate.records[0][2:] == ("write_register 20 31337", True, None)
        assert rig.sim.get(2, "w") == 31337


class BrokenGate(StubGate):
    """A gate whose rate limit fails (a bug in it, say)."""

    def admit(self, device: str, origin: str, what: str) -> str | None:
        """Raises."""
        raise RuntimeError("the gate broke")


async def test_a_request_whose_handling_fails_is_answered_0x04_and_the_connection_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with server_rig(tmp_path, two_devices(), EXPOSE, gate=BrokenGate(), cache_max_age=30.0) as rig:
        await polled(rig)
        client = await RawClient.connect(rig.port)
        try:
            await client.send(client.frame(WriteSingleRegisterRequest(address=20, registers=[1]), 1, 2))
            rr = await client.response()
            assert rr.transaction_id == 1 and rr.exception_code == 0x04  # server device failure
            await client.send(client.frame(ReadHoldingRegistersRequest(address=0, count=1), 2, 2))
            assert not (await client.response()).isError()
        finally:
            client.close()
        assert "the gate broke" in caplog.text


async def test_an_answer_that_cannot_be_framed_is_0x04_and_the_connection_goes_on(tmp_path: Path) -> None:
    cfg = two_devices()

    class Line:
        """A line whose device answer holds a word no frame can carry."""

        name = "line"
        devices = {"d1": Device(cfg.devices[0], cfg)}

        async def pass_through(self, device: str, request: ModbusPDU, timeout: float | None = None) -> ModbusPDU:
            """A register of 17 bits."""
            return ReadHoldingRegistersResponse(registers=[70000])

        async def raw_write(self, device: str, request: ModbusPDU, origin: str) -> ModbusPDU:
            """Not asked for."""
            raise AssertionError(request)

    port = free_port()
    settings = ServerSettings(
        listen=f"127.0.0.1:{port}", host="127.0.0.1", port=port, expose=(ExposeSettings(1, "d1"),)
    )
    server = ModbusTcpServer(settings, [Line()], StubGate())
    await server.start()
    client = await RawClient.connect(port)
    try:
        for tid in (1, 2):
            await client.send(client.frame(ReadHoldingRegistersRequest(address=40, count=1), tid, 1))
            rr = await client.response()
            assert rr.transaction_id == tid and rr.exception_code == 0x04
    finally:
        client.close()
        await server.stop()


async def test_a_request_pymodbus_decodes_but_cannot_encode_is_refused_and_the_line_polls_on(tmp_path: Path) -> None:
    # Diagnostics sub-function 0x15 with extra data: pymodbus decodes it, then fails to encode it again
    # (struct.error). It must neither reach the line nor, given to the line directly, end the line's task.
    pdu = bytes.fromhex("08001522b1b2b3")
    request = DecodePDU(is_server=True).decode(pdu)
    assert request is not None
    async with server_rig(tmp_path, two_devices(poll="100ms"), (ExposeSettings(1, "d1", passthrough="all"),)) as rig:
        await polled(rig)
        client = await RawClient.connect(rig.port)
        try:
            await client.send(FramerSocket(DecodePDU(is_server=False)).encode(pdu, 1, 0x51))
            rr = await client.response()
            assert rr.transaction_id == 0x51 and rr.isError() and rr.exception_code == 0x03
        finally:
            client.close()
        with pytest.raises(ProtocolError):
            await rig.bus.pass_through("d1", request)
        cycles = rig.bus.devices["d1"].stats.cycles
        await until(lambda: rig.bus.devices["d1"].stats.cycles > cycles + 2, 20, "the line polling on")
        assert rig.bus.running


@pytest.mark.parametrize(("fc", "count"), [(3, 0), (3, 126), (4, 200), (1, 2001)])
async def test_a_read_with_a_count_out_of_range_gets_0x03_and_keeps_its_connection(
    tmp_path: Path, fc: int, count: int
) -> None:
    # pymodbus will not decode such a read; a SCADA tag set up with count 0 or 200 must not reconnect for ever.
    pdu = bytes([fc]) + (0).to_bytes(2, "big") + count.to_bytes(2, "big")
    async with server_rig(tmp_path, two_devices(), EXPOSE) as rig:
        client = await RawClient.connect(rig.port)
        try:
            await client.send(FramerSocket(DecodePDU(is_server=False)).encode(pdu, 1, 0x61))
            rr = await client.response()
            assert rr.transaction_id == 0x61 and rr.isError() and rr.exception_code == 0x03
            await client.send(client.frame(ReadHoldingRegistersRequest(address=0, count=1), 0x62, 1))
            assert (await client.response()).transaction_id == 0x62  # the same connection answers on
        finally:
            client.close()


async def test_an_admitted_write_the_stop_cancels_before_it_ran_is_audited_too(tmp_path: Path) -> None:
    gate = StubGate()
    expose = (ExposeSettings(2, "d2", writes=True),)
    async with server_rig(tmp_path, two_devices(), expose, gate=gate) as rig:
        handler = rig.server._handler
        write = asyncio.create_task(
            handler._write(handler.units[2], WriteSingleRegisterRequest(address=20, registers=[7]), "modbus-tcp t:1")
        )
        await asyncio.sleep(0)  # admitted: its task made, not yet run
        assert len(gate.admitted) == 1 and handler.writes_running
        await rig.server.stop()
        with pytest.raises(asyncio.CancelledError):
            await write
        # The request was audited at admission: its outcome is too, never left open.
        assert [(r[0], r[3], r[4]) for r in gate.records] == [
            ("d2", False, "the gateway stopped before the write went out")
        ]
