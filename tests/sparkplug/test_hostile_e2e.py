"""A Sparkplug host is a peer on the network: what the largest, oddest and most repeated STATE, NCMD and DCMD do to
`fieldgate run` (a real process behind a real Mosquitto). The gateway stays up, the other devices' data keeps
flowing in an unbroken `seq`, memory stays bounded, and the sink's counters count what it refused.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

from sparkplug.e2e_parts import JSON_PREFIX, STATE_TOPIC, Rig, decode, rig, state, topic

from bridge.sparkplug.sparkplug_b_pb2 import Payload
from gateway.types import now_ms

from helpers import Received

METRICS_TOPIC = f"{JSON_PREFIX}/metrics"


def rss_kib(r: Rig) -> int:
    """The gateway process' resident memory (KiB)."""
    for line in Path(f"/proc/{r.gw.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def sink_counters(r: Rig, after: float) -> dict[str, Any]:
    """The scada sink's counters from the first P/metrics published after monotonic time `after` (every 10 s)."""
    m = await r.sub.next_on(METRICS_TOPIC, 30, after=after)
    body = json.loads(m.payload)
    return dict(body["sinks"]["scada"])


async def counters_reaching(r: Rig, key: str, at_least: int, timeout: float = 40.0) -> dict[str, Any]:
    """The scada sink's counters once P/metrics shows `key` >= `at_least` (the flood may still be read)."""
    deadline = time.monotonic() + timeout
    since = time.monotonic()
    while True:
        counters = await sink_counters(r, since)
        if counters[key] >= at_least:
            return counters
        assert time.monotonic() < deadline, f"{key} stayed at {counters[key]} (< {at_least}): {counters}"
        since = time.monotonic()


def garbage(rng: random.Random, size: int) -> bytes:
    """Bytes no protobuf parser takes: field number 0 is invalid, whatever follows."""
    return b"\x07" + rng.randbytes(size)


def many_metrics(n: int) -> bytes:
    """A well-formed DCMD/NCMD payload with `n` metrics (setpoint by name)."""
    p = Payload(timestamp=now_ms())
    for i in range(n):
        p.metrics.add(name="setpoint", double_value=10.0 + i % 50)
    return p.SerializeToString()


def node_stream(r: Rig) -> list[Received]:
    """What our node published (no commands), in arrival order."""
    return r.sub.sparkplug(cmds=False)


def assert_seq_unbroken(msgs: list[Received]) -> int:
    """From the first NBIRTH on, every message's seq is the previous + 1 (mod 256), an NBIRTH's 0; the count."""
    start = next(i for i, m in enumerate(msgs) if m.topic.split("/")[2] == "NBIRTH")
    prev = None
    checked = 0
    for m in msgs[start:]:
        kind = m.topic.split("/")[2]
        if kind == "NDEATH":
            continue
        seq = decode(m.payload).seq
        if kind == "NBIRTH":
            assert seq == 0, m.topic
        else:
            assert prev is not None and seq == (prev + 1) % 256, (m.topic, prev, seq)
        prev = seq
        checked += 1
    return checked


async def meter_flows(r: Rig, after: float, count: int = 2) -> None:
    """`count` DDATA of the meter (the device nobody attacks) arrive after monotonic time `after`."""
    await r.sub.wait_for(lambda _: len([m for m in r.sub.sparkplug("DDATA", "meter") if m.at > after]) >= count, 30)


async def test_a_flood_of_garbage_commands_is_counted_and_changes_nothing(tmp_path: Path) -> None:
    """Undecodable DCMD/NCMD payloads, ones over 64 KiB, ones with 1000 metrics, random bytes: each refused unread
    and counted in bad_commands, nothing written or audited, the gateway up, the meter's data flowing with seq
    unbroken, and a second identical flood does not grow the gateway's memory as the first may have."""
    rng = random.Random(15)
    async with rig(tmp_path) as r:
        await r.sub.wait_for(lambda _: r.sub.sparkplug("DBIRTH", "meter"), 30)
        dcmd, ncmd = topic("DCMD", "boiler"), topic("NCMD")
        before = rss_kib(r)

        def flood() -> None:
            """1000 payloads no reader takes, at QoS 1 (each one reaches the gateway)."""
            for i in range(920):
                where = (dcmd, ncmd, topic("DCMD", "nosuch"))[i % 3]
                r.sub.publish_raw(where, garbage(rng, rng.randrange(0, 2048)), qos=1)
            for i in range(40):
                r.sub.publish_raw((dcmd, ncmd)[i % 2], garbage(rng, 64 * 1024 + 1), qos=1)
            big = many_metrics(1000)
            for i in range(40):
                r.sub.publish_raw((dcmd, ncmd)[i % 2], big, qos=1)

        # The node logs its count of refusals at the first and every 1000th: each flood is seen through.
        flood()
        await r.gw.logged("(1000 so far)", timeout=60)
        after_first = rss_kib(r)
        flood()
        await r.gw.logged("(2000 so far)", timeout=60)
        after_second = rss_kib(r)
        for _ in range(300):  # random bytes: some may even parse (and be refused further on as writes)
            r.sub.publish_raw(dcmd, rng.randbytes(rng.randrange(1, 256)), qos=1)
        counters = await counters_reaching(r, "bad_commands", 2000)
        print(
            f"garbage flood: bad_commands {counters['bad_commands']} after 2000 + 300 random; "
            f"RSS {before} KiB -> {after_first} KiB -> {after_second} KiB"
        )
        assert counters["bad_commands"] <= 2300, counters
        assert after_second - after_first < 16 * 1024, (before, after_first, after_second)
        assert r.gw.proc.poll() is None

        since = time.monotonic()
        await meter_flows(r, since)
        assert_seq_unbroken(node_stream(r))
        # Nothing of the flood reached a device: only refusals of the random bytes that parsed could be audited.
        assert not [x for x in r.audit() if x["ok"] is True], r.audit()[:3]
        setpoints = {round(x.double_value, 3) for x, _ in r.sub.values("boiler", "setpoint")}
        assert setpoints == {45.0}, setpoints


async def test_rebirth_spam_costs_one_rebirth_a_second_and_data_keeps_flowing(tmp_path: Path) -> None:
    """1000 NCMD rebirth requests: each counted, answered by at most one rebirth a second (not 1000 x (1 + devices)
    messages), at least one; each NBIRTH followed by the whole set of DBIRTHs in an unbroken seq; the gateway stays
    up and the meter's data flows after the spam."""
    async with rig(tmp_path) as r:
        await r.sub.wait_for(lambda _: r.sub.sparkplug("DBIRTH", "meter"), 30)
        births_before = len(r.sub.sparkplug("NBIRTH"))
        rebirth = Payload(timestamp=now_ms())
        rebirth.metrics.add(name="Node Control/Rebirth", boolean_value=True)
        body = rebirth.SerializeToString()
        out_before = len(node_stream(r))
        started = time.monotonic()
        for _ in range(1000):
            r.sub.publish_raw(topic("NCMD"), body, qos=0)
        counters = await counters_reaching(r, "rebirth_requests", 1000)
        spam_s = time.monotonic() - started  # an upper bound of how long the requests kept coming
        assert counters["rebirth_requests"] == 1000, counters
        await meter_flows(r, time.monotonic())
        births = len(r.sub.sparkplug("NBIRTH")) - births_before
        sent = len(node_stream(r)) - out_before
        print(f"rebirth spam: 1000 NCMD -> {births} NBIRTH, {sent} messages out, RSS {rss_kib(r)} KiB")
        assert 1 <= births <= 2 + spam_s, (births, spam_s)
        assert r.gw.proc.poll() is None
        msgs = node_stream(r)
        assert_seq_unbroken(msgs)
        kinds = [m.topic.split("/")[2] + "/" + (m.topic.split("/")[4] if m.topic.count("/") > 3 else "") for m in msgs]
        for i, k in enumerate(kinds[out_before:], out_before):
            if k.startswith("NBIRTH"):
                assert set(kinds[i + 1 : i + 3]) == {"DBIRTH/boiler", "DBIRTH/meter"}, kinds[i : i + 4]


async def test_garbage_and_absurd_state_is_refused_and_counted(tmp_path: Path) -> None:
    """STATE payloads that are not one (random bytes, oversized, wrong types, negative or out-of-range timestamps)
    are refused and counted: no birth on any of them, nor a death once a real STATE online made the births."""
    rng = random.Random(16)
    bad = [
        rng.randbytes(40),
        b"{" * 5000,
        json.dumps({"online": True, "timestamp": "now"}).encode(),
        json.dumps({"online": "yes", "timestamp": 1}).encode(),
        json.dumps({"online": True, "timestamp": -1}).encode(),
        json.dumps({"online": True, "timestamp": 2**63}).encode(),
        b'{"online": true, "timestamp": 1e30}',
        json.dumps([True, 1]).encode(),
        b"\xff\xfe\x00",
        b"",
    ]
    async with rig(tmp_path, primary_host="scada-main") as r:
        await r.gw.logged("sink scada: connected to")
        since = time.monotonic()
        for payload in bad:
            r.sub.publish_raw(STATE_TOPIC, payload, qos=1)
        # A marker behind them on the same connection (a write to no device, audited): they were all read by then.
        marker = Payload(timestamp=now_ms())
        marker.metrics.add(name="x", double_value=7.0)
        r.sub.publish_raw(topic("DCMD", "nosuch"), marker.SerializeToString(), qos=1)
        await r.sub.wait_for(lambda _: [x for x in r.audit() if x["device"] == "nosuch"], 20)
        assert node_stream(r) == [], [m.topic for m in node_stream(r)]

        r.sub.publish_raw(STATE_TOPIC, state(True, now_ms()), qos=1, retain=True)
        await meter_flows(r, since, 1)
        for payload in bad:
            r.sub.publish_raw(STATE_TOPIC, payload.replace(b"true", b"false"), qos=1)
        counters = await counters_reaching(r, "bad_commands", 2 * len(bad))
        assert counters["bad_commands"] == 2 * len(bad) and counters["births"] == 1, counters
        since = time.monotonic()
        await meter_flows(r, since)
        assert [m for m in node_stream(r) if m.topic.split("/")[2] in ("NDEATH", "NBIRTH")][1:] == []
        assert r.gw.output().count("sink scada: connected to") == 1
        assert r.gw.proc.poll() is None


async def test_a_state_dated_far_ahead_does_not_silence_the_real_hosts_offline(tmp_path: Path) -> None:
    """After a STATE online dated in the year 2500, the real host's STATE offline (dated now) still makes the node
    publish an NDEATH and spool."""
    async with rig(tmp_path, primary_host="scada-main") as r:
        await r.gw.logged("sink scada: connected to")
        r.sub.publish_raw(STATE_TOPIC, state(True, 16725225600000), qos=1, retain=True)  # 2500-01-01
        await r.sub.wait_for(lambda _: r.sub.sparkplug("DBIRTH", "meter"), 30)
        r.sub.publish_raw(STATE_TOPIC, state(False, now_ms()), qos=1, retain=True)
        await r.sub.wait_for(lambda _: r.sub.sparkplug("NDEATH"), 8)


async def test_a_flood_of_huge_refused_writes_does_not_rotate_earlier_audit_records_away(tmp_path: Path) -> None:
    """A legitimate write's audit record survives 200 refused DCMD writes carrying 60 KiB strings (the audit log
    keeps its last 6 MiB; what a host can make each refused request write there must be bounded)."""
    async with rig(tmp_path) as r:
        await r.sub.wait_for(lambda _: r.sub.sparkplug("DBIRTH", "boiler"), 30)
        dcmd = topic("DCMD", "boiler")
        legit = Payload(timestamp=now_ms())
        legit.metrics.add(name="setpoint", double_value=44.5)
        r.sub.publish_raw(dcmd, legit.SerializeToString(), qos=1)
        await r.sub.wait_for(lambda _: [x for x in r.audit() if x["value"] == 44.5 and x["ok"]], 20)
        huge = Payload(timestamp=now_ms())
        huge.metrics.add(name="setpoint", string_value="x" * 60_000)
        body = huge.SerializeToString()
        for _ in range(200):
            r.sub.publish_raw(dcmd, body, qos=1)
            await asyncio.sleep(0.02)
        await r.gw.logged("set boiler.setpoint = b'\"xxxx", timeout=20)
        await asyncio.sleep(1)
        logs = sorted(r.state_dir.glob("audit.log*"))
        size = sum(p.stat().st_size for p in logs)
        records = [json.loads(line) for p in logs for line in p.read_text().splitlines() if line.strip()]
        print(f"audit flood: {len(logs)} files, {size // 1024} KiB, {len(records)} records")
        assert any(x["value"] == 44.5 and x["ok"] for x in records), "the legitimate write's record was rotated away"
