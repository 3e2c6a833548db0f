"""Where a process's time goes: sampled (pyinstrument) or deterministic (cProfile) profiles grouped by component.

A component is named by the substrings of its source paths (`groups`); a stdlib helper's or builtin's time
goes to the component of the nearest frame above it (samples) or of its callers (cProfile).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._root import ROOT
from .report import heading, note, print_table

GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("amqtt broker", ("/amqtt/", "/transitions/")),
    ("paho / sink", ("/paho/", "bridge/sink.py")),
    ("MCP session/codec", ("drivers/mcp/", "/crcmod/")),
    # The router and the outbox with the modules split off them (requests, token bucket, event gate; the outbox's
    # live queue, group commit, replay and retained bookkeeping), so that the group measures what it always did.
    (
        "router / outbox",
        (
            "gateway/router.py",
            "gateway/device_requests.py",
            "gateway/token_bucket.py",
            "gateway/event_gate.py",
            "bridge/outbox",
            "bridge/delivery.py",
            "gateway/app.py",
            "gateway/types.py",
        ),
    ),
    ("asyncio overhead", ("/asyncio/", "/selectors.py")),
]
IDLE = "idle (epoll wait)"
OTHER = "other"
GROUP_NAMES = [g for g, _ in GROUPS] + [OTHER]


def group_of(path: str) -> str | None:
    """The component a source file belongs to; None for stdlib helpers and builtins (charged to the caller)."""
    for name, needles in GROUPS:
        if any(n in path for n in needles):
            return name
    return None


def short_name(path: str, line: int, func: str) -> str:
    """`package/file.py:line func`, without the install prefix."""
    for marker in ("site-packages/", str(ROOT) + "/", "/lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{line} {func}" if path not in ("<built-in>", "~") else func


def analyse_samples(records: list[tuple[list[str], float]]) -> dict[str, Any]:
    """Group pyinstrument's sampled stacks: self time by component (nearest categorised frame), top entries."""
    from pyinstrument.frame_info import frame_info_get_identifier

    groups: dict[str, float] = defaultdict(float)
    asyncio_for: dict[str, float] = defaultdict(float)  # asyncio's time by the component nearest above it
    self_t: dict[str, float] = defaultdict(float)
    cum_t: dict[str, float] = defaultdict(float)
    total = idle = 0.0
    for stack, t in records:
        frames = []
        for info in stack:
            func, _, rest = frame_info_get_identifier(info).partition("\x00")
            path, _, lineno = rest.partition("\x00")
            frames.append((func, path, int(lineno or 0), group_of(path)))
        total += t
        leaf_func, leaf_path, leaf_line, _ = frames[-1]
        if leaf_func == "epoll.poll":
            idle += t
            continue
        self_t[short_name(leaf_path, leaf_line, leaf_func)] += t
        for func, path, line, g in set(frames):
            if g is not None and g != "asyncio overhead":
                cum_t[short_name(path, line, func)] += t
        owner = next((g for *_, g in reversed(frames) if g is not None), OTHER)
        groups[owner] += t
        if owner == "asyncio overhead":
            above = (g for *_, g in reversed(frames) if g not in (None, "asyncio overhead"))
            asyncio_for[next(above, "the event loop itself")] += t
    return {
        "total": total,
        "idle": idle,
        "busy": total - idle,
        "groups": dict(groups),
        "asyncio_for": dict(asyncio_for),
        "top_self": sorted(self_t.items(), key=lambda kv: -kv[1])[:15],
        "top_cum": sorted(cum_t.items(), key=lambda kv: -kv[1])[:15],
    }


def analyse_cprofile(prof: Any) -> dict[str, Any]:
    """Group cProfile's self times by component (a builtin's or stdlib helper's time goes to its callers, edge by
    edge), and count the tasks, futures and callbacks each component makes asyncio create."""
    import pstats

    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    groups: dict[str, float] = defaultdict(float)
    idle = 0.0
    epoll = "<method 'poll' of 'select.epoll' objects>"

    def charge(func: tuple[str, int, str], amount: float, into: dict[str, float], depth: int, calls: bool) -> None:
        """Charge `amount` (self time, or with `calls` a call count that skips asyncio frames) to components."""
        g = group_of(func[0])
        if g is not None and not (calls and g == "asyncio overhead"):
            into[g] += amount
            return
        callers = stats[func][4] if func in stats else {}
        weight = {c: (edge[1] if calls else edge[3]) for c, edge in callers.items()}  # calls / cumulative time
        total_w = sum(weight.values())
        if depth > 25 or not total_w:
            into["the event loop itself" if calls else OTHER] += amount
            return
        for caller, w in weight.items():
            charge(caller, amount * w / total_w, into, depth + 1, calls)

    for func, (_cc, _nc, tt, _ct, callers) in stats.items():
        if func[2] == epoll:
            idle += tt
            continue
        g = group_of(func[0])
        if g is not None:
            groups[g] += tt
            continue
        # Per caller edge: the part of func's own time spent on behalf of that caller.
        edges = {c: e[2] for c, e in callers.items()}
        if not sum(edges.values()):
            groups[OTHER] += tt
            continue
        for caller, edge_tt in edges.items():
            charge(caller, tt * edge_tt / sum(edges.values()), groups, 1, False)

    made: dict[str, dict[str, float]] = {}
    for what, needle in (("tasks", "create_task"), ("futures", "create_future"), ("callbacks", "__init__")):
        into: dict[str, float] = defaultdict(float)
        for func, (_cc, _nc, _tt, _ct, callers) in stats.items():
            base = func[0].endswith("asyncio/base_events.py") and what != "callbacks"
            handle = func[0].endswith("asyncio/events.py") and func[1] < 60 and what == "callbacks"
            if func[2] == needle and (base or handle):
                for caller, edge in callers.items():
                    charge(caller, edge[1], into, 1, True)
        made[what] = dict(into)
    rows = [(short_name(f[0], f[1], f[2]), tt, nc) for f, (_cc, nc, tt, _ct, _c) in stats.items() if f[2] != epoll]
    busy = sum(groups.values())
    return {
        "total": busy + idle,
        "idle": idle,
        "busy": busy,
        "groups": dict(groups),
        "made": made,
        "top_self": sorted(rows, key=lambda r: -r[1])[:15],
    }


# --- self time per part of one process, per message (cProfile) ---------------------------------------


def part_of(filename: str, parts: Sequence[tuple[str, str]], script: str) -> str:
    """The part a profiled function's file belongs to: the label of the first of `parts` (substring, label) found
    in its path; "builtins" for a builtin, "bench" for the bench `script` itself, else "other"."""
    name = filename.replace("\\", "/")
    for needle, label in parts:
        if needle in name:
            return label
    if name == "~":
        return "builtins"
    if script in name:
        return "bench"
    return "other"


def self_time_per_message(
    prof: Any, msgs: int, seconds: float, parts: Sequence[tuple[str, str]], script: str
) -> dict[str, Any]:
    """Self time per part (see part_of) and the top functions of a cProfile run, per message handled in it."""
    import pstats

    stats = pstats.Stats(prof)
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = stats.stats  # type: ignore[attr-defined]
    per = max(1, msgs)
    by_part: dict[str, float] = {}
    rows = []
    for (filename, line, func), (_cc, calls, tottime, cumtime, _callers) in raw.items():
        part = part_of(filename, parts, script)
        if func == "<method 'poll' of 'select.epoll' objects>":
            part = "epoll wait (idle)"
        elif part == "builtins":
            # A builtin's self time goes to whoever called it most.
            callers = _callers or {}
            if callers:
                top = max(callers.items(), key=lambda kv: kv[1][2])[0]  # (cc, nc, tottime, cumtime) per caller
                part = part_of(top[0], parts, script)
        by_part[part] = by_part.get(part, 0.0) + tottime
        short = f"{Path(filename).name}:{line}({func})" if filename != "~" else func
        rows.append((short, calls / per, tottime / per * 1e6, cumtime / per * 1e6))
    rows.sort(key=lambda r: -r[2])
    return {
        "msgs": msgs,
        "seconds": seconds,
        "parts_us": {k: v / per * 1e6 for k, v in sorted(by_part.items(), key=lambda kv: -kv[1])},
        "top": rows[:15],
    }


# --- the report's figure -----------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    print_table(headers, rows, thousands=True, blank="-")


def report_profile(title: str, profiles: Sequence[dict[str, Any]], per_frame: float) -> None:
    """A report's figure of where the gateway's time went: `profiles` as gateway_child's "profile" answers them,
    `per_frame` the gateway's CPU per ACKed frame (µs) that their shares divide."""
    if not profiles:
        return
    heading(title)
    by_kind = {p["kind"]: p for p in profiles}
    kinds = [k for k in ("pyinstrument", "cprofile") if k in by_kind]
    first = by_kind[kinds[0]]

    def share(p: dict[str, Any], seconds: float) -> float:
        return seconds / p["busy"] * 100 if p["busy"] else float("nan")

    table = []
    for g in GROUP_NAMES:
        line: list[object] = [g] + [share(by_kind[k], by_kind[k]["groups"].get(g, 0.0)) for k in kinds]
        line.append(share(first, first["groups"].get(g, 0.0)) / 100 * per_frame)
        table.append(line)
    _table(["component"] + [f"{k} %" for k in kinds] + [f"µs/frame (of {per_frame:.0f})"], table)
    for kind in kinds:
        p = by_kind[kind]
        note(
            f"{kind}: {p['wall']:.1f} s, {p['acks'] / p['wall']:.0f} ACKs/s while profiled, "
            f"{p['published'] / max(1, p['acks']):.2f} publishes per ACK; the loop was busy "
            f"{p['busy'] / max(1e-9, p['total']):.0%} of the time, in epoll wait "
            f"{p['idle'] / max(1e-9, p['total']):.0%}"
        )
    note("%: share of the loop's busy time. A stdlib or builtin frame's time goes to the component of the nearest")
    note("frame above it (pyinstrument) or of its callers (cProfile); asyncio's own code, including the socket")
    note(f"calls of its transports, is 'asyncio overhead'. µs/frame: the {kinds[0]} share of figure 2's gateway CPU.")
    if "asyncio_for" in first:
        print()
        print("  asyncio overhead by the component that called into it (pyinstrument, % of busy):")
        rows = sorted(first["asyncio_for"].items(), key=lambda kv: -kv[1])
        _table(
            ["on behalf of", "% of busy", "µs/frame"],
            [[g, share(first, t), share(first, t) / 100 * per_frame] for g, t in rows],
        )
        note("'the event loop itself': _run_once, handle dispatch and task steps, which no component frame is above.")
    if "cprofile" in by_kind:
        p = by_kind["cprofile"]
        made = p["made"]
        comps = sorted({g for counts in made.values() for g in counts}, key=lambda g: -made["tasks"].get(g, 0.0))
        print()
        print("  asyncio objects made per ACKed frame, by the component that asked for them (cProfile call counts):")
        acks = max(1, p["acks"])
        _table(
            ["component", "tasks", "futures", "callbacks (Handle)"],
            [[g] + [made[w].get(g, 0.0) / acks for w in ("tasks", "futures", "callbacks")] for g in comps]
            + [["total"] + [sum(made[w].values()) / acks for w in ("tasks", "futures", "callbacks")]],
        )
    if "pyinstrument" in by_kind:
        p = by_kind["pyinstrument"]
        print()
        print("  top self time (pyinstrument samples, % of busy):")
        _table(["function", "self %"], [[name, share(p, t)] for name, t in p["top_self"]])
        print()
        print("  top cumulative time of component functions (pyinstrument, % of busy):")
        _table(["function", "cum %"], [[name, share(p, t)] for name, t in p["top_cum"]])
    if "cprofile" in by_kind:
        p = by_kind["cprofile"]
        print()
        print("  top self time (cProfile: deterministic, it inflates small Python functions; calls per ACKed frame):")
        _table(
            ["function", "self %", "calls/frame"],
            [[name, share(p, tt), nc / max(1, p["acks"])] for name, tt, nc in p["top_self"]],
        )
