"""The outbox's bounds, pauses and log intervals, in one place for all of its parts.

Each part reads them as `outbox_limits.NAME` when it needs one (not copied at import), so that a test can set a
bound for the whole outbox at once.
"""

from __future__ import annotations

#: Entries taken from the spool per replay step, at most.
REPLAY_BATCH = 100
#: Refusal counts kept for spooled entries at most (ten replay batches); the oldest is forgotten first.
REPLAY_FAILURES_KEPT = 10 * REPLAY_BATCH
#: How often expired entries are dropped and the spool's figures refreshed.
HOUSEKEEPING_INTERVAL = 1.0
#: A message someone waits on that the connected broker has not acknowledged after this long is spooled
#: (and its waiter answered on the commit): a stalled broker holds up an MCP ACK this long at most, not
#: until the keep-alive gives up on the connection.
LIVE_WAIT_MAX = 5.0
#: Adds, at most, spent on one refused batch to find the items that cannot be stored: two when the spool
#: names them, else halving it each time (one bad item among a thousand takes about 20); whatever is
#: still unsorted after that is refused.
SPLIT_ADDS = 32
#: Times a spooled entry is offered to a connected broker that refuses it (not a lost connection) before
#: it is dropped, so that it cannot hold up the backlog behind it.
REPLAY_ATTEMPTS = 3
#: Older stored states of a retained topic the replay holds back, at most (taken, neither removed nor sent), while
#: a newer one is on its way: if that one is never delivered, the newest of them goes instead. The oldest ones are
#: let go beyond this: one is needed only if every newer one is refused, and each is memory until then.
RETAINED_FALLBACKS = 8
#: How long a loop waits after an unexpected failure before it goes on.
LOOP_PAUSE = 1.0
#: A refusal is logged at once, then at most this often (with the count in between).
REFUSAL_LOG_INTERVAL = 10.0
