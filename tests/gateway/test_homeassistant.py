"""Home Assistant discovery: payloads checked against the documented schema, ids, removals, end to end.

The schema below is written from Home Assistant's documentation, one model per component, each with
exactly the documented configuration variables (unknown keys are refused: HA ignores them, so one there
would be a typo that silently does nothing). Pages (home-assistant.io):
- /integrations/mqtt/#mqtt-discovery: discovery topic, payload, `origin`, removal by empty payload
- /integrations/sensor.mqtt/, /integrations/binary_sensor.mqtt/, /integrations/number.mqtt/,
  /integrations/switch.mqtt/, /integrations/text.mqtt/: each component's variables
- /integrations/sensor/#device-class, /integrations/binary_sensor/#device-class,
  /integrations/number/#device-class, /integrations/switch/#device-class: device classes
- developers.home-assistant.io/docs/core/entity/sensor#available-state-classes: state classes
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal, cast

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bridge import statefiles
from bridge.outbox import Outbox
from bridge.sink import MqttSink
from bridge.statefiles import corrupt_counts
from gateway.app import Gateway
from gateway.config import load_config, parse_config
from gateway.errors import ConfigError
from gateway.homeassistant import Discovery, configs, discovery_messages, removal_messages
from gateway.types import Message

import configs as build  # the tests' config builder (`configs` is gateway.homeassistant's)
from configs import Section
from helpers import GatewayProcess, Received, Subscriber, free_port, subscribed, until
from mosquitto import Mosquitto


@pytest.fixture(autouse=True)
def counted_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """The corrupt-file counters are process-wide: this module's count from zero and leave others' as they were."""
    monkeypatch.setattr(statefiles, "_counts", dict.fromkeys(statefiles.FILES, 0))


# --- the documented discovery schema ------------------------------------------------------------

#: /integrations/mqtt/#discovery-topic: `<discovery_prefix>/<component>/[<node_id>/]<object_id>/config`,
#: ids of `[a-zA-Z0-9_-]`.
TOPIC = re.compile(
    r"^(?P<prefix>[^/]+)/(?P<component>[a-z_]+)/(?:[a-zA-Z0-9_-]+/)?(?P<object_id>[a-zA-Z0-9_-]+)/config$"
)

#: /integrations/sensor/#device-class (numeric ones as listed for numbers, plus date/timestamp/enum)
NUMBER_CLASSES = set(
    "apparent_power aqi area atmospheric_pressure battery blood_glucose_concentration carbon_dioxide "
    "carbon_monoxide current data_rate data_size distance duration energy energy_distance energy_storage "
    "frequency gas humidity illuminance irradiance moisture monetary nitrogen_dioxide nitrogen_monoxide "
    "nitrous_oxide ozone ph pm1 pm25 pm10 power_factor power precipitation precipitation_intensity pressure "
    "reactive_power signal_strength sound_pressure speed sulphur_dioxide temperature volatile_organic_compounds "
    "volatile_organic_compounds_parts voltage volume volume_flow_rate volume_storage water weight "
    "wind_direction wind_speed".split()
)
SENSOR_CLASSES = NUMBER_CLASSES | {"date", "enum", "timestamp"}
#: /integrations/binary_sensor/#device-class
BINARY_SENSOR_CLASSES = set(
    "battery battery_charging carbon_monoxide cold connectivity door garage_door gas heat light lock "
    "moisture motion moving occupancy opening plug power presence problem running safety smoke sound "
    "tamper update vibration window".split()
)
#: /integrations/switch/#device-class
SWITCH_CLASSES = {"outlet", "switch"}


class Strict(BaseModel):
    """Only documented keys."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Availability(Strict):
    """An entry of `availability` (number.mqtt documents no `value_template` here; the others do)."""

    topic: str
    payload_available: str = "online"
    payload_not_available: str = "offline"
    value_template: str | None = None


class Device(Strict):
    """The `device` mapping: "At least one of identifiers or connections must be present"."""

    configuration_url: str | None = None
    connections: list[list[str]] | None = None
    hw_version: str | None = None
    identifiers: str | list[str] | None = None
    manufacturer: str | None = None
    model: str | None = None
    model_id: str | None = None
    name: str | None = None
    serial_number: str | None = None
    suggested_area: str | None = None
    sw_version: str | None = None
    via_device: str | None = None

    @model_validator(mode="after")
    def _identified(self) -> Device:
        assert self.identifiers or self.connections, "device needs identifiers or connections"
        return self


class Origin(Strict):
    """/integrations/mqtt/#discovery-payload: `origin` (name required)."""

    name: str
    sw_version: str | None = None
    support_url: str | None = None


class Entity(Strict):
    """Variables every component here documents."""

    availability: list[Availability] | None = None
    availability_mode: Literal["all", "any", "latest"] | None = None
    availability_topic: str | None = None
    device: Device | None = None
    enabled_by_default: bool | None = None
    encoding: str | None = None
    entity_category: str | None = None
    entity_picture: str | None = None
    icon: str | None = None
    json_attributes_template: str | None = None
    json_attributes_topic: str | None = None
    name: str | None = None
    object_id: str | None = None
    origin: Origin | None = None
    qos: Literal[0, 1, 2] | None = None
    unique_id: str | None = None

    @model_validator(mode="after")
    def _common(self) -> Entity:
        assert not (self.availability and self.availability_topic), "availability and availability_topic together"
        assert self.device is None or self.unique_id, "device only works when unique_id is set"
        return self


class Sensor(Entity):
    """/integrations/sensor.mqtt/"""

    availability_template: str | None = None
    device_class: str | None = None
    expire_after: int | None = None
    force_update: bool | None = None
    last_reset_value_template: str | None = None
    options: list[str] | None = None
    payload_available: str | None = None
    payload_not_available: str | None = None
    suggested_display_precision: int | None = None
    state_class: Literal["measurement", "total", "total_increasing"] | None = None
    state_topic: str
    unit_of_measurement: str | None = None
    value_template: str | None = None

    @model_validator(mode="after")
    def _rules(self) -> Sensor:
        assert self.device_class is None or self.device_class in SENSOR_CLASSES, self.device_class
        assert self.entity_category in (None, "diagnostic"), "entity category must be diagnostic for sensors"
        if self.options is not None:
            assert self.device_class == "enum" and self.state_class is None and self.unit_of_measurement is None
        if self.last_reset_value_template is not None:
            assert self.state_class == "total"
        return self


class BinarySensor(Entity):
    """/integrations/binary_sensor.mqtt/"""

    availability_template: str | None = None
    device_class: str | None = None
    expire_after: int | None = None
    force_update: bool | None = None
    off_delay: int | None = None
    payload_available: str | None = None
    payload_not_available: str | None = None
    payload_off: str = "OFF"
    payload_on: str = "ON"
    state_topic: str
    value_template: str | None = None

    @model_validator(mode="after")
    def _rules(self) -> BinarySensor:
        assert self.device_class is None or self.device_class in BINARY_SENSOR_CLASSES, self.device_class
        assert self.entity_category in (None, "diagnostic"), "entity category must be diagnostic for sensors"
        return self


class Number(Entity):
    """/integrations/number.mqtt/ (no `availability_template`, no top-level payload_available)"""

    command_template: str | None = None
    command_topic: str
    device_class: str | None = None
    min: float = 1
    max: float = 100
    mode: Literal["auto", "box", "slider"] | None = None
    optimistic: bool | None = None
    payload_reset: str | None = None
    retain: bool | None = None
    state_topic: str | None = None
    step: float = 1
    unit_of_measurement: str | None = None
    value_template: str | None = None

    model_config = ConfigDict(extra="forbid", strict=False)  # min/max/step are floats: ints are fine

    @model_validator(mode="after")
    def _rules(self) -> Number:
        assert self.device_class is None or self.device_class in NUMBER_CLASSES, self.device_class
        assert self.step >= 0.001, "step: smallest value 0.001"
        assert self.min <= self.max
        assert all(a.value_template is None for a in self.availability or [])
        return self


class Switch(Entity):
    """/integrations/switch.mqtt/"""

    availability_template: str | None = None
    command_template: str | None = None
    command_topic: str
    device_class: str | None = None
    optimistic: bool | None = None
    payload_available: str | None = None
    payload_not_available: str | None = None
    payload_off: str = "OFF"
    payload_on: str = "ON"
    retain: bool | None = None
    state_off: str | None = None
    state_on: str | None = None
    state_topic: str | None = None
    value_template: str | None = None

    @model_validator(mode="after")
    def _rules(self) -> Switch:
        assert self.device_class is None or self.device_class in SWITCH_CLASSES, self.device_class
        return self


class Text(Entity):
    """/integrations/text.mqtt/ (`icon` is not in its variable list, but in its example: kept allowed)"""

    availability_template: str | None = None
    command_template: str | None = None
    command_topic: str
    max: int = Field(default=255, le=255)
    min: int = Field(default=0, ge=0)
    mode: Literal["text", "password"] | None = None
    pattern: str | None = None
    retain: bool | None = None
    state_topic: str | None = None
    value_template: str | None = None


SCHEMA: dict[str, type[Entity]] = {
    "sensor": Sensor,
    "binary_sensor": BinarySensor,
    "number": Number,
    "switch": Switch,
    "text": Text,
}


def validate(topic: str, payload: dict[str, Any] | bytes) -> Entity:
    """Check one discovery message against the documented schema; the parsed config."""
    m = TOPIC.match(topic)
    assert m, f"{topic} is not a discovery topic"
    body = json.loads(payload) if isinstance(payload, bytes) else payload
    assert isinstance(body, dict), "the payload must be a serialized JSON dictionary"
    entity = SCHEMA[m["component"]].model_validate(body)
    # Best practice: "for entities with a unique_id ... set <object_id> to unique_id".
    assert entity.unique_id == m["object_id"]
    return entity


def test_the_schema_refuses_what_the_docs_do_not_allow() -> None:
    """The oracle is not vacuous: each documented rule it encodes refuses a payload that breaks it."""
    good = {"state_topic": "x/t", "unique_id": "u1", "device": {"identifiers": ["d"]}}
    validate("homeassistant/sensor/u1/config", good)
    bad: list[tuple[str, dict[str, Any]]] = [
        ("sensor", {**good, "colour": "red"}),  # not a documented key
        ("sensor", {**good, "platform": "sensor"}),  # only in device-based discovery
        ("sensor", {"unique_id": "u1"}),  # state_topic is required
        ("sensor", {**good, "device_class": "temprature"}),
        ("sensor", {**good, "state_class": "average"}),
        ("sensor", {**good, "availability_topic": "a", "availability": [{"topic": "b"}]}),
        ("sensor", {**good, "device": {"name": "no ids"}}),
        ("sensor", {**good, "entity_category": "config"}),
        ("binary_sensor", {**good, "device_class": "temperature"}),
        ("number", {**good}),  # command_topic is required
        ("number", {**good, "command_topic": "x/set", "step": 0.0001}),
        ("number", {**good, "command_topic": "x/set", "availability": [{"topic": "a", "value_template": "{{x}}"}]}),
        ("switch", {**good, "command_topic": "x/set", "device_class": "door"}),
        ("text", {**good, "command_topic": "x/set", "max": 300}),
    ]
    for component, payload in bad:
        with pytest.raises((ValidationError, AssertionError)):
            validate(f"homeassistant/{component}/u1/config", payload)
    with pytest.raises(AssertionError):
        validate("homeassistant/sensor/u1.x/config", good)  # `.` is not allowed in an object id
    with pytest.raises(AssertionError):
        validate("homeassistant/sensor/other/config", good)  # object id is not the unique id


# --- the builder ----------------------------------------------------------------------------------

CONFIG = """
gateway: {id: gw1, state_dir: ./state}
homeassistant: {enabled: true}
modbus:
  templates:
    meter:
      - {name: energy, table: input, address: 0, type: uint32, unit: kWh, device_class: energy,
         state_class: total_increasing}
  buses:
    - name: line
      port: /dev/ttyUSB0
      devices:
        - name: plc
          unit: 1
          points:
            - {name: temp, table: holding, address: 0, type: int16, scale: 0.1, unit: "°C",
               device_class: temperature, state_class: measurement, icon: "mdi:thermometer"}
            - {name: sp, table: holding, address: 1, type: float32, writable: true, min: 5, max: 80.5, unit: "°C",
               device_class: temperature}
            - {name: half, table: holding, address: 3, type: uint16, scale: 0.5, writable: true}
            - {name: raw, table: holding, address: 4, type: int16, writable: true}
            - {name: free, table: holding, address: 5, type: float64, writable: true}
            - {name: relay, table: coil, address: 0, writable: true, device_class: outlet}
            - {name: door, table: discrete, address: 0, device_class: door}
            - {name: flags, table: holding, address: 9, type: bitfield, bits: {0: run, 5: alarm},
               device_class: problem}
            - {name: label, table: holding, address: 10, type: "string:10", unit: x}
            - {name: note, table: holding, address: 20, type: "string:250", writable: true}
        - {name: m1, unit: 2, template: meter}
mcp:
  devices:
    - id: pump-1
      token: token-0123456789
      points:
        - {name: flow, unit: "m³/h", device_class: volume_flow_rate, state_class: measurement}
        - {name: running, type: bool, device_class: running}
        - {name: mode, type: string}
    - {id: quiet, token: token-0123456789}
"""

P = "fieldgate/gw1"

#: point -> (component, its device): every kind of point, with the component the issue asks for.
EXPECTED = {
    ("plc", "temp"): "sensor",
    ("plc", "sp"): "number",
    ("plc", "half"): "number",
    ("plc", "raw"): "number",
    ("plc", "free"): "number",
    ("plc", "relay"): "switch",
    ("plc", "door"): "binary_sensor",
    ("plc", "flags.run"): "binary_sensor",
    ("plc", "flags.alarm"): "binary_sensor",
    ("plc", "label"): "sensor",
    ("plc", "note"): "text",
    ("m1", "energy"): "sensor",
    ("pump-1", "flow"): "sensor",
    ("pump-1", "running"): "binary_sensor",
    ("pump-1", "mode"): "sensor",
}


def built(text: str = CONFIG, prefix: str = P) -> dict[str, dict[str, Any]]:
    """Discovery topic -> payload for a config text."""
    return configs(parse_config(text).config, prefix)


def by_point(cfgs: dict[str, dict[str, Any]], prefix: str = P) -> dict[tuple[str, str], tuple[str, dict[str, Any]]]:
    """(device, point) -> (discovery topic, payload), read back from each payload's state topic."""
    out = {}
    for topic, payload in cfgs.items():
        device, _, point = payload["state_topic"].removeprefix(prefix + "/").partition("/")
        if point:
            out[(device, point)] = (topic, payload)
    return out


def test_every_payload_validates_against_the_documented_schema() -> None:
    cfgs = built()
    for topic, payload in cfgs.items():
        validate(topic, payload)
    points = by_point(cfgs)
    assert {k: TOPIC.match(t)["component"] for k, (t, _) in points.items()} == EXPECTED  # type: ignore[index]
    # And the gateway's own entity, the device every other one is `via`.
    gateway = cfgs["homeassistant/binary_sensor/gw1_status/config"]
    assert gateway["state_topic"] == f"{P}/status" and gateway["device_class"] == "connectivity"
    assert all(p["device"]["via_device"] == gateway["device"]["identifiers"][0] for _, p in points.values())


def test_unique_ids_are_gateway_device_point_unique_and_stable() -> None:
    cfgs = built()
    points = by_point(cfgs)
    ids = [p["unique_id"] for p in cfgs.values()]
    assert len(ids) == len(set(ids))
    assert points[("plc", "temp")][1]["unique_id"] == "gw1_plc_temp"
    assert points[("plc", "flags.alarm")][1]["unique_id"] == "gw1_plc_flags_alarm"  # `.` is not allowed
    assert points[("pump-1", "flow")][0] == "homeassistant/sensor/gw1_pump-1_flow/config"
    # Stable: the same config builds the same ids, and a point keeps its id when others come and go.
    assert built() == cfgs
    fewer = built(
        CONFIG.replace("            - {name: raw, table: holding, address: 4, type: int16, writable: true}\n", "")
    )
    assert ("plc", "raw") not in by_point(fewer)
    assert {k: v for k, v in points.items() if k != ("plc", "raw")} == by_point(fewer)
    # Another gateway's entities never collide with these.
    other = built(CONFIG.replace("id: gw1", "id: gw2"), "fieldgate/gw2")
    assert not {p["unique_id"] for p in cfgs.values()} & {p["unique_id"] for p in other.values()}


def test_availability_is_the_device_status_and_the_gateway_status() -> None:
    for (device, _), (_, payload) in by_point(built()).items():
        assert payload["availability"] == [
            {"topic": f"{P}/status", "payload_available": "online", "payload_not_available": "offline"},
            {"topic": f"{P}/{device}/status", "payload_available": "online", "payload_not_available": "offline"},
        ]
        assert payload["availability_mode"] == "all"


def test_writable_points_command_our_set_topic_with_the_configured_range() -> None:
    points = by_point(built())
    for (device, point), (_, payload) in points.items():
        if EXPECTED[(device, point)] in ("number", "switch", "text"):
            assert payload["command_topic"] == f"{P}/{device}/set/{point}"
        else:
            assert "command_topic" not in payload
    sp = points[("plc", "sp")][1]
    assert (sp["min"], sp["max"], sp["unit_of_measurement"], sp["device_class"]) == (5, 80.5, "°C", "temperature")
    # Without min/max: what the type holds, in engineering units, moving in steps of the scale.
    half = points[("plc", "half")][1]
    assert (half["min"], half["max"], half["step"]) == (0, 32767.5, 0.5)
    raw = points[("plc", "raw")][1]
    assert (raw["min"], raw["max"], raw["step"]) == (-32768, 32767, 1)
    free = points[("plc", "free")][1]
    assert free["min"] < -1e300 and free["max"] > 1e300 and free["step"] == 0.001
    relay = points[("plc", "relay")][1]
    # The switch sends what our bool topics carry, JSON true/false, and compares the state with it.
    assert (relay["payload_on"], relay["payload_off"], relay["device_class"]) == ("true", "false", "outlet")
    note = points[("plc", "note")][1]
    assert note["max"] == 250 and note["command_template"] == "{{ value | to_json }}"


def test_units_and_classes_where_the_config_says() -> None:
    points = by_point(built())
    temp = points[("plc", "temp")][1]
    assert temp["unit_of_measurement"] == "°C" and temp["device_class"] == "temperature"
    assert temp["state_class"] == "measurement" and temp["icon"] == "mdi:thermometer"
    assert "value_template" not in temp  # the topic carries the bare number
    energy = points[("m1", "energy")][1]  # from a template
    assert (energy["unit_of_measurement"], energy["state_class"]) == ("kWh", "total_increasing")
    assert points[("plc", "flags.alarm")][1]["device_class"] == "problem"
    assert points[("plc", "door")][1]["payload_on"] == "true"
    label = points[("plc", "label")][1]
    assert "unit_of_measurement" not in label  # a unit makes HA expect a number
    assert label["value_template"] == "{{ value_json }}"  # strip the JSON string's quotes
    assert points[("pump-1", "flow")][1]["unit_of_measurement"] == "m³/h"
    assert points[("pump-1", "running")][1]["device_class"] == "running"
    assert ("quiet", "x") not in points and not any(d == "quiet" for d, _ in points)  # declares no points


def test_discovery_topics_are_absolute_and_payloads_follow_the_sink_prefix() -> None:
    cfg = parse_config(CONFIG.replace("enabled: true", "enabled: true, discovery_prefix: ha")).config
    local, cloud = discovery_messages(cfg, P), discovery_messages(cfg, "plants/site-12")
    assert [m.topic for m in local] == [m.topic for m in cloud]
    assert all(m.topic.startswith("/ha/") and m.retain and m.qos == 1 for m in local)
    sink = MqttSink("s", "mqtt://127.0.0.1:1", "plants/site-12", client_id="c")
    assert sink.topic(local[0].topic) == local[0].topic.removeprefix("/")
    assert sink.topic("plc/temp") == "plants/site-12/plc/temp"
    cloud_temp = next(json.loads(m.payload) for m in cloud if m.topic.endswith("/gw1_plc_temp/config"))
    assert cloud_temp["state_topic"] == "plants/site-12/plc/temp"
    assert [m.payload for m in removal_messages(["ha/sensor/x/config"])] == [b""]


def test_disabled_publishes_nothing() -> None:
    cfg = parse_config(CONFIG.replace("enabled: true", "enabled: false")).config
    assert Discovery(cfg).topics == set()


# --- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("point", "message"),
    [
        (build.point("x", "coil", 0, state_class="measurement"), "`state_class` is for numeric points"),
        (
            build.point("x", "holding", 0, writable=True, state_class="measurement"),
            "does not apply to a writable point",
        ),
        (build.point("x", "holding", 0, device_class="Temperature"), "is not a Home Assistant device class"),
        (build.point("x", "holding", 0, icon="thermometer"), "is not an icon"),
        (build.point("x", "holding", 0, state_class="mean"), "state_class"),
    ],
)
def test_config_refuses_hints_that_cannot_work(point: Section, message: str) -> None:
    bus = build.line("b", "/dev/x", build.device("d", 1, points=[point]), baudrate=None, parity=None)
    with pytest.raises(ConfigError) as exc:
        parse_config(build.text({"modbus": {"buses": [bus]}}))
    assert message in str(exc.value)


def test_mcp_points_unit_only_on_numbers() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config("mcp: {devices: [{id: a, token: token-0123456789, points: [{name: lamp, type: bool, unit: V}]}]}")
    assert "`unit` and `state_class` are for number points" in str(exc.value)


def test_check_warns_about_a_device_class_home_assistant_does_not_document() -> None:
    loaded = parse_config(
        CONFIG.replace("device_class: temperature, state_class", "device_class: temprature, state_class").replace(
            "device_class: running", "device_class: temperature"
        ),
        filename="c.yaml",
    )
    where = "modbus.buses[0].devices[0].points[0].device_class"
    assert any(where in w and "'temprature'" in w and "did you mean 'temperature'" in w for w in loaded.warnings)
    assert any("mcp.devices[0].points[1].device_class" in w and "for a binary_sensor" in w for w in loaded.warnings)
    assert not [w for w in parse_config(CONFIG).warnings if "device_class" in w]


def test_check_refuses_two_points_with_one_discovery_id() -> None:
    text = CONFIG.replace(
        "- {name: m1, unit: 2, template: meter}",
        "- {name: plc_flags, unit: 3, points: [{name: alarm, table: coil, address: 0}]}",
    )
    with pytest.raises(ConfigError) as exc:
        parse_config(text)
    assert "has Home Assistant id 'gw1_plc_flags_alarm'" in str(exc.value)
    parse_config(text.replace("enabled: true", "enabled: false"))  # without discovery, no conflict


# --- removals: the state file -------------------------------------------------------------------


class RecordingOutbox:
    """Takes messages like an Outbox and settles their futures when told."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.futures: list[asyncio.Future[None]] = []

    def put(self, message: Message, *, awaited: bool = False) -> asyncio.Future[None] | None:
        self.messages.append(message)
        if not awaited:
            return None  # handed over without waiting: the caller ignores the future
        self.futures.append(asyncio.get_running_loop().create_future())
        return self.futures[-1]


def _outboxes(*boxes: RecordingOutbox) -> list[Outbox]:
    return cast(list[Outbox], list(boxes))


async def test_sync_removes_what_an_earlier_run_published_once_it_is_durable(tmp_path: Path) -> None:
    cfg = parse_config(CONFIG.replace("./state", str(tmp_path))).config
    state = tmp_path / "homeassistant.json"
    gone = "homeassistant/sensor/gw1_plc_old/config"
    state.write_text(json.dumps({"topics": [gone, "homeassistant/sensor/gw1_plc_temp/config"]}))
    discovery = Discovery(cfg)
    a, b = RecordingOutbox(), RecordingOutbox()
    done = discovery.sync(_outboxes(a, b))
    assert done is not None
    for box in (a, b):
        assert [(m.topic, m.payload, m.retain) for m in box.messages] == [("/" + gone, b"", True)]
    # Before the removal is safe, the file lists it (and already this run's topics).
    assert set(json.loads(state.read_text())["topics"]) == discovery.topics | {gone}
    for fut in a.futures + b.futures:
        fut.set_result(None)
    await done
    assert set(json.loads(state.read_text())["topics"]) == discovery.topics
    assert Discovery(cfg).sync(_outboxes(RecordingOutbox())) is None  # nothing left to remove


async def test_a_failed_removal_is_retried_at_the_next_start(tmp_path: Path) -> None:
    cfg = parse_config(CONFIG.replace("./state", str(tmp_path))).config
    gone = "homeassistant/switch/gw1_plc_old/config"
    (tmp_path / "homeassistant.json").write_text(json.dumps({"topics": [gone]}))
    box = RecordingOutbox()
    done = Discovery(cfg).sync(_outboxes(box))
    assert done is not None
    box.futures[0].set_exception(RuntimeError("spool full"))
    with pytest.raises(RuntimeError):
        await done
    again = RecordingOutbox()
    assert Discovery(cfg).sync(_outboxes(again)) is not None
    assert [m.topic for m in again.messages] == ["/" + gone]


async def test_switching_discovery_off_removes_everything_published(tmp_path: Path) -> None:
    on = parse_config(CONFIG.replace("./state", str(tmp_path))).config
    assert Discovery(on).sync(_outboxes(RecordingOutbox())) is None  # first run: only remembers
    off = on.model_copy(update={"homeassistant": on.homeassistant.model_copy(update={"enabled": False})})
    box = RecordingOutbox()
    done = Discovery(off).sync(_outboxes(box))
    assert done is not None
    assert {m.topic.removeprefix("/") for m in box.messages} == set(configs(on, P))
    for fut in box.futures:
        fut.set_result(None)
    await done
    assert json.loads((tmp_path / "homeassistant.json").read_text()) == {"topics": []}


@pytest.mark.parametrize(
    "content",
    [
        random.Random(11).randbytes(3000),  # an SD card's garbage
        b"",  # a write cut short
        b"[" * 100_000,  # deeper than any parser's recursion
        b'{"topics": 5}',
        b'{"topics": ["homeassistant/sensor/+/config"]}',  # a topic no one can publish to
        b'{"topics": ["homeassistant/sensor/\\ud800/config"]}',  # a lone surrogate
    ],
    ids=["random", "empty", "deep", "shape", "wildcard", "surrogate"],
)
async def test_a_state_file_that_cannot_be_read_is_moved_aside_and_started_afresh(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = parse_config(CONFIG.replace("./state", str(tmp_path))).config
    state = tmp_path / "homeassistant.json"
    state.write_bytes(content)
    before = corrupt_counts()["homeassistant"]
    discovery = Discovery(cfg)
    box = RecordingOutbox()
    assert discovery.sync(_outboxes(box)) is None  # nothing known to remove
    assert box.messages == []
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("homeassistant.json.corrupt-")]
    assert len(moved) == 1 and moved[0].read_bytes() == content
    assert corrupt_counts()["homeassistant"] == before + 1
    assert set(json.loads(state.read_text())["topics"]) == discovery.topics  # a fresh file, this run's topics
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("corrupt" in line and moved[0].name in line for line in errors), errors


def test_a_state_file_that_cannot_be_opened_is_left_alone(tmp_path: Path) -> None:
    cfg = parse_config(CONFIG.replace("./state", str(tmp_path))).config
    (tmp_path / "homeassistant.json").mkdir()  # not a file: the operator's to fix, not garbage to move
    assert Discovery(cfg).sync(_outboxes(RecordingOutbox())) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["homeassistant.json"]


def test_publish_gives_each_sink_its_own_prefix(tmp_path: Path) -> None:
    text = CONFIG.replace("./state", str(tmp_path)) + (
        "northbound: [{name: local}, {name: cloud, url: 'mqtt://example.com', topic_prefix: site/12}]\n"
    )
    discovery = Discovery(parse_config(text).config)
    local, cloud = RecordingOutbox(), RecordingOutbox()
    discovery.publish(cast(Outbox, local), "local")
    discovery.publish(cast(Outbox, cloud), "cloud")
    assert [m.topic for m in local.messages] == [m.topic for m in cloud.messages]
    assert all(b"fieldgate/gw1/" in m.payload for m in local.messages)
    assert all(b"site/12/" in m.payload and b"fieldgate/" not in m.payload for m in cloud.messages)


# --- end to end -----------------------------------------------------------------------------------

SPARE_TOPIC = "homeassistant/sensor/t1_plc_spare/config"
TOPICS = {
    "homeassistant/binary_sensor/t1_status/config",
    "homeassistant/sensor/t1_plc_temp/config",
    "homeassistant/number/t1_plc_sp/config",
    "homeassistant/switch/t1_plc_relay/config",
    "homeassistant/binary_sensor/t1_plc_flags_run/config",
    "homeassistant/binary_sensor/t1_plc_flags_alarm/config",
}


@asynccontextmanager
async def running(path: Path) -> AsyncIterator[Gateway]:
    """A gateway started from a config file, stopped at the end."""
    gw = Gateway(load_config(path))
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


def write(tmp_path: Path, port: int, upstream: str, *, spare: bool = True, enabled: bool = True) -> Path:
    """The end-to-end config, with or without the `spare` point."""
    points = [
        build.point("temp", "holding", 0, "int16", scale=0.1, unit="°C", device_class="temperature"),
        build.point("sp", "holding", 1, "uint16", scale=0.5, writable=True, min=0, max=100),
        build.point("relay", "coil", 0, writable=True),
        build.point("flags", "holding", 2, "bitfield", bits={0: "run", 5: "alarm"}),
    ]
    if spare:
        points.append(build.point("spare", "holding", 3))
    cfg = build.config(
        broker=build.broker(port, process="inline"),
        northbound=[build.sink("local"), build.sink("up", upstream, topic_prefix="site/t1")],
        homeassistant={"enabled": enabled},
        buses=[build.line("line", "./ttyA", build.device("plc", 1, poll="100ms", points=points))],
        simulator=build.simulator(modbus=[build.sim_line("./ttyA", build.sim_slave(1))]),
    )
    return build.write(cfg, tmp_path)


def newest(messages: list[Received]) -> dict[str, Received]:
    """The last message of each topic."""
    return {m.topic: m for m in messages}


#: A topic the gateway neither reads nor writes: the tests' own barrier.
MARKER = "homeassistant/test-marker"


async def marker(sub: Subscriber) -> None:
    """Publish a (not retained) marker from `sub` and wait for it: a broker handles a client's packets in order,
    so the retained messages its earlier SUBSCRIBE was given have all been delivered by then."""
    payload = f"marker-{time.monotonic_ns()}".encode()
    sub.publish(MARKER, payload)
    await sub.wait_for(lambda ms: any(m.topic == MARKER and m.payload == payload for m in ms))


async def retained_configs(port: int, expected: set[str]) -> dict[str, Received]:
    """The retained discovery configs a new subscriber gets, once every `expected` topic is among them."""
    deadline = time.monotonic() + 10
    while True:
        # A subscriber that came before the gateway published sees them live (retain 0): ask again.
        async with subscribed(port, "homeassistant/#") as sub:
            try:
                await sub.wait_for(lambda ms: expected <= {m.topic for m in ms if m.retain and m.payload}, 1)
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                continue
            await marker(sub)
            return {t: m for t, m in newest(sub.messages).items() if m.retain}


async def test_discovery_end_to_end_on_the_embedded_broker_and_upstream(tmp_path: Path, mosquitto: Mosquitto) -> None:
    port = free_port()
    async with running(write(tmp_path, port, mosquitto.url)) as gw:
        # Retained on both brokers: a Home Assistant that connects later still finds every entity.
        local = await retained_configs(port, TOPICS | {SPARE_TOPIC})
        up = await retained_configs(mosquitto.port, TOPICS | {SPARE_TOPIC})
        assert set(local) == set(up) == TOPICS | {SPARE_TOPIC}
        for configs_, prefix in ((local, "fieldgate/t1"), (up, "site/t1")):
            for topic, m in configs_.items():
                entity = validate(topic, m.payload)
                assert entity.availability is None or entity.availability[1].topic == f"{prefix}/plc/status"
            temp = json.loads(configs_["homeassistant/sensor/t1_plc_temp/config"].payload)
            assert temp["state_topic"] == f"{prefix}/plc/temp"

        # What Home Assistant would do: publish the number's value and the switch's payload_on on their
        # command topics; the gateway writes the points and answers on the set result topics.
        sim = next(iter(gw.simulation.simulators.values()))  # type: ignore[union-attr]
        number = json.loads(local["homeassistant/number/t1_plc_sp/config"].payload)
        switch = json.loads(local["homeassistant/switch/t1_plc_relay/config"].payload)
        async with subscribed(port, "fieldgate/#") as sub:
            await sub.wait_for(lambda ms: any(m.topic == number["availability"][1]["topic"] for m in ms))
            r = await sub.request(number["command_topic"], "42.5")
            assert r.json() == {"ok": True, "value": 42.5, "error": None}
            assert sim.get(1, "sp") == 42.5
            # The entity's state follows on the state topic it was given.
            await sub.wait_for(lambda ms: any(m.topic == number["state_topic"] and m.json() == 42.5 for m in ms))
            r = await sub.request(switch["command_topic"], switch["payload_on"])
            assert r.json()["ok"] is True and sim.get(1, "relay") is True
            await sub.wait_for(
                lambda ms: any(
                    m.topic == switch["state_topic"] and m.payload.decode() == switch["payload_on"] for m in ms
                )
            )
        # A command on the upstream broker (HA attached there) reaches the device the same way.
        up_number = json.loads(up["homeassistant/number/t1_plc_sp/config"].payload)
        async with subscribed(mosquitto.port, "site/#") as sub:
            r = await sub.request(up_number["command_topic"], "7")
            assert r.json()["ok"] is True and sim.get(1, "sp") == 7


async def test_a_point_gone_after_a_restart_has_its_config_removed(tmp_path: Path, mosquitto: Mosquitto) -> None:
    port = free_port()
    state = tmp_path / "state" / "homeassistant.json"
    async with running(write(tmp_path, port, mosquitto.url)):
        await retained_configs(mosquitto.port, TOPICS | {SPARE_TOPIC})
    assert set(json.loads(state.read_text())["topics"]) == TOPICS | {SPARE_TOPIC}

    # Restarted without `spare`: its config topic gets an empty retained payload, the others stay.
    async with subscribed(mosquitto.port, "homeassistant/#") as live:
        async with running(write(tmp_path, port, mosquitto.url, spare=False)) as gw:
            await live.wait_for(lambda ms: any(m.topic == SPARE_TOPIC and m.payload == b"" for m in ms))
            after = await retained_configs(mosquitto.port, TOPICS)
            assert set(after) == TOPICS  # the broker no longer holds the spare's config
            assert gw.discovery.removing is not None
            await asyncio.wait_for(gw.discovery.removing, 5)
    assert set(json.loads(state.read_text())["topics"]) == TOPICS
    # The first run's config (retained, as the live subscriber came), then the removal; nothing after.
    assert [(m.retain, m.payload == b"") for m in live.on(SPARE_TOPIC)] == [(True, False), (False, True)]

    # Discovery switched off: every entity it made goes away.
    async with subscribed(mosquitto.port, "homeassistant/#") as live:
        async with running(write(tmp_path, port, mosquitto.url, spare=False, enabled=False)) as gw:
            await live.wait_for(lambda ms: TOPICS <= {m.topic for m in ms if m.payload == b""})
            assert gw.discovery.removing is not None
            await asyncio.wait_for(gw.discovery.removing, 5)
            async with subscribed(mosquitto.port, "homeassistant/#", "site/t1/status") as sub:
                await sub.wait_for(lambda ms: any(m.topic == "site/t1/status" for m in ms))
                await marker(sub)
                assert not [m for m in sub.messages if m.topic.startswith("homeassistant/") and m.topic != MARKER]
    assert json.loads(state.read_text()) == {"topics": []}


# --- across a reload (SIGHUP) -----------------------------------------------------------------------


def reload_config(port: int, upstream: str, plc_point: Section, *others: Section) -> Section:
    """Discovery on, two sinks; on the line `plc` (temp and `plc_point`) and the `others` (simulated units 1-3)."""
    plc = build.device("plc", 1, poll="200ms", points=[build.point("temp", "holding", 0), plc_point])
    return build.config(
        broker=build.broker(port),
        northbound=[build.sink("local"), build.sink("up", upstream, topic_prefix="site/t1")],
        homeassistant={"enabled": True},
        buses=[build.line("line", "./ttyA", plc, *others)],
        simulator=build.simulator(modbus=[build.sim_line("./ttyA", *(build.sim_slave(u) for u in (1, 2, 3)))]),
    )


HEATER = build.device("heater", 2, poll="200ms", points=[build.point("power", "holding", 0)])
FAN = build.device("fan", 3, poll="200ms", points=[build.point("speed", "holding", 0)])
BEFORE = {
    "homeassistant/binary_sensor/t1_status/config",
    "homeassistant/sensor/t1_plc_temp/config",
    "homeassistant/sensor/t1_plc_spare/config",
    "homeassistant/sensor/t1_heater_power/config",
}
GONE = {"homeassistant/sensor/t1_plc_spare/config", "homeassistant/sensor/t1_heater_power/config"}
NEW = {"homeassistant/sensor/t1_plc_extra/config", "homeassistant/sensor/t1_fan_speed/config"}
AFTER = BEFORE - GONE | NEW


async def test_a_reload_publishes_the_configs_of_new_points_and_devices_and_clears_those_gone(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """README: "Home Assistant configs of points gone are removed at once" (on a reload), on every sink."""
    port = free_port()
    path = tmp_path / "config.yaml"
    spare = build.point("spare", "holding", 1)
    build.write(reload_config(port, mosquitto.url, spare, HEATER), path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    with GatewayProcess(["run", "-c", str(path)], tmp_path / "gateway.log", cwd=tmp_path, env=env) as gw:
        await gw.logged("fieldgate t1 up")
        assert set(await retained_configs(port, BEFORE)) == BEFORE
        assert set(await retained_configs(mosquitto.port, BEFORE)) == BEFORE

        async with subscribed(port, "homeassistant/#") as local, subscribed(mosquitto.port, "homeassistant/#") as up:
            extra = build.point("extra", "holding", 2)
            build.write(reload_config(port, mosquitto.url, extra, FAN), path)
            gw.proc.send_signal(signal.SIGHUP)
            await gw.logged("reload: +1 device (fan), -1 device (heater), ~1 device (plc), bus line restarted")
            # Live, on both brokers: the removed entities' configs cleared (empty, so HA deletes them), the new
            # ones published.
            for sub in (local, up):
                await sub.wait_for(lambda ms: GONE <= {m.topic for m in ms if m.payload == b""})
                await sub.wait_for(lambda ms: NEW <= {m.topic for m in ms if m.payload})
        # What a Home Assistant that connects now finds: exactly the new set, naming each sink's own topics.
        for broker_port, prefix in ((port, "fieldgate/t1"), (mosquitto.port, "site/t1")):
            now = await retained_configs(broker_port, AFTER)
            assert set(now) == AFTER, broker_port
            for topic, m in now.items():
                entity = validate(topic, m.payload)
                assert entity.availability is None or entity.availability[1].topic.startswith(f"{prefix}/")
            fan = now["homeassistant/sensor/t1_fan_speed/config"].payload
            assert json.loads(fan)["state_topic"] == f"{prefix}/fan/speed"
        # And the state file forgets the removed ones once both sinks hold the removals.
        state = tmp_path / "state" / "homeassistant.json"
        await until(lambda: set(json.loads(state.read_text())["topics"]) == AFTER, 10, "homeassistant.json updated")
        assert gw.stop() == 0, gw.output()
