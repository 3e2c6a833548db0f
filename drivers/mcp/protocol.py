"""The rules of one MCP/1 session on the gateway's side, without I/O (docs/mcp.md §3, §4, §5, §7).

`SessionProtocol` is fed what happened (a frame, a decode error, a read's end, a delivery's outcome,
the time) and answers with what to do: frames to send, a sample to publish, a close and its reason,
a deadline. It never reads a clock, sleeps or touches a socket: `session.py` does the I/O and passes
the time in, and the tests drive it in memory with tables of cases.

What it decides: the HELLO gate (what may come before HELLO, its deadline, framing errors counted,
the checks of a HELLO in order), the duplicate window (a DATA already accepted or being delivered is
answered, not published again), the order of DATA answers (in arrival order, whatever order their
deliveries finish in), heartbeat silence and stalled frames, and a command's seq, retransmissions
and give-up as deadlines.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import hmac
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from drivers.mcp.codec import DecodeError, Frame, FrameType, McpError, NackCode, nack, seq_next
from drivers.mcp.events import (
    Action,
    Close,
    DataIn,
    Join,
    Login,
    LoginVerdict,
    Owe,
    OwedAnswer,
    PendingCommand,
    Publish,
    Reply,
    Send,
)
from drivers.mcp.payload import BadTs, Hello, new_names, read_data, read_hello
from gateway.types import CLOCK, CommandResult, Sample

STALL_TIMEOUT = 5.0  # docs/mcp.md §4.2: a frame whose bytes stop arriving
MAX_OUTSTANDING = 32  # docs/mcp.md §3.4: DATA frames a device may have in flight


@dataclass
class SessionStats:
    """Counters of one device across its sessions."""

    frames_in: int = 0
    frames_out: int = 0
    crc_errors: int = 0
    nacks_sent: int = 0
    duplicates: int = 0
    sessions_opened: int = 0
    sessions_closed: int = 0
    commands: int = 0
    command_timeouts: int = 0
    rejected_payloads: int = 0  # DATA answered NACK 5
    bad_ts: int = 0  # of those, for a ts out of range


def boot_digest(boot_id: str) -> bytes:
    """A fixed-size stand-in for a boot_id (any string, docs/mcp.md §3.1): only equality is ever asked of it."""
    return hashlib.sha256(boot_id.encode("utf-8", "surrogatepass")).digest()


class SeqWindow:
    """The last accepted DATA seqs of a device (docs/mcp.md §3.2: a window of 1024)."""

    def __init__(self, boot_id: str, size: int = 1024) -> None:
        self.boot = boot_digest(boot_id)  # not the string: a device's boot_id may be as long as its HELLO
        self._order: collections.deque[int] = collections.deque(maxlen=size)
        self._seen: set[int] = set()

    def __contains__(self, seq: object) -> bool:
        return seq in self._seen

    def continues(self, boot_id: str) -> bool:
        """True when a HELLO with `boot_id` keeps this window; a new boot starts an empty one (docs/mcp.md §3.2)."""
        return self.boot == boot_digest(boot_id)

    def add(self, seq: int) -> None:
        """Remember an accepted seq, forgetting the oldest beyond the window."""
        if seq in self._seen:
            return
        if len(self._order) == self._order.maxlen:
            self._seen.discard(self._order[0])
        self._order.append(seq)
        self._seen.add(seq)


class Limits(Protocol):
    """The settings the session's rules read (the `mcp` config keys of the same names), read at each event."""

    @property
    def heartbeat_s(self) -> int: ...
    @property
    def hello_timeout(self) -> float: ...
    @property
    def max_hello_errors(self) -> int: ...
    @property
    def max_future_ts(self) -> float: ...
    @property
    def max_string(self) -> int: ...
    @property
    def max_points(self) -> int: ...


@functools.cache
def _default_nack_payload(code: NackCode) -> bytes:
    return nack(0, code).payload


class SessionProtocol:
    """One session's protocol state: fed events with the time, it returns the frames to send and what to do.

    Counts into `stats` (the device's counters; a scratch set before HELLO, replaced by `register`) and
    `totals` (the server's), as the session's counters always were.
    """

    def __init__(
        self,
        limits: Limits,
        now: float,
        stats: SessionStats,
        totals: SessionStats,
        stall_timeout: float = STALL_TIMEOUT,
    ) -> None:
        self.stats = stats
        self.totals = totals
        self.device_id: str | None = None
        # From accept, whatever comes after: nothing the peer sends moves it.
        self.hello_deadline = now + limits.hello_timeout
        self.idle_timeout = limits.hello_timeout
        self.stall_timeout = stall_timeout
        self.last_frame_at = now
        self.partial_since: float | None = None
        self.hello_errors = 0
        self._owed: collections.deque[OwedAnswer] = collections.deque()
        self._commands: dict[int, PendingCommand] = {}
        self._command_seq = 0

    @property
    def registered(self) -> bool:
        """True once a HELLO passed."""
        return self.device_id is not None

    # --- time ------------------------------------------------------------------------------------------

    def deadline(self) -> float:
        """When the session times out unless a frame completes: HELLO deadline or silence, and a stalled frame."""
        deadline = self.hello_deadline if self.device_id is None else self.last_frame_at + self.idle_timeout
        if self.partial_since is not None:
            deadline = min(deadline, self.partial_since + self.stall_timeout)
        return deadline

    def timed_out(self, now: float, paused: bool, limits: Limits) -> Close:
        """Why the session ends at its deadline (`paused`: it was waiting for the peer to read its answers)."""
        if paused:
            # Whatever else ran out meanwhile, it ran out because the peer left its answers unread.
            return Close("it did not read its answers (unread output above max_unread / 4) in time")
        if self.partial_since is not None and now >= self.partial_since + self.stall_timeout:
            return Close("a frame stalled for more than 5 s")
        if self.device_id is None:
            return Close(f"no HELLO within {limits.hello_timeout:g} s of accept")
        return Close(f"no frame for {self.idle_timeout:g} s")

    def read(self, now: float, completed: int, partial: bool) -> None:
        """A read ended at `now`: `completed` events came out of it, and `partial` bytes of a frame are left."""
        if not partial:
            self.partial_since = None
        elif completed or self.partial_since is None:
            # docs/mcp.md §4.2 counts from a frame's first byte: frames completed in this read, so the partial
            # left over started in it. Only a read that completed nothing keeps the older start.
            self.partial_since = now
        if completed:
            self.last_frame_at = now

    # --- frames in -------------------------------------------------------------------------------------

    def decode_error(self, error: DecodeError, limits: Limits) -> list[Action]:
        """A bad frame in the stream: its NACK, and a close when fatal or one framing error too many before HELLO."""
        if error.code == NackCode.CRC_MISMATCH:
            self.stats.crc_errors += 1
            self.totals.crc_errors += 1
        actions: list[Action] = [Send(self.nack(error.seq, error.code))]
        if error.fatal:
            actions.append(Close(error.reason))
        elif self.device_id is None:
            self.hello_errors += 1
            if self.hello_errors >= limits.max_hello_errors:
                actions.append(Close(f"{self.hello_errors} framing errors before HELLO"))
        return actions

    def receive(self, frame: Frame) -> list[Action]:
        """A complete frame from the peer: what to answer, or what the host must be asked about it."""
        if frame.type == FrameType.HELLO:
            if self.device_id is None:
                return [Login(frame)]
            # A live session cannot become another device (nor log in twice): HELLO is the first frame only.
            answer = self.nack(frame.seq, NackCode.MALFORMED_PAYLOAD, "HELLO on a session that already passed HELLO")
            return [Send(answer), Close("a second HELLO")]
        if self.device_id is None:
            return [Send(self.nack(frame.seq, NackCode.NOT_REGISTERED)), Close("frame before HELLO")]
        if frame.type == FrameType.DATA:
            return [DataIn(frame)]
        if frame.type == FrameType.HEARTBEAT:
            return [Send(Frame(FrameType.ACK, frame.seq))]
        if frame.type in (FrameType.RESPONSE, FrameType.ACK, FrameType.NACK):
            # One that answers no command of ours is ignored: nothing waits for it, and it is owed nothing.
            return [Reply(frame)] if frame.seq in self._commands else []
        return [Send(self.nack(frame.seq, NackCode.UNKNOWN_FRAME_TYPE, f"unknown frame type {frame.type}"))]

    def login(
        self, frame: Frame, limits: Limits, *, banned: bool, token_of: Callable[[str], str | None]
    ) -> LoginVerdict:
        """Judge a HELLO (docs/mcp.md §4.1): an address banned since it connected, its form, its token."""
        if banned:
            why = "its address is banned (mcp.auth_ban_*)"
            return self._refuse(frame.seq, NackCode.AUTHENTICATION_FAILED, None, why)
        try:
            hello = read_hello(frame, limits.heartbeat_s)
        except McpError as exc:
            # docs/mcp.md §2: a HELLO is answered by ACK, or by NACK and close.
            reason = f"malformed payload: {exc}"
            return self._refuse(frame.seq, NackCode.MALFORMED_PAYLOAD, reason, f"malformed HELLO: {exc}")
        expected = token_of(hello.device_id)
        given = hello.token.encode("utf-8", "surrogatepass")
        # Compare even for an unknown id, so that timing does not tell which ids exist.
        good = hmac.compare_digest(given, (expected or "\0" + hello.token).encode("utf-8", "surrogatepass"))
        if expected is None or not good:
            verdict = self._refuse(
                frame.seq, NackCode.AUTHENTICATION_FAILED, None, f"authentication failed for {hello.device_id!r}"
            )
            failure = "unknown_device" if expected is None else "bad_token"
            return LoginVerdict(None, verdict.refusal, failure, hello.device_id)
        return LoginVerdict(hello, device_id=hello.device_id)

    def no_room(self, seq: int) -> LoginVerdict:
        """The refusal of a HELLO that passed every check but found max_sessions reached."""
        return self._refuse(seq, NackCode.OVERLOADED, "overloaded: max_sessions reached", "max_sessions reached")

    def register(self, hello: Hello, seq: int, stats: SessionStats) -> Frame:
        """The HELLO passed: the session is the device's from now on; returns the HELLO's ACK."""
        self.device_id = hello.device_id
        self.stats = stats
        self.idle_timeout = 3 * hello.heartbeat_s
        return Frame.json(FrameType.ACK, seq, {"heartbeat_s": hello.heartbeat_s})

    def _refuse(self, seq: int, code: NackCode, reason: str | None, why: str) -> LoginVerdict:
        return LoginVerdict(None, [Send(self.nack(seq, code, reason)), Close(why)])

    def data(
        self,
        frame: Frame,
        limits: Limits,
        *,
        now_ms: int,
        window: Container[int],
        delivering: Container[int],
        names: set[str],
    ) -> Owe | Join | Publish:
        """A DATA past HELLO: a duplicate of one accepted (`window`) or being delivered, refused, or new."""
        assert self.device_id is not None
        if frame.seq in window:
            # A retransmission of something already ACKed: ACK again, publish nothing.
            self.stats.duplicates += 1
            return Owe(frame.seq)
        if frame.seq in delivering:
            # Also one sent on an earlier session of this boot whose link dropped before the ACK: it waits for
            # that delivery (ACK when it is durable, NACK if it failed) instead of being published again.
            self.stats.duplicates += 1
            return Join(frame.seq)
        try:
            ts, values = read_data(
                frame,
                now_ms=now_ms,
                # The bound ahead of the gateway's clock holds unless that clock is known wrong (not synchronised):
                # an unknown state keeps it, so a box whose sync state cannot be read never loses it silently.
                max_future_ms=None if CLOCK.synchronized is False else int(limits.max_future_ts * 1000),
                max_string=limits.max_string,
                max_points=limits.max_points,
            )
            # Taken only once the whole frame passed: a refused frame leaves no name behind.
            names.update(new_names(values, names, limits.max_points, frame.seq))
        except McpError as exc:
            self.stats.rejected_payloads += 1
            if isinstance(exc, BadTs):
                self.stats.bad_ts += 1
            return Owe(frame.seq, self.nack(frame.seq, NackCode.MALFORMED_PAYLOAD, f"malformed payload: {exc}"))
        if ts is None:
            return Publish(frame.seq, Sample(self.device_id, now_ms, values))
        return Publish(frame.seq, Sample(self.device_id, ts, values, device_clock=True))

    # --- DATA answers, in arrival order --------------------------------------------------------------------

    def owe(self, seq: int, answer: Frame | None = None, *, decided: bool = True) -> OwedAnswer:
        """Queue the answer of DATA `seq` behind those owed before it (`decided` False: wait for `delivered`)."""
        owed = OwedAnswer(seq, answer, decided)
        self._owed.append(owed)
        return owed

    def delivered(self, owed: OwedAnswer, nack: Frame | None) -> None:
        """The delivery behind `owed` finished: durable (`nack` None, an ACK), or failed with `nack`."""
        owed.answer, owed.decided = nack, True

    def answers(self) -> Iterator[Frame]:
        """The answers that may leave now: every decided one at the head of the arrival order, each taken once."""
        while self._owed and self._owed[0].decided:
            owed = self._owed.popleft()
            yield owed.answer or Frame(FrameType.ACK, owed.seq)

    @property
    def owed(self) -> int:
        """DATA frames whose answers have not left yet."""
        return len(self._owed)

    def forget_owed(self) -> int:
        """Drop every answer still owed (the session closes); returns how many there were."""
        count = len(self._owed)
        self._owed.clear()
        return count

    # --- commands ------------------------------------------------------------------------------------------

    def command(self, name: str, args: dict[str, Any], retries: int) -> PendingCommand:
        """A new COMMAND with this session's next seq, to be sent at most `retries` + 1 times."""
        self._command_seq = seq_next(self._command_seq)
        frame = Frame.json(FrameType.COMMAND, self._command_seq, {"name": name, "args": args})
        pending = PendingCommand(frame, sends_left=retries + 1)
        self._commands[pending.seq] = pending
        self.stats.commands += 1
        return pending

    def command_due(self, pending: PendingCommand) -> Frame | None:
        """The frame to send for `pending` (first, or again at its deadline): the same bytes each time; None once
        every send is spent, so that silence until the deadline of the last one gives up."""
        return pending.frame if pending.sends_left > 0 else None

    def command_sent(self, pending: PendingCommand, now: float, ack_timeout: float) -> float:
        """`pending` went out at `now`: returns the deadline of its answer (its next send, or its give-up)."""
        pending.sends_left -= 1
        pending.deadline = now + ack_timeout
        return pending.deadline

    def command_done(self, pending: PendingCommand, *, timed_out: bool) -> None:
        """Forget `pending` (answered, refused or failed; `timed_out`: given up on silence, and counted)."""
        self._commands.pop(pending.seq, None)
        if timed_out:
            self.stats.command_timeouts += 1

    # --- NACKs ---------------------------------------------------------------------------------------------

    def nack(self, seq: int, code: NackCode, reason: str | None = None) -> Frame:
        """A NACK of frame `seq`, counted as sent (`reason` None: the default text of docs/mcp.md §5)."""
        self.stats.nacks_sent += 1
        self.totals.nacks_sent += 1
        if reason is None:
            # The default reason: one payload every time (a flood of bad frames is answered by many).
            return Frame(FrameType.NACK, seq, _default_nack_payload(code))
        return nack(seq, code, reason)


def command_result(reply: Frame) -> CommandResult:
    """What the device's answer to a COMMAND means (docs/mcp.md §7)."""
    try:
        body = reply.body()
    except McpError as exc:
        return CommandResult(ok=False, error=f"malformed response: {exc}")
    if reply.type == FrameType.NACK:
        return CommandResult(ok=False, error=f"device refused the command: {body.get('reason', 'nack')}")
    if reply.type != FrameType.RESPONSE or not isinstance(body.get("ok"), bool):
        return CommandResult(ok=False, error="malformed response: ok must be a boolean")
    error = body.get("error")
    return CommandResult(ok=body["ok"], result=body.get("result"), error=None if body["ok"] else str(error or "failed"))
