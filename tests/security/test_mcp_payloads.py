"""Hostile DATA and HELLO payloads from an authenticated MCP device, through a real gateway process."""

from __future__ import annotations

import asyncio

from hostile import PREFIX, McpPeer, StartGateway, embedded_subscriber, good_device, nack_code, nack_reason

from drivers.mcp.codec import FrameType

from helpers import now_ms, subscribed
from mosquitto import Mosquitto


async def logged_in(port: int, device_id: str = "pump-1") -> McpPeer:
    """A peer past HELLO as `device_id`."""
    peer = await McpPeer.open(port)
    answer = await peer.hello(device_id)
    assert answer.type == FrameType.ACK, answer
    return peer


async def test_a_ts_of_10_to_the_400_is_nacked_and_the_status_page_and_metrics_still_answer(
    start_gateway: StartGateway,
) -> None:
    gw = await start_gateway()
    peer = await logged_in(gw.mcp_port)
    # A JSON number, not a string: Python reads it as an exact integer of 401 digits.
    answer = await peer.data_raw(b'{"ts":1' + b"0" * 400 + b',"values":{"temp":21.5}}')
    assert nack_code(answer) == 5, answer
    assert "ts" in nack_reason(answer), nack_reason(answer)
    # The session goes on.
    assert (await peer.data({"temp": 21.6})).type == FrameType.ACK
    assert (await gw.get("/")).status == 200
    assert (await gw.get("/metrics")).status == 200
    assert (await gw.get("/healthz")).status == 200
    bad_ts = await gw.metric("fieldgate_mcp_bad_ts_total", device="pump-1")
    assert bad_ts == 1, bad_ts
    peer.close()


async def test_a_lone_surrogate_is_nacked_and_retained_state_is_still_republished(
    start_gateway: StartGateway, mosquitto: Mosquitto
) -> None:
    gw = await start_gateway(upstream=mosquitto)
    peer = await logged_in(gw.mcp_port)
    assert (await peer.data({"level": 7})).type == FrameType.ACK
    # Valid JSON text (an escape), but no Unicode string: "\ud800" alone is half a surrogate pair.
    answer = await peer.data_raw(b'{"ts":%d,"values":{"label":"\\ud800"}}' % now_ms())
    assert nack_code(answer) == 5, answer
    assert (await peer.data({"level": 8})).type == FrameType.ACK, "the session did not survive"
    # The upstream broker loses everything (no persistence); the gateway must give it the retained state again.
    await asyncio.to_thread(mosquitto.stop)
    await asyncio.to_thread(mosquitto.start)
    async with subscribed(mosquitto.port, f"{PREFIX}/pump-1/#") as sub:
        await sub.next_on(f"{PREFIX}/pump-1/level", timeout=15)
    # Whether it came before or after that subscription, a new subscriber must now get it as retained.
    async with subscribed(mosquitto.port, f"{PREFIX}/pump-1/#") as sub:
        level = await sub.next_on(f"{PREFIX}/pump-1/level", timeout=5)
        status = await sub.next_on(f"{PREFIX}/pump-1/status", timeout=5)
    assert level.retain and level.json() == 8, level
    assert status.retain and status.payload == b"online", status
    assert (await gw.get("/")).status == 200
    assert (await gw.get("/metrics")).status == 200
    assert "Traceback" not in gw.log(), gw.log()[-3000:]
    peer.close()


async def test_thousands_of_new_value_names_are_nacked_and_retained_topics_stay_bounded(
    start_gateway: StartGateway,
) -> None:
    gw = await start_gateway()  # max_points at its default, 256
    peer = await logged_in(gw.mcp_port)
    assert (await peer.data({f"v{i}": i for i in range(200)})).type == FrameType.ACK
    answer = await peer.data({f"w{i}": i for i in range(5000)})
    assert nack_code(answer) == 5, answer
    assert "max_points" in nack_reason(answer), nack_reason(answer)
    # 200 + 100 also passes 256: refused whole, nothing of it kept.
    answer = await peer.data({f"x{i}": i for i in range(100)})
    assert nack_code(answer) == 5, answer
    # Names it already has stay welcome, and so do new ones up to the limit.
    assert (await peer.data({"v0": -1, **{f"y{i}": i for i in range(56)}})).type == FrameType.ACK
    assert nack_code(await peer.data({"one_too_many": 1})) == 5
    async with embedded_subscriber(gw, f"{PREFIX}/pump-1/+") as sub:
        await asyncio.sleep(1.0)  # retained messages arrive right after SUBACK
        points = {m.topic for m in sub.messages if m.retain and not m.topic.endswith(("/status", "/telemetry"))}
    assert len(points) <= 256, len(points)
    assert f"{PREFIX}/pump-1/v199" in points and f"{PREFIX}/pump-1/y55" in points
    assert not any("/w" in t or "/x" in t for t in points)
    rejected = await gw.metric("fieldgate_mcp_rejected_payloads_total", device="pump-1")
    assert rejected == 3, rejected
    peer.close()


async def test_a_value_name_with_a_trailing_newline_is_refused(start_gateway: StartGateway) -> None:
    gw = await start_gateway()
    peer = await logged_in(gw.mcp_port)
    async with embedded_subscriber(gw) as sub:
        answer = await peer.data({"temp\n": 21.5})
        assert nack_code(answer) == 5, answer
        assert (await peer.data({"temp": 21.5})).type == FrameType.ACK
        await sub.next_on(f"{PREFIX}/pump-1/temp", timeout=5)
        assert not [m.topic for m in sub.messages if "\n" in m.topic]
    peer.close()


async def test_a_device_id_with_a_trailing_newline_is_refused_as_malformed(start_gateway: StartGateway) -> None:
    gw = await start_gateway()
    peer = await McpPeer.open(gw.mcp_port)
    # The right token: only the id's form may refuse it, and it must say so (not "authentication failed").
    answer = await peer.hello("pump-1\n", token=gw.tokens["pump-1"])
    assert nack_code(answer) == 5, answer
    assert "device_id" in nack_reason(answer), nack_reason(answer)
    assert await peer.closed(5)


async def test_a_second_hello_on_a_live_session_is_nacked_and_closed_and_the_other_device_is_untouched(
    start_gateway: StartGateway,
) -> None:
    gw = await start_gateway()
    async with embedded_subscriber(gw, f"{PREFIX}/+/status") as sub, good_device(gw.mcp_port, "pump-3") as other:
        await sub.wait_for(lambda ms: any(m.topic == f"{PREFIX}/pump-3/status" for m in ms), timeout=5)
        for device_id in ("pump-3", "pump-1"):
            peer = await logged_in(gw.mcp_port)
            # With another device's valid token: a live session cannot become someone else.
            answer = await peer.hello(device_id)
            assert nack_code(answer) == 5, (device_id, answer)
            assert await peer.closed(5), f"second HELLO ({device_id}): the connection stayed open"
        await asyncio.sleep(1.0)
        other_status = [m.payload for m in sub.on(f"{PREFIX}/pump-3/status")]
        assert other_status and set(other_status) == {b"online"}, other_status
        # The status page still shows pump-3's session on pump-3's own connection.
        page = (await gw.get("/")).body
        assert f"127.0.0.1:{other.local_port}" in page, page[-2000:]
        assert await gw.metric("fieldgate_mcp_device_online", device="pump-3") == 1
        assert await gw.metric("fieldgate_mcp_sessions_opened_total", device="pump-3") == 1
        other.check(within=2.0, at_least=5)
