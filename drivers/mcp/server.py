"""The gateway's MCP/1 TCP server: accepts devices, keeps one live session per device id."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import ssl
import time
from collections.abc import Awaitable, Callable

from drivers.mcp import report
from drivers.mcp.admission import BanList, PendingCount, address_key
from drivers.mcp.payload import quoted
from drivers.mcp.protocol import SeqWindow, SessionStats
from drivers.mcp.session import Session
from drivers.mcp.settings import McpSettings
from gateway.errors import FieldgateError
from gateway.types import Command, CommandResult, DeviceProfile, DeviceState, McpServerSnapshot, Sample

log = logging.getLogger(__name__)

Deliver = Callable[[Sample], Awaitable[None]]

# DATA frames waiting for their ACK across all sessions: past this, sessions stop reading and
# TCP pushes back, instead of thousands of sessions x 32 frames flooding the sinks' queues.
MAX_INFLIGHT_DATA = 4096
#: The listen queue at least: connects beyond max_pending are taken from it and closed at once, not left in it.
LISTEN_BACKLOG = 1024
# File descriptors kept for everything but sessions: sinks, the spool, serial lines, the broker's clients.
FD_RESERVE = 256


def server_ssl_context(cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
    """TLS for the listener; with `client_ca`, devices must present a certificate it signed."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca)
    return ctx


def session_limit(wanted: int, reserve: int = FD_RESERVE) -> int:
    """`wanted` sessions, or fewer if the file-descriptor limit cannot hold them (raised to its hard cap first)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted + reserve:
        target = hard if hard == resource.RLIM_INFINITY else min(hard, wanted + reserve)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft == resource.RLIM_INFINITY or soft >= wanted + reserve:
        return wanted
    limit = max(1, soft - reserve)
    log.warning(
        "mcp.max_sessions %d exceeds what %d file descriptors allow; holding at most %d sessions", wanted, soft, limit
    )
    return limit


#: Reasons of `McpServer.auth_failures` and `McpServer.refused` (all present from the start, at 0).
AUTH_FAILURE_REASONS = ("unknown_device", "bad_token")
REFUSED_REASONS = ("max_sessions", "max_pending", "max_pending_per_ip", "banned")
REFUSAL_LOG_EVERY = 60.0  # seconds between log lines about connections refused at accept, per reason


class McpServer:
    """Listens for MCP devices; DATA goes to `deliver` (awaited before the ACK), states to `on_state`.

    Counters for /metrics: `auth_failures` and `refused` (by reason), `pending` (connections not past
    HELLO now), `rejected` (refused at max_sessions, kept from before), `totals` and `stats_for(id)`.
    """

    def __init__(
        self,
        cfg: McpSettings,
        deliver: Deliver,
        on_state: Callable[[DeviceState], None],
    ) -> None:
        self.cfg = cfg
        self.deliver = deliver
        self.tokens = {d.id: d.token for d in cfg.devices}
        self.totals = SessionStats()
        self.rejected = 0  # connections refused at max_sessions
        self.auth_failures: dict[str, int] = dict.fromkeys(AUTH_FAILURE_REASONS, 0)
        self.refused: dict[str, int] = dict.fromkeys(REFUSED_REASONS, 0)
        self.sessions: dict[str, Session] = {}
        self.bans = BanList(cfg.auth_ban_failures, cfg.auth_ban_window, cfg.auth_ban_time)
        self._pending = PendingCount()
        self._refusals_logged: dict[str, tuple[float, int]] = {}
        self._on_state = on_state
        self._stats = {d.id: SessionStats() for d in cfg.devices}
        self._unregistered = SessionStats()
        self._windows: dict[str, SeqWindow] = {}
        # DATA being delivered, per device and seq: outlives the session that received it, so that a resend
        # on the next session (same boot) joins the delivery instead of publishing a second time.
        self._inflight: dict[str, dict[int, asyncio.Future[None]]] = {}
        self._points: dict[str, set[str]] = {}
        self._connections: set[Session] = set()
        self._server: asyncio.Server | None = None
        self._tls: ssl.SSLContext | None = None
        self.port = 0
        self.data_slots = asyncio.Semaphore(MAX_INFLIGHT_DATA)
        self.max_sessions = cfg.max_sessions
        self.max_pending = cfg.max_pending

    @property
    def pending(self) -> int:
        """Connections accepted and not past HELLO now (TLS handshakes included)."""
        return self._pending.total

    @property
    def authenticated(self) -> int:
        """Connections past HELLO now (a replaced one until it has closed)."""
        return len(self._connections) - self._pending.total

    @property
    def name(self) -> str:
        """The driver's name in logs."""
        return "mcp"

    def snapshot(self) -> McpServerSnapshot:
        """Sessions, refusals and each configured device's counters as of now (for the metrics and status page)."""
        return report.server_snapshot(self, [d.id for d in self.cfg.devices])

    def profiles(self) -> list[DeviceProfile]:
        """What the router needs to know of each configured device: it pushes whole samples and takes commands."""
        return [
            DeviceProfile(
                d.id,
                commander=self.command,
                every_sample=True,
                write_rate=d.write_rate,
                write_burst=d.write_burst,
            )
            for d in self.cfg.devices
        ]

    async def start(self) -> None:
        """Bind the listener (TLS when configured)."""
        host, port = self.cfg.host, self.cfg.port
        tls = self.cfg.tls
        # Plain TCP at accept; each session does its TLS handshake itself, so that a handshake counts as
        # a pending connection and runs under the HELLO deadline.
        self._tls = server_ssl_context(tls.cert, tls.key, tls.client_ca) if tls else None
        try:
            # A burst of connects waits in the kernel's accept queue until the loop takes it: a queue the size of
            # asyncio's default (100) overflows under a flood, and a good device's SYN is then dropped and retried
            # seconds later. The kernel caps it at net.core.somaxconn.
            backlog = max(LISTEN_BACKLOG, self.cfg.max_pending)
            self._server = await asyncio.start_server(self._accept, host, port, backlog=backlog)
        except OSError as exc:
            raise FieldgateError(f"MCP server cannot listen on {self.cfg.listen}: {exc}") from exc
        self.port = self._server.sockets[0].getsockname()[1]
        self._set_limits(self.cfg)
        log.info("MCP server listening on %s:%d%s", host, self.port, " (TLS)" if self._tls else "")

    def _set_limits(self, cfg: McpSettings) -> None:
        """max_sessions and max_pending as the file-descriptor limit allows them (both hold a socket)."""
        wanted = cfg.max_sessions + cfg.max_pending
        total = session_limit(wanted)
        if total >= wanted:
            self.max_sessions, self.max_pending = cfg.max_sessions, cfg.max_pending
        else:
            self.max_pending = max(1, min(cfg.max_pending, total // 4))
            self.max_sessions = max(1, total - self.max_pending)

    async def stop(self) -> None:
        """Stop listening and close every session."""
        if self._server is not None:
            self._server.close()
        for session in list(self._connections):
            await session.close("gateway stopping")
        for _ in range(50):
            if not self._connections:
                break
            await asyncio.sleep(0.02)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def reconfigure(self, cfg: McpSettings) -> list[str]:
        """Take reloaded settings on the same listener; closes the sessions of devices removed or re-keyed.

        Returns the ids whose session was closed. Other settings apply to sessions from now on.
        """
        tokens = {d.id: d.token for d in cfg.devices}
        # A device that lost its place or its token must prove itself again: its session ends now.
        closing = [device_id for device_id in self.sessions if tokens.get(device_id) != self.tokens.get(device_id)]
        self.cfg = cfg
        self.tokens = tokens
        self.bans.configure(cfg.auth_ban_failures, cfg.auth_ban_window, cfg.auth_ban_time)
        for d in cfg.devices:
            self._stats.setdefault(d.id, SessionStats())
        if self._server is not None:
            self._set_limits(cfg)
        for device_id in closing:
            session = self.sessions.get(device_id)
            if session is not None:
                reason = "removed from the config" if device_id not in tokens else "its token changed"
                log.info("mcp %s: closing its session: %s", device_id, reason)
                await session.close(reason)
        return closing

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        key = address_key(peer[0] if isinstance(peer, tuple) and peer else peer)
        refused = self._refusal(key)
        if refused is not None:
            # Closed at accept: nothing read, nothing sent, no session, no file descriptor kept for it.
            writer.transport.abort()
            self._count_refusal(refused, key, "closed at accept")
            return
        session = Session(self, reader, writer, key, self._tls)
        self._connections.add(session)
        self._pending.add(key)
        await session.run()

    def _count_refusal(self, reason: str, key: str, how: str) -> None:
        """Count a refused connection; log it at WARNING at most once a minute per reason (with how many since)."""
        self.refused[reason] += 1
        if reason == "max_sessions":
            self.rejected += 1
        now = time.monotonic()
        last, count = self._refusals_logged.get(reason, (float("-inf"), 0))
        if now - last < REFUSAL_LOG_EVERY:
            self._refusals_logged[reason] = (last, count + 1)
            return
        self._refusals_logged[reason] = (now, 0)
        more = f" ({count} more since the last such line)" if count else ""
        log.warning("mcp: a connection from %s %s: %s%s", key, how, reason, more)

    def _refusal(self, key: str) -> str | None:
        """Why a new connection from `key` is closed at accept, or None to take it.

        Not max_sessions: only the HELLO shows whether a connection is a device replacing its own stale
        session (after a Wi-Fi drop), which takes no new place. `room_for` holds max_sessions there, and
        max_pending bounds the connections until then.
        """
        if self.bans.banned(key, time.monotonic()):
            return "banned"
        if self._pending.total >= self.max_pending:
            return "max_pending"
        if self._pending.of(key) >= self.cfg.max_pending_per_ip:
            return "max_pending_per_ip"
        return None

    # --- called by sessions -----------------------------------------------------------------------

    def stats_for(self, device_id: str | None) -> SessionStats:
        """Per-device counters (a shared scratch set before HELLO)."""
        if device_id is None:
            return self._unregistered
        # Not setdefault: the snapshot asks for every configured device at each scrape and P/metrics, and a
        # fresh SessionStats per call (thrown away when the device has one) is garbage by the thousand.
        stats = self._stats.get(device_id)
        if stats is None:
            stats = self._stats[device_id] = SessionStats()
        return stats

    def window(self, device_id: str) -> SeqWindow:
        """The device's duplicate window."""
        return self._windows[device_id]

    def inflight(self, device_id: str) -> dict[int, asyncio.Future[None]]:
        """The device's DATA deliveries not finished yet, by seq (of its current boot)."""
        return self._inflight.setdefault(device_id, {})

    def delivering(self, device_id: str, seq: int, delivery: asyncio.Future[None]) -> None:
        """Track a DATA delivery; once it succeeds its seq enters the device's window, whatever its session did."""
        window = self._windows[device_id]  # of this boot: a new boot's window never learns an old boot's seqs
        inflight = self.inflight(device_id)
        inflight[seq] = delivery

        def done(fut: asyncio.Future[None]) -> None:
            if inflight.get(seq) is fut:
                del inflight[seq]
            if not fut.cancelled() and fut.exception() is None:
                window.add(seq)

        delivery.add_done_callback(done)

    def points_of(self, device_id: str) -> set[str]:
        """The value names the device has published since the gateway started (at most mcp.max_points)."""
        return self._points.setdefault(device_id, set())

    def room_for(self, session: Session, device_id: str) -> bool:
        """True when a session for `device_id` may pass HELLO: max_sessions not reached, or it replaces one."""
        if device_id in self.sessions or self.authenticated < self.max_sessions:
            return True
        self._count_refusal("max_sessions", session.address, "refused at HELLO")
        return False

    def banned_at_hello(self, session: Session) -> bool:
        """True (and counted as refused `banned`) when the session's address was banned after it connected.

        Connections opened before the ban would otherwise each still get a token check: the HELLO is
        refused (NACK 7) without one.
        """
        if not self.bans.banned(session.address, time.monotonic()):
            return False
        self._count_refusal("banned", session.address, "refused at HELLO")
        return True

    def auth_failed(self, session: Session, device_id: str, reason: str) -> None:
        """A HELLO was refused (NACK 7): count it, log it (once a minute per address), ban past the limit."""
        self.auth_failures[reason] += 1
        started, say = self.bans.failed(session.address, time.monotonic())
        if say.log:
            more = f" ({say.suppressed} more from this address in the last minute not logged)" if say.suppressed else ""
            peer = session.peer
            host = str(peer[0]) if isinstance(peer, tuple) and peer else session.address
            where = host if host == session.address else f"{host} ({session.address})"
            log.warning("mcp: login failed from %s: %s for device %s%s", where, reason, quoted(device_id), more)
        if started:
            bans = self.bans
            log.warning(
                "mcp: %s banned for %g s: %d failed logins within %g s (mcp.auth_ban_*)",
                session.address,
                bans.ban_time,
                bans.failures,
                bans.window,
            )

    def _leave_pending(self, session: Session) -> None:
        """The session no longer counts under max_pending(_per_ip) (once only)."""
        if session.pending:
            session.pending = False
            self._pending.remove(session.address)

    def session_started(self, session: Session, boot_id: str) -> None:
        """A session passed HELLO: it replaces any older one of its device."""
        device_id = session.device_id
        assert device_id is not None
        self._leave_pending(session)
        window = self._windows.get(device_id)
        if window is None or not window.continues(boot_id):
            self._windows[device_id] = SeqWindow(boot_id)  # a new boot: forget the old seqs
            self._inflight[device_id] = {}  # and its deliveries in flight (they finish, but match nothing new)
        old = self.sessions.get(device_id)
        self.sessions[device_id] = session
        stats = self.stats_for(device_id)
        stats.sessions_opened += 1
        self.totals.sessions_opened += 1
        if old is not None and old is not session:
            log.info("mcp %s: a new session replaces the one from %s", device_id, old.peer)
            asyncio.ensure_future(old.close("replaced by a new session"))
            return  # still online: no status change
        log.info("mcp %s: online from %s", device_id, session.peer)
        self._on_state(DeviceState(device_id, True))

    def session_ended(self, session: Session, reason: str) -> None:
        """A session is over; its device goes offline unless a newer session took over."""
        self._connections.discard(session)
        self._leave_pending(session)
        device_id = session.device_id
        if device_id is None:
            log.debug("mcp connection from %s closed before HELLO: %s", session.peer, reason)
            return
        self.stats_for(device_id).sessions_closed += 1
        self.totals.sessions_closed += 1
        if self.sessions.get(device_id) is session:
            del self.sessions[device_id]
            log.warning("mcp %s: offline: %s", device_id, reason)
            self._on_state(DeviceState(device_id, False, reason))

    # --- commands ---------------------------------------------------------------------------------

    async def command(self, command: Command) -> CommandResult:
        """Send a command to a connected device and wait for its response."""
        session = self.sessions.get(command.device)
        if session is None:
            return CommandResult(ok=False, error=f"{command.device} is offline")
        return await session.command(
            command.name, command.args, self.cfg.ack_timeout, self.cfg.retries, deadline=command.deadline
        )
