"""The MCP session's bookkeeping on its own: the duplicate window of spec 3 and how a command's answer is read."""

from __future__ import annotations

import pytest

from drivers.mcp.codec import Frame, FrameType, NackCode, nack
from drivers.mcp.session import SeqWindow, _command_result, boot_digest
from gateway.types import CommandResult


def test_the_window_holds_the_last_1024_accepted_seqs_and_forgets_the_oldest() -> None:
    window = SeqWindow("b1")
    for seq in range(1, 1025):
        window.add(seq)
    assert all(seq in window for seq in range(1, 1025))
    window.add(1025)
    assert 1 not in window  # spec 3: a window of the last 1024
    assert 2 in window and 1025 in window


def test_a_seq_added_again_takes_no_second_place_in_the_window() -> None:
    window = SeqWindow("b1", size=3)
    for seq in (1, 2, 3, 3, 2):
        window.add(seq)
    assert all(seq in window for seq in (1, 2, 3))  # re-adding 3 and 2 evicted nothing
    window.add(4)
    assert 1 not in window and all(seq in window for seq in (2, 3, 4))


def test_a_boot_id_is_kept_as_a_digest_that_tells_boots_apart() -> None:
    assert SeqWindow("boot-7").boot == boot_digest("boot-7") != boot_digest("boot-8")
    # Any string is a boot_id, a lone surrogate from a peer's JSON included.
    assert boot_digest("\ud800") != boot_digest("\ud801")


NOT_BOOL = CommandResult(ok=False, error="malformed response: ok must be a boolean")


def refused(reason: str) -> CommandResult:
    """What a NACK of the command gives."""
    return CommandResult(ok=False, error=f"device refused the command: {reason}")


def response(body: dict[str, object]) -> Frame:
    """The device's RESPONSE to command seq 5."""
    return Frame.json(FrameType.RESPONSE, 5, body)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (response({"ok": True, "result": {"rpm": 1200}}), CommandResult(ok=True, result={"rpm": 1200}, error=None)),
        (response({"ok": True, "error": "ignored"}), CommandResult(ok=True, result=None, error=None)),
        (response({"ok": False, "error": "jammed"}), CommandResult(ok=False, result=None, error="jammed")),
        (response({"ok": False, "error": 7}), CommandResult(ok=False, error="7")),
        (response({"ok": False}), CommandResult(ok=False, error="failed")),
        (response({"ok": False, "error": ""}), CommandResult(ok=False, error="failed")),
        (response({"ok": 1}), NOT_BOOL),
        (response({}), NOT_BOOL),
        (
            Frame(FrameType.RESPONSE, 5, b"[1]"),
            CommandResult(ok=False, error="malformed response: payload is a JSON list, not an object"),
        ),
        (Frame.json(FrameType.ACK, 5, {"ok": True}), NOT_BOOL),
        (nack(5, NackCode.UNKNOWN_FRAME_TYPE, "no such command"), refused("no such command")),
        (Frame.json(FrameType.NACK, 5, {"code": 4}), refused("nack")),
    ],
    ids=[
        "ok with result",
        "ok ignores an error",
        "failed with its error",
        "error made text",
        "failed without error",
        "failed with empty error",
        "ok not a bool",
        "no ok",
        "not an object",
        "an ACK is no response",
        "nack with reason",
        "nack without reason",
    ],
)
def test_a_commands_answer_is_read_as_the_spec_says(reply: Frame, expected: CommandResult) -> None:
    assert _command_result(reply) == expected
