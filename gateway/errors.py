"""The one error taxonomy of Fieldgate; drivers and sinks convert library errors to these."""

from __future__ import annotations


class FieldgateError(Exception):
    """Base of every error Fieldgate raises on purpose."""


class ConfigError(FieldgateError):
    """A configuration is invalid; `errors` holds every problem found."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


class CodecError(FieldgateError, ValueError):
    """A value cannot be encoded to (or decoded from) a point's register layout."""


class WriteRejected(FieldgateError):
    """A write or command was refused before it reached the field (read-only, unknown, out of range)."""


class DeviceError(FieldgateError):
    """A field device did not give a usable answer."""


class DeviceTimeout(DeviceError):
    """No valid response within the response timeout (after retries); garbled answers are its subclass CrcError."""


class CrcError(DeviceTimeout):
    """Bytes came back but never formed a frame with a valid CRC: noise on the line (retried like a timeout)."""


class DeviceException(DeviceError):
    """The device answered with a Modbus exception response."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class BusUnavailable(DeviceError):
    """The serial line (or serial device server) cannot be opened or was lost."""


class PortBusy(BusUnavailable):
    """Another process holds the serial port: opening it too would interleave two masters' frames on the line."""


class ProtocolError(DeviceError):
    """The device answered something that does not fit the request."""


class SinkError(FieldgateError):
    """A northbound sink could not accept a message."""


class SinkOffline(SinkError):
    """The sink's connection went down before the broker acknowledged the message: it may be sent again."""
