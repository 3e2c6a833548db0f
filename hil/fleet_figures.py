"""The figures of hil/fleet.py, from what one fleet's run recorded: pure functions, no processes."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hil.bench.benchlib.report import percentile
from hil.fleet_parts import Arrivals, Policy


@dataclass
class Recorded:
    """What one fleet's run measured, raw: times are time.time(); per-gateway lists are in the fleet's order."""

    policy: Policy
    n: int
    launched: float
    first_connects: list[float | None]
    steady_s: float
    cpu_s: list[float]  # per gateway, over the steady window
    rss_mib: list[float]  # per gateway, at the end of the steady window
    rss_after_mib: list[float]  # per gateway, once every spool was empty
    broker_cpu_s: float
    broker_rss_mib: float
    stopped: float  # the broker stopped
    spooled: list[float | None]  # per gateway, spool messages just before the broker came back
    offline: list[bool]  # per gateway: /metrics said the sink was not connected before the broker came back
    back: float  # the broker was started again (a connect is counted from here: its start-up is in the figures)
    reconnects: list[float | None]  # per gateway, its first "connected to" after `back`
    replay_starts: list[float | None]  # per gateway, when its replay began after `back` (None: no delay logged)
    emptied: list[float | None]  # per gateway, when /metrics first showed it connected with an empty spool
    arrivals: Arrivals
    dead: list[str]
    takeovers: float  # fieldgate_sink_takeovers_total summed over the fleet, once every spool was empty
    errors: list[str]  # the gateways' log lines at ERROR


def spread(xs: Sequence[float | None]) -> dict[str, float]:
    """min / median / p90 / max of the values present, with how many there were."""
    present = sorted(x for x in xs if x is not None)
    if not present:
        return {"count": 0, "min": math.nan, "median": math.nan, "p90": math.nan, "max": math.nan}
    return {
        "count": len(present),
        "min": present[0],
        "median": statistics.median(present),
        "p90": percentile(present, 0.9),
        "max": present[-1],
    }


def peak_per_second(times: Sequence[float], origin: float) -> int:
    """The most of `times` in one 1 s bucket counted from `origin` (0 when there are none)."""
    buckets = Counter(math.floor(t - origin) for t in times if t >= origin)
    return max(buckets.values(), default=0)


def rate_between(times: Sequence[float], start: float, end: float) -> float:
    """Mean of `times` per second within [start, end]."""
    if end <= start:
        return math.nan
    return sum(1 for t in times if start <= t <= end) / (end - start)


def figures(r: Recorded) -> dict[str, Any]:
    """Everything the report and the test read, from one fleet's raw record."""
    after = [None if t is None else t - r.back for t in r.reconnects]
    replay_after = [None if t is None else t - r.back for t in r.replay_starts]
    emptied_after = [None if t is None else t - r.back for t in r.emptied]
    drained = max((t for t in r.emptied if t is not None), default=r.back)
    replayed = [
        t for t, s in zip(r.arrivals.times, r.arrivals.sampled, strict=True) if s is not None and s < r.back <= t
    ]
    during_drain = [t for t in r.arrivals.times if r.back <= t <= drained + 1.0]
    return {
        "policy": r.policy.__dict__,
        "n": r.n,
        "sum_replay_rate": r.n * r.policy.replay_rate,
        "dead": r.dead,
        "takeovers": r.takeovers,
        "errors": r.errors,
        "startup_s": spread([None if t is None else t - r.launched for t in r.first_connects]),
        "steady": {
            "seconds": r.steady_s,
            "cpu_percent": spread([c / r.steady_s * 100 for c in r.cpu_s]),
            "rss_mib": spread(r.rss_mib),
            "broker_cpu_percent": r.broker_cpu_s / r.steady_s * 100,
            "broker_rss_mib": r.broker_rss_mib,
            "msgs_per_s": rate_between(r.arrivals.times, r.stopped - r.steady_s, r.stopped),
        },
        "rss_after_mib": spread(r.rss_after_mib),
        "outage_s": r.back - r.stopped,
        "spooled": {
            "total": sum(x or 0 for x in r.spooled),
            "gateways_spooling": sum(1 for x in r.spooled if x),
            "per_gateway": spread(r.spooled),
            "gateways_offline": sum(r.offline),
        },
        "reconnect_s": spread(after),
        "reconnect_after_s": sorted(t for t in after if t is not None),
        "reconnected": sum(1 for t in after if t is not None),
        "peak_connects_per_s": peak_per_second([t for t in r.reconnects if t is not None], r.back),
        "replay_start_s": spread(replay_after),
        "emptied_s": spread(emptied_after),
        "emptied": sum(1 for t in emptied_after if t is not None),
        "all_empty_s": (drained - r.back) if all(t is not None for t in r.emptied) else math.nan,
        "peak_msgs_per_s": peak_per_second(during_drain, r.back),
        "replayed_telemetry": len(replayed),
        "peak_replayed_telemetry_per_s": peak_per_second(replayed, r.back),
    }


def ratio(a: float, b: float) -> float:
    """a / b, NaN when either is missing or b is 0."""
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return math.nan
    return a / b
