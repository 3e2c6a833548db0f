"""Guessing MCP logins: wrong tokens are counted, logged without flooding the log, and banned per address."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml
from hostile import GATEWAY_ROOT, TOKENS, McpPeer, StartGateway, gateway_config, good_device, nack_code

from drivers.mcp.codec import FrameType

from helpers import free_port

AUTH_LINE = re.compile(r" WARNING .*(auth|token|login)", re.IGNORECASE)


async def wrong_hello(port: int, device_id: str = "pump-1", source: str = "127.0.0.1") -> int | None:
    """One connection that says HELLO with a wrong token; the NACK code (None if closed before answering)."""
    peer = await McpPeer.open(port, source)
    try:
        answer = await peer.hello(device_id, token="not-the-right-token-at-all")
    except ConnectionError:
        return None
    finally:
        peer.close()
    return nack_code(answer)


async def test_wrong_tokens_are_counted_on_metrics_and_logged_at_warning_once_a_minute_per_address(
    start_gateway: StartGateway,
) -> None:
    # The ban is out of the way here (see the next test): 20 failures from one address all reach the check.
    gw = await start_gateway(mcp={"auth_ban_failures": 1000})
    codes = [await wrong_hello(gw.mcp_port) for _ in range(20)]
    assert codes == [7] * 20, codes
    assert await wrong_hello(gw.mcp_port, "no-such-device") == 7
    assert await gw.metric("fieldgate_mcp_auth_failures_total", reason="bad_token") == 20
    assert await gw.metric("fieldgate_mcp_auth_failures_total", reason="unknown_device") == 1
    await asyncio.sleep(0.5)
    warnings = [line for line in gw.log().splitlines() if AUTH_LINE.search(line)]
    # Seen, but once a minute per address: 21 failures from 127.0.0.1 within a second make one line.
    assert 1 <= len(warnings) <= 2, warnings
    assert "127.0.0.1" in warnings[0], warnings
    assert "not-the-right-token" not in gw.log()


async def test_ten_failed_logins_ban_the_address_for_auth_ban_time_while_other_addresses_log_in(
    start_gateway: StartGateway,
) -> None:
    # auth_ban_failures and auth_ban_window at their defaults (10 within 1 min); a short ban keeps the test fast.
    gw = await start_gateway(mcp={"auth_ban_time": "2s"})
    for i in range(10):
        assert await wrong_hello(gw.mcp_port) == 7, f"failure {i + 1} was not answered NACK 7"
    banned_at = time.monotonic()
    # Every test connection comes from loopback; a device on 127.0.0.2 (also loopback, bound as the socket's source
    # address) stands for "another address" and must not be caught by 127.0.0.1's ban.
    async with good_device(gw.mcp_port, "pump-2", source="127.0.0.2") as other:
        # The 11th connection from 127.0.0.1, even with the right token: closed at accept, nothing read or answered.
        peer = await McpPeer.open(gw.mcp_port)
        with_right_token = asyncio.create_task(peer.hello("pump-1"))
        done, _ = await asyncio.wait({with_right_token}, timeout=1.0)
        assert done, "a banned address's connection stayed open for a second"
        assert isinstance(with_right_token.exception(), ConnectionError), with_right_token
        peer.close()
        assert await gw.metric("fieldgate_mcp_refused_connections_total", reason="banned") == 1
        # Still banned a moment later.
        assert await wrong_hello(gw.mcp_port) is None
        # After auth_ban_time, the address is welcome again.
        await asyncio.sleep(max(0.0, banned_at + 2.3 - time.monotonic()))
        peer = await McpPeer.open(gw.mcp_port)
        try:
            answer = await peer.hello("pump-1")
        except ConnectionError:
            raise AssertionError("the ban outlived auth_ban_time: still closed at accept") from None
        assert answer.type == FrameType.ACK, answer
        peer.close()
        other.check(within=2.0, at_least=5)


def _run_cli(args: list[str], config: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(GATEWAY_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args, "-c", str(config)],
        cwd=GATEWAY_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_check_and_run_refuse_a_one_character_token(tmp_path: Path) -> None:
    cfg = gateway_config(
        tmp_path,
        mqtt_port=free_port(),
        mcp_port=free_port(),
        http_port=free_port(),
        devices={"pump-1": TOKENS["pump-1"], "pump-2": "x"},
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    for command in (["check"], ["run"]):
        done = _run_cli(command, path)
        out = done.stdout + done.stderr
        assert done.returncode == 2, (command, done.returncode, out)
        assert "at least 16 characters" in out, out
        assert "mcp.devices[1].token" in out, out
