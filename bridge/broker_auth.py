"""Who may use the embedded broker, as amqtt plugins: logins checked through a bounded gate, topics by the ACL.

amqtt's own plugins do not fit: its FileAuthPlugin reads the file once and knows no second source of
users (the gateway's own sinks log in with a secret made at start), and its ACL plugin matches patterns
level by level without MQTT's `$` rule. Both plugins here take their settings as one JSON-able dict
(`BrokerAuth.to_json()`, `bridge/broker_acl.py`), so that the broker child process gets exactly what the
inline broker gets. The users file is `bridge/broker_users.py`.

Logins are a way in for anyone who can reach a listener: each password check is argon2id (64 MiB and
some 0.2 s of CPU on purpose), so a flood of CONNECTs must not run them without bound. `LOGINS` runs at
most LOGIN_CHECKS at once, on threads of its own (not the default executor the sinks use), lets at most
LOGIN_QUEUE more wait and at most LOGIN_PER_SOURCE of them come from one address (so that one address
cannot fill the queue and have every other user refused), refuses any beyond at once, and counts every
refusal by reason (`login_failures`).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from bridge.broker_acl import BrokerAuth
from bridge.broker_users import INTERNAL_USER, LOGIN_FAILURES, UsersFile, verify_password

log = logging.getLogger(__name__)

#: argon2 checks at once, at most: each holds 64 MiB while it runs, and more than the cores only queue.
LOGIN_CHECKS = 2
#: Logins waiting for a check, at most; any beyond are refused at once (counted as `busy`).
LOGIN_QUEUE = 32
#: Logins from one source address checked or waiting at once, at most; any beyond are refused as `busy`.
#: Two checks take some 0.4 s: a client that logs in again at once after each refusal (about 10 wrong
#: logins a second) holds at most this many places, and the other users find the rest of the queue free.
LOGIN_PER_SOURCE = 4
#: A refusal is logged once per reason per this many seconds (with the count in between).
LOGIN_LOG_INTERVAL = 60.0


class LoginGate:
    """The broker's password checks: at most `checks` at once on threads of their own, at most `queue` waiting,
    at most `per_source` (running or waiting) from one address."""

    def __init__(
        self, checks: int = LOGIN_CHECKS, queue: int = LOGIN_QUEUE, per_source: int = LOGIN_PER_SOURCE
    ) -> None:
        self.checks = checks
        self.queue = queue
        self.per_source = per_source
        self.failures: dict[str, int] = dict.fromkeys(LOGIN_FAILURES, 0)
        # Checks handed to the threads and not finished yet (running or waiting), in all and by source address:
        # counted down when the thread's work ends, not when the login waiting for it goes (a client that
        # hangs up does not stop a check that runs, so it must hold its place until it ends).
        self.pending = 0
        self.by_source: dict[str, int] = {}
        self.running = 0
        self.peak = 0  # the most checks that ever ran at once
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._logged: dict[str, tuple[float, int]] = {}  # reason -> (last logged, refused since)

    @property
    def waiting(self) -> int:
        """Logins waiting for a thread now."""
        return max(0, self.pending - self.running)

    async def check(self, password: str, hashed: str | None, source: str | None = None) -> bool | None:
        """True if `password` matches `hashed` (None: an unknown user, checked all the same); None when busy
        (the queue is full, or `source`, the client's address, has `per_source` logins under way)."""
        key = source or "?"
        with self._lock:
            if self.pending >= self.checks + self.queue or self.by_source.get(key, 0) >= self.per_source:
                return None
            self.pending += 1
            self.by_source[key] = self.by_source.get(key, 0) + 1
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.checks, "broker-login")
            work = self._executor.submit(self._run, password, hashed)
        # Whether the check ran or, cancelled while still waiting, never will.
        work.add_done_callback(lambda _: self._done(key))
        return await asyncio.wrap_future(work)

    def _done(self, key: str) -> None:
        with self._lock:
            self.pending -= 1
            left = self.by_source[key] - 1
            if left:
                self.by_source[key] = left
            else:
                del self.by_source[key]

    def _run(self, password: str, hashed: str | None) -> bool:
        with self._lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            return verify_password(password, hashed)
        finally:
            with self._lock:
                self.running -= 1

    def refused(self, reason: str, user: str | None, session: Session) -> None:
        """Count a refused login; log it, at most once per reason every LOGIN_LOG_INTERVAL."""
        with self._lock:
            self.failures[reason] = self.failures.get(reason, 0) + 1
            last, since = self._logged.get(reason, (-LOGIN_LOG_INTERVAL, 0))
            now = time.monotonic()
            if now - last < LOGIN_LOG_INTERVAL:
                self._logged[reason] = (last, since + 1)
                return
            self._logged[reason] = (now, 0)
        more = f"; {since} more refused for this reason in the last minute or so" if since else ""
        log.warning(
            "broker login refused (%s) for user %r, client %r from %s%s",
            reason,
            user,
            session.client_id,
            session.remote_address,
            more,
        )


#: The password checks of every broker this process runs.
LOGINS = LoginGate()


def login_failures() -> dict[str, int]:
    """Refused broker logins since start, by reason (every reason of LOGIN_FAILURES present)."""
    with LOGINS._lock:
        return dict(LOGINS.failures)


class UsersAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt ships no type hints: its bases are Any
    """amqtt authentication: users of the users file (argon2) and the gateway's own INTERNAL_USER."""

    @dataclass
    class Config:
        """The plugin's settings: a `BrokerAuth.to_json()`."""

        auth: dict[str, Any] = field(default_factory=dict)

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._auth = BrokerAuth.from_json(self.config.auth)
        self._file = UsersFile(self._auth.users_file)

    async def authenticate(self, *, session: Session) -> bool:
        """True for a known user with its password; anonymous clients are refused. Never raises."""
        user = session.username
        try:
            reason = await self._refusal(session)
        except Exception:
            log.exception("broker login of user %r: the check failed", user)
            reason = "error"
        if reason is None:
            return True
        LOGINS.refused(reason, user, session)
        return False

    async def _refusal(self, session: Session) -> str | None:
        """Why this login is refused (a LOGIN_FAILURES reason), or None to let it in."""
        user, password = session.username, session.password or ""
        if not user:
            return "anonymous"
        if user == INTERNAL_USER:
            secret = self._auth.internal_password
            known = secret is not None and hmac.compare_digest(password.encode(), secret.encode())
            return None if known else "bad_password"
        hashed = self._file.current().get(user)
        # argon2 is slow on purpose: off the loop, on threads of its own, a bounded number at once.
        ok = await LOGINS.check(password, hashed, session.remote_address)
        if ok is None:
            return "busy"
        if not ok:
            return "unknown_user" if hashed is None else "bad_password"
        # amqtt publishes (and retains) a last will without any topic check: a will is a publish, so it must
        # be one the user may make, or a read-only user could plant a `set` request or a fake retained value.
        if session.will_flag and session.will_topic and not self._auth.access(user).may_write(session.will_topic):
            return "will_denied"
        return None


class TopicAclPlugin(BaseTopicPlugin):  # type: ignore[misc]  # amqtt ships no type hints: its bases are Any
    """amqtt topic checks: subscribe and publish within the user's `Access`; everything for INTERNAL_USER."""

    @dataclass
    class Config:
        """The plugin's settings: a `BrokerAuth.to_json()`."""

        auth: dict[str, Any] = field(default_factory=dict)

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._auth = BrokerAuth.from_json(self.config.auth)
        self._receive = functools.lru_cache(maxsize=4096)(self._may_receive)

    def _may_receive(self, user: str, topic: str) -> bool:
        return self._auth.access(user).may_read(topic)

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool:
        """True if the session's user may do `action` on `topic`; amqtt counts anything but True as a no."""
        if session is None or not topic or not session.username:
            return False
        user = session.username
        if user == INTERNAL_USER:
            return True
        access = self._auth.access(user)
        if action == Action.SUBSCRIBE:
            return access.may_read(topic)
        if action == Action.PUBLISH:
            return access.may_write(topic)
        if action == Action.RECEIVE:
            # Checked again per message: amqtt lets a client that reuses a persistent session's client id
            # take over that session's subscriptions, whoever made them. Cached: this runs per delivery.
            return self._receive(user, topic)
        return False
