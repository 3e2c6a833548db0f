"""Who may open an MCP connection: pending (not yet logged in) connections per address, and login bans.

Pure bookkeeping with the clock passed in; the server asks it at accept and tells it about every
failed login. Everything here is bounded: an attacker with many addresses cannot grow the tables
beyond `MAX_TRACKED` addresses (the least recently seen are forgotten first).
"""

from __future__ import annotations

import collections
import ipaddress
from dataclasses import dataclass, field

#: Addresses whose failed logins, bans and log throttle are remembered at once.
MAX_TRACKED = 4096
#: A failed login is logged at most this often per address; the rest are counted and said in the next line.
LOG_EVERY = 60.0


def address_key(host: object) -> str:
    """The unit limits and bans apply to: an IPv4 address, or the /64 network of an IPv6 one."""
    text = str(host)
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return text[:64]  # a UNIX socket or something odd: keyed as given, bounded
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        # One host on IPv6 usually holds a whole /64: counting single addresses would let it rotate forever.
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass
class _Record:
    """What is known about one address."""

    failures: collections.deque[float]
    banned_until: float = 0.0
    logged_at: float = float("-inf")
    suppressed: int = 0


@dataclass
class LogDecision:
    """Whether to log a failed login now, and how many failures since the last line went unsaid."""

    log: bool
    suppressed: int = 0


@dataclass
class BanList:
    """Failed logins per address within `window` seconds; `failures` of them ban it for `ban_time` seconds."""

    failures: int
    window: float
    ban_time: float
    max_tracked: int = MAX_TRACKED
    _records: collections.OrderedDict[str, _Record] = field(default_factory=collections.OrderedDict)

    def configure(self, failures: int, window: float, ban_time: float) -> None:
        """Take new limits (a reload); bans in force keep their end."""
        self.failures, self.window, self.ban_time = failures, window, ban_time
        for rec in self._records.values():
            rec.failures = collections.deque(rec.failures, maxlen=failures)

    def __len__(self) -> int:
        return len(self._records)

    def banned(self, key: str, now: float) -> bool:
        """True while `key` is banned."""
        rec = self._records.get(key)
        return rec is not None and rec.banned_until > now

    def failed(self, key: str, now: float) -> tuple[bool, LogDecision]:
        """Record a failed login: (whether this one started a ban, whether to log it)."""
        rec = self._records.get(key)
        if rec is None:
            self._make_room(now)
            rec = _Record(collections.deque(maxlen=self.failures))
            self._records[key] = rec
        else:
            self._records.move_to_end(key)
        while rec.failures and rec.failures[0] <= now - self.window:
            rec.failures.popleft()
        rec.failures.append(now)
        started = False
        if len(rec.failures) >= self.failures and rec.banned_until <= now:
            rec.banned_until = now + self.ban_time
            rec.failures.clear()  # the ban is the answer to these; the next ones count afresh
            started = True
        if now - rec.logged_at >= LOG_EVERY:
            decision = LogDecision(True, rec.suppressed)
            rec.logged_at, rec.suppressed = now, 0
        else:
            rec.suppressed += 1
            decision = LogDecision(False)
        return started, decision

    def _make_room(self, now: float) -> None:
        """Forget addresses with nothing live; past `max_tracked`, the least recently seen."""
        # Records are kept in the order they were last touched, so the idle ones gather at the front:
        # popping from there is constant work per new address, however many addresses come.
        while self._records:
            key, rec = next(iter(self._records.items()))
            if len(self._records) < self.max_tracked and not self._idle(rec, now):
                return
            del self._records[key]

    def _idle(self, rec: _Record, now: float) -> bool:
        recent = bool(rec.failures) and rec.failures[-1] > now - self.window
        return not recent and rec.banned_until <= now and now - rec.logged_at >= LOG_EVERY


@dataclass
class PendingCount:
    """Connections not yet past HELLO, in all and per address (entries dropped at zero, so bounded by the total)."""

    total: int = 0
    by_key: dict[str, int] = field(default_factory=dict)

    def add(self, key: str) -> None:
        """One more pending connection from `key`."""
        self.total += 1
        self.by_key[key] = self.by_key.get(key, 0) + 1

    def remove(self, key: str) -> None:
        """One pending connection from `key` logged in or ended."""
        self.total -= 1
        left = self.by_key.get(key, 0) - 1
        if left > 0:
            self.by_key[key] = left
        else:
            self.by_key.pop(key, None)

    def of(self, key: str) -> int:
        """Pending connections from `key` now."""
        return self.by_key.get(key, 0)
