"""Decode Sparkplug B messages with an independent implementation (pysparkplug), for the Sparkplug tests.

Runs ONLY in the separate venv described in README.md next to this file (pysparkplug pins paho-mqtt<2;
Fieldgate uses paho-mqtt 2). It imports nothing from Fieldgate. Not a test module: pytest does not
collect it (no test_ prefix); the tests run it as a subprocess.

Mode 1 (default), a filter:
    stdin:  one JSON object a line: {"topic": "spBv1.0/...", "payload": "<hex>"}
    stdout: one JSON object a line per input line:
        {"topic": {"group", "type", "edge", "device"}, "timestamp": int|null, "seq": int|null,
         "metrics": [{"name", "alias", "timestamp", "datatype", "value", "is_historical", "is_null",
                      "is_transient", "properties": {name: value}, ...}]}
        or {"error": "..."} when the line cannot be decoded; the filter goes on with the next line.
    Births seen earlier in the stream are remembered per (group, edge, device), as pysparkplug's own
    Client does, so that a DATA/CMD metric sent by alias only gets its name and datatype resolved.

Mode 2, a Sparkplug host application:  decode.py --host BROKER_HOST PORT GROUP HOST_ID
    Connects with pysparkplug.Client, sets the STATE will (online=false, QoS 1, retained), subscribes
    to spBv1.0/# and publishes STATE online=true (QoS 1, retained). Prints {"event": "online"} once
    subscribed, then every received message decoded as in mode 1 (plus "qos" and "retain" as received).
    Reads commands from stdin, one JSON object a line:
        {"cmd": "state", "online": false}
        {"cmd": "rebirth", "edge": "line-a"}                           NCMD Node Control/Rebirth = true
        {"cmd": "ncmd", "edge": E, "metrics": [{"name": .., "value": .., "datatype"?: "Int16"}]}
        {"cmd": "dcmd", "edge": E, "device": D, "metrics": [{"name": .., "value": .., "datatype"?: ..}]}
        {"cmd": "quit"}            (or end of input): STATE online=false, then a clean disconnect
    A metric's datatype defaults to the one in the last birth of that node/device. Each command is
    acknowledged with {"event": "sent", "mqtt_topic": ...} or {"event": "error", "error": ...}.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import sys
import threading
import time
from typing import Any

import pysparkplug as spb
from pysparkplug import _protobuf as spb_pb  # the library's own generated Sparkplug B protobuf module

BirthKey = tuple[str | None, str | None, str | None]

#: Message types whose payload is a pysparkplug Birth / data / command payload with metrics.
_WITH_METRICS = {
    spb.MessageType.NBIRTH,
    spb.MessageType.DBIRTH,
    spb.MessageType.NDATA,
    spb.MessageType.DDATA,
    spb.MessageType.NCMD,
    spb.MessageType.DCMD,
}


def datatype_name(code: int) -> str:
    """The specification's datatype name (Int16, Double, ...) for a datatype code, from the library's schema."""
    try:
        return str(spb_pb.DataType.Name(int(code)))
    except ValueError:
        return f"Unknown({code})"


def jsonable(value: Any) -> Any:
    """A decoded metric or property value as JSON: bytes as hex, DateTime as epoch ms, arrays as lists."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, datetime.datetime):
        return int(value.timestamp() * 1000)
    if isinstance(value, tuple | list):
        return [jsonable(v) for v in value]
    return value


def property_set(pset: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """A PropertySet as ({name: value}, {name: datatype name}); values decoded by pysparkplug's DataType."""
    values: dict[str, Any] = {}
    types: dict[str, str] = {}
    for key, pv in zip(pset.keys, pset.values, strict=False):
        types[key] = datatype_name(pv.type)
        field = pv.WhichOneof("value")
        if pv.is_null or field is None:
            values[key] = None
        elif field == "propertyset_value":
            values[key] = property_set(pv.propertyset_value)[0]
        elif field == "propertysets_value":
            values[key] = [property_set(p)[0] for p in pv.propertysets_value.propertyset]
        else:
            values[key] = jsonable(spb.DataType(pv.type).decode(getattr(pv, field)))
    return values, types


def metric_json(metric: spb.Metric, wire: Any) -> dict[str, Any]:
    """One metric: pysparkplug's decoded Metric, plus what pysparkplug's Metric drops (its PropertySet)."""
    props, prop_types = property_set(wire.properties) if wire.HasField("properties") else ({}, {})
    return {
        "name": metric.name,
        "alias": metric.alias,
        "timestamp": metric.timestamp,
        "datatype": datatype_name(metric.datatype),
        "value": None if metric.is_null else jsonable(metric.value),
        "is_historical": metric.is_historical,
        "is_null": metric.is_null,
        "is_transient": metric.is_transient,
        "properties": props,
        "property_types": prop_types,
        # What was on the wire before resolution against the birth (DATA may carry the alias only).
        "name_on_wire": wire.HasField("name"),
        "datatype_on_wire": wire.HasField("datatype"),
    }


def topic_json(topic: spb.Topic) -> dict[str, Any]:
    out: dict[str, Any] = {
        "group": topic.group_id,
        "type": str(topic.message_type) if topic.message_type is not None else None,
        "edge": topic.edge_node_id,
        "device": topic.device_id,
    }
    if topic.message_type == spb.MessageType.STATE:
        out["host_id"] = topic.sparkplug_host_id
    return out


def decode(topic_str: str, raw: bytes, births: dict[BirthKey, spb.Birth]) -> dict[str, Any]:
    """Decode one message with pysparkplug; raises on anything the library rejects."""
    topic = spb.Topic.from_str(topic_str)
    mtype = topic.message_type
    if not isinstance(mtype, spb.MessageType):
        raise ValueError(f"not a concrete Sparkplug topic: {topic_str!r}")
    if mtype == spb.MessageType.STATE:
        state = spb.State.decode(raw)
        return {"topic": topic_json(topic), "timestamp": state.timestamp, "online": state.online}
    key: BirthKey = (topic.group_id, topic.edge_node_id, topic.device_id)
    payload_cls = mtype.payload
    # The library's typed decode: validation (required timestamp, birth datatypes, NDEATH's bdSeq first),
    # alias/datatype resolution against the birth, and value decoding (two's complement, arrays...).
    typed = payload_cls.decode(raw, birth=births.get(key))
    # The same bytes through the library's generated protobuf class, for the fields its dataclasses drop
    # or misreport: properties, the presence of seq, and NDEATH's timestamp (NDeath.decode inverts it).
    wire = spb_pb.Payload.FromString(raw)
    if mtype in _WITH_METRICS:
        metrics = list(typed.metrics)
    else:  # NDEATH (pysparkplug's NDeath keeps only the first metric, bdSeq) and DDEATH (none expected)
        metrics = [spb.Metric.from_pb(m) for m in wire.metrics]
    if isinstance(typed, spb.NBirth):
        # A new NBIRTH invalidates the node's earlier births (device births follow it).
        for k in [k for k in births if k[:2] == key[:2]]:
            del births[k]
    if isinstance(typed, spb.NBirth | spb.DBirth):
        births[key] = typed
    return {
        "topic": topic_json(topic),
        "timestamp": wire.timestamp if wire.HasField("timestamp") else None,
        "seq": wire.seq if wire.HasField("seq") else None,
        "metrics": [metric_json(m, w) for m, w in zip(metrics, wire.metrics, strict=True)],
    }


def safe_decode(topic_str: str, raw: bytes, births: dict[BirthKey, spb.Birth]) -> dict[str, Any]:
    try:
        return decode(topic_str, raw, births)
    except KeyError as exc:  # Birth.get_name / get_dtype
        why = f"KeyError: alias or name {exc} is not in the last birth of this node/device"
        return {"error": why, "raw_topic": topic_str}
    except NotImplementedError as exc:  # DataType.UNKNOWN.decode: a metric with no datatype and no birth
        why = (
            f"NotImplementedError: {exc} (a metric without datatype: "
            "not allowed in a birth; in DATA/CMD, no birth seen to resolve it)"
        )
        return {"error": why, "raw_topic": topic_str}
    except Exception as exc:  # every failure becomes an error line
        return {"error": f"{type(exc).__name__}: {exc}", "raw_topic": topic_str}


class Out:
    """Thread-safe JSON lines on stdout (the host mode prints from paho's thread and from the main one)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __call__(self, obj: dict[str, Any]) -> None:
        line = json.dumps(obj, default=str)
        with self._lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()


def run_filter() -> int:
    out = Out()
    births: dict[BirthKey, spb.Birth] = {}
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            topic, hexpayload = obj["topic"], obj["payload"]
            raw = base64.b16decode(hexpayload, casefold=True)
        except Exception as exc:
            out({"error": f"bad input line: {type(exc).__name__}: {exc}"})
            continue
        out(safe_decode(topic, raw, births))
    return 0


# --- host application mode ----------------------------------------------------------------------------


def now_ms() -> int:
    return int(spb.get_current_timestamp())


class Host:
    def __init__(self, broker: str, port: int, group: str, host_id: str) -> None:
        self.broker, self.port, self.group, self.host_id = broker, port, group, host_id
        self.out = Out()
        self.births: dict[BirthKey, spb.Birth] = {}
        self.births_lock = threading.Lock()
        self.online = threading.Event()
        self.client = spb.Client(client_id=f"spb-host-{host_id}")
        self.state_topic = spb.Topic(message_type=spb.MessageType.STATE, sparkplug_host_id=host_id)
        # Sparkplug 3.0: the host's will is STATE online=false, QoS 1, retained.
        self.birth_ts = now_ms()
        self.client.set_will(self._state_message(False, self.birth_ts))

    def _state_message(self, online: bool, ts: int) -> spb.Message:
        return spb.Message(
            topic=self.state_topic,
            payload=spb.State(timestamp=ts, online=online),
            qos=spb.QoS.AT_LEAST_ONCE,
            retain=True,
        )

    def _on_raw(self, _client: Any, _userdata: Any, msg: Any) -> None:
        # Raw bytes, not pysparkplug's Client.subscribe callback: that one decodes before calling us, so a bad
        # payload would raise inside paho's thread (and we would not see the wire-level fields).
        with self.births_lock:
            decoded = safe_decode(msg.topic, bytes(msg.payload), self.births)
        decoded["qos"] = msg.qos
        decoded["retain"] = bool(msg.retain)
        self.out(decoded)

    def _on_connect(self, client: spb.Client) -> None:
        paho = client._client  # pysparkplug's underlying paho-mqtt 1.6 client (for raw payloads)
        paho.message_callback_add("spBv1.0/#", self._on_raw)
        paho.subscribe("spBv1.0/#", qos=1)
        # Subscriptions before STATE online: an edge node waiting for us must not birth into the void.
        client.publish(self._state_message(True, self.birth_ts))
        self.online.set()
        self.out({"event": "online", "host_id": self.host_id})

    def metric(self, key: BirthKey, spec: dict[str, Any]) -> spb.Metric:
        name = spec["name"]
        if "datatype" in spec:
            code = spb_pb.DataType.Value(spec["datatype"])
            dtype = spb.DataType(code)
        else:
            with self.births_lock:
                birth = self.births.get(key)
            if birth is None:
                raise ValueError(f"no birth seen for {key}; give the metric's datatype")
            try:
                dtype = birth.get_dtype(name)
            except KeyError:
                raise ValueError(f"metric {name!r} is not in the last birth of {key}") from None
        return spb.Metric(timestamp=now_ms(), name=name, datatype=dtype, value=spec["value"], alias=spec.get("alias"))

    def command(self, cmd: dict[str, Any]) -> None:
        kind = cmd["cmd"]
        if kind == "state":
            msg = self._state_message(bool(cmd["online"]), now_ms())
        elif kind in ("rebirth", "ncmd"):
            edge = cmd["edge"]
            if kind == "rebirth":
                specs = [{"name": "Node Control/Rebirth", "value": True, "datatype": "Boolean"}]
            else:
                specs = cmd["metrics"]
            metrics = tuple(self.metric((self.group, edge, None), s) for s in specs)
            topic = spb.Topic(group_id=self.group, message_type=spb.MessageType.NCMD, edge_node_id=edge)
            msg = spb.Message(
                topic=topic,
                payload=spb.NCmd(timestamp=now_ms(), metrics=metrics),
                qos=spb.QoS.AT_MOST_ONCE,
                retain=False,
            )
        elif kind == "dcmd":
            edge, device = cmd["edge"], cmd["device"]
            metrics = tuple(self.metric((self.group, edge, device), s) for s in cmd["metrics"])
            topic = spb.Topic(
                group_id=self.group, message_type=spb.MessageType.DCMD, edge_node_id=edge, device_id=device
            )
            msg = spb.Message(
                topic=topic,
                payload=spb.DCmd(timestamp=now_ms(), metrics=metrics),
                qos=spb.QoS.AT_MOST_ONCE,
                retain=False,
            )
        else:
            raise ValueError(f"unknown cmd {kind!r}")
        self.client.publish(msg, include_dtypes=True)
        self.out({"event": "sent", "mqtt_topic": str(msg.topic)})

    def run(self) -> int:
        self.client.connect(self.broker, port=self.port, keepalive=10, callback=self._on_connect)
        if not self.online.wait(10):
            self.out({"event": "error", "error": f"no connection to {self.broker}:{self.port} within 10 s"})
            self.client.disconnect()
            return 1
        try:
            for line in sys.stdin:
                if not line.strip():
                    continue
                try:
                    cmd = json.loads(line)
                    if cmd.get("cmd") == "quit":
                        break
                    self.command(cmd)
                except Exception as exc:
                    self.out({"event": "error", "error": f"{type(exc).__name__}: {exc}"})
        finally:
            # A clean exit says offline itself (a clean disconnect does not fire the will).
            self.client.publish(self._state_message(False, now_ms()))
            time.sleep(0.2)
            self.client.disconnect()
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", nargs=4, metavar=("BROKER_HOST", "PORT", "GROUP", "HOST_ID"))
    args = parser.parse_args()
    if args.host:
        broker, port, group, host_id = args.host
        return Host(broker, int(port), group, host_id).run()
    return run_filter()


if __name__ == "__main__":
    sys.exit(main())
