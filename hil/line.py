"""A baud-accurate, fault-injecting RS-485 line: a man in the middle between two pseudo-terminals.

The gateway opens one pty by a symlink (as it would open /dev/ttyUSB0), a Modbus slave opens the
other; every byte between them crosses one simulated medium. What is modelled (hil/README.md has
the long version):

- Wire time: a character takes `char_bits(format) / baud` seconds (11 bits for 8E1/8O1/8N2, 10 for
  8N1). The ptys themselves always carry plain 8N1 bytes (this kernel rejects even parity on ptys);
  only the timing follows the configured format. Towards the gateway, byte k of a frame is delivered
  when its last bit has left the wire; towards the device, a frame is delivered whole at its end (a
  slave's t3.5 framing). Deadlines are absolute and monotonic: a late wake-up delivers all that is due.
- Half duplex, one shared medium, no collisions: a frame waits until the medium is free. A frame
  from the device side starts no earlier than t3.5 after the medium went quiet, because a slave
  only knows a request has ended after that silence. The gateway's own gap is its business: a
  request that starts sooner is delivered anyway and counted in `short_gaps`.
- A frame is what one read from a pty returns (serial clients write a frame with one write); a
  chunk that arrives while the same side is still transmitting continues its frame without a gap.
- Faults, each with its own random.Random derived from one seed, so switching one fault on does
  not change the draws of another: bit flips and dropped bytes per byte, truncated frames and extra
  latency per frame (both directions); late replies (a device frame held for `late_delay`) and a
  babbling device (random bytes towards the gateway) on the device side; unplug/replug of the
  gateway's adapter (the symlink disappears and comes back pointing at a fresh pty).

As a fault relay in front of real hardware (`hil/run.py --gateway-port ... --device-port ...`), the
gateway side is an already-open serial port (`gateway_fd`) and the timing is off (`pace=False`): the
wire is real, so the line adds no wire time and no turnaround, and only injects the same faults.
Bytes from a real port arrive in pieces (USB packets), so they are gathered into a frame until its
Modbus CRC checks or the port has been quiet for `frame_gap`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import heapq
import logging
import math
import os
import random
import re
import signal
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType

import crcmod.predefined

from drivers.sim.line import _PtyEnd

log = logging.getLogger(__name__)

#: Bytes held for a side that does not read (a closed port) before newer ones are thrown away.
PENDING_MAX = 64 * 1024
#: The least silence that ends a frame read from a real port: a USB adapter hands a frame over in
#: packets, and one with a 16 ms latency timer can pause that long inside a frame.
REAL_FRAME_GAP = 0.02
_FORMAT = re.compile(r"^([5-8])([NEOMS])(1|1\.5|2)$")
#: Modbus RTU's CRC-16: over a whole frame, its own CRC included, it comes to 0.
_modbus_crc = crcmod.predefined.mkCrcFun("modbus")
#: The line's own Modbus timing, from "MODBUS over Serial Line V1.02" 2.5.1.1, not from the driver's
#: drivers/modbus/budget.py: the line is what the driver is measured against, so it must not share
#: its sums. Above 19200 baud the spec fixes the inter-frame silence at 1.75 ms.
T35_FIXED = 0.00175
T35_FIXED_ABOVE = 19200


def char_bits(bytesize: int, parity: str, stopbits: float) -> int:
    """Bits one character takes on the wire: a start bit, the data, a parity bit unless N, the stop bits
    (1.5 stop bits hold the line for a whole second bit's slot before the next start bit can follow)."""
    return 1 + bytesize + (0 if parity == "N" else 1) + math.ceil(stopbits)


def t35(baudrate: int, bits: int) -> float:
    """The silence that ends a frame: 3.5 character times, fixed at 1.75 ms above 19200 baud."""
    return T35_FIXED if baudrate > T35_FIXED_ABOVE else 3.5 * bits / baudrate


@dataclass(frozen=True, slots=True)
class FrameFormat:
    """Character framing on the wire, e.g. 8E1: data bits, parity, stop bits."""

    bytesize: int = 8
    parity: str = "E"
    stopbits: float = 1

    @classmethod
    def parse(cls, text: str) -> FrameFormat:
        """A format from its usual spelling: 8E1, 8N1, 8N2, 8O1, 7E1."""
        m = _FORMAT.match(text.strip().upper())
        if not m:
            raise ValueError(f"frame format must look like 8E1, 8N1 or 8N2, got {text!r}")
        stop = float(m.group(3))
        return cls(int(m.group(1)), m.group(2), int(stop) if stop.is_integer() else stop)

    @property
    def bits(self) -> int:
        """Bits one character takes on the wire."""
        return char_bits(self.bytesize, self.parity, self.stopbits)

    def __str__(self) -> str:
        return f"{self.bytesize}{self.parity}{self.stopbits:g}"


@dataclass(frozen=True, slots=True)
class Faults:
    """What the line does wrong; every rate is a probability, 0 switches the fault off."""

    flip_rate: float = 0.0  # per byte, both directions: one random bit of the byte inverted
    drop_rate: float = 0.0  # per byte, both directions: the byte holds the wire but is never delivered
    truncate_rate: float = 0.0  # per frame, both directions: the sender stops after a random prefix
    latency: float = 0.0  # seconds every frame waits before it goes on the wire (a slow adapter/device)
    jitter: float = 0.0  # up to this many seconds more, uniformly drawn per frame
    late_rate: float = 0.0  # per device frame: held back for late_delay (after the gateway's timeout)
    late_delay: float = 0.5  # seconds
    late_spread: float = 0.0  # up to this many seconds more, uniformly drawn per late reply
    late_units: frozenset[int] | None = None  # only replies whose first byte (the unit id) is listed
    babble_rate: float = 0.0  # bursts per second (Poisson) of random bytes towards the gateway
    babble_max: int = 8  # bytes per burst, 1..babble_max

    @property
    def any(self) -> bool:
        """Whether any fault is switched on."""
        rates = (self.flip_rate, self.drop_rate, self.truncate_rate, self.latency, self.jitter)
        return any(rates) or bool(self.late_rate or self.babble_rate)


@dataclass
class LineStats:
    """What crossed the line and what was injected."""

    frames_to_device: int = 0
    frames_to_gateway: int = 0
    bytes_to_device: int = 0  # delivered
    bytes_to_gateway: int = 0
    wire_seconds: float = 0.0  # time the medium carried characters
    short_gaps: int = 0  # gateway frames that began less than t3.5 after the medium went quiet
    flipped_bytes: int = 0
    dropped_bytes: int = 0
    truncated_frames: int = 0
    delayed_frames: int = 0
    late_replies: int = 0
    late_cross_unit: int = 0  # held device frames put on the wire after a request to another unit
    babble_bursts: int = 0
    babble_bytes: int = 0
    unplugs: int = 0
    lost_unplugged: int = 0  # bytes that had nowhere to go while the adapter was out
    overflow_bytes: int = 0  # bytes thrown away for a side that stopped reading


@dataclass(frozen=True, slots=True)
class FrameRecord:
    """One frame the line carried, in the line's clock (the event loop's, i.e. time.monotonic()).

    `sent`: when its sender handed it to the line (before any fault held it); `start`/`end`: when it held the
    wire. `data`: the bytes as the other side received them (dropped bytes left out, flipped ones flipped).
    """

    source: str  # "gateway", "device" or "babble"
    sent: float
    start: float
    end: float
    data: bytes


#: Clock slack of `one_master`'s comparisons (the line's own short-gap count allows as much).
MASTER_SLACK = 1e-6


def one_master(frames: Sequence[FrameRecord], t35: float) -> list[str]:
    """What in a frame log shows more than one master on the line (empty when the line stayed one master's).

    One master's line: each request is handed to the line no sooner than t3.5 after the previous frame (its
    answer, or the previous request when none came) has ended, and each device frame answers the request
    just before it, from the unit that request addressed (at most one answer per request). Babble holds the
    wire and answers nothing.
    """
    faults: list[str] = []
    previous: FrameRecord | None = None
    request: FrameRecord | None = None  # the request still waiting for its answer
    for f in frames:
        if f.source == "gateway":
            if previous is not None and f.sent < previous.end + t35 - MASTER_SLACK:
                gap = (f.sent - previous.end) * 1000
                faults.append(
                    f"request {f.data.hex()} handed over {gap:.3f} ms after the {previous.source} frame "
                    f"{previous.data[:8].hex()} ended (t3.5 {t35 * 1000:.3f} ms) at {f.sent:.6f}"
                )
            request = f
        elif f.source == "device":
            if request is None:
                faults.append(f"device frame {f.data[:8].hex()} at {f.start:.6f} answers no request")
            elif f.data[:1] != request.data[:1]:
                asked = request.data.hex()
                faults.append(f"device frame {f.data[:8].hex()} at {f.start:.6f} is not from the unit of {asked}")
            request = None
        previous = f
    return faults


@dataclass(order=True)
class _Frame:
    """A frame waiting for the medium: ordered by when it may start."""

    release: float
    seq: int
    to_gateway: bool = field(compare=False)
    source: str = field(compare=False)  # "gateway", "device" or "babble"
    chars: list[int | None] = field(compare=False)  # None: a dropped byte, wire time but no delivery
    held: bool = field(compare=False, default=False)  # delayed by a fault: never continues a frame
    late: bool = field(compare=False, default=False)  # a late reply
    sent: float = field(compare=False, default=0.0)  # when its sender handed it over


class _FdEnd:
    """An already-open serial port (a real adapter) as one end of the line; its opener closes it."""

    def __init__(self, fd: int) -> None:
        self.master = fd
        try:
            self.path = os.ttyname(fd)
        except OSError:
            self.path = f"/proc/self/fd/{fd}"
        os.set_blocking(fd, False)

    def close(self) -> None:
        """Nothing to close: the port belongs to whoever opened it."""


class Rs485Line:
    """A half-duplex RS-485 line with wire timing and injected faults between two ptys.

    With `gateway_fd` the gateway side is an open serial port instead of a pty, and with `pace=False`
    the line adds no time of its own: together, a fault relay in front of a real wire.
    """

    def __init__(
        self,
        link: str | os.PathLike[str] | None = None,
        *,
        baudrate: int = 9600,
        frame_format: FrameFormat | str = "8E1",
        faults: Faults | None = None,
        seed: int = 0,
        device_link: str | os.PathLike[str] | None = None,
        pace: bool = True,
        gateway_fd: int | None = None,
        frame_gap: float | None = None,
        log_frames: int = 0,
    ) -> None:
        if gateway_fd is not None and link is not None:
            raise ValueError("a link names a pty the line creates; a gateway_fd is a port already open")
        self.baudrate = baudrate
        self.format = FrameFormat.parse(frame_format) if isinstance(frame_format, str) else frame_format
        self.pace = pace
        # Unpaced, the line takes no time: characters and the slave's turnaround cost nothing here.
        self.char_time = self.format.bits / baudrate if pace else 0.0
        self.t35 = t35(baudrate, self.format.bits) if pace else 0.0
        #: Silence that ends a frame read from a real port (the gateway_fd end) when its CRC does not check.
        self.frame_gap = frame_gap if frame_gap is not None else max(t35(baudrate, self.format.bits), REAL_FRAME_GAP)
        #: Why the real port stopped carrying bytes (its adapter went away), None while it works.
        self.port_error: str | None = None
        self._gateway_fd = gateway_fd
        self._partial = bytearray()  # a frame from the real port, still arriving
        self._partial_timer: asyncio.TimerHandle | None = None
        self._faults = faults or Faults()
        self.seed = seed
        self.stats = LineStats()
        self._link = Path(link) if link else None
        self._device_link = Path(device_link) if device_link else None
        # One generator per fault: the draws of one do not depend on which others are on.
        names = ("flip", "drop", "truncate", "latency", "late", "babble")
        self._rng = {n: random.Random(f"{seed}/{n}") for n in names}
        self._gateway: _PtyEnd | _FdEnd | None = None
        self._device: _PtyEnd | None = None
        self._gateway_path = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._held: list[_Frame] = []
        self._seq = 0
        # (due, to_gateway, bytes): one entry per character towards the gateway, one per frame
        # towards the device (see _schedule); b"" for a dropped byte.
        self._wire: deque[tuple[float, bool, bytes]] = deque()
        self._free_at = 0.0
        self._last_source = ""
        self._last_held = False
        self._last_unit = -1  # unit id of the last request: who the gateway waits for
        self._next_babble = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._pending: dict[int, bytearray] = {}
        self._replug: asyncio.TimerHandle | None = None
        #: When True, every frame the gateway side sends is counted in `requests` by its bytes (as sent,
        #: before any fault): what a benchmark replays and counts on the line, not what the gateway says it sent.
        self.count_requests = False
        self.requests: dict[bytes, int] = {}
        #: With `log_frames` > 0, the last that many frames carried (see FrameRecord; `one_master` checks them).
        self.frame_log: deque[FrameRecord] | None = deque(maxlen=log_frames) if log_frames > 0 else None

    @property
    def faults(self) -> Faults:
        """The faults injected from now on."""
        return self._faults

    @faults.setter
    def faults(self, faults: Faults) -> None:
        self._faults = faults
        # The next babble burst is drawn at the new rate, not left where the old rate put it.
        if self._loop is not None:
            self._next_babble = self._loop.time() + self._babble_wait()
            self._service()

    # --- ends -----------------------------------------------------------------------------------

    @property
    def gateway_port(self) -> str:
        """The path the gateway opens: the symlink when one was asked for, else the pty itself."""
        return str(self._link) if self._link else self._gateway_path

    @property
    def device_port(self) -> str:
        """The path a Modbus slave opens: the device symlink when one was asked for."""
        if self._device_link:
            return str(self._device_link)
        assert self._device is not None, "start the line first"
        return self._device.path

    @property
    def real_port(self) -> bool:
        """Whether the gateway side is a real serial port (the line is then a fault relay)."""
        return self._gateway_fd is not None

    @property
    def plugged(self) -> bool:
        """Whether the gateway's adapter is plugged in."""
        return self._gateway is not None

    async def start(self) -> None:
        """Create both ptys and links and start carrying bytes."""
        self._loop = asyncio.get_running_loop()
        self._device = _PtyEnd()
        if self._device_link:
            _symlink(self._device_link, self._device.path)
        self._loop.add_reader(self._device.master, self._on_readable, False)
        self._plug()
        self._next_babble = self._loop.time() + self._babble_wait()
        self._service()

    async def stop(self) -> None:
        """Stop carrying bytes, remove the links and close both ptys."""
        if self._replug:
            self._replug.cancel()
            self._replug = None
        if self._timer:
            self._timer.cancel()
            self._timer = None
        if self._partial_timer:
            self._partial_timer.cancel()
            self._partial_timer = None
        self._unplug_end()
        if self._device is not None:
            if self._loop:
                self._loop.remove_reader(self._device.master)
                self._loop.remove_writer(self._device.master)
            if self._device_link:
                _unlink_if(self._device_link, self._device.path)
            self._device.close()
            self._device = None
        self._loop = None

    async def __aenter__(self) -> Rs485Line:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def unplug(self, seconds: float | None = None) -> None:
        """Pull the gateway's adapter: its open port breaks and its path disappears; back after `seconds`."""
        if self.real_port:
            raise RuntimeError("the gateway side is a real port: pull its adapter by hand")
        if self._link is None:
            raise RuntimeError("unplugging needs a link path: without one the gateway could not find the new pty")
        if self._gateway is None:
            return
        self.stats.unplugs += 1
        self._unplug_end()
        if seconds is not None:
            assert self._loop is not None
            self._replug = self._loop.call_later(seconds, self.replug)

    def replug(self) -> None:
        """Plug the gateway's adapter back in: a fresh pty behind the same path."""
        self._replug = None
        if self._gateway is None and self._loop is not None:
            self._plug()

    async def unplugged(self, seconds: float) -> None:
        """Unplug the adapter for `seconds`, then plug it back in."""
        self.unplug()
        try:
            await asyncio.sleep(seconds)
        finally:
            self.replug()

    def _plug(self) -> None:
        assert self._loop is not None
        self._gateway = _PtyEnd() if self._gateway_fd is None else _FdEnd(self._gateway_fd)
        self._gateway_path = self._gateway.path
        if self._link:
            _symlink(self._link, self._gateway.path)
        self._loop.add_reader(self._gateway.master, self._on_readable, True)

    def _unplug_end(self) -> None:
        end, self._gateway = self._gateway, None
        if end is None:
            return
        if self._loop:
            self._loop.remove_reader(end.master)
            self._loop.remove_writer(end.master)
        pending = self._pending.pop(end.master, None)
        if pending:
            self.stats.lost_unplugged += len(pending)
        if self._link:
            _unlink_if(self._link, end.path)
        # Closing the master (and our own slave fd) hangs up the gateway's open fd: reads fail with EIO.
        end.close()
        # What was on its way to or from the adapter is lost with it.
        kept: deque[tuple[float, bool, bytes]] = deque()
        for item in self._wire:
            if item[1]:
                self.stats.lost_unplugged += len(item[2])
            else:
                kept.append(item)
        self._wire = kept

    # --- the medium -----------------------------------------------------------------------------

    def _on_readable(self, from_gateway: bool) -> None:
        end = self._gateway if from_gateway else self._device
        if end is None:
            return
        try:
            data = os.read(end.master, 4096)
        except OSError as exc:
            if exc.errno == errno.EIO and isinstance(end, _FdEnd):
                self._port_lost(end, str(exc))
                return
            if exc.errno in (errno.EAGAIN, errno.EIO):
                return
            raise
        if not data:
            if isinstance(end, _FdEnd):
                self._port_lost(end, "end of file (hung up)")
            return
        assert self._loop is not None
        if isinstance(end, _FdEnd):
            # A real port hands a frame over in pieces: gather them until they make a frame whose CRC
            # checks (a clean request goes on at once) or until the port has been quiet for frame_gap.
            self._partial += data
            if self._partial_timer:
                self._partial_timer.cancel()
                self._partial_timer = None
            if len(self._partial) >= 4 and _modbus_crc(self._partial) == 0:
                self._frame_ended()
            else:
                self._partial_timer = self._loop.call_later(self.frame_gap, self._frame_ended)
            return
        self._intake(data, from_gateway, self._loop.time())
        self._service()

    def _frame_ended(self) -> None:
        self._partial_timer = None
        data, self._partial = bytes(self._partial), bytearray()
        if data and self._loop is not None:
            self._intake(data, True, self._loop.time())
            self._service()

    def _port_lost(self, end: _FdEnd, why: str) -> None:
        # A real adapter that went away stays readable with EIO for ever: stop watching it, say why once.
        assert self._loop is not None
        self._loop.remove_reader(end.master)
        self.port_error = f"{end.path}: {why}"
        log.error("the real port stopped carrying bytes: %s", self.port_error)

    def _intake(self, data: bytes, from_gateway: bool, now: float) -> None:
        if from_gateway and self.count_requests:
            self.requests[data] = self.requests.get(data, 0) + 1
        f, rng = self.faults, self._rng
        release, held, late = now, False, False
        if f.latency or f.jitter:
            release += f.latency + (rng["latency"].uniform(0, f.jitter) if f.jitter else 0.0)
            self.stats.delayed_frames += 1
            held = True
        if not from_gateway and f.late_rate and (f.late_units is None or data[0] in f.late_units):
            if rng["late"].random() < f.late_rate:
                release += f.late_delay + (rng["late"].uniform(0, f.late_spread) if f.late_spread else 0.0)
                self.stats.late_replies += 1
                held = late = True
        if f.truncate_rate and len(data) > 1 and rng["truncate"].random() < f.truncate_rate:
            data = data[: rng["truncate"].randrange(1, len(data))]
            self.stats.truncated_frames += 1
        chars: list[int | None] = list(data)
        if f.flip_rate:
            r = rng["flip"]
            for i, c in enumerate(chars):
                if r.random() < f.flip_rate:
                    chars[i] = c ^ (1 << r.randrange(8))  # type: ignore[operator]
                    self.stats.flipped_bytes += 1
        if f.drop_rate:
            r = rng["drop"]
            for i in range(len(chars)):
                if r.random() < f.drop_rate:
                    chars[i] = None
                    self.stats.dropped_bytes += 1
        source = "gateway" if from_gateway else "device"
        self._hold(_Frame(release, self._seq, not from_gateway, source, chars, held, late, now))

    def _hold(self, frame: _Frame) -> None:
        self._seq += 1
        frame.seq = self._seq
        heapq.heappush(self._held, frame)

    def _babble_wait(self) -> float:
        rate = self.faults.babble_rate
        return self._rng["babble"].expovariate(rate) if rate > 0 else 3600.0

    def _service(self) -> None:
        """Put released frames on the wire and deliver every byte that is due; then sleep until the next."""
        if self._loop is None:
            return
        now = self._loop.time()
        while self._next_babble <= now:
            if self.faults.babble_rate > 0:
                r = self._rng["babble"]
                n = r.randint(1, max(1, self.faults.babble_max))
                chars: list[int | None] = [r.randrange(256) for _ in range(n)]
                self._hold(_Frame(self._next_babble, 0, True, "babble", chars, True, sent=self._next_babble))
                self.stats.babble_bursts += 1
                self.stats.babble_bytes += n
            self._next_babble += self._babble_wait()
        while self._held and self._held[0].release <= now:
            self._schedule(heapq.heappop(self._held))
        self._deliver(now)
        nxt = min(
            self._held[0].release if self._held else now + 3600.0,
            self._wire[0][0] if self._wire else now + 3600.0,
            self._next_babble,
        )
        if self._timer is None or self._timer_at != nxt:
            if self._timer:
                self._timer.cancel()
            self._timer_at = nxt
            self._timer = self._loop.call_at(nxt, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._service()

    def _schedule(self, frame: _Frame) -> None:
        # Times are the frame's own deadlines, not "now": a late wake-up must not stretch the wire.
        quiet = self._free_at
        continued = False
        # Only a transmitter that is still sending continues its frame; after a held (late) frame
        # the next one is another answer and gets its own silence.
        if frame.source == self._last_source and not frame.held and not self._last_held and frame.release <= quiet:
            start = quiet  # the same transmitter still sending: one frame, no gap
            continued = True
        elif frame.source == "device":
            start = max(frame.release, quiet + self.t35)  # the slave waits for the end-of-frame silence
        else:
            start = max(frame.release, quiet)
            if frame.source == "gateway" and quiet > 0 and start < quiet + self.t35 - 1e-6:
                self.stats.short_gaps += 1
        if not frame.to_gateway and self._device is None:
            return
        if frame.late and frame.chars and frame.chars[0] is not None and frame.chars[0] != self._last_unit:
            self.stats.late_cross_unit += 1
        elif frame.source == "gateway" and frame.chars and frame.chars[0] is not None:
            self._last_unit = frame.chars[0]
        self._last_source = frame.source
        self._last_held = frame.held
        t = start + len(frame.chars) * self.char_time
        if frame.to_gateway:
            # The gateway gets each character when its stop bit has passed, as from a UART.
            for k, c in enumerate(frame.chars, 1):
                self._wire.append((start + k * self.char_time, True, b"" if c is None else bytes((c,))))
        else:
            # The device side gets a frame whole at its end: a slave's framer hands a frame on after
            # t3.5 of silence and starts afresh with the next. pymodbus' server has no such timer: fed
            # byte by byte, one stray byte would misalign its buffer for good. Frames less than t3.5
            # apart are one frame to a slave, so they reach it as one.
            payload = bytes(c for c in frame.chars if c is not None)
            last = self._wire[-1] if self._wire else None
            if last is not None and not last[1] and start - last[0] < self.t35 - 1e-9:
                self._wire.pop()
                payload = last[2] + payload
            self._wire.append((t, False, payload))
        self._free_at = t
        self.stats.wire_seconds += t - start
        if self.frame_log is not None:
            self._log_frame(frame, start, t, continued)
        if frame.to_gateway:
            self.stats.frames_to_gateway += 1
        else:
            self.stats.frames_to_device += 1

    def _log_frame(self, frame: _Frame, start: float, end: float, continued: bool) -> None:
        assert self.frame_log is not None
        data = bytes(c for c in frame.chars if c is not None)
        if continued and self.frame_log and self.frame_log[-1].source == frame.source:
            # A chunk of the frame still on the wire: one frame in the log, as on the wire.
            last = self.frame_log.pop()
            self.frame_log.append(FrameRecord(last.source, last.sent, last.start, end, last.data + data))
            return
        self.frame_log.append(FrameRecord(frame.source, frame.sent, start, end, data))

    def _deliver(self, now: float) -> None:
        out: dict[bool, bytearray] = {True: bytearray(), False: bytearray()}
        wire = self._wire
        while wire and wire[0][0] <= now:
            _, to_gateway, chunk = wire.popleft()
            out[to_gateway] += chunk
        for to_gateway, data in out.items():
            if not data:
                continue
            end = self._gateway if to_gateway else self._device
            if end is None:
                self.stats.lost_unplugged += len(data)
                continue
            if to_gateway:
                self.stats.bytes_to_gateway += len(data)
            else:
                self.stats.bytes_to_device += len(data)
            self._write(end.master, bytes(data))

    def _write(self, fd: int, data: bytes) -> None:
        pending = self._pending.get(fd)
        if pending is not None:
            self._extend(pending, data)
            return
        try:
            n = os.write(fd, data)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            n = len(data)  # nobody on the other end: the bytes fall off the line, as on a real bus
        if n < len(data):
            pending = bytearray()
            self._extend(pending, data[n:])
            self._pending[fd] = pending
            assert self._loop is not None
            self._loop.add_writer(fd, self._flush, fd)

    def _extend(self, pending: bytearray, data: bytes) -> None:
        # A side that stopped reading must not make the line hold bytes without bound.
        room = PENDING_MAX - len(pending)
        pending.extend(data[:room])
        self.stats.overflow_bytes += max(0, len(data) - room)

    def _flush(self, fd: int) -> None:
        pending = self._pending.get(fd)
        if pending is None:
            return
        try:
            n = os.write(fd, pending)
        except BlockingIOError:
            return
        del pending[:n]
        if not pending:
            del self._pending[fd]
            assert self._loop is not None
            self._loop.remove_writer(fd)

    # --- figures --------------------------------------------------------------------------------

    def transaction_time(self, request_bytes: int, response_bytes: int) -> float:
        """Seconds one request/response pair holds this line: both frames' characters and two t3.5 silences
        (before the slave may answer, and before the next request), by the line's own arithmetic."""
        chars = (request_bytes + response_bytes) * self.format.bits / self.baudrate
        return chars + 2 * t35(self.baudrate, self.format.bits)

    def describe(self) -> str:
        """One human line: the line's settings and the faults switched on."""
        extras = ("late_delay", "late_spread", "babble_max")
        on = {k: v for k, v in asdict(self.faults).items() if v and k not in extras}
        if self.faults.late_rate:
            on["late_delay"] = self.faults.late_delay
            on["late_spread"] = self.faults.late_spread
        if self.faults.babble_rate:
            on["babble_max"] = self.faults.babble_max
        faults = ", ".join(f"{k}={v}" for k, v in on.items()) or "no faults"
        if not self.pace:
            return (
                f"{self.baudrate} baud {self.format}, no wire timing (the wire is real; frames end after "
                f"{self.frame_gap * 1000:.1f} ms of silence), seed {self.seed}, {faults}"
            )
        return (
            f"{self.baudrate} baud {self.format} ({self.format.bits} bits/char, t3.5 {self.t35 * 1000:.2f} ms), "
            f"seed {self.seed}, {faults}"
        )


def _symlink(link: Path, target: str) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    link.symlink_to(target)


def _unlink_if(link: Path, target: str) -> None:
    # Only our own link: a second line started on the same path must not lose it to our stop.
    with contextlib.suppress(OSError):
        if link.is_symlink() and os.readlink(link) == target:
            link.unlink()


# --- command line -----------------------------------------------------------------------------------


def _units(text: str) -> frozenset[int]:
    units: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        units.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(units)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of `python -m hil.line`."""
    p = argparse.ArgumentParser(
        prog="python -m hil.line",
        description="A baud-accurate, fault-injecting RS-485 line between two ptys (see hil/README.md).",
    )
    p.add_argument("--link", required=True, help="symlink the gateway opens, e.g. ./ttyHIL")
    p.add_argument("--device-link", help="symlink a Modbus slave opens (default: print the pty path)")
    p.add_argument("--baud", type=int, default=9600)
    p.add_argument("--format", default="8E1", help="timing model's frame format (the ptys carry 8N1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flip-rate", type=float, default=0.0, help="bit flips per byte")
    p.add_argument("--drop-rate", type=float, default=0.0, help="dropped bytes per byte")
    p.add_argument("--truncate-rate", type=float, default=0.0, help="truncated frames per frame")
    p.add_argument("--latency", type=float, default=0.0, help="seconds added before every frame")
    p.add_argument("--jitter", type=float, default=0.0, help="up to this many seconds more per frame")
    p.add_argument("--late-rate", type=float, default=0.0, help="late replies per device frame")
    p.add_argument("--late-delay", type=float, default=0.5, help="seconds a late reply is held")
    p.add_argument("--late-spread", type=float, default=0.0, help="up to this many seconds more per late reply")
    p.add_argument("--late-units", type=_units, help="only these unit ids answer late, e.g. 1,3-5")
    p.add_argument("--babble-rate", type=float, default=0.0, help="babble bursts per second")
    p.add_argument("--babble-max", type=int, default=8, help="bytes per babble burst, at most")
    p.add_argument("--unplug-every", type=float, help="pull the gateway's adapter every N seconds")
    p.add_argument("--unplug-for", type=float, default=2.0, help="seconds the adapter stays out")
    p.add_argument(
        "--serve",
        type=_units,
        metavar="UNITS",
        help="run Modbus slaves for these units on the device side: holding register i of unit u holds u*1000+i",
    )
    p.add_argument("--registers", type=int, default=10, help="holding registers per served unit")
    p.add_argument("--stats-every", type=float, default=0.0, help="print the counters every N seconds")
    return p.parse_args(argv)


def faults_of(args: argparse.Namespace) -> Faults:
    """The faults a command line asks for."""
    return Faults(
        flip_rate=args.flip_rate,
        drop_rate=args.drop_rate,
        truncate_rate=args.truncate_rate,
        latency=args.latency,
        jitter=args.jitter,
        late_rate=args.late_rate,
        late_delay=args.late_delay,
        late_spread=args.late_spread,
        late_units=args.late_units,
        babble_rate=args.babble_rate,
        babble_max=args.babble_max,
    )


async def run(args: argparse.Namespace) -> None:
    """Run a line until SIGINT or SIGTERM, with slaves on its device side when asked."""
    # Imported here: the line itself needs no pymodbus.
    from drivers.modbus.codec import PointCodec
    from drivers.sim.modbus import ModbusSimulator, SimPoint, SimSlave
    from drivers.sim.waves import Wave

    line = Rs485Line(
        args.link,
        baudrate=args.baud,
        frame_format=args.format,
        faults=faults_of(args),
        seed=args.seed,
        device_link=args.device_link,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await line.start()
    sim: ModbusSimulator | None = None
    tasks: list[asyncio.Task[None]] = []
    try:
        print(f"line: {line.describe()}", flush=True)
        print(f"gateway side: {line.gateway_port} (open it 8N1)   device side: {line.device_port}", flush=True)
        if args.serve:
            codec = PointCodec("uint16")
            slaves = [
                SimSlave(
                    u,
                    [
                        SimPoint(f"r{i}", "holding", i, codec, Wave(value=(u * 1000 + i) & 0xFFFF))
                        for i in range(args.registers)
                    ],
                )
                for u in sorted(args.serve)
            ]
            sim = ModbusSimulator(line.device_port, slaves, baudrate=args.baud)
            await sim.start()
            print(f"serving units {','.join(map(str, sorted(args.serve)))}: holding 0..{args.registers - 1}")

        async def unplugger() -> None:
            while True:
                await asyncio.sleep(args.unplug_every)
                print(f"unplugged for {args.unplug_for:g} s", flush=True)
                await line.unplugged(args.unplug_for)
                print("plugged in", flush=True)

        async def reporter() -> None:
            while True:
                await asyncio.sleep(args.stats_every)
                print(_stats_line(line.stats), flush=True)

        if args.unplug_every:
            tasks.append(asyncio.create_task(unplugger()))
        if args.stats_every:
            tasks.append(asyncio.create_task(reporter()))
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        if sim:
            await sim.stop()
        await line.stop()
        print(_stats_line(line.stats), flush=True)


def _stats_line(stats: LineStats) -> str:
    return " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in asdict(stats).items())


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m hil.line`."""
    args = parse_args(argv)
    try:
        FrameFormat.parse(args.format)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
