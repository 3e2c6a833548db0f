"""benchlib, what every bench script stands on: the configs it writes are ones the gateway accepts, its child
processes answer or fail loudly, a fresh interpreter's figures come back, and hil/ stands apart from tests/."""

from __future__ import annotations

import ast
import importlib.util
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway.config import parse_config
from hil.bench.benchlib.children import Child
from hil.bench.benchlib.configs import dump
from hil.bench.benchlib.mqtt import broker_child, subscribe
from hil.bench.benchlib.procs import run_fresh
from hil.ports import free_port
from hil.soak import SoakSettings
from hil.soak import gateway_config as soak_config

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = ROOT / "hil" / "bench"


def load_bench(name: str) -> ModuleType:
    """A script of hil/bench as a module (the bench folder is a set of scripts, not a package)."""
    sys.path.insert(0, str(BENCH_DIR))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH_DIR))
    return module


@pytest.mark.parametrize("layout", ["inline", "separate", "external"])
def test_the_mcp_bench_config_is_one_the_gateway_accepts(tmp_path: Path, layout: str) -> None:
    mcp_bench = load_bench("mcp_bench")
    cfg = parse_config(dump(mcp_bench.gateway_config(tmp_path / "state", 1883, 7000, 3, layout))).config
    mcp = cfg.mcp
    assert mcp is not None
    assert [d.id for d in mcp.devices] == ["d0", "d1", "d2"]
    assert mcp.devices[2].token == "token-0000000002"
    assert mcp.listen == "127.0.0.1:7000"
    assert (mcp.max_sessions, mcp.max_pending, mcp.max_pending_per_ip) == (1_000_000, 100_000, 100_000)
    if layout == "external":
        assert not cfg.broker.enabled
        assert [(n.name, n.url) for n in cfg.northbound] == [("local", "mqtt://127.0.0.1:1883")]
    else:
        assert (cfg.broker.process, cfg.broker.listeners) == (layout, ["tcp://127.0.0.1:1883"])


def test_the_hostile_bench_and_soak_configs_are_ones_the_gateway_accepts(tmp_path: Path) -> None:
    hostile = parse_config(dump(load_bench("hostile_bench").gateway_config(tmp_path, 7000, 1883, 8080))).config
    assert (hostile.gateway.id, hostile.gateway.http, hostile.gateway.log_level) == (
        "hostile",
        "127.0.0.1:8080",
        "INFO",
    )
    assert hostile.mcp is not None and [d.id for d in hostile.mcp.devices] == ["good-1", "attacker-1"]

    settings = SoakSettings(devices=2, mcp_devices=2, poll=0.025)
    soak = parse_config(dump(soak_config(settings, broker=1883, upstream=1884, mcp=7000))).config
    (line,) = soak.modbus.buses
    assert [(d.name, d.unit, d.poll) for d in line.devices] == [("plc1", 1, 0.025), ("plc2", 2, 0.025)]
    assert [p.name for p in line.devices[0].points] == ["counter", "level", "status", "setpoint"]
    assert line.devices[0].points[3].writable
    assert [n.name for n in soak.northbound] == ["local", "upstream"]
    assert soak.northbound[1].spool is not None and soak.northbound[1].spool.replay_rate == 20000
    assert soak.mcp is not None and [(d.id, d.write_rate) for d in soak.mcp.devices] == [("pump-1", 50), ("pump-2", 50)]


@pytest.fixture
def broker() -> Iterator[tuple[Child, int]]:
    """benchlib's embedded broker in a child process of its own, on a free port."""
    port = free_port()
    child = Child("broker", broker_child, [f"tcp://127.0.0.1:{port}"])
    try:
        yield child, port
    finally:
        child.stop(timeout=10)


def test_a_child_answers_when_ready_and_the_broker_child_carries_messages(broker: tuple[Child, int]) -> None:
    child, port = broker
    assert child.wait(60) == child.pid  # the first answer: ready, with its pid
    got: list[bytes] = []
    arrived = threading.Event()

    def on_message(_c: Any, _u: Any, m: Any) -> None:
        got.append(m.payload)
        arrived.set()

    sub = subscribe(port, "bench/#", on_message, timeout=20)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    try:
        pub.connect("127.0.0.1", port)
        pub.loop_start()
        pub.publish("bench/probe", b"hello", qos=1).wait_for_publish(20)
        assert arrived.wait(20)
        assert got == [b"hello"]
        assert child.cpu() > 0
    finally:
        pub.disconnect()
        pub.loop_stop()
        sub.disconnect()
        sub.loop_stop()


def test_a_child_that_fails_to_start_raises_its_traceback(broker: tuple[Child, int]) -> None:
    first, port = broker
    first.wait(60)
    # A second broker on the same listener cannot bind: the orchestrator hears why instead of waiting forever.
    second = Child("second broker", broker_child, [f"tcp://127.0.0.1:{port}"])
    try:
        with pytest.raises(RuntimeError, match="second broker failed:\n(.|\n)*Traceback"):
            second.wait(60)
    finally:
        second.stop(timeout=5)


def test_a_fresh_interpreter_hands_back_its_last_line_as_json_or_its_failure() -> None:
    assert run_fresh(["-c", "print('warming up'); print('{\"rate\": 12.5}')"], "probe") == {"rate": 12.5}
    with pytest.raises(RuntimeError, match=r"the probe failed \(3\):\n.*broken"):
        run_fresh(["-c", "import sys; sys.stderr.write('broken'); sys.exit(3)"], "the probe")


def test_hil_imports_nothing_of_tests() -> None:
    # The benches and rigs run from a checkout where tests/ is not on the path (and is no product): what both
    # need lives in hil/ and tests import it from there.
    test_modules = {"tests"} | {p.stem for p in (ROOT / "tests").glob("*.py")}
    offenders = []
    for path in sorted((ROOT / "hil").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            offenders += [
                f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in test_modules
            ]
    assert offenders == []
