"""The primary host end to end: births wait for its STATE online; while it is absent or offline the data is
spooled, and when it comes (back) the host gets the births, then the stored data as historical DDATA in order,
each metric with its own sample time, then live data. A kill -9 while it is away loses nothing.

Real parts: Mosquitto, `fieldgate run` as a process (a simulated Modbus line on a pty, an MCP server), an MCP
device the test drives with numbered values (helpers.Sender knows which the gateway ACKed), and a paho recorder
that also publishes the host's STATE (retained, QoS 1, as a Sparkplug 3.0 host does).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sparkplug.e2e_parts import JSON_PREFIX, STATE_TOPIC, Rig, decode, rig, state, value_of
from sparkplug.sparkplug_decode import decode_independently

from gateway.types import now_ms

from helpers import Received, Sender, spool_rows, until

SPOOL = Path("state/spool/scada.sqlite")


def rows(r: Rig) -> list[tuple[str, int]]:
    """The Sparkplug sink's spool as it lies on disk (empty before the file exists)."""
    path = r.tmp / SPOOL
    return spool_rows(path) if path.exists() else []


def set_state(r: Rig, online: bool, ts: int) -> None:
    """The primary host's STATE, as the host publishes it: retained, QoS 1."""
    r.sub.client.publish(STATE_TOPIC, state(online, ts), qos=1, retain=True).wait_for_publish(5)


def node_messages(r: Rig, since: int = 0) -> list[Received]:
    """What our node published (not the commands), from index `since` of that list."""
    return r.sub.sparkplug(cmds=False)[since:]


def kind(m: Received) -> str:
    """NBIRTH, DBIRTH, DDATA..."""
    return m.topic.split("/")[2]


def device(m: Received) -> str | None:
    """The device a message is about."""
    parts = m.topic.split("/")
    return parts[4] if len(parts) > 4 else None


def pump_ns(msgs: list[Received]) -> list[tuple[int, int, bool, str]]:
    """(n, metric timestamp, is_historical, message kind) of pump-1's `n` in DBIRTH/DDATA, in publish order."""
    out: list[tuple[int, int, bool, str]] = []
    alias: int | None = None
    for m in msgs:
        if device(m) != "pump-1" or kind(m) not in ("DBIRTH", "DDATA"):
            continue
        for x in decode(m.payload).metrics:
            if kind(m) == "DBIRTH" and x.name == "n":
                alias = x.alias
            if x.name == "n" or (kind(m) == "DDATA" and x.alias == alias):
                out.append((int(value_of(x)), x.timestamp, x.is_historical, kind(m)))
    return out


def check_session(msgs: list[Received], devices: set[str]) -> dict[str | None, int]:
    """One session from its NBIRTH: the births first (an NBIRTH, then a DBIRTH of each of `devices`, before any
    data); a device's DDATA only after a DBIRTH of it (a device born later, e.g. one offline with stored data, is
    born before its data); per device, historical metrics earlier than its birth, timestamps never going back,
    then live ones no earlier than its birth. The devices' last birth timestamps (the latest metric timestamp of
    each DBIRTH)."""
    assert msgs and kind(msgs[0]) == "NBIRTH", [m.topic for m in msgs[:5]]
    first_data = next((i for i, m in enumerate(msgs) if kind(m) in ("DDATA", "NDATA")), len(msgs))
    assert all(kind(m) == "DBIRTH" for m in msgs[1:first_data]), [m.topic for m in msgs[:first_data]]
    assert {device(m) for m in msgs[1:first_data]} >= devices, [m.topic for m in msgs[:first_data]]
    born_at: dict[str | None, int] = {}
    last: dict[tuple[str | None, bool], int] = {}
    live_seen: set[str | None] = set()
    for m in msgs:
        d = device(m)
        if kind(m) == "DBIRTH":
            born_at[d] = max(x.timestamp for x in decode(m.payload).metrics)
            live_seen.discard(d)
        if kind(m) != "DDATA":
            continue
        assert d in born_at, f"a DDATA of {d} before its DBIRTH"
        for x in decode(m.payload).metrics:
            assert x.HasField("timestamp"), m.topic
            if x.is_historical:
                assert d not in live_seen, f"{d}: a historical metric after its live data"
                assert x.timestamp < born_at[d], (d, x.timestamp, born_at[d])
            else:
                live_seen.add(d)
                assert x.timestamp >= born_at[d], (d, x.timestamp, born_at[d])
            key = (d, x.is_historical)
            assert x.timestamp >= last.get(key, 0), f"{d}: metric timestamps went back in publish order"
            last[key] = x.timestamp
    return born_at


def assert_independently_decoded(msgs: list[Received]) -> list[dict[str, Any]]:
    """The independent decoder reads every message, with the same historical flags as ours."""
    theirs = decode_independently([(m.topic, m.payload) for m in msgs])
    for m, t in zip(msgs, theirs, strict=True):
        assert "error" not in t, (m.topic, t)
        ours = [x.is_historical for x in decode(m.payload).metrics]
        assert [x["is_historical"] for x in t["metrics"]] == ours, (m.topic, t)
    return theirs


async def test_births_wait_for_the_primary_host_and_its_absence_is_replayed_as_historical_data(tmp_path: Path) -> None:
    """No STATE: no birth, no data, the spool grows. Online: births, the spool as historical DDATA in order, then
    live. Offline (newer): NDEATH, a new connection (bdSeq + 1), nothing published, data spooled. A STATE older than
    the last seen changes nothing. Online again: births with the new bdSeq, the absence as historical, live."""
    async with rig(tmp_path, primary_host="scada-main") as r, r.pump() as client:
        sender = Sender(client, depth=1)
        # Absent host: the node connects but says nothing; the data waits in the spool.
        await sender.burst(5)
        await until(lambda: sum(1 for t, _ in rows(r) if t.startswith("meter/")) >= 3, 30, "meter data spooled")
        await until(lambda: any(t.startswith("pump-1/") for t, _ in rows(r)), 10, "pump-1 data spooled")
        await r.gw.logged("sink scada: connected to")
        assert node_messages(r) == [], [m.topic for m in node_messages(r)]
        spooled = len(rows(r))

        t1 = now_ms()
        set_state(r, True, t1)
        await r.sub.wait_for(lambda _: any(kind(m) == "DDATA" and device(m) == "meter" for m in node_messages(r)), 30)
        await sender.send()  # n = 6, once the births are out: live
        await until(lambda: 6 in [n for n, _, hist, _ in pump_ns(node_messages(r)) if not hist], 30, "n = 6 live")
        first = node_messages(r)
        born = check_session(first, {"boiler", "meter", "pump-1"})
        history = [(n, ts) for n, ts, hist, k in pump_ns(first) if hist]
        in_birth = [n for n, _, _, k in pump_ns(first) if k == "DBIRTH"]
        assert [n for n, _ in history] + in_birth[:1] == [1, 2, 3, 4, 5], (history, in_birth)
        assert [ts for _, ts in history] == sender.sent[:4], "each historical metric keeps its own sample time"
        assert any(x[2] for x in pump_ns(first)) and spooled > 0
        meter_hist = [
            x for m in first if device(m) == "meter" and kind(m) == "DDATA" for x in decode(m.payload).metrics
        ]
        assert any(x.is_historical for x in meter_hist), "the spooled meter counts came as historical DDATA"
        nbirth_bdseq = _bdseq(first[0])

        # Offline, newer: NDEATH (this session's bdSeq), a new connection, and silence; the data is spooled.
        mark = len(node_messages(r))
        t2 = now_ms() + 1
        set_state(r, False, t2)
        await r.sub.wait_for(lambda _: any(kind(m) == "NDEATH" for m in node_messages(r, mark)), 20)
        [ndeath] = [m for m in node_messages(r, mark) if kind(m) == "NDEATH"]
        assert _bdseq(ndeath) == nbirth_bdseq
        await r.gw.logged("primary host scada-main is offline")
        await sender.burst(5)  # n = 7..11 (6 went live above)
        before = len(rows(r))
        await until(lambda: len(rows(r)) >= before + 3, 30, "the spool to grow while the host is offline")

        # A STATE older than the last one seen (a stale copy) is no reason to birth. Sent once the new connection
        # has taken the retained offline (a STATE's time counts within one connection).
        offline_said = "primary host scada-main is offline"
        await until(lambda: r.gw.output().count(offline_said) >= 2, 30, "the new connection to read the STATE")
        set_state(r, True, t1 - 1)
        grown = len(rows(r))
        await until(lambda: len(rows(r)) >= grown + 3, 30, "the spool to grow after the stale STATE")
        silent = node_messages(r, mark)
        assert [kind(m) for m in silent] == ["NDEATH"], [m.topic for m in silent]
        assert_independently_decoded(node_messages(r)[:mark] + silent)
        assert r.gw.output().count("sink scada: connected to") == 2, "the NDEATH's disconnect, then a new connection"

        # Online again: the next session's births (bdSeq + 1), the offline time as historical, then live.
        set_state(r, True, now_ms() + 2)
        await r.sub.wait_for(lambda _: any(kind(m) == "NBIRTH" for m in node_messages(r, mark + 1)), 30)
        await sender.send()  # n = 12, live
        want = {n for n in sender.acked.values() if n > 6}  # 1..6 went out in the first session
        assert want == set(range(7, 13)), sender.acked
        await until(lambda: want <= {n for n, *_ in pump_ns(node_messages(r, mark + 1))}, 30, "n = 7..12")
        await r.sub.wait_for(
            lambda _: any(
                kind(m) == "DDATA" and device(m) == "meter" and not decode(m.payload).metrics[0].is_historical
                for m in node_messages(r, mark + 1)
            ),
            30,
        )
        second = node_messages(r, mark + 1)
        check_session(second, {"boiler", "meter", "pump-1"})
        assert _bdseq(second[0]) == nbirth_bdseq + 1
        again = pump_ns(second)
        hist = [n for n, _, h, _ in again if h]
        assert hist == sorted(hist) and set(range(7, 11)) <= set(hist), again
        assert born  # the first session's births were checked above

        # Online, then an offline STATE older than the last seen: a stale copy, no NDEATH, no new connection.
        set_state(r, False, t2)
        since = len(node_messages(r))
        await r.sub.wait_for(lambda _: len([m for m in node_messages(r, since) if device(m) == "meter"]) >= 3, 30)
        assert not [m for m in node_messages(r, mark + 1) if kind(m) in ("NDEATH", "NBIRTH")][1:]
        assert r.gw.output().count("sink scada: connected to") == 2
        assert_independently_decoded(node_messages(r))


def _bdseq(m: Received) -> int:
    """The bdSeq metric of an NBIRTH or NDEATH."""
    return next(int(value_of(x)) for x in decode(m.payload).metrics if x.name == "bdSeq")


async def test_a_kill_9_while_the_primary_host_is_away_loses_no_acked_value(tmp_path: Path) -> None:
    """Store and forward is at least once: every value the gateway ACKed to the MCP device while the host was away,
    across a kill -9 and a restart, reaches the host once it is online (historical or live), in order, no gap."""
    async with rig(tmp_path, primary_host="scada-main") as r:
        async with r.pump() as client:
            sender = Sender(client, interval=0.02, depth=4)
            sender.start()
            await until(lambda: sum(1 for t, _ in rows(r) if t.startswith("pump-1/")) >= 20, 30, "pump-1 spooled")
            r.kill9()
            killed = time.monotonic()  # what the JSON sink publishes from now on is the restarted gateway's
            acked_before = len(sender.acked)
            r.start_gateway()
            await until(lambda: r.gw.output().count("fieldgate t1 up") == 2, 60, "the gateway up again")
            await until(lambda: len(sender.acked) >= acked_before + 20, 30, "ACKs from the restarted gateway")
            # The Modbus devices polled again (the JSON sink says so) before the host comes: a device without
            # values at its birth is another test's case (below).
            for name in ("boiler", "meter"):
                await r.sub.next_on(f"{JSON_PREFIX}/{name}/telemetry", 30, after=killed)
            await sender.stop()
        assert not sender.nacked, sender.nacked
        acked = sorted(sender.acked.values())
        assert [kind(m) for m in node_messages(r)] in ([], ["NDEATH"]), "nothing but the will before the host"

        set_state(r, True, now_ms())
        await until(lambda: set(acked) <= {n for n, *_ in pump_ns(node_messages(r))}, 30, "every ACKed value")
        msgs = node_messages(r)
        # pump-1 is offline by now (its client stopped): it is born when its stored data goes out.
        born = check_session([m for m in msgs if kind(m) != "NDEATH"], {"boiler", "meter"})
        seen = pump_ns(msgs)
        ns = [n for n, *_ in seen]
        data = [n for n, _, _, k in seen if k == "DDATA"]  # a DBIRTH carries the latest value, ahead of the rest
        assert data == sorted(data), "the stored values in the order they were sampled"
        missing = set(acked) - set(ns)
        assert not missing, f"lost {len(missing)} ACKed values: {sorted(missing)[:20]}"
        assert all(h for n, ts, h, k in seen if k == "DDATA" and ts < born["pump-1"])
        dupes = len(ns) - len(set(ns))
        print(f"kill -9 store-and-forward: {len(acked)} ACKed, {len(set(ns))} delivered, {dupes} duplicates")
        assert_independently_decoded([m for m in msgs if kind(m) != "NDEATH"])


async def test_stored_data_of_a_device_silent_after_a_restart_goes_out_as_historical(tmp_path: Path) -> None:
    """Values spooled before a kill -9, of a device that no longer answers after the restart, reach the host as
    historical DDATA (sampled long before the session's births), after a DBIRTH of that device, never as live."""
    async with rig(tmp_path, primary_host="scada-main") as r:
        await until(lambda: sum(1 for t, _ in rows(r) if t.startswith("boiler/")) >= 1, 30, "boiler data spooled")
        spooled_ts = min(ts for t, ts in rows(r) if t == "boiler/telemetry")
        r.kill9()
        r.rewrite(boiler_dead=True)
        r.start_gateway()
        await until(lambda: r.gw.output().count("fieldgate t1 up") == 2, 60, "the gateway up again")
        await r.gw.logged("boiler (unit 1 on field) is offline", timeout=30)
        set_state(r, True, now_ms())
        await r.sub.wait_for(lambda _: any(kind(m) == "DDATA" and device(m) == "boiler" for m in node_messages(r)), 30)
        msgs = [m for m in node_messages(r) if kind(m) != "NDEATH"]
        boiler = [(kind(m), decode(m.payload)) for m in msgs if device(m) == "boiler"]
        data = [x for k, p in boiler if k == "DDATA" for x in p.metrics]
        assert any(x.timestamp == spooled_ts for x in data), (spooled_ts, data)
        assert all(x.is_historical for x in data if x.timestamp == spooled_ts), data
        check_session(msgs, {"meter"})


async def test_a_flapping_host_leaves_one_consistent_session_and_loses_nothing(tmp_path: Path) -> None:
    """100 STATE online/offline flips in a burst (each newer), ending online: the gateway stays up, ends in one
    born session whose NBIRTH's bdSeq is the one its will (an NDEATH after kill -9) carries, and every value the
    MCP device had ACKed during the flapping reaches the host."""
    async with rig(tmp_path, primary_host="scada-main") as r:
        async with r.pump() as client:
            sender = Sender(client, interval=0.02, depth=4)
            set_state(r, True, now_ms())
            await r.sub.wait_for(lambda _: any(kind(m) == "NBIRTH" for m in node_messages(r)), 30)
            sender.start()
            base = now_ms()
            for i in range(100):
                r.sub.client.publish(STATE_TOPIC, state(i % 2 == 1, base + 1 + i), qos=1, retain=True)
            await until(lambda: len(sender.acked) >= 60, 30, "ACKs during and after the flapping")
            await sender.stop()
        acked = set(sender.acked.values())
        await until(lambda: acked <= {n for n, *_ in pump_ns(node_messages(r))}, 30, "every ACKed value")
        assert r.gw.proc.poll() is None
        msgs = node_messages(r)
        births = [m for m in msgs if kind(m) == "NBIRTH"]
        deaths = [m for m in msgs if kind(m) == "NDEATH"]
        print(f"flapping host: 100 STATEs -> {len(births)} NBIRTH, {len(deaths)} NDEATH, {len(acked)} values ACKed")
        last_birth = _bdseq(births[-1])
        # The last session is whole: from its NBIRTH on, births, then data (historical first) in order.
        tail = msgs[msgs.index(births[-1]) :]
        assert not [m for m in tail if kind(m) == "NDEATH"], "the host ended online: no death after the last birth"
        check_session(tail, {"boiler", "meter"})
        r.kill9()
        await r.sub.wait_for(lambda _: len([m for m in node_messages(r) if kind(m) == "NDEATH"]) > len(deaths), 30)
        will = [m for m in node_messages(r) if kind(m) == "NDEATH"][-1]
        assert _bdseq(will) == last_birth, (_bdseq(will), last_birth)
        assert_independently_decoded([m for m in msgs if kind(m) != "NDEATH"])
