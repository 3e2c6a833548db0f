"""The embedded broker's users: the users file (one USER:ARGON2-HASH per line: read, checked, recovered and
written), the password check, and the reasons a login is refused. No amqtt here.

A users file that cannot be read at start is moved aside (`recover_users_file`) and the broker starts
with none: only the gateway's own sinks get in until users are added again.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import tempfile
from pathlib import Path

from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

from bridge.statefiles import move_aside
from gateway.errors import FieldgateError

# The broker's users and logins log as one part, under the name operators know it by.
log = logging.getLogger("bridge.broker_auth")

#: The most memory one user's hash may ask of a check (KiB): `fieldgate passwd` makes 64 MiB ones.
MAX_ARGON2_KIB = 256 * 1024
_ARGON2_COST = re.compile(r"\$argon2(?:id|i|d)\$v=\d+\$m=(?P<m>\d{1,12}),t=(?P<t>\d{1,12}),p=(?P<p>\d{1,12})\$")
#: A users file larger than this is no users file (a line per user; thousands of users take a few hundred KiB).
MAX_USERS_BYTES = 4 * 1024**2

#: Why logins are refused, as `fieldgate_broker_auth_failures_total{reason}` names them.
LOGIN_FAILURES = ("anonymous", "unknown_user", "bad_password", "busy", "will_denied", "error")

#: The user the gateway's own sinks log in as; `$` keeps it out of the users file (see `check_username`).
INTERNAL_USER = "$fieldgate"

_HASHER = PasswordHash((Argon2Hasher(),))


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


class UsersFile:
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


def verify_password(password: str, hashed: str | None) -> bool:
    """True if `password` matches `hashed`; None (an unknown user) costs a check all the same and is False."""
    if hashed is None:
        # An unknown user costs what a known one costs: the reply time does not tell which users exist.
        _HASHER.verify(password, _dummy_hash())
        return False
    return _HASHER.verify(password, hashed)
