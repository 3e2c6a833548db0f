"""`make bench`'s runner: headline figures recorded by benchmark processes end up in one table with verdicts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_suite() -> ModuleType:
    """hil/bench/suite.py as a module (the bench folder is a set of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_suite", ROOT / "hil" / "bench" / "suite.py")
    assert spec and spec.loader
    sys.path.insert(0, str(ROOT / "hil" / "bench"))
    try:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "hil" / "bench"))
    return module


FAKE = """
import sys
sys.path.insert(0, {bench!r})
from benchlib import record
record("fake", "ratio met", 95.0, "tx/s", ratio=0.95, versus="limit 100 tx/s", goal=0.9)
record("fake", "ratio missed", 80.0, "tx/s", ratio=0.80, versus="limit 100 tx/s", goal=0.9)
record("fake", "at most, met", 8.2, "fsync/s", most=10)
record("fake", "no goal", 19744, "sessions")
print("the fake benchmark's own report")
sys.exit({code})
"""


def test_the_suite_gathers_recorded_figures_judges_goals_and_reports_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    suite = load_suite()
    (tmp_path / "ok.py").write_text(FAKE.format(bench=str(ROOT / "hil" / "bench"), code=0))
    (tmp_path / "broken.py").write_text(FAKE.format(bench=str(ROOT / "hil" / "bench"), code=3))
    monkeypatch.setattr(suite, "HERE", tmp_path)
    monkeypatch.setattr(suite, "benches", lambda out: [suite.Bench("one", "ok.py"), suite.Bench("two", "broken.py")])

    assert suite.main(["--out", str(tmp_path / "out"), "--markdown"]) == 1
    text = capsys.readouterr().out
    rows = {line.split("  ")[2].strip(): line for line in text.splitlines() if line.startswith("  fake")}
    assert rows["ratio met"].rstrip().endswith("yes") and ">= 0.9" in rows["ratio met"]
    assert rows["ratio missed"].rstrip().endswith("NO")
    assert rows["at most, met"].rstrip().endswith("yes") and "<= 10 fsync/s" in rows["at most, met"]
    assert rows["no goal"].rstrip().endswith("sessions")
    assert "| fake | ratio met | 95 | tx/s | 0.95 | limit 100 tx/s | >= 0.9 | yes |" in text
    assert "benchmarks that failed: two" in text
    assert "goals missed: 2 of 6" in text  # each script recorded once; both ran
    assert (tmp_path / "out" / "one.txt").read_text().strip() == "the fake benchmark's own report"

    with pytest.raises(SystemExit):
        suite.main(["--out", str(tmp_path / "out2"), "--only", "nonesuch"])
    assert "no benchmark named nonesuch" in capsys.readouterr().err
