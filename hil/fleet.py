"""A fleet in one box: N `fieldgate run` processes publishing to one Mosquitto, the broker stopped under them and
started again, measured from the gateways' logs and /metrics, /proc and the broker's own count.

Each gateway has its own config and state dir in a temp dir: `broker.enabled: false`, a unique `gateway.id`,
one simulated MCP device (a DATA frame every `--interval` s with two moving values: a telemetry message and
two retained point values each), its status page on a free port, and one sink `up` to the broker at QoS 1
with the policy under test: `reconnect_base`, `reconnect_cap`, `spool.replay_delay` and `spool.replay_rate`.

Two fleets run one after the other, each on a fresh Mosquitto: the product's defaults (back-off base 1 s, cap
60 s, replay_delay 10 s) and a baseline that does not spread itself (replay_delay 0 and back-off base = cap =
`--baseline-backoff`, 0.1 s: the schema takes any positive value, and below that the gateways' failed connects
during the outage alone keep this 2-core machine busy). Per fleet:

1. start every gateway; once each sink logged "connected to", a warm-up, then a steady window: CPU (utime +
   stime from /proc) and RSS of each gateway and of Mosquitto, and the broker's message rate;
2. stop Mosquitto (SIGTERM) for `--outage` s; every gateway spools (its /metrics is read just before the
   restart: each must show its sink offline and messages in its spool); start Mosquitto again;
3. until every gateway's /metrics shows its sink connected with an empty spool (polled every ~0.25 s):
   - reconnect times: each gateway's first "sink up: connected to" log line after the broker is back
     (millisecond timestamps; one machine, one clock), as min / median / p90 / max, and the most in one
     1 s bucket (the peak connection rate);
   - the message rate: what the broker delivers to a subscriber of `fieldgate/#` per 1 s bucket (its session
     survives the restart, so what gateways publish before it is back is queued for it, not missed), set
     against the steady live rate; and of it, the replayed telemetry (sampled before the broker came back),
     set against the sum of the fleet's `replay_rate`s;
   - the time until every spool is empty.

Ratios compare the defaults' figures with the baseline's of the same run. Every process the harness starts
is stopped on the way out (also on Ctrl-C, SIGTERM or a failure).

Run from the repository root:  .venv/bin/python hil/fleet.py [--n 50] [--short] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

if __package__ in (None, ""):  # run as a script (python hil/fleet.py): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hil.bench.benchlib.procs import cpu_seconds, rss_kb  # noqa: E402
from hil.bench.benchlib.report import heading, note, print_header, print_table, progress, run_summary  # noqa: E402
from hil.fleet_figures import Recorded, figures, ratio  # noqa: E402
from hil.fleet_parts import Counter, Fleet, FleetBroker, Policy  # noqa: E402
from hil.ports import free_port  # noqa: E402

SCRAPE_EVERY = 0.25  # s between rounds of /metrics reads while the spools drain


class Failed(RuntimeError):
    """The fleet did not do what the measurement needs (a gateway never connected, died, never drained)."""


def wait_for(check: Callable[[], bool], timeout: float, what: str, fleet: Fleet) -> None:
    """Poll `check` every 0.25 s until it holds; Failed naming `what` (and any gateway that died) if it does not."""
    deadline = time.monotonic() + timeout
    while not check():
        if dead := fleet.dead():
            raise Failed(f"{what}: gateways exited: {', '.join(dead)}")
        if time.monotonic() > deadline:
            raise Failed(f"{what}: not within {timeout:g} s")
        time.sleep(0.25)


def run_fleet(policy: Policy, args: argparse.Namespace, root: Path) -> Recorded:
    """Start a broker and a fleet on `policy`, measure steady state, stop the broker, start it, measure the drain."""
    broker = FleetBroker(root / "mosquitto", free_port())
    fleet: Fleet | None = None
    counter: Counter | None = None
    try:
        broker.start()
        counter = Counter(broker.port)
        fleet = Fleet(root, args.n, broker.url, policy, args.interval)
        progress(f"{policy.name}: starting {args.n} gateways")
        launched = time.time()
        fleet.start()
        f = fleet
        wait_for(lambda: all(f.first_after("connected to", launched)), args.start_timeout, "every gateway up", f)
        first_connects = fleet.first_after("connected to", launched)
        progress(f"{policy.name}: every gateway connected; warm-up {args.warmup:g} s, steady window {args.steady:g} s")
        time.sleep(args.warmup)
        assert broker.pid is not None
        cpu0, bcpu0, t0 = fleet.cpu(), cpu_seconds(broker.pid), time.monotonic()
        time.sleep(args.steady)
        cpu1, bcpu1, steady_s = fleet.cpu(), cpu_seconds(broker.pid), time.monotonic() - t0
        rss, broker_rss = fleet.rss_mib(), rss_kb(broker.pid) / 1024

        progress(f"{policy.name}: broker stopped for {args.outage:g} s")
        stopped = time.time()
        broker.stop()
        time.sleep(args.outage)
        before = fleet.scrape(fleet.members)
        back = time.time()
        broker.start()
        progress(f"{policy.name}: broker back; waiting for every spool to drain")
        emptied: dict[str, float] = {}
        pending = list(fleet.members)
        deadline = time.monotonic() + args.drain_timeout
        while pending and time.monotonic() < deadline:
            for m, seen in zip(pending, fleet.scrape(pending), strict=True):
                if seen and seen.get("fieldgate_sink_connected") == 1 and seen.get("fieldgate_spool_messages") == 0:
                    emptied[m.gateway_id] = time.time()
            pending = [m for m in pending if m.gateway_id not in emptied]
            time.sleep(SCRAPE_EVERY)
        time.sleep(2.0)  # the last messages on their way to the subscriber
        rss_after = fleet.rss_mib()
        after = fleet.scrape(fleet.members)
        return Recorded(
            policy=policy,
            n=args.n,
            launched=launched,
            first_connects=first_connects,
            steady_s=steady_s,
            cpu_s=[b - a for a, b in zip(cpu0, cpu1, strict=True)],
            rss_mib=rss,
            rss_after_mib=rss_after,
            broker_cpu_s=bcpu1 - bcpu0,
            broker_rss_mib=broker_rss,
            stopped=stopped,
            spooled=[None if s is None else s.get("fieldgate_spool_messages") for s in before],
            offline=[s is not None and s.get("fieldgate_sink_connected") == 0 for s in before],
            back=back,
            reconnects=fleet.first_after("connected to", back),
            replay_starts=fleet.replay_starts(back),
            emptied=[emptied.get(m.gateway_id) for m in fleet.members],
            arrivals=counter.snapshot(),
            dead=fleet.dead(),
            takeovers=sum(s.get("fieldgate_sink_takeovers_total", 0) for s in after if s),
            errors=fleet.error_lines(),
        )
    finally:
        if counter is not None:
            counter.close()
        if fleet is not None and (killed := fleet.stop()):
            progress(f"{policy.name}: killed after {len(killed)} did not stop on SIGTERM: {', '.join(killed)}")
        broker.stop()


# --- the report ---------------------------------------------------------------------------------------------


def _s(d: dict[str, float]) -> str:
    if not d["count"]:
        return "-"
    return f"{d['min']:.2f} / {d['median']:.2f} / {d['p90']:.2f} / {d['max']:.2f}"


def problems(r: dict[str, Any]) -> list[str]:
    """What keeps a fleet's figures from meaning what they say: a gateway that died, did not spool, did not come
    back or did not drain."""
    name, n = r["policy"]["name"], r["n"]
    out = [f"{name}: gateways exited: {', '.join(r['dead'])}"] if r["dead"] else []
    if r["spooled"]["gateways_spooling"] < n or r["spooled"]["gateways_offline"] < n:
        out.append(
            f"{name}: {r['spooled']['gateways_offline']} of {n} offline and {r['spooled']['gateways_spooling']} "
            "spooling when the broker came back"
        )
    if r["reconnected"] < n:
        out.append(f"{name}: {r['reconnected']} of {n} reconnected")
    if r["emptied"] < n:
        out.append(f"{name}: {r['emptied']} of {n} spools emptied")
    if r["takeovers"]:
        out.append(f"{name}: {r['takeovers']:g} take-overs counted: a broker restart is none")
    return out


def report(results: list[dict[str, Any]]) -> None:
    """Each fleet's figures side by side, then the defaults against the baseline."""
    heading("Per fleet")
    rows: list[list[object]] = [
        ["gateways", *(r["n"] for r in results)],
        [
            "reconnect_base / reconnect_cap, s",
            *(f"{r['policy']['reconnect_base']:g} / {r['policy']['reconnect_cap']:g}" for r in results),
        ],
        ["replay_delay, s", *(r["policy"]["replay_delay"] for r in results)],
        ["replay_rate per gateway, msg/s", *(r["policy"]["replay_rate"] for r in results)],
        ["start-up, exec -> connected, s (min/med/p90/max)", *(_s(r["startup_s"]) for r in results)],
        ["steady CPU per gateway, % of a core (min/med/p90/max)", *(_s(r["steady"]["cpu_percent"]) for r in results)],
        ["steady RSS per gateway, MiB (min/med/p90/max)", *(_s(r["steady"]["rss_mib"]) for r in results)],
        [
            "Mosquitto steady CPU, % / RSS, MiB",
            *(f"{r['steady']['broker_cpu_percent']:.1f} / {r['steady']['broker_rss_mib']:.1f}" for r in results),
        ],
        ["steady msg/s delivered", *(r["steady"]["msgs_per_s"] for r in results)],
        ["outage, s", *(r["outage_s"] for r in results)],
        ["gateways spooling at the restart", *(r["spooled"]["gateways_spooling"] for r in results)],
        ["messages spooled in all", *(int(r["spooled"]["total"]) for r in results)],
        ["reconnected", *(r["reconnected"] for r in results)],
        ["reconnect after the restart, s (min/med/p90/max)", *(_s(r["reconnect_s"]) for r in results)],
        ["peak connects per second (1 s buckets)", *(r["peak_connects_per_s"] for r in results)],
        ["replay start after the restart, s (min/med/p90/max)", *(_s(r["replay_start_s"]) for r in results)],
        ["sum of replay_rates, msg/s", *(r["sum_replay_rate"] for r in results)],
        ["peak msg/s delivered during the drain (1 s buckets)", *(r["peak_msgs_per_s"] for r in results)],
        ["replayed telemetry received", *(r["replayed_telemetry"] for r in results)],
        ["peak replayed telemetry per second", *(r["peak_replayed_telemetry_per_s"] for r in results)],
        ["spool empty after the restart, s (min/med/p90/max)", *(_s(r["emptied_s"]) for r in results)],
        ["every spool empty after, s", *(r["all_empty_s"] for r in results)],
        ["take-overs counted (all gateways)", *(int(r["takeovers"]) for r in results)],
        ["gateway log lines at ERROR (all gateways)", *(len(r["errors"]) for r in results)],
    ]
    print_table(["figure", *(r["policy"]["name"] for r in results)], rows, thousands=True, blank="-")
    if len(results) < 2:
        return
    ours, base = results
    heading(f"{ours['policy']['name']} against {base['policy']['name']} (same run)")
    compare = [
        ("reconnect spread, max - min, s", lambda r: r["reconnect_s"]["max"] - r["reconnect_s"]["min"]),
        ("reconnect p90, s", lambda r: r["reconnect_s"]["p90"]),
        ("peak connects per second", lambda r: r["peak_connects_per_s"]),
        ("peak msg/s delivered during the drain", lambda r: r["peak_msgs_per_s"]),
        ("peak replayed telemetry per second", lambda r: r["peak_replayed_telemetry_per_s"]),
        ("every spool empty after, s", lambda r: r["all_empty_s"]),
    ]
    print_table(
        ["figure", ours["policy"]["name"], base["policy"]["name"], "ratio"],
        [[name, get(ours), get(base), ratio(get(ours), get(base))] for name, get in compare],
        thousands=True,
        blank="-",
    )
    note("ratio = the defaults' figure / the baseline's")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; --short shortens every window for a quick run (the test's)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=50, help="gateways per fleet (default 50)")
    p.add_argument("--short", action="store_true", help="short windows (outage 6 s, replay_delay 3 s): a quick check")
    p.add_argument("--outage", type=float, help="s the broker stays down (default 20; --short 6)")
    p.add_argument("--warmup", type=float, help="s after every gateway connected (default 10; --short 2)")
    p.add_argument("--steady", type=float, help="s of the steady window (default 20; --short 3)")
    p.add_argument("--interval", type=float, default=1.0, help="s between each simulated device's DATA frames")
    p.add_argument("--replay-rate", type=float, default=10.0, help="each sink's spool.replay_rate (default 10)")
    p.add_argument("--replay-delay", type=float, help="the defaults' spool.replay_delay (default 10; --short 3)")
    p.add_argument("--reconnect-base", type=float, default=1.0, help="the defaults' reconnect_base (default 1)")
    p.add_argument("--reconnect-cap", type=float, default=60.0, help="the defaults' reconnect_cap (default 60)")
    p.add_argument("--baseline-backoff", type=float, default=0.1, help="the baseline's reconnect_base = _cap")
    p.add_argument("--no-baseline", action="store_true", help="run only the defaults' fleet")
    p.add_argument("--start-timeout", type=float, help="s for every gateway to connect (default 30 + 2 s x N)")
    p.add_argument(
        "--drain-timeout", type=float, help="s after the restart for every spool to empty (default 180; --short 40)"
    )
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    args = p.parse_args(argv)
    for name, full, short in (("outage", 20, 6), ("warmup", 10, 2), ("steady", 20, 3), ("replay_delay", 10, 3)):
        if getattr(args, name) is None:
            setattr(args, name, short if args.short else full)
    args.start_timeout = args.start_timeout or 30 + 2.0 * args.n
    args.drain_timeout = args.drain_timeout or (40 if args.short else 180)
    return args


def _interrupted(signum: int, _frame: object) -> NoReturn:
    # SIGTERM and SIGHUP unwind like Ctrl-C, through every `finally` that stops a process.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run the fleets, print the report; 1 when a fleet could not be measured."""
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupted)
    started = time.monotonic()
    print_header(
        "fleet",
        {},
        [f"command: {' '.join(sys.argv)}", f"{args.n} gateways per fleet, outage {args.outage:g} s"],
        skews="CPU, start-up and timing",
    )
    policies = [
        Policy("defaults", args.reconnect_base, args.reconnect_cap, args.replay_delay, args.replay_rate),
    ]
    if not args.no_baseline:
        b = args.baseline_backoff
        policies.append(Policy("baseline", b, b, 0.0, args.replay_rate))
    results = []
    with tempfile.TemporaryDirectory(prefix="fieldgate-fleet-") as tmp:
        for policy in policies:
            try:
                recorded = run_fleet(policy, args, Path(tmp) / policy.name)
            except Failed as exc:
                print(f"FAILED: {policy.name}: {exc}")
                return 1
            results.append(figures(recorded))
            if problems(results[-1]):
                break  # its figures would not mean what they say: no need to run the next fleet
    report(results)
    for r in results:
        for line in r["errors"][:20]:
            print(f"ERROR in a log: {line}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    failed = [p for r in results for p in problems(r)]
    for p in failed:
        print(f"FAILED: {p}")
    print(run_summary(started))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
