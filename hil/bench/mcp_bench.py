"""Benchmark of MCP/1 end to end: device clients -> gateway (MCP server, router, sink, embedded amqtt) -> subscriber.

For each number of concurrent device clients (default 1, 100, 1,000 and as many sessions as the
file-descriptor limit allows), every client keeps a full window (32) of DATA frames outstanding.
Measured: ACKed frames/s counted by an MQTT subscriber on `+/telemetry`, DATA->ACK latency seen by
the devices, CPU of every process, and gateway RSS per idle session. In the same run, a bare paho
publisher (QoS 1, window = the Outbox's) feeds the same embedded amqtt broker run in a process of
its own; our rate is printed as a fraction of it (goal >= 0.8). The gateway process is then
profiled under load and its time grouped by component.

Processes (spawned, so /proc CPU figures belong to one role each): the gateway with its embedded
broker; one or more device-client processes; a paho subscriber; the orchestrator (this process,
asleep during measurements). Baseline: broker, publisher, subscriber.

Run from the repository root:  .venv/bin/python hil/bench/mcp_bench.py [--clients 1,100,1000,max] [--seconds N]
hil/bench/README.md says what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import inspect
import itertools
import math
import multiprocessing
import os
import resource
import sys
import tempfile
import time
import traceback
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

# benchlib first: it puts the repository on sys.path for the imports below.
import benchlib
from benchlib import (
    ROOT,
    cpu_seconds,
    free_port,
    heading,
    note,
    package_version,
    percentile,
    print_header,
    record,
    rss_kb,
    run_summary,
    subscribe,
    summary,
)

from drivers.mcp.codec import Decoder, Frame, FrameType, encode
from drivers.mcp.session import MAX_OUTSTANDING

GATEWAY_ID = "bench"
PREFIX = f"fieldgate/{GATEWAY_ID}"  # the default prefix of the default sink
TELEMETRY = f"{PREFIX}/+/telemetry"  # what the subscriber counts
BARE_TOPIC = f"{PREFIX}/d0/telemetry"
GOAL = 0.8  # our ACKed frames/s as a share of the bare paho -> amqtt rate
DEFAULT_SECONDS = 6.0
FD_RESERVE = 64  # descriptors the gateway keeps free for its broker, sink reconnects, spool, executor
CLIENT_FDS_PER_PROC = 10_000  # sockets per device-client process
CONNECT_CONCURRENCY = 200  # connects in progress per client process (the listen backlog is 100)
NACK_BACKOFF = 1.0  # s a device waits before using a NACKed frame's window slot again ("retries later")
HEARTBEAT_S = 3600  # in HELLO: idle sessions must survive the longest run, and devices send no periodic heartbeat
READY_TIMEOUT = 120.0
# Where the broker runs: config `broker.process: inline | separate`, or a process the bench spawns (what-if).
LAYOUTS = {"inline": "in gw", "separate": "gw child", "external": "own proc"}
STATUS_TIMEOUT = 5.0  # s to wait for a (swamped) gateway's counters during a measurement
MAX_WARMUP = 3.0  # s of warm-up at max sessions, where a steady state is minutes away


# --- output -------------------------------------------------------------------------------------


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print rows under headers: numbers right-aligned with thousands separators, "-" for a missing value."""
    benchlib.print_table(headers, rows, thousands=True, blank="-")


def progress(text: str) -> None:
    """What is running now (stderr, so that stdout stays the report)."""
    print(f"  [{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --- /proc and limits ------------------------------------------------------------------------------


def open_fds() -> int:
    """File descriptors this process holds."""
    return len(os.listdir("/proc/self/fd"))


def raise_nofile() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; (soft, hard) after."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def quiet_logs() -> None:
    """Only errors: per-session INFO lines and amqtt's shutdown chatter would swamp the report.

    MCP_BENCH_LOG=WARNING (or DEBUG) lets the gateway's own loggers through, to see why sessions end.
    """
    import logging

    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    ours = os.environ.get("MCP_BENCH_LOG", "CRITICAL").upper()
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    for name in ("bridge", "drivers", "gateway"):
        logging.getLogger(name).setLevel(ours)
    # asyncio's "socket.accept() out of system resource" is expected when probing the descriptor limit.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


# --- child processes ------------------------------------------------------------------------------


class Child:
    """A spawned process driven over a pipe: send (cmd, arg), get ("ok", value) or ("error", traceback)."""

    def __init__(self, name: str, target: Callable[..., None], *args: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_child_main, args=(target, args, child), name=name, daemon=True)
        self.proc.start()
        child.close()
        assert self.proc.pid is not None
        self.pid: int = self.proc.pid

    def call(self, cmd: str, arg: Any = None, timeout: float = 60.0) -> Any:
        """Send a command and wait for its answer."""
        self.send(cmd, arg)
        return self.wait(timeout, cmd)

    def send(self, cmd: str, arg: Any = None) -> None:
        """Send a command; `wait` collects the answer."""
        self.conn.send((cmd, arg))

    def wait(self, timeout: float, what: str = "start") -> Any:
        """The next answer of the child."""
        if not self.conn.poll(timeout):
            raise TimeoutError(f"{self.name}: no answer to {what!r} within {timeout:g} s")
        kind, value = self.conn.recv()
        if kind == "error":
            raise RuntimeError(f"{self.name} failed:\n{value}")
        return value

    def cpu(self) -> float:
        """CPU seconds used by the child so far (nan once it is gone)."""
        try:
            return cpu_seconds(self.pid)
        except OSError:
            return float("nan")

    def stop(self, timeout: float = 20.0) -> None:
        """Ask the child to stop; terminate, then kill it if it does not."""
        if self.proc.is_alive() and timeout:
            with contextlib.suppress(Exception):
                self.conn.send(("stop", None))
            self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(3)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(3)
        self.conn.close()


@dataclass
class Pid:
    """A process the bench did not spawn (the gateway's broker child): only its CPU is read."""

    pid: int

    def cpu(self) -> float:
        """CPU seconds used by the process so far (nan once it is gone)."""
        try:
            return cpu_seconds(self.pid)
        except OSError:
            return float("nan")


def stop_all(children: list[Child]) -> None:
    """Stop every child at once (clients close their sockets while the gateway stops); kill the stragglers."""
    for c in children:
        if c.proc.is_alive():
            with contextlib.suppress(Exception):
                c.conn.send(("stop", None))
    deadline = time.monotonic() + 10
    for c in children:
        c.proc.join(max(0.1, deadline - time.monotonic()))
    for c in children:
        c.stop(timeout=0)


def _child_main(target: Callable[..., None], args: tuple[Any, ...], conn: Connection) -> None:
    try:
        target(*args, conn)
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("error", traceback.format_exc()))
        raise SystemExit(1) from None


Handler = Callable[[Any], Awaitable[Any]]


async def serve_pipe(conn: Connection, handlers: dict[str, Handler]) -> None:
    """Answer the orchestrator's commands one after the other until "stop" (answered by the caller)."""
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def readable() -> None:
        try:
            inbox.put_nowait(conn.recv())
        except (EOFError, OSError):  # the orchestrator is gone
            loop.remove_reader(conn.fileno())
            inbox.put_nowait(("stop", None))

    loop.add_reader(conn.fileno(), readable)
    try:
        while True:
            cmd, arg = await inbox.get()
            if cmd == "stop":
                return
            try:
                result = await handlers[cmd](arg)
            except Exception:
                conn.send(("error", traceback.format_exc()))
            else:
                conn.send(("ok", result))
    finally:
        with contextlib.suppress(Exception):
            loop.remove_reader(conn.fileno())


# --- the gateway process ----------------------------------------------------------------------------


def gateway_child(config_path: str, conn: Connection) -> None:
    """The gateway with its embedded broker, exactly as `fieldgate run` builds it from a config file."""
    quiet_logs()
    nofile = raise_nofile()
    asyncio.run(_gateway(config_path, nofile, conn))


async def _gateway(config_path: str, nofile: tuple[int, int], conn: Connection) -> None:
    from gateway.app import Gateway
    from gateway.config import load_config

    quiet_logs()  # again: importing bridge.broker resets amqtt's level
    gw = Gateway(load_config(config_path))
    await gw.start()
    assert gw.mcp is not None
    if not await gw.sinks[0].wait_connected(30):
        raise RuntimeError("the gateway's sink did not connect to its broker")

    def status(settle: bool = False) -> dict[str, Any]:
        assert gw.mcp is not None
        if settle:
            gc.collect()
        totals = gw.mcp.totals
        return {
            "time": time.monotonic(),
            "sessions": len(gw.mcp.sessions),
            "rejected": gw.mcp.rejected,
            "frames_in": totals.frames_in,
            "frames_out": totals.frames_out,
            "nacks": totals.nacks_sent,
            "published": sum(s.stats.published for s in gw.sinks),
            "queued": sum(len(o) for o in gw.outboxes),
            "dropped": sum(o.figures()["dropped"] for o in gw.outboxes),
            "rss_kb": rss_kb(),
            "fds": open_fds(),
        }

    async def on_status(arg: Any) -> dict[str, Any]:
        settle, asked = arg
        return {**status(settle), "asked": asked, "lag": time.monotonic() - asked}

    async def on_profile(arg: Any) -> dict[str, Any]:
        kind, seconds = arg
        before = status()
        if kind == "pyinstrument":
            from pyinstrument import Profiler

            # async_mode "disabled": sample the whole thread, not just this task's context.
            profiler = Profiler(interval=0.0005, async_mode="disabled")
            profiler.start()
            await asyncio.sleep(seconds)
            session = profiler.stop()
            after = status()
            result = analyse_samples(session.frame_records)
        else:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
            await asyncio.sleep(seconds)
            prof.disable()
            after = status()
            result = analyse_cprofile(prof)
        result.update(kind=kind, acks=after["frames_out"] - before["frames_out"])
        result["published"] = after["published"] - before["published"]
        result["wall"] = after["time"] - before["time"]
        return result

    broker_pid = getattr(gw.broker, "pid", None)  # BrokerProcess only
    info = {"pid": os.getpid(), "broker_pid": broker_pid, "mcp_port": gw.mcp.port, "nofile": nofile}
    conn.send(("ok", {**info, **status(True)}))
    try:
        await serve_pipe(conn, {"status": on_status, "profile": on_profile})
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(15):
                await gw.stop()
    conn.send(("ok", None))


# --- profile analysis (runs in the gateway process) ----------------------------------------------------

GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("amqtt broker", ("/amqtt/", "/transitions/")),
    ("paho / sink", ("/paho/", "bridge/sink.py")),
    ("MCP session/codec", ("drivers/mcp/", "/crcmod/")),
    ("router / outbox", ("gateway/router.py", "bridge/outbox.py", "gateway/app.py", "gateway/types.py")),
    ("asyncio overhead", ("/asyncio/", "/selectors.py")),
]
IDLE = "idle (epoll wait)"
OTHER = "other"
GROUP_NAMES = [g for g, _ in GROUPS] + [OTHER]


def group_of(path: str) -> str | None:
    """The component a source file belongs to; None for stdlib helpers and builtins (charged to the caller)."""
    for name, needles in GROUPS:
        if any(n in path for n in needles):
            return name
    return None


def short_name(path: str, line: int, func: str) -> str:
    """`package/file.py:line func`, without the install prefix."""
    for marker in ("site-packages/", str(ROOT) + "/", "/lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{line} {func}" if path not in ("<built-in>", "~") else func


def analyse_samples(records: list[tuple[list[str], float]]) -> dict[str, Any]:
    """Group pyinstrument's sampled stacks: self time by component (nearest categorised frame), top entries."""
    from pyinstrument.frame_info import frame_info_get_identifier

    groups: dict[str, float] = defaultdict(float)
    asyncio_for: dict[str, float] = defaultdict(float)  # asyncio's time by the component nearest above it
    self_t: dict[str, float] = defaultdict(float)
    cum_t: dict[str, float] = defaultdict(float)
    total = idle = 0.0
    for stack, t in records:
        frames = []
        for info in stack:
            func, _, rest = frame_info_get_identifier(info).partition("\x00")
            path, _, lineno = rest.partition("\x00")
            frames.append((func, path, int(lineno or 0), group_of(path)))
        total += t
        leaf_func, leaf_path, leaf_line, _ = frames[-1]
        if leaf_func == "epoll.poll":
            idle += t
            continue
        self_t[short_name(leaf_path, leaf_line, leaf_func)] += t
        for func, path, line, g in set(frames):
            if g is not None and g != "asyncio overhead":
                cum_t[short_name(path, line, func)] += t
        owner = next((g for *_, g in reversed(frames) if g is not None), OTHER)
        groups[owner] += t
        if owner == "asyncio overhead":
            above = (g for *_, g in reversed(frames) if g not in (None, "asyncio overhead"))
            asyncio_for[next(above, "the event loop itself")] += t
    return {
        "total": total,
        "idle": idle,
        "busy": total - idle,
        "groups": dict(groups),
        "asyncio_for": dict(asyncio_for),
        "top_self": sorted(self_t.items(), key=lambda kv: -kv[1])[:15],
        "top_cum": sorted(cum_t.items(), key=lambda kv: -kv[1])[:15],
    }


def analyse_cprofile(prof: Any) -> dict[str, Any]:
    """Group cProfile's self times by component (a builtin's or stdlib helper's time goes to its callers, edge by
    edge), and count the tasks, futures and callbacks each component makes asyncio create."""
    import pstats

    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    groups: dict[str, float] = defaultdict(float)
    idle = 0.0
    epoll = "<method 'poll' of 'select.epoll' objects>"

    def charge(func: tuple[str, int, str], amount: float, into: dict[str, float], depth: int, calls: bool) -> None:
        """Charge `amount` (self time, or with `calls` a call count that skips asyncio frames) to components."""
        g = group_of(func[0])
        if g is not None and not (calls and g == "asyncio overhead"):
            into[g] += amount
            return
        callers = stats[func][4] if func in stats else {}
        weight = {c: (edge[1] if calls else edge[3]) for c, edge in callers.items()}  # calls / cumulative time
        total_w = sum(weight.values())
        if depth > 25 or not total_w:
            into["the event loop itself" if calls else OTHER] += amount
            return
        for caller, w in weight.items():
            charge(caller, amount * w / total_w, into, depth + 1, calls)

    for func, (_cc, _nc, tt, _ct, callers) in stats.items():
        if func[2] == epoll:
            idle += tt
            continue
        g = group_of(func[0])
        if g is not None:
            groups[g] += tt
            continue
        # Per caller edge: the part of func's own time spent on behalf of that caller.
        edges = {c: e[2] for c, e in callers.items()}
        if not sum(edges.values()):
            groups[OTHER] += tt
            continue
        for caller, edge_tt in edges.items():
            charge(caller, tt * edge_tt / sum(edges.values()), groups, 1, False)

    made: dict[str, dict[str, float]] = {}
    for what, needle in (("tasks", "create_task"), ("futures", "create_future"), ("callbacks", "__init__")):
        into: dict[str, float] = defaultdict(float)
        for func, (_cc, _nc, _tt, _ct, callers) in stats.items():
            base = func[0].endswith("asyncio/base_events.py") and what != "callbacks"
            handle = func[0].endswith("asyncio/events.py") and func[1] < 60 and what == "callbacks"
            if func[2] == needle and (base or handle):
                for caller, edge in callers.items():
                    charge(caller, edge[1], into, 1, True)
        made[what] = dict(into)
    rows = [(short_name(f[0], f[1], f[2]), tt, nc) for f, (_cc, nc, tt, _ct, _c) in stats.items() if f[2] != epoll]
    busy = sum(groups.values())
    return {
        "total": busy + idle,
        "idle": idle,
        "busy": busy,
        "groups": dict(groups),
        "made": made,
        "top_self": sorted(rows, key=lambda r: -r[1])[:15],
    }


# --- the device clients ------------------------------------------------------------------------------


def clients_child(impl: str, devices: list[tuple[str, str]], window: int, changing: int, conn: Connection) -> None:
    """Device clients for `devices`: raw-codec senders, or McpClient with `window` senders each."""
    quiet_logs()
    raise_nofile()
    asyncio.run(_clients(impl, devices, window, changing, conn))


def data_values(seq: int, changing: int) -> dict[str, Any]:
    """A DATA body's values: `changing` of them move on every frame, one (`running`) never does."""
    flow = round(12.5 + (seq % 1000) * 0.01, 2) if changing else 12.5
    values: dict[str, Any] = {"flow_lpm": flow}
    values.update({f"flow{i}": flow for i in range(1, changing)})
    values["running"] = True
    return values


class Fleet:
    """Counters shared by every device of one client process."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.acked = 0
        self.nacked = 0
        self.lost = 0
        self.latencies: list[float] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.clients: list[Any] = []


async def _clients(impl: str, devices: list[tuple[str, str]], window: int, changing: int, conn: Connection) -> None:
    fleet = Fleet()
    loop = asyncio.get_running_loop()

    async def raw_device(dev: str, token: str, port: int) -> None:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 60)
        fleet.writers.append(writer)
        hello = {"boot_id": uuid.uuid4().hex, "device_id": dev, "token": token, "heartbeat_s": HEARTBEAT_S}
        writer.write(encode(Frame.json(FrameType.HELLO, 1, hello)))
        decoder = Decoder()
        events: list[Any] = []
        async with asyncio.timeout(60):
            while not events:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("closed before the HELLO ACK")
                events = decoder.feed(data)
        if not isinstance(events[0], Frame) or events[0].type != FrameType.ACK:
            raise ConnectionError(f"HELLO answered with {events[0]}")
        # Until the first frame after HELLO the gateway still applies its 10 s HELLO timeout (not 3 x heartbeat_s),
        # so an idle device would be dropped 10 s after its HELLO: one HEARTBEAT now keeps idle sessions up.
        writer.write(encode(Frame(FrameType.HEARTBEAT, 2)))
        fleet.tasks.append(asyncio.create_task(raw_loop(reader, writer, decoder)))

    async def raw_loop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, decoder: Decoder) -> None:
        await fleet.go.wait()
        sent: dict[int, float] = {}  # seq -> loop time of the write, in send order
        seq = 2  # HELLO 1, HEARTBEAT 2
        held = 0  # window slots waiting out a NACK's back-off

        def send_more() -> None:
            nonlocal seq
            out = []
            while len(sent) + held < window:
                seq += 1
                body = {"ts": time.time_ns() // 1_000_000, "values": data_values(seq, changing)}
                out.append(encode(Frame.json(FrameType.DATA, seq, body)))
                sent[seq] = loop.time()
            if out and not writer.is_closing():
                writer.write(b"".join(out))

        def release() -> None:
            nonlocal held
            held -= 1
            send_more()

        send_more()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    fleet.lost += 1
                    return
                now = loop.time()
                for ev in decoder.feed(data):
                    if not isinstance(ev, Frame):
                        continue
                    t = sent.pop(ev.seq, None)
                    if t is None:
                        continue
                    if ev.type == FrameType.ACK:
                        fleet.acked += 1
                        fleet.latencies.append(now - t)
                    else:  # NACK 8, overloaded: "the device retries later"
                        fleet.nacked += 1
                        held += 1
                        loop.call_later(NACK_BACKOFF, release)
                send_more()
                await writer.drain()
        except (ConnectionError, OSError):
            fleet.lost += 1

    async def mcp_device(dev: str, token: str, port: int) -> None:
        from drivers.mcp.client import McpClient

        # No retransmission within the bench: with thousands of frames queued an ACK may take long.
        client = McpClient(
            "127.0.0.1", port, dev, token, heartbeat_s=HEARTBEAT_S, ack_timeout=3600.0, retries=0, window=window
        )
        fleet.clients.append(client)
        await client.start()
        if not await client.wait_connected(60):
            raise ConnectionError(f"McpClient {dev}: no session: {client.last_error}")
        counter = itertools.count(1)  # one per device, so that its values move from frame to frame
        for _ in range(window):
            fleet.tasks.append(asyncio.create_task(mcp_sender(client, counter)))

    async def mcp_sender(client: Any, counter: Iterator[int]) -> None:
        from drivers.mcp.client import McpClientError

        await fleet.go.wait()
        while True:
            t = loop.time()
            try:
                await client.send(data_values(next(counter), changing), ts=time.time_ns() // 1_000_000)
            except McpClientError:
                fleet.nacked += 1
                if client._stopped:
                    return
                await asyncio.sleep(NACK_BACKOFF)
                continue
            fleet.acked += 1
            fleet.latencies.append(loop.time() - t)

    async def on_connect(port: int) -> dict[str, Any]:
        sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
        opener = raw_device if impl == "raw" else mcp_device

        async def one(dev: str, token: str) -> None:
            async with sem:
                await opener(dev, token, port)

        t0 = time.monotonic()
        results = await asyncio.gather(*(one(d, t) for d, t in devices), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        return {
            "connected": len(results) - len(errors),
            "failed": len(errors),
            "first_error": repr(errors[0]) if errors else "",
            "seconds": time.monotonic() - t0,
        }

    async def on_go(_: Any) -> None:
        fleet.go.set()

    async def on_progress(_: Any) -> dict[str, Any]:
        return {"acked": fleet.acked, "nacked": fleet.nacked, "lost": fleet.lost}

    async def on_mark(_: Any) -> None:
        fleet.acked = fleet.nacked = 0
        fleet.latencies = []

    async def on_collect(_: Any) -> dict[str, Any]:
        return {"acked": fleet.acked, "nacked": fleet.nacked, "lost": fleet.lost, "latencies": fleet.latencies}

    conn.send(("ok", os.getpid()))
    await serve_pipe(
        conn,
        {"connect": on_connect, "go": on_go, "progress": on_progress, "mark": on_mark, "collect": on_collect},
    )
    for task in fleet.tasks:
        task.cancel()
    for writer in fleet.writers:
        writer.close()
    for client in fleet.clients:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.stop(), 2)
    conn.send(("ok", None))


# --- the subscriber ----------------------------------------------------------------------------------


def subscriber_child(port: int, topic: str, conn: Connection) -> None:
    """A paho subscriber (QoS 1, its network loop on a thread) that counts messages on `topic`."""
    count = 0

    def on_message(_c: Any, _u: Any, _m: Any) -> None:
        nonlocal count
        count += 1

    c = subscribe(port, topic, on_message, timeout=20)
    conn.send(("ok", os.getpid()))
    while True:
        cmd, _ = conn.recv()
        if cmd == "count":
            conn.send(("ok", (count, time.monotonic())))
        elif cmd == "stop":
            c.disconnect()
            c.loop_stop()
            conn.send(("ok", None))
            return


# --- the bare baseline: EmbeddedBroker in a process, a paho publisher ----------------------------------


def broker_child(port: int, conn: Connection) -> None:
    """bridge/broker.py's EmbeddedBroker on its own event loop, as the gateway starts it."""
    from bridge.broker import EmbeddedBroker

    quiet_logs()  # after the import, which resets amqtt's level

    async def serve() -> None:
        broker = EmbeddedBroker([f"tcp://127.0.0.1:{port}"])
        await broker.start()
        conn.send(("ok", os.getpid()))
        await serve_pipe(conn, {})
        await broker.stop()

    asyncio.run(serve())
    conn.send(("ok", None))


def publisher_child(port: int, window: int, changing: int, conn: Connection) -> None:
    """A bare paho publisher, QoS 1, `window` PUBLISHes in flight, its network loop in this thread."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from gateway.router import encode_json

    def telemetry_payload(seq: int) -> bytes:
        # What the router publishes for one DATA frame, built the same way.
        return encode_json({"ts": time.time_ns() // 1_000_000, "values": data_values(seq, changing)})

    sent: dict[int, float] = {}
    latencies: list[float] = []
    acked = 0

    def on_publish(_c: Any, _u: Any, mid: int, _rc: Any, _p: Any) -> None:
        nonlocal acked
        t = sent.pop(mid, None)
        if t is not None:
            acked += 1
            latencies.append(time.monotonic() - t)

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-bare-{os.getpid()}", protocol=mqtt.MQTTv311)
    c.max_inflight_messages_set(window)
    c.max_queued_messages_set(0)
    c.on_publish = on_publish
    c.connect("127.0.0.1", port, keepalive=60)
    deadline = time.monotonic() + 20
    while not c.is_connected():
        c.loop(0.05)
        if time.monotonic() > deadline:
            raise TimeoutError("the bare publisher did not connect")
    conn.send(("ok", os.getpid()))
    running = False
    seq = 0
    while True:
        if conn.poll():
            cmd, _ = conn.recv()
            if cmd == "go":
                running = True
                conn.send(("ok", None))
            elif cmd == "progress":
                conn.send(("ok", {"acked": acked, "nacked": 0, "lost": 0}))
            elif cmd == "mark":
                acked, latencies = 0, []
                conn.send(("ok", None))
            elif cmd == "collect":
                conn.send(("ok", {"acked": acked, "nacked": 0, "lost": 0, "latencies": latencies}))
            elif cmd == "stop":
                c.disconnect()
                conn.send(("ok", None))
                return
        if running:
            while len(sent) < window:
                seq += 1
                info = c.publish(BARE_TOPIC, telemetry_payload(seq), qos=1)
                sent[info.mid] = time.monotonic()
        c.loop(0.01)


# --- one measured configuration ----------------------------------------------------------------------------


@dataclass
class Row:
    """What one run measured."""

    label: str
    impl: str
    changing: int
    broker: str = "inline"  # a key of LAYOUTS
    clients: int = 0
    sessions: int = 0
    connect_s: float = 0.0
    failed: int = 0
    first_error: str = ""
    nofile: tuple[int, int] = (0, 0)
    fds_idle0: int = 0
    fds_loaded: int = 0
    rss0_kb: int = 0
    rss_idle_kb: int = 0
    rss_loaded_kb: int = 0
    warmup_s: float = 0.0
    steady: bool = True
    wall_s: float = 0.0
    sub_count: int = 0
    acked: int = 0
    nacked: int = 0
    lost: int = 0
    published: int = 0
    gw_nacks: int = 0
    gw_lag: float = 0.0  # longest wait for the gateway's answer to a status request (s)
    dropped: int = 0
    queued: int = 0
    latencies: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # role -> CPU seconds in the window
    profiles: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Frames/s as counted by the subscriber."""
        return self.sub_count / self.wall_s if self.wall_s else float("nan")

    def per_frame_us(self, role: str) -> float:
        """CPU of a role per ACKed frame, in µs."""
        if not self.sub_count:
            return float("nan")
        return self.cpu.get(role, float("nan")) / self.sub_count * 1e6

    def core(self, role: str) -> float:
        """Share of one core a role used during the window, in %."""
        if role not in self.cpu or not self.wall_s:
            return float("nan")
        return self.cpu[role] / self.wall_s * 100

    @property
    def title(self) -> str:
        """The row's label with what differs from the default run."""
        extra = [self.impl] if self.impl != "raw" else []
        extra += [f"broker {LAYOUTS[self.broker]}"] if self.broker != "inline" else []
        extra += [f"{self.changing} chg"] if self.changing != 1 else []
        return self.label + (f" ({', '.join(extra)})" if extra else "")

    def lat_ms(self, q: float) -> float:
        """A DATA->ACK latency quantile in ms."""
        return percentile(self.latencies, q) * 1000


def gw_status(gw: Child, settle: bool = False, timeout: float = READY_TIMEOUT) -> dict[str, Any] | None:
    """The gateway's counters, RSS and descriptors, `lag`: how long its loop took to answer (s); None on timeout.

    A swamped gateway answers late: answers to earlier requests are recognised and skipped.
    """
    asked = time.monotonic()
    gw.send("status", (settle, asked))
    while True:
        left = asked + timeout - time.monotonic()
        if left <= 0 or not gw.conn.poll(left):
            return None
        kind, value = gw.conn.recv()
        if kind == "error":
            raise RuntimeError(f"{gw.name} failed:\n{value}")
        if value["asked"] == asked:
            return value


def warm_up(drivers: list[Child], target: int, min_s: float, max_s: float) -> tuple[float, bool]:
    """Run until `target` frames were answered since go (each device's first window: latencies are then steady);
    False when `max_s` passed first."""
    t0 = time.monotonic()
    while True:
        time.sleep(0.25)
        answered = 0
        for d in drivers:
            got = d.call("progress")
            answered += got["acked"] + got["nacked"]
        elapsed = time.monotonic() - t0
        if elapsed < min_s:
            continue
        if answered >= target:
            return elapsed, True
        if elapsed >= max_s:
            return elapsed, False


def measure(
    row: Row,
    drivers: list[Child],
    sub: Child,
    procs: Mapping[str, Sequence[Child | Pid]],
    gw: Child | None,
    seconds: float,
) -> None:
    """One measurement window: counters and CPU at the start and the end."""
    for d in drivers:
        d.call("mark")
    s0 = gw_status(gw, timeout=STATUS_TIMEOUT) if gw else None
    cpu0 = {role: sum(p.cpu() for p in ps) for role, ps in procs.items()}
    c0, t0 = sub.call("count")
    time.sleep(seconds)
    c1, t1 = sub.call("count")
    cpu1 = {role: sum(p.cpu() for p in ps) for role, ps in procs.items()}
    if gw:
        row.rss_loaded_kb, row.fds_loaded = rss_kb(gw.pid), len(os.listdir(f"/proc/{gw.pid}/fd"))
    got = [d.call("collect") for d in drivers]
    s1 = gw_status(gw, timeout=STATUS_TIMEOUT) if gw else None
    if gw and (s0 is None or s1 is None):
        row.gw_lag = float("inf")  # swamped: its counters are lost
    row.wall_s = t1 - t0
    row.sub_count = c1 - c0
    row.acked = sum(g["acked"] for g in got)
    row.nacked = sum(g["nacked"] for g in got)
    row.lost = sum(g["lost"] for g in got)
    row.latencies = sorted(x for g in got for x in g["latencies"])
    row.cpu = {role: cpu1[role] - cpu0[role] for role in procs}
    if s0 and s1:
        # The gateway answers on its own loop, late when it is swamped: scale its counters to the window.
        scale = row.wall_s / max(1e-9, s1["time"] - s0["time"])
        row.published = round((s1["published"] - s0["published"]) * scale)
        row.gw_nacks = round((s1["nacks"] - s0["nacks"]) * scale)
        row.dropped = round((s1["dropped"] - s0["dropped"]) * scale)
        row.gw_lag = max(s0["lag"], s1["lag"])
        row.queued = s1["queued"]


def run_bare(window: int, changing: int, seconds: float) -> Row:
    """paho publisher -> EmbeddedBroker (own process) -> paho subscriber."""
    row = Row("bare paho", "paho", changing, clients=1)
    port = free_port()
    children: list[Child] = []
    try:
        broker = Child("broker", broker_child, port)
        children.append(broker)
        broker.wait(READY_TIMEOUT)
        sub = Child("subscriber", subscriber_child, port, TELEMETRY)
        pub = Child("publisher", publisher_child, port, window, changing)
        children += [sub, pub]
        sub.wait(READY_TIMEOUT)
        pub.wait(READY_TIMEOUT)
        pub.call("go")
        row.warmup_s, row.steady = warm_up([pub], 4 * window, 1.5, 10)
        measure(row, [pub], sub, {"broker": [broker], "clients": [pub], "subscriber": [sub]}, None, seconds)
        row.published = row.acked
        row.rss_loaded_kb = rss_kb(broker.pid)
    finally:
        stop_all(children)
    return row


def write_config(path: Path, state: Path, mqtt_port: int, mcp_port: int, devices: int, broker: str) -> None:
    """A gateway config: embedded broker (`broker.process` inline or separate) and default sink, or (external) a
    sink to a broker the bench runs; MCP with `devices` allowed devices."""
    lines = [f"gateway: {{id: {GATEWAY_ID}, state_dir: {state}}}"]
    if broker == "external":
        lines += ["broker: {enabled: false}", f"northbound: [{{name: local, url: 'mqtt://127.0.0.1:{mqtt_port}'}}]"]
    else:
        lines += [f'broker: {{process: {broker}, listeners: ["tcp://127.0.0.1:{mqtt_port}"]}}']
    lines += [
        "mcp:",
        f"  listen: 127.0.0.1:{mcp_port}",
        "  max_sessions: 1000000",
        # Every bench client connects from 127.0.0.1, all at once: the per-address login limits that hold off
        # a flood would hold off the bench (hostile_bench.py measures those limits).
        "  max_pending: 100000",
        "  max_pending_per_ip: 100000",
        "  devices:",
    ]
    lines += [f"    - {{id: d{i}, token: token-{i:010d}}}" for i in range(devices)]
    path.write_text("\n".join(lines) + "\n")


def wait_quiet(gw: Child, timeout: float) -> dict[str, Any]:
    """Wait until the gateway's outboxes are empty (online statuses published), then settle and read RSS."""
    deadline = time.monotonic() + timeout
    while True:
        st = gw_status(gw)
        if st is None:
            raise TimeoutError("the gateway does not answer")
        if st["queued"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    time.sleep(0.5)
    st = gw_status(gw, settle=True)
    if st is None:
        raise TimeoutError("the gateway does not answer")
    return st


def run_mcp(
    clients: int | None,
    impl: str,
    changing: int,
    seconds: float,
    tmp: Path,
    profile: float = 0.0,
    warmup_max: float = 25.0,
    broker: str = "inline",
) -> Row:
    """Gateway + device clients + subscriber; `clients` None: as many sessions as descriptors allow.

    `broker`: a key of LAYOUTS. "external" is a what-if: EmbeddedBroker in a process the bench spawns and the
    gateway's sink pointed at it (`broker.enabled: false` and a northbound URL)."""
    label = f"{'max' if clients is None else clients}"
    row = Row(label, impl, changing, broker=broker)
    mqtt_port, mcp_port = free_port(), free_port()
    config = tmp / f"mcp-{label}-{impl}-{changing}-{broker}.yaml"
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    write_config(config, tmp / "state", mqtt_port, mcp_port, hard if clients is None else clients, broker)
    children: list[Child] = []
    try:
        brokers: list[Child | Pid] = []
        if broker == "external":
            spawned = Child("broker", broker_child, mqtt_port)
            children.append(spawned)
            brokers.append(spawned)
            spawned.wait(READY_TIMEOUT)
        gw = Child("gateway", gateway_child, str(config))
        children.append(gw)
        info = gw.wait(READY_TIMEOUT)
        row.nofile = tuple(info["nofile"])  # type: ignore[assignment]
        if info["broker_pid"]:  # process: separate, the gateway's own child
            brokers.append(Pid(info["broker_pid"]))
        sub = Child("subscriber", subscriber_child, mqtt_port, TELEMETRY)
        children.append(sub)
        sub.wait(READY_TIMEOUT)
        idle0 = wait_quiet(gw, 30)
        row.rss0_kb, row.fds_idle0 = idle0["rss_kb"], idle0["fds"]
        n = clients if clients is not None else row.nofile[0] - idle0["fds"] - FD_RESERVE
        row.clients = n
        nprocs = max(1, math.ceil(n / CLIENT_FDS_PER_PROC))
        devices = [(f"d{i}", f"token-{i:010d}") for i in range(n)]
        drivers = [
            Child(f"clients{k}", clients_child, impl, devices[k::nprocs], MAX_OUTSTANDING, changing)
            for k in range(nprocs)
        ]
        children += drivers
        for d in drivers:
            d.wait(READY_TIMEOUT)
        progress(f"  {n} {impl} client(s) in {nprocs} process(es) connecting ...")
        t0 = time.monotonic()
        for d in drivers:
            d.send("connect", mcp_port)
        done = [d.wait(READY_TIMEOUT * 3, "connect") for d in drivers]
        row.connect_s = time.monotonic() - t0
        row.failed = sum(x["failed"] for x in done)
        row.first_error = next((x["first_error"] for x in done if x["first_error"]), "")
        idle = wait_quiet(gw, 120)
        row.sessions = idle["sessions"]
        row.rss_idle_kb = idle["rss_kb"]
        progress(f"  {row.sessions} sessions held; full windows for {seconds:g} s ...")
        for d in drivers:
            d.call("go")
        # At max sessions the first windows alone would take minutes to answer: a short fixed warm-up.
        longest = MAX_WARMUP if clients is None else warmup_max
        row.warmup_s, row.steady = warm_up(drivers, row.sessions * MAX_OUTSTANDING, min(3.0, longest), longest)
        procs: dict[str, Sequence[Child | Pid]] = {
            "gateway": [gw],
            "broker": brokers,
            "clients": drivers,
            "subscriber": [sub],
        }
        measure(row, drivers, sub, procs, gw, seconds)
        if profile:
            for kind in ("pyinstrument", "cprofile"):
                if kind == "pyinstrument" and not _have("pyinstrument"):
                    continue
                progress(f"  profiling the gateway with {kind} for {profile:g} s ...")
                row.profiles.append(gw.call("profile", (kind, profile), timeout=profile + 120))
    finally:
        stop_all(children)
    return row


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# --- the report -------------------------------------------------------------------------------------------


def header(args: argparse.Namespace) -> None:
    """What ran where, so that the numbers can be compared later."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    print_header(
        "MCP",
        {name: package_version(name) for name in ("amqtt", "paho-mqtt", "pyinstrument")},
        [
            f"window {MAX_OUTSTANDING} DATA per device, measurement windows {args.seconds:g} s, DATA values: "
            f"{args.changing} changing + 1 constant; RLIMIT_NOFILE {soft}/{hard} (children raise soft to hard)"
        ],
        skews="every figure",
    )


def report_bare(bare: Row, window: int) -> None:
    """Figure 1."""
    heading(f"1. Bare baseline: paho publisher (QoS 1, window {window}) -> EmbeddedBroker process -> paho subscriber")
    print_table(
        [
            "msgs/s",
            "p50 ms",
            "p99 ms",
            "broker µs/msg",
            "publisher µs/msg",
            "sub µs/msg",
            "broker core%",
            "broker RSS MB",
        ],
        [
            [
                bare.rate,
                bare.lat_ms(0.5),
                bare.lat_ms(0.99),
                bare.per_frame_us("broker"),
                bare.per_frame_us("clients"),
                bare.per_frame_us("subscriber"),
                bare.core("broker"),
                bare.rss_loaded_kb / 1024,
            ]
        ],
    )
    note("msgs/s: counted by the subscriber; latency: publish -> PUBACK at the publisher; CPU: /proc over the window.")


def report_mcp(rows: list[Row], bare: Row | None, high_water: int) -> None:
    """Figure 2: throughput, latency, CPU."""
    heading("2. MCP end to end: devices (full window) -> gateway (MCP, router, sink, embedded amqtt) -> subscriber")
    table = []
    for r in rows:
        table.append(
            [
                r.label,
                "McpClient" if r.impl == "mcpclient" else r.impl,
                LAYOUTS[r.broker],
                r.changing,
                r.sessions,
                r.rate,
                r.acked / r.wall_s if r.wall_s else float("nan"),
                (r.rate / bare.rate) if bare and bare.rate else float("nan"),
                r.lat_ms(0.5),
                r.lat_ms(0.99),
                r.nacked / r.wall_s if r.wall_s else float("nan"),
                r.published / r.sub_count if r.sub_count else float("nan"),
                r.per_frame_us("gateway"),
                r.core("gateway"),
                r.core("broker") if r.broker != "inline" else "-",
                r.per_frame_us("clients"),
                r.core("clients"),
                r.core("subscriber"),
                f"{r.warmup_s:.0f}s" + ("" if r.steady else " NO"),
            ]
        )
    print_table(
        [
            "clients",
            "client",
            "broker",
            "chg",
            "sessions",
            "ACKed/s",
            "dev ACK/s",
            "÷ bare",
            "p50 ms",
            "p99 ms",
            "NACK/s",
            "pub/fr",
            "gw µs/fr",
            "gw core%",
            "brk core%",
            "cli µs/fr",
            "cli core%",
            "sub core%",
            "warm-up",
        ],
        table,
    )
    note("client: raw = a task per device speaking the codec; McpClient = drivers/mcp/client.py with 32 senders each.")
    note("broker: in gw = broker.process: inline, the embedded amqtt on the gateway's loop; gw child = broker.process:")
    note("separate, the gateway runs it as a child process; own proc = what-if: EmbeddedBroker in a process the bench")
    note("spawns, the sink pointed at it (broker.enabled: false). chg: DATA values that change on every frame.")
    note("ACKed/s: telemetry counted by the subscriber per second; dev ACK/s: ACKs the devices read (should match).")
    note("÷ bare: ACKed/s over figure 1's msgs/s. p50/p99: DATA written -> its ACK read, at the device;")
    note("with full windows they follow Little's law: sessions x 32 / rate.")
    note("pub/fr: the sink's PUBACKed publishes per ACKed frame (telemetry + one retained message per changed value).")
    note("µs/fr: CPU per ACKed frame of the gateway / device-client processes; core%: share of one core (2 in all).")
    note("warm-up: from go until as many frames were answered as there are in flight (NO: cut short, not steady).")
    for r in rows:
        if r.failed or r.lost:
            note(f"{r.title}: {r.failed} connects failed {r.first_error[:80]}; {r.lost} connections lost")
        if r.gw_lag == float("inf"):
            note(f"{r.title}: the gateway's loop did not answer a status request within {STATUS_TIMEOUT:g} s (swamped)")
        elif r.dropped or r.gw_nacks:
            note(
                f"{r.title}: in the window the gateway NACKed {r.gw_nacks:,} DATA and its outbox dropped {r.dropped:,} "
                f"messages (queued at the end: {r.queued:,}); its loop answered a status request after {r.gw_lag:.1f} s"
            )
    # Every shipped-layout run is a row, whatever its rate: 0 frames/s is a missed goal, a run that failed or a
    # baseline that did not measure (NaN) is "not measured"; none may drop out of the table.
    base = bare.rate if bare and math.isfinite(bare.rate) and bare.rate > 0 else float("nan")
    base_text = "bare paho -> amqtt: failed" if math.isnan(base) else f"bare paho -> amqtt {base:,.0f} msg/s"
    shipped = [r for r in rows if r.impl == "raw" and r.broker == rows[0].broker and r.changing == rows[0].changing]
    for r in shipped:
        record(
            "mcp",
            f"ACKed DATA frames/s, {clients_text(r)} x window {MAX_OUTSTANDING}",
            r.rate,
            "frames/s",
            ratio=r.rate / base,
            versus=base_text,
            goal=GOAL if r.label != "max" else None,
        )
    if math.isnan(base):
        return
    shipped = [r for r in shipped if r.rate > 0]
    if shipped:
        best = max(shipped, key=lambda r: r.rate)
        verdict = "meets" if best.rate / base >= GOAL else "is BELOW"
        summary(
            f"best as shipped: {best.rate:,.0f} ACKed frames/s at {best.label} client(s) = "
            f"{best.rate / base:.2f} of bare paho ({base:,.0f} msgs/s): {verdict} the goal of {GOAL}"
        )
    for r in rows:
        in_flight = r.sessions * MAX_OUTSTANDING
        messages = in_flight * (1 + r.changing)
        if messages > high_water and (r.gw_nacks or r.nacked or r.gw_lag == float("inf") or not r.rate):
            summary(
                f"{r.title}: {r.sessions:,} sessions x {MAX_OUTSTANDING} = {in_flight:,} DATA in flight x "
                f"{1 + r.changing} messages > the outbox's high-water mark {high_water:,}: the rest goes through "
                f"the spool, and {r.rate:,.0f} frames/s got through"
            )
    for r in rows:
        if r.broker != "inline" or r.impl != "raw" or r.changing == rows[0].changing:
            continue
        summary(
            f"{r.title}: {r.rate:,.0f} frames/s = {r.rate / base:.2f} of bare, {r.per_frame_us('gateway'):.0f} µs/frame"
        )
    for r in rows:
        if r.broker != "inline":
            summary(
                f"{r.title}: {r.rate:,.0f} frames/s = {r.rate / base:.2f} of bare; "
                f"gateway {r.per_frame_us('gateway'):.0f} µs/frame at {r.core('gateway'):.0f}% of a core, "
                f"broker {r.per_frame_us('broker'):.0f} µs/frame at "
                f"{r.core('broker'):.0f}%"
            )


def clients_text(r: Row) -> str:
    """The client count a run asked for, as the suite's table names it: "1,000 clients", or the
    descriptor limit's count, which the machine sets."""
    if r.label == "max":
        return f"as many clients as descriptors allow ({r.sessions:,})"
    n = int(r.label)
    return f"{n:,} client{'' if n == 1 else 's'}"


def report_sessions(rows: list[Row]) -> None:
    """Figure 3: sessions and memory."""
    heading("3. Sessions and memory (gateway process)")
    table = []
    for r in rows:
        if r.impl != "raw" or r.changing != rows[0].changing or r.broker != rows[0].broker:
            continue
        per = (r.rss_idle_kb - r.rss0_kb) / r.sessions if r.sessions else float("nan")
        table.append(
            [
                r.label,
                r.clients,
                r.sessions,
                r.connect_s,
                r.rss0_kb / 1024,
                r.rss_idle_kb / 1024,
                per,
                r.rss_loaded_kb / 1024,
                r.fds_idle0,
                r.fds_loaded,
                f"{r.nofile[0]}/{r.nofile[1]}",
            ]
        )
    print_table(
        [
            "clients",
            "opened",
            "held",
            "connect s",
            "RSS 0 MB",
            "RSS idle MB",
            "KiB/idle session",
            "RSS loaded MB",
            "fds at 0",
            "fds loaded",
            "NOFILE",
        ],
        table,
    )
    note("RSS idle: K sessions after HELLO, outbox drained, gc.collect(); KiB/idle session = (RSS idle - RSS 0) / K;")
    note(f"it includes amqtt's retained `status` per device. max = NOFILE soft limit - fds at 0 - {FD_RESERVE}.")
    for r in rows:
        if r.label != "max" or r.impl != "raw" or r.changing != rows[0].changing or r.broker != rows[0].broker:
            continue
        # A max run that held no session has no per-session figure: NaN, "not measured", never a dropped row.
        per = (r.rss_idle_kb - r.rss0_kb) / r.sessions if r.sessions else float("nan")
        record("mcp", "concurrent sessions held (limit: file descriptors)", r.sessions or float("nan"), "sessions")
        record("mcp", "gateway RSS per idle session", per, "KiB")
        if r.sessions:
            summary(
                f"{r.sessions:,} concurrent sessions held (limit: file descriptors, RLIMIT_NOFILE hard "
                f"{r.nofile[1]:,}); {per:.1f} KiB per idle session -> 100,000 sessions would need "
                f"~{per * 100_000 / 1024**2:.1f} GiB "
                f"and NOFILE > 100k"
            )


def report_profile(row: Row) -> None:
    """Figure 4: where the gateway's time goes."""
    if not row.profiles:
        return
    heading(f"4. Where the gateway's time goes ({row.label} clients, full windows)")
    per_frame = row.per_frame_us("gateway")
    by_kind = {p["kind"]: p for p in row.profiles}
    kinds = [k for k in ("pyinstrument", "cprofile") if k in by_kind]
    first = by_kind[kinds[0]]

    def share(p: dict[str, Any], seconds: float) -> float:
        return seconds / p["busy"] * 100 if p["busy"] else float("nan")

    table = []
    for g in GROUP_NAMES:
        line: list[object] = [g] + [share(by_kind[k], by_kind[k]["groups"].get(g, 0.0)) for k in kinds]
        line.append(share(first, first["groups"].get(g, 0.0)) / 100 * per_frame)
        table.append(line)
    print_table(["component"] + [f"{k} %" for k in kinds] + [f"µs/frame (of {per_frame:.0f})"], table)
    for kind in kinds:
        p = by_kind[kind]
        note(
            f"{kind}: {p['wall']:.1f} s, {p['acks'] / p['wall']:.0f} ACKs/s while profiled, "
            f"{p['published'] / max(1, p['acks']):.2f} publishes per ACK; the loop was busy "
            f"{p['busy'] / max(1e-9, p['total']):.0%} of the time, in epoll wait "
            f"{p['idle'] / max(1e-9, p['total']):.0%}"
        )
    note("%: share of the loop's busy time. A stdlib or builtin frame's time goes to the component of the nearest")
    note("frame above it (pyinstrument) or of its callers (cProfile); asyncio's own code, including the socket")
    note(f"calls of its transports, is 'asyncio overhead'. µs/frame: the {kinds[0]} share of figure 2's gateway CPU.")
    if "asyncio_for" in first:
        print()
        print("  asyncio overhead by the component that called into it (pyinstrument, % of busy):")
        rows = sorted(first["asyncio_for"].items(), key=lambda kv: -kv[1])
        print_table(
            ["on behalf of", "% of busy", "µs/frame"],
            [[g, share(first, t), share(first, t) / 100 * per_frame] for g, t in rows],
        )
        note("'the event loop itself': _run_once, handle dispatch and task steps, which no component frame is above.")
    if "cprofile" in by_kind:
        p = by_kind["cprofile"]
        made = p["made"]
        comps = sorted({g for counts in made.values() for g in counts}, key=lambda g: -made["tasks"].get(g, 0.0))
        print()
        print("  asyncio objects made per ACKed frame, by the component that asked for them (cProfile call counts):")
        acks = max(1, p["acks"])
        print_table(
            ["component", "tasks", "futures", "callbacks (Handle)"],
            [[g] + [made[w].get(g, 0.0) / acks for w in ("tasks", "futures", "callbacks")] for g in comps]
            + [["total"] + [sum(made[w].values()) / acks for w in ("tasks", "futures", "callbacks")]],
        )
    if "pyinstrument" in by_kind:
        p = by_kind["pyinstrument"]
        print()
        print("  top self time (pyinstrument samples, % of busy):")
        print_table(["function", "self %"], [[name, share(p, t)] for name, t in p["top_self"]])
        print()
        print("  top cumulative time of component functions (pyinstrument, % of busy):")
        print_table(["function", "cum %"], [[name, share(p, t)] for name, t in p["top_cum"]])
    if "cprofile" in by_kind:
        p = by_kind["cprofile"]
        print()
        print("  top self time (cProfile: deterministic, it inflates small Python functions; calls per ACKed frame):")
        print_table(
            ["function", "self %", "calls/frame"],
            [[name, share(p, tt), nc / max(1, p["acks"])] for name, tt, nc in p["top_self"]],
        )


def main(argv: list[str] | None = None) -> int:
    """Run the baseline and every client count, print the report."""
    from bridge.outbox import Outbox
    from gateway.config.schema import BrokerSection

    outbox_window = inspect.signature(Outbox).parameters["window"].default
    shipped_layout = BrokerSection.model_fields["process"].default
    parser = argparse.ArgumentParser(description="MCP end-to-end benchmark (see hil/bench/README.md).")
    parser.add_argument("--clients", default="1,100,1000,max", help="client counts, comma-separated; max = fd limit")
    parser.add_argument(
        "--seconds", type=float, default=DEFAULT_SECONDS, help=f"measurement window (default {DEFAULT_SECONDS:g})"
    )
    parser.add_argument("--changing", type=int, default=1, help="DATA values that change on every frame (default 1)")
    parser.add_argument(
        "--window",
        type=int,
        default=outbox_window,
        help=f"bare publisher's window (default: Outbox's, {outbox_window})",
    )
    parser.add_argument("--profile-at", default="100", help="client count whose gateway is profiled ('' for none)")
    parser.add_argument("--profile-seconds", type=float, default=4.0, help="length of each profile (default 4)")
    parser.add_argument(
        "--compare-at",
        default="100",
        help="client count also run with McpClient, constant values, the broker in its own process ('' for none)",
    )
    parser.add_argument(
        "--broker",
        choices=list(LAYOUTS),
        default=shipped_layout,
        help=f"the embedded broker's layout for the main runs (default: the config's, {shipped_layout})",
    )
    parser.add_argument("--warmup-max", type=float, default=25.0, help="longest warm-up per run (default 25 s)")
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be > 0")
    counts: list[int | None] = []
    for c in args.clients.split(","):
        c = c.strip()
        if c:
            counts.append(None if c == "max" else int(c))
    started = time.monotonic()
    header(args)
    rows: list[Row] = []
    failures = 0

    def attempt(run: Callable[[], Row], failed: Row) -> Row:
        """One run; when it fails, its traceback and `failed` (no window: rate NaN) instead, and on to the next,
        so that the table shows the failure as "not measured" rows and the other runs still count."""
        nonlocal failures
        try:
            return run()
        except Exception:
            failures += 1
            traceback.print_exc()
            return failed

    with tempfile.TemporaryDirectory(prefix="fieldgate-mcpbench-") as tmp_name:
        tmp = Path(tmp_name)
        progress("bare paho baseline ...")
        bare = attempt(
            lambda: run_bare(args.window, args.changing, args.seconds), Row("bare paho", "paho", args.changing)
        )
        for n in counts:
            label = "max" if n is None else str(n)
            progress(f"MCP, {label} client(s) ...")
            profiled = args.profile_at and label == args.profile_at
            profile = args.profile_seconds if profiled else 0.0
            rows.append(
                attempt(
                    functools.partial(
                        run_mcp, n, "raw", args.changing, args.seconds, tmp, profile, args.warmup_max, args.broker
                    ),
                    Row(label, "raw", args.changing, broker=args.broker),
                )
            )
        if args.compare_at:
            n = None if args.compare_at == "max" else int(args.compare_at)
            others = [b for b in LAYOUTS if b != args.broker]
            variants = [("mcpclient", args.changing, args.broker)] + [("raw", args.changing, b) for b in others]
            if args.changing:
                variants += [("raw", 0, b) for b in [args.broker, *others]]
            for impl, changing, broker in variants:
                what = f"{impl}, {changing} changing value(s), broker {LAYOUTS[broker]}"
                progress(f"MCP, {args.compare_at} client(s), {what} ...")
                rows.append(run_mcp(n, impl, changing, args.seconds, tmp, 0.0, args.warmup_max, broker))
    report_bare(bare, args.window)
    report_mcp(rows, bare, inspect.signature(Outbox).parameters["high_water"].default)
    report_sessions(rows)
    for r in rows:
        report_profile(r)
    print()
    if failures:
        print(f"{failures} run(s) failed: their figures are not measured (tracebacks above)")
    print(run_summary(started))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
