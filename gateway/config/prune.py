"""Validate again without the invalid parts, so the rest of a config still gets cross-checked."""

from __future__ import annotations

import copy
from typing import Any

from pydantic import ValidationError

from .messages import Located, locate, model_at
from .problems import Key, Path
from .schema import Config

_PRUNE_ROUNDS = 25


class Pruned:
    """The data that validated, less what was removed as invalid, and the way back to the file."""

    def __init__(self, data: Any) -> None:
        self.data = data
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

    def dropped(self, prefix: Path, depth: int | None = None, keys: tuple[str, ...] = ()) -> bool:
        """True if `prefix` (a path as written), or something below it, was removed as invalid.

        With `depth`, only removals at most that many levels below count, plus keys named in `keys`.
        """
        for p in self.removed:
            if prefix[: len(p)] == p:
                return True
            if p[: len(prefix)] == prefix and (depth is None or len(p) - len(prefix) <= depth or p[-1] in keys):
                return True
        return False

    def remove_for(self, items: list[Located]) -> bool:
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
            model = model_at(path[:-1])
            if model is None:  # a dict of entries (templates, values, bits): drop the entry
                return path
            info = model.model_fields.get(key) if isinstance(key, str) else None
            if info is None or not info.is_required():
                return path  # unknown key, or a field with a default: drop it
            path = path[:-1]
        return None


def revalidate(data: Any, located: list[Located]) -> tuple[Config | None, Pruned]:
    """Prune around the errors and validate again, a few rounds; (None, ...) if it never passes."""
    pruned = Pruned(copy.deepcopy(data))
    for _ in range(_PRUNE_ROUNDS):
        if not pruned.remove_for(located):
            break
        try:
            return Config.model_validate(pruned.data), pruned
        except ValidationError as exc:
            located = [locate(e, pruned.data) for e in exc.errors()]
    return None, pruned
