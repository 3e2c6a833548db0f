"""Memory soak of a whole `fieldgate run` process (hil/soak.py): its RSS stays flat under hours' worth of traffic.

By default a screening of ~40 s. That is too short for the < 1 % goal: each replay after an upstream
outage may leave a high-water step of up to ~1.4 MiB (the allocator keeps the burst's arenas) for the
first few minutes, then none (six minutes: +0.7 %, flat at the end), so a 40 s run measures 0.1–3.3 %
with no leak at all. What it can judge is the steady growth: the mean one-second RSS increment after the
warm-up with the largest quarter (the steps) left out, per message published. Without a leak that is
0–2 bytes per message; keeping any Python object per message costs more than 16 (an empty `bytes`
and its list slot: 41), and `python -m hil.soak --leak 30` measures 76. The growth itself is bounded
loosely, for a leak per outage or per MCP session rather than per message.

FIELDGATE_SOAK=1 runs the real soak: 20 minutes (~8 h of the shipped config's polling), asserting
growth < 1 % after the warm-up.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hil.soak import MAX_STEADY_BYTES_PER_MESSAGE, SoakSettings, soak

SOAK = os.environ.get("FIELDGATE_SOAK") == "1"
#: The short run: upstream outages and MCP reconnects several times as often as in the long one, so
#: that every kind of traffic has been seen, twice, before the warm-up ends.
SHORT = SoakSettings.screening(36)
LONG = SoakSettings(seconds=20 * 60)
SETTINGS = LONG if SOAK else SHORT
#: Growth the short run may show at all: a few replay steps, no more (8 % seen at the end of issue 16 in 36 s, its first
#: replay bursts; the 6-minute soak at the same commit: 0.85 % after the warm-up, 2.4 bytes kept per message).
MAX_SHORT_GROWTH = 10.0


@pytest.mark.soak
@pytest.mark.timeout(SETTINGS.seconds + 120)
async def test_gateway_rss_stays_flat(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = await soak(SETTINGS, tmp_path)
    with capsys.disabled():
        print()
        result.report()
    s = SETTINGS
    # Everything the soak is there to exercise happened, and the gateway stopped cleanly.
    assert result.exit_code == 0, (tmp_path / "gateway.log").read_text()[-3000:]
    assert result.reads > 20 * s.seconds, "the Modbus line hardly ran"
    assert result.published > 5 * result.reads
    assert result.mcp_acked > 5 * s.seconds
    assert result.outages >= int(s.seconds // s.outage_every) - 1
    assert result.mcp_sessions > s.mcp_devices
    assert result.results >= result.requests // 2 and result.failed_results == 0
    if SOAK:
        assert result.passed, f"gateway RSS grew {result.gateway.percent:.2f} % after the warm-up (goal < 1 %)"
    else:
        steady = result.steady_bytes_per_message
        assert steady < MAX_STEADY_BYTES_PER_MESSAGE, f"the gateway gains {steady:.0f} bytes per message published"
        assert result.gateway.percent < MAX_SHORT_GROWTH
