"""Writes and commands on a real gateway: limits, rate limits, and the audit log of every request."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.audit import AuditLog, AuditRecord
from gateway.config import load_config
from gateway.jsonsafe import loads_strict
from gateway.token_bucket import TokenBucket

from configs import (
    Section,
    broker,
    config,
    device,
    line,
    mcp,
    mcp_device,
    sim_line,
    sim_mcp,
    sim_slave,
    simulator,
    write,
)
from configs import (
    point as modbus_point,  # `point` is a loop variable below
)
from helpers import Received, Subscriber, free_port


def audit_config(port: int, mcp_port: int, audit_size: str) -> Section:
    """A fast-writing plc and a slow device on a simulated line, and an MCP pump allowed one command per 10 s."""
    plc = device(
        "plc",
        1,
        poll="200ms",
        write_rate=50,
        write_burst=50,
        points=[
            modbus_point("i16", "holding", 0, "int16"),
            modbus_point("sp", "holding", 50, "uint16", scale=0.5, writable=True, min=0, max=1000),
            modbus_point("target", "holding", 60, "float32", writable=True, min=-50, max=150),
        ],
    )
    slow = device(
        "slow",
        2,
        poll="200ms",
        write_rate=0.1,
        write_burst=2,
        points=[modbus_point("level", "holding", 0, writable=True)],
    )
    return config(
        audit={"max_size": audit_size, "backups": 2},
        broker=broker(port, process="inline"),
        buses=[line("line", "./ttyA", plc, slow)],
        mcp=mcp(mcp_port, devices=[mcp_device("pump-1", write_rate=0.1, write_burst=1)]),
        simulator=simulator(
            modbus=[sim_line("./ttyA", sim_slave(1), sim_slave(2))],
            mcp=[sim_mcp("pump-1", "200ms", {"running": {"value": True}})],
        ),
    )


Start = Callable[..., Awaitable[tuple[Gateway, Subscriber]]]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    """Starts the test config's gateway (with the audit size given) and a subscriber; stops both."""
    running: list[tuple[Gateway, Subscriber]] = []

    async def _start(audit_size: str = "1MB") -> tuple[Gateway, Subscriber]:
        port = free_port()
        path = write(audit_config(port, free_port(), audit_size), tmp_path)
        gw = Gateway(load_config(path))
        await gw.start()
        sub = Subscriber(port)
        running.append((gw, sub))
        await asyncio.to_thread(sub.start)
        return gw, sub

    try:
        yield _start
    finally:
        for gw, sub in running:
            sub.stop()
            await gw.stop()


def audit_lines(gw: Gateway, *, requests: bool = False) -> list[dict[str, Any]]:
    """The outcome records the gateway wrote (with `requests`, the `"stage": "request"` lines too), oldest first."""
    path = Path(gw.cfg.gateway.state_dir) / "audit.log"
    files = [path.with_name(f"audit.log.{n}") for n in (2, 1)] + [path]
    lines = [json.loads(line) for f in files if f.exists() for line in f.read_text().splitlines()]
    return lines if requests else [rec for rec in lines if "stage" not in rec]


async def last_audit(gw: Gateway, n: int = 1) -> list[dict[str, Any]]:
    """The last `n` outcome records (waiting briefly until there are `n`)."""
    deadline = time.monotonic() + 2
    while len(lines := audit_lines(gw)) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return lines[-n:]


def _sim(gw: Gateway):  # type: ignore[no-untyped-def]
    assert gw.simulation is not None
    return next(iter(gw.simulation.simulators.values()))


async def _online(sub: Subscriber, device: str) -> None:
    topic = f"fieldgate/t1/{device}/status"
    await sub.wait_for(lambda ms: any(m.topic == topic and m.payload == b"online" for m in ms))


async def results(sub: Subscriber, topic: str, n: int, after: float) -> list[Received]:
    """The first `n` messages on `topic` received after monotonic time `after`."""

    def enough(ms: list[Received]) -> list[Received] | None:
        got = [m for m in ms if m.topic == topic and m.at > after]
        return got if len(got) >= n else None

    got = await sub.wait_for(enough, timeout=10)
    assert isinstance(got, list)
    return got[:n]


# --- pure parts -------------------------------------------------------------------------------------


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=100.0)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(100.4) is False  # 0.8 of a token
    assert bucket.take(100.5) is True  # 1.0
    # A long quiet spell refills only up to the burst.
    assert [bucket.take(1000.0) for _ in range(4)] == [True, True, True, False]


def test_audit_record_is_one_json_line_with_utc_time() -> None:
    ts_ns = 1_795_305_773_406_123_456
    line = AuditRecord(
        ts_ns=ts_ns,
        origin="local",
        topic="fieldgate/t1/plc/set/sp",
        device="plc",
        action="set",
        target="sp",
        request=float("nan"),
        ok=False,
        error="refused",
    ).to_json()
    assert "\n" not in line
    body = json.loads(line)  # strict JSON: NaN is kept as text
    assert body["time"] == "2026-11-22T00:02:53.406Z" and body["ts"] == 1_795_305_773_406
    assert body["value"] == "nan" and body["point"] == "sp" and "args" not in body


def test_any_request_or_result_is_written_as_one_strict_json_line(tmp_path: Path) -> None:
    deep: list[Any] = []
    for _ in range(5000):  # past Python's recursion limit
        deep = [deep]
    odd: list[Any] = ["\ud800", 10**400, 1 << 20_000, b"\xff", object(), {1: float("inf")}, deep]
    log = AuditLog(tmp_path)
    try:
        for n, thing in enumerate(odd):
            log(
                AuditRecord(
                    ts_ns=1_795_305_773_406_123_456,
                    origin="local",
                    topic=f"fieldgate/t1/d/cmd{n}",
                    device="d",
                    action="cmd",
                    target="go",
                    request={"x": thing},
                    ok=True,
                    result=thing,
                    request_id="\udc80",
                )
            )
    finally:
        log.close()
    lines = (tmp_path / "audit.log").read_text(encoding="utf-8").splitlines()
    assert [loads_strict(line)["topic"] for line in lines] == [f"fieldgate/t1/d/cmd{n}" for n in range(len(odd))]
    first = loads_strict(lines[0])
    assert first["args"] == {"x": "?"} and first["id"] == "?"


# --- on a real gateway -------------------------------------------------------------------------------


async def test_writes_are_applied_or_refused_and_every_one_is_audited(start: Start) -> None:
    gw, sub = await start()
    sim = _sim(gw)
    await _online(sub, "plc")
    sim.set(1, "sp", 100)
    sim.set(1, "target", 20.0)

    # Applied: the device holds it, the audit line says who (the sink), what, and what was read back.
    before = time.time()
    r = await sub.request("fieldgate/t1/plc/set/sp", '{"value": 123.5, "by": "alice"}')
    assert r.json() == {"ok": True, "value": 123.5, "error": None}
    assert sim.get(1, "sp") == 123.5
    (rec,) = await last_audit(gw)
    assert rec.pop("ms") >= 0
    stamp = datetime.fromisoformat(rec.pop("time"))
    assert stamp.utcoffset() is not None and stamp.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert abs(stamp.timestamp() * 1000 - rec["ts"]) < 1
    assert before - 1 <= rec.pop("ts") / 1000 <= time.time() + 1
    # `by` is the publisher's own claim, not an identity: it is not recorded as one.
    assert rec == {
        "origin": "local",
        "topic": "fieldgate/t1/plc/set/sp",
        "device": "plc",
        "action": "set",
        "point": "sp",
        "value": 123.5,
        "ok": True,
        "result": 123.5,
        "error": None,
    }
    # Before the device was touched, the request had its own line: the same request, no outcome yet.
    request, outcome = audit_lines(gw, requests=True)[-2:]
    assert request["stage"] == "request" and "stage" not in outcome
    assert (request["ok"], request["result"], request["error"], request["ms"]) == (None, None, None, 0)
    assert {k: request[k] for k in ("time", "ts", "topic", "point", "value")} == {
        "time": request["time"],
        "ts": outcome["ts"],
        "topic": "fieldgate/t1/plc/set/sp",
        "point": "sp",
        "value": 123.5,
    }

    # Refused before the bus: read-only, below the minimum, above the maximum; NaN is not JSON at all.
    refusals = [
        ("i16", "5", "plc.i16 is read-only"),
        ("target", "-50.5", "-50.5 is below the minimum -50 of plc.target"),
        ("sp", "1000.5", "1000.5 is above the maximum 1000 of plc.sp"),
        ("target", "NaN", "payload is not JSON: NaN is not JSON: b'NaN'"),
    ]
    writes = gw.buses[0].devices["plc"].stats.writes
    for point, payload, error in refusals:
        r = await sub.request(f"fieldgate/t1/plc/set/{point}", payload)
        assert r.json() == {"ok": False, "value": None, "error": error}
        (rec,) = await last_audit(gw, 1)
        assert (rec["point"], rec["ok"], rec["error"]) == (point, False, error)
        assert json.dumps(rec["value"]) == payload or (rec["value"], rec["payload"]) == (None, "NaN")
    assert gw.buses[0].devices["plc"].stats.writes == writes  # nothing went to the device
    assert sim.get(1, "sp") == 123.5 and sim.get(1, "target") == 20.0
    # The retained value is still the one written before.
    await asyncio.sleep(0.5)  # two polls
    assert sub.on("fieldgate/t1/plc/sp")[-1].json() == 123.5

    # A payload that is not JSON, and a device that does not exist, are audited too.
    r = await sub.request("fieldgate/t1/plc/set/sp", b"warm\xff")
    assert r.json()["ok"] is False
    (rec,) = await last_audit(gw)
    assert rec["value"] is None and rec["payload"] == "warm\ufffd" and rec["ok"] is False
    r = await sub.request("fieldgate/t1/nosuch/set/x", "1")
    (rec,) = await last_audit(gw)
    assert (rec["device"], rec["error"]) == ("nosuch", "unknown device 'nosuch'")
    assert len(audit_lines(gw)) == 1 + len(refusals) + 2


async def test_writes_beyond_the_rate_limit_are_refused_without_touching_the_device(start: Start) -> None:
    gw, sub = await start()
    sim = _sim(gw)
    await _online(sub, "slow")
    sent = time.monotonic()
    for value in range(1, 6):
        sub.publish("fieldgate/t1/slow/set/level", str(value))
    got = [m.json() for m in await results(sub, "fieldgate/t1/slow/set/level/result", 5, sent)]
    limited = "rate limited: slow takes at most 0.1 writes/s (burst 2)"
    assert sorted(r["error"] or "" for r in got) == ["", "", limited, limited, limited]  # type: ignore[index]
    assert gw.buses[0].devices["slow"].stats.writes == 2
    # The first two took the burst, and reached the device in order.
    assert sorted(r["value"] for r in got if r["ok"]) == [1, 2]  # type: ignore[index]
    assert sim.get(2, "level") == 2
    records = await last_audit(gw, 5)
    assert [r["error"] for r in records].count(limited) == 3
    assert {r["value"] for r in records} == {1, 2, 3, 4, 5}
    # The limit is per device: the neighbour on the same line still takes writes.
    r = await sub.request("fieldgate/t1/plc/set/sp", "10")
    assert r.json()["ok"] is True


async def test_mcp_commands_are_audited_and_rate_limited(start: Start) -> None:
    gw, sub = await start()
    await _online(sub, "pump-1")
    r = await sub.request("fieldgate/t1/pump-1/cmd", '{"name": "set", "args": {"running": false}, "id": "c1"}')
    assert r.json() == {"id": "c1", "ok": True, "result": {"running": False}, "error": None}
    (rec,) = await last_audit(gw)
    assert {k: v for k, v in rec.items() if k not in ("time", "ts", "ms")} == {
        "origin": "local",
        "topic": "fieldgate/t1/pump-1/cmd",
        "device": "pump-1",
        "action": "cmd",
        "command": "set",
        "args": {"running": False},
        "id": "c1",
        "ok": True,
        "result": {"running": False},
        "error": None,
    }

    assert gw.mcp is not None
    sent_to_device = gw.mcp.stats_for("pump-1").commands
    r = await sub.request("fieldgate/t1/pump-1/cmd", '{"name": "ping", "id": "c2"}')
    limited = "rate limited: pump-1 takes at most 0.1 commands/s (burst 1)"
    assert r.json() == {"id": "c2", "ok": False, "result": None, "error": limited}
    assert gw.mcp.stats_for("pump-1").commands == sent_to_device
    (rec,) = await last_audit(gw)
    assert (rec["command"], rec["args"], rec["id"], rec["error"]) == ("ping", {}, "c2", limited)

    r = await sub.request("fieldgate/t1/pump-1/cmd", "not json")
    (rec,) = await last_audit(gw)
    assert rec["action"] == "cmd" and rec["command"] is None and rec["payload"] == "not json"


async def test_the_audit_log_rotates_at_its_configured_size(start: Start) -> None:
    gw, sub = await start(audit_size="1kB")
    await _online(sub, "plc")
    for n in range(1, 21):
        r = await sub.request("fieldgate/t1/plc/set/i16", str(n))  # refused (read-only) but audited
        assert r.json()["ok"] is False
    state = Path(gw.cfg.gateway.state_dir)
    files = sorted(p.name for p in state.glob("audit.log*"))
    assert files == ["audit.log", "audit.log.1", "audit.log.2"]  # backups: 2
    assert all((state / f).stat().st_size <= 1024 for f in files)
    # The writer refuses a read-only point: each went to it, so each has its request line before its outcome.
    lines = audit_lines(gw, requests=True)
    if lines[0].get("stage") is None:
        lines = lines[1:]  # the file began with an outcome whose request line rotated away
    assert [r.get("stage") for r in lines] == ["request", None] * (len(lines) // 2)
    values = [r["value"] for r in lines[1::2]]
    # The newest records, in order, without a gap; the oldest rotated away.
    assert values == list(range(21 - len(values), 21)) and 1 not in values
