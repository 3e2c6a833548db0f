"""An MCP device's own `ts` against the gateway's clock (issue 16, clocks): the bound ahead of the gateway's clock
(max_future_ts) holds while that clock is synchronised or its state unknown, and only while it is not known
unsynchronised; a fixed bound (year 9999) and the floor (2000) hold always. The session protocol is driven in
memory; the sync state is the process clock's, set by the test.
"""

from __future__ import annotations

import pytest

from drivers.mcp.codec import Frame, FrameType
from drivers.mcp.events import Owe, Publish
from drivers.mcp.payload import TS_MAX_MS
from drivers.mcp.protocol import SeqWindow, SessionProtocol, SessionStats
from drivers.mcp.settings import McpSettings
from gateway.types import CLOCK

LIMITS = McpSettings(listen="127.0.0.1:7720", host="127.0.0.1", port=7720)  # max_future_ts: 1 day
TOKEN = "s3cret-token-0001"
GATEWAY_NOW = 1_767_225_600_000  # what the gateway's clock says (2026-01-01)
YEAR_MS = 365 * 86_400_000


def session() -> SessionProtocol:
    """pump-1's session, past its HELLO."""
    proto = SessionProtocol(LIMITS, 100.0, SessionStats(), SessionStats())
    hello = Frame.json(FrameType.HELLO, 1, {"device_id": "pump-1", "token": TOKEN, "boot_id": "b1"})
    verdict = proto.login(hello, LIMITS, banned=False, token_of={"pump-1": TOKEN}.get)
    assert verdict.hello is not None
    proto.register(verdict.hello, 1, SessionStats())
    return proto


def judge(proto: SessionProtocol, ts: int | None) -> object:
    """What the session makes of a DATA frame with `ts` (None: without one) while the gateway reads GATEWAY_NOW."""
    body: dict[str, object] = {"values": {"flow": 1}} | ({"ts": ts} if ts is not None else {})
    frame = Frame.json(FrameType.DATA, 5, body)
    return proto.data(frame, LIMITS, now_ms=GATEWAY_NOW, window=SeqWindow("b1"), delivering=set(), names=set())


@pytest.fixture
def sync(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Sets the process clock's sync state for one test."""
    return monkeypatch


AHEAD = GATEWAY_NOW + 2 * YEAR_MS  # a device whose clock is right, two years ahead of a Pi booted unsynchronised


@pytest.mark.parametrize("state", [True, None])
def test_a_ts_past_max_future_ts_is_refused_while_the_clock_is_synchronised_or_cannot_tell(
    sync: pytest.MonkeyPatch, state: bool | None
) -> None:
    """Synchronised, or a state nobody can read: the bound ahead of the gateway's clock holds (never lost silently)."""
    sync.setattr(CLOCK, "synchronized", state)
    proto = session()
    verdict = judge(proto, AHEAD)
    assert isinstance(verdict, Owe) and verdict.answer is not None
    assert proto.stats.bad_ts == 1


def test_a_ts_ahead_of_an_unsynchronised_clock_is_taken_as_the_devices_own(sync: pytest.MonkeyPatch) -> None:
    """Known not synchronised: the gateway's clock cannot say what is in the future, so a device's ts years ahead of
    it is taken, marked as the device's own clock (no step of the gateway's moves it); one past 9999 and one
    before 2000 are still refused; a DATA without ts is stamped by the gateway (and corrected with its steps)."""
    sync.setattr(CLOCK, "synchronized", False)
    proto = session()
    verdict = judge(proto, AHEAD)
    assert isinstance(verdict, Publish) and verdict.sample.ts == AHEAD and verdict.sample.device_clock
    for bad in (TS_MAX_MS + 1, 10**30, 946_684_799_999):
        assert isinstance(judge(proto, bad), Owe)
    assert proto.stats.bad_ts == 3
    stamped = judge(proto, None)
    assert isinstance(stamped, Publish) and stamped.sample.ts == GATEWAY_NOW and not stamped.sample.device_clock
