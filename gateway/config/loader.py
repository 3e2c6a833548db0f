"""Find, read and validate a config file, reporting every problem as `FILE:LINE: path: message`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from gateway.errors import ConfigError

from .checks import check
from .messages import explain, locate
from .problems import Problem, format_path
from .prune import Pruned, revalidate
from .schema import Config
from .yamlsrc import Source, YamlSyntaxError

__all__ = ["Loaded", "find_config", "load_config", "parse_config"]

DEFAULT_LOCATIONS = ("./config.yaml", "/etc/fieldgate/config.yaml")


@dataclass(frozen=True)
class Loaded:
    """A validated configuration, where it came from, and the warnings found on the way."""

    config: Config
    path: str
    warnings: list[str] = field(default_factory=list)


def find_config(explicit: str | None) -> str:
    """The config file to use: `explicit`, else ./config.yaml, else /etc/fieldgate/config.yaml."""
    if explicit:
        if not os.path.isfile(explicit):
            raise ConfigError([f"{explicit}: no such config file"])
        return explicit
    for candidate in DEFAULT_LOCATIONS:
        if os.path.isfile(candidate):
            return candidate
    raise ConfigError([f"no config file: tried {', '.join(DEFAULT_LOCATIONS)} (use -c FILE)"])


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Loaded:
    """Read and validate a config file; ConfigError lists every problem found."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ConfigError([f"{name}: cannot read config: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError([f"{name}:{line}: yaml: not UTF-8 text ({exc.reason})"]) from None
    loaded = parse_config(text, filename=name, env=env)
    # A relative state dir belongs to the config file, as relative serial paths do, not to the cwd.
    state = Path(loaded.config.gateway.state_dir)
    if not state.is_absolute():
        loaded.config.gateway.state_dir = str(Path(name).resolve().parent / state)
    return loaded


def parse_config(text: str, filename: str = "<config>", env: Mapping[str, str] | None = None) -> Loaded:
    """Validate config text (as if read from `filename`); ConfigError lists every problem found."""
    try:
        source = Source(text, os.environ if env is None else env)
    except YamlSyntaxError as exc:
        raise ConfigError([f"{filename}:{exc.line}: yaml: {exc.message}"]) from None
    errors = list(source.problems)
    warnings: list[Problem] = []
    config: Config | None
    try:
        config, pruned = Config.model_validate(source.data), Pruned(source.data)
    except ValidationError as exc:
        located = [locate(e, source.data) for e in exc.errors()]
        # Under an unset variable the problem is already reported at its line.
        errors += [p for p in explain(located, source.shown) if not source.is_unset(p.path)]
        # Without the invalid parts the rest still gets its cross-checks.
        config, pruned = revalidate(source.data, located)
    if config is not None:
        more, warnings = check(config, source, pruned)
        errors += more
    if errors:
        raise ConfigError(_render(errors, filename, source))
    assert config is not None
    return Loaded(config=config, path=filename, warnings=_render(warnings, filename, source))


def _render(problems: list[Problem], filename: str, source: Source) -> list[str]:
    """`FILE:LINE: path: message` lines sorted by line, then in the order found, without repeats."""
    rows: list[tuple[int, int, str]] = []
    for n, p in enumerate(problems):
        line = p.line if p.line is not None else source.line_of(p.path)
        text = f"{filename}:{line}: {format_path(p.path)}: {source.redact(p.message)}"
        rows.append((line, n, text))
    return list(dict.fromkeys(text for _, _, text in sorted(rows)))
