"""Who may use the embedded broker and how: a users file of argon2 hashes and a topic ACL, as amqtt plugins.

amqtt's own plugins do not fit: its FileAuthPlugin reads the file once and knows no second source of
users (the gateway's own sinks log in with a secret made at start), and its ACL plugin matches patterns
level by level without MQTT's `$` rule. Both plugins here take their settings as one JSON-able dict, so
that the broker child process gets exactly what the inline broker gets.

Logins are a way in for anyone who can reach a listener: each password check is argon2id (64 MiB and
some 0.2 s of CPU on purpose), so a flood of CONNECTs must not run them without bound. `LOGINS` runs at
most LOGIN_CHECKS at once, on threads of its own (not the default executor the sinks use), lets at most
LOGIN_QUEUE more wait and at most LOGIN_PER_SOURCE of them come from one address (so that one address
cannot fill the queue and have every other user refused), refuses any beyond at once, and counts every
refusal by reason (`login_failures`).
A users file that cannot be read at start is moved aside (`recover_users_file`) and the broker starts
with none: only the gateway's own sinks get in until users are added again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hmac
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

from bridge.statefiles import move_aside
from gateway.errors import FieldgateError

log = logging.getLogger(__name__)

#: argon2 checks at once, at most: each holds 64 MiB while it runs, and more than the cores only queue.
LOGIN_CHECKS = 2
#: Logins waiting for a check, at most; any beyond are refused at once (counted as `busy`).
LOGIN_QUEUE = 32
#: Logins from one source address checked or waiting at once, at most; any beyond are refused as `busy`.
#: Two checks take some 0.4 s: a client that logs in again at once after each refusal (about 10 wrong
#: logins a second) holds at most this many places, and the other users find the rest of the queue free.
LOGIN_PER_SOURCE = 4
#: Why logins are refused, as `fieldgate_broker_auth_failures_total{reason}` names them.
LOGIN_FAILURES = ("anonymous", "unknown_user", "bad_password", "busy", "will_denied", "error")
#: A refusal is logged once per reason per this many seconds (with the count in between).
LOGIN_LOG_INTERVAL = 60.0
#: The most memory one user's hash may ask of a check (KiB): `fieldgate passwd` makes 64 MiB ones.
MAX_ARGON2_KIB = 256 * 1024
_ARGON2_COST = re.compile(r"\$argon2(?:id|i|d)\$v=\d+\$m=(?P<m>\d{1,12}),t=(?P<t>\d{1,12}),p=(?P<p>\d{1,12})\$")
#: A users file larger than this is no users file (a line per user; thousands of users take a few hundred KiB).
MAX_USERS_BYTES = 4 * 1024**2

#: The user the gateway's own sinks log in as; `$` keeps it out of the users file (see `check_username`).
INTERNAL_USER = "$fieldgate"

_HASHER = PasswordHash((Argon2Hasher(),))


# --- topic patterns ------------------------------------------------------------------------------


def covers(pattern: str, topic: str) -> bool:
    """True if every topic that `topic` (a topic or a filter) can match is matched by `pattern`.

    MQTT matching, made to work on filters: `+` in `topic` is covered only by `+` or `#`, `#` only by
    `#`. As in MQTT, a wildcard at the first level never matches a topic starting with `$`.
    """
    p, t = pattern.split("/"), topic.split("/")
    for i, level in enumerate(p):
        if level == "#":
            return not (i == 0 and t[0].startswith("$"))
        if i >= len(t) or t[i] == "#":
            return False
        if level == "+":
            if i == 0 and t[0].startswith("$"):
                return False
            continue
        if t[i] != level:  # a `+` in the topic is broader than any literal level
            return False
    return len(t) == len(p)


@dataclass(frozen=True)
class Access:
    """What one user may do: filters it may subscribe to (read) and topics it may publish to (write)."""

    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()

    def may_read(self, topic_filter: str) -> bool:
        """True if a subscription to `topic_filter` stays within what this user may read."""
        return any(covers(p, topic_filter) for p in self.read)

    def may_write(self, topic: str) -> bool:
        """True if this user may publish to `topic`."""
        return any(covers(p, topic) for p in self.write)


def default_access(prefixes: list[str]) -> Access:
    """What any user may do without an ACL: read everything (not `$…`), write only set/cmd requests."""
    write = [t for p in prefixes for t in (f"{p}/+/set/+", f"{p}/+/cmd")]
    return Access(read=("#",), write=tuple(dict.fromkeys(write)))


@dataclass(frozen=True)
class BrokerAuth:
    """Who may connect to the embedded broker (the users file) and what each user may do."""

    users_file: str
    acl: Mapping[str, Access] = field(default_factory=dict)
    #: For users the ACL does not name; `Access()` (nothing) when an ACL is given.
    default: Access = Access()
    #: The password of INTERNAL_USER, made at each start and held only in memory.
    internal_password: str | None = field(default=None, repr=False)

    def access(self, user: str) -> Access:
        """The access of an authenticated user."""
        return self.acl.get(user, self.default)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able form (for amqtt's plugin config and the broker child's stdin)."""
        return {
            "users_file": self.users_file,
            "acl": {u: {"read": list(a.read), "write": list(a.write)} for u, a in self.acl.items()},
            "default": {"read": list(self.default.read), "write": list(self.default.write)},
            "internal_password": self.internal_password,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BrokerAuth:
        """The inverse of `to_json`."""

        def access(d: Mapping[str, Any]) -> Access:
            return Access(tuple(d.get("read", ())), tuple(d.get("write", ())))

        return cls(
            users_file=data["users_file"],
            acl={u: access(a) for u, a in data.get("acl", {}).items()},
            default=access(data.get("default", {})),
            internal_password=data.get("internal_password"),
        )

    def plugins(self) -> dict[str, Any]:
        """amqtt's `plugins` section: users-file authentication and the topic ACL (no anonymous access)."""
        cfg = {"auth": self.to_json()}
        return {f"{__name__}.UsersAuthPlugin": cfg, f"{__name__}.TopicAclPlugin": cfg}


# --- the users file ------------------------------------------------------------------------------


def check_username(user: str) -> str:
    """`user` if it can be a line of the users file; else FieldgateError."""
    if not user or any(c == ":" or c.isspace() or not c.isprintable() for c in user) or user[0] in "$#":
        raise FieldgateError(
            f"{user!r} cannot be a broker user: no ':', spaces or control characters, no '$' or '#' first"
        )
    return user


def read_users(path: str | Path) -> dict[str, str]:
    """The users file as {user: argon2 hash}; FieldgateError naming the line for anything else."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_USERS_BYTES + 1)
        if len(data) > MAX_USERS_BYTES:
            raise ValueError(f"larger than {MAX_USERS_BYTES} bytes")
        text = data.decode("utf-8")
    except (OSError, ValueError) as exc:
        raise FieldgateError(f"cannot read the broker users file {path}: {exc}") from exc
    users: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user or not hashed.startswith("$argon2") or "\0" in line:
            # The line is not echoed: it may be a password typed where a hash belongs.
            raise FieldgateError(f"{path}:{number}: not USER:ARGON2-HASH (make the lines with `fieldgate passwd`)")
        cost = _ARGON2_COST.match(hashed)
        if cost and (int(cost["m"]) > MAX_ARGON2_KIB or int(cost["t"]) > 16 or int(cost["p"]) > 16):
            # Every login of this user would cost that much: a flipped digit must not make it gigabytes.
            raise FieldgateError(f"{path}:{number}: the hash asks for more than {MAX_ARGON2_KIB} KiB or 16 passes")
        users[user] = hashed
    return users


def recover_users_file(path: str | Path) -> bool:
    """Move a users file that cannot be read aside and leave an empty one (no user) in its place; True if it did.

    For the broker's start: a file an SD card damaged, or a line broken by hand, must not keep the gateway
    (Modbus, MCP, its own sinks) down. An empty file lets no one in but the gateway's own sinks, so nobody
    gets more access than before. A missing file, or one the gateway may not read, is the operator's to
    fix and stays the broker's clear start error.
    """
    path = Path(path)
    try:
        read_users(path)
        return False
    except FieldgateError as exc:
        cause = exc.__cause__
        if isinstance(cause, OSError) and cause.errno != errno.EIO:
            return False
        reason = str(cause) if cause is not None else str(exc).removeprefix(f"{path}:")
    try:
        st = path.stat()
        moved = move_aside(path, "users", reason)
    except OSError as err:
        log.error("broker users file %s cannot be read (%s) and cannot be moved aside: %s", path, reason, err)
        return False
    note = (
        f"# Broker users, one USER:ARGON2-HASH per line: add them with `fieldgate passwd USER`.\n"
        f"# The file before this one could not be read and was moved aside to {moved.name}.\n"
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(note)
            with contextlib.suppress(PermissionError):  # readable by the gateway's user as the old one was
                os.fchown(f.fileno(), st.st_uid, st.st_gid)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        log.error("cannot write an empty broker users file %s: %s", path, err)
        return False
    log.error(
        "broker users file %s: no user can log in until added again with `fieldgate passwd` "
        "(or the old file repaired and moved back: the broker reads it again without a restart)",
        path,
    )
    return True


def hash_password(password: str) -> str:
    """An argon2id hash of `password`, as the users file holds it."""
    return _HASHER.hash(password)


def set_password(path: str | Path, user: str, password: str) -> bool:
    """Add or replace `user`'s line in the users file, atomically; True if the user was there before.

    A new file is made with mode 0600; an existing one keeps its mode and, where we may, its owner (so
    that a file made readable to the gateway's user stays readable after `sudo fieldgate passwd`).
    """
    path = Path(path)
    check_username(user)
    line = f"{user}:{hash_password(password)}"
    try:
        st: os.stat_result | None = path.stat()
        old = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        st, old = None, []
    except (OSError, UnicodeDecodeError) as exc:
        raise FieldgateError(f"cannot read {path}: {exc}") from exc
    lines: list[str] = []
    found = False
    for raw in old:
        name, sep, _ = raw.strip().partition(":")
        if sep and name == user:
            if not found:
                lines.append(line)
            found = True
        else:
            lines.append(raw)
    if not found:
        lines.append(line)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp makes it 0600
    except OSError as exc:
        raise FieldgateError(f"cannot write {path}: {exc}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            if st is not None:
                os.fchmod(f.fileno(), st.st_mode & 0o7777)
                with contextlib.suppress(PermissionError):
                    os.fchown(f.fileno(), st.st_uid, st.st_gid)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise FieldgateError(f"cannot write {path}: {exc}") from exc
    with contextlib.suppress(OSError):  # the rename itself is durable only once the folder is synced
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return found


class _UsersFile:
    """The users file, read again when it changes, so that `fieldgate passwd` needs no restart."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp = self._stat()
        self.users = read_users(path)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def current(self) -> dict[str, str]:
        """The users as of now; a file that went missing or bad leaves the last good ones (with a warning)."""
        stamp = self._stat()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self.users = read_users(self.path)
                log.info("broker users file %s read again: %d user(s)", self.path, len(self.users))
            except FieldgateError as exc:
                log.warning("%s; keeping the %d user(s) read before", exc, len(self.users))
        return self.users


@functools.lru_cache(maxsize=1)
def _dummy_hash() -> str:
    return hash_password("not a password of anyone")


def _verify(password: str, hashed: str | None) -> bool:
    if hashed is None:
        # An unknown user costs what a known one costs: the reply time does not tell which users exist.
        _HASHER.verify(password, _dummy_hash())
        return False
    return _HASHER.verify(password, hashed)


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
            return _verify(password, hashed)
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


class UsersAuthPlugin(BaseAuthPlugin):
    """amqtt authentication: users of the users file (argon2) and the gateway's own INTERNAL_USER."""

    @dataclass
    class Config:
        """The plugin's settings: a `BrokerAuth.to_json()`."""

        auth: dict[str, Any] = field(default_factory=dict)

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._auth = BrokerAuth.from_json(self.config.auth)
        self._file = _UsersFile(self._auth.users_file)

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


class TopicAclPlugin(BaseTopicPlugin):
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
