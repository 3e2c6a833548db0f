"""What a session sends its peer: answers batched into one write per read, the bytes the peer leaves unread,
and the close that gives queued answers a moment to leave (docs/mcp.md §4.4, §8)."""

from __future__ import annotations

import asyncio
import contextlib

CLOSE_GRACE = 1.0  # seconds answers still queued get to leave when a session closes


class PeerOutput:
    """The bytes bound for one peer: those batched here and those in the transport's write buffer."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer  # its transport changes when TLS starts: always read through it
        self._parts: list[bytes] = []
        self._bytes = 0

    @property
    def unread(self) -> int:
        """Bytes for the peer not yet taken by it (our transport's write buffer and answers not yet written)."""
        return self.writer.transport.get_write_buffer_size() + self._bytes

    def add(self, wire: bytes) -> None:
        """Batch one frame's bytes for the next `flush`."""
        self._parts.append(wire)
        self._bytes += len(wire)

    def flush(self) -> None:
        """Write what is batched, in one write."""
        if not self._parts:
            return
        data = b"".join(self._parts)
        self._parts.clear()
        self._bytes = 0
        if not self.writer.is_closing():
            self.writer.write(data)

    def limit(self, max_unread: int) -> None:
        """Above a quarter of `max_unread` the transport asks us to pause: drain() then waits in the read loop."""
        high = max(1, max_unread // 4)
        with contextlib.suppress(Exception):
            self.writer.transport.set_write_buffer_limits(high=high, low=high // 4)

    async def close(self, max_unread: int, tls: bool) -> None:
        """Close the connection; answers queued get CLOSE_GRACE to leave if they are at most a quarter of
        `max_unread`, else the socket is dropped (`tls`: the session was to start TLS on it)."""
        transport = self.writer.transport
        unread = transport.get_write_buffer_size()
        if not transport.is_closing() and 0 < unread <= max_unread // 4:
            # Answers already queued get a moment to leave; a peer that left more unread gets nothing more.
            with contextlib.suppress(Exception):
                # drain() waits only while the buffer is above its high mark: at 0, until every byte left.
                transport.set_write_buffer_limits(high=0)
                await asyncio.wait_for(self.writer.drain(), CLOSE_GRACE)
        if transport.get_write_buffer_size():
            transport.abort()  # close() would hold the socket until a peer that never reads took it all
        else:
            self.writer.close()
        if not tls or self.writer.get_extra_info("ssl_object") is not None:
            # (A handshake that did not finish has no TLS transport left that would ever report closing.)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.wait_closed(), CLOSE_GRACE)
        # TLS close() waits for the peer's close_notify, up to asyncio's 30 s ssl shutdown timeout: a peer
        # that never sends it would hold the socket that long after the session left every count.
        self.writer.transport.abort()
