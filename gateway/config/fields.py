"""The checked string forms of config values: topic-safe names, topic prefixes and filters, listeners, HA hints."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator

from gateway.types import TOPIC_NAME


def _topic_safe(value: str) -> str:
    if not TOPIC_NAME.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a topic-safe name: 1-64 of A-Z a-z 0-9 _ . - "
            "(no '/', '+', '#', spaces, and not starting with '$', '.' or '-')"
        )
    return value


def _topic_prefix(value: str) -> str:
    if value.strip("/").startswith("$") or any(c in value for c in "+#\0") or not value.strip("/"):
        raise ValueError(f"{value!r} cannot be a topic prefix (no '$' start, no '+' or '#')")
    return value.strip("/")


Name = Annotated[str, AfterValidator(_topic_safe)]
TopicPrefix = Annotated[str, AfterValidator(_topic_prefix)]


def _ha_class(value: str) -> str:
    # Only the form is checked here: Home Assistant adds device classes between releases, so
    # `fieldgate check` warns about an unknown one instead of refusing it (config/checks.py).
    if not re.match(r"^[a-z][a-z0-9_]{0,63}$", value):
        raise ValueError(f"{value!r} is not a Home Assistant device class (lower case, e.g. temperature, door)")
    return value


def _ha_icon(value: str) -> str:
    if not re.match(r"^[a-z0-9_-]+:[a-z0-9-]+$", value):
        raise ValueError(f"{value!r} is not an icon: use SET:NAME, e.g. mdi:thermometer")
    return value


#: Home Assistant discovery hints of a point (used only with `homeassistant.enabled`).
HaDeviceClass = Annotated[str, AfterValidator(_ha_class)]
HaIcon = Annotated[str, AfterValidator(_ha_icon)]
#: https://developers.home-assistant.io/docs/core/entity/sensor#available-state-classes
HaStateClass = Literal["measurement", "total", "total_increasing"]


_LISTENER = re.compile(r"^(tcp|mqtt|ws|mqtts|wss)://([^:/]*|\[[0-9a-fA-F:]+\]):(\d{1,5})/?$")


def _listener(value: str) -> str:
    m = _LISTENER.match(value)
    if not m or not 0 < int(m.group(3)) < 65536:
        raise ValueError(f"{value!r} is not a listener: use tcp://HOST:PORT, ws://HOST:PORT, mqtts://HOST:PORT")
    return value


def _topic_filter(value: str) -> str:
    levels = value.split("/")
    last = len(levels) - 1
    bad = any(("#" in x and (x != "#" or i != last)) or ("+" in x and x != "+") for i, x in enumerate(levels))
    if not value or bad or "\0" in value:
        raise ValueError(f"{value!r} is not an MQTT topic filter ('+' is a whole level, '#' only the whole last one)")
    return value


TopicFilter = Annotated[str, AfterValidator(_topic_filter)]
Listener = Annotated[str, AfterValidator(_listener)]
