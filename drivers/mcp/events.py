"""What goes in and out of `protocol.SessionProtocol`: the actions it asks of its driver and the values it returns.

Plain frozen values, like h11's events: the session acts on them in order, the tests compare them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from drivers.mcp.codec import Frame
from drivers.mcp.payload import Hello
from gateway.types import Sample


@dataclass(frozen=True, slots=True)
class Send:
    """Send this frame now."""

    frame: Frame


@dataclass(frozen=True, slots=True)
class Close:
    """Close the session (after sending what came before it); `reason` is for the log and the device state."""

    reason: str


@dataclass(frozen=True, slots=True)
class Login:
    """A HELLO arrived on a session not yet past HELLO: ask the host about it, then call `login`."""

    frame: Frame


@dataclass(frozen=True, slots=True)
class DataIn:
    """A DATA frame arrived past HELLO: call `data` with the device's window and deliveries."""

    frame: Frame


@dataclass(frozen=True, slots=True)
class Reply:
    """The device answered command `seq` (a RESPONSE, or an ACK or NACK in its place)."""

    frame: Frame


Action = Send | Close | Login | DataIn | Reply


@dataclass(frozen=True, slots=True)
class Owe:
    """A DATA whose answer is known now: the ACK of a duplicate (`answer` None) or its NACK 5."""

    seq: int
    answer: Frame | None = None


@dataclass(frozen=True, slots=True)
class Join:
    """A resend of a DATA still being delivered: its answer is that delivery's outcome."""

    seq: int


@dataclass(frozen=True, slots=True)
class Publish:
    """A new DATA: deliver `sample`; its answer waits for the delivery's outcome."""

    seq: int
    sample: Sample


@dataclass(eq=False, slots=True)
class OwedAnswer:
    """The answer owed to one DATA frame, in its place in the session's arrival order."""

    seq: int
    answer: Frame | None = None  # the NACK to send; None with `decided` is the ACK
    decided: bool = False


@dataclass(frozen=True, slots=True)
class LoginVerdict:
    """What a HELLO gets: `hello` when it passed the checks so far, else the refusal (NACK, close)."""

    hello: Hello | None
    refusal: list[Action] = field(default_factory=list)
    auth_failure: str | None = None  # "unknown_device" or "bad_token": the host counts and logs it
    device_id: str = ""


@dataclass(eq=False, slots=True)
class PendingCommand:
    """A COMMAND of ours awaiting its answer: the exact frame to resend, the sends left and when the next is due."""

    frame: Frame
    sends_left: int
    deadline: float = float("inf")

    @property
    def seq(self) -> int:
        """The command's seq (its RESPONSE carries the same)."""
        return self.frame.seq
