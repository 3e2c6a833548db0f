"""A `ts` no spool can store, sent while the upstream broker is down: refused alone; nothing else stops."""

from __future__ import annotations

import asyncio

from hostile import PREFIX, McpPeer, StartGateway, embedded_subscriber, good_device, nack_code, nack_reason

from drivers.mcp.codec import FrameType

from helpers import spool_rows
from mosquitto import Mosquitto

U64_MAX = 18446744073709551615  # beyond SQLite's int64


async def test_a_ts_beyond_int64_while_upstream_is_down_is_nacked_and_every_other_ack_is_kept(
    start_gateway: StartGateway, mosquitto: Mosquitto
) -> None:
    gw = await start_gateway(upstream=mosquitto)
    # Down: what the gateway ACKs from now on for sink `up` must go to its spool.
    await asyncio.to_thread(mosquitto.stop)
    peer = await McpPeer.open(gw.mcp_port)
    assert (await peer.hello("pump-1")).type == FrameType.ACK
    local = embedded_subscriber(gw, f"{PREFIX}/pump-2/telemetry")
    async with local as on_local, good_device(gw.mcp_port, "pump-2") as good:
        await asyncio.sleep(1.0)
        try:
            answer = await peer.data({"temp": 21.5}, ts=U64_MAX, timeout=5)
        except TimeoutError:
            raise AssertionError(f"DATA with ts {U64_MAX} got no answer in 5 s; {good.failures[:3]}") from None
        # 5: the session's ts rule; 8: the spool could not take it. Either way, not an ACK.
        assert nack_code(answer) in (5, 8), answer
        if nack_code(answer) == 5:
            assert "ts" in nack_reason(answer), nack_reason(answer)
        # The same device goes on with a sane ts; the other device never waited.
        assert (await peer.data({"temp": 21.6}, timeout=5)).type == FrameType.ACK
        await asyncio.sleep(3.0)
        good.check(within=2.0, at_least=15)
        acked = list(good.acked_ts)
        await asyncio.sleep(0.5)
        published_locally = {int(m.json()["ts"]) for m in on_local.on(f"{PREFIX}/pump-2/telemetry")}  # type: ignore[index]
    peer.close()
    assert (await gw.get("/healthz")).status == 200
    code = await asyncio.to_thread(gw.stop)
    assert code == 0, gw.log()[-3000:]
    # Every ACK promised the data is kept: with `up` down all along, each ACKed frame is in its spool.
    spooled = {ts for topic, ts in spool_rows(gw.spool("up")) if topic == "pump-2/telemetry"}
    missing = sorted(set(acked) - spooled)
    assert not missing, f"{len(missing)} of {len(acked)} ACKed frames are not in the spool of `up`"
    # Sink `local` (the embedded broker) stayed up: each ACKed frame was published there or is in its spool.
    kept_locally = published_locally | {
        ts for topic, ts in spool_rows(gw.spool("local")) if topic == "pump-2/telemetry"
    }
    missing = sorted(set(acked) - kept_locally)
    assert not missing, f"{len(missing)} of {len(acked)} ACKed frames neither reached `local` nor its spool"
