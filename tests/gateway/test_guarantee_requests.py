"""README "Upstream brokers": `set` and `cmd` requests are taken from every sink; results go back on the sink they
came from, and the audit log's `origin` names that sink. A real gateway, its embedded broker and a Mosquitto."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.app import Gateway
from gateway.config import load_config

from helpers import Received, free_port, subscribed
from mosquitto import Mosquitto

CONFIG = """
gateway: {{id: t1, state_dir: ./state, http: null}}
broker: {{process: inline, listeners: ["tcp://127.0.0.1:{port}"]}}
northbound:
  - {{name: local}}
  - {{name: up, url: "{upstream}", topic_prefix: site/t1}}
modbus:
  buses:
    - name: line
      port: ./ttyA
      baudrate: 115200
      parity: N
      devices:
        - name: plc
          unit: 1
          poll: 100ms
          points:
            - {{name: sp, table: holding, address: 1, type: uint16, writable: true}}
simulator:
  modbus:
    - link: ./ttyA
      devices: [{{unit: 1}}]
"""


def values(results: list[Received]) -> list[object]:
    """The `value` of each set result, in the order they arrived."""
    return [r.json()["value"] for r in results]  # type: ignore[index]


async def test_a_result_goes_back_only_on_the_sink_the_request_came_from(tmp_path: Path, mosquitto: Mosquitto) -> None:
    port = free_port()
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.format(port=port, upstream=mosquitto.url))
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
