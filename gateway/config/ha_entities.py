"""Home Assistant's view of the configured points: which entity (component, kind, unit, range) each becomes.

Pure: no I/O, no MQTT. `fieldgate check` warns with it (device classes Home Assistant does not document, two
points with one discovery id) and gateway/homeassistant.py publishes discovery configs from it. It lives with the
config because it reads nothing but the validated config (and each point's codec, from the converter).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import TYPE_CHECKING

from gateway.config.settings import point_codec

if TYPE_CHECKING:
    from gateway.config.schema import Config, McpPointConfig, PointConfig

#: https://www.home-assistant.io/integrations/number.mqtt/ (`step`: smallest value 0.001)
MIN_STEP = 0.001

# Device classes as Home Assistant documents them per component; `fieldgate check` warns about others
# (HA rejects a discovery config whose device class it does not know), it does not refuse them, since
# Home Assistant adds classes between releases.
#: https://www.home-assistant.io/integrations/number/#device-class
NUMBER_DEVICE_CLASSES = frozenset(
    "apparent_power aqi area atmospheric_pressure battery blood_glucose_concentration carbon_dioxide "
    "carbon_monoxide current data_rate data_size distance duration energy energy_distance energy_storage "
    "frequency gas humidity illuminance irradiance moisture monetary nitrogen_dioxide nitrogen_monoxide "
    "nitrous_oxide ozone ph pm1 pm25 pm10 power_factor power precipitation precipitation_intensity pressure "
    "reactive_power signal_strength sound_pressure speed sulphur_dioxide temperature volatile_organic_compounds "
    "volatile_organic_compounds_parts voltage volume volume_flow_rate volume_storage water weight "
    "wind_direction wind_speed".split()
)
#: https://www.home-assistant.io/integrations/sensor/#device-class: the numeric ones (as for numbers);
#: `date` and `timestamp` take text; `enum` needs `options`, which a point does not declare.
SENSOR_DEVICE_CLASSES = NUMBER_DEVICE_CLASSES
TEXT_SENSOR_DEVICE_CLASSES = frozenset({"date", "timestamp"})
#: https://www.home-assistant.io/integrations/binary_sensor/#device-class
BINARY_SENSOR_DEVICE_CLASSES = frozenset(
    "battery battery_charging carbon_monoxide cold connectivity door garage_door gas heat light lock "
    "moisture motion moving occupancy opening plug power presence problem running safety smoke sound "
    "tamper update vibration window".split()
)
#: https://www.home-assistant.io/integrations/switch/#device-class
SWITCH_DEVICE_CLASSES = frozenset({"outlet", "switch"})


_FLOAT_MAX = {"float32": 3.4028234663852886e38, "float64": sys.float_info.max}


@dataclasses.dataclass(frozen=True, slots=True)
class Entity:
    """One Home Assistant entity: a point of a device, or a named bit of a bitfield point."""

    component: str  # sensor, binary_sensor, number, switch, text
    device: str
    point: str  # the name below the device's topic: "temperature", "flags.alarm"
    kind: str  # number, bool, string: what the point's topic carries
    model: str  # what the device is, for HA's device registry
    unit: str | None = None
    device_class: str | None = None
    state_class: str | None = None
    icon: str | None = None
    minimum: float | None = None  # number: write range in engineering units; text: length
    maximum: float | None = None
    step: float | None = None


def object_id(gateway: str, device: str, point: str) -> str:
    """`<gateway>_<device>_<point>` in the characters a discovery topic allows (a `.` becomes `_`)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{gateway}_{device}_{point}")


def component(kind: str, writable: bool) -> str:
    """The Home Assistant component that shows a point of this kind."""
    if kind == "bool":
        return "switch" if writable else "binary_sensor"
    if kind == "string":
        return "text" if writable else "sensor"
    return "number" if writable else "sensor"


def point_kind(point: PointConfig) -> str:
    """What a Modbus point's topic carries: number, bool or string (a bitfield: bools, one per bit)."""
    t = point_codec(point).type
    return "bool" if t in ("bool", "bitfield") else "string" if t == "string" else "number"


def known_device_classes(component_name: str, kind: str) -> frozenset[str]:
    """The device classes Home Assistant documents for a component showing values of this kind."""
    if component_name == "sensor":
        return TEXT_SENSOR_DEVICE_CLASSES if kind == "string" else SENSOR_DEVICE_CLASSES
    return {
        "binary_sensor": BINARY_SENSOR_DEVICE_CLASSES,
        "switch": SWITCH_DEVICE_CLASSES,
        "number": NUMBER_DEVICE_CLASSES,
    }.get(component_name, frozenset())


def _write_range(point: PointConfig) -> tuple[float, float, float]:
    """(min, max, step) of a writable numeric point: its `min`/`max`, else what its type can hold."""
    codec = point_codec(point)
    if codec.type in _FLOAT_MAX:
        lo, hi, step = -_FLOAT_MAX[codec.type], _FLOAT_MAX[codec.type], MIN_STEP
    else:
        bits = int(codec.type.removeprefix("u").removeprefix("int"))
        raw = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if not codec.type.startswith("u") else (0, 2**bits - 1)
        ends = sorted(r * codec.scale + codec.offset for r in raw)
        lo, hi = ends[0], ends[1]
        # An unscaled integer moves in whole steps; a scaled one in steps of its scale.
        step = max(abs(codec.scale), MIN_STEP)
        if codec.scale == 1 and codec.offset == 0:
            lo, hi = int(lo), int(hi)
    return (
        lo if point.min is None else point.min,
        hi if point.max is None else point.max,
        step,
    )


def _modbus_entities(cfg: Config) -> list[Entity]:
    out = []
    for bus in cfg.modbus.buses:
        for dev in bus.devices:
            model = f"Modbus RTU unit {dev.unit} on bus {bus.name}"
            for p in dev.points:
                codec = point_codec(p)
                if codec.type == "bitfield":
                    for _, bit in codec.bits:
                        name = f"{p.name}.{bit}"
                        out.append(
                            Entity("binary_sensor", dev.name, name, "bool", model, None, p.device_class, icon=p.icon)
                        )
                    continue
                kind = point_kind(p)
                comp = component(kind, p.writable)
                unit = p.unit if kind == "number" else None  # HA takes a sensor with a unit as numeric
                e = Entity(comp, dev.name, p.name, kind, model, unit, p.device_class, p.state_class, p.icon)
                if comp == "number":
                    lo, hi, step = _write_range(p)
                    e = dataclasses.replace(e, minimum=lo, maximum=hi, step=step)
                elif comp == "text":
                    # Within text.mqtt's `max` limit of 255: a point is at most 125 registers.
                    e = dataclasses.replace(e, minimum=0, maximum=codec.length)
                out.append(e)
    return out


def _mcp_entity(device: str, p: McpPointConfig) -> Entity:
    # MCP devices take commands, not writes: their points are always read-only.
    return Entity(
        component(p.type, False),
        device,
        p.name,
        p.type,
        "MCP/1 device",
        unit=p.unit,
        device_class=p.device_class,
        state_class=p.state_class,
        icon=p.icon,
    )


def entities(cfg: Config) -> list[Entity]:
    """Every entity the config describes: Modbus points (a bitfield's named bits) and declared MCP points."""
    out = _modbus_entities(cfg)
    if cfg.mcp:
        out += [_mcp_entity(d.id, p) for d in cfg.mcp.devices for p in d.points]
    return out
