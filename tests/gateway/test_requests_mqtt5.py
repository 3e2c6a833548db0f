"""MQTT 5 requests through a real gateway (a simulated Modbus line) and a real Mosquitto 2, from a paho MQTT 5 client.

A `set` with a response topic is answered there (with its correlation data) as well as on `/result`; one older than
its age limit (a `ts` user property against `max_request_age`, or its own message expiry) is refused and audited and
never reaches the device; a write whose limit passes while it waits for the line is refused by the line.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from drivers.modbus.served import LineRequests
from drivers.modbus.writes import PendingWrite
from gateway.app import Gateway
from gateway.config import load_config
from gateway.types import WriteResult, now_ms

from configs import Section, broker, config, device, line, point, sim_line, sim_slave, simulator, sink, write
from helpers import free_port, until
from mosquitto import Mosquitto
from mqtt5 import Client5


def v5_config(port: int, upstream: str) -> Section:
    """A writable plc point; an MQTT 5 sink `up` (max_request_age 30 s, the default) under site/t1."""
    plc = device("plc", 1, poll="100ms", points=[point("sp", "holding", 1, "uint16", writable=True)])
    return config(
        broker=broker(port, process="inline"),
        northbound=[sink("up", upstream, topic_prefix="site/t1", protocol=5)],
        buses=[line("line", "./ttyA", plc)],
        simulator=simulator(modbus=[sim_line("./ttyA", sim_slave(1))]),
    )


def audit_of(gw: Gateway) -> list[dict[str, Any]]:
    """The audit log's outcome records (not the `request` stage)."""
    lines = (Path(gw.cfg.gateway.state_dir) / "audit.log").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("stage") != "request"]


async def test_answers_go_to_the_response_topic_too_and_stale_requests_are_refused_and_audited(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Answered on /result and on the response topic; a set 60 s old by its `ts` refused and audited, never written;
    one with its own message expiry judged by that alone."""
    gw = Gateway(load_config(write(v5_config(free_port(), mosquitto.url), tmp_path)))
    await gw.start()
    client = Client5(mosquitto.port, "site/t1/plc/#", "replies/#")
    try:
        await until(lambda: any(p == b"online" for p, _ in client.on("site/t1/plc/status")), timeout=20)
        await until(lambda: client.on("site/t1/plc/telemetry"))
        body, props = client.on("site/t1/plc/telemetry")[0]
        # The sample's ts as a user property, and the spool's max_age (30 days) less its age as its expiry.
        assert dict(props.UserProperty) == {"ts": str(json.loads(body)["ts"])}
        assert 30 * 86400 - 60 <= props.MessageExpiryInterval <= 30 * 86400
        client.publish("site/t1/plc/set/sp", b"11", ResponseTopic="replies/a", CorrelationData=b"c-1")
        await until(lambda: client.on("replies/a") and client.on("site/t1/plc/set/sp/result"))
        (body, props), (result, _) = client.on("replies/a")[0], client.on("site/t1/plc/set/sp/result")[0]
        assert json.loads(body) == json.loads(result) == {"ok": True, "value": 11, "error": None}
        assert props.CorrelationData == b"c-1"

        # Sent a minute ago by its own clock: older than max_request_age (30 s).
        client.publish(
            "site/t1/plc/set/sp", b"12", ResponseTopic="replies/b", UserProperty=[("ts", str(now_ms() - 60_000))]
        )
        await until(lambda: client.on("replies/b"))
        refused = json.loads(client.on("replies/b")[0][0])
        assert (
            refused["ok"] is False and "too old" in refused["error"] and "max_request_age is 30 s" in refused["error"]
        )

        # With its own message expiry the broker's countdown is its age: a `ts` 5 s old does not count against it.
        client.publish(
            "site/t1/plc/set/sp",
            b"13",
            ResponseTopic="replies/c",
            MessageExpiryInterval=2,
            UserProperty=[("ts", str(now_ms() - 5_000))],
        )
        await until(lambda: client.on("replies/c"))
        assert json.loads(client.on("replies/c")[0][0]) == {"ok": True, "value": 13, "error": None}

        # The stale write never reached the device: polled every 100 ms, its point never showed 12.
        await asyncio.sleep(0.5)
        assert [p for p, _ in client.on("site/t1/plc/sp")][-2:] == [b"11", b"13"]
        assert b"12" not in {p for p, _ in client.on("site/t1/plc/sp")}
    finally:
        client.stop()
        await gw.stop()
    outcomes = [(a["value"], a["ok"], "too old" in (a.get("error") or "")) for a in audit_of(gw)]
    assert outcomes == [(11, True, False), (12, False, True), (13, True, False)]


class _Io:
    """A line's transactions that record what was put on the wire."""

    def __init__(self) -> None:
        self.writes: list[Any] = []

    async def write(self, *args: Any) -> None:
        self.writes.append(args)


async def test_a_write_whose_limit_passed_while_it_waited_for_the_line_is_not_written() -> None:
    """The line checks the deadline when the write's turn comes: past it, nothing goes on the wire."""
    io = _Io()
    requests = LineRequests(io, lambda _s: None, lambda *_a: None, lambda *_a: None)  # type: ignore[arg-type]
    fut: asyncio.Future[WriteResult] = asyncio.get_running_loop().create_future()
    pending = PendingWrite(None, None, [1], fut, deadline=time.monotonic() - 0.5)  # type: ignore[arg-type]
    await requests.write(pending)
    result = fut.result()
    assert not result.ok and "too old" in (result.error or "") and io.writes == []
