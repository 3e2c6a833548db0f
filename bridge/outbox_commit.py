"""The group commit: messages for the spool gathered for `commit_window`, then added in one transaction.

One fsync for the lot, from a worker thread when the buffer does I/O. No message stops it: a batch the spool
refuses for what its items hold (a `ts` beyond SQLite's int64, a topic that cannot be UTF-8, a message larger
than max_size) is split until only those items fail (at most SPLIT_ADDS adds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from bridge import outbox_limits as limits
from bridge.buffer import BufferFull, EntryRefused, StorageError
from bridge.delivery import Delivery, OutboxStats, log
from bridge.outbox_buffer import OutboxBuffer
from bridge.outbox_retained import RetainedTopics
from gateway.errors import SinkError


class GroupCommit:
    """The messages waiting for the next spool commit, and the loop that commits them."""

    def __init__(
        self,
        spool: OutboxBuffer,
        retained: RetainedTopics,
        stats: OutboxStats,
        *,
        commit_window: float,
        not_retained: Callable[[Delivery], None],
        monotonic: Callable[[], float],
    ) -> None:
        self.spool = spool
        self.commit_window = commit_window
        self.pending: list[Delivery] = []  # waiting for the next spool commit
        self.committing = 0  # messages in a spool commit under way
        self.task: asyncio.Task[None] | None = None  # the commit under way
        self._pending_ready = asyncio.Event()
        self._retained = retained
        self._stats = stats
        self._not_retained = not_retained
        self._monotonic = monotonic
        self._refusal_logged = -limits.REFUSAL_LOG_INTERVAL
        self._refusals_unlogged = 0

    @property
    def waiting(self) -> int:
        """Messages waiting for a commit or in one."""
        return len(self.pending) + self.committing

    def spool_it(self, item: Delivery) -> None:
        """Send a message to the spool with the next commit (once; not if it is settled already)."""
        if item.to_spool or item.settled:
            return
        item.to_spool = True
        self.pending.append(item)
        self._pending_ready.set()

    async def run(self) -> None:
        """Commit what is pending, one batch per commit window, for ever."""
        while True:
            await self._pending_ready.wait()
            if self.commit_window and self.spool.buffer.durable:
                await asyncio.sleep(self.commit_window)  # gather: one transaction, one fsync
            batch, self.pending = self.pending, []
            self._pending_ready.clear()
            batch.sort(key=lambda it: it.seq)  # failed in-flight messages come back after younger ones
            # Counted as committing in this same step: between here and the task's first step, flush(), len()
            # and the backlog would otherwise miss the batch (and `order: strict` let younger messages go live).
            items = self._begin(batch)
            # Shielded: stop() waits for it rather than cutting a commit (and its waiters) in half.
            self.task = asyncio.ensure_future(self._write(items))
            try:
                await asyncio.shield(self.task)
            except asyncio.CancelledError:
                raise
            except Exception:  # _write settles its items whatever happens: this is a bug, not a reason to stop
                log.exception("sink %s: spool commit failed", self.spool.sink_name)
                await asyncio.sleep(limits.LOOP_PAUSE)
            finally:
                if self.task.done():
                    self.task = None

    async def commit(self, batch: list[Delivery]) -> None:
        """Add the batch to the spool; settle everyone waiting on it (stored, or failed with SinkError)."""
        await self._write(self._begin(batch))

    def _begin(self, batch: list[Delivery]) -> list[Delivery]:
        """Settle the superseded items of the batch and count the rest as committing: the ones to write."""
        items = [it for it in batch if not it.superseded or it.awaited]
        for it in batch:
            if it.superseded and not it.awaited:
                it.resolve()
        self.committing += len(items)
        return items

    async def _write(self, items: list[Delivery]) -> None:
        """Write items counted by _begin; they stay counted until the spool's count includes them."""
        if not items:
            return
        stored = 0
        held: int | None = None
        try:
            try:
                stored = await self._store(items)
            except Exception as exc:
                log.exception("sink %s: spool commit failed", self.spool.sink_name)
                self._refused(
                    [it for it in items if not it.settled], SinkError(f"sink {self.spool.sink_name}: {exc!r}")
                )
            with contextlib.suppress(Exception):
                held = (await self.spool.refresh()).count  # also counts out what drop_oldest evicted
        finally:
            # One step, so that the backlog never looks empty between the commit and its count.
            self.committing -= len(items)
            self.spool.count = held if held is not None else self.spool.count + stored
        if stored:
            self.spool.grown.set()

    async def _store(self, items: list[Delivery]) -> int:
        """Add `items` in one transaction; how many were stored.

        If the spool refuses them for what they hold (not for room or storage), the items it names fail and
        the rest is stored in one more add; if it names none, the batch is halved and each half stored on
        its own, older first, until only the items that cannot be stored fail: at most SPLIT_ADDS adds split
        further, each half still waiting then is tried once more as it is.
        """
        stored, budget = 0, limits.SPLIT_ADDS
        todo = [items]  # the next to try at the end
        while todo:
            chunk = todo.pop()
            budget -= 1
            try:
                ids = await self._add(chunk)
            except SinkError as exc:
                # Full, disk, I/O: the same for every item. Anything else may be about some items only.
                whole = isinstance(exc, (BufferFull, StorageError)) and not isinstance(exc, EntryRefused)
                bad = set(exc.bad) if isinstance(exc, EntryRefused) else set()
                if not whole and bad and budget > 0 and bad.issubset(range(len(chunk))):
                    # The buffer named the items at fault: they fail, the others go in as one.
                    self._refused([it for i, it in enumerate(chunk) if i in bad], exc)
                    rest = [it for i, it in enumerate(chunk) if i not in bad]
                    if rest:
                        todo.append(rest)
                    continue
                if whole or len(chunk) == 1 or budget <= 0:
                    self._refused(chunk, exc)
                    continue
                half = len(chunk) // 2
                todo += [chunk[half:], chunk[:half]]
                continue
            self._stored(chunk, ids)
            stored += len(ids)
        return stored

    async def _add(self, items: list[Delivery]) -> list[int]:
        """buffer.add; anything else than a SinkError it raises (a bug, an odd buffer) becomes one."""
        try:
            return await self.spool.call(self.spool.buffer.add, [(it.message, it.ts) for it in items])
        except SinkError:
            raise
        except Exception as exc:
            raise SinkError(f"sink {self.spool.sink_name}: cannot spool: {exc!r}") from exc

    def _stored(self, items: list[Delivery], ids: list[int]) -> None:
        """Account for a committed add and settle its waiters."""
        self._stats.spooled += len(ids)
        self._retained.stored(items, ids)
        for it in items:
            it.resolve()

    def _refused(self, items: list[Delivery], exc: SinkError) -> None:
        """The spool will not take these: they fail, counted, and logged at once then at most every interval."""
        if not items:
            return
        self._stats.refused += len(items)
        for it in items:
            self._not_retained(it)
            it.resolve(exc)
        now = self._monotonic()
        self._refusals_unlogged += len(items)
        if now - self._refusal_logged < limits.REFUSAL_LOG_INTERVAL:
            return
        level = logging.WARNING if isinstance(exc, BufferFull) else logging.ERROR
        log.log(
            level,
            "sink %s: %d message(s) not spooled (%d so far): %s",
            self.spool.sink_name,
            self._refusals_unlogged,
            self._stats.refused,
            exc,
        )
        self._refusal_logged = now
        self._refusals_unlogged = 0
