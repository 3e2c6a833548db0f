"""Refused broker logins on /metrics of a real `fieldgate run`, with the broker on the gateway's loop (`inline`) and
in its child process (`separate`, the default), where the refusals are counted in the child."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridge.broker_users import LOGIN_FAILURES, set_password

from configs import broker, config, write
from helpers import GatewayProcess, free_port, mqtt_login, until

ROOT = Path(__file__).resolve().parents[2]
NOT_AUTHORIZED = 5  # CONNACK return code (MQTT 3.1.1)


async def refusals(http: aiohttp.ClientSession, url: str) -> dict[str, float] | None:
    """fieldgate_broker_auth_failures_total by reason from one scrape (None: not on /metrics)."""
    async with http.get(url) as resp:
        assert resp.status == 200
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        if family.name == "fieldgate_broker_auth_failures":
            return {s.labels["reason"]: s.value for s in family.samples if s.name.endswith("_total")}
    return None


def broker_child(gateway_pid: int) -> int:
    """The pid of the gateway's broker child."""
    children = Path(f"/proc/{gateway_pid}/task/{gateway_pid}/children").read_text().split()
    brokers = [int(c) for c in children if b"bridge.broker_process" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(brokers) == 1, children
    return brokers[0]


@pytest.mark.parametrize("process", ["inline", "separate"])
async def test_refused_broker_logins_are_on_metrics_wherever_the_broker_runs(tmp_path: Path, process: str) -> None:
    set_password(tmp_path / "users", "alice", "pw-alice")
    mqtt, web = free_port(), free_port()
    write(config(id="logins", http=f"127.0.0.1:{web}", broker=broker(mqtt, process=process, users="users")), tmp_path)
    url = f"http://127.0.0.1:{web}/metrics"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with GatewayProcess(["run", "-c", "config.yaml"], tmp_path / "gateway.log", cwd=tmp_path, env=env) as gw:
        async with aiohttp.ClientSession() as http:

            async def up() -> bool:
                try:
                    async with http.get(url) as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False

            for _ in range(600):
                if await up():
                    break
                assert gw.proc.poll() is None, gw.output()
                await asyncio.sleep(0.1)
            expected = dict.fromkeys(LOGIN_FAILURES, 0)
            assert await refusals(http, url) == expected

            async def refuse(wrong: dict[str, int]) -> None:
                for reason, times in wrong.items():
                    user, password = {
                        "anonymous": (None, None),
                        "unknown_user": ("mallory", "x"),
                        "bad_password": ("alice", "wrong"),
                    }[reason]
                    for _ in range(times):
                        assert await mqtt_login(mqtt, user, password) == NOT_AUTHORIZED
                    expected[reason] += times
                assert await mqtt_login(mqtt, "alice", "pw-alice") == 0  # let in, not counted

            async def shown() -> dict[str, float] | None:
                counts = await refusals(http, url)
                return counts if counts == expected else None

            async def until_shown(what: str) -> None:
                seen: dict[str, float] | None = None
                for _ in range(300):
                    seen = await shown()
                    if seen is not None:
                        return
                    assert gw.proc.poll() is None, gw.output()
                    await asyncio.sleep(0.1)
                raise AssertionError(f"{what}: /metrics shows {await refusals(http, url)}, expected {expected}")

            await refuse({"anonymous": 1, "unknown_user": 1, "bad_password": 3})
            await until_shown("the refusals")
            if process == "separate":
                # A counter never goes down: a broker child started again counts from zero, the gateway does not.
                child = broker_child(gw.proc.pid)
                os.kill(child, signal.SIGKILL)
                await until(lambda: _restarted(gw.proc.pid, child), 60, "the broker child to be started again")
                await gw.logged(f"embedded broker (process {broker_child(gw.proc.pid)}) listening", 60)
                await refuse({"bad_password": 2})
                await until_shown("the refusals across a restart of the broker child")
        assert gw.stop() == 0, gw.output()


def _restarted(gateway_pid: int, old: int) -> bool:
    try:
        return broker_child(gateway_pid) != old
    except (AssertionError, OSError):
        return False
