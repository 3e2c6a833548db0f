"""What every cross-check of the config shares: the typed config, where each key was written, and the findings."""

from __future__ import annotations

from typing import Any

from .problems import Path, Problem
from .prune import Pruned
from .schema import Config
from .yamlsrc import Source


class CheckBase:
    """The config under check and the helpers each check reports with; the checks are its subclasses' methods."""

    def __init__(self, config: Config, source: Source, pruned: Pruned) -> None:
        self.config = config
        self.source = source
        self.pruned = pruned
        self.errors: list[Problem] = []
        self.warnings: list[Problem] = []
        self.device_names: dict[Any, Path] = {}  # Modbus device name -> where it is declared

    # Paths below are in the validated (possibly pruned) data; problems are kept as written.

    def _error(self, path: Path, message: str) -> None:
        self.errors.append(Problem(self.pruned.original(path), message))

    def _warn(self, path: Path, message: str) -> None:
        self.warnings.append(Problem(self.pruned.original(path), message))

    def _line(self, path: Path) -> int:
        return self.source.line_of(self.pruned.original(path))

    def _key_or(self, path: Path, key: str) -> Path:
        """`path.key` if that key is written in the file, else `path` (for the best line)."""
        return path + (key,) if self.source.has(self.pruned.original(path + (key,))) else path

    def _first(self, seen: dict[Any, Path], value: Any, path: Path, message: str) -> None:
        """Report `path` if `value` was seen before; otherwise remember it."""
        if value in seen:
            self._error(path, f"{message} (first at line {self._line(seen[value])})")
        else:
            seen[value] = path
