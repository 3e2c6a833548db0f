"""MCP server limits and hostile input: TLS with client certificates, max_sessions, fuzzing."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import select
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from drivers.mcp.codec import Frame, FrameType, encode
from drivers.mcp.server import MAX_INFLIGHT_DATA, McpServer
from gateway.config.schema import McpSection
from gateway.config.settings import mcp_server

from helpers import until
from mcp_peer import McpGateway, RawPeer

FUZZ_ROUNDS = int(os.environ.get("FIELDGATE_FUZZ_ROUNDS", "60"))

T0 = 1_767_225_600_000  # 2026-01-01T00:00Z: DATA ts must lie between 2000-01-01 and tomorrow


def make_pki(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
    )
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        )
    return {n: folder / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


@pytest.fixture
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Certificates for one test."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def mcp_config(pki: dict[str, Path], request: pytest.FixtureRequest) -> dict[str, object]:
    """TLS on, client certificates required (tests that need other settings override)."""
    if not request.node.get_closest_marker("tls"):
        return {"max_sessions": 5}
    return {
        "max_sessions": 5,
        "tls": {"cert": str(pki["server.pem"]), "key": str(pki["server.key"]), "client_ca": str(pki["ca.pem"])},
    }


def client_context(pki: dict[str, Path], with_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["ca.pem"]))
    if with_cert:
        ctx.load_cert_chain(str(pki["client.pem"]), str(pki["client.key"]))
    return ctx


@pytest.mark.tls
async def test_tls_session_with_a_client_certificate(mcp_gateway: McpGateway, connect, pki) -> None:  # type: ignore[no-untyped-def]
    peer = await connect(ssl=client_context(pki, with_cert=True))
    assert (await peer.hello()).type == FrameType.ACK
    await peer.send(Frame.json(FrameType.DATA, 2, {"ts": T0 + 11, "values": {"v": 1}}))
    assert await peer.recv() == Frame(FrameType.ACK, 2)
    tele = await mcp_gateway.sub.next_on("fieldgate/m1/pump-1/telemetry")
    assert tele.json() == {"ts": T0 + 11, "values": {"v": 1}}


@pytest.mark.tls
async def test_tls_without_a_client_certificate_is_refused(mcp_gateway: McpGateway, pki) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises((ssl.SSLError, ConnectionError)):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", mcp_gateway.mcp_port, ssl=client_context(pki, with_cert=False)
        )
        # TLS 1.3 reports the missing certificate on the first read.
        writer.write(encode(Frame(FrameType.HEARTBEAT, 1)))
        await writer.drain()
        if not await asyncio.wait_for(reader.read(100), 5):
            raise ConnectionError("closed")


async def test_pending_tls_handshakes_count_and_end_at_the_hello_deadline(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    cfg = McpSection.model_validate(
        {
            "listen": "127.0.0.1:0",
            "tls": {"cert": str(pki["server.pem"]), "key": str(pki["server.key"])},
            "hello_timeout": "1s",
            "max_pending": 2,
            "devices": [{"id": "pump-1", "token": "s3cret-token-0001"}],
        }
    )

    async def deliver(sample: object) -> None:
        return None

    server = McpServer(mcp_server(cfg), deliver, lambda state: None)
    await server.start()
    try:
        # Two connections that never start TLS: pending, and the third is refused at accept.
        silent = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
        await until(lambda: server.pending == 2, 10, "two pending connections")
        _, third = await asyncio.open_connection("127.0.0.1", server.port)
        await until(lambda: server.refused["max_pending"] == 1, 10, "the third to be refused")
        third.close()
        opened = time.monotonic()
        for reader, _ in silent:
            assert await asyncio.wait_for(reader.read(), 3) == b""
        # The HELLO deadline (~1 s here), not a 10 s handshake timeout; 5 s is generous on a busy machine.
        assert time.monotonic() - opened < 5.0
        assert server.pending == 0
        # A device that does its handshake and HELLO in time is served.
        ctx = ssl.create_default_context(cafile=str(pki["ca.pem"]))
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=ctx)
        peer = RawPeer(reader, writer)
        assert (await peer.hello()).type == FrameType.ACK
        peer.close()
    finally:
        await server.stop()


async def test_connections_beyond_max_sessions_are_taken_and_refused_at_hello(mcp_gateway: McpGateway, connect) -> None:  # type: ignore[no-untyped-def]
    server = mcp_gateway.gw.mcp
    assert server is not None
    server.max_sessions = 1
    # Connections that never say HELLO count under max_pending, not max_sessions: they lock no device out.
    silent = [await connect() for _ in range(5)]
    first = await connect()
    assert (await first.hello()).type == FrameType.ACK
    extra = [await connect() for _ in range(5)]
    for peer in extra:
        # Taken at accept (only its HELLO can tell a device replacing its own session), refused at HELLO.
        reply = await peer.hello("pump-2", "other-token-00002")
        assert reply.type == FrameType.NACK and reply.body()["code"] == 8
        assert await peer.closed(timeout=2)
    assert server.rejected == 5 and server.refused["max_sessions"] == 5
    assert server.pending == 5
    for peer in silent:
        assert not await peer.closed(timeout=0.01)
        peer.close()
    first.close()
    await asyncio.sleep(0.3)
    late = await connect()
    assert (await late.hello("pump-2", "other-token-00002")).type == FrameType.ACK  # room again once a session left
    assert server.pending == 0


def _mutations(rng: random.Random) -> bytes:
    """Garbage, mutated valid frames, truncated frames, absurd lengths."""
    good = encode(Frame.json(FrameType.DATA, rng.randrange(1, 2**32), {"values": {"x": rng.random()}}))
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 300))
    if kind == 1:
        b = bytearray(good)
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == 2:
        return good[: rng.randrange(1, len(good))]
    if kind == 3:
        return b"\x55\xaa\x55\xaa\x01" + rng.randbytes(9) + rng.randbytes(rng.randrange(0, 50))
    if kind == 4:
        return encode(Frame(rng.randrange(256), rng.randrange(2**32), rng.randbytes(rng.randrange(0, 80))))
    return encode(
        Frame(
            FrameType.DATA,
            rng.randrange(2**32),
            rng.choice([b"[]", b"{}", b'{"values": 3}', b"\xff\xfe", b'{"values":{"a":[1]}}']),
        )
    )


async def test_fuzzed_input_never_breaks_the_server(mcp_gateway: McpGateway, connect, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.ERROR)
    rng = random.Random(20261121)
    for _ in range(FUZZ_ROUNDS):
        peer = await connect()
        if rng.random() < 0.7:
            await peer.hello(seq=rng.randrange(1, 1000))
        for _ in range(rng.randrange(1, 8)):
            try:
                await peer.send(_mutations(rng))
            except ConnectionError:
                break
        peer.close()
    # Still serving a well-behaved device.
    good = await connect()
    assert (await good.hello(boot_id="fuzz-after")).type == FrameType.ACK
    await good.send(Frame.json(FrameType.DATA, 99, {"ts": T0 + 1, "values": {"ok": True}}))
    assert await good.recv() == Frame(FrameType.ACK, 99)
    # No session died of an unexpected exception, and none was left behind.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    server = mcp_gateway.gw.mcp
    assert server is not None and len(server._connections) == 1
    good.close()
    # Nothing leaked from the limit (a leak never comes back: the wait fails).
    await until(lambda: server.data_slots._value == MAX_INFLIGHT_DATA, 10, "every DATA slot to be free")


def test_max_sessions_is_held_to_what_file_descriptors_allow() -> None:
    # In a child: lowering the hard limit cannot be undone (no CAP_SYS_RESOURCE here).
    code = (
        "import resource\n"
        "from drivers.mcp.server import session_limit\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (512, 2048))\n"
        "print(session_limit(1000, reserve=256), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
        "print(session_limit(10_000, reserve=256), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
        "print(session_limit(100, reserve=256))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.split("\n")[:3] == ["1000 1256", "1792 2048", "100"]


async def test_a_burst_of_connects_fits_the_listen_queue() -> None:
    # While the loop is busy, connects wait in the kernel's accept queue. One of asyncio's default size (100)
    # drops the SYNs past it, and each dropped device retries a second or more later: after a flood, good
    # devices come back late. 400 connects made while the loop cannot accept must all be established.
    cfg = McpSection.model_validate(
        {"listen": "127.0.0.1:0", "devices": [{"id": "pump-1", "token": "s3cret-token-0001"}]}
    )

    async def deliver(sample: object) -> None:
        return None

    server = McpServer(mcp_server(cfg), deliver, lambda state: None)
    await server.start()
    socks: list[socket.socket] = []
    try:
        for _ in range(400):  # the loop does not run meanwhile: nothing is accepted
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", server.port))
            socks.append(s)
        deadline = time.monotonic() + 0.5
        waiting = list(socks)
        while waiting and time.monotonic() < deadline:
            _, writable, _ = select.select([], waiting, [], 0.05)
            waiting = [s for s in waiting if s not in writable]
        established = sum(
            1 for s in socks if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 and s not in waiting
        )
        assert established == len(socks), f"{len(socks) - established} connects left waiting for the accept queue"
    finally:
        for s in socks:
            s.close()
        await server.stop()
