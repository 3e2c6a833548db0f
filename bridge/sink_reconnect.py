"""A sink's reconnect policy, free of I/O: full-jitter back-off, the round robin over a cluster's nodes, and
take-over detection (the broker closing each session right after connect because another client has our id)."""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlparse

#: Defaults of `reconnect_base` and `reconnect_cap` (seconds).
BASE = 1.0
CAP = 60.0


def backoff(attempt: int, base: float = BASE, cap: float = CAP, rand: Callable[[], float] = random.random) -> float:
    """The wait before retry `attempt` (0: the first retry): uniform in [0, min(cap, base * 2**attempt)].

    Full jitter, the first retry too: a fleet that lost one broker node together does not come back together.
    `rand` gives a float in [0, 1) (injectable so that tests are deterministic).
    """
    # 2**attempt overflows a float past ~1024 retries: the cap is reached long before.
    ceiling = cap if attempt >= 64 else min(cap, base * 2.0**attempt)
    return max(0.0, ceiling) * rand()


@dataclass(frozen=True)
class Node:
    """One broker address of a sink: `mqtt://host:port` or `mqtts://…`."""

    url: str
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> Node:
        """The node of a validated url (the port defaults to 1883, or 8883 for mqtts)."""
        parsed = urlparse(url)
        tls = parsed.scheme == "mqtts"
        return cls(url, parsed.hostname or "127.0.0.1", parsed.port or (8883 if tls else 1883), tls)


class Nodes:
    """The nodes of one cluster in turn: a sink stays on one while it works and moves to the next when it fails."""

    def __init__(self, urls: Sequence[str]) -> None:
        """`urls`: at least one."""
        if not urls:
            raise ValueError("a sink needs at least one url")
        self._nodes = tuple(Node.parse(u) for u in urls)
        self._at = 0

    @property
    def current(self) -> Node:
        """The node the next connection attempt goes to."""
        return self._nodes[self._at]

    @property
    def any_tls(self) -> bool:
        """True when some node is `mqtts://`."""
        return any(n.tls for n in self._nodes)

    def __len__(self) -> int:
        """How many nodes."""
        return len(self._nodes)

    def advance(self) -> Node:
        """After a failed attempt or a dropped connection: the next node (round robin)."""
        self._at = (self._at + 1) % len(self._nodes)
        return self.current


class TakeoverWatch:
    """Tells a take-over (sessions closed by the broker within `quick` s of their CONNACK, `times` times within
    `period` s) from a broker that merely restarts; one episode is reported once, not once per drop."""

    def __init__(
        self,
        quick: float = 5.0,
        times: int = 3,
        period: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Defaults: three drops within 5 s of connect, within a minute."""
        self.quick, self.times, self.period = quick, times, period
        self._clock = clock
        self._since: float | None = None
        self._drops: deque[float] = deque()
        self.in_episode = False

    def connected(self) -> None:
        """A CONNACK came: the session starts now."""
        self._since = self._clock()

    def message(self, sink: str, client_id: str, url: str) -> str:
        """The ERROR line of an episode: what happens and what to do."""
        return (
            f"sink {sink}: another gateway uses the client id {client_id} on {url}: the broker closed this session "
            f"{self.times} times within {self.quick:g} s of connecting (give each gateway its own gateway.id, or "
            "the sink its own client_id)"
        )

    def dropped(self) -> bool:
        """The broker closed a session that was up: True when this starts a take-over episode (report it)."""
        now = self._clock()
        since, self._since = self._since, None
        if since is None or now - since > self.quick:
            # A session that lasted is no take-over: whatever follows is a new episode.
            self._drops.clear()
            self.in_episode = False
            return False
        self._drops.append(now)
        while self._drops and now - self._drops[0] > self.period:
            self._drops.popleft()
        if len(self._drops) >= self.times and not self.in_episode:
            self.in_episode = True
            return True
        return False
