"""The embedded broker's listener URLs: amqtt's settings for each, and the one the gateway's own sink connects to.

No amqtt here: the gateway reads these whether the broker runs in its process or as a child.
"""

from __future__ import annotations

import re
from typing import Any

from gateway.errors import FieldgateError

_URL = re.compile(r"^(?P<scheme>tcp|mqtt|ws|mqtts|wss)://(?P<host>[^:/]*|\[[0-9a-fA-F:]+\]):(?P<port>\d+)/?$")


def listener_config(url: str, cert: str | None = None, key: str | None = None) -> dict[str, Any]:
    """amqtt's listener settings for one of our listener URLs."""
    m = _URL.match(url)
    if not m:
        raise FieldgateError(f"broker listener {url!r} is not SCHEME://HOST:PORT")
    scheme = m["scheme"]
    host = m["host"].strip("[]") or "0.0.0.0"
    cfg: dict[str, Any] = {
        "type": "ws" if scheme in ("ws", "wss") else "tcp",
        "bind": f"{host}:{m['port']}",
    }
    if scheme in ("mqtts", "wss"):
        cfg.update(ssl=True, certfile=cert, keyfile=key)
    return cfg


def client_url(listeners: list[str]) -> str:
    """The URL the gateway's own sink uses to reach the embedded broker (its first TCP listener)."""
    for url in listeners:
        m = _URL.match(url)
        if m and m["scheme"] in ("tcp", "mqtt"):
            host = m["host"].strip("[]")
            if host in ("", "0.0.0.0"):
                host = "127.0.0.1"
            elif host == "::":
                host = "::1"  # asyncio binds "::" IPv6-only
            if ":" in host:
                host = f"[{host}]"
            return f"mqtt://{host}:{m['port']}"
    raise FieldgateError("the embedded broker needs a tcp:// listener for the gateway's own sink")
