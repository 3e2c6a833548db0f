"""Fieldgate configuration: the typed schema and its loader."""

from __future__ import annotations

from .loader import Loaded, find_config, load_config, parse_config
from .schema import Config

__all__ = ["Config", "Loaded", "find_config", "load_config", "parse_config"]
