"""`fieldgate spool`: each sink's spool as a table and as JSON, an absent spool, an unreadable one, a bad config."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from rich.console import Console

from bridge.buffer import entry_size
from bridge.spool import SQLiteSpool
from gateway.cli import main
from gateway.spool_report import SpoolRow, human_age, human_size, print_table
from gateway.types import Message

import configs  # qualified: `config` is this file's fixture

AGE = 192.0  # seconds the oldest message has waited: "3m 12s"
PAYLOAD = b'{"ts": 1700000000000, "values": {"flow": 12.5}}'
TOPIC = "fieldgate/plant/pump1/telemetry"
SIZE = entry_size(Message(TOPIC, PAYLOAD))


def write_config(tmp_path: Path) -> Path:
    """Two sinks: the embedded broker (no spool file) and an upstream one holding three messages of five."""
    upstream = configs.sink("upstream", "mqtts://broker.example:8883", spool={"max_size": 3 * SIZE})
    cfg = configs.config(
        id="plant", state_dir=tmp_path / "state", http=configs.DEFAULT, northbound=[configs.sink("local"), upstream]
    )
    return configs.write(cfg, tmp_path)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """The config, with the upstream spool filled: five adds into room for three, so two dropped."""
    cfg = write_config(tmp_path)
    queued_at = time.time() - AGE
    spool = SQLiteSpool(
        tmp_path / "state" / "spool" / "upstream.sqlite", max_size=3 * SIZE, min_free_bytes=0, clock=lambda: queued_at
    )
    try:
        for i in range(5):
            spool.add([(Message(TOPIC, PAYLOAD), 1_700_000_000_000 + i)])
    finally:
        spool.close()
    return cfg


def test_table_shows_each_sink(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["spool", "-c", str(config)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    header, local, upstream = out.strip().splitlines()
    assert header.split() == ["SINK", "URL", "MESSAGES", "BYTES", "OLDEST", "DROPPED", "FILE"]
    local_file = str(spool_file(config, "local"))
    assert local.split() == ["local", "embedded", "0", *"0 B / 256 MB".split(), "-", "0", local_file]
    cells = upstream.split()
    assert cells[:3] == ["upstream", "mqtts://broker.example:8883", "3"]
    assert " ".join(cells[3:8]) == f"{3 * SIZE} B / {3 * SIZE} B"
    assert re.fullmatch(r"3m 1\ds", " ".join(cells[8:10])), upstream  # 192 s, plus the test's own run time
    assert cells[10:] == ["2", str(spool_file(config, "upstream"))]
    # Aligned: the file column starts at the same offset on every line.
    assert header.index("FILE") == local.index(local_file) == upstream.index(str(spool_file(config, "upstream")))


def test_json_is_keyed_by_sink_with_raw_numbers(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["spool", "-c", str(config), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["local"] == {
        "url": "embedded",
        "messages": 0,
        "bytes": 0,
        "max_size": 256 * 1024**2,
        "oldest_age_s": None,
        "dropped": 0,
        "path": str(spool_file(config, "local")),
    }
    upstream = doc["upstream"]
    age = upstream.pop("oldest_age_s")
    assert AGE <= age < AGE + 10
    assert upstream == {
        "url": "mqtts://broker.example:8883",
        "messages": 3,
        "bytes": 3 * SIZE,
        "max_size": 3 * SIZE,
        "dropped": 2,
        "path": str(spool_file(config, "upstream")),
    }


def test_the_spool_of_a_running_gateway_is_readable(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The gateway holds the file open and locked, in WAL mode, with commits not yet checkpointed.
    spool = SQLiteSpool(spool_file(config, "upstream"), max_size=3 * SIZE, min_free_bytes=0)
    try:
        spool.accept(e.id for e in spool.take(1))
        assert main(["spool", "-c", str(config), "--json"]) == 0
    finally:
        spool.close()
    assert json.loads(capsys.readouterr().out)["upstream"]["messages"] == 2


def test_an_unreadable_spool_is_a_runtime_error_naming_the_file(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = spool_file(config, "local")
    bad.write_bytes(b"\x00garbage, not SQLite\xff" * 200)
    assert main(["spool", "-c", str(config)]) == 1
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == [
        f"fieldgate: sink local: cannot read spool {bad}: file is not a database"
        " (corrupt: the gateway moves it aside when it next opens it)"
    ]
    # The readable sink is still shown.
    assert [line.split()[0] for line in out.strip().splitlines()] == ["SINK", "upstream"]
    assert main(["spool", "-c", str(config), "--json"]) == 1
    assert list(json.loads(capsys.readouterr().out)) == ["upstream"]


def test_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("northbound:\n  - name: up\n    url: http://nowhere\n")
    assert main(["spool", "-c", str(cfg)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"{cfg}:2: northbound[0]: url 'http://nowhere'") and "Traceback" not in err
    assert main(["spool", "-c", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_rich_table_on_a_terminal(tmp_path: Path) -> None:
    # wide enough for the file column whatever the temporary folder's path (longer under pytest-xdist)
    console = Console(record=True, width=200 + len(str(tmp_path)), force_terminal=True)
    row = SpoolRow(
        "upstream", "mqtts://broker.example:8883", tmp_path / "u.sqlite", 3, 1_258_291, 64 * 1024**2, 192.4, 2
    )
    print_table([row], console)
    text = console.export_text()
    assert "upstream" in text and "1.2 MB / 64 MB" in text and "3m 12s" in text and str(tmp_path / "u.sqlite") in text


def test_human_figures() -> None:
    assert [human_size(n) for n in (0, 1023, 1024, 1536, 1_258_291, 256 * 1024**2, 1024**2 - 1, 5 * 1024**5)] == [
        "0 B",
        "1023 B",
        "1 kB",
        "1.5 kB",
        "1.2 MB",
        "256 MB",
        "1 MB",
        "5120 TB",
    ]
    assert [human_age(s) for s in (None, 0, 59.9, 60, 192, 3600 + 5 * 60 + 7, 3 * 86400 + 4 * 3600 + 59)] == [
        "-",
        "0s",
        "59s",
        "1m 0s",
        "3m 12s",
        "1h 5m",
        "3d 4h",
    ]


def spool_file(config: Path, sink: str) -> Path:
    """Where the config in `config` keeps a sink's spool."""
    return config.parent / "state" / "spool" / f"{sink}.sqlite"
