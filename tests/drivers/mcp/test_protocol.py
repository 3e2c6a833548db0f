"""The MCP session's rules in memory (docs/mcp.md §3, §4, §5, §7): a `SessionProtocol` fed frames, decode errors,
delivery outcomes and the time, no sockets and no sleeps. The socket tests (test_session_contract.py and others)
keep proving the I/O around it."""

from __future__ import annotations

import itertools

import pytest

from drivers.mcp.codec import MAX_SEQ, DecodeError, Frame, FrameType, NackCode, nack
from drivers.mcp.events import Close, DataIn, Join, Login, Owe, Publish, Reply, Send
from drivers.mcp.protocol import SeqWindow, SessionProtocol, SessionStats
from drivers.mcp.settings import McpSettings
from gateway.types import Sample

LIMITS = McpSettings(listen="127.0.0.1:7720", host="127.0.0.1", port=7720)  # the defaults: hello_timeout 10 s
TOKEN = "s3cret-token-0001"
TOKENS = {"pump-1": TOKEN}
NOW_MS = 1_767_225_600_000
ACCEPTED_AT = 100.0


def fresh() -> SessionProtocol:
    """A session's protocol at accept, at loop time ACCEPTED_AT."""
    return SessionProtocol(LIMITS, ACCEPTED_AT, SessionStats(), SessionStats())


def hello(seq: int = 1, **fields: object) -> Frame:
    """pump-1's HELLO (`fields` added or replacing)."""
    return Frame.json(FrameType.HELLO, seq, {"device_id": "pump-1", "token": TOKEN, "boot_id": "b1", **fields})


def logged_in(heartbeat_s: int = 30, at: float = ACCEPTED_AT) -> SessionProtocol:
    """A protocol past pump-1's HELLO (registered at loop time `at`, a frame completed then)."""
    proto = fresh()
    verdict = proto.login(hello(heartbeat_s=heartbeat_s), LIMITS, banned=False, token_of=TOKENS.get)
    assert verdict.hello is not None
    proto.register(verdict.hello, 1, SessionStats())
    proto.read(at, completed=1, partial=False)
    return proto


def data(seq: int, values: dict[str, object] | None = None, **fields: object) -> Frame:
    """A DATA frame."""
    return Frame.json(
        FrameType.DATA, seq, {"ts": NOW_MS, "values": {"flow": seq} if values is None else values, **fields}
    )


def nack_of(action: object) -> tuple[int, int, str]:
    """(seq, code, reason) of a Send of a NACK."""
    assert isinstance(action, Send) and action.frame.type == FrameType.NACK, action
    body = action.frame.body()
    return action.frame.seq, body["code"], body["reason"]


# --- the HELLO gate -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        data(1),
        Frame(FrameType.HEARTBEAT, 1),
        Frame(FrameType.ACK, 1),
        Frame.json(FrameType.NACK, 1, {"code": 1, "reason": "crc mismatch"}),
        Frame.json(FrameType.RESPONSE, 1, {"ok": True}),
        Frame.json(FrameType.COMMAND, 1, {"name": "x", "args": {}}),
        Frame(9, 1),
    ],
    ids=["DATA", "HEARTBEAT", "ACK", "NACK", "RESPONSE", "COMMAND", "type 9"],
)
def test_before_hello_any_frame_but_hello_is_nack_6_and_close(frame: Frame) -> None:
    proto = fresh()
    send, close = proto.receive(frame)
    assert nack_of(send) == (1, 6, "not registered")
    assert close == Close("frame before HELLO")
    assert (proto.stats.nacks_sent, proto.totals.nacks_sent) == (1, 1)


def test_a_hello_asks_for_a_login_before_and_is_nack_5_and_close_after() -> None:
    assert fresh().receive(hello()) == [Login(hello())]
    send, close = logged_in().receive(hello(2))
    assert nack_of(send) == (2, 5, "HELLO on a session that already passed HELLO")
    assert close == Close("a second HELLO")


@pytest.mark.parametrize(
    ("frame", "banned", "nack_code", "closing", "auth_failure"),
    [
        (hello(), True, 7, "its address is banned (mcp.auth_ban_*)", None),
        (hello(token="wrong-token-000000"), True, 7, "its address is banned (mcp.auth_ban_*)", None),
        (hello(heartbeat_s=0), True, 7, "its address is banned (mcp.auth_ban_*)", None),
        (hello(token="wrong-token-000000"), False, 7, "authentication failed for 'pump-1'", "bad_token"),
        (hello(token=""), False, 7, "authentication failed for 'pump-1'", "bad_token"),
        (hello(device_id="pump-9"), False, 7, "authentication failed for 'pump-9'", "unknown_device"),
        (hello(heartbeat_s=0), False, 5, "malformed HELLO: heartbeat_s must be an integer from 1 to 3600", None),
        (hello(device_id="a b"), False, 5, "malformed HELLO: device_id must be 1-64 of A-Z a-z 0-9 _ . -", None),
    ],
    ids=[
        "banned",
        "banned before its token is looked at",
        "banned before its form is looked at",
        "bad token",
        "empty token",
        "unknown device",
        "heartbeat out of range",
        "device id not topic-safe",
    ],
)
def test_a_refused_hello_is_nacked_and_closes_saying_why(
    frame: Frame, banned: bool, nack_code: int, closing: str, auth_failure: str | None
) -> None:
    proto = fresh()
    verdict = proto.login(frame, LIMITS, banned=banned, token_of=TOKENS.get)
    assert verdict.hello is None and verdict.auth_failure == auth_failure
    send, close = verdict.refusal
    assert nack_of(send)[:2] == (1, nack_code)
    assert close == Close(closing)
    assert not proto.registered


def test_a_hello_that_passes_registers_the_device_with_its_heartbeat() -> None:
    proto = fresh()
    verdict = proto.login(hello(7, heartbeat_s=2), LIMITS, banned=False, token_of=TOKENS.get)
    assert verdict.hello is not None and verdict.refusal == [] and verdict.auth_failure is None
    device = SessionStats()
    assert proto.register(verdict.hello, 7, device) == Frame.json(FrameType.ACK, 7, {"heartbeat_s": 2})
    assert proto.device_id == "pump-1" and proto.stats is device and proto.idle_timeout == 6
    # A HELLO without heartbeat_s gets the configured one.
    assert fresh().login(hello(), LIMITS, banned=False, token_of=TOKENS.get).hello.heartbeat_s == 30  # type: ignore[union-attr]
    # Past max_sessions: NACK 8 and close.
    send, close = fresh().no_room(7).refusal
    assert nack_of(send) == (7, 8, "overloaded: max_sessions reached") and close == Close("max_sessions reached")


def test_a_hello_that_passes_names_its_device_in_the_verdict() -> None:
    verdict = fresh().login(hello(), LIMITS, banned=False, token_of=TOKENS.get)
    assert verdict.hello is not None and verdict.device_id == "pump-1"


def test_a_configured_token_that_is_no_valid_unicode_refuses_the_hello_without_raising() -> None:
    # Settings are plain values: a token with a lone surrogate is compared like any other, and matches no peer's.
    verdict = fresh().login(hello(), LIMITS, banned=False, token_of={"pump-1": TOKEN + "\ud800"}.get)
    assert verdict.hello is None and verdict.auth_failure == "bad_token"
    send, close = verdict.refusal
    assert nack_of(send)[:2] == (1, 7) and close == Close("authentication failed for 'pump-1'")


@pytest.mark.parametrize("limit", [1, 2, 3, 5])
def test_before_hello_the_nth_framing_error_closes_where_n_is_max_hello_errors(limit: int) -> None:
    limits = McpSettings(listen="x:1", host="x", port=1, max_hello_errors=limit)
    proto = SessionProtocol(limits, 0.0, SessionStats(), SessionStats())
    crc = DecodeError(NackCode.CRC_MISMATCH, 4, fatal=False)
    for _ in range(limit - 1):
        assert proto.decode_error(crc, limits) == [Send(nack(4, NackCode.CRC_MISMATCH))]
    assert proto.decode_error(crc, limits) == [
        Send(nack(4, NackCode.CRC_MISMATCH)),
        Close(f"{limit} framing errors before HELLO"),
    ]
    assert (proto.stats.crc_errors, proto.totals.crc_errors) == (limit, limit)


def test_past_hello_framing_errors_are_not_limited_and_a_fatal_one_closes_at_once() -> None:
    proto = logged_in()
    crc = DecodeError(NackCode.CRC_MISMATCH, 4, fatal=False)
    for _ in range(10):
        assert proto.decode_error(crc, LIMITS) == [Send(nack(4, NackCode.CRC_MISMATCH))]
    for code in (NackCode.UNSUPPORTED_VERSION, NackCode.FRAME_TOO_LARGE):
        assert logged_in().decode_error(DecodeError(code, 9, fatal=True), LIMITS) == [
            Send(nack(9, code)),
            Close(code.reason),
        ]


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (Frame(FrameType.HEARTBEAT, 5), [Send(Frame(FrameType.ACK, 5))]),
        (data(5), [DataIn(data(5))]),
        (Frame(9, 5), [Send(nack(5, NackCode.UNKNOWN_FRAME_TYPE, "unknown frame type 9"))]),
        (Frame.json(FrameType.RESPONSE, 5, {"ok": True}), []),  # answers no command of ours: ignored
        (Frame(FrameType.ACK, 5), []),
    ],
    ids=["heartbeat", "data", "unknown type", "stray response", "stray ack"],
)
def test_past_hello_each_frame_gets_its_answer(frame: Frame, expected: list[object]) -> None:
    assert logged_in().receive(frame) == expected


# --- the duplicate window -----------------------------------------------------------------------------------


def judge(proto: SessionProtocol, frame: Frame, window: SeqWindow, delivering: set[int] = set()) -> object:  # noqa: B006
    """What `proto.data` makes of `frame` for pump-1 with `window` and the seqs `delivering`."""
    return proto.data(frame, LIMITS, now_ms=NOW_MS, window=window, delivering=delivering, names=set())


def test_a_seq_in_the_window_is_acked_again_and_one_being_delivered_waits_for_that_delivery() -> None:
    proto, window = logged_in(), SeqWindow("b1")
    assert judge(proto, data(5), window) == Publish(5, Sample("pump-1", NOW_MS, {"flow": 5}))
    window.add(5)  # its delivery succeeded
    assert judge(proto, data(5), window) == Owe(5)  # the ACK, nothing published
    assert judge(proto, data(6), window, delivering={6}) == Join(6)
    # The window holds the last 1024 accepted seqs: the oldest is forgotten, and published again if resent.
    for seq in range(6, 6 + 1024):
        window.add(seq)
    assert judge(proto, data(5), window) == Publish(5, Sample("pump-1", NOW_MS, {"flow": 5}))
    assert judge(proto, data(6), window) == Owe(6)
    assert proto.stats.duplicates == 3


def test_a_new_boot_id_starts_an_empty_window() -> None:
    window = SeqWindow("b1")
    window.add(5)
    assert window.continues("b1") and not window.continues("b2")
    proto = logged_in()
    assert judge(proto, data(5), window) == Owe(5)
    assert judge(proto, data(5), SeqWindow("b2")) == Publish(5, Sample("pump-1", NOW_MS, {"flow": 5}))


@pytest.mark.parametrize(
    ("frame", "reason", "bad_ts"),
    [
        (data(5, values={}), "malformed payload: values must be a non-empty object", 0),
        (data(5, ts=1), "malformed payload: ts 1 is before 2000-01-01", 1),
        (Frame(FrameType.DATA, 5, b"[1]"), "malformed payload: payload is a JSON list, not an object", 0),
    ],
    ids=["no values", "ts before 2000", "not an object"],
)
def test_a_malformed_data_owes_its_nack_5_in_order_and_publishes_nothing(
    frame: Frame, reason: str, bad_ts: int
) -> None:
    proto = logged_in()
    verdict = judge(proto, frame, SeqWindow("b1"))
    assert isinstance(verdict, Owe) and verdict.answer is not None
    assert nack_of(Send(verdict.answer)) == (5, 5, reason)
    assert (proto.stats.rejected_payloads, proto.stats.bad_ts, proto.stats.nacks_sent) == (1, bad_ts, 1)


def test_a_malformed_data_is_owed_under_its_own_seq() -> None:
    verdict = judge(logged_in(), data(7, values={}), SeqWindow("b1"))
    assert isinstance(verdict, Owe) and verdict.seq == 7 and verdict.answer is not None


# --- DATA answers leave in arrival order ---------------------------------------------------------------------

# Five DATA frames in arrival order: seq 1, 2 and 4 are being delivered, 3 is a duplicate, 5 a malformed one.
ARRIVALS = [(1, "publish"), (2, "publish"), (3, "duplicate"), (4, "publish"), (5, "malformed")]
FAILING = 2  # seq 2's delivery fails: NACK 8


@pytest.mark.parametrize("finish_order", list(itertools.permutations([1, 2, 4])), ids=str)
def test_answers_leave_in_arrival_order_whatever_order_deliveries_finish_in(finish_order: tuple[int, ...]) -> None:
    proto = logged_in()
    malformed = nack(5, NackCode.MALFORMED_PAYLOAD, "malformed payload: values must be a non-empty object")
    owed = {}
    for seq, kind in ARRIVALS:
        if kind == "publish":
            owed[seq] = proto.owe(seq, decided=False)
        else:
            proto.owe(seq, malformed if kind == "malformed" else None)
        assert list(proto.answers()) == []  # seq 1 is still being delivered: nothing may leave
    sent: list[Frame] = []
    for step, seq in enumerate(finish_order):
        failure = nack(seq, NackCode.OVERLOADED, "overloaded: spool full") if seq == FAILING else None
        proto.delivered(owed[seq], failure)
        sent += proto.answers()
        # Only what every earlier frame's answer allows has left: a prefix of the arrival order.
        finished = set(finish_order[: step + 1])
        allowed = []
        for arrival, kind in ARRIVALS:
            if kind == "publish" and arrival not in finished:
                break
            allowed.append(arrival)
        assert [frame.seq for frame in sent] == allowed
    assert sent == [
        Frame(FrameType.ACK, 1),
        nack(2, NackCode.OVERLOADED, "overloaded: spool full"),
        Frame(FrameType.ACK, 3),
        Frame(FrameType.ACK, 4),
        malformed,
    ]
    assert proto.owed == 0


def test_answers_owed_when_the_session_closes_are_dropped_and_counted() -> None:
    proto = logged_in()
    proto.owe(1, decided=False)
    proto.owe(2)
    assert (proto.owed, proto.forget_owed(), proto.owed) == (2, 2, 0)
    assert list(proto.answers()) == []


# --- commands: seq, retransmissions and give-up as deadlines --------------------------------------------------


@pytest.mark.parametrize(("retries", "ack_timeout"), [(0, 5.0), (1, 5.0), (3, 5.0), (2, 0.25)])
def test_a_command_is_sent_retries_plus_one_times_a_timeout_apart_then_given_up(
    retries: int, ack_timeout: float
) -> None:
    proto = logged_in()
    pending = proto.command("set_speed", {"rpm": 1200}, retries)
    now, sends = 0.0, []
    while (frame := proto.command_due(pending)) is not None:
        sends.append((now, frame))
        now = proto.command_sent(pending, now, ack_timeout)  # silence until the deadline
    assert [at for at, _ in sends] == [i * ack_timeout for i in range(retries + 1)]
    assert {frame for _, frame in sends} == {
        Frame.json(FrameType.COMMAND, 1, {"args": {"rpm": 1200}, "name": "set_speed"})
    }
    assert now == (retries + 1) * ack_timeout  # given up at the last send's deadline
    proto.command_done(pending, timed_out=True)
    assert (proto.stats.commands, proto.stats.command_timeouts) == (1, 1)


def test_only_an_answer_to_an_open_command_is_a_reply_and_seqs_run_on_and_wrap() -> None:
    proto = logged_in()
    first = proto.command("stop", {}, 3)
    answer = Frame.json(FrameType.RESPONSE, first.seq, {"ok": True})
    assert proto.receive(answer) == [Reply(answer)]
    proto.command_done(first, timed_out=False)
    assert proto.receive(answer) == []  # late: nothing waits for it
    assert proto.stats.command_timeouts == 0
    assert proto.command("stop", {}, 3).seq == 2
    proto._command_seq = MAX_SEQ - 1
    assert [proto.command("stop", {}, 0).seq for _ in range(3)] == [MAX_SEQ, 1, 2]


# --- deadlines: the HELLO's, silence, a stalled frame ----------------------------------------------------------


def test_the_hello_deadline_runs_from_accept_whatever_arrives() -> None:
    proto = fresh()
    for at in (101.0, 105.0, 109.9):
        proto.read(at, completed=1, partial=False)  # NACKed frames, say
        proto.decode_error(
            DecodeError(NackCode.CRC_MISMATCH, 1, fatal=False), McpSettings("x:1", "x", 1, max_hello_errors=99)
        )
        assert proto.deadline() == ACCEPTED_AT + 10
    assert proto.timed_out(110.0, paused=False, limits=LIMITS) == Close("no HELLO within 10 s of accept")


@pytest.mark.parametrize(
    ("heartbeat_s", "reads", "deadline", "reason"),
    [
        # (loop time, frames completed, a partial frame left)
        (1, [], 103.0, "no frame for 3 s"),
        (1, [(102.9, 1, False)], 105.9, "no frame for 3 s"),
        (1, [(102.9, 1, False), (104.0, 0, False)], 105.9, "no frame for 3 s"),  # a read that completes nothing
        (30, [(110.0, 1, False)], 200.0, "no frame for 90 s"),
        (30, [(110.0, 0, True)], 115.0, "a frame stalled for more than 5 s"),
        (30, [(110.0, 0, True), (114.0, 0, True)], 115.0, "a frame stalled for more than 5 s"),  # more bytes: no time
        (30, [(110.0, 0, True), (114.0, 1, True)], 119.0, "a frame stalled for more than 5 s"),  # a new frame began
        (30, [(110.0, 0, True), (114.0, 1, False)], 204.0, "no frame for 90 s"),
        (1, [(100.5, 0, True)], 103.0, "no frame for 3 s"),  # silence ends first
    ],
)
def test_past_hello_the_deadline_is_three_heartbeats_of_silence_or_five_seconds_of_a_stalled_frame(
    heartbeat_s: int, reads: list[tuple[float, int, bool]], deadline: float, reason: str
) -> None:
    proto = logged_in(heartbeat_s)
    for at, completed, partial in reads:
        proto.read(at, completed, partial)
    assert proto.deadline() == deadline
    assert proto.timed_out(deadline, paused=False, limits=LIMITS) == Close(reason)
    unread = "it did not read its answers (unread output above max_unread / 4) in time"
    assert proto.timed_out(deadline, paused=True, limits=LIMITS) == Close(unread)
