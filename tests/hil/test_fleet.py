"""hil/fleet.py run in its short form with 3 gateways per fleet, so that the fleet harness cannot rot: every
gateway spools while the broker is down, reconnects once it is back and empties its spool, in both fleets, and
the harness leaves no process behind. Structure and sanity only; the speeds are the harness's to report."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

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


def run_harness(*args: str, timeout: float) -> tuple[int, str, str]:
    """Run hil/fleet.py; past `timeout` (or when the test is cut short) SIGTERM it, which stops what it started
    (a SIGKILL would leave its Mosquitto behind)."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "hil" / "fleet.py"), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        err += f"\n(the harness ran past {timeout:g} s: stopped)"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    return proc.returncode, out, err


@pytest.mark.timeout(300)
def test_a_short_fleet_run_restarts_the_broker_and_every_gateway_reconnects_and_drains(tmp_path: Path) -> None:
    """`hil/fleet.py --short --n 3`: both fleets spool, reconnect and drain; the report compares them; no leftovers."""
    out = tmp_path / "fleet.json"
    code, stdout, stderr = run_harness("--short", "--n", str(N), "--json", str(out), timeout=200)
    assert code == 0, f"{stdout[-4000:]}\n{stderr[-4000:]}"
    assert "defaults against baseline (same run)" in stdout
    results = json.loads(out.read_text())
    assert [r["policy"]["name"] for r in results] == ["defaults", "baseline"]
    for r in results:
        name = r["policy"]["name"]
        assert r["n"] == N and r["dead"] == [] and r["takeovers"] == 0, name
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
