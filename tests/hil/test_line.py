"""The baud-accurate line on its own (timing, faults, unplug) and a real ModbusBus through it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import tty
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from drivers.modbus import budget
from drivers.modbus.transport import ModbusLink
from hil.line import Faults, FrameFormat, Rs485Line
from hil.scenarios import registers


async def test_throughput_at_19200_8e1_approaches_but_never_beats_the_line_limit(make_rig) -> None:  # type: ignore[no-untyped-def]
    # Two devices with one 10-register block each and a near-zero poll interval: the line never idles.
    devices = [registers(u, 10, poll="0.1ms") for u in (1, 2)]
    rig = await make_rig(devices)
    assert await rig.wait_for(lambda: rig.bus.stats.transactions >= 10, 5)
    tx0, t0 = rig.bus.stats.transactions, time.monotonic()
    await asyncio.sleep(3.0)
    tx1, t1 = rig.bus.stats.transactions, time.monotonic()
    window = t1 - t0
    achieved = (tx1 - tx0) / window
    req, resp = budget.transaction_bytes("holding", 10)
    limit = 1 / budget.transaction_time(req, resp, 19200, budget.char_bits(8, "E", 1))
    ratio = achieved / limit
    print(f"19200 8E1, 10 registers: {achieved:.1f} tx/s of a {limit:.1f} tx/s line limit = {ratio:.3f}")
    # The line never saw a request start early (exact, whatever the load) ...
    assert rig.line.stats.short_gaps == 0
    # ... and the exchanges were clean. Under stress-ng --cpu 2 this rig once saw 2 CRC errors in 76 transactions
    # (the line and the slaves share this test's loop; the cause was not looked into): a few are allowed there,
    # a bus that collided with its own answers would fail most.
    failed = rig.bus.stats.timeouts + rig.bus.stats.crc_errors
    assert failed <= max(2, rig.bus.stats.transactions // 20), rig.bus.stats
    # Never beats the line, however busy the machine (a busy one only slows it): of the transactions ending
    # in the window, one may have started before it.
    assert ratio <= 1.0 + 1 / (limit * window), ratio
    # How close it comes is a speed goal, judged by hil/bench/line_bench.py (>= 0.9 of a raw client through the
    # same line, measured in the same run). Here it only has to keep the line busy: a bus that waited a
    # response timeout or a poll period between reads would stay under 0.2; under stress-ng --cpu 2 this
    # measured 0.44-0.76.
    assert ratio >= 0.2, ratio
    assert not rig.wrong_values()


class Ends:
    """Raw fds on both sides of a line, read without blocking the loop."""

    def __init__(self, line: Rs485Line) -> None:
        self.line = line
        self.gateway = os.open(line.gateway_port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        self.device = os.open(line.device_port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)

    async def transfer(self, data: bytes, *, to_device: bool = True, expect: int | None = None) -> tuple[bytes, float]:
        """Write on one side; the bytes read on the other and the seconds until the last arrived."""
        src, dst = (self.gateway, self.device) if to_device else (self.device, self.gateway)
        got = bytearray()
        done = asyncio.Event()
        want = len(data) if expect is None else expect

        def readable() -> None:
            got.extend(os.read(dst, 4096))
            if len(got) >= want:
                done.set()

        loop = asyncio.get_running_loop()
        loop.add_reader(dst, readable)
        try:
            t0 = time.monotonic()
            os.write(src, data)
            async with asyncio.timeout(2 + 2 * len(data) * self.line.char_time):
                await done.wait()
            return bytes(got), time.monotonic() - t0
        finally:
            loop.remove_reader(dst)

    async def send_short(self, data: bytes, timeout: float = 10.0) -> tuple[bytes, float]:
        """Write towards the device when fewer bytes may arrive (drops, truncation): what arrived, and the seconds
        until it had. The line's count of bytes it delivered says when the frame is through (no fixed pause,
        which a busy machine outlasts); the bytes themselves are read from the device's end."""
        delivered = self.line.stats.bytes_to_device
        t0 = time.monotonic()
        os.write(self.gateway, data)
        got = bytearray()
        async with asyncio.timeout(timeout):
            while not got or len(got) < self.line.stats.bytes_to_device - delivered:
                with contextlib.suppress(BlockingIOError):
                    got += os.read(self.device, 4096)
                await asyncio.sleep(0.001)
        return bytes(got), time.monotonic() - t0

    def close(self) -> None:
        for fd in (self.gateway, self.device):
            os.close(fd)


@pytest.fixture
async def line(tmp_path: Path) -> AsyncIterator[Rs485Line]:
    """A fault-free 9600 8E1 line."""
    async with Rs485Line(tmp_path / "ttyHIL", baudrate=9600, frame_format="8E1") as ln:
        yield ln


PAYLOAD = bytes(range(256)) * 2


@pytest.mark.parametrize("to_device", [True, False], ids=["to-device", "to-gateway"])
async def test_n_bytes_take_n_times_11_bits_at_9600_8e1(line: Rs485Line, to_device: bool) -> None:
    ends = Ends(line)
    try:
        for n in (50, 400):
            wire = line.stats.wire_seconds
            got, seconds = await ends.transfer(PAYLOAD[:n], to_device=to_device)
            assert got == PAYLOAD[:n]
            # The line's own schedule is exact whatever the load: 11 bits per character.
            assert line.stats.wire_seconds - wire == pytest.approx(n * 11 / 9600)
            # The medium has been quiet for longer than t3.5 (the last frame was waited for), so a device's
            # frame starts at once too. (The old +t3.5 here for a device's frame was hidden by a ±10 % bound.)
            expected = n * 11 / 9600
            # Never earlier than the wire allows (a busy machine only makes it later); a line that did not pace
            # would deliver at once. Later by up to 1 s: a lost timer wake-up would hold the bytes for good.
            assert expected - 1e-6 <= seconds <= expected + 1.0, (n, seconds, expected)
    finally:
        ends.close()


async def test_8n1_takes_10_bits_per_character(tmp_path: Path) -> None:
    async with Rs485Line(tmp_path / "tty", baudrate=19200, frame_format="8N1") as ln:
        ends = Ends(ln)
        try:
            got, seconds = await ends.transfer(PAYLOAD[:384])
            assert got == PAYLOAD[:384]
            assert ln.stats.wire_seconds == pytest.approx(384 * 10 / 19200)  # 0.2 s: 10 bits, not 11
            assert 0.2 - 1e-6 <= seconds <= 0.2 + 1.0, seconds  # never early; late only as far as load goes
        finally:
            ends.close()


async def test_a_reply_cannot_start_before_the_request_has_ended_and_t35_passed(line: Rs485Line) -> None:
    ends = Ends(line)
    try:
        t0 = time.monotonic()
        os.write(ends.gateway, PAYLOAD[:100])  # 114.6 ms on the wire
        os.write(ends.device, b"\x01\x03\x00")  # the device answers at once: it must wait for the medium
        got, _ = await ends.transfer(b"", to_device=False, expect=3)
        elapsed = time.monotonic() - t0
        expected = (100 + 3) * line.char_time + line.t35
        assert got == b"\x01\x03\x00"
        # The promise is the lower bound, which load cannot break (it only delays). The upper one only catches
        # a line that held the reply for good; its timing accuracy is hil/bench/line_bench.py's to measure.
        assert expected - 1e-6 <= elapsed <= expected + 1.0, (elapsed, expected)
        assert line.stats.wire_seconds == pytest.approx(103 * line.char_time)
    finally:
        ends.close()


def test_frame_formats() -> None:
    assert [FrameFormat.parse(f).bits for f in ("8E1", "8O1", "8N2", "8N1", "7E1")] == [11, 11, 11, 10, 10]
    assert str(FrameFormat.parse("8e1")) == "8E1"
    with pytest.raises(ValueError, match="8E1"):
        FrameFormat.parse("9X1")


async def _noisy(tmp_path: Path, faults: Faults, seed: int, frames: int = 20) -> tuple[list[bytes], Rs485Line]:
    """Frames of 64 bytes sent through a faulty 115200 line; what arrived for each."""
    received: list[bytes] = []
    async with Rs485Line(tmp_path / f"tty{seed}", baudrate=115200, frame_format="8N1", faults=faults, seed=seed) as ln:
        ends = Ends(ln)
        try:
            for i in range(frames):
                frame = PAYLOAD[i : i + 64]
                got = (await ends.send_short(frame))[0] if faults.drop_rate else (await ends.transfer(frame))[0]
                received.append(got)
        finally:
            ends.close()
    return received, ln


async def test_bit_flips_are_seeded_and_counted(tmp_path: Path) -> None:
    faults = Faults(flip_rate=0.02)
    a, line_a = await _noisy(tmp_path, faults, seed=7)
    b, _ = await _noisy(tmp_path, faults, seed=7)
    c, _ = await _noisy(tmp_path, faults, seed=8)
    assert a == b != c
    sent = [PAYLOAD[i : i + 64] for i in range(20)]
    flipped = sum(x != y for got, want in zip(a, sent, strict=True) for x, y in zip(got, want, strict=True))
    # Each flip inverts exactly one bit.
    bits = sum(bin(x ^ y).count("1") for got, want in zip(a, sent, strict=True) for x, y in zip(got, want, strict=True))
    assert flipped == bits == line_a.stats.flipped_bytes > 0
    assert 5 <= flipped <= 60  # 1,280 bytes at 2 %: ~26


async def test_dropped_bytes_are_missing_but_hold_the_wire(tmp_path: Path) -> None:
    received, ln = await _noisy(tmp_path, Faults(drop_rate=0.05), seed=3, frames=5)
    missing = sum(64 - len(r) for r in received)
    assert missing == ln.stats.dropped_bytes > 0
    assert ln.stats.wire_seconds == pytest.approx(5 * 64 * ln.char_time)


async def test_truncated_frames_and_extra_latency(tmp_path: Path) -> None:
    async with Rs485Line(
        tmp_path / "tty", baudrate=115200, frame_format="8N1", faults=Faults(truncate_rate=1.0, latency=0.05)
    ) as ln:
        ends = Ends(ln)
        try:
            got, seconds = await ends.send_short(PAYLOAD[:64])
            assert 1 <= len(got) < 64 and PAYLOAD.startswith(got)
            # Held by the latency: never sooner than 50 ms plus its time on the wire (load only adds to it).
            assert seconds >= 0.05 + len(got) * ln.char_time - 1e-6, seconds
            with pytest.raises(BlockingIOError):
                os.read(ends.device, 4096)  # nothing more: the rest was cut off
            assert ln.stats.truncated_frames == ln.stats.delayed_frames == 1
        finally:
            ends.close()


async def test_a_late_reply_is_held_for_late_delay(tmp_path: Path) -> None:
    faults = Faults(late_rate=1.0, late_delay=0.3, late_units=frozenset({5}))
    async with Rs485Line(tmp_path / "tty", baudrate=115200, frame_format="8N1", faults=faults) as ln:
        ends = Ends(ln)
        try:
            _, on_time = await ends.transfer(b"\x04\x03\x02\x00\x01", to_device=False)
            _, late = await ends.transfer(b"\x05\x03\x02\x00\x01", to_device=False)
            # Held for late_delay and not twice; a unit not named is not held at all. Both upper bounds sit a
            # late_delay above what they guard, far beyond what load adds.
            assert on_time < 0.3 and 0.3 <= late < 0.6, (on_time, late)
            assert ln.stats.late_replies == 1
        finally:
            ends.close()


async def test_a_babbling_device_talks_to_the_gateway(tmp_path: Path) -> None:
    async with Rs485Line(tmp_path / "tty", baudrate=115200, frame_format="8N1", seed=2) as ln:
        ends = Ends(ln)
        try:
            loop = asyncio.get_running_loop()
            on = loop.time()
            ln.faults = Faults(babble_rate=20, babble_max=8)  # switched on while running
            await asyncio.sleep(0.5)
            ln.faults = Faults()
            babbled = loop.time() - on
            heard = bytearray()
            async with asyncio.timeout(10):
                while len(heard) < ln.stats.babble_bytes:  # the last burst may still be on the wire
                    with contextlib.suppress(BlockingIOError):
                        heard += os.read(ends.gateway, 4096)
                    await asyncio.sleep(0.001)
            assert len(heard) == ln.stats.babble_bytes > 0
            # 20 bursts/s on the line's own clock, for as long as it was on (a busy machine stretches the pause,
            # and the bursts due in it come at the next wake-up): seeded, so at least the 3 of the first 0.5 s.
            assert 3 <= ln.stats.babble_bursts <= 2 * 20 * babbled + 5, (ln.stats.babble_bursts, babbled)
            with pytest.raises(BlockingIOError):
                os.read(ends.device, 4096)  # babble goes to the gateway only
        finally:
            ends.close()


async def test_unplug_breaks_the_open_port_and_replug_brings_a_fresh_pty(line: Rs485Line) -> None:
    link = Path(line.gateway_port)
    before = os.readlink(link)
    ends = Ends(line)
    try:
        line.unplug(0.2)
        assert not link.exists() and not link.is_symlink()
        with pytest.raises(OSError):
            os.write(ends.gateway, b"x")
            os.read(ends.gateway, 1)
        await asyncio.sleep(0.3)
        assert link.is_symlink() and os.readlink(link) != before
        os.close(ends.gateway)
        ends.gateway = os.open(link, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        got, _ = await ends.transfer(b"\x01\x03\x00\x00\x00\x01")
        assert got == b"\x01\x03\x00\x00\x00\x01"
        assert line.stats.unplugs == 1
    finally:
        ends.close()


async def test_command_line_runs_a_line_with_slaves_behind_it(tmp_path: Path) -> None:
    link = tmp_path / "ttyHIL"
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "hil.line", "--link", str(link), "--device-link", str(tmp_path / "ttyDEV")),
        *("--baud", "19200", "--format", "8E1", "--seed", "1", "--serve", "1,2", "--registers", "4"),
        stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert proc.stdout is not None
        banner = await asyncio.wait_for(proc.stdout.readuntil(b"serving units 1,2"), 10)
        assert b"19200 baud 8E1 (11 bits/char" in banner
        modbus = ModbusLink(str(link), baudrate=19200, parity="N")
        await modbus.open()
        try:
            assert await modbus.read("holding", 2, 0, 4, 0.5) == [2000, 2001, 2002, 2003]
        finally:
            modbus.close()
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0
    assert b"frames_to_device=1 frames_to_gateway=1" in out
    assert not link.exists()


class RealPort:
    """A pty standing in for a real adapter: the line holds its slave fd, the test plays the far end of the wire."""

    def __init__(self) -> None:
        self.far, self.fd = os.openpty()
        tty.setraw(self.fd)
        os.set_blocking(self.far, False)

    def close(self) -> None:
        for fd in (self.far, self.fd):
            with contextlib.suppress(OSError):
                os.close(fd)


async def _read_until(fd: int, n: int, timeout: float = 10.0) -> tuple[bytes, float]:
    """Bytes read from a non-blocking fd until `n` arrived; the seconds that took."""
    got = bytearray()
    t0 = time.monotonic()
    while len(got) < n:
        assert time.monotonic() - t0 < timeout, (n, bytes(got))
        with contextlib.suppress(BlockingIOError):
            got += os.read(fd, 4096)
        await asyncio.sleep(0.001)
    return bytes(got), time.monotonic() - t0


async def test_a_relay_gathers_a_frame_from_a_real_port_and_adds_no_wire_time() -> None:
    port = RealPort()
    # A frame_gap long enough that "went on at once" and "waited for the gap" cannot be confused under load.
    gap = 1.0
    relay = Rs485Line(baudrate=9600, frame_format="8E1", pace=False, gateway_fd=port.fd, frame_gap=gap)
    try:
        await relay.start()
        assert relay.real_port and relay.gateway_port == os.ttyname(port.fd)
        assert "no wire timing" in relay.describe()
        device = os.open(relay.device_port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            # A request arriving in two USB packets 10 ms apart reaches the slave as one frame, as soon
            # as its CRC checks; bytes that make no frame wait until the port has been quiet for frame_gap.
            os.write(port.far, b"\x01\x03\x00")
            await asyncio.sleep(0.01)
            t0 = time.monotonic()
            os.write(port.far, b"\x00\x00\x0a\xc5\xcd")
            got, _ = await _read_until(device, 8)
            assert got == b"\x01\x03\x00\x00\x00\x0a\xc5\xcd" and time.monotonic() - t0 < gap / 2
            assert relay.stats.frames_to_device == 1
            os.write(port.far, b"\x01\x03\x00\x00\x00\x0a\xc5\xce")  # one bit off: no valid CRC
            got, seconds = await _read_until(device, 8)
            assert got == b"\x01\x03\x00\x00\x00\x0a\xc5\xce" and gap - 1e-3 <= seconds < gap + 2.0, seconds
            assert relay.stats.frames_to_device == 2
            # 400 bytes take 458 ms at 9600 8E1 on a paced line; the relay leaves the timing to the wire.
            os.write(device, PAYLOAD[:400])
            got, seconds = await _read_until(port.far, 400)
            assert got == PAYLOAD[:400] and seconds < 0.3, seconds  # not 0.458 s and more
            assert relay.stats.wire_seconds == 0.0
            with pytest.raises(RuntimeError, match="by hand"):
                relay.unplug()
        finally:
            os.close(device)
    finally:
        await relay.stop()
        port.close()


async def test_a_relay_injects_the_same_faults_both_ways() -> None:
    port = RealPort()
    faults = Faults(flip_rate=0.05, late_rate=1.0, late_delay=0.2, late_units=frozenset({7}))
    relay = Rs485Line(baudrate=115200, frame_format="8N1", pace=False, gateway_fd=port.fd, faults=faults, seed=3)
    try:
        await relay.start()
        device = os.open(relay.device_port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            os.write(port.far, PAYLOAD[:200])
            to_device, _ = await _read_until(device, 200)
            os.write(device, b"\x07" + PAYLOAD[1:200])  # unit 7 answers: held back 200 ms
            to_gateway, seconds = await _read_until(port.far, 200)
            assert seconds >= 0.2 and relay.stats.late_replies == 1
            sent = PAYLOAD[:200] + b"\x07" + PAYLOAD[1:200]
            flips = sum(a != b for a, b in zip(to_device + to_gateway, sent, strict=True))
            assert flips == relay.stats.flipped_bytes > 0
        finally:
            os.close(device)
    finally:
        await relay.stop()
        port.close()


async def test_a_relay_whose_port_goes_away_says_so_and_stops_watching_it() -> None:
    port = RealPort()
    relay = Rs485Line(baudrate=19200, frame_format="8N1", pace=False, gateway_fd=port.fd)
    try:
        await relay.start()
        name = relay.gateway_port
        os.close(port.far)  # the adapter is gone: its fd hangs up (EOF or EIO) for ever
        await asyncio.sleep(0.1)
        assert relay.port_error and relay.port_error.startswith(name)
        # No longer watched: a hung-up fd is always readable and would spin the loop.
        assert not asyncio.get_running_loop().remove_reader(port.fd)
    finally:
        await relay.stop()
        port.close()
