"""The MCP/1 client's bookkeeping: its frames awaiting an answer and when to retransmit them, its answers to COMMANDs.

`client.py` owns the sockets and the session loop and decides what to do; this module only keeps track, without I/O.
Each step of a DATA frame (queued, sent, looked up by the seq of an answer, due again, forgotten) is O(1) or O(log n)
in the number outstanding: a dict by seq and a heap of deadlines, so a large window costs no more per frame.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from drivers.mcp.codec import Frame, FrameType, encode, seq_next

CommandHandler = Callable[[str, dict[str, Any]], Awaitable[Any]]
"""(name, args) -> result; raising answers the COMMAND with ok=false and str(exc)."""

RESPONSE_CACHE = 64  # answered COMMAND seqs kept per connection for the gateway's retransmissions


@dataclass(eq=False)
class Pending:
    """A frame of ours that expects an ACK: the exact bytes to retransmit and when to."""

    type: FrameType
    seq: int  # 0 until first sent: DATA queued while offline is numbered after the HELLO that precedes it
    data: bytes  # the payload until first sent, then the whole frame
    future: asyncio.Future[None]  # done once answered; a DATA sender awaits it
    conn: Connection | None = None  # the connection it was last sent on
    deadline: float = 0.0  # loop time at which it is retransmitted
    tries: int = 0  # retransmissions on `conn`
    order: int = 0  # DATA: its place in send order, which every (re)send on a connection follows
    version: int = 0  # DATA: bumped with each new deadline, which voids its older entries in the deadline heap


class ReplyCache:
    """One connection's answers to the gateway's COMMANDs, by seq: the handler runs once per seq, and a retransmitted
    COMMAND gets the same RESPONSE bytes again."""

    def __init__(self, size: int = RESPONSE_CACHE) -> None:
        self._size = size
        self._responses: OrderedDict[int, bytes | None] = OrderedDict()  # None: the handler is still running

    def __contains__(self, seq: int) -> bool:
        return seq in self._responses

    def get(self, seq: int) -> bytes | None:
        """The RESPONSE to COMMAND `seq`; None while its handler runs (or for a seq not kept)."""
        return self._responses.get(seq)

    def begin(self, seq: int) -> None:
        """COMMAND `seq` is being answered; beyond `size` seqs the oldest is forgotten."""
        self._responses[seq] = None
        while len(self._responses) > self._size:
            self._responses.popitem(last=False)

    async def answer(self, seq: int, handler: CommandHandler | None, name: str, args: dict[str, Any]) -> bytes:
        """Run the handler for COMMAND `seq` (after `begin`) and return its RESPONSE frame, kept unless forgotten."""
        body: dict[str, Any]
        if handler is None:
            body = {"ok": False, "error": "no command handler"}
        else:
            try:
                body = {"ok": True, "result": await handler(name, args)}
            except Exception as exc:  # the handler's failure is the device's answer, not the client's
                body = {"ok": False, "error": str(exc) or type(exc).__name__}
        try:
            frame = Frame.json(FrameType.RESPONSE, seq, body)
        except (TypeError, ValueError) as exc:
            frame = Frame.json(FrameType.RESPONSE, seq, {"ok": False, "error": f"result is not JSON: {exc}"})
        data = encode(frame)
        if seq in self._responses:
            self._responses[seq] = data
        return data


@dataclass(eq=False)
class Connection:
    """One TCP connection and the state that dies with it."""

    writer: asyncio.StreamWriter
    last_sent: float
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # something for the session loop to look at
    control: dict[int, Pending] = field(default_factory=dict)  # HELLO and HEARTBEAT awaiting their ACK
    # Per connection, because nothing says the gateway's COMMAND counter survives a reconnect.
    responses: ReplyCache = field(default_factory=ReplyCache)
    ready_at: float | None = None  # loop time of the HELLO ACK
    error: Exception | None = None
    closed: bool = False
    reader_task: asyncio.Task[None] | None = None

    def fail(self, exc: Exception) -> None:
        """Mark the connection broken (the first cause wins) and wake the session loop to close it."""
        if self.error is None:
            self.error = exc
        self.wake.set()


_Entry = tuple[float, int, int, Pending]  # (deadline, order, version, frame): void once the frame's version moved on


class Outstanding:
    """Our frames awaiting an answer, and the one counter that numbers every frame we originate (continued across
    reconnects). HELLO and HEARTBEAT wait in their connection's `control`, two at most; DATA waits here across
    connections, in send order, by seq, and by deadline on the connection it was last sent on.

    Deadlines are kept for one connection at a time, the last one `due` saw ready: a new connection starts with none,
    as everything outstanding goes out on it again anyway.
    """

    def __init__(self) -> None:
        self.seq = 0  # the last seq given out
        self._frames: dict[Pending, None] = {}  # DATA; insertion order is send order
        self._by_seq: dict[int, Pending] = {}
        self._unsent: dict[Pending, None] = {}  # DATA to send on `_conn` for the first time, in send order
        self._heap: list[_Entry] = []  # deadlines of DATA sent on `_conn`, void entries included
        self._conn: Connection | None = None
        self._order = itertools.count()

    def __iter__(self) -> Iterator[Pending]:
        """The DATA frames in send order (a copy: senders may come and go meanwhile)."""
        return iter(list(self._frames))

    def add(self, p: Pending) -> None:
        """A new DATA frame, behind all the others."""
        p.order = next(self._order)
        self._frames[p] = None
        self._unsent[p] = None

    def remove(self, p: Pending) -> None:
        """Forget DATA `p` (answered, or its sender gave up): a late answer to its seq then finds nothing."""
        del self._frames[p]
        self._unsent.pop(p, None)
        if self._by_seq.get(p.seq) is p:
            del self._by_seq[p.seq]

    def get(self, seq: int) -> Pending | None:
        """The outstanding DATA frame that was sent with `seq`."""
        return self._by_seq.get(seq) if seq else None

    def control(self, conn: Connection, kind: FrameType, body: dict[str, Any] | None) -> Pending:
        """A new HELLO or HEARTBEAT, numbered and encoded, awaiting its ACK in `conn.control`."""
        self.seq = seq_next(self.seq)
        frame = Frame(kind, self.seq) if body is None else Frame.json(kind, self.seq, body)
        p = Pending(kind, self.seq, encode(frame), asyncio.get_running_loop().create_future())
        conn.control[p.seq] = p
        return p

    def sent(self, conn: Connection, p: Pending, deadline: float) -> bool:
        """`p` is being written on `conn` (numbered now when new) and is due again at `deadline`; True when resent."""
        if not p.seq:
            self.seq = p.seq = seq_next(self.seq)
            p.data = encode(Frame(p.type, p.seq, p.data))
        resent = p.conn is not None
        p.tries = p.tries + 1 if p.conn is conn else 0
        p.conn, p.deadline = conn, deadline
        self.schedule(p)
        return resent

    def schedule(self, p: Pending) -> None:
        """`p.deadline` changed (a no-op but for DATA: the session loop looks at the two control frames directly)."""
        if p not in self._frames:
            return
        self._by_seq[p.seq] = p
        p.version += 1
        if p.conn is self._conn:
            heapq.heappush(self._heap, (p.deadline, p.order, p.version, p))
            if len(self._heap) > 2 * len(self._frames) + 64:  # void entries piled up under a live one: sweep
                self._heap = [e for e in self._heap if self._live(e)]
                heapq.heapify(self._heap)

    def due(self, conn: Connection, now: float) -> Iterator[Pending]:
        """What to write on `conn` now, in order: control frames past their deadline; once `conn` is ready (HELLO
        ACKed), DATA in send order: all of it on a new connection, then each new frame and each one past its deadline.

        Lazily, like one scan of every frame in send order: a frame that a NACK 1 makes due while an earlier one is
        being written still goes out in this pass, one already passed in the next. The caller checks for answers."""
        ready = conn.ready_at is not None  # nothing but HELLO before the HELLO ACK (docs/mcp.md §5, code 6)
        control, unsent = list(conn.control.values()), deque[Pending]()  # the frames there are as the pass begins
        if ready:
            if conn is not self._conn:
                self._conn, self._heap, self._unsent = conn, [], dict(self._frames)
            unsent, self._unsent = deque(self._unsent), {}
        for p in control:
            if now >= p.deadline:
                yield p
        if not ready:
            return
        overdue: list[tuple[int, int, Pending]] = []  # (order, version, frame): past the deadline, ahead of the scan
        passed: list[_Entry] = []  # past the deadline, behind the scan: for the next pass
        scanned = -1  # send order of the last frame yielded
        try:
            while True:
                while self._heap and self._heap[0][0] <= now:
                    entry = heapq.heappop(self._heap)
                    if self._live(entry):
                        if entry[1] > scanned:
                            heapq.heappush(overdue, (entry[1], entry[2], entry[3]))
                        else:
                            passed.append(entry)
                while overdue and overdue[0][1] != overdue[0][2].version:  # rescheduled since
                    heapq.heappop(overdue)
                if overdue and not (unsent and unsent[0].order < overdue[0][0]):
                    p = heapq.heappop(overdue)[2]
                elif unsent:
                    p = unsent.popleft()
                else:
                    return
                scanned = p.order
                yield p
        finally:
            for entry in passed:
                heapq.heappush(self._heap, entry)

    def next_deadline(self, conn: Connection) -> float:
        """The earliest deadline of a frame awaiting its answer on `conn` (inf: none)."""
        deadline = math.inf
        for p in conn.control.values():  # HELLO, HEARTBEAT: two at most
            deadline = min(deadline, p.deadline)
        if conn.ready_at is not None and conn is self._conn:
            while self._heap and not self._live(self._heap[0]):
                heapq.heappop(self._heap)
            if self._heap:
                deadline = min(deadline, self._heap[0][0])
        return deadline

    def _live(self, entry: _Entry) -> bool:
        p = entry[3]
        return entry[2] == p.version and not p.future.done() and p in self._frames
