"""Load config.yaml into typed objects, reporting every problem as `FILE:LINE: path: message`."""

from __future__ import annotations

import copy
import difflib
import ipaddress
import os
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from gateway.errors import ConfigError

from .schema import BIT_TABLES, Config, DeviceConfig, PointConfig

__all__ = ["Loaded", "find_config", "load_config", "parse_config"]

DEFAULT_LOCATIONS = ("./config.yaml", "/etc/fieldgate/config.yaml")

Key = Any  # a mapping key (str, int, ...) or a sequence index
Path = tuple[Key, ...]

_TAG = "tag:yaml.org,2002:"
# Alias expansion can multiply a small file into a huge tree ("billion laughs"); no real
# gateway config comes anywhere near this many values.
_MAX_VALUES = 200_000
_PRUNE_ROUNDS = 25


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
    return parse_config(text, filename=name, env=env)


def parse_config(
    text: str, filename: str = "<config>", env: Mapping[str, str] | None = None
) -> Loaded:
    """Validate config text (as if read from `filename`); ConfigError lists every problem found."""
    return _Loader(filename, os.environ if env is None else env).run(text)


# --- problems ------------------------------------------------------------------------------------


@dataclass
class _Problem:
    path: Path  # in the coordinates of the data as written (before any pruning)
    message: str
    line: int | None = None  # when known better than from the path (YAML errors)


def _format_path(path: Path) -> str:
    out = ""
    for key in path:
        if isinstance(key, int) and not isinstance(key, bool):
            out += f"[{key}]"
        elif isinstance(key, str) and re.fullmatch(r"[A-Za-z0-9_-]+", key):
            out += f".{key}" if out else key
        else:
            out += f"[{str(key)!r}]"
    return out or "(top level)"


def _show(value: Any) -> str:
    """A short rendering of a config value for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 40 else text[:36] + "...'"


def _hint(word: str, choices: list[str]) -> str:
    """A ' (did you mean ...?)' suffix, or ''."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.7)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --- YAML with line numbers ----------------------------------------------------------------------


class _YamlSyntaxError(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


_ENV_REF = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_ENV_INNER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)


class _Builder:
    """Turns a composed YAML node tree into plain data, recording a line for every path."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.lines: dict[Path, int] = {}
        self.problems: list[_Problem] = []
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

    def build(self, node: yaml.Node, path: Path) -> Any:
        """Plain data for `node` at `path`."""
        self._count += 1
        if self._count > _MAX_VALUES:
            raise _YamlSyntaxError(
                node.start_mark.line + 1, f"more than {_MAX_VALUES} values (alias expansion?)"
            )
        self.lines.setdefault(path, node.start_mark.line + 1)
        # An alias repeats a node already built where its anchor is: problems inside it were
        # reported there, so the copy is built quietly.
        repeat = id(node) in self._seen
        self._seen.add(id(node))
        self._quiet += repeat
        try:
            return self._build(node, path)
        finally:
            self._quiet -= repeat

    def _build(self, node: yaml.Node, path: Path) -> Any:
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, path)
        if id(node) in self._active:
            # Reported even inside a repeat: the loop only shows where the alias closes it.
            message = "recursive alias: a node cannot contain itself"
            self.problems.append(_Problem(path, message, node.start_mark.line + 1))
            self.unset.add(path)
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                if node.tag != _TAG + "seq":
                    self._problem(path, f"unsupported YAML tag {node.tag!r}", node)
                return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
            assert isinstance(node, yaml.MappingNode)
            if node.tag != _TAG + "map":
                self._problem(path, f"unsupported YAML tag {node.tag!r}", node)
            return self._mapping(node, path)
        finally:
            self._active.discard(id(node))

    def _problem(self, path: Path, message: str, node: yaml.Node) -> None:
        if not self._quiet:
            self.problems.append(_Problem(path, message, node.start_mark.line + 1))

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
            key = self._plain_scalar(key_node)
            line = key_node.start_mark.line + 1
            if key in first_line:
                where = first_line[key]
                self._problem(
                    path + (key,), f"duplicate key {str(key)!r} (first at line {where})", key_node
                )
            else:
                first_line[key] = line
            # The key's line identifies the entry; the value may start on a later line.
            self.lines[path + (key,)] = line
            out[key] = self.build(value_node, path + (key,))
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
            if not (
                isinstance(k, yaml.ScalarNode)
                and k.tag != _TAG + "merge"
                and self._plain_scalar(k) in taken
            )
        ]
        return yaml.MappingNode(source.tag, entries, source.start_mark, source.end_mark)

    def _plain_scalar(self, node: yaml.ScalarNode) -> Any:
        """Resolve a scalar the way SafeLoader does, without `${}` substitution (keys)."""
        kind = node.tag[len(_TAG) :] if node.tag.startswith(_TAG) else None
        if kind in ("null", "bool", "int", "float"):
            return self._constructor.construct_object(node, deep=True)
        # Dates stay text: no config field is a date, and a str field must accept them.
        return node.value

    def _scalar(self, node: yaml.ScalarNode, path: Path) -> Any:
        kind = node.tag[len(_TAG) :] if node.tag.startswith(_TAG) else None
        if kind in ("null", "bool", "int", "float"):
            try:
                return self._constructor.construct_object(node, deep=True)
            except (ValueError, yaml.YAMLError):
                self._problem(path, f"{node.value!r} is not a valid {kind}", node)
                return node.value
        if kind not in ("str", "timestamp"):
            self._problem(path, f"unsupported YAML tag {node.tag!r}", node)
            return node.value
        text = node.value
        if "${" in text:
            text = self._substitute(text, path, node)
        return text

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


# --- schema walking ------------------------------------------------------------------------------


def _strip(tp: Any) -> Any:
    """Drop Annotated[...] wrappers."""
    while hasattr(tp, "__metadata__"):
        tp = get_args(tp)[0]
    return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _descend(tp: Any, key: Key) -> Any:
    """The declared type one step below `tp` at `key`, or None."""
    tp = _strip(tp)
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            if arg is not type(None):
                found = _descend(arg, key)
                if found is not None:
                    return found
        return None
    if _is_model(tp):
        info = tp.model_fields.get(key) if isinstance(key, str) else None
        return info.annotation if info else None
    if origin is list and isinstance(key, int):
        return get_args(tp)[0]
    if origin is dict:
        return get_args(tp)[1]
    return None


def _type_at(path: Path) -> Any:
    tp: Any = Config
    for key in path:
        tp = _descend(tp, key)
        if tp is None:
            return None
    return _strip(tp)


def _model_at(path: Path) -> type[BaseModel] | None:
    """The model class whose fields live at `path` (unwrapping `X | None`)."""
    tp = _type_at(path)
    if get_origin(tp) in (Union, types.UnionType):
        tp = next((a for a in map(_strip, get_args(tp)) if _is_model(a)), None)
    return tp if _is_model(tp) else None


def _literal_values(path: Path) -> list[Any] | None:
    tp = _type_at(path)
    return list(get_args(tp)) if get_origin(tp) is Literal else None


# --- pydantic errors to problems -----------------------------------------------------------------

_MISSING = object()
_TYPE_MISMATCH = {
    "dict_type",
    "list_type",
    "model_type",
    "model_attributes_type",
    "float_type",
    "float_parsing",
    "int_type",
    "int_parsing",
    "bool_type",
    "bool_parsing",
    "string_type",
    "literal_error",
}
_SECRET_FIELDS = {"password", "token"}
_SHORT = 4  # substituted values shorter than this are redacted only inside quotes


@dataclass
class _Located:
    """A pydantic error mapped onto the data: its real path, and where a union branched."""

    error: Mapping[str, Any]
    path: Path
    union_at: int | None
    is_key: bool
    value: Any


def _locate(error: Mapping[str, Any], data: Any) -> _Located:
    """Map a pydantic `loc` onto data keys, skipping union-branch tags such as 'list[int]'."""
    loc = error["loc"]
    path: list[Key] = []
    cur: Any = data
    union_at: int | None = None
    is_key = False
    for i, el in enumerate(loc):
        nxt = loc[i + 1] if i + 1 < len(loc) else None
        if el == "[key]":
            is_key = True
            continue
        if cur is _MISSING:
            path.append(el)
            continue
        if isinstance(cur, dict):
            key = el if el in cur else next((k for k in cur if str(k) == str(el)), _MISSING)
            if key is not _MISSING:
                path.append(key)
                cur = cur[key]
                continue
            model = _model_at(tuple(path))
            named = model is not None and el in model.model_fields
            if nxt == "[key]" or (nxt is None and (named or error["type"] == "extra_forbidden")):
                path.append(el)  # a missing or unknown key
                cur = _MISSING
                continue
        elif isinstance(cur, list) and isinstance(el, int) and 0 <= el < len(cur):
            path.append(el)
            cur = cur[el]
            continue
        if union_at is None:
            union_at = len(path)
    return _Located(error, tuple(path), union_at, is_key, None if cur is _MISSING else cur)


def _branch_kind(tag: Any) -> str | None:
    tag = str(tag)
    for prefix, kind in (
        ("dict[", "a mapping"),
        ("list[", "a list"),
        ("float", "a number"),
        ("int", "an integer"),
        ("bool", "true/false"),
        ("str", "a string"),
        ("function-after[", "a string"),
        ("literal[", "one of the allowed values"),
    ):
        if tag.startswith(prefix):
            return kind
    return None


_BOUNDS = {
    "less_than_equal": ("at most", "le"),
    "less_than": ("less than", "lt"),
    "greater_than_equal": ("at least", "ge"),
    "greater_than": ("more than", "gt"),
}


class _Messages:
    """Turns pydantic errors into short, specific messages."""

    def __init__(self, shown: Callable[[Path, Any], str]) -> None:
        self.shown = shown

    def of(self, item: _Located) -> str:
        err = item.error
        kind = err["type"]
        ctx = err.get("ctx") or {}
        if item.is_key:
            shown = _show(item.path[-1])
        else:
            shown = self.shown(
                item.path, item.value if item.value is not None else err.get("input")
            )
        # About a mapping key, the key is named up front; elsewhere the value is quoted at the end.
        got = "" if item.is_key else f", got {shown}"
        msg: str
        if kind == "missing":
            msg = "is required but missing"
        elif kind == "extra_forbidden":
            msg = self._unknown_key(item.path)
        elif kind == "literal_error":
            allowed = _literal_values(item.path)
            listed = ", ".join(map(repr, allowed)) if allowed else ctx.get("expected", "")
            msg = f"must be one of {listed}{got}"
        elif kind in ("value_error", "assertion_error"):
            msg = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
        elif kind in _BOUNDS:
            words, name = _BOUNDS[kind]
            msg = f"must be {words} {ctx.get(name)}{got}"
        elif kind in ("int_type", "int_parsing", "int_from_float"):
            msg = f"expected an integer{got}"
        elif kind in ("float_type", "float_parsing", "finite_number"):
            msg = f"expected a number{got}"
        elif kind in ("bool_type", "bool_parsing"):
            msg = f"expected true or false{got}"
        elif kind == "string_type":
            quote = " (put it in quotes)" if isinstance(err.get("input"), int | float) else ""
            msg = f"expected a string{got}{quote}"
        elif kind in ("dict_type", "model_type", "model_attributes_type"):
            if err.get("input") is None:
                msg = "is empty: expected a mapping of keys (fill it in or remove it)"
            else:
                msg = f"expected a mapping (key: value){got}"
        elif kind == "list_type":
            msg = f"expected a list{got}"
        elif kind == "string_too_short":
            n = ctx.get("min_length", 1)
            msg = "must not be empty" if n == 1 else f"must be at least {n} characters"
        elif kind == "string_too_long":
            msg = f"must be at most {ctx.get('max_length')} characters"
        elif kind == "too_short":
            msg = f"needs at least {ctx.get('min_length')} item(s)"
        elif kind == "too_long":
            msg = f"may have at most {ctx.get('max_length')} item(s)"
        else:
            msg = str(err["msg"]).replace("Input should be", "must be")
        if item.is_key and kind != "value_error":
            return f"key {shown}: {msg}"
        return msg

    def _unknown_key(self, path: Path) -> str:
        key = path[-1]
        model = _model_at(path[:-1])
        known = list(model.model_fields) if model else []
        hint = _hint(str(key), known)
        if not hint and known:
            hint = f" (expected one of: {', '.join(known)})"
        return f"unknown key {str(key)!r}{hint}"

    def union(self, items: list[_Located]) -> str:
        """One message for a value that matched none of a union's alternatives."""
        first = items[0]
        kinds: list[str] = []
        for item in items:
            tag = item.error["loc"][_tag_index(item)] if _tag_index(item) is not None else None
            kind = _branch_kind(tag) if tag is not None else None
            if kind and kind not in kinds:
                kinds.append(kind)
        if len(kinds) < 2:
            return self.of(first)
        expected = ", ".join(kinds[:-1]) + " or " + kinds[-1]
        return f"expected {expected}, got {self.shown(first.path, first.value)}"


def _tag_index(item: _Located) -> int | None:
    """Index in `loc` of the first union-branch tag."""
    if item.union_at is None:
        return None
    real = 0
    for i, el in enumerate(item.error["loc"]):
        if el == "[key]":
            continue
        if real == item.union_at:
            return i
        real += 1
    return None


def _group_unions(items: list[_Located]) -> list[list[_Located]]:
    """Group the branch errors of each union value; keep branches that got past the type check."""
    groups: list[list[_Located]] = []
    by_union: dict[Path, list[_Located]] = {}
    for item in items:
        if item.union_at is None:
            groups.append([item])
            continue
        where = item.path[: item.union_at]
        if where not in by_union:
            by_union[where] = []
            groups.append(by_union[where])
        by_union[where].append(item)
    out: list[list[_Located]] = []
    for group in groups:
        if len(group) == 1 or group[0].union_at is None:
            out.append(group)
            continue
        where = group[0].path[: group[0].union_at]
        # A branch whose type fit the value failed deeper: its errors are the specific ones.
        specific = [g for g in group if not (g.error["type"] in _TYPE_MISMATCH and g.path == where)]
        if specific:
            out.extend([g] for g in specific)
        else:
            out.append(group)
    return out


# --- pruning: a partly valid config is still checked for cross-reference mistakes ----------------


class _Pruned:
    """A copy of the data with invalid parts removed, remembering the original list indices."""

    def __init__(self, data: Any) -> None:
        self.data = copy.deepcopy(data)
        self.origin: dict[int, list[int]] = {}  # id(list) -> original index of each element
        self.removed: list[Path] = []  # original paths of everything removed

    def original(self, path: Path) -> Path:
        """Translate a path in the pruned data to the path as written."""
        out: list[Key] = []
        cur = self.data
        for key in path:
            if isinstance(cur, list) and isinstance(key, int) and 0 <= key < len(cur):
                index = self.origin.get(id(cur))
                out.append(index[key] if index else key)
                cur = cur[key]
            elif isinstance(cur, dict) and key in cur:
                out.append(key)
                cur = cur[key]
            else:
                out.append(key)
                cur = None
        return tuple(out)

    def remove_for(self, items: list[_Located]) -> bool:
        """Remove the smallest removable part around each error; False if nothing could go."""
        doomed: list[tuple[Any, Key, Path]] = []
        for item in items:
            target = self._target(item.path)
            if target is None:
                return False
            container, key = self._container(target)
            if not any(c is container and k == key for c, k, _ in doomed):
                doomed.append((container, key, self.original(target)))
        for container, key, orig in doomed:
            self.removed.append(orig)
            if isinstance(container, dict):
                container.pop(key, None)
        lists: dict[int, tuple[list[Any], set[int]]] = {}
        for container, key, _ in doomed:
            if isinstance(container, list):
                lists.setdefault(id(container), (container, set()))[1].add(key)
        for container, drop in lists.values():
            index = self.origin.get(id(container), list(range(len(container))))
            keep = [i for i in range(len(container)) if i not in drop]
            self.origin[id(container)] = [index[i] for i in keep]
            container[:] = [container[i] for i in keep]
        return bool(doomed)

    def _container(self, path: Path) -> tuple[Any, Key]:
        cur = self.data
        for key in path[:-1]:
            cur = cur[key]
        return cur, path[-1]

    def _exists(self, path: Path) -> bool:
        cur = self.data
        for key in path:
            found = (isinstance(cur, dict) and key in cur) or (
                isinstance(cur, list) and isinstance(key, int) and 0 <= key < len(cur)
            )
            if not found:
                return False
            cur = cur[key]
        return True

    def _target(self, path: Path) -> Path | None:
        while path and not self._exists(path):
            path = path[:-1]
        while path:
            container, key = self._container(path)
            if isinstance(container, list):
                return path
            model = _model_at(path[:-1])
            if model is None:  # a dict of entries (templates, values, bits): drop the entry
                return path
            info = model.model_fields.get(key) if isinstance(key, str) else None
            if info is None or not info.is_required():
                return path  # unknown key, or a field with a default: drop it
            path = path[:-1]
        return None


# --- the loader ----------------------------------------------------------------------------------


class _Loader:
    """One run of loading: collects problems, then either a Loaded or a ConfigError."""

    def __init__(self, filename: str, env: Mapping[str, str]) -> None:
        self.filename = filename
        self.builder = _Builder(env)
        self.errors: list[_Problem] = []
        self.warnings: list[_Problem] = []
        self.pruned: _Pruned | None = None
        self._swaps: list[tuple[str, str]] | None = None

    # -- entry -------------------------------------------------------------------------------

    def run(self, text: str) -> Loaded:
        try:
            data = self._read(text)
        except _YamlSyntaxError as exc:
            raise ConfigError([f"{self.filename}:{exc.line}: yaml: {exc.message}"]) from None
        self.errors.extend(self.builder.problems)
        config = self._validate(data)
        if config is not None:
            _Checks(self, config).run()
        if self.errors:
            raise ConfigError(self._render(self.errors))
        assert config is not None
        return Loaded(config=config, path=self.filename, warnings=self._render(self.warnings))

    def _read(self, text: str) -> Any:
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark else 1
            message = exc.problem or exc.context or "invalid YAML"
            if (
                exc.problem
                and exc.context
                and exc.context_mark
                and exc.context_mark.line + 1 != line
            ):
                # Where the unfinished thing began is often the line to fix (an unclosed quote).
                message += f" ({exc.context} started at line {exc.context_mark.line + 1})"
            raise _YamlSyntaxError(line, message) from None
        except yaml.reader.ReaderError as exc:
            line = text[: exc.position].count("\n") + 1
            raise _YamlSyntaxError(line, exc.reason) from None
        except yaml.YAMLError as exc:
            raise _YamlSyntaxError(1, str(exc).splitlines()[0]) from None
        if node is None:
            return {}
        data = self.builder.build(node, ())
        return {} if data is None else data

    # -- pydantic -----------------------------------------------------------------------------

    def _validate(self, data: Any) -> Config | None:
        try:
            return Config.model_validate(data)
        except ValidationError as exc:
            located = [_locate(e, data) for e in exc.errors()]
        messages = _Messages(self._shown)
        for group in _group_unions(located):
            item = group[0]
            if self._under_unset(item.path):
                continue  # the missing variable was already reported at this line
            text = messages.union(group) if len(group) > 1 else messages.of(item)
            self.errors.append(_Problem(item.path, text))
        return self._validate_pruned(data, located)

    def _validate_pruned(self, data: Any, located: list[_Located]) -> Config | None:
        """Validate again without the invalid parts, so cross-checks still see the rest."""
        pruned = _Pruned(data)
        current = data
        for _ in range(_PRUNE_ROUNDS):
            if not pruned.remove_for(located):
                return None
            current = pruned.data
            try:
                config = Config.model_validate(current)
            except ValidationError as exc:
                located = [_locate(e, current) for e in exc.errors()]
                continue
            self.pruned = pruned
            return config
        return None

    def _under_unset(self, path: Path) -> bool:
        return any(path[: len(p)] == p for p in self.builder.unset)

    def _shown(self, path: Path, value: Any) -> str:
        """A value for a message: never a secret, never an expanded `${}`."""
        if path in self.builder.substituted:
            return repr(self.builder.substituted[path][0])
        if path and path[-1] in _SECRET_FIELDS and not isinstance(value, dict | list | None):
            return "(hidden)"  # a password written in the file still stays out of logs
        return _show(value)

    # -- reporting ----------------------------------------------------------------------------

    def original(self, path: Path) -> Path:
        """The path as written, for a path in the (possibly pruned) validated data."""
        return self.pruned.original(path) if self.pruned else path

    def was_pruned(
        self, prefix: Path, depth: int | None = None, keys: tuple[str, ...] = ()
    ) -> bool:
        """True if `prefix` (original path), or something below it, was dropped as invalid.

        With `depth`, only drops at most that many levels below count, plus keys named in `keys`.
        """
        if self.pruned is None:
            return False
        for p in self.pruned.removed:
            if prefix[: len(p)] == p:
                return True
            if p[: len(prefix)] == prefix and (
                depth is None or len(p) - len(prefix) <= depth or p[-1] in keys
            ):
                return True
        return False

    def line_of(self, path: Path) -> int:
        """The line of the deepest prefix of `path` that has one."""
        lines = self.builder.lines
        for n in range(len(path), -1, -1):
            if path[:n] in lines:
                return lines[path[:n]]
        return 1

    def has(self, path: Path) -> bool:
        """True if the key at `path` is written in the file."""
        return path in self.builder.lines

    def _render(self, problems: list[_Problem]) -> list[str]:
        rows: list[tuple[int, int, str]] = []
        seen: set[str] = set()
        for n, p in enumerate(problems):
            line = p.line if p.line is not None else self.line_of(p.path)
            text = f"{self.filename}:{line}: {_format_path(p.path)}: {self._redact(p.message)}"
            if text not in seen:
                seen.add(text)
                rows.append((line, n, text))
        return [text for _, _, text in sorted(rows)]

    def _redact(self, message: str) -> str:
        """Put the `${...}` text back wherever a substituted value would show."""
        if self._swaps is None:
            swaps: list[tuple[str, str]] = []
            for raw, value in self.builder.substituted.values():
                swaps += [(value, raw), (repr(value)[1:-1], raw)]
            swaps += [(value, f"${{{name}}}") for name, value in self.builder.env_values.items()]
            self._swaps = sorted((s for s in swaps if s[0]), key=lambda s: -len(s[0]))
        for value, raw in self._swaps:
            pattern = re.compile(rf"(?<![A-Za-z0-9]){re.escape(value)}(?![A-Za-z0-9])")
            if len(value) >= _SHORT:
                message = pattern.sub(lambda _m, r=raw: r, message)  # type: ignore[misc]
            else:
                # A value of a few characters ("1", "on") would garble ordinary words: it is
                # replaced only inside quoted values, which is where messages print values.
                message = re.sub(
                    r"'[^']*'",
                    lambda q, p=pattern, r=raw: p.sub(lambda _m: r, q.group(0)),  # type: ignore[misc]
                    message,
                )
        return message

    def error(self, path: Path, message: str) -> None:
        """Record a cross-check error at a path of the validated data."""
        self.errors.append(_Problem(self.original(path), message))

    def warn(self, path: Path, message: str) -> None:
        """Record a warning at a path of the validated data."""
        self.warnings.append(_Problem(self.original(path), message))


# --- cross-checks on the typed config ------------------------------------------------------------


_LISTEN = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^:\[\]]*):(\d{1,5})$")


def _host_port(address: str) -> tuple[str, int] | None:
    """Split `HOST:PORT` (`[v6]:PORT`, `:PORT`); None if it is not one."""
    m = _LISTEN.match(address)
    if not m or not 0 < int(m.group(2)) < 65536:
        return None
    return m.group(1), int(m.group(2))


def _port_key(port: str) -> str:
    """A serial path compared by what it names: `./var/tty0` and `var/tty0` are one line."""
    return port if "://" in port else os.path.normpath(port)


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # empty (all interfaces) or a name that may resolve anywhere


class _Checks:
    """Cross-references that no single model can check, run on the typed config."""

    def __init__(self, loader: _Loader, config: Config) -> None:
        self.loader = loader
        self.config = config
        self.device_names: dict[Any, Path] = {}  # Modbus device name -> where it is declared

    def run(self) -> None:
        """Run every check; templates are resolved first so later checks see the final points."""
        self._buses()
        self._devices()
        self._sinks()
        self._mcp()
        self._simulator()
        self._exposure()

    def _error(self, path: Path, message: str) -> None:
        self.loader.error(path, message)

    def _line(self, path: Path) -> int:
        return self.loader.line_of(self.loader.original(path))

    def _key_or(self, path: Path, key: str) -> Path:
        """`path.key` if that key is written in the file, else `path` (for the best line)."""
        return path + (key,) if self.loader.has(self.loader.original(path + (key,))) else path

    def _first(self, seen: dict[Any, Path], value: Any, path: Path, message: str) -> None:
        """Report `path` if `value` was seen before; otherwise remember it."""
        if value in seen:
            self._error(path, f"{message} (first at line {self._line(seen[value])})")
        else:
            seen[value] = path

    # -- modbus ----------------------------------------------------------------------------

    def _buses(self) -> None:
        names: dict[Any, Path] = {}
        ports: dict[Any, Path] = {}
        for b, bus in enumerate(self.config.modbus.buses):
            at = ("modbus", "buses", b)
            self._first(names, bus.name, at + ("name",), f"bus name {bus.name!r} is used twice")
            message = f"port {bus.port!r} is used by two buses"
            self._first(ports, _port_key(bus.port), at + ("port",), message)

    def _devices(self) -> None:
        modbus = self.config.modbus
        bad_templates = self._template_duplicates()
        names = self.device_names
        for b, bus in enumerate(modbus.buses):
            units: dict[Any, Path] = {}
            for d, device in enumerate(bus.devices):
                at = ("modbus", "buses", b, "devices", d)
                self._first(
                    names, device.name, at + ("name",), f"device name {device.name!r} is used twice"
                )
                self._first(
                    units,
                    device.unit,
                    at + ("unit",),
                    f"unit {device.unit} is used twice on bus {bus.name!r}",
                )
                self._resolve(device, at, bad_templates)

    def _template_duplicates(self) -> set[str]:
        bad: set[str] = set()
        for tname, points in self.config.modbus.templates.items():
            seen: dict[Any, Path] = {}
            for p, point in enumerate(points):
                path = ("modbus", "templates", tname, p, "name")
                if point.name in seen:
                    bad.add(tname)
                self._first(
                    seen,
                    point.name,
                    path,
                    f"point name {point.name!r} is used twice in template {tname!r}",
                )
        return bad

    def _resolve(self, device: DeviceConfig, at: Path, bad_templates: set[str]) -> None:
        """Replace the device's points by its template's points followed by its own."""
        templates = self.config.modbus.templates
        own = list(device.points)
        seen: dict[Any, Path] = {}
        for p, point in enumerate(own):
            self._first(
                seen,
                point.name,
                at + ("points", p, "name"),
                f"point name {point.name!r} is used twice in device {device.name!r}",
            )
        merged: list[tuple[PointConfig, Path | None]] = []
        if device.template is not None:
            if device.template not in templates:
                self._unknown_template(device.template, at)
                return
            if device.template in bad_templates:
                return
            merged = [(point.model_copy(deep=True), None) for point in templates[device.template]]
        index = {point.name: i for i, (point, _) in enumerate(merged)}
        for p, point in enumerate(own):
            if seen.get(point.name) != at + ("points", p, "name"):
                continue  # a repeated name, reported above
            if point.name in index:
                merged[index[point.name]] = (point, at + ("points", p))  # the device's own wins
            else:
                merged.append((point, at + ("points", p)))
        device.points = [point for point, _ in merged]
        dropped = self.loader.was_pruned(self.loader.original(at)) or (
            device.template is not None
            and self.loader.was_pruned(("modbus", "templates", device.template))
        )
        if not merged and not dropped:
            self._error(
                at, f"device {device.name!r} has no points (give it `points:` or a `template:`)"
            )
        for point, own_path in merged:
            self._fits(device, point, at, own_path)

    def _unknown_template(self, name: str, at: Path) -> None:
        declared = list(self.config.modbus.templates)
        if self.loader.was_pruned(("modbus", "templates", name)):
            return  # declared, but dropped as invalid: already reported there
        hint = _hint(name, declared) or (
            f" (known: {', '.join(declared)})"
            if declared
            else " (no modbus.templates are declared)"
        )
        self._error(at + ("template",), f"unknown template {name!r}{hint}")

    def _fits(
        self, device: DeviceConfig, point: PointConfig, at: Path, own_path: Path | None
    ) -> None:
        """A point must fit in one request and in the 16-bit address space."""
        if point.table in BIT_TABLES:
            return
        count = point.codec.count
        origin = (
            f"point {point.name!r}"
            if own_path
            else f"point {point.name!r} (from template {device.template!r})"
        )
        if count > device.max_registers:
            path = self._key_or(own_path, "type") if own_path else self._key_or(at, "max_registers")
            self._error(
                path,
                f"{origin} is {point.codec.spec}: {count} registers, "
                f"more than max_registers {device.max_registers} of device {device.name!r}",
            )
        if point.address + count - 1 > 65535:
            self._error(
                own_path + ("address",) if own_path else at,
                f"{origin} at address {point.address} runs past register 65535 ({count} registers)",
            )

    # -- northbound, mcp -----------------------------------------------------------------------

    def _sinks(self) -> None:
        names: dict[Any, Path] = {}
        for s, sink in enumerate(self.config.northbound):
            at = ("northbound", s)
            self._first(names, sink.name, at + ("name",), f"sink name {sink.name!r} is used twice")
            if sink.url is None and not self.config.broker.enabled:
                if self.loader.has(("northbound",)):
                    self._error(
                        self._key_or(at, "url"),
                        f"sink {sink.name!r} publishes to the embedded broker (no url) "
                        "but broker.enabled is false",
                    )
                else:
                    self._error(
                        ("broker", "enabled"),
                        f"the default sink {sink.name!r} publishes to the embedded broker: "
                        "enable it or list `northbound:` sinks with a url",
                    )

    def _mcp(self) -> None:
        mcp = self.config.mcp
        if mcp is None:
            return
        if _host_port(mcp.listen) is None:
            self._error(("mcp", "listen"), f"{mcp.listen!r} is not HOST:PORT (e.g. 0.0.0.0:7720)")
        ids: dict[Any, Path] = {}
        for i, device in enumerate(mcp.devices):
            path = ("mcp", "devices", i, "id")
            if device.id in self.device_names:
                line = self._line(self.device_names[device.id])
                self._error(
                    path, f"id {device.id!r} is already the name of a Modbus device (line {line})"
                )
                continue
            self._first(ids, device.id, path, f"MCP device id {device.id!r} is used twice")

    # -- simulator -------------------------------------------------------------------------------

    def _simulator(self) -> None:
        sim = self.config.simulator
        if sim is None:
            return
        buses = {
            _port_key(bus.port): b for b, bus in reversed(list(enumerate(self.config.modbus.buses)))
        }
        # A bus dropped as invalid may be the one a line refers to: no "not found" then.
        bus_dropped = self.loader.was_pruned(("modbus", "buses"), depth=1, keys=("port",))
        links: dict[Any, Path] = {}
        for n, line in enumerate(sim.modbus):
            at = ("simulator", "modbus", n)
            self._first(
                links,
                _port_key(line.link),
                at + ("link",),
                f"link {line.link!r} is used by two simulated lines",
            )
            units: dict[Any, Path] = {}
            for k, simdev in enumerate(line.devices):
                self._first(
                    units,
                    simdev.unit,
                    at + ("devices", k, "unit"),
                    f"unit {simdev.unit} is simulated twice on this line",
                )
            if _port_key(line.link) not in buses:
                if not bus_dropped:
                    self.loader.warn(
                        at + ("link",),
                        f"no modbus bus has port {line.link!r}: nothing polls this simulated line",
                    )
                continue
            b = buses[_port_key(line.link)]
            for k, simdev in enumerate(line.devices):
                self._sim_device(b, simdev.unit, simdev.values, at + ("devices", k))

    def _sim_device(self, b: int, unit: int, values: dict[str, Any], at: Path) -> None:
        """The values of a simulated slave must name points of the device polled at its unit."""
        bus = self.config.modbus.buses[b]
        bus_at = ("modbus", "buses", b)
        found = [(d, device) for d, device in enumerate(bus.devices) if device.unit == unit]
        if not found:
            if self.loader.was_pruned(
                self.loader.original(bus_at + ("devices",)), depth=1, keys=("unit",)
            ):
                return
            units = ", ".join(str(device.unit) for device in bus.devices) or "none"
            text = f"bus {bus.name!r} has no device with unit {unit} (units there: {units})"
            if values:
                self._error(at + ("unit",), text)
            else:
                self.loader.warn(at + ("unit",), text + ": nothing polls this simulated device")
            return
        d, device = found[0]
        device_at = self.loader.original(bus_at + ("devices", d))
        if (
            self.loader.was_pruned(device_at + ("points",))
            or self.loader.was_pruned(device_at + ("template",))
            or (
                device.template and self.loader.was_pruned(("modbus", "templates", device.template))
            )
        ):
            return  # a point dropped as invalid may be the one named here
        points = [point.name for point in device.points]
        for key in values:
            if key not in points:
                hint = _hint(key, points) or f" (points: {', '.join(points) or 'none'})"
                self._error(
                    at + ("values", key),
                    f"device {device.name!r} (unit {unit}) has no point {key!r}{hint}",
                )

    # -- exposure ----------------------------------------------------------------------------------

    def _exposure(self) -> None:
        broker = self.config.broker
        http = self.config.gateway.http
        if http is not None and _host_port(http) is None:
            self._error(("gateway", "http"), f"{http!r} is not HOST:PORT (e.g. 127.0.0.1:9720)")
        if broker.users is not None:
            return
        if broker.enabled:
            for i, url in enumerate(broker.listeners):
                hostport = _host_port(url.split("://", 1)[1].rstrip("/"))
                if hostport and not _is_loopback(hostport[0]):
                    host = hostport[0] or "0.0.0.0"
                    self.loader.warn(
                        ("broker", "listeners", i),
                        f"listens on {host}:{hostport[1]} without authentication",
                    )
        mcp = self.config.mcp
        if mcp is not None:
            hostport = _host_port(mcp.listen)
            if hostport and not _is_loopback(hostport[0]):
                host = hostport[0] or "0.0.0.0"
                self.loader.warn(
                    ("mcp", "listen"),
                    f"listens on {host}:{hostport[1]} beyond loopback while broker.users is unset",
                )
