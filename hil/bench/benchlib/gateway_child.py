"""The gateway in a spawned child process, built from a config file exactly as `fieldgate run` builds it, that
answers the orchestrator's "status" (its counters, RSS, descriptors) and "profile" (pyinstrument or cProfile
for a while, grouped by component)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import time
from multiprocessing.connection import Connection
from typing import Any

from .children import Child, serve_pipe
from .procs import open_fds, quiet_logs, raise_nofile, rss_kb
from .profiling import analyse_cprofile, analyse_samples

STATUS_WAIT = 120.0  # s the orchestrator waits for a gateway's status by default (it may be swamped)


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
            "dropped": sum(o.snapshot().dropped for o in gw.outboxes),
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


# --- the orchestrator's side ---------------------------------------------------------------------------


def gateway_status(gw: Child, settle: bool = False, timeout: float = STATUS_WAIT) -> dict[str, Any] | None:
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


def wait_quiet(gw: Child, timeout: float) -> dict[str, Any]:
    """Wait until the gateway's outboxes are empty (online statuses published), then settle and read RSS."""
    deadline = time.monotonic() + timeout
    while True:
        st = gateway_status(gw)
        if st is None:
            raise TimeoutError("the gateway does not answer")
        if st["queued"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    time.sleep(0.5)
    st = gateway_status(gw, settle=True)
    if st is None:
        raise TimeoutError("the gateway does not answer")
    return st
