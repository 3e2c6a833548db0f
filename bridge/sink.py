"""A northbound MQTT sink: one paho client driven by the asyncio loop, awaitable publishes.

paho runs on our event loop (its socket registered with add_reader/add_writer, no thread).
Each QoS 1 publish gets a future keyed by its message id, resolved by the PUBACK. When the
connection drops first, the future fails with `SinkOffline` and the message is the caller's
again (the outbox spools it): every connection is a fresh paho client, so paho never re-sends
behind the outbox's back and one place (the spool) holds everything not yet acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import ssl
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from bridge import sink_mqtt5 as v5
from bridge.sink_inbound import OFFLINE, ConnectHandler, Inbound, RequestHandler, SinkStats, WillMaker
from bridge.sink_reconnect import BASE, CAP, Nodes, TakeoverWatch, backoff
from bridge.sink_requests5 import Requests5
from bridge.sink_sockets import LoopSockets
from gateway.errors import SinkError, SinkOffline
from gateway.supervise import Supervised, Supervisor
from gateway.types import ABSOLUTE, Message, now_ms

log = logging.getLogger(__name__)

MISC_INTERVAL = 1.0
#: A connection that lasted this long (s) starts the back-off again from its base; one the broker closes sooner (a
#: take-over, an auth plugin that accepts then drops) counts as a failed attempt, so that it is not retried at once.
#: Short: a link that drops every few seconds must still come back at once (10 s made the soak's 4 s connections
#: back off to the cap and publish 16 % less).
STABLE_AFTER = 2.0

__all__ = ["OFFLINE", "ConnectHandler", "MqttSink", "RequestHandler", "SinkStats", "WillMaker"]


class MqttSink(LoopSockets, Inbound):
    """Publishes the gateway's messages to one MQTT broker under one topic prefix."""

    def __init__(
        self,
        name: str,
        url: str,
        prefix: str,
        *,
        client_id: str,
        qos: int = 1,
        keepalive: float = 30.0,
        username: str | None = None,
        password: str | None = None,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        subscriptions: tuple[str, ...] = (),
        on_request: RequestHandler | None = None,
        on_connect: ConnectHandler | None = None,
        max_inflight: int = 100,
        supervisor: Supervisor | None = None,
        will: WillMaker | None = None,
        goodbye: WillMaker | None = None,
        announce: bool = True,
        retained_ok: Callable[[str], bool] | None = None,
        urls: tuple[str, ...] = (),
        reconnect_base: float = BASE,
        reconnect_cap: float = CAP,
        rand: Callable[[], float] | None = None,
        protocol: str = "3.1.1",
        session_expiry: float = 300.0,
        max_request_age: float = 30.0,
        message_expiry: float | None = None,
    ) -> None:
        """`will`/`goodbye`: the last will of each connection and what `stop` publishes (both `status` offline
        unless given); `announce`: publish `status` online on connect; `retained_ok`: the prefix-relative
        topics whose retained messages are state to take (a Sparkplug host's STATE), not stale requests; `urls`: the
        nodes of one cluster in turn (else `url`); `reconnect_*`, `rand`: the full-jitter back-off and its dice;
        `protocol` "5": MQTT 5 with `session_expiry`, and `message_expiry` (the spool's max_age) on timed data;
        `max_request_age`: a request's age limit when it gives none."""
        self.name = name
        self.prefix = prefix
        self.qos = qos
        self._nodes = Nodes(urls or (url,))
        self.stats = SinkStats(broker=self._nodes.current.url)
        self._host, self._port = self._nodes.current.host, self._nodes.current.port
        self._backoff = functools.partial(backoff, base=reconnect_base, cap=reconnect_cap, rand=rand or random.random)
        self._takeover = TakeoverWatch()
        self._v5 = protocol == "5"
        self._session_expiry, self._max_request_age = session_expiry, max_request_age
        self._message_expiry = message_expiry if self._v5 else None
        self._reasons = v5.Reasons(name, self.stats.broker_refusals)
        self._requests5 = Requests5(name, prefix, max_request_age, self.respond)
        self._responses: dict[int, str] = {}
        self._max_packet_out: int | None = None  # the broker's Maximum Packet Size (MQTT 5 CONNACK)
        # Attempts since the last connection that was up; our own drop() under way (no take-over of the broker's).
        self._failures, self._dropping, self._up_since = 0, False, 0.0
        self._subacked = False  # this connection's SUBSCRIBE acknowledged
        self._keepalive = max(1, int(keepalive))
        self._subscriptions = subscriptions
        self._on_request = on_request
        self._on_connect_hook = on_connect
        self._client_id = client_id
        self._credentials = (username, password)
        self._max_inflight = max_inflight
        self._will = will
        self._goodbye = goodbye
        self._announce = announce
        self._retained_ok = retained_ok
        self._tls: ssl.SSLContext | None = None
        if self._nodes.any_tls:
            self._tls = ssl.create_default_context(cafile=ca)
            if cert:
                self._tls.load_cert_chain(cert, key)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected = asyncio.Event()
        self._dropped = asyncio.Event()  # the connection attempt or session ended
        self._closing = False
        self._stopped = asyncio.Event()
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        # The gateway's supervisor: a connect loop that fails is restarted and shows in /healthz.
        self._supervisor = supervisor or Supervisor()
        self._misc: Supervised | None = None
        self._connector: Supervised | None = None
        self._attempts = 0
        self._client = self._new_client()

    def _new_client(self) -> mqtt.Client:
        """A paho client for one connection: nothing of an earlier connection's in-flight state in it."""
        if self._v5:  # clean start or not is the connect's to say
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self._client_id, protocol=mqtt.MQTTv5)
        else:
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self._client_id, clean_session=True)
        c.max_inflight_messages_set(self._max_inflight)
        c.max_queued_messages_set(0)
        username, password = self._credentials
        if username is not None:
            c.username_pw_set(username, password)
        if self._tls is not None and self._nodes.current.tls:
            c.tls_set_context(self._tls)
        # The last will tells subscribers the gateway vanished without a goodbye.
        will = self._will() if self._will is not None else OFFLINE
        c.will_set(self.topic(will.topic), will.payload, qos=1 if will.qos is None else will.qos, retain=will.retain)
        c.on_connect = self._handle_connect
        c.on_disconnect = self._handle_disconnect
        c.on_publish = self._handle_puback
        c.on_message = self._handle_message
        c.on_subscribe = self._handle_suback
        c.on_socket_open = self._socket_open
        c.on_socket_close = self._socket_close
        c.on_socket_register_write = self._register_write
        c.on_socket_unregister_write = self._unregister_write
        return c

    def topic(self, relative: str) -> str:
        """The full topic of a prefix-relative one; an `absolute` one (`/…`) is taken as it is."""
        if relative.startswith(ABSOLUTE):
            return relative[len(ABSOLUTE) :]
        return f"{self.prefix}/{relative}"

    @property
    def connected(self) -> bool:
        """True while the broker session is up."""
        return self._connected.is_set()

    async def start(self) -> None:
        """Start connecting in the background; publishes wait for the connection."""
        self._loop = asyncio.get_running_loop()
        self._connector = self._supervisor.spawn(f"sink:{self.name}:connect", self._connect_loop)
        self._misc = self._supervisor.spawn(f"sink:{self.name}:misc", self._misc_loop)

    async def wait_connected(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the broker session; True when it is up."""
        try:
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        """Say `offline`, disconnect cleanly and stop the background tasks."""
        self._closing = True
        if self.connected:
            with contextlib.suppress(SinkError, TimeoutError):
                async with asyncio.timeout(2.0):
                    await self.publish(self._goodbye() if self._goodbye is not None else OFFLINE)
        await self._supervisor.stop(self._connector, self._misc)
        self._client.disconnect()
        self._fail_pending(SinkOffline(f"sink {self.name} stopped before the broker acknowledged"))
        self._connected.clear()
        self._stopped.set()

    async def publish(self, message: Message) -> None:
        """Publish and return once the broker acknowledged it (QoS 1) or it was written (QoS 0); across reconnects."""
        while True:
            if self._closing and not self.connected:
                raise SinkError(f"sink {self.name} is stopped")
            if not self._connected.is_set():
                waiters = [asyncio.ensure_future(self._connected.wait()), asyncio.ensure_future(self._stopped.wait())]
                try:
                    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waiters:
                        w.cancel()
                continue
            fut = self.try_publish(message)
            if fut is None:
                continue
            try:
                await fut
            except SinkOffline:
                if self._closing:
                    raise
                continue  # the connection dropped first: publish it again on the next one
            return

    def try_publish(self, message: Message) -> asyncio.Future[None] | None:
        """Hand a message to paho now: a future resolved by its PUBACK (QoS 0: once paho wrote it to the socket), or
        None while disconnected.

        No task per message: the hot path of every publish (the outbox drains through here).
        """
        if not self._connected.is_set():
            return None
        assert self._loop is not None
        qos = self.qos if message.qos is None else message.qos
        topic = self.topic(message.topic)
        fut: asyncio.Future[None] = self._loop.create_future()
        props = v5.publish_properties(message, self._message_expiry, now_ms()) if self._v5 else None
        if self._max_packet_out is not None and v5.too_large(topic, message.payload, props, self._max_packet_out):
            fut.set_exception(
                SinkError(
                    f"sink {self.name}: a {len(message.payload)}-byte message to {topic} is over "
                    f"the broker's maximum packet size ({self._max_packet_out} bytes)"
                )
            )
            return fut
        try:
            info = self._client.publish(topic, message.payload, qos=qos, retain=message.retain, properties=props)
        except (ValueError, TypeError) as exc:
            fut.set_exception(SinkError(f"sink {self.name}: cannot publish to {topic}: {exc}"))
            return fut
        if qos == 0:
            if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
                return None  # lost just now: the caller waits for the connection
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                fut.set_exception(
                    SinkError(f"sink {self.name}: publish to {topic} failed: {mqtt.error_string(info.rc)}")
                )
                return fut
            if info.is_published():
                self.stats.published += 1
                fut.set_result(None)
                return fut
            # Delivered once paho has written it to the socket (its on_publish): what is still in paho's queue when
            # the connection drops goes back to the caller (the outbox spools it), as an unacknowledged QoS 1 does.
            self._pending[info.mid] = fut
            return fut
        # QoS 1: paho keeps the message until its PUBACK, also across a reconnect (NO_CONN
        # means it will go out once connected), so one future per message id is enough.
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            fut.set_exception(SinkError(f"sink {self.name}: publish to {topic} failed: {mqtt.error_string(info.rc)}"))
            return fut
        self._pending[info.mid] = fut
        return fut

    def drop(self) -> None:
        """End the broker session now, without the will (say goodbye first if one is due); it is connected again."""
        if self._client.is_connected():
            self._dropping = True
            self._client.disconnect()

    # --- paho callbacks (all on the loop thread once connected) ------------------------------------

    def _fail_pending(self, exc: SinkError) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)

    def _handle_connect(self, client: mqtt.Client, _ud: Any, flags: Any, reason: Any, props: Any) -> None:
        if client is not self._client:
            return
        if reason.is_failure:
            self._reasons.refused("CONNACK", reason, self._nodes.current.url)
            return
        self.stats.connects += 1
        self._dropping, self._up_since = False, time.monotonic()
        self._takeover.connected()
        self._subacked = False
        if self._v5:
            self._requests5.connected(bool(flags.session_present), time.monotonic())
            receive, self._max_packet_out = v5.connack_limits(props)
            if receive is not None:
                # Never more publishes unacknowledged than the broker said it takes. paho's setter refuses once
                # connected, and reads no CONNACK property itself; nothing was published on this client yet.
                client._max_inflight_messages = min(self._max_inflight, receive)
        log.info("sink %s: connected to %s", self.name, self._nodes.current.url)
        for sub in self._subscriptions:
            client.subscribe(self.topic(sub), qos=1)
        if self._announce:
            client.publish(self.topic("status"), b"online", qos=1, retain=True)
        self._connected.set()
        if self._on_connect_hook:
            task = asyncio.get_running_loop().create_task(self._on_connect_hook(), name=f"sink:{self.name}:on-connect")
            self._tasks.add(task)
            task.add_done_callback(self._hook_done)

    def _hook_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Said once per connect, with the traceback: the retained state was not (all) published again.
            log.error("sink %s: re-publishing after the connect failed: %r", self.name, exc, exc_info=exc)

    def _handle_disconnect(self, client: mqtt.Client, _ud: Any, flags: Any, reason: Any, _props: Any) -> None:
        if client is not self._client:
            return
        self._dropped.set()
        self._requests5.dropped(time.monotonic())
        self._responses.clear()
        was = self._connected.is_set()
        self._connected.clear()
        if was:
            self.stats.disconnects += 1
            if time.monotonic() - self._up_since >= STABLE_AFTER:
                self._failures = 0  # a connection that lasted: retries start from the base again
            if flags.is_disconnect_packet_from_server and v5.failed(reason):  # MQTT 5: why (e.g. taken over)
                self._reasons.refused("DISCONNECT", reason, self._nodes.current.url)
            # Closed before the SUBACK: the broker refused (or could not serve) our SUBSCRIBE, e.g. a cluster whose
            # node holding the subscription's queue is down; a take-over comes after the SUBACK.
            unsubscribed = bool(self._subscriptions) and not self._subacked
            if not self._closing:
                why = (
                    " before it acknowledged the subscriptions (refused? see the broker's log)" if unsubscribed else ""
                )
                log.warning("sink %s: connection to %s lost%s: %s", self.name, self._nodes.current.url, why, reason)
            if not (self._closing or self._dropping or unsubscribed) and self._takeover.dropped():
                self.stats.takeovers += 1
                log.error(self._takeover.message(self.name, self._client_id, self._nodes.current.url))
        # The next connection is a new client: what this one did not get acknowledged goes back to the caller.
        self.stats.unacked_at_disconnect += sum(1 for f in self._pending.values() if not f.done())
        self._fail_pending(SinkOffline(f"sink {self.name}: connection lost before the broker acknowledged"))

    async def _connect_loop(self) -> None:
        while True:
            if self._connected.is_set() and not self._dropped.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(MISC_INTERVAL):
                        await self._dropped.wait()
                continue
            if self._client.is_connected():
                await asyncio.sleep(MISC_INTERVAL)
                continue
            assert self._loop is not None
            if self._attempts:
                # Every retry waits a random share of the back-off, the first one too: a fleet that lost its broker
                # together spreads out. Then the next node (this one failed or dropped us) with a fresh client (also
                # after a restart by the supervisor), none left half-used.
                await asyncio.sleep(self._backoff(self._failures))
                self._failures += 1
                if (node := self._nodes.advance()).url != self.stats.broker:
                    self.stats.broker, self._host, self._port = node.url, node.host, node.port
                self._client = self._new_client()
            self._attempts += 1
            self._dropped.clear()
            connect = functools.partial(self._client.connect, self._host, self._port, self._keepalive)
            if self._v5:  # the broker keeps the session (subscriptions, requests meanwhile) for session_expiry
                connect = functools.partial(
                    connect, clean_start=False, properties=v5.connect_properties(self._session_expiry)
                )
            try:  # the TCP (and TLS) handshake blocks: in a worker thread
                await self._loop.run_in_executor(None, connect)
            except (OSError, ssl.SSLError) as exc:
                log.debug("sink %s: connect to %s failed: %s", self.name, self.stats.broker, exc)
                continue
            # Give the CONNACK time to come back over a slow link, unless the connection drops first.
            await self._connected_or_dropped(max(10.0, self._keepalive))

    async def _connected_or_dropped(self, timeout: float) -> None:
        waiters = [asyncio.ensure_future(self._connected.wait()), asyncio.ensure_future(self._dropped.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def _misc_loop(self) -> None:
        while True:
            await asyncio.sleep(MISC_INTERVAL)
            # Keep-alive pings and timeout detection.
            self._client.loop_misc()
