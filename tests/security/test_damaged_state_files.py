"""A whole `fieldgate run` process whose state files an SD card has damaged: it starts, serves and moves them aside.

Before, a spool file of random bytes made `fieldgate run` exit 1 (Modbus, MCP and the broker down, systemd
restarting it forever), and so did a users file of garbage.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from drivers.mcp.client import McpClient

from configs import Section, broker, config, mcp, mcp_device, sink, write
from helpers import GatewayProcess, free_port, now_ms, spool_rows

TOKEN = "s3cret-token-0001"


def write_config(
    tmp_path: Path, *, broker: Section | None = None, url: str | None = None, homeassistant: Section | None = None
) -> int:
    """config.yaml in tmp_path (no embedded broker unless `broker` is given); the MCP port."""
    mcp_port = free_port()
    cfg = config(
        id="sf",
        broker=broker or {"enabled": False},
        homeassistant=homeassistant,
        northbound=[sink("up", url, spool={"commit_window": "20ms"})],
        mcp=mcp(mcp_port, devices=[mcp_device("pump-1", token=TOKEN)]),
    )
    write(cfg, tmp_path)
    return mcp_port


async def one_acked_frame(port: int, ts: int) -> None:
    """MCP device pump-1 logs in and has one DATA frame ACKed."""
    client = McpClient("127.0.0.1", port, "pump-1", TOKEN, ack_timeout=5.0, backoff_start=0.1, backoff_max=0.5)
    await client.start()
    try:
        assert await client.wait_connected(20), f"no MCP session: {client.last_error}"
        await client.send({"n": 1}, ts=ts)
    finally:
        await client.stop()


def moved_aside(folder: Path, name: str) -> list[Path]:
    """The `<name>.corrupt-<unix seconds>` files in folder."""
    pattern = re.compile(re.escape(name) + r"\.corrupt-\d+")
    return [p for p in folder.iterdir() if pattern.fullmatch(p.name)]


async def test_a_spool_of_random_bytes_is_moved_aside_and_the_gateway_serves(tmp_path: Path) -> None:
    # The upstream is down (nobody listens): an ACK means the frame is committed to the fresh spool.
    mcp = write_config(tmp_path, url=f"mqtt://127.0.0.1:{free_port()}")
    spool = tmp_path / "state" / "spool" / "up.sqlite"
    spool.parent.mkdir(parents=True)
    garbage = os.urandom(64 * 1024)
    spool.write_bytes(garbage)
    log = tmp_path / "gateway.log"
    ts = now_ms()
    with GatewayProcess(["run", "-c", "config.yaml"], log, cwd=tmp_path, stop_timeout=10) as gw:
        await gw.logged("fieldgate sf up:", 20)
        await one_acked_frame(mcp, ts)
        assert gw.stop() == 0
    moved = moved_aside(spool.parent, "up.sqlite")
    assert len(moved) == 1 and moved[0].read_bytes() == garbage
    assert ("pump-1/telemetry", ts) in spool_rows(spool)
    assert re.search(r"ERROR .*corrupt.*" + re.escape(moved[0].name), gw.output()), gw.output()


async def test_a_users_file_and_a_discovery_state_of_garbage_are_moved_aside_and_the_gateway_serves(
    tmp_path: Path,
) -> None:
    port = free_port()
    users = tmp_path / "users"
    garbage = os.urandom(4096)
    users.write_bytes(garbage)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "homeassistant.json").write_bytes(b"\x00" * 512)
    embedded = broker(port, process="inline", users="users")
    mcp = write_config(tmp_path, broker=embedded, homeassistant={"enabled": True})
    log = tmp_path / "gateway.log"
    with GatewayProcess(["run", "-c", "config.yaml"], log, cwd=tmp_path, stop_timeout=10) as gw:
        await gw.logged("fieldgate sf up:", 20)
        await one_acked_frame(mcp, now_ms())  # the gateway's own sink still logs in to its broker
        assert gw.stop() == 0
    moved = moved_aside(tmp_path, "users")
    assert len(moved) == 1 and moved[0].read_bytes() == garbage
    text = users.read_text()
    assert "fieldgate passwd" in text and not [line for line in text.splitlines() if not line.startswith("#")]
    assert os.stat(users).st_mode & 0o777 == 0o600
    assert len(moved_aside(tmp_path / "state", "homeassistant.json")) == 1
