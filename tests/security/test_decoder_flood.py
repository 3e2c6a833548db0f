"""A resync flood cannot stall the gateway: a good device's DATA is ACKed within 1 s throughout.

Before HELLO the limits leave a flood no room (three bad candidates close it); after HELLO the decoder
itself must keep the flood linear.

The flood is the issue's: header after header, each claiming a payload that ends at the end of the
buffer, none with a good CRC. A decoder that re-checks the CRC over the rest of the buffer for every
candidate header does quadratic work on the event loop, and every device waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from drivers.mcp.codec import MAGIC, VERSION, DecodeError, Frame, FrameType, NackCode, encode

from configs import broker, config, mcp_device, write
from configs import mcp as mcp_section  # `mcp` is the port below
from helpers import GatewayProcess, free_port, now_ms
from mcp_peer import RawPeer

ROOT = Path(__file__).parents[2]
GOOD_TOKEN = "good-device-token-0001"
SECOND_TOKEN = "second-device-token-02"
ACK_BOUND = 1.0  # seconds: generous for one DATA frame on loopback, far below what the flood cost before


def resync_flood(size: int, frame_type: FrameType, seq: int, step: int = 14, longest: int | None = None) -> bytes:
    """`size` bytes of headers every `step` bytes, each announcing a payload that ends where the buffer ends.

    With `longest`, no header announces more than that (so that each stays within a payload limit).

    One of thousands of candidates may pass its CRC by chance (1 in 65,536 each); `frame_type` is chosen so that
    such a frame is answered and the session goes on (a HELLO with a binary payload: NACK 5; a HEARTBEAT: ACK).
    """
    out = bytearray(size)
    start = MAGIC + bytes([VERSION, frame_type]) + seq.to_bytes(4, "big")
    for at in range(0, size - 16, step):
        length = size - at - 16  # payload to the end, less the CRC's two bytes
        if longest is not None:
            length = min(length, longest)
        out[at : at + 14] = start + length.to_bytes(4, "big")
    return bytes(out)


class GoodDevice:
    """An authenticated device that sends DATA every `interval` and records how long each ACK took."""

    def __init__(self, peer: RawPeer, interval: float = 0.05) -> None:
        self.peer = peer
        self.interval = interval
        self.latencies: list[float] = []
        self.seq = 1
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    async def one(self) -> float:
        """Send one DATA frame and wait for its ACK; the time it took (the bound's doubled as a timeout)."""
        self.seq += 1
        body = {"ts": now_ms(), "values": {"n": self.seq}}
        sent = time.monotonic()
        await self.peer.send(Frame.json(FrameType.DATA, self.seq, body))
        try:
            answer = await self.peer.recv(timeout=10 * ACK_BOUND)
        except TimeoutError:
            answer = None
        took = time.monotonic() - sent
        self.latencies.append(took)
        assert answer is not None and (answer.type, answer.seq) == (FrameType.ACK, self.seq), answer
        return took

    async def _run(self) -> None:
        while not self._stopping:
            took = await self.one()
            if took > ACK_BOUND:
                return  # the test fails on it; stop loading a gateway that is already stuck
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        """Keep sending until stopped."""
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop sending once the frame in flight is answered, so that its wait counts too (failures raise here)."""
        assert self._task is not None
        self._stopping = True
        await self._task


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path) -> AsyncIterator[int]:
    """`fieldgate run` with an embedded broker and two MCP devices; yields its MCP port."""
    mqtt, mcp = free_port(), free_port()
    devices = [mcp_device("good-1", token=GOOD_TOKEN), mcp_device("second-1", token=SECOND_TOKEN)]
    path = write(config(id="sec1", broker=broker(mqtt), mcp=mcp_section(mcp, devices=devices)), tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # A stuck event loop does not see SIGTERM: a short stop timeout keeps a failing run short.
    with GatewayProcess(
        ["run", "-c", str(path)], tmp_path / "gateway.log", cwd=tmp_path, env=env, stop_timeout=5
    ) as gw:
        await gw.logged("fieldgate sec1 up")
        yield mcp
        assert gw.proc.poll() is None, gw.output()
    assert "Traceback" not in gw.output(), gw.output()


async def connect(port: int) -> RawPeer:
    """A raw MCP connection to the gateway."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return RawPeer(reader, writer)


@contextlib.asynccontextmanager
async def good_device(port: int) -> AsyncIterator[GoodDevice]:
    """The well-behaved device, logged in, answered once before the attack starts."""
    peer = await connect(port)
    answer = await peer.hello(device_id="good-1", token=GOOD_TOKEN)
    assert answer.type == FrameType.ACK, answer
    device = GoodDevice(peer)
    assert await device.one() < ACK_BOUND
    try:
        yield device
    finally:
        peer.close()


async def drain(peer: RawPeer, until: float) -> list[Frame | DecodeError]:
    """What the gateway sends `peer` until it closes or the monotonic time `until` (read, so it never backs up)."""
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(max(until - time.monotonic(), 0)):
            while data := await peer.reader.read(65536):
                peer.frames.extend(peer.decoder.feed(data))
    return peer.frames


async def test_pre_hello_resync_flood_is_closed_after_max_hello_errors_and_delays_no_one(tmp_path: Path) -> None:
    # Before HELLO a resync flood can do little work by design: headers must stay within max_hello_payload (4 KiB;
    # longer: NACK 3 and close at once) and the third bad CRC closes the connection (max_hello_errors), so at most
    # three candidates are ever checked. This checks those bounds hold under a flood that respects the payload
    # limit; the decoder's own work per candidate is tested by the authenticated flood below.
    async with gateway(tmp_path) as port, good_device(port) as device:
        device.start()
        attacker = await connect(port)
        await attacker.send(resync_flood(280_000, FrameType.HELLO, seq=1, longest=4096))
        until = time.monotonic() + 3
        events = await drain(attacker, until)
        closed_early = time.monotonic() < until
        attacker.close()
        await asyncio.sleep(max(until - time.monotonic(), 0))
        await device.stop()
        assert closed_early, "the flooding connection was not closed"
        assert [(f.type, f.seq, f.body()["code"]) for f in events if isinstance(f, Frame)] == [
            (FrameType.NACK, 1, NackCode.CRC_MISMATCH)
        ] * 3, events
        assert max(device.latencies) < ACK_BOUND, f"slowest ACK {max(device.latencies):.2f} s"
        assert len(device.latencies) >= 20


async def test_authenticated_resync_flood_does_not_delay_another_devices_ack(tmp_path: Path) -> None:
    async with gateway(tmp_path) as port, good_device(port) as device:
        attacker = await connect(port)
        answer = await attacker.hello(device_id="second-1", token=SECOND_TOKEN)
        assert answer.type == FrameType.ACK, answer
        device.start()
        # 1 MiB of false starts (the gateway's default max_payload), then a frame that is fine: the session
        # answers every false start and then the heartbeat, so everything was decoded.
        heartbeat = encode(Frame(FrameType.HEARTBEAT, 99))
        await attacker.send(resync_flood(1024 * 1024 - len(heartbeat), FrameType.HEARTBEAT, seq=7) + heartbeat)
        frames = await drain_until_ack(attacker, 99, time.monotonic() + 10)
        attacker.close()
        await asyncio.sleep(0.5)  # and the good device still gets its ACKs after the session goes on
        await device.stop()
        assert max(device.latencies) < ACK_BOUND, f"slowest ACK {max(device.latencies):.2f} s"
        assert len(device.latencies) >= 10
        nacks = [f for f in frames if f.type == FrameType.NACK]
        assert nacks and all(f.body()["code"] == NackCode.CRC_MISMATCH and f.seq == 7 for f in nacks)


async def drain_until_ack(peer: RawPeer, seq: int, until: float) -> list[Frame]:
    """The frames the gateway sends `peer` up to and including the ACK of `seq` (which must come before `until`)."""
    received: list[Frame] = []
    async with asyncio.timeout(max(until - time.monotonic(), 0)):
        while True:
            data = await peer.reader.read(65536)
            assert data, "the gateway closed the authenticated session"
            for event in peer.decoder.feed(data):
                assert isinstance(event, Frame), event
                received.append(event)
                if (event.type, event.seq) == (FrameType.ACK, seq):
                    return received
