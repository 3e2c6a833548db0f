"""The embedded MQTT broker (amqtt), started with only the plugins the gateway needs."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from amqtt.broker import Broker

from bridge.broker_acl import BrokerAuth
from bridge.broker_auth import login_failures
from bridge.broker_listeners import listener_config
from bridge.broker_users import read_users
from gateway.errors import FieldgateError

log = logging.getLogger(__name__)

# amqtt's packet/event loggers and $SYS plugin cost about a third of its CPU; leave them out.
_PLUGINS: dict[str, Any] = {
    "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
}

for _name in ("amqtt", "transitions"):
    logging.getLogger(_name).setLevel(logging.WARNING)


class EmbeddedBroker:
    """amqtt in this process, on the given listeners; open to anyone, or to the users of `auth`."""

    def __init__(
        self,
        listeners: list[str],
        *,
        cert: str | None = None,
        key: str | None = None,
        auth: BrokerAuth | None = None,
    ) -> None:
        self.listeners = listeners
        self.auth = auth
        configs = [listener_config(u, cert, key) for u in listeners]
        names = ["default"] + [f"listener{i}" for i in range(1, len(configs))]
        self._config: dict[str, Any] = {
            "listeners": dict(zip(names, configs, strict=True)),
            "plugins": auth.plugins() if auth else dict(_PLUGINS),
        }
        self._broker: Broker | None = None

    async def start(self) -> None:
        """Bind the listeners and start serving."""
        if self.auth:
            read_users(self.auth.users_file)  # a missing or bad file is one clear error, not amqtt's traceback
        # amqtt builds its state from the running loop, so the Broker is made here.
        self._broker = Broker(self._config)
        amqtt_log = logging.getLogger("amqtt.broker")
        level = amqtt_log.level
        # amqtt logs a failed start with a traceback; we report it as one clear error instead.
        amqtt_log.setLevel(logging.CRITICAL)
        try:
            await self._broker.start()
        except Exception as exc:  # amqtt wraps bind failures in its own BrokerError
            for server in self._broker._servers.values():  # the listeners bound before the failing one
                with contextlib.suppress(Exception):
                    await server.close_instance()
            self._broker = None
            raise FieldgateError(f"embedded broker cannot start on {', '.join(self.listeners)}: {exc}") from exc
        finally:
            amqtt_log.setLevel(level)
        access = f"users of {self.auth.users_file}" if self.auth else "anonymous access"
        log.info("embedded broker listening on %s (%s)", ", ".join(self.listeners), access)

    def login_failures(self) -> dict[str, int]:
        """Logins refused in this process, by reason (a BrokerProcess answers for its children)."""
        return login_failures()

    async def stop(self) -> None:
        """Stop serving and close every client connection."""
        if self._broker is not None:
            with contextlib.suppress(Exception):
                await self._broker.shutdown()
            self._broker = None
