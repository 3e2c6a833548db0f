"""README "Upstream brokers": `set` and `cmd` requests are taken from every sink; results go back on the sink they
came from, and the audit log's `origin` names that sink. A real gateway, its embedded broker and a Mosquitto."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.app import Gateway
from gateway.config import load_config

from configs import Section, broker, config, device, line, point, sim_line, sim_slave, simulator, sink, write
from helpers import Received, free_port, subscribed
from mosquitto import Mosquitto


def requests_config(port: int, upstream: str) -> Section:
    """A writable plc point, and two sinks: the embedded broker and `upstream` under another prefix."""
    plc = device("plc", 1, poll="100ms", points=[point("sp", "holding", 1, "uint16", writable=True)])
    return config(
        broker=broker(port, process="inline"),
        northbound=[sink("local"), sink("up", upstream, topic_prefix="site/t1")],
        buses=[line("line", "./ttyA", plc)],
        simulator=simulator(modbus=[sim_line("./ttyA", sim_slave(1))]),
    )


def values(results: list[Received]) -> list[object]:
    """The `value` of each set result, in the order they arrived."""
    return [r.json()["value"] for r in results]  # type: ignore[index]


async def test_a_result_goes_back_only_on_the_sink_the_request_came_from(tmp_path: Path, mosquitto: Mosquitto) -> None:
    port = free_port()
    path = write(requests_config(port, mosquitto.url), tmp_path)
    # (`./state` is taken from the config file's folder: tmp_path.)
    gw = Gateway(load_config(path))
    await gw.start()
    try:
        async with subscribed(port) as local, subscribed(mosquitto.port) as up:
            await up.wait_for(lambda ms: any(m.topic == "site/t1/plc/status" and m.payload == b"online" for m in ms))
            r = await up.request("site/t1/plc/set/sp", "11")
            assert r.json() == {"ok": True, "value": 11, "error": None}
            # A request on the other sink after it: each sink's messages go out in order, so a copy of the
            # first result sent to this sink would arrive before this request's own result.
            r = await local.request("fieldgate/t1/plc/set/sp", "12")
            assert r.json() == {"ok": True, "value": 12, "error": None}
            assert values(local.on("fieldgate/t1/plc/set/sp/result")) == [12]
            assert values(up.on("site/t1/plc/set/sp/result")) == [11]
            # Nothing of one sink's prefix leaks to the other broker.
            assert not [m for m in local.messages if m.topic.startswith("site/")]
            assert not [m for m in up.messages if m.topic.startswith("fieldgate/")]
    finally:
        await gw.stop()
    audit = [json.loads(line) for line in (Path(gw.cfg.gateway.state_dir) / "audit.log").read_text().splitlines()]
    outcomes = [(a["origin"], a["value"], a["ok"]) for a in audit if a.get("stage") != "request"]
    assert outcomes == [("up", 11, True), ("local", 12, True)]
