"""Secrets given as `${ENV}` (MCP tokens, sink passwords) stay out of `fieldgate check` and of the logs."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest

from drivers.mcp.codec import FrameType
from gateway.cli import main

from configs import Section, broker, config, mcp, mcp_device, sim_mcp, simulator, sink, write
from helpers import GatewayProcess, free_port
from mcp_peer import RawPeer

ROOT = Path(__file__).parents[2]
TOKEN = "tok-Q7zv-93kd-alpaca"
PASSWORD = "pw-X4mn-27hb-walrus"
ENV = {"FG_TEST_MCP_TOKEN": TOKEN, "FG_TEST_SINK_PASSWORD": PASSWORD}


def leaks(text: str) -> list[str]:
    """The secrets (or a tell-tale part of one) that `text` shows."""
    return [s for s in (TOKEN, PASSWORD, "alpaca", "walrus") if s in text]


def write_config(
    tmp_path: Path,
    sink_extra: Section | None = None,
    device_extra: Section | None = None,
    more_devices: list[Section] | None = None,
) -> tuple[Path, int, int]:
    """A config holding both secrets by reference; returns it with its MQTT and MCP ports."""
    mqtt, mcp_port = free_port(), free_port()
    local = sink("local", username="fieldgate", password="${FG_TEST_SINK_PASSWORD}", **(sink_extra or {}))
    pump = mcp_device("pump-1", token="${FG_TEST_MCP_TOKEN}", **(device_extra or {}))
    cfg = config(
        id="s1",
        broker=broker(mqtt),
        northbound=[local],
        mcp=mcp(mcp_port, devices=[pump, *(more_devices or [])]),
        simulator=simulator(mcp=[sim_mcp("pump-1", "200ms", {"running": {"value": True}})]),
    )
    return write(cfg, tmp_path), mqtt, mcp_port


def check(path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`fieldgate check -c path` with the secrets in the environment: exit code and everything printed."""
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    rc = main(["check", "-c", str(path)])
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_check_of_a_good_config_shows_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _, _ = write_config(tmp_path)
    rc, out = check(path, monkeypatch, capsys)
    assert rc == 0 and ": ok — " in out, out
    assert leaks(out) == []


@pytest.mark.parametrize(
    ("sink_extra", "device_extra", "more_devices", "expected"),
    [
        # The secret itself where a value of another type belongs.
        (
            {"keepalive": "${FG_TEST_SINK_PASSWORD}"},
            None,
            None,
            "northbound[0].keepalive: '${FG_TEST_SINK_PASSWORD}' is not a duration",
        ),
        (None, {"meta": "${FG_TEST_MCP_TOKEN}"}, None, "mcp.devices[0].meta: "),
        (None, {"points": "${FG_TEST_MCP_TOKEN} ${FG_TEST_SINK_PASSWORD}"}, None, "mcp.devices[0].points: "),
        # The key holding it of the wrong type.
        (None, None, [mcp_device("pump-2", token=["${FG_TEST_MCP_TOKEN}"])], "mcp.devices[1].token: "),
        # Credentials inside a URL, from the environment or written in.
        (
            {"url": "mqtt://fieldgate:${FG_TEST_SINK_PASSWORD}@broker.example.com"},
            None,
            None,
            "url must not carry credentials",
        ),
        ({"url": "mqtt://fieldgate:walrus@broker.example.com"}, None, None, "url must not carry credentials"),
        # A misspelt key next to it, and a second device reusing the id.
        ({"pasword": "${FG_TEST_SINK_PASSWORD}"}, None, None, "northbound[0].pasword: unknown key"),
        (None, None, [mcp_device("pump-1", token="${FG_TEST_MCP_TOKEN}x")], "mcp.devices[1].id: "),
    ],
)
def test_check_errors_near_a_secret_do_not_show_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    sink_extra: Section | None,
    device_extra: Section | None,
    more_devices: list[Section] | None,
    expected: str,
) -> None:
    path, _, _ = write_config(tmp_path, sink_extra, device_extra, more_devices)
    rc, out = check(path, monkeypatch, capsys)
    assert rc == 2, out
    assert expected in out, out
    assert leaks(out) == [], out


async def test_a_running_gateway_logs_no_secret_even_at_debug(tmp_path: Path) -> None:
    path, _, mcp = write_config(tmp_path)
    log_path = tmp_path / "stderr.log"
    env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT)}
    gw = GatewayProcess(["--debug", "run", "-c", str(path)], log_path, cwd=tmp_path, env=env)
    logged = gw.logged
    try:
        # Up: the sink logged in with the password, the simulated device with the token.
        await logged("sink local: connected")
        await logged("mcp pump-1: online")
        # Devices that get it nearly right: the wrong token starts with the right one; the right one, wrong id.
        for device_id, token in (("pump-1", TOKEN + "-x"), ("nobody", TOKEN)):
            reader, writer = await asyncio.open_connection("127.0.0.1", mcp)
            peer = RawPeer(reader, writer)
            answer = await peer.hello(device_id=device_id, token=token)
            assert answer.type == FrameType.NACK
            peer.close()
        await logged("authentication failed for 'nobody'")
    finally:
        with contextlib.suppress(TimeoutError):
            gw.stop()
    out = log_path.read_text(errors="replace")
    assert " DEBUG " in out  # the test ran at DEBUG, or it proves little
    assert leaks(out) == [], out
    for f in (tmp_path / "state").rglob("*"):
        if f.is_file() and f.suffix != ".sqlite":
            assert leaks(f.read_text(errors="replace")) == [], f
