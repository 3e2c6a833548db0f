"""Durability as the kernel sees it: a real `fieldgate run` under strace, both upstream brokers down, and an
MCP device that sends DATA frames one at a time, each after the ACK of the one before.

kill -9 tests cannot tell `synchronous=FULL` from `OFF`: the kernel keeps what a dead process wrote in its
page cache, and only a lost page cache (a power cut) would show the difference. The system calls do show it.
For every frame the trace must hold, in this order:

1. the recvfrom() on the device's socket that brought the frame in;
2. for each sink: a pwrite64() of the frame's value into that sink's spool (the WAL), and after it an
   fdatasync()/fsync() of that sink's spool file (SQLite in WAL mode with synchronous=FULL syncs the
   `-wal` file at every commit);
3. the sendto() of the frame's ACK on the device's socket.

And the spool's own fsync counter (`fieldgate_spool_fsyncs_total` on /metrics, a model of what SQLite does:
bridge/spool_io.py) must equal strace's count of fsync+fdatasync calls on that sink's files between two
readings of /metrics taken while the gateway is idle.

Why the trace's order is the order things happened: see tests/bridge/strace_log.py. In short, a traced
thread waits at each traced call's exit until strace has written it; the spool's worker thread therefore
cannot wake the event loop (which then sends the ACK) before its fdatasync's return is in the trace.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from drivers.mcp.codec import Decoder, Frame, FrameType, encode

import configs  # qualified: `sink` and `config` are names of this file's own
from configs import Section
from helpers import free_port, now_ms

# The trace's parser is strace_log.py next to this file (tests/ itself is on the path already).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from strace_log import Call, parse  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SINKS = ("up", "backup")
TOKEN = "durability-token-0001"
FRAMES = 5  # DATA frames, seq 2 .. FRAMES + 1 (the HELLO is seq 1)
SYNCS = ("fsync", "fdatasync")
# What strace records. Not read(): the interpreter's imports read megabytes of .pyc files, and asyncio
# reads sockets with recv() (recvfrom) anyway. A product that read the device with read() would make the
# test fail (no read of the frame found), not pass.
TRACED = "recvfrom,recvmsg,sendto,sendmsg,write,writev,pwrite64,pwritev,fsync,fdatasync"


def durability_config(state: Path, http: int, dead: int, mcp_port: int) -> Section:
    """Two sinks, the second much slower to commit: an ACK that waited for the first sink alone would leave long
    before the second's fsync, and the trace would show it. Both brokers are `dead` (a port nobody listens on)."""
    sinks = [
        configs.sink("up", f"mqtt://127.0.0.1:{dead}", spool={"commit_window": "20ms"}),
        configs.sink("backup", f"mqtt://127.0.0.1:{dead}", spool={"commit_window": "250ms"}),
    ]
    return configs.config(
        id="dur",
        state_dir=state,
        http=f"127.0.0.1:{http}",
        broker=configs.broker(enabled=False),
        northbound=sinks,
        mcp=configs.mcp(mcp_port, devices=[configs.mcp_device("pump-1", token=TOKEN)]),
    )


Figures = dict[str, dict[str, float]]  # sink -> metric name -> value


@dataclass
class Traced:
    """One traced run of the gateway: the calls strace saw and what the test did meanwhile."""

    calls: list[Call]
    mcp_port: int
    http_port: int
    device_port: int  # the device's own end of its connection
    markers: dict[int, bytes]  # DATA seq -> the unique value the frame carried
    figures: list[Figures]  # /metrics read before the first DATA and after the last ACK
    readings: list[int]  # which /metrics replies (0-based, in order) those were
    spools: dict[str, Path]  # sink -> its spool file

    def on_device(self, name: str) -> list[Call]:
        """Calls `name` on the gateway's end of the device's connection."""
        end = f":{self.mcp_port}->127.0.0.1:{self.device_port}]"
        return [c for c in self.calls if c.name == name and c.target.endswith(end)]

    def http_exchanges(self) -> list[tuple[Call, Call]]:
        """(the recvfrom() of the request, the sendto() of the reply) of each status server's answer, in order."""
        served = f"127.0.0.1:{self.http_port}->"
        out: list[tuple[Call, Call]] = []
        request: dict[str, Call] = {}
        for c in self.calls:
            if served not in c.target:
                continue
            if c.name == "recvfrom" and c.data:
                request.setdefault(c.target, c)  # one request per connection: urllib closes it after the reply
            elif c.name == "sendto" and c.target in request:
                out.append((request.pop(c.target), c))
        return out

    def sink_of(self, call: Call) -> str | None:
        """The sink whose spool file (the database, its -wal or -journal) `call`'s descriptor is."""
        for sink, db in self.spools.items():
            if call.target in (str(db), f"{db}-wal", f"{db}-journal"):
                return sink
        return None

    def syncs(self, sink: str) -> list[Call]:
        """fsync/fdatasync of `sink`'s spool, and of the spool directory by a thread that last synced that sink's.

        SQLite syncs the directory along with a connection's first sync of a new WAL; the spool counts it.
        """
        out: list[Call] = []
        last: dict[int, str | None] = {}  # thread -> the sink whose file it synced last
        folder = str(self.spools[sink].parent)
        for c in self.calls:
            if c.name not in SYNCS or c.result != 0:
                continue
            owner = self.sink_of(c)
            if owner is not None:
                last[c.tid] = owner
            elif c.target == folder:
                owner = last.get(c.tid)
            if owner == sink:
                out.append(c)
        return out


def read_figures(http_port: int) -> Figures:
    """The spool and sink figures of every sink on /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    out: Figures = {sink: {} for sink in SINKS}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            sink = sample.labels.get("sink")
            if sink in out:
                out[sink][sample.name] = sample.value
    return out


def idle_figures(http_port: int) -> tuple[Figures, int]:
    """/metrics once every sink is idle and the figures are fresh; also how many reads that took.

    The spool's figures on /metrics are a snapshot the outbox takes after each commit (and every second);
    its `spooled` counter and `queued` gauge are live. With nothing queued or being committed, and the
    snapshot's count equal to what was spooled (this spool was empty at start, and nothing leaves it while
    the brokers are down), the snapshot holds every commit so far and no commit is under way.
    """
    deadline = time.monotonic() + 30
    reads = 0
    while True:
        figures = read_figures(http_port)
        reads += 1
        if all(
            f["fieldgate_sink_queued"] == 0 and f["fieldgate_spool_messages"] == f["fieldgate_sink_spooled_total"]
            for f in figures.values()
        ):
            return figures, reads
        assert time.monotonic() < deadline, f"the sinks never went idle: {figures}"
        time.sleep(0.05)


class Device:
    """An MCP device on a plain blocking socket: exact frames out, decoded frames in."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.decoder = Decoder()
        self.frames: list[Frame] = []

    @property
    def port(self) -> int:
        """Its own end's port."""
        return int(self.sock.getsockname()[1])

    def exchange(self, frame: Frame) -> Frame:
        """Send a frame; the gateway's answer."""
        self.sock.sendall(encode(frame))
        while not self.frames:
            data = self.sock.recv(65536)
            assert data, "the gateway closed the connection"
            for event in self.decoder.feed(data):
                assert isinstance(event, Frame), event
                self.frames.append(event)
        return self.frames.pop(0)

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()


def children(pid: int) -> list[int]:
    """The child processes of `pid` (Linux /proc)."""
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@contextlib.contextmanager
def traced_gateway(tmp: Path, trace: Path) -> Iterator[tuple[int, int]]:
    """`fieldgate run` under strace, until it says it is up; yields (MCP port, HTTP port); SIGTERM at the end."""
    # The upstream brokers: a port bound but not listening refuses every connection, and no other test can
    # take it while it is held.
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    log = tmp / "gateway.log"
    try:
        for _attempt in range(3):  # the MCP and HTTP ports are chosen free; another test may take one first
            mcp, http = free_port(), free_port()
            config = configs.write(durability_config(tmp / "state", http, dead.getsockname()[1], mcp), tmp)
            cmd = ["strace", "-f", "--seccomp-bpf", "-ttt", "-yy", "-xx", "-s", "65536", "-e", f"trace={TRACED}"]
            cmd += ["-o", str(trace), sys.executable, "-m", "gateway", "run", "-c", str(config)]
            with log.open("wb") as out:
                strace = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
            try:
                deadline = time.monotonic() + 60
                while "fieldgate dur up" not in (text := log.read_text(errors="replace")):
                    if strace.poll() is not None:
                        break
                    assert time.monotonic() < deadline, f"the gateway did not come up:\n{text}"
                    time.sleep(0.05)
                else:
                    yield mcp, http
                    return
                if "ptrace" in text or "PTRACE" in text:
                    pytest.skip(f"strace cannot trace here: {text.strip().splitlines()[0]}")
                if "Address already in use" not in text and "cannot listen" not in text:
                    raise AssertionError(f"the gateway exited before it was up:\n{text}")
            finally:
                stop_traced(strace)
        raise AssertionError(f"no free ports in 3 attempts:\n{log.read_text(errors='replace')}")
    finally:
        dead.close()


def stop_traced(strace: subprocess.Popen[bytes]) -> None:
    """SIGTERM the gateway (strace's child: strace itself ignores SIGTERM while it traces); strace then ends."""
    if strace.poll() is None:
        for pid in children(strace.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    try:
        strace.wait(timeout=30)
    except subprocess.TimeoutExpired:
        for pid in children(strace.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        strace.kill()
        strace.wait()
        raise AssertionError("the traced gateway did not stop within 30 s of SIGTERM") from None


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Traced:
    """One gateway run under strace: /metrics, a HELLO, FRAMES DATA frames one at a time, /metrics again."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (Debian package strace; `make test` installs it)")
    tmp = tmp_path_factory.mktemp("durability").resolve()
    trace = tmp / "strace.log"
    nonce = uuid.uuid4().hex[:12]
    markers = {seq: f"durable-{seq:04d}-{nonce}".encode() for seq in range(2, FRAMES + 2)}
    with traced_gateway(tmp, trace) as (mcp_port, http_port):
        first, reads = idle_figures(http_port)
        device = Device(mcp_port)
        try:
            hello = {"boot_id": nonce, "device_id": "pump-1", "token": TOKEN}
            answer = device.exchange(Frame.json(FrameType.HELLO, 1, hello))
            assert answer.type == FrameType.ACK, answer
            for seq, marker in markers.items():
                data = {"ts": now_ms(), "values": {"mark": marker.decode()}}
                answer = device.exchange(Frame.json(FrameType.DATA, seq, data))
                assert (answer.type, answer.seq) == (FrameType.ACK, seq), answer
            device_port = device.port
        finally:
            device.close()
        last, more = idle_figures(http_port)
    spools = {sink: tmp / "state" / "spool" / f"{sink}.sqlite" for sink in SINKS}
    calls = parse(trace.read_text())
    readings = [reads - 1, reads + more - 1]
    return Traced(calls, mcp_port, http_port, device_port, markers, [first, last], readings, spools)


def frame_reads(run: Traced) -> dict[int, Call]:
    """DATA seq -> the recvfrom() on the device's socket that completed that frame."""
    decoder, out = Decoder(), {}
    for call in run.on_device("recvfrom"):
        for event in decoder.feed(call.data):
            if isinstance(event, Frame) and event.type == FrameType.DATA:
                out[event.seq] = call
    return out


def ack_sends(run: Traced) -> dict[int, Call]:
    """Seq -> the sendto() on the device's socket that carried its ACK."""
    decoder, out = Decoder(), {}
    for call in run.on_device("sendto"):
        for event in decoder.feed(call.data):
            if isinstance(event, Frame) and event.type == FrameType.ACK:
                out[event.seq] = call
    return out


def test_every_ack_leaves_after_an_fsync_of_each_sinks_spool_that_holds_the_frame(traced: Traced) -> None:
    reads, acks = frame_reads(traced), ack_sends(traced)
    assert sorted(reads) == sorted(traced.markers), f"DATA reads found for seqs {sorted(reads)}"
    assert sorted(acks) == [1, *traced.markers], f"ACK sends found for seqs {sorted(acks)}"
    for seq, marker in traced.markers.items():
        read, ack = reads[seq], acks[seq]
        assert read.returned < ack.entered, f"seq {seq}: ACK sent before its frame was read"
        for sink, db in traced.spools.items():
            writes = [
                c
                for c in traced.calls
                if c.name in ("pwrite64", "pwritev") and traced.sink_of(c) == sink and marker in c.data
            ]
            assert writes, f"seq {seq}: its value was never written to {sink}'s spool"
            write = writes[0]
            assert read.returned < write.entered, f"seq {seq}: {sink}'s spool had its value before it was read"
            assert write.returned < ack.entered, (
                f"seq {seq}: the ACK left before its value was written to {sink}'s spool "
                f"(ACK at trace line {ack.entered}, write at line {write.entered})"
            )
            synced = [c for c in traced.syncs(sink) if write.returned < c.entered and c.returned < ack.entered]
            assert synced, (
                f"seq {seq}: no fsync/fdatasync of {db.name} (or its -wal) between the write of the frame's value "
                f"(trace line {write.returned}) and the ACK (line {ack.entered}): the ACK promised what a power "
                f"cut can still take"
            )
            # The same order by strace's clock, which it reads as it writes each line.
            assert read.at <= write.entered_at <= synced[0].at <= ack.entered_at


def test_the_spools_fsync_counter_is_what_the_kernel_saw(traced: Traced) -> None:
    before, after = traced.figures
    exchanges = traced.http_exchanges()
    assert len(exchanges) == traced.readings[-1] + 1, f"{len(exchanges)} /metrics replies in the trace"
    (_, opened), (_, closed) = (exchanges[i] for i in traced.readings)
    for sink in SINKS:
        syncs = traced.syncs(sink)
        # Each reading was taken with the sink idle (idle_figures): every sync before it is counted in it, and a
        # sync after it belongs to a later commit. Between the request and the reply, strace cannot tell which
        # side of the reading a sync was; nothing should commit there.
        for request, reply in (exchanges[i] for i in traced.readings):
            during = [c for c in syncs if request.returned < c.returned and c.entered < reply.entered]
            assert not during, f"{sink}: a spool commit ran while /metrics was read: {during}"
        counted = after[sink]["fieldgate_spool_fsyncs_total"] - before[sink]["fieldgate_spool_fsyncs_total"]
        seen = [c for c in syncs if opened.returned < c.entered and c.returned < closed.entered]
        assert counted > 0, f"{sink}: the spool counted no fsyncs for {FRAMES} frames"
        assert counted == len(seen), (
            f"{sink}: the spool counted {counted:g} fsyncs between the two readings of /metrics, strace saw "
            f"{len(seen)} on its files"
        )
