"""Fieldgate: the process that joins field drivers to northbound sinks."""

__version__ = "0.2.0"
