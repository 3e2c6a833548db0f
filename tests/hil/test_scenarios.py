"""Fault scenarios through the baud-accurate line: a real ModbusBus, pymodbus slaves with known values.

Short by default (`make test`); FIELDGATE_SOAK=1 runs the `soak` ones for minutes.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING

import pytest

from hil.line import Faults

if TYPE_CHECKING:
    from .conftest import Rig

SOAK = os.environ.get("FIELDGATE_SOAK") == "1"
NOISE_SECONDS = 300.0 if SOAK else 5.0
LATE_SECONDS = 120.0 if SOAK else 5.0
MIXED_SECONDS = 300.0 if SOAK else 3.0


def registers(unit: int, count: int, *, poll: str = "20ms", first: int = 0) -> str:
    """A device's YAML: `count` uint16 holding registers from `first` (values: see known_value)."""
    points = "\n".join(
        f"            - {{name: r{a}, table: holding, address: {a}}}" for a in range(first, first + count)
    )
    return f"""        - name: d{unit}
          unit: {unit}
          poll: {poll}
          points:
{points}"""


async def back_online(rig: Rig) -> bool:
    """Whether every device is online again by its next probe (offline ones back off: 1, 2, 4 ... s)."""
    limit = max(d.backoff for d in rig.bus.devices.values()) + 3.0
    return await rig.wait_for(lambda: all(d.online for d in rig.bus.devices.values()), limit)


async def noisy_run(make_rig, faults: Faults, seconds: float) -> Rig:  # type: ignore[no-untyped-def]
    """Three devices polled through `faults` for `seconds`, then on a clean line until all are back."""
    devices = "\n".join(registers(u, 10) for u in (1, 2, 3))
    # 115200 baud carries ~6x the bytes of 19200 per second: more faults in a short run.
    rig: Rig = await make_rig(devices, faults=faults, seed=11, baudrate=115200)
    await asyncio.sleep(seconds)
    rig.line.faults = Faults()  # the noise stops
    noisy = rig.bus.stats.transactions
    online = await back_online(rig)
    # Every device answers again after the noise: polled cycles, not only a state flag.
    cycles = {name: d.stats.cycles for name, d in rig.bus.devices.items()}
    await asyncio.sleep(0.5)
    stats, line = rig.bus.stats, rig.line.stats
    print(
        f"noise {seconds:g} s: {noisy} transactions, {line.flipped_bytes} bytes flipped, {line.dropped_bytes} "
        f"dropped, {line.truncated_frames} frames truncated, {line.babble_bursts} babble bursts; "
        f"bus: {stats.crc_errors} CRC errors, {stats.timeouts} timeouts, {stats.errors} other errors"
    )
    assert rig.wrong_values() == []
    assert stats.crc_errors > 0
    assert online, {name: d.online for name, d in rig.bus.devices.items()}
    assert all(d.stats.cycles > cycles[name] for name, d in rig.bus.devices.items())
    return rig


@pytest.mark.soak
@pytest.mark.timeout(NOISE_SECONDS + 120)
async def test_line_noise_publishes_no_wrong_value_and_leaves_no_device_offline(make_rig) -> None:  # type: ignore[no-untyped-def]
    rig = await noisy_run(make_rig, Faults(flip_rate=1e-3), NOISE_SECONDS)
    assert rig.line.stats.flipped_bytes > 0


@pytest.mark.soak
@pytest.mark.timeout(MIXED_SECONDS + 120)
async def test_flips_drops_truncation_and_babble_publish_no_wrong_value(make_rig) -> None:  # type: ignore[no-untyped-def]
    faults = Faults(flip_rate=1e-3, drop_rate=1e-3, truncate_rate=0.01, babble_rate=2.0, babble_max=8)
    rig = await noisy_run(make_rig, faults, MIXED_SECONDS)
    line = rig.line.stats
    assert line.flipped_bytes and line.dropped_bytes and line.truncated_frames and line.babble_bursts


@pytest.mark.soak
@pytest.mark.timeout(LATE_SECONDS + 120)
@pytest.mark.parametrize("retries", [0, 1])
async def test_a_late_reply_is_never_decoded_as_another_devices_answer(make_rig, retries: int) -> None:  # type: ignore[no-untyped-def]
    # Unit 1 answers late now and then: after the bus's timeout (~111 ms for one register at 19200
    # 8E1) and spread over the next ~400 ms — past the one response timeout the bus lets the line
    # settle after a failure, so some late replies still arrive while the gateway waits for unit 2
    # (the unit-id check must refuse them). With a retry, the retry's own reply, queued behind a late
    # one, can land in unit 2's turn too.
    devices = "\n".join(registers(u, 1, poll="0.1ms") for u in (1, 2))
    faults = Faults(late_rate=0.5, late_delay=0.11, late_spread=0.4, late_units=frozenset({1}))
    rig = await make_rig(devices, faults=faults, seed=5, retries=retries)
    await asyncio.sleep(LATE_SECONDS)
    rig.line.faults = Faults()
    online = await back_online(rig)
    stats, line = rig.bus.stats, rig.line.stats
    print(
        f"late replies {LATE_SECONDS:g} s, retries {retries}: {line.late_replies} late of {line.frames_to_gateway} "
        f"frames, {line.late_cross_unit} after a request to unit 2; bus: {stats.transactions} transactions, "
        f"{stats.timeouts} timeouts, {stats.crc_errors} CRC errors, {stats.errors} other errors, "
        f"{sum(len(s.values) for s in rig.rec.samples)} values published"
    )
    assert rig.line.stats.late_replies > 5
    assert rig.wrong_values() == []
    if retries == 0:
        assert rig.line.stats.late_cross_unit > 0  # some did arrive while the gateway waited for unit 2
    assert online


async def test_a_late_reply_is_never_decoded_as_another_block_of_the_same_device(make_rig) -> None:  # type: ignore[no-untyped-def]
    # One device, two one-register blocks far apart (two reads per cycle), one retry. When unit 1
    # answers late, the retry's request is answered twice: first by the late reply, then by the
    # retry's own. The second arrives while the gateway waits for the next block: same unit, same
    # function, same length — only the gateway's timing can tell them apart.
    devices = registers(1, 1, poll="0.1ms") + "\n            - {name: r100, table: holding, address: 100}"
    faults = Faults(late_rate=0.2, late_delay=0.11, late_spread=0.03)
    rig = await make_rig(devices, faults=faults, seed=5, retries=1)
    await asyncio.sleep(3.0)
    stats = rig.bus.stats
    print(
        f"same device: {rig.line.stats.late_replies} late replies; {stats.transactions} transactions, "
        f"{stats.timeouts} timeouts; wrong values: {len(rig.wrong_values())} of "
        f"{sum(len(s.values) for s in rig.rec.samples)}"
    )
    assert rig.line.stats.late_replies > 3
    assert rig.wrong_values() == []


async def test_adapter_unplugged_for_2_s_then_devices_go_offline_and_come_back_by_themselves(make_rig) -> None:  # type: ignore[no-untyped-def]
    devices = "\n".join(registers(u, 2, poll="50ms") for u in (1, 2))
    rig = await make_rig(devices)
    assert await rig.wait_for(lambda: all(d.online for d in rig.bus.devices.values()), 5)
    unplugged = time.monotonic()
    rig.line.unplug(2.0)
    went = await rig.wait_for(lambda: all(d.online is False for d in rig.bus.devices.values()), 2.0)
    offline_after = time.monotonic() - unplugged
    assert went, {n: d.online for n, d in rig.bus.devices.items()}
    await asyncio.sleep(max(0.0, 2.0 - (time.monotonic() - unplugged)))
    samples = len(rig.rec.samples)
    # The bus reopens with back-off (1, 2, 4 ... s) and probes offline devices: it must find the
    # new pty behind the same path without help.
    back = await rig.wait_for(lambda: all(d.online for d in rig.bus.devices.values()), 10)
    back_after = time.monotonic() - unplugged
    print(
        f"unplugged 2 s: offline after {offline_after:.2f} s, all online again {back_after:.2f} s after the unplug "
        f"({rig.bus.stats.reopen_attempts} reopen attempts)"
    )
    assert back, {n: d.online for n, d in rig.bus.devices.items()}
    for name in rig.bus.devices:
        assert [s.online for s in rig.rec.states if s.device == name] == [True, False, True]
    await asyncio.sleep(0.3)
    assert len(rig.rec.samples) > samples  # polling again, not only flagged online
    assert rig.wrong_values() == []
