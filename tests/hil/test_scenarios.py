"""Fault scenarios through the baud-accurate line: a real ModbusBus, pymodbus slaves with known values.

The scenarios themselves live in hil/scenarios.py (hil/run.py runs the same ones, on real adapters
too); each returns its counts and the checks that failed. Short by default (`make test`);
FIELDGATE_SOAK=1 runs the `soak` ones for minutes.
"""

from __future__ import annotations

import os

import pytest

from hil import scenarios
from hil.scenarios import Rigs

SOAK = os.environ.get("FIELDGATE_SOAK") == "1"
NOISE_SECONDS = 300.0 if SOAK else 5.0
LATE_SECONDS = 120.0 if SOAK else 5.0
MIXED_SECONDS = 300.0 if SOAK else 3.0


def passed(result: scenarios.Result) -> bool:
    """Print what the scenario saw (shown with -s or on failure); whether every check held."""
    print(result.summary or result.name)
    return result.passed


@pytest.mark.soak
@pytest.mark.timeout(NOISE_SECONDS + 120)
async def test_line_noise_publishes_no_wrong_value_and_leaves_no_device_offline(rigs: Rigs) -> None:
    result = await scenarios.line_noise(rigs, seconds=NOISE_SECONDS)
    assert passed(result), result.failures
    assert result.counts["flipped_bytes"] > 0 and result.counts["crc_errors"] > 0


@pytest.mark.soak
@pytest.mark.timeout(MIXED_SECONDS + 120)
async def test_flips_drops_truncation_and_babble_publish_no_wrong_value(rigs: Rigs) -> None:
    result = await scenarios.mixed_noise(rigs, seconds=MIXED_SECONDS)
    assert passed(result), result.failures
    counts = result.counts
    assert (
        counts["flipped_bytes"] and counts["dropped_bytes"] and counts["truncated_frames"] and counts["babble_bursts"]
    )


@pytest.mark.soak
@pytest.mark.timeout(LATE_SECONDS + 120)
@pytest.mark.parametrize("retries", [0, 1])
async def test_a_late_reply_is_never_decoded_as_another_devices_answer(rigs: Rigs, retries: int) -> None:
    result = await scenarios.late_other_unit(rigs, seconds=LATE_SECONDS, retries=retries)
    assert passed(result), result.failures
    assert result.counts["wrong_values"] == 0 and result.counts["late_replies"] > 5


async def test_a_late_reply_is_never_decoded_as_another_block_of_the_same_device(rigs: Rigs) -> None:
    result = await scenarios.late_same_unit(rigs, seconds=3.0)
    assert passed(result), result.failures
    assert result.counts["late_replies"] > 3


async def test_adapter_unplugged_for_2_s_then_devices_go_offline_and_come_back_by_themselves(rigs: Rigs) -> None:
    result = await scenarios.unplug(rigs)
    assert passed(result), result.failures
    assert result.counts["unplugs"] == 1 and result.counts["back_after_s"] < scenarios.UNPLUG_SECONDS + 10


async def test_unplug_on_real_adapters_without_an_operator_is_skipped_not_failed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Nothing is opened: the scenario decides before it builds a rig.
    async with Rigs(tmp_path, hardware=scenarios.Hardware("/nonexistent/usb0", "/nonexistent/usb1")) as real:
        result = await scenarios.unplug(real)
    assert result.passed and result.skipped and "operator" in result.skipped


def test_scenario_names() -> None:
    assert scenarios.parse_scenarios("all") == ["noise", "late", "unplug", "mixed"]
    assert scenarios.parse_scenarios("late, noise,late") == ["late", "noise"]
    with pytest.raises(ValueError, match="noise, late, unplug, mixed"):
        scenarios.parse_scenarios("noise,jam")
