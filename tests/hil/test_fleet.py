"""hil/fleet.py run in its short form with 3 gateways per fleet, so that the fleet harness cannot rot: every
gateway spools while the broker is down, reconnects once it is back and empties its spool, in both fleets, and
the harness leaves no process behind. Structure and sanity only; the speeds are the harness's to report."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
N = 3


def fleet_processes() -> list[int]:
    """Pids of processes started from a fleet's temp dir (gateways' configs and Mosquitto's live there)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if b"fieldgate-fleet-" in cmdline:
            found.append(int(entry))
    return found


def test_a_short_fleet_run_restarts_the_broker_and_every_gateway_reconnects_and_drains(tmp_path: Path) -> None:
    """`hil/fleet.py --short --n 3`: both fleets spool, reconnect and drain; the report compares them; no leftovers."""
    out = tmp_path / "fleet.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "hil" / "fleet.py"), "--short", "--n", str(N), "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    assert "defaults against baseline (same run)" in done.stdout
    results = json.loads(out.read_text())
    assert [r["policy"]["name"] for r in results] == ["defaults", "baseline"]
    for r in results:
        name = r["policy"]["name"]
        assert r["n"] == N and r["dead"] == [], name
        assert r["spooled"]["gateways_offline"] == N and r["spooled"]["gateways_spooling"] == N, name
        assert r["reconnected"] == N and r["reconnect_s"]["min"] >= 0, name
        assert r["emptied"] == N and math.isfinite(r["all_empty_s"]), name
        assert 1 <= r["peak_connects_per_s"] <= N, name
        # A simulated device sends a frame a second: a 6 s outage leaves several telemetry messages per gateway.
        assert r["replayed_telemetry"] >= 3 * N, name
        assert r["steady"]["rss_mib"]["count"] == N and r["steady"]["rss_mib"]["min"] > 10, name
        assert r["steady"]["msgs_per_s"] > 0, name
    defaults, baseline = results
    # Every replay after a reconnect waited its drawn share of replay_delay (and logged it); the baseline has none.
    assert defaults["replay_start_s"]["count"] == N and baseline["replay_start_s"]["count"] == 0
    assert fleet_processes() == []
