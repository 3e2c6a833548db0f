"""MCP test helpers: the test gateway config and a raw peer that speaks exact bytes."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

from drivers.mcp.codec import DecodeError, Decoder, Frame, FrameType, encode
from gateway.app import Gateway

from configs import Section, broker, config, mcp, mcp_device
from helpers import Subscriber


def mcp_gateway_config(
    mqtt: int, mcp_port: int, *, max_sessions: int = 100, northbound: list[Section] | None = None, **mcp_keys: Any
) -> Section:
    """The MCP test gateway: pump-1 and pump-2 allowed, ACKs awaited 300 ms once, 4 kB frames at most."""
    devices = [mcp_device("pump-1"), mcp_device("pump-2", token="other-token-00002")]
    server = mcp(
        mcp_port,
        ack_timeout="300ms",
        retries=1,
        max_payload="4kB",
        max_sessions=max_sessions,
        **mcp_keys,
        devices=devices,
    )
    return config(id="m1", broker=broker(mqtt), northbound=northbound, mcp=server)


@dataclass
class McpGateway:
    """A running gateway, its ports and a subscriber on its broker."""

    gw: Gateway
    mqtt_port: int
    mcp_port: int
    sub: Subscriber


class RawPeer:
    """A device that writes exact bytes and reads back decoded frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = Decoder()
        self.frames: list[Frame | DecodeError] = []

    async def send(self, data: bytes | Frame) -> None:
        """Write raw bytes, or a frame encoded by the codec."""
        self.writer.write(encode(data) if isinstance(data, Frame) else data)
        await self.writer.drain()

    async def recv(self, timeout: float = 5.0) -> Frame:
        """The next frame from the gateway."""
        async with asyncio.timeout(timeout):
            while not self.frames:
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionError("closed by the gateway")
                self.frames.extend(self.decoder.feed(data))
        event = self.frames.pop(0)
        assert isinstance(event, Frame), event
        return event

    async def closed(self, timeout: float = 5.0) -> bool:
        """True once the gateway has closed the connection (frames before that are kept)."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    data = await self.reader.read(65536)
                    if not data:
                        return True
                    self.frames.extend(self.decoder.feed(data))
        except TimeoutError:
            return False
        except (ConnectionError, OSError):
            return True

    async def hello(
        self, device_id: str = "pump-1", token: str = "s3cret-token-0001", seq: int = 1, **extra: object
    ) -> Frame:
        """Say HELLO and return the gateway's answer."""
        body = {"boot_id": "b1", "device_id": device_id, "token": token, **extra}
        await self.send(Frame.json(FrameType.HELLO, seq, body))
        return await self.recv()

    def close(self) -> None:
        """Close the socket (an RST when unread data is pending is fine)."""
        with contextlib.suppress(Exception):
            self.writer.close()
