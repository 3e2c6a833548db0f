"""The read-only status page: the gateway's snapshot as one HTML page that reloads itself."""

from __future__ import annotations

import html
import logging
from collections.abc import Callable
from typing import Any

from gateway import __version__
from gateway.jsonsafe import dumps_safe
from gateway.snapshot import CLOCK, DEVICES, LINES, MCP, MODBUS_SERVER, SINKS, GatewaySnapshot
from gateway.spool_report import human_age, human_size
from gateway.utilisation import Utilisation

# The logger name these lines had before the split (the page was the HTTP server's):
# journal filters keep working.
log = logging.getLogger("gateway.http")

REFRESH_S = 5  # the page reloads itself this often

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff}th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;
vertical-align:top}th{background:#f0f0f0}td.n{text-align:right;font-variant-numeric:tabular-nums}
.online{color:#080}.offline{color:#b00}.unknown{color:#888}.bad{color:#b00}
dl.values{margin:0;display:grid;grid-template-columns:auto 1fr;gap:0 .8em}
dl.values>div{display:contents}
dt{color:#555}dd{margin:0;font-family:monospace}
footer{margin-top:2em;color:#777}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _state(online: bool | None, words: tuple[str, str] = ("online", "offline")) -> str:
    css = "unknown" if online is None else "online" if online else "offline"
    word = "unknown" if online is None else words[0] if online else words[1]
    return f'<span class="{css}">{word}</span>'


def _table(headers: list[str], rows: list[str]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(rows) if rows else f'<tr><td colspan="{len(headers)}">none</td></tr>'
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cells(values: list[tuple[str, bool]]) -> str:
    """`<td>`s from (already escaped html, numeric?) pairs."""
    return "<tr>" + "".join(f'<td class="n">{v}</td>' if n else f"<td>{v}</td>" for v, n in values) + "</tr>"


#: A Sparkplug sink's counters, in the order of the page's columns after the primary host's.
_SPARKPLUG_KEYS = ("births", "rebirth_requests", "device_births", "device_deaths", "commands", "bad_commands")

#: Ages beyond this (about 31,700 years) are not ages: a device clock or a ts that is not one.
_AGE_MAX_MS = 10**15


def _age(now_ms: int, ts: object) -> str:
    """How old a sample taken at `ts` (unix ms, as the device said) is, for people; total for any ts."""
    if not isinstance(ts, int) or isinstance(ts, bool) or not ts:
        return human_age(None)
    behind = now_ms - ts
    if behind <= -1000:
        # Ahead of the gateway's clock by a second or more: said as such, by how much when that is a sane number.
        return "in the future" if -behind > _AGE_MAX_MS else f"{human_age(-behind / 1000)} ahead"
    if behind > _AGE_MAX_MS:
        return "ts out of range"
    return human_age(max(0, behind) / 1000)


class StatusPage:
    """The read-only status page: lines, devices with their last values, MCP sessions, sinks and spools."""

    def __init__(self, snapshot: GatewaySnapshot, utilisation: Utilisation, problems: list[str]) -> None:
        self.snapshot = snapshot
        self.utilisation = utilisation
        self.problems = problems

    def render(self) -> str:
        """The whole page as HTML; every value from the field or the config is escaped."""
        snap = self.snapshot
        gid = _e(snap.gateway_id)
        health = (
            '<span class="online">ok</span>'
            if not self.problems
            else '<span class="bad">' + "; ".join(_e(p) for p in self.problems) + "</span>"
        )
        parts = [
            "<!doctype html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f'<meta http-equiv="refresh" content="{REFRESH_S}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>Fieldgate {gid}</title><style>{_STYLE}</style></head><body>",
            f"<header><h1>Fieldgate {gid}</h1>",
            f"<p>version {_e(__version__)} · up {human_age(snap.uptime_s)} · health: {health}</p>",
            self._guarded(self._clock),
            "</header>",
            '<section id="devices"><h2>Devices</h2>',
            self._guarded(self._devices),
            "</section>",
            '<section id="lines"><h2>Modbus lines</h2>',
            self._guarded(self._lines),
            "</section>",
            '<section id="mcp"><h2>MCP sessions</h2>',
            self._guarded(self._mcp),
            "</section>",
            '<section id="modbus-server"><h2>Modbus TCP server</h2>',
            self._guarded(self._modbus_server),
            "</section>",
            '<section id="sinks"><h2>Sinks and spools</h2>',
            self._guarded(self._sinks),
            "</section>",
            f"<footer>Reloads every {REFRESH_S} s · "
            '<a href="/metrics">/metrics</a> · <a href="/healthz">/healthz</a></footer>',
            "</body></html>",
        ]
        return "\n".join(parts)

    @staticmethod
    def _guarded(section: Callable[[], str]) -> str:
        """A section's HTML, or a line saying it could not be shown (logged): one bad part costs its section only."""
        try:
            return section()
        except Exception as exc:
            log.exception("status page: the %s section could not be rendered", section.__name__.strip("_"))
            return f'<p class="bad">This section could not be shown: {_e(repr(exc)[:200])}</p>'

    def _clock(self) -> str:
        """`clock: synchronised (timesyncd), 0 steps`, with the last step; nothing without a clock watch."""
        self.snapshot.require(CLOCK)
        clock = self.snapshot.clock
        if clock is None:
            return ""
        if clock.synchronized is None:
            state = '<span class="unknown">unknown</span>'
        elif clock.synchronized:
            state = f'<span class="online">synchronised</span> ({_e(clock.source)})'
        else:
            state = f'<span class="bad">NOT synchronised</span> ({_e(clock.source)})'
        line = f"clock: {state}, {clock.steps} step{'' if clock.steps == 1 else 's'}"
        if clock.last_step_s is not None:
            way = "forward" if clock.last_step_s > 0 else "back"
            line += f"; the last one {way} by {abs(clock.last_step_s):.1f} s"
        snap = self.snapshot
        if SINKS in snap.read and SINKS not in snap.unreadable:
            # Published dated by a clock known wrong: an operator wants to know there is such data upstream.
            unsynchronised = sum(sink.figures.get("unsynchronised", 0) for sink in snap.sinks)
            if unsynchronised:
                line += f'; <span class="bad">{unsynchronised} message(s) went out unsynchronised</span>'
        return f'<p id="clock">{line}</p>'

    def _devices(self) -> str:
        snap = self.snapshot
        snap.require(LINES, DEVICES)
        modbus = {d.name: (line, d) for line in snap.lines for d in line.devices}
        rows = []
        for view in snap.devices:
            if view.name in modbus:
                line, device = modbus[view.name]
                where = f"Modbus {_e(line.name)}, unit {device.unit}"
                online = device.online
            else:
                where = "MCP"
                online = view.online
            rows.append(
                _cells(
                    [
                        (_e(view.name), False),
                        (where, False),
                        (_state(online), False),
                        (self._values(view.name, view.latest), False),
                        (_e(_age(snap.taken_at_ms, view.latest_ts)), True),
                    ]
                )
            )
        return _table(["device", "where", "state", "last values", "age"], rows)

    @staticmethod
    def _values(device: str, values: dict[str, Any]) -> str:
        if not values:
            return "—"
        # The value as its MQTT topic carries it (JSON), so that the page and the broker agree.
        items = "".join(
            f'<div data-device="{_e(device)}" data-point="{_e(point)}"><dt>{_e(point)}</dt>'
            f"<dd>{_e(dumps_safe(value).decode())}</dd></div>"
            for point, value in values.items()
        )
        return f'<dl class="values">{items}</dl>'

    def _lines(self) -> str:
        snap = self.snapshot
        snap.require(LINES)
        rows = []
        for line in snap.lines:
            st = line.counters
            rows.append(
                _cells(
                    [
                        (_e(line.name), False),
                        (_e(line.port), False),
                        (_e(line.framing), False),
                        (str(st.transactions), True),
                        (str(st.timeouts), True),
                        (str(st.crc_errors), True),
                        (str(st.exceptions), True),
                        (str(st.errors), True),
                        (f"{st.passthrough} ({st.passthrough_failed} failed)", True),
                        (f"{self.utilisation.ratio(line, snap.taken_at):.1%}", True),
                    ]
                )
            )
        headers = ["line", "port", "framing", "transactions", "timeouts", "CRC errors", "exceptions", "errors"]
        return _table([*headers, "pass-through", "utilisation (1 min)"], rows)

    def _modbus_server(self) -> str:
        self.snapshot.require(MODBUS_SERVER)
        server = self.snapshot.modbus_server
        if server is None:
            return "<p>The Modbus TCP server is not enabled.</p>"
        state = '<span class="online">listening</span>' if server.running else '<span class="bad">not listening</span>'
        codes = ", ".join(f"0x{code:02X}: {n}" for code, n in sorted(server.exceptions.items())) or "none"
        row = _cells(
            [
                (_e(server.listen), False),
                (str(server.connections), True),
                (str(server.cache_hits), True),
                (str(server.passthrough), True),
                (str(server.writes), True),
                (str(server.busy), True),
                (str(server.waiting), True),
                (_e(codes), False),
            ]
        )
        summary = (
            f"<p>{state}; {server.accepted} connection(s) accepted, {server.refused} refused at max_connections, "
            f"{server.malformed} closed for a malformed frame.</p>"
        )
        headers = ["listen", "connections", "cache hits", "pass-through", "writes", "busy", "waiting", "exceptions"]
        return summary + _table(headers, [row])

    def _mcp(self) -> str:
        self.snapshot.require(MCP)
        mcp = self.snapshot.mcp
        if mcp is None:
            return "<p>MCP is not enabled.</p>"
        rows = []
        for session in mcp.sessions:
            st = session.counters
            rows.append(
                _cells(
                    [
                        (_e(session.device), False),
                        (_e(session.peer), False),
                        (str(st.frames_in), True),
                        (str(st.frames_out), True),
                        (str(st.nacks_sent), True),
                        (str(st.crc_errors), True),
                        (str(st.duplicates), True),
                    ]
                )
            )
        summary = (
            f"<p>{len(mcp.sessions)} session(s) of {len(mcp.devices)} device(s); "
            f"{mcp.rejected} refused at max_sessions.</p>"
        )
        headers = ["device", "peer", "frames in", "frames out", "NACKs", "CRC errors", "duplicates"]
        return summary + _table(headers, rows)

    def _sinks(self) -> str:
        self.snapshot.require(SINKS)
        rows = []
        for sink in self.snapshot.sinks:
            f = sink.figures
            rows.append(
                _cells(
                    [
                        (_e(sink.name), False),
                        # The node it is on (or tries next) on hover: a cluster's sink moves between its urls.
                        (
                            f'<span title="{_e(sink.counters.get("broker", ""))}">'
                            f"{_state(sink.connected, ('connected', 'disconnected'))}</span>",
                            False,
                        ),
                        (str(f["queued"]), True),
                        (str(f["spool_messages"]), True),
                        (_e(human_size(f["spool_bytes"])), True),
                        (_e(human_age(f["spool_oldest_age_s"])), True),
                        (str(f["dropped"]), True),
                        (str(f["spool_fsyncs"]), True),
                        (_e(human_size(f["spool_bytes_written"])), True),
                    ]
                )
            )
        headers = ["sink", "broker", "queued", "spooled", "spool size", "oldest", "dropped", "fsyncs", "written"]
        return _table(headers, rows) + self._sparkplug()

    def _sparkplug(self) -> str:
        """The Sparkplug sinks' node counters, under the sinks (a sparkplug sink counts as connected once born)."""
        sinks = [sink for sink in self.snapshot.sinks if "births" in sink.counters]
        if not sinks:
            return ""
        rows = []
        for sink in sinks:
            c = sink.counters
            host = c.get("host_online")
            cells = [(_e(sink.name), False), ("—" if host is None else _state(bool(host)), False)]
            cells += [(str(c[key]), True) for key in _SPARKPLUG_KEYS]
            rows.append(_cells(cells))
        headers = ["Sparkplug sink", "primary host", "births", "rebirth requests", "device births", "device deaths"]
        headers += ["writes (DCMD)", "refused commands"]
        note = "<p>A Sparkplug sink shows connected once its births are out; — : no primary host, or no STATE yet.</p>"
        return _table(headers, rows) + note
