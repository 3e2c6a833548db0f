"""Building a northbound sink: its MQTT client, its spool file and the outbox between them, from one config entry."""

from __future__ import annotations

import functools
import logging
import secrets
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from bridge.broker_acl import BrokerAuth
from bridge.broker_listeners import client_url
from bridge.broker_users import INTERNAL_USER
from bridge.outbox import Outbox
from bridge.sink import MqttSink
from bridge.sparkplug.node import SparkplugNode
from bridge.spool import SQLiteSpool
from gateway.config.schema import Config, SinkConfig
from gateway.router import SUBSCRIPTIONS, restamp
from gateway.sparkplug_sinks import SparkplugSources, build_node
from gateway.supervise import Supervisor
from gateway.types import RequestMeta

#: Seconds a replay may wait after a (re)connect to a broker with a url: up to this, drawn at random per connect.
REPLAY_DELAY = 10.0

#: A northbound sink as the gateway runs it: the topic contract's MQTT sink, or a Sparkplug B edge node.
Sink = MqttSink | SparkplugNode

# The logger name these lines had before the split (sinks were built in the app):
# journal filters keep working.
log = logging.getLogger("gateway.app")


@dataclass(frozen=True)
class SinkHooks:
    """The gateway's side of every sink: requests (`on_request`) and connects (`on_connect`) get the sink's name
    first; `sparkplug`: what a Sparkplug sink reads of the gateway."""

    on_request: Callable[[str, str, bytes, RequestMeta], None]
    on_connect: Callable[[str], Coroutine[Any, Any, None]]
    sparkplug: SparkplugSources


def build_sink(
    cfg: Config, s: SinkConfig, *, auth: BrokerAuth | None, hooks: SinkHooks, supervisor: Supervisor
) -> tuple[Sink, Outbox]:
    """The MQTT sink (or Sparkplug edge node) of one `northbound` entry and its outbox on the sink's spool file.

    `auth`: the embedded broker's users, if it has any (a sink on it logs in as the gateway's own user).
    """
    on_request, on_connect = hooks.on_request, hooks.on_connect
    url = s.url or client_url(cfg.broker.listeners)
    urls = tuple(s.urls or (url,))  # the nodes of one cluster: the sink (and its one spool and outbox) goes round them
    client_id = s.client_id or f"fieldgate-{cfg.gateway.id}-{s.name}"
    username, password = s.username, s.password
    if s.url is None and auth is not None and username is None:
        username, password = INTERNAL_USER, auth.internal_password
        # amqtt drops a session's subscriptions when anyone connects with its client id, even a
        # client that then fails to log in: on a broker with users, ours is not guessable.
        client_id = s.client_id or f"{client_id}-{secrets.token_hex(4)}"
    common: dict[str, Any] = {
        "client_id": client_id,
        "keepalive": s.keepalive,
        "username": username,
        "password": password,
        "ca": s.ca,
        "cert": s.cert,
        "key": s.key,
        "supervisor": supervisor,
        "urls": urls,
        "reconnect_base": s.reconnect_base,
        "reconnect_cap": s.reconnect_cap,
        "max_request_age": s.max_request_age,
    }
    node: SparkplugNode | None = None
    if s.format == "sparkplug":
        # A DCMD's age limit is the sink's max_request_age (Sparkplug speaks MQTT 3.1.1: no message expiry).
        def on_set(topic: str, payload: bytes) -> None:
            on_request(s.name, topic, payload, RequestMeta(max_age=s.max_request_age))

        node = build_node(cfg, s, hooks.sparkplug, on_set)
        mqtt = node.connect_to(url, **common)
    else:
        mqtt = MqttSink(
            s.name,
            url,
            cfg.prefix_for(s),
            qos=s.qos,
            subscriptions=SUBSCRIPTIONS,
            on_request=functools.partial(on_request, s.name),
            on_connect=functools.partial(on_connect, s.name),
            protocol=s.protocol,
            session_expiry=s.max_request_age if s.session_expiry is None else s.session_expiry,
            message_expiry=s.spool.max_age,
            **common,
        )
    sink: Sink = node if node is not None else mqtt
    spool = SQLiteSpool(
        cfg.spool_path(s),
        max_size=s.spool.max_size,
        max_age=s.spool.max_age,
        when_full=s.spool.when_full,
        min_free_bytes=s.spool.min_free,
        name=f"sink {s.name} spool",
    )
    outbox = Outbox(
        sink,
        spool,
        commit_window=s.spool.commit_window,
        replay_rate=s.spool.replay_rate,
        replay_delay=replay_delay(s),
        order=s.spool.order,
        supervisor=supervisor,
        prepare=node.prepare if node is not None else None,
        restamp=restamp,  # what was stamped before the clock was set goes out corrected, its payload's ts too
    )
    if node is not None:
        log.info(
            "sink %s: Sparkplug B edge node %s/%s on %s", s.name, node.session.group, node.session.edge, " ".join(urls)
        )
    else:
        log.info("sink %s: publishing under %s/ on %s", s.name, cfg.prefix_for(s), " ".join(urls))
    return sink, outbox


def replay_delay(s: SinkConfig) -> float:
    """The most a replay waits after a (re)connect: as configured, else REPLAY_DELAY for a broker a fleet shares."""
    if s.spool.replay_delay is not None:
        return s.spool.replay_delay
    return REPLAY_DELAY if s.url is not None else 0.0


def refresh(sinks: list[Sink]) -> None:
    """After a reload: Sparkplug nodes whose devices or metrics changed are born again."""
    for sink in sinks:
        if isinstance(sink, SparkplugNode):
            sink.refresh()
