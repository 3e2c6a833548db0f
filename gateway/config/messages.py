"""Pydantic validation errors as short problems at the paths of the data as written."""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from .problems import Key, Path, Problem, hint, show
from .schema import Config

Shown = Callable[[Path, Any], str]  # renders the value at a path for a message

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


def model_at(path: Path) -> type[BaseModel] | None:
    """The model class whose fields live at `path` (unwrapping `X | None`)."""
    tp = _type_at(path)
    if get_origin(tp) in (Union, types.UnionType):
        tp = next((a for a in map(_strip, get_args(tp)) if _is_model(a)), None)
    return tp if _is_model(tp) else None


# --- where an error is ---------------------------------------------------------------------------

_MISSING = object()


@dataclass
class Located:
    """A pydantic error mapped onto the data: its real path, and where a union branched."""

    error: Mapping[str, Any]
    path: Path
    union_at: int | None  # length of the path where `loc` stopped matching the data
    tag: Any  # the `loc` element there (a union-branch tag such as 'list[int]'), or None
    is_key: bool
    value: Any


def locate(error: Mapping[str, Any], data: Any) -> Located:
    """Map a pydantic `loc` onto data keys, skipping union-branch tags such as 'list[int]'."""
    loc = error["loc"]
    path: list[Key] = []
    cur: Any = data
    union_at: int | None = None
    tag: Any = None
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
            model = model_at(tuple(path))
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
            union_at, tag = len(path), el
    return Located(error, tuple(path), union_at, tag, is_key, None if cur is _MISSING else cur)


# --- messages ------------------------------------------------------------------------------------

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
_BOUNDS = {
    "less_than_equal": ("at most", "le"),
    "less_than": ("less than", "lt"),
    "greater_than_equal": ("at least", "ge"),
    "greater_than": ("more than", "gt"),
}
_BRANCH_KINDS = (
    ("dict[", "a mapping"),
    ("list[", "a list"),
    ("float", "a number"),
    ("int", "an integer"),
    ("bool", "true/false"),
    ("str", "a string"),
    ("function-after[", "a string"),
    ("literal[", "one of the allowed values"),
)


def explain(located: list[Located], shown: Shown) -> list[Problem]:
    """One problem per error, and one per union value that matched none of its alternatives."""
    return [Problem(group[0].path, _union_message(group, shown)) for group in _group(located)]


def _group(items: list[Located]) -> list[list[Located]]:
    """Group the branch errors of each union value; keep branches that got past the type check."""
    groups: dict[Any, list[Located]] = {}  # keyed by where the union is, else by position
    for n, item in enumerate(items):
        where = n if item.union_at is None else item.path[: item.union_at]
        groups.setdefault(where, []).append(item)
    out: list[list[Located]] = []
    for group in groups.values():
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


def _union_message(items: list[Located], shown: Shown) -> str:
    """`expected a mapping or a list, got 5` when the branches expected different kinds."""
    kinds: list[str] = []
    for item in items:
        kind = next((k for p, k in _BRANCH_KINDS if str(item.tag).startswith(p)), None)
        if item.tag is not None and kind and kind not in kinds:
            kinds.append(kind)
    first = items[0]
    if len(kinds) < 2:
        return _message(first, shown)
    expected = ", ".join(kinds[:-1]) + " or " + kinds[-1]
    return f"expected {expected}, got {shown(first.path, first.value)}"


def _message(item: Located, shown: Shown) -> str:
    err = item.error
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if item.is_key:
        value = show(item.path[-1])
    else:
        value = shown(item.path, item.value if item.value is not None else err.get("input"))
    # About a mapping key, the key is named up front; elsewhere the value is quoted at the end.
    got = "" if item.is_key else f", got {value}"
    msg: str
    if kind == "missing":
        msg = "is required but missing"
    elif kind == "extra_forbidden":
        msg = _unknown_key(item.path)
    elif kind == "literal_error":
        tp = _type_at(item.path)
        allowed = list(get_args(tp)) if get_origin(tp) is Literal else None
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
        return f"key {value}: {msg}"
    return msg


def _unknown_key(path: Path) -> str:
    key = path[-1]
    model = model_at(path[:-1])
    known = list(model.model_fields) if model else []
    suffix = hint(str(key), known)
    if not suffix and known:
        suffix = f" (expected one of: {', '.join(known)})"
    return f"unknown key {str(key)!r}{suffix}"
