"""The Modbus TCP server that shares the gateway's lines with other masters (SCADA, HMI, vendor tools).

A read the device's polls cover, all fresher than `cache_max_age`, is answered from the raw registers or
bits the line read; any other request an exposed unit may take is carried out on the device's line, in the
line's own schedule (writes first, then pass-through, then polls), so the line keeps one master. Writes pass
the gateway's rate limit and audit log (`WriteGate`). Modules:

- `server.py`: the listener, `max_connections`, the connections' counters and the snapshot;
- `server_conn.py`: one connection, MBAP frames in and answers out in request order, back-pressure;
- `server_requests.py`: what one request is answered (cache, line, gate, exception).
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Sequence

from drivers.modbus.server_conn import Connection
from drivers.modbus.server_requests import Line, RequestHandler, ServerStats, WriteGate, exposed_units
from drivers.modbus.settings import ServerSettings
from gateway.errors import FieldgateError
from gateway.types import DeviceProfile, ModbusServerSnapshot

__all__ = ["ModbusTcpServer", "WriteGate"]

log = logging.getLogger(__name__)

#: Peers whose malformed frames were logged at WARNING (later ones at DEBUG); forgotten when this many.
LOGGED_PEERS = 1024
#: Connections refused over max_connections are logged at most this often.
REFUSED_LOG_INTERVAL = 60.0
#: How long stop() waits for the connections to end after closing them.
STOP_TIMEOUT = 5.0
#: What the kernel's listen queue holds before the server accepts.
BACKLOG = 64
#: The StreamReader's buffer bound: past twice this the socket is no longer read until the reader catches up.
READ_LIMIT = 8192


class ModbusTcpServer:
    """Serves exposed devices to Modbus TCP clients from the poll cache and the lines (a gateway Driver)."""

    def __init__(self, cfg: ServerSettings, lines: Sequence[Line], gate: WriteGate) -> None:
        self.cfg = cfg
        self.stats = ServerStats()
        self._handler = RequestHandler(
            exposed_units(cfg.expose, lines), gate, self.stats, cache_max_age=cfg.cache_max_age
        )
        self._server: asyncio.Server | None = None
        self.connections: set[Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._logged_peers: set[str] = set()
        self._refused_logged_at = float("-inf")

    @property
    def name(self) -> str:
        """The driver's name in logs."""
        return "modbus-server"

    def profiles(self) -> list[DeviceProfile]:
        """None: the exposed devices are their lines' (writes from MQTT reach them there)."""
        return []

    @property
    def port(self) -> int:
        """The port listened on (the configured one, or the one the system chose for port 0)."""
        if self._server is None or not self._server.sockets:
            return self.cfg.port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Listen on cfg.host:cfg.port; FieldgateError naming the address when it cannot."""
        try:
            self._server = await asyncio.start_server(
                self._accept, self.cfg.host, self.cfg.port, limit=READ_LIMIT, backlog=BACKLOG
            )
        except OSError as exc:
            taken = exc.errno == errno.EADDRINUSE
            reason = "the address is taken (another process listens there)" if taken else str(exc)
            raise FieldgateError(f"modbus.server: cannot listen on {self.cfg.listen}: {reason}") from exc
        log.info("Modbus TCP server listening on %s, %d units exposed", self.cfg.listen, len(self._handler.units))

    async def stop(self) -> None:
        """Close the listener and every connection; what waits for a line is dropped, admitted writes cancelled."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for conn in list(self.connections):
            conn.close()
        for task in list(self._handler.writes_running):
            task.cancel()
        pending = self._tasks | self._handler.writes_running
        if pending:
            await asyncio.wait(pending, timeout=STOP_TIMEOUT)

    def snapshot(self) -> ModbusServerSnapshot:
        """The server's counters as of now."""
        s = self.stats
        return ModbusServerSnapshot(
            listen=self.cfg.listen,
            running=self._server is not None,
            connections=len(self.connections),
            accepted=s.accepted,
            refused=s.refused,
            malformed=s.malformed,
            cache_hits=s.cache_hits,
            passthrough=s.passthrough,
            writes=s.writes,
            busy=s.busy,
            waiting=sum(len(c.waiting) for c in self.connections),
            exceptions=dict(s.exceptions),
            unaudited=s.unaudited,
        )

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer(writer)
        if self._server is None or len(self.connections) >= self.cfg.max_connections:
            self.stats.refused += 1
            now = asyncio.get_running_loop().time()
            if now - self._refused_logged_at >= REFUSED_LOG_INTERVAL:
                self._refused_logged_at = now
                log.warning(
                    "Modbus TCP server: %s refused, %d connections open (max_connections); %d refused so far",
                    peer,
                    len(self.connections),
                    self.stats.refused,
                )
            writer.transport.abort()
            return
        self.stats.accepted += 1
        conn = Connection(
            reader,
            writer,
            self._handler,
            peer=peer,
            max_queue=self.cfg.max_queue,
            idle_timeout=self.cfg.idle_timeout or None,
            on_malformed=self._malformed,
        )
        self.connections.add(conn)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await conn.serve()
        finally:
            self.connections.discard(conn)
            self._tasks.discard(task)

    def _malformed(self, conn: Connection, why: str) -> None:
        self.stats.malformed += 1
        host = conn.peer.rpartition(":")[0]
        if host in self._logged_peers:
            log.debug("Modbus TCP server: %s sent a malformed frame (%s); closed", conn.peer, why)
            return
        if len(self._logged_peers) >= LOGGED_PEERS:
            self._logged_peers.clear()
        self._logged_peers.add(host)
        log.warning(
            "Modbus TCP server: %s sent a malformed frame (%s); connection closed (logged once per peer)",
            conn.peer,
            why,
        )


def _peer(writer: asyncio.StreamWriter) -> str:
    """The client's address as "host:port" ("[v6]:port" for IPv6)."""
    address = writer.get_extra_info("peername")
    if not isinstance(address, tuple) or len(address) < 2:
        return str(address)
    host = str(address[0])
    return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
