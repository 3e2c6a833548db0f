"""README "Writes, commands and the audit log": the outcome line is written in a `finally`: a request whose device
call raises or is cut short is still recorded and answered. A router on a real sink and broker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from bridge.broker import EmbeddedBroker
from bridge.outbox import Outbox
from bridge.sink import MqttSink
from gateway.audit import AuditRecord
from gateway.router import SUBSCRIPTIONS, Router
from gateway.types import Command, CommandResult, DeviceProfile, Write, WriteResult

from helpers import Subscriber

PREFIX = "fieldgate/ga"


@dataclass
class Routed:
    """The router's subscriber and the audit records it wrote."""

    sub: Subscriber
    audit: list[AuditRecord] = field(default_factory=list)


@pytest.fixture
async def routed(broker: EmbeddedBroker, port: int, subscriber: Subscriber) -> AsyncIterator[Routed]:
    """Device `d`: its writes raise (a driver bug), its commands are cut short (cancelled) before any answer."""

    async def writer(write: Write) -> WriteResult:
        raise RuntimeError("the driver failed")

    async def commander(command: Command) -> CommandResult:
        raise asyncio.CancelledError  # as when the call waiting for the device's answer is cancelled

    records: list[AuditRecord] = []
    routers: list[Router] = []
    sink = MqttSink(
        "local",
        f"mqtt://127.0.0.1:{port}",
        PREFIX,
        client_id="guarantee-audit-test",
        subscriptions=SUBSCRIPTIONS,
        on_request=lambda t, p, m: routers[0].on_request(outbox, t, p, m),
    )
    outbox = Outbox(sink)
    routers.append(Router([outbox], [DeviceProfile("d", commander=commander, writer=writer)], audit=records.append))
    await outbox.start()
    await sink.start()
    assert await sink.wait_connected(5)
    await subscriber.wait_for(lambda ms: any(m.topic == f"{PREFIX}/status" and m.payload == b"online" for m in ms))
    try:
        yield Routed(subscriber, records)
    finally:
        await outbox.flush(2)
        await outbox.stop()
        await sink.stop()


def outcomes(audit: list[AuditRecord]) -> list[tuple[str | None, str, bool | None]]:
    """(stage, action, ok) of each audit record, in order."""
    return [(r.stage, r.action, r.ok) for r in audit]


async def test_a_write_whose_device_call_raises_is_answered_and_audited(routed: Routed) -> None:
    reply = await routed.sub.request(f"{PREFIX}/d/set/sp", "5", timeout=5)
    body = reply.json()
    assert isinstance(body, dict) and body["ok"] is False and "the driver failed" in body["error"]
    assert outcomes(routed.audit) == [("request", "set", None), (None, "set", False)]
    assert "the driver failed" in (routed.audit[-1].error or "")


async def test_a_command_cut_short_is_answered_and_audited(routed: Routed) -> None:
    reply = await routed.sub.request(f"{PREFIX}/d/cmd", '{"name": "go", "id": "c1"}', timeout=5)
    assert reply.json() == {"id": "c1", "ok": False, "result": None, "error": routed.audit[-1].error}
    assert outcomes(routed.audit) == [("request", "cmd", None), (None, "cmd", False)]
