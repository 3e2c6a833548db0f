"""YAML to plain data: a line per path, `${ENV}` substitution, secrets kept out of messages."""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cached_property
from typing import Any

import yaml

from .problems import Path, Problem, show

_TAG = "tag:yaml.org,2002:"
_RESOLVED = ("null", "bool", "int", "float")  # scalar kinds built as values; the rest is text
# Alias expansion can multiply a small file into a huge tree ("billion laughs"); no real
# gateway config comes anywhere near this many values.
_MAX_VALUES = 200_000
_ENV_REF = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_ENV_INNER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)
_SECRET_FIELDS = {"password", "token"}
_SHORT = 4  # substituted values shorter than this are redacted only inside quotes


class YamlSyntaxError(Exception):
    """The text is not YAML a config can be built from; one message at one line."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


def _kind(node: yaml.Node) -> str | None:
    """`int`, `str`, `map`, ... for a standard tag; None for any other tag."""
    return node.tag[len(_TAG) :] if node.tag.startswith(_TAG) else None


def _put_back(message: str, value: str, raw: str) -> str:
    """`message` with the substituted `value` shown as the `raw` text written in the file."""
    pattern = re.compile(rf"(?<![A-Za-z0-9]){re.escape(value)}(?![A-Za-z0-9])")
    if len(value) >= _SHORT:
        return pattern.sub(lambda _m: raw, message)
    # A value of a few characters ("1", "on") would garble ordinary words: it is replaced
    # only inside quoted values, which is where messages print values.
    return re.sub(r"'[^']*'", lambda q: pattern.sub(lambda _m: raw, q.group(0)), message)


class Source:
    """A config's YAML as plain data, with the line of each path and what `${}` substitution did."""

    def __init__(self, text: str, env: Mapping[str, str]) -> None:
        self.env = env
        self.lines: dict[Path, int] = {}
        self.problems: list[Problem] = []
        # path -> (the text as written, e.g. "${DB_PASS}", the text after substitution)
        self.substituted: dict[Path, tuple[str, str]] = {}
        self.env_values: dict[str, str] = {}  # variable name -> value taken from env
        # Paths already reported (unset variable, recursive alias): pydantic's view is noise there.
        self.unset: set[Path] = set()
        self._constructor = yaml.constructor.SafeConstructor()
        self._active: set[int] = set()  # nodes being built: an alias back into one is a loop
        self._seen: set[int] = set()
        self._quiet = 0
        self._count = 0
        self.data: Any = self._compose(text)

    # -- queries -----------------------------------------------------------------------------

    def line_of(self, path: Path) -> int:
        """The line of the deepest prefix of `path` that has one."""
        for n in range(len(path), -1, -1):
            if path[:n] in self.lines:
                return self.lines[path[:n]]
        return 1

    def has(self, path: Path) -> bool:
        """True if the key at `path` is written in the file."""
        return path in self.lines

    def is_unset(self, path: Path) -> bool:
        """True if `path` is at or under a value already reported (unset variable, loop)."""
        return any(path[: len(p)] == p for p in self.unset)

    def shown(self, path: Path, value: Any) -> str:
        """A value for a message: never a secret, never an expanded `${}`."""
        if path in self.substituted:
            return repr(self.substituted[path][0])
        if path and path[-1] in _SECRET_FIELDS and not isinstance(value, dict | list | None):
            return "(hidden)"  # a password written in the file still stays out of logs
        return show(value)

    def redact(self, message: str) -> str:
        """Put the `${...}` text back wherever a substituted value would show."""
        for value, raw in self._swaps:
            message = _put_back(message, value, raw)
        return message

    @cached_property
    def _swaps(self) -> list[tuple[str, str]]:
        """(substituted text, what to show instead), longest first."""
        swaps: list[tuple[str, str]] = []
        for raw, value in self.substituted.values():
            swaps += [(value, raw), (repr(value)[1:-1], raw)]
        swaps += [(value, f"${{{name}}}") for name, value in self.env_values.items()]
        return sorted((s for s in swaps if s[0]), key=lambda s: -len(s[0]))

    # -- building ----------------------------------------------------------------------------

    def _compose(self, text: str) -> Any:
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark else 1
            message = exc.problem or exc.context or "invalid YAML"
            if exc.problem and exc.context and exc.context_mark and exc.context_mark.line + 1 != line:
                # Where the unfinished thing began is often the line to fix (an unclosed quote).
                message += f" ({exc.context} started at line {exc.context_mark.line + 1})"
            raise YamlSyntaxError(line, message) from None
        except yaml.reader.ReaderError as exc:
            line = text[: exc.position].count("\n") + 1
            raise YamlSyntaxError(line, exc.reason) from None
        except yaml.YAMLError as exc:
            raise YamlSyntaxError(1, str(exc).splitlines()[0]) from None
        data = None if node is None else self._build(node, ())
        return {} if data is None else data

    def _build(self, node: yaml.Node, path: Path) -> Any:
        """Plain data for `node` at `path`."""
        self._count += 1
        if self._count > _MAX_VALUES:
            raise YamlSyntaxError(node.start_mark.line + 1, f"more than {_MAX_VALUES} values (alias expansion?)")
        self.lines.setdefault(path, node.start_mark.line + 1)
        # An alias repeats a node already built where its anchor is: problems inside it were
        # reported there, so the copy is built quietly.
        repeat = id(node) in self._seen
        self._seen.add(id(node))
        self._quiet += repeat
        try:
            if isinstance(node, yaml.ScalarNode):
                return self._scalar(node, path)
            return self._collection(node, path)
        finally:
            self._quiet -= repeat

    def _collection(self, node: yaml.Node, path: Path) -> Any:
        if id(node) in self._active:
            # Reported even inside a repeat: the loop only shows where the alias closes it.
            message = "recursive alias: a node cannot contain itself"
            self.problems.append(Problem(path, message, node.start_mark.line + 1))
            self.unset.add(path)
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                if node.tag != _TAG + "seq":
                    self._problem(path, f"unsupported YAML tag {node.tag!r}", node)
                return [self._build(item, path + (i,)) for i, item in enumerate(node.value)]
            assert isinstance(node, yaml.MappingNode)
            if node.tag != _TAG + "map":
                self._problem(path, f"unsupported YAML tag {node.tag!r}", node)
            return self._mapping(node, path)
        finally:
            self._active.discard(id(node))

    def _problem(self, path: Path, message: str, node: yaml.Node) -> None:
        if not self._quiet:
            self.problems.append(Problem(path, message, node.start_mark.line + 1))

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        first_line: dict[Any, int] = {}
        merges: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == _TAG + "merge":
                seq = isinstance(value_node, yaml.SequenceNode)
                merges.extend(value_node.value if seq else [value_node])
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self._problem(path, "mapping keys must be plain values, not collections", key_node)
                continue
            key = self._key(key_node)
            line = key_node.start_mark.line + 1
            if key in first_line:
                where = first_line[key]
                self._problem(path + (key,), f"duplicate key {str(key)!r} (first at line {where})", key_node)
            else:
                first_line[key] = line
            # The key's line identifies the entry; the value may start on a later line.
            self.lines[path + (key,)] = line
            out[key] = self._build(value_node, path + (key,))
        # `<<: *defaults`: explicit keys win, and earlier merged mappings win over later ones.
        for source in merges:
            if not isinstance(source, yaml.MappingNode):
                self._problem(path, "`<<` merges only mappings", source)
                continue
            self._quiet += 1  # the merged mapping was checked where its anchor is
            try:
                for key, value in self._mapping(self._without(source, out), path).items():
                    out.setdefault(key, value)
            finally:
                self._quiet -= 1
        return out

    def _without(self, source: yaml.MappingNode, taken: dict[Any, Any]) -> yaml.MappingNode:
        """`source` less the keys in `taken` (so they are not built, nor their lines recorded)."""
        entries = [
            (k, v)
            for k, v in source.value
            if not (isinstance(k, yaml.ScalarNode) and k.tag != _TAG + "merge" and self._key(k) in taken)
        ]
        return yaml.MappingNode(source.tag, entries, source.start_mark, source.end_mark)

    def _key(self, node: yaml.ScalarNode) -> Any:
        """A mapping key, resolved the way SafeLoader does (no `${}` substitution in keys)."""
        if _kind(node) in _RESOLVED:
            try:
                return self._constructor.construct_object(node, deep=True)
            except (ValueError, yaml.YAMLError):
                return node.value  # e.g. `0b_:` looks like a number but is not one: keep the text
        # Dates stay text: no config field is a date, and a str field must accept them.
        return node.value

    def _scalar(self, node: yaml.ScalarNode, path: Path) -> Any:
        kind = _kind(node)
        if kind in _RESOLVED:
            try:
                return self._constructor.construct_object(node, deep=True)
            except (ValueError, yaml.YAMLError):
                self._problem(path, f"{node.value!r} is not a valid {kind}", node)
                return node.value
        if kind not in ("str", "timestamp"):
            self._problem(path, f"unsupported YAML tag {node.tag!r}", node)
            return node.value
        return self._substitute(node.value, path, node) if "${" in node.value else node.value

    def _substitute(self, text: str, path: Path, node: yaml.Node) -> str:
        out: list[str] = []
        pos = 0
        changed = False
        for m in _ENV_REF.finditer(text):
            out.append(text[pos : m.start()])
            pos = m.end()
            token = m.group(0)
            if token == "$${":
                out.append("${")  # escaped: a literal `${`
                continue
            inner = _ENV_INNER.fullmatch(m.group(1) or "") if token.endswith("}") else None
            if inner is None:
                self._problem(
                    path,
                    f"bad variable reference {token!r}: use ${{NAME}} or ${{NAME:-default}}",
                    node,
                )
                self.unset.add(path)
                out.append(token)
                continue
            name, default = inner.group(1), inner.group(2)
            value = self.env.get(name)
            changed = True
            if value is not None and (value != "" or default is None):
                if value:
                    self.env_values[name] = value
                out.append(value)
            elif default is not None:
                out.append(default)
            else:
                self._problem(path, f"environment variable {name} is not set", node)
                self.unset.add(path)
                out.append(token)
        out.append(text[pos:])
        result = "".join(out)
        if changed:
            self.substituted[path] = (text, result)
        return result
