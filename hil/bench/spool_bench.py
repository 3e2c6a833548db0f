"""Benchmark of the SQLite spool (bridge/spool.py): write rate, FIFO drain rate, fsyncs and bytes at steady load.

Figures (200-byte payloads, topic "devNN/telemetry"):
1. Write rate: add() flat out with batches of 1 ... 1,000 messages (one committed transaction per
   add, synchronous=FULL), against its reference measured in the same run: bare sqlite3
   `executemany` of the same rows in the same transaction sizes, into a file the spool made (the
   same table and INSERT), journal_mode=WAL, synchronous=FULL. Goal: ratio >= 0.8 at every size.
   msg/s, CPU, fsyncs and bytes written per 1,000 messages.
2. FIFO drain: 100,000 messages stored, then take(n) + accept(ids) until empty. msg/s.
3. Steady load: 500 msg/s arriving, grouped into one add() per group-commit window (50 ms = 25
   messages, 100, 120 and 200 ms). fsyncs/s and bytes written per 1,000 messages, add() latency.
4. Through the outbox: 500 msg/s handed to `Outbox.put` (one task per message, each awaiting
   it) with an `MqttSink` pointed at a closed port, so that everything goes to the spool through
   the outbox's own group commit (commit_window 120 ms, as shipped, and 50 ms). fsyncs/s, bytes
   per 1,000 messages, publish -> commit latency, CPU per message of the whole process.
5. Replay into Mosquitto: N messages stored in a spool file, then an Outbox whose sink connects to
   a real mosquitto (started by the bench) replays them, unthrottled (replay_rate 1e9) and at the
   default 500 msg/s; a paho subscriber (QoS 1) in a process of its own counts the arrivals and
   checks their order. msg/s from first to last arrival and until the spool is empty, CPU per
   message of the outbox's process and core shares of the three processes. The reference, in the
   same run and into the same mosquitto: a bare paho publisher sending the same messages (QoS 1,
   the same in-flight window). Goal: unthrottled replay >= 0.8 of it. When the goal is missed,
   one more run with cProfile on the outbox's event loop says where the time goes.

Every figure runs in a child process of its own on a fresh spool file, so /proc/self/io and the
fsync count belong to it alone. The fsyncs of figures 3 and 4, and their goal (<= 10 fsync/s),
are counted by the kernel's side: the child runs under `strace -f -ttt -y -e trace=fsync,fdatasync`
and the calls on the spool's files (database, -wal, -journal, directory) within the measured
window are counted. The spool's own counter (a model of what SQLite does, bridge/spool_io.py) is
printed beside it with the two counts; it cannot be the figure, since it would go on counting if
SQLite stopped syncing. Without strace (or with --no-strace) the fsync figure is recorded as not
measured. `bytes (spool)` is what SQLite wrote (WAL appends + checkpoint copies); `bytes (kernel)`
is /proc/self/io write_bytes, the page cache the process dirtied for storage (filesystem journal
and flash wear come on top).

Run from the repository root:  .venv/bin/python hil/bench/spool_bench.py [--dir DIR] [--quick] [--figures 4,5]
Put DIR on the filesystem the state dir will live on: on tmpfs an fsync costs nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import inspect
import json
import logging
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

# benchlib first: it puts the repository on sys.path for the imports below.
from benchlib import (
    cpu_seconds,
    free_port,
    heading,
    note,
    package_version,
    percentile,
    print_header,
    print_table,
    record,
    run_summary,
    subscribe,
)
from benchlib.children import Child
from benchlib.mqtt import Mosquitto
from benchlib.procs import run_fresh, thread_cpu
from benchlib.profiling import self_time_per_message

from bridge.buffer import entry_size
from bridge.outbox import Outbox
from bridge.outbox_limits import REPLAY_BATCH
from bridge.sink import MqttSink
from bridge.spool import SQLiteSpool
from bridge.spool_schema import INSERT
from gateway.types import Message

PAYLOAD = 200
RATE = 500  # msg/s of the steady figure
WINDOWS = (0.05, 0.1, 0.12, 0.2)  # group-commit windows of the steady figure, seconds
WRITE_BATCHES = (1, 10, 25, 100, 1000)
DRAIN_BATCHES = (100, 1000)
DRAIN_FILL = 100_000
GOAL_WRITE = 0.8  # the spool's add() rate over bare sqlite3 executemany of the same rows, same transactions
WRITE_ROUNDS = 2  # each write-rate pair (spool, bare) runs this often, alternating which goes first; best kept
REPLAY_ROUNDS = 2  # the same for the unthrottled replay and its bare paho publisher
GOAL_FSYNC = 10.0  # fsync/s at steady load, counted by strace
BIG = 10**12  # max_size and the like: the bench measures writes, not limits
PREFIX = "fieldgate/bench"  # the sink's topic prefix in figures 4 and 5
OUTBOX_WINDOWS = (0.12, 0.05)  # commit_window of figure 4: the Outbox's default, then a shorter one
REPLAY_N = 50_000  # messages replayed unthrottled in figure 5
THROTTLED_N = 2_000  # ... and at the default replay_rate
FILL_BATCH = 1_000  # messages per add() when figure 5's spool is filled
UNTHROTTLED = 1e9  # replay_rate: no throttle
GOAL_REPLAY = 0.8  # unthrottled replay over a bare paho publisher (same QoS, payloads, in-flight window)
#: Messages a replay has in flight at most: a batch of REPLAY_BATCH, published through the sink's paho client,
#: which holds up to its max_inflight unacknowledged. The bare publisher of figure 5 gets the same window.
REPLAY_INFLIGHT = min(REPLAY_BATCH, inspect.signature(MqttSink).parameters["max_inflight"].default)
_OUTBOX_DEFAULTS = inspect.signature(Outbox).parameters
DEFAULT_COMMIT_WINDOW: float = _OUTBOX_DEFAULTS["commit_window"].default
DEFAULT_REPLAY_RATE: float = _OUTBOX_DEFAULTS["replay_rate"].default


def messages(n: int, start: int = 0) -> list[tuple[Message, int]]:
    """n (message, sampled_ms) pairs with 200-byte payloads."""
    now_ms = int(time.time() * 1000)
    return [(Message(f"dev{i % 50:02d}/telemetry", os.urandom(PAYLOAD)), now_ms + i) for i in range(start, start + n)]


def write_bytes() -> int:
    """Bytes this process has caused to be written to storage so far (/proc/self/io)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


class CheckpointCounter:
    """Counts the spool's checkpoints from outside, by the WAL header's checkpoint sequence number.

    A checkpoint on the write path restarts the WAL in place (the file keeps its size), a truncating
    one empties it; either way the next commit writes a header with the number one up. The spool
    checkpoints at most once per add, so polling after every add (or a few times a second) sees
    every one, each at the commit after it.
    """

    def __init__(self, path: Path) -> None:
        self.wal = Path(f"{path}-wal")
        self.last = self._sequence()
        self.count = 0

    def poll(self) -> None:
        sequence = self._sequence()
        if sequence is None:
            return  # no header yet: emptied by a checkpoint, the next commit writes one
        if self.last is not None and sequence != self.last:
            self.count += 1
        self.last = sequence

    def _sequence(self) -> int | None:
        try:
            with self.wal.open("rb") as f:
                header = f.read(16)
        except FileNotFoundError:
            return None
        return int.from_bytes(header[12:16], "big") if len(header) == 16 else None


def open_spool(path: Path) -> SQLiteSpool:
    return SQLiteSpool(path, max_size=BIG, max_age=1e9, min_free_bytes=0)


# --- the phases, each run in a child process ----------------------------------------------------


def phase_write(path: Path, batch: int, seconds: float) -> dict[str, Any]:
    """Figure 1: add() flat out with `batch` messages per call."""
    spool = open_spool(path)
    items = messages(batch)
    base, io0, cpu0 = spool.stats(), write_bytes(), time.process_time()
    opened_at = time.time()
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < seconds:
        spool.add(items)
        n += batch
    wall = time.perf_counter() - t0
    end = spool.stats()
    result = {
        "window": (opened_at, time.time()),
        "seconds": wall,
        "msgs": n,
        "rate": n / wall,
        "cpu_us": (time.process_time() - cpu0) / n * 1e6,
        "fsyncs": end.fsyncs - base.fsyncs,
        "bytes": end.bytes_written - base.bytes_written,
        "kernel_bytes": write_bytes() - io0,
        "stored": end.bytes,
    }
    spool.close()
    result["fsyncs_process"] = spool.stats().fsyncs
    return result


def phase_bare_write(path: Path, batch: int, seconds: float) -> dict[str, Any]:
    """Figure 1's reference: the rows add() would store, `batch` per transaction, through bare sqlite3 executemany.

    The same file (made by the spool, so the same table), the same INSERT, journal_mode=WAL and
    synchronous=FULL; SQLite's own checkpointing. Only the ids are made per transaction, as any writer must.
    """
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    now = time.time()
    fixed = [(m.topic, m.payload, int(m.retain), m.qos, ts, now, entry_size(m)) for m, ts in messages(batch)]
    next_id = (db.execute("SELECT MAX(id) FROM messages").fetchone()[0] or 0) + 1
    cpu0 = time.process_time()
    opened_at = time.time()
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < seconds:
        db.execute("BEGIN IMMEDIATE")
        db.executemany(INSERT, [(next_id + i, *row) for i, row in enumerate(fixed)])
        db.execute("COMMIT")
        next_id += batch
        n += batch
    wall = time.perf_counter() - t0
    result = {
        "window": (opened_at, time.time()),
        "seconds": wall,
        "msgs": n,
        "rate": n / wall,
        "cpu_us": (time.process_time() - cpu0) / n * 1e6,
    }
    db.close()
    return result


def phase_drain(path: Path, batch: int) -> dict[str, Any]:
    """Figure 2: take(batch) + accept until the spool is empty."""
    spool = open_spool(path)
    for start in range(0, DRAIN_FILL, 1000):
        spool.add(messages(1000, start))
    base, io0 = spool.stats(), write_bytes()
    t0 = time.perf_counter()
    n = 0
    while entries := spool.take(batch):
        spool.accept([e.id for e in entries])
        n += len(entries)
    wall = time.perf_counter() - t0
    end = spool.stats()
    spool.close()
    return {
        "msgs": n,
        "rate": n / wall,
        "commits": end.commits - base.commits,
        "fsyncs": end.fsyncs - base.fsyncs,
        "bytes": end.bytes_written - base.bytes_written,
        "kernel_bytes": write_bytes() - io0,
        "seconds": wall,
    }


def phase_steady(path: Path, window: float, seconds: float) -> dict[str, Any]:
    """Figure 3: RATE msg/s arriving, one add() per window."""
    spool = open_spool(path)
    batch = round(RATE * window)
    items = messages(batch)
    latencies: list[float] = []
    base, io0 = spool.stats(), write_bytes()
    opened_at = time.time()  # wall clock, as strace -ttt: the window in which the kernel's fsyncs are counted
    checkpoints = CheckpointCounter(path)
    t0 = time.perf_counter()
    k = 0
    while (k + 1) * window <= seconds:
        k += 1
        delay = t0 + k * window - time.perf_counter()  # the window closes, its messages are added
        if delay > 0:
            time.sleep(delay)
        a = time.perf_counter()
        spool.add(items)
        latencies.append(time.perf_counter() - a)
        checkpoints.poll()
    wall = time.perf_counter() - t0
    end = spool.stats()
    closed_at = time.time()
    spool.close()
    closed = spool.stats()  # the close's checkpoint included: what strace sees for the whole process
    latencies.sort()
    return {
        "window": (opened_at, closed_at),
        "msgs": k * batch,
        "rate": k * batch / wall,
        "seconds": wall,
        "commits": end.commits - base.commits,
        "fsyncs": end.fsyncs - base.fsyncs,
        "fsyncs_process": closed.fsyncs,
        "checkpoints": checkpoints.count,
        "bytes": end.bytes_written - base.bytes_written,
        "kernel_bytes": write_bytes() - io0,
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
    }


def thread_split(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU per role between two thread_cpu() readings: the event loop, the spool's worker, the rest."""
    split = {"loop": 0.0, "spool": 0.0, "other": 0.0}
    for name, cpu in after.items():
        used = cpu - before.get(name, 0.0)
        role = "loop" if name == "MainThread" else "spool" if name.startswith("spool-") else "other"
        split[role] += used
    return split


async def _outbox_steady(path: Path, commit_window: float, seconds: float, warmup: float) -> dict[str, Any]:
    spool = open_spool(path)
    # Nobody listens there: the sink never connects, so the outbox spools everything.
    sink = MqttSink("bench", f"mqtt://127.0.0.1:{free_port()}", PREFIX, client_id=f"spool-bench-{os.getpid()}")
    box = Outbox(sink, spool, commit_window=commit_window)
    await box.start()
    await sink.start()
    latencies: list[float] = []
    tasks: set[asyncio.Task[None]] = set()
    measuring = False

    async def one(message: Message) -> None:
        timed = measuring
        t = time.perf_counter()
        await box.put(message, awaited=True)
        if timed:
            latencies.append(time.perf_counter() - t)

    items = messages(RATE)
    t0 = time.monotonic()
    sent = 0
    base: dict[str, Any] = {}
    checkpoints = CheckpointCounter(path)
    polled = t0
    while True:
        now = time.monotonic()
        if now - polled >= 0.1:
            checkpoints.poll()
            polled = now
        if not measuring and now - t0 >= warmup:
            measuring = True
            checkpoints = CheckpointCounter(path)
            st = await asyncio.to_thread(spool.stats)
            base = {
                "wall": time.time(),
                "at": time.monotonic(),
                "sent": sent,
                "stats": st,
                "io": write_bytes(),
                "cpu": time.process_time(),
                "threads": thread_cpu(),
            }
        if now - t0 >= warmup + seconds:
            break
        due = int((now - t0) * RATE)
        while sent < due:
            message, ts = items[sent % RATE]
            task = asyncio.create_task(one(Message(message.topic, message.payload, ts=ts + sent)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        await asyncio.sleep(0.002)
    end = await asyncio.to_thread(spool.stats)
    closed_at = time.time()
    checkpoints.poll()
    wall = time.monotonic() - base["at"]
    cpu = time.process_time() - base["cpu"]
    split = thread_split(base["threads"], thread_cpu())
    io = write_bytes() - base["io"]
    msgs = sent - base["sent"]
    await asyncio.gather(*tasks)
    figures = box.snapshot()
    await box.stop()  # closes the spool (its final checkpoint included in fsyncs_process)
    await sink.stop()
    closed = spool.stats()
    st0 = base["stats"]
    latencies.sort()
    return {
        # The spool's counters are read on another thread than its commits: a commit may fall between a
        # reading and its wall-clock time, so the window's two counts can differ by a commit's fsyncs.
        "window": (base["wall"], closed_at),
        "msgs": msgs,
        "rate": msgs / wall,
        "seconds": wall,
        "commits": end.commits - st0.commits,
        "fsyncs": end.fsyncs - st0.fsyncs,
        "fsyncs_process": closed.fsyncs,
        "checkpoints": checkpoints.count,
        "bytes": end.bytes_written - st0.bytes_written,
        "kernel_bytes": io,
        "cpu_us": cpu / msgs * 1e6,
        "cpu_split_us": {k: v / msgs * 1e6 for k, v in split.items()},
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
        "spooled": figures.spooled,
        "live": figures.live,
        "sent": sent,
    }


def phase_outbox(path: Path, commit_window: float, seconds: float, warmup: float) -> dict[str, Any]:
    """Figure 4: RATE msg/s through Outbox.put into the spool (the sink's broker is unreachable)."""
    return asyncio.run(_outbox_steady(path, commit_window, seconds, warmup))


def replay_payload(seq: int) -> bytes:
    """A 200-byte payload that starts with its sequence number, so the subscriber can check the order."""
    return f"{seq:010d} ".encode().ljust(PAYLOAD, b".")


def fill_spool(path: Path, n: int) -> None:
    """Store n numbered messages, FILL_BATCH per add() (the orchestrator does this before figure 5's child)."""
    spool = open_spool(path)
    now_ms = int(time.time() * 1000)
    for start in range(0, n, FILL_BATCH):
        seqs = range(start, min(n, start + FILL_BATCH))
        spool.add([(Message(f"dev{seq % 50:02d}/telemetry", replay_payload(seq)), now_ms + seq) for seq in seqs])
    spool.close()


class Arrivals:
    """What the subscriber saw of the replayed messages: count, first and last arrival, order."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.seen: set[int] = set()
        self.next = 0  # the sequence number expected next
        self.out_of_order = 0  # arrivals other than the expected next one
        self.first_at = 0.0
        self.last_at = 0.0

    def on_message(self, _client: Any, _userdata: Any, m: Any) -> None:
        now = time.monotonic()  # CLOCK_MONOTONIC is system-wide: comparable with the outbox's process
        seq = int(bytes(m.payload[:10]))
        with self.lock:
            if not self.count:
                self.first_at = now
            self.count += 1
            self.last_at = now
            if seq != self.next:
                self.out_of_order += 1
            self.next = max(self.next, seq + 1)
            self.seen.add(seq)

    def wait(self, n: int, idle: float) -> dict[str, Any]:
        """Wait until n distinct messages came, or none came for `idle` seconds; then the figures."""
        started = time.monotonic()
        while True:
            with self.lock:
                distinct, last = len(self.seen), self.last_at or started
            if distinct >= n or time.monotonic() - last > idle:
                break
            time.sleep(0.02)
        with self.lock:
            return {
                "count": self.count,
                "distinct": len(self.seen),
                "missing": n - len(self.seen & set(range(n))),
                "out_of_order": self.out_of_order,
                "first_at": self.first_at,
                "last_at": self.last_at,
            }


def subscriber_main(port: int, conn: Connection) -> None:
    """Figure 5's subscriber, a benchlib Child: subscribe, then answer ("wait", (n, idle)) until ("stop", None)."""
    arrivals = Arrivals()
    client = subscribe(port, f"{PREFIX}/+/telemetry", arrivals.on_message, timeout=10)
    conn.send(("ok", os.getpid()))
    while True:
        cmd, arg = conn.recv()
        if cmd == "wait":
            conn.send(("ok", arrivals.wait(*arg)))
            continue
        client.disconnect()
        client.loop_stop()
        conn.send(("ok", None))
        return


async def _replay(path: Path, n: int, rate: float, port: int, broker_pid: int, profile: float) -> dict[str, Any]:
    sub = Child("subscriber", subscriber_main, port)
    sub_pid: int = await asyncio.to_thread(sub.wait, 60)

    spool = open_spool(path)
    sink = MqttSink("bench", f"mqtt://127.0.0.1:{port}", PREFIX, client_id=f"spool-bench-{os.getpid()}")
    box = Outbox(sink, spool, replay_rate=rate)
    await box.start()
    held = (await asyncio.to_thread(spool.stats)).count
    await sink.start()
    if not await sink.wait_connected(10):
        raise RuntimeError(f"the sink did not connect to mosquitto on port {port}")
    t_conn = time.monotonic()
    cpu0, threads0 = time.process_time(), thread_cpu()
    broker0, sub0 = cpu_seconds(broker_pid), cpu_seconds(sub_pid)
    prof: cProfile.Profile | None = None
    profiled = {"msgs": 0, "seconds": 0.0}
    if profile:
        prof = cProfile.Profile()

        def stop_profile() -> None:
            assert prof is not None
            prof.disable()
            profiled.update(msgs=box.stats.replayed, seconds=time.monotonic() - t_conn)

        asyncio.get_running_loop().call_later(profile, stop_profile)
        prof.enable()
    deadline = t_conn + max(60.0, n / 200)
    poll = 0.002 if rate >= UNTHROTTLED else 0.02  # the bench's own wake-ups count in the CPU figure
    while box.stats.replayed < n or box.snapshot().spool_messages > 0:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(poll)
    t_empty = time.monotonic()
    cpu = time.process_time() - cpu0
    split = thread_split(threads0, thread_cpu())
    broker_cpu, sub_cpu = cpu_seconds(broker_pid) - broker0, cpu_seconds(sub_pid) - sub0
    if prof is not None and not profiled["msgs"]:
        prof.disable()
        profiled.update(msgs=box.stats.replayed, seconds=t_empty - t_conn)
    replayed = box.stats.replayed
    left = (await asyncio.to_thread(spool.stats)).count
    got: dict[str, Any] = await asyncio.to_thread(sub.call, "wait", (n, 5.0), 600)
    # The subscriber's CPU until its last arrival is what it spent on these messages.
    sub_cpu = max(sub_cpu, cpu_seconds(sub_pid) - sub0)
    await box.stop()
    await sink.stop()
    await asyncio.to_thread(sub.call, "stop")
    await asyncio.to_thread(sub.stop, 5)
    empty_s = t_empty - t_conn
    span = got["last_at"] - got["first_at"]
    result: dict[str, Any] = {
        "n": n,
        "held": held,
        "replayed": replayed,
        "left": left,
        "empty_s": empty_s,
        "rate_empty": replayed / empty_s,
        "rate_arrivals": got["distinct"] / span if span > 0 else 0.0,
        "arrivals_s": span,
        "first_after_s": got["first_at"] - t_conn,
        "cpu_us": cpu / max(1, replayed) * 1e6,
        "cpu_split_us": {k: v / max(1, replayed) * 1e6 for k, v in split.items()},
        "core_pct": {
            "outbox": cpu / empty_s * 100,
            "mosquitto": broker_cpu / empty_s * 100,
            "subscriber": sub_cpu / empty_s * 100,
        },
        **got,
    }
    if prof is not None:
        result["profile"] = profile_summary(prof, int(profiled["msgs"]), profiled["seconds"])
    return result


def phase_replay(path: Path, n: int, rate: float, port: int, broker_pid: int, profile: float = 0.0) -> dict[str, Any]:
    """Figure 5: replay a filled spool into mosquitto; `profile` > 0: cProfile the loop for that many seconds."""
    return asyncio.run(_replay(path, n, rate, port, broker_pid, profile))


def phase_bare_replay(path: Path, n: int, port: int, broker_pid: int) -> dict[str, Any]:
    """Figure 5's reference: a bare paho publisher sends the replay's n messages into the same Mosquitto.

    The same topics and 200-byte numbered payloads, QoS 1, MQTT 3.1.1, a fresh clean session, and at most
    REPLAY_INFLIGHT unacknowledged: all n handed to paho at once, which sends the next queued one on each
    PUBACK (measured here: ~15-25 % less CPU per message than publishing the next from on_publish), all on
    one thread (paho's loop() in this one, no network thread to share the interpreter with). The same
    subscriber process counts the arrivals. `path` is unused (every phase gets one).
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    sub = Child("subscriber", subscriber_main, port)
    sub_pid: int = sub.wait(60)
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"spool-bench-bare-{os.getpid()}", protocol=mqtt.MQTTv311
    )
    client.max_inflight_messages_set(REPLAY_INFLIGHT)
    client.max_queued_messages_set(0)
    state = {"acked": 0, "connected": False}

    def on_connect(*_: Any) -> None:
        state["connected"] = True

    def on_publish(*_: Any) -> None:
        state["acked"] += 1

    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect("127.0.0.1", port, keepalive=60)
    deadline = time.monotonic() + 10
    while not state["connected"]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the bare publisher did not connect to mosquitto on port {port}")
        client.loop(0.1)
    t_conn = time.monotonic()
    cpu0 = time.process_time()
    broker0, sub0 = cpu_seconds(broker_pid), cpu_seconds(sub_pid)
    for seq in range(n):
        client.publish(f"{PREFIX}/dev{seq % 50:02d}/telemetry", replay_payload(seq), qos=1)
    deadline = t_conn + max(60.0, n / 200)
    while state["acked"] < n and time.monotonic() < deadline:
        client.loop(1.0)
    t_acked = time.monotonic()
    cpu = time.process_time() - cpu0
    broker_cpu = cpu_seconds(broker_pid) - broker0
    got: dict[str, Any] = sub.call("wait", (n, 5.0), 600)
    sub_cpu = cpu_seconds(sub_pid) - sub0
    client.disconnect()
    sub.call("stop")
    sub.stop(5)
    acked_s = t_acked - t_conn
    span = got["last_at"] - got["first_at"]
    return {
        "n": n,
        "acked": state["acked"],
        "acked_s": acked_s,
        "rate_acked": state["acked"] / acked_s,
        "rate_arrivals": got["distinct"] / span if span > 0 else 0.0,
        "cpu_us": cpu / max(1, state["acked"]) * 1e6,
        "core_pct": {
            "publisher": cpu / acked_s * 100,
            "mosquitto": broker_cpu / acked_s * 100,
            "subscriber": sub_cpu / acked_s * 100,
        },
        **got,
    }


#: The parts of the outbox's process a profiled function belongs to, by a substring of its file's path.
PROFILE_PARTS = (
    ("bridge/outbox", "outbox"),  # outbox.py and the parts split off it (live queue, commit, replay, ...)
    ("bridge/delivery.py", "outbox"),
    ("bridge/sink.py", "sink"),
    ("bridge/spool", "spool"),
    ("paho/", "paho"),
    ("asyncio/", "asyncio"),
    ("concurrent/", "executor hand-off"),
    ("threading.py", "executor hand-off"),
    ("selectors.py", "epoll"),
)


def profile_summary(prof: cProfile.Profile, msgs: int, seconds: float) -> dict[str, Any]:
    """Self time per part of the outbox's process and the top functions, per replayed message."""
    return self_time_per_message(prof, msgs, seconds, PROFILE_PARTS, script="spool_bench.py")


# --- the orchestrator ---------------------------------------------------------------------------


def child(
    phase: str, path: Path, strace_out: Path | None = None, *, fresh: bool = True, **kwargs: Any
) -> dict[str, Any]:
    """Run one phase in a fresh process (optionally under strace, its log to `strace_out`) and return its figures."""
    if fresh:
        open_spool(path).close()  # create the file here: its schema commits are not the phase's
    argv = [__file__, "--phase", phase, "--path", str(path), "--args", json.dumps(kwargs)]
    trace: list[str] = []
    if strace_out is not None:
        # Every fsync/fdatasync of every thread, with its time (wall clock, as the phase's window) and the path
        # of its descriptor (-y); only those calls stop the process (--seccomp-bpf), so the cost is theirs.
        trace = ["strace", "-f", "--seccomp-bpf", "-ttt", "-y", "-e", "trace=fsync,fdatasync", "-o", str(strace_out)]
    result: dict[str, Any] = run_fresh(argv, f"phase {phase} {kwargs}", prefix=trace)
    return result


# "PID TIME fdatasync(FD</path>) = 0", or "... fdatasync(FD</path> <unfinished ...>" when another thread's call
# came between its entry and its exit (the "<... fdatasync resumed>" line that ends it is not counted again).
_SYNC_CALL = re.compile(r"^\d+\s+(?P<at>\d+\.\d+)\s+(?:fsync|fdatasync)\(\d+<(?P<path>[^>]*)>")


def kernel_syncs(trace: Path, spool: Path) -> list[float]:
    """When (wall clock) each fsync/fdatasync strace saw on the spool's files was made: the database, its
    -wal and -journal, and the directory (SQLite syncs it along with a new WAL; the spool counts that too)."""
    files = {str(spool), f"{spool}-wal", f"{spool}-journal", str(spool.parent)}
    return [
        float(m["at"])
        for line in trace.read_text().splitlines()
        if (m := _SYNC_CALL.match(line)) is not None and m["path"] in files
    ]


@dataclass
class Syncs:
    """fsyncs of one phase: strace's count (None without strace) and the spool's own, in its window and in all."""

    seconds: float
    kernel: int | None  # in the window
    own: int  # the spool's counter over the window
    kernel_process: int | None  # the whole child process
    own_process: int  # the spool's counter from open to close

    @classmethod
    def of(cls, r: dict[str, Any], trace: Path | None, spool: Path) -> Syncs:
        """The figures of a phase's result `r` (which has "window", "seconds", "fsyncs", "fsyncs_process")."""
        if trace is None:
            return cls(r["seconds"], None, r["fsyncs"], None, r["fsyncs_process"])
        start, end = r["window"]
        times = kernel_syncs(trace, spool)
        in_window = sum(1 for t in times if start <= t <= end)
        return cls(r["seconds"], in_window, r["fsyncs"], len(times), r["fsyncs_process"])

    @property
    def rate(self) -> float:
        """fsync/s in the window, by strace's count (NaN when strace did not run: not measured)."""
        return float("nan") if self.kernel is None else self.kernel / self.seconds

    @property
    def own_rate(self) -> float:
        """fsync/s in the window, by the spool's own counter."""
        return self.own / self.seconds

    def agreement(self) -> str:
        """strace's count against the spool's: window, then whole process ("=" when equal)."""
        if self.kernel is None or self.kernel_process is None:
            return "no strace"

        def pair(kernel: int, own: int) -> str:
            return f"{kernel}={own}" if kernel == own else f"{kernel}/{own} ({kernel - own:+d})"

        return f"{pair(self.kernel, self.own)}, {pair(self.kernel_process, self.own_process)}"


def fs_type(path: Path) -> str:
    """The filesystem type of the mount holding path."""
    best, kind = "", "?"
    with open("/proc/mounts") as f:
        for line in f:
            _, mount, fstype, *_ = line.split()
            if str(path).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fstype
    return f"{kind} on {best}"


def mosquitto_version(executable: str) -> str:
    """`mosquitto -h`'s first line says the version."""
    try:
        out = subprocess.run([executable, "-h"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    first = out.splitlines()[0] if out else ""
    return first.rsplit(" ", 1)[-1] if "version" in first else "?"


def header(work: Path, mosquitto: str | None) -> None:
    """What ran where, so that the numbers can be compared later."""
    versions = {"SQLite": sqlite3.sqlite_version, "sqlite-utils": package_version("sqlite-utils")}
    if mosquitto is not None:
        versions |= {"mosquitto": mosquitto_version(mosquitto), "paho-mqtt": package_version("paho-mqtt")}
    print_header(
        "spool",
        versions,
        [
            f"spool files in {work} ({fs_type(work)}); messages: {PAYLOAD}-byte payload, "
            f"{entry_size(messages(1)[0][0])} bytes counted each"
        ],
        skews="every figure, most the CPU and rate columns",
    )


FSYNC_NOTE = (
    "fsync/s = fsync+fdatasync calls strace saw on the spool's files (database, -wal, -journal, directory) in the "
    "measured window / its seconds; (spool) = the spool's own counter, a model of SQLite's syncs; strace=spool: "
    "the two counts over the window, then over the whole child process from open to close"
)


def syncs_per_1k(r: dict[str, Any], trace: Path | None, spool: Path) -> float:
    """fsyncs strace saw on the spool's files per 1,000 messages of a write phase's window (NaN without strace)."""
    if trace is None:
        return float("nan")
    start, end = r["window"]
    return sum(1 for t in kernel_syncs(trace, spool) if start <= t <= end) / r["msgs"] * 1000


def fsync_verdict(syncs: Syncs) -> str:
    """The fsync goal's line: strace's rate and whether it is met, or why it is not measured."""
    if syncs.kernel is None:
        return f"not measured (no strace; the spool's own counter says {syncs.own_rate:.1f}) (NOT met)"
    return f"{syncs.rate:.1f} ({met(syncs.rate <= GOAL_FSYNC)}); the spool's own counter {syncs.own_rate:.1f}"


def per_k(value: float, msgs: int) -> float:
    """Bytes per 1,000 messages, in KiB."""
    return value / msgs * 1000 / 1024


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def start_mosquitto(work: Path) -> Mosquitto:
    """A Mosquitto on a free loopback port: anonymous, no persistence, no queue limits (benchlib.mqtt)."""
    broker = Mosquitto(work / "mosquitto", free_port())
    broker.start()
    return broker


def print_profile(p: dict[str, Any]) -> None:
    print(
        f"   cProfile of the outbox's event loop thread for the first {p['seconds']:.1f} s "
        f"({p['msgs']:,} messages replayed meanwhile); µs per replayed message:"
    )
    parts = ", ".join(f"{name} {us:.1f}" for name, us in p["parts_us"].items() if us >= 0.05)
    print(f"   self time by component: {parts}")
    print(f"   {'calls/msg':>9} {'self µs':>8} {'cum µs':>8}  function")
    for name, calls, tottime, cumtime in p["top"]:
        print(f"   {calls:>9.2f} {tottime:>8.2f} {cumtime:>8.2f}  {name}")


@dataclass(frozen=True)
class Run:
    """What the figures of one run use: where the files go, whether strace counts fsyncs, and the lengths."""

    work: Path
    use_strace: bool
    seconds: float
    steady_seconds: float
    outbox_seconds: float
    warmup: float
    replay_n: int
    throttled_n: int
    profile: str
    profile_seconds: float

    def trace(self, name: str) -> Path | None:
        """Where a phase's strace log goes (None without strace)."""
        return self.work / f"{name}.strace" if self.use_strace else None


def figure_write(run: Run, goals: list[str]) -> None:
    """Figure 1: add() flat out against bare sqlite3 executemany of the same rows in the same transactions."""
    heading(
        f"1. Write rate: add() flat out for {run.seconds:g} s, one committed transaction per add(), against bare "
        "sqlite3 executemany of the same rows in the same transactions (WAL, synchronous=FULL)"
    )
    rows: list[list[object]] = []
    for i, batch in enumerate(WRITE_BATCHES):
        # Alternating which of the pair goes first, best of WRITE_ROUNDS each: other work on the machine
        # (and the disk's own moods) then weighs on both alike. Both under strace when it is there, so
        # that its cost per fsync (two stops of the process) weighs on both alike too.
        writes: dict[str, list[tuple[dict[str, Any], Path, Path | None]]] = {"spool": [], "bare": []}
        for k in range(WRITE_ROUNDS):
            order = ("spool", "bare") if k % 2 == 0 else ("bare", "spool")
            for who in order:
                phase = "write" if who == "spool" else "bare_write"
                path = run.work / f"write{i}-{who}{k}.db"
                trace = run.trace(f"write{i}-{who}{k}")
                got = child(phase, path, trace, batch=batch, seconds=run.seconds)
                writes[who].append((got, path, trace))
        r, r_path, r_trace = max(writes["spool"], key=lambda x: x[0]["rate"])
        ref, ref_path, ref_trace = max(writes["bare"], key=lambda x: x[0]["rate"])
        ratio = r["rate"] / ref["rate"]
        syncs = Syncs.of(r, r_trace, r_path)
        rows.append(
            [
                batch,
                r["rate"],
                ref["rate"],
                ratio,
                r["cpu_us"],
                ref["cpu_us"],
                syncs_per_1k(r, r_trace, r_path),
                syncs_per_1k(ref, ref_trace, ref_path),
                syncs.agreement(),
                per_k(r["bytes"], r["msgs"]),
                per_k(r["kernel_bytes"], r["msgs"]),
            ]
        )
        record(
            "spool",
            f"write rate, {batch} msgs per commit (synchronous=FULL)",
            r["rate"],
            "msg/s",
            ratio=ratio,
            versus=f"bare sqlite3 executemany {ref['rate']:,.0f} msg/s",
            goal=GOAL_WRITE,
        )
        goals.append(
            f"- write rate >= {GOAL_WRITE:g} x bare sqlite3 executemany, {batch} msgs per transaction: "
            f"{r['rate']:,.0f} / {ref['rate']:,.0f} msg/s = {ratio:.2f} ({met(ratio >= GOAL_WRITE)})"
        )
    headers = ["msgs/add", "msg/s", "bare msg/s", "ratio", "CPU µs/msg", "(bare)", "fsyncs/1k msgs", "(bare)"]
    print_table([*headers, "strace=spool", "KiB/1k msgs (spool)", "(kernel)"], rows, blank="-")
    note(f"best of {WRITE_ROUNDS} runs each; ratio = add() msg/s / bare msg/s; bare = the same rows (ids made per")
    note("transaction), the same INSERT into a file the spool made, BEGIN IMMEDIATE + executemany + COMMIT;")
    note("fsyncs counted by strace (- without it); strace=spool as in figure 3")


def figure_drain(run: Run) -> None:
    """Figure 2: a full spool taken and accepted until empty."""
    heading(f"2. FIFO drain: {DRAIN_FILL:,} messages stored, then take(n) + accept() until empty")
    rows: list[list[object]] = []
    for i, batch in enumerate(DRAIN_BATCHES):
        r = child("drain", run.work / f"drain{i}.db", batch=batch)
        rows.append(
            [
                batch,
                r["rate"],
                r["commits"],
                r["fsyncs"],
                per_k(r["bytes"], r["msgs"]),
                per_k(r["kernel_bytes"], r["msgs"]),
            ]
        )
    print_table(["take(n)", "msg/s", "commits", "fsyncs", "KiB/1k msgs (spool)", "(kernel)"], rows, blank="-")


def figure_steady(run: Run, goals: list[str]) -> None:
    """Figure 3: a steady load, one add() per group-commit window."""
    heading(f"3. Steady load: {RATE} msg/s for {run.steady_seconds:g} s, one add() per group-commit window")
    rows: list[list[object]] = []
    for i, window in enumerate(WINDOWS):
        path = run.work / f"steady{i}.db"
        trace = run.trace(f"steady{i}")
        r = child("steady", path, trace, window=window, seconds=run.steady_seconds)
        syncs = Syncs.of(r, trace, path)
        rows.append(
            [
                f"{window * 1000:.0f}ms",
                round(RATE * window),
                r["rate"],
                syncs.rate,
                syncs.own_rate,
                syncs.agreement(),
                r["checkpoints"],
                per_k(r["bytes"], r["msgs"]),
                per_k(r["kernel_bytes"], r["msgs"]),
                f"{r['p50_ms']:.2f}ms",
                f"{r['p99_ms']:.2f}ms",
            ]
        )
        goals.append(
            f"- <= {GOAL_FSYNC:g} fsync/s (strace) at {RATE} msg/s, spool alone, "
            f"{window * 1000:.0f} ms window: {fsync_verdict(syncs)}"
        )
    headers = ["window", "msgs/add", "msg/s", "fsync/s", "(spool)", "strace=spool", "ckpts", "KiB/1k msgs (spool)"]
    print_table([*headers, "(kernel)", "add p50", "p99"], rows, blank="-")
    note(FSYNC_NOTE)


def figure_outbox(run: Run, goals: list[str]) -> None:
    """Figure 4: the outbox's own group commit at a steady load, its sink's broker unreachable."""
    heading(
        f"4. Through the outbox: {RATE} msg/s to Outbox.put for {run.outbox_seconds:g} s (after {run.warmup:g} s "
        "of warm-up), sink's broker unreachable, so all is spooled"
    )
    rows: list[list[object]] = []
    for i, window in enumerate(OUTBOX_WINDOWS):
        path = run.work / f"outbox{i}.db"
        trace = run.trace(f"outbox{i}")
        r = child("outbox", path, trace, commit_window=window, seconds=run.outbox_seconds, warmup=run.warmup)
        if r["spooled"] != r["sent"] or r["live"]:
            raise RuntimeError(f"figure 4: {r['sent']} sent, {r['spooled']} spooled, {r['live']} went live")
        syncs = Syncs.of(r, trace, path)
        rows.append(
            [
                f"{window * 1000:.0f}ms",
                r["rate"],
                r["commits"] / r["seconds"],
                syncs.rate,
                syncs.own_rate,
                syncs.agreement(),
                r["checkpoints"],
                per_k(r["bytes"], r["msgs"]),
                per_k(r["kernel_bytes"], r["msgs"]),
                f"{r['p50_ms']:.1f}ms",
                f"{r['p99_ms']:.1f}ms",
                r["cpu_us"],
                "/".join(f"{r['cpu_split_us'][k]:.0f}" for k in ("loop", "spool", "other")),
            ]
        )
        if window == DEFAULT_COMMIT_WINDOW:
            # strace's count, NaN (not measured) without it: the spool's own counter is a model of
            # SQLite's syncs and would keep counting if SQLite stopped making them.
            record(
                "spool",
                f"fsyncs/s at {RATE} msg/s through the outbox ({window * 1000:.0f} ms commit window), "
                "counted by strace",
                syncs.rate,
                "fsync/s",
                most=GOAL_FSYNC,
            )
        goals.append(
            f"- <= {GOAL_FSYNC:g} fsync/s (strace) at {RATE} msg/s, through the outbox, commit_window "
            f"{window * 1000:.0f} ms{' (default)' if window == DEFAULT_COMMIT_WINDOW else ''}: "
            f"{fsync_verdict(syncs)}"
        )
    headers = ["commit window", "msg/s", "commits/s", "fsync/s", "(spool)", "strace=spool", "ckpts"]
    headers += ["KiB/1k msgs (spool)", "(kernel)", "publish p50", "p99", "CPU µs/msg", "(loop/spool/other)"]
    print_table(headers, rows, blank="-")
    note("publish = `await outbox.put(m, awaited=True)` until the commit that holds m; CPU = the whole process")
    note("(with the bench's task per message) / messages; loop/spool/other = event loop thread / the outbox's")
    note("spool worker / other threads")
    note(FSYNC_NOTE)


def figure_replay(run: Run, broker: Mosquitto, goals: list[str]) -> None:
    """Figure 5: a filled spool replayed into Mosquitto, against a bare paho publisher of the same messages."""
    heading(
        f"5. Replay into Mosquitto ({broker.url}): a filled spool, an Outbox whose sink connects, "
        "a paho subscriber (QoS 1) in its own process"
    )
    assert broker.pid is not None
    rows: list[list[object]] = []
    unthrottled = bare = 0.0
    # The unthrottled replay and its reference take turns (best of REPLAY_ROUNDS each), then one throttled.
    replays: list[tuple[str, float, int]] = []
    for k in range(REPLAY_ROUNDS):
        pair = [("outbox", UNTHROTTLED, run.replay_n), ("bare", UNTHROTTLED, run.replay_n)]
        replays += pair if k % 2 == 0 else pair[::-1]
    replays.append(("outbox", DEFAULT_REPLAY_RATE, run.throttled_n))
    for i, (who, rate, n) in enumerate(replays):
        if who == "bare":
            b = child("bare_replay", run.work / "bare", fresh=False, n=n, port=broker.port, broker_pid=broker.pid)
            bare = max(bare, b["rate_arrivals"])
            ok = b["distinct"] == n and b["missing"] == 0 and b["out_of_order"] == 0
            verdict = "yes" if ok else f"NO: {b['distinct']:,} of {n:,} came, {b['out_of_order']} out of order"
            cores = "/".join(f"{b['core_pct'][k]:.0f}" for k in ("publisher", "mosquitto", "subscriber"))
            rows.append(
                ["bare paho", n, b["rate_arrivals"], b["rate_acked"], f"{b['acked_s']:.2f}s", b["cpu_us"], "", cores]
                + [verdict]
            )
            continue
        path = run.work / f"replay{i}.db"
        fill_spool(path, n)
        r = child("replay", path, fresh=False, n=n, rate=rate, port=broker.port, broker_pid=broker.pid)
        if rate == UNTHROTTLED:
            unthrottled = max(unthrottled, r["rate_arrivals"])
        ok = r["distinct"] == n and r["missing"] == 0 and r["out_of_order"] == 0 and r["left"] == 0
        verdict = (
            "yes"
            if ok
            else f"NO: {r['distinct']:,} of {n:,} came, {r['out_of_order']} out of order, "
            f"{r['count'] - r['distinct']} duplicates, {r['left']} left in the spool"
        )
        split = "/".join(f"{r['cpu_split_us'][k]:.0f}" for k in ("loop", "spool", "other"))
        cores = "/".join(f"{r['core_pct'][k]:.0f}" for k in ("outbox", "mosquitto", "subscriber"))
        label = "unthrottled" if rate == UNTHROTTLED else f"{rate:g}"
        rows.append(
            [label, n, r["rate_arrivals"], r["rate_empty"], f"{r['empty_s']:.2f}s", r["cpu_us"], split, cores, verdict]
        )
    headers = ["replay_rate", "messages", "msg/s arrivals", "(to empty)", "empty after", "CPU µs/msg"]
    print_table([*headers, "(loop/spool/other)", "core% outbox/mosq/sub", "all in order"], rows, thousands=True)
    note("arrivals = distinct messages / (last - first arrival at the subscriber); to empty = replayed / time from")
    note("the sink's connection until the spool is empty; CPU = the outbox's process / replayed messages; core%")
    note(f"over that time. replay_rate {DEFAULT_REPLAY_RATE:g} is the Outbox's default")
    note(
        f"bare paho = the same messages from a bare paho client (QoS 1, {REPLAY_INFLIGHT} in flight, one thread); "
        "its (to empty) is until the last PUBACK, its core% is publisher/mosq/sub"
    )
    step = max(1, min(REPLAY_BATCH, int(DEFAULT_REPLAY_RATE / 10)))
    steps = -(-run.throttled_n // step)
    if steps > 1:
        note(
            f"throttled: {step} messages every {step / DEFAULT_REPLAY_RATE:g} s, the first at once, so "
            f"{run.throttled_n:,} span {steps - 1} steps: "
            f"{run.throttled_n / ((steps - 1) * step / DEFAULT_REPLAY_RATE):,.0f} msg/s if the throttle holds"
        )
    ratio = unthrottled / bare if bare > 0 else float("nan")  # no reference: not measured
    record(
        "spool",
        "replay into Mosquitto, unthrottled",
        unthrottled,
        "msg/s",
        ratio=ratio,
        versus=f"bare paho publisher {bare:,.0f} msg/s",
        goal=GOAL_REPLAY,
    )
    goals.append(
        f"- replay >= {GOAL_REPLAY:g} x a bare paho publisher into Mosquitto (unthrottled, {run.replay_n:,} "
        f"messages, best of {REPLAY_ROUNDS}): {unthrottled:,.0f} / {bare:,.0f} msg/s = {ratio:.2f} "
        f"({met(ratio >= GOAL_REPLAY)})"
    )
    if run.profile == "always" or (run.profile == "auto" and not ratio >= GOAL_REPLAY):
        path = run.work / "replay-profile.db"
        n = max(run.replay_n, int(run.profile_seconds * 20_000))  # enough not to run dry while profiled
        fill_spool(path, n)
        r = child(
            "replay",
            path,
            fresh=False,
            n=n,
            rate=UNTHROTTLED,
            port=broker.port,
            broker_pid=broker.pid,
            profile=run.profile_seconds,
        )
        print(
            f"\n   Profiled unthrottled replay of {n:,} (a run of its own, not in the table): "
            f"{r['rate_arrivals']:,.0f} msg/s under cProfile; CPU µs/msg "
            + "/".join(f"{r['cpu_split_us'][k]:.0f}" for k in ("loop", "spool", "other"))
            + " (loop/spool/other), core% outbox/mosq/sub "
            + "/".join(f"{r['core_pct'][k]:.0f}" for k in ("outbox", "mosquitto", "subscriber"))
        )
        print_profile(r["profile"])


#: A phase's entry point in its fresh interpreter (`--phase NAME`): its figures come back as JSON.
PHASES: dict[str, Callable[..., dict[str, Any]]] = {
    "write": phase_write,
    "drain": phase_drain,
    "steady": phase_steady,
    "outbox": phase_outbox,
    "replay": phase_replay,
    "bare_write": phase_bare_write,
    "bare_replay": phase_bare_replay,
}


def main() -> None:
    """Run the figures asked for (or, with --phase, one phase in this fresh interpreter) and print the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help="where the spool files go (default: a temp dir)")
    parser.add_argument("--figures", default="1,2,3,4,5", help="which figures to run, e.g. 4,5 (default: all)")
    parser.add_argument("--quick", action="store_true", help="short windows and fewer messages: about 25 s")
    parser.add_argument("--seconds", type=float, help="length of each write-rate run (default 2; quick 0.2)")
    parser.add_argument("--steady-seconds", type=float, help="length of each steady-load run (default 30; quick 2)")
    parser.add_argument(
        "--outbox-seconds", type=float, help="length of each figure 4 run, after 2 s of warm-up (default 30; quick 3)"
    )
    parser.add_argument(
        "--replay-n", type=int, help=f"messages replayed unthrottled (default {REPLAY_N:,}; quick 10,000)"
    )
    parser.add_argument(
        "--throttled-n",
        type=int,
        help=f"messages replayed at the default replay_rate (default {THROTTLED_N:,}; quick 1,000)",
    )
    parser.add_argument(
        "--profile",
        choices=("auto", "always", "never"),
        default="auto",
        help="figure 5: cProfile a further unthrottled replay (auto: when it misses the goal)",
    )
    parser.add_argument("--profile-seconds", type=float, default=4.0, help="how long the profile runs (default 4)")
    parser.add_argument(
        "--no-strace", action="store_true", help="do not count fsyncs with strace (the fsync figure: not measured)"
    )
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--args", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(PHASES[args.phase](args.path, **json.loads(args.args))))
        return

    def pick(given: float | None, default: float, quick: float) -> float:
        return given if given is not None else quick if args.quick else default

    figures = {int(x) for x in args.figures.split(",") if x.strip()}
    if not figures <= {1, 2, 3, 4, 5}:
        parser.error("--figures takes numbers from 1 to 5")

    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fieldgate-spool-bench-", dir=args.dir))
    run = Run(
        work=work,
        use_strace=not args.no_strace and shutil.which("strace") is not None,
        seconds=pick(args.seconds, 2.0, 0.2),
        steady_seconds=pick(args.steady_seconds, 30.0, 2.0),
        outbox_seconds=pick(args.outbox_seconds, 30.0, 3.0),
        warmup=1.0 if args.quick else 2.0,
        replay_n=int(pick(args.replay_n, REPLAY_N, 10_000)),
        throttled_n=int(pick(args.throttled_n, THROTTLED_N, 1_000)),
        profile=args.profile,
        profile_seconds=args.profile_seconds,
    )
    broker = None
    goals: list[str] = []
    try:
        if 5 in figures:
            broker = start_mosquitto(work)
        header(work, broker.executable if broker else None)
        if not run.use_strace and {3, 4} & figures:
            why = "not used (--no-strace)" if args.no_strace else "is not installed"
            print(f"strace {why}: the fsync figures are not measured")
        started = time.monotonic()
        if 1 in figures:
            figure_write(run, goals)
        if 2 in figures:
            figure_drain(run)
        if 3 in figures:
            figure_steady(run, goals)
        if 4 in figures:
            figure_outbox(run, goals)
        if broker is not None:
            figure_replay(run, broker, goals)
        if goals:
            print("\nGoals (store-and-forward issue)")
            for line in goals:
                print(line)
        print(run_summary(started, averages=1))
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
