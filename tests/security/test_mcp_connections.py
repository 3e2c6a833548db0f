"""Connections that never log in, and one that never reads: bounded in time, number and memory."""

from __future__ import annotations

import asyncio
import contextlib
import time

from hostile import McpPeer, StartGateway, good_device

from drivers.mcp.codec import Frame, FrameType, encode

# Every connection comes from loopback; 127.0.0.0/8 is all loopback on Linux, so binding the client socket's
# source address to 127.0.x.y makes "another address" without another host.


def bad_crc_frame(seq: int, payload: bytes = b"") -> bytes:
    """A DATA frame whose CRC is wrong: answered NACK 1, and (before HELLO) counted as an error."""
    wire = bytearray(encode(Frame(FrameType.DATA, seq, payload)))
    wire[-1] ^= 0xFF
    return bytes(wire)


async def slowloris(port: int, source: str, every: float, give_up: float) -> float | None:
    """Connect, never say HELLO, send a bad-CRC frame every `every` s; seconds until the gateway closed (None: not
    within `give_up` s). The NACKs are read, so that only the HELLO deadline can close it."""
    opened = time.monotonic()
    peer = await McpPeer.open(port, source, timeout=10)
    seq = 0
    try:
        while time.monotonic() - opened < give_up:
            seq += 1
            with contextlib.suppress(ConnectionError, OSError):
                await peer.send(bad_crc_frame(seq))
            if await peer.closed(min(every, give_up - (time.monotonic() - opened))):
                return time.monotonic() - opened
        return None
    finally:
        peer.close()


async def test_200_connections_that_never_say_hello_are_all_closed_within_11_s_at_the_defaults(
    start_gateway: StartGateway,
) -> None:
    gw = await start_gateway()  # hello_timeout 10 s, max_pending 256, max_pending_per_ip 32: the defaults
    # 20 per address over 10 addresses: under max_pending_per_ip, so that the HELLO deadline is what closes them.
    sources = [f"127.0.1.{1 + i % 10}" for i in range(200)]
    async with good_device(gw.mcp_port, "pump-1", source="127.0.0.2") as good:
        lifetimes = await asyncio.gather(*(slowloris(gw.mcp_port, s, every=2.0, give_up=14.0) for s in sources))
        good.check(within=2.0, at_least=20)
    still_open = sum(1 for t in lifetimes if t is None)
    assert still_open == 0, f"{still_open} of 200 were still open after 14 s"
    longest = max(t for t in lifetimes if t is not None)
    assert longest <= 11.0, f"a connection without HELLO lived {longest:.1f} s"


async def test_the_hello_deadline_runs_from_accept_and_no_frame_restarts_it(start_gateway: StartGateway) -> None:
    # max_hello_errors out of the way: here only the deadline may close the connection.
    gw = await start_gateway(mcp={"hello_timeout": "2s", "max_hello_errors": 1000})
    lifetimes = await asyncio.gather(*(slowloris(gw.mcp_port, "127.0.0.1", every=0.5, give_up=6.0) for _ in range(5)))
    closed = [t for t in lifetimes if t is not None]
    assert len(closed) == len(lifetimes), lifetimes
    assert max(closed) <= 3.0, lifetimes


async def test_pending_connections_beyond_max_pending_per_ip_are_closed_at_once_and_others_log_in(
    start_gateway: StartGateway,
) -> None:
    gw = await start_gateway(mcp={"max_pending_per_ip": 4, "hello_timeout": "5s"})
    waiting = [await McpPeer.open(gw.mcp_port) for _ in range(4)]
    await asyncio.sleep(0.2)
    assert await gw.metric("fieldgate_mcp_pending_connections") == 4
    extra = [await McpPeer.open(gw.mcp_port) for _ in range(3)]
    # Closed at accept: end of stream at once, and nothing was sent on it.
    for peer in extra:
        assert await peer.closed(1.0), "a connection beyond max_pending_per_ip stayed open"
        assert not peer.events, peer.events
    for peer in waiting:
        assert not await peer.closed(0.05), "a connection within the limit was closed"
    assert await gw.metric("fieldgate_mcp_refused_connections_total", reason="max_pending_per_ip") == 3
    # Another address is not held up by 127.0.0.1's pending connections, and logs in.
    async with good_device(gw.mcp_port, "pump-2", source="127.0.0.2") as good:
        await asyncio.sleep(1.0)
        good.check(within=2.0, at_least=3)
    # A pending connection that logs in frees its place for the next one from its address.
    assert (await waiting[0].hello("pump-1")).type == FrameType.ACK
    late = await McpPeer.open(gw.mcp_port)
    assert not await late.closed(0.5), "the place a login freed was not given to the next connection"
    for peer in [*waiting, *extra, late]:
        peer.close()


async def test_a_peer_that_never_reads_its_nacks_is_closed_and_the_gateway_does_not_grow(
    start_gateway: StartGateway,
) -> None:
    gw = await start_gateway()  # max_unread at its default, 64 KiB
    flooder = await McpPeer.open(gw.mcp_port)
    # heartbeat_s 1: a session paused because its peer does not read is closed at its idle deadline (3 s) even when
    # its unread output stays between max_unread / 4 and max_unread; past max_unread it is closed at once.
    assert (await flooder.hello("pump-1", heartbeat_s=1)).type == FrameType.ACK
    # 4096 bad-CRC frames (64 KiB) per write, each answered by a ~50-byte NACK 1 that is never read.
    chunk = b"".join(bad_crc_frame(1 + i) for i in range(4096))
    rss_before = gw.rss_kib()
    closed_after: float | None = None
    async with good_device(gw.mcp_port, "pump-2") as good:
        started = time.monotonic()
        while time.monotonic() - started < 15.0:
            try:
                flooder.writer.write(chunk)
                # A gateway that stopped reading holds the drain: keep trying until it closes.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(flooder.writer.drain(), 0.5)
            except (ConnectionError, OSError):
                closed_after = time.monotonic() - started
                break
            if flooder.writer.transport.is_closing():
                closed_after = time.monotonic() - started
                break
        rss_after = gw.rss_kib()
        flooder.writer.transport.abort()
        # The flood may end within a second: the other device goes on a while longer, through and after it.
        await asyncio.sleep(max(0.0, started + 3.0 - time.monotonic()))
    growth_mib = (rss_after - rss_before) / 1024
    assert closed_after is not None, f"a peer that never reads was not closed in 15 s (RSS +{growth_mib:.1f} MiB)"
    assert growth_mib < 8, f"the gateway grew by {growth_mib:.1f} MiB holding one peer's unread NACKs"
    good.check(within=2.0, at_least=10)
    assert gw.alive()
