"""Fixtures: a gateway with MCP enabled on the test broker, and raw MCP connections to it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.config import load_config

import configs
from helpers import Subscriber, free_port
from mcp_peer import McpGateway, RawPeer, mcp_gateway_config


@pytest.fixture
def mcp_config() -> dict[str, object]:
    """Keys of the MCP test gateway's `mcp` section (tests may change them before `mcp_gateway` starts)."""
    return {"max_sessions": 100}


@pytest.fixture
async def mcp_gateway(tmp_path: Path, mcp_config: dict[str, object]) -> AsyncIterator[McpGateway]:
    """A gateway with an MCP server and its embedded broker, on free ports."""
    mqtt, mcp = free_port(), free_port()
    path = configs.write(mcp_gateway_config(mqtt, mcp, **mcp_config), tmp_path / "config.yaml")
    gw = Gateway(load_config(path))
    await gw.start()
    sub = Subscriber(mqtt)
    await asyncio.to_thread(sub.start)
    try:
        yield McpGateway(gw, mqtt, mcp, sub)
    finally:
        sub.stop()
        await gw.stop()


@pytest.fixture
async def connect(mcp_gateway: McpGateway) -> AsyncIterator[Callable[..., Awaitable[RawPeer]]]:
    """Open raw MCP connections to the test gateway; all are closed at the end."""
    peers: list[RawPeer] = []

    async def open_peer(**kw: object) -> RawPeer:
        reader, writer = await asyncio.open_connection("127.0.0.1", mcp_gateway.mcp_port, **kw)  # type: ignore[arg-type]
        peer = RawPeer(reader, writer)
        peers.append(peer)
        return peer

    yield open_peer
    for peer in peers:
        peer.close()
