"""Reading what `strace -f -ttt -yy -xx -o FILE` wrote: one `Call` per system call, with its descriptor's
target (a path, or a socket's addresses) and the bytes it moved.

With `-f` the calls of several threads interleave: a call that another thread's call interrupts is written
as `name(args <unfinished ...>` and finished later by `<... name resumed>rest`; the two halves are joined
per thread. `-xx` writes every byte of a string (and of a path after `-y`) as `\\xHH`, so the bytes come
back exactly and no quote or bracket inside them can confuse the parsing.

Order: strace writes a line when it handles the thread's stop at that call's entry or exit, and a traced
thread stays stopped until strace has handled it. So a call whose exit line comes before another call's
entry line did return before that other call was made (`Call.returned` < `Call.entered`), whichever
threads made them; the `-ttt` timestamps (taken when strace writes the line) follow the same order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_LINE = re.compile(r"^(?P<tid>\d+)\s+(?P<at>\d+\.\d+)\s+(?P<rest>.*)$")
_RESUMED = re.compile(r"^<\.\.\. (?P<name>\w+) resumed>\s?(?P<rest>.*)$")
_UNFINISHED = " <unfinished ...>"
_CALL = re.compile(r"^(?P<name>\w+)\((?P<args>.*)$")
_FD = re.compile(r"^(?P<fd>\d+)<(?P<target>.*?)>(?:,\s*|$)")
_ESCAPED_PATH = re.compile(r"^(?P<path>(?:\\x[0-9a-f]{2})+)(?P<device><[^<>]*>)?$")
_HEX = re.compile(r"^(?:\\x[0-9a-f]{2})*$")
_DATA = re.compile(r'^"(?P<hex>(?:\\x[0-9a-f]{2})*)"')


def unhex(text: str) -> bytes:
    """The bytes of a `-xx` string (every byte as \\xHH)."""
    if not _HEX.match(text):
        raise ValueError(f"not an strace -xx string: {text[:80]!r}")
    return bytes.fromhex(text.replace("\\x", ""))


@dataclass(frozen=True)
class Call:
    """One system call as strace saw it."""

    tid: int
    name: str
    fd: int | None  # the first argument, when it is a descriptor
    target: str  # what -yy says that descriptor is: a file's path, or e.g. "TCP:[127.0.0.1:7720->127.0.0.1:5000]"
    data: bytes  # the buffer written or read (sendto, recvfrom, write, pwrite64...); b"" when none is shown
    result: int | None  # None when strace could not tell ("?": the thread died in the call)
    entered: int  # index of the line where the call began
    returned: int  # index of the line where it returned (the same line when nothing interleaved)
    entered_at: float  # the -ttt timestamp of the line where it began
    at: float  # the -ttt timestamp of the returning line

    @property
    def path(self) -> Path | None:
        """The descriptor's target as a path, when it is a file or directory."""
        return Path(self.target) if self.target.startswith("/") else None


def _target(raw: str) -> str:
    # -xx escapes paths byte by byte, and -yy may follow a device's path with "<char 1:9>"; socket
    # descriptions (TCP:[...], UNIX-STREAM:[...]) stay plain text.
    m = _ESCAPED_PATH.match(raw)
    if m is None:
        return raw
    return unhex(m["path"]).decode("utf-8", "surrogateescape") + (m["device"] or "")


def _call(tid: int, text: str, entered: tuple[int, float], returned: int, at: float) -> Call | None:
    head, sep, tail = text.rpartition(") = ")
    if not sep:
        return None  # e.g. a call cut short by the thread's exit ("= ?" without the parenthesis)
    m = _CALL.match(head)
    if m is None:
        return None
    args = m["args"]
    fd, target, data = None, "", b""
    fdm = _FD.match(args)
    if fdm is not None:
        fd, target = int(fdm["fd"]), _target(fdm["target"])
        datam = _DATA.match(args[fdm.end() :])
        if datam is not None:
            data = unhex(datam["hex"])
    word = tail.split(" ", 1)[0]
    result = int(word) if re.fullmatch(r"-?\d+", word) else None
    return Call(tid, m["name"], fd, target, data, result, entered[0], returned, entered[1], at)


def parse(text: str) -> list[Call]:
    """Every complete call in an `strace -f -ttt -yy -xx` log, in the order they returned."""
    calls: list[Call] = []
    begun: dict[int, tuple[str, tuple[int, float]]] = {}  # tid -> (the unfinished text, its line index and time)
    for index, line in enumerate(text.splitlines()):
        m = _LINE.match(line)
        if m is None:
            continue
        tid, at, rest = int(m["tid"]), float(m["at"]), m["rest"]
        if rest.startswith(("+++", "---")):
            continue  # exits and signals
        resumed = _RESUMED.match(rest)
        if resumed is not None:
            if tid not in begun:
                continue  # its first half came before the trace started
            start, entered = begun.pop(tid)
            rest = start + resumed["rest"]
        else:
            entered = (index, at)
        if rest.endswith(_UNFINISHED):
            begun[tid] = (rest[: -len(_UNFINISHED)], entered)
            continue
        call = _call(tid, rest, entered, index, at)
        if call is not None:
            calls.append(call)
    return calls
