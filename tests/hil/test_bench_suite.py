"""`make bench`'s runner: headline figures recorded by benchmark processes end up in one table with verdicts;
a missed goal, a figure that was not measured and a benchmark that failed each make it exit non-zero."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = ROOT / "hil" / "bench"


def load_suite() -> ModuleType:
    """hil/bench/suite.py as a module (the bench folder is a set of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_suite", BENCH_DIR / "suite.py")
    assert spec and spec.loader
    sys.path.insert(0, str(BENCH_DIR))
    try:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH_DIR))
    return module


PRELUDE = f"""
import sys
sys.path.insert(0, {str(BENCH_DIR)!r})
from benchlib import record
"""

FAKE = (
    PRELUDE
    + """
record("fake", "ratio met", 95.0, "tx/s", ratio=0.95, versus="limit 100 tx/s", goal=0.9)
record("fake", "ratio missed", 80.0, "tx/s", ratio=0.80, versus="limit 100 tx/s", goal=0.9)
record("fake", "at most, met", 8.2, "fsync/s", most=10)
record("fake", "no goal", 19744, "sessions")
print("the fake benchmark's own report")
sys.exit({code})
"""
)
FAKE_FIGURES = ("ratio met", "ratio missed", "at most, met", "no goal")


def rows_of(text: str, bench: str) -> dict[str, str]:
    """The suite's plain table rows of one bench, by figure name."""
    return {line.split("  ")[2].strip(): line.rstrip() for line in text.splitlines() if line.startswith(f"  {bench} ")}


@pytest.fixture
def suite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The suite, its scripts looked up in tmp_path."""
    module = load_suite()
    monkeypatch.setattr(module, "HERE", tmp_path)
    return module


def use(monkeypatch: pytest.MonkeyPatch, suite: ModuleType, *benches: object) -> None:
    """Make the suite run these benches instead of the real ones."""
    monkeypatch.setattr(suite, "benches", lambda out: list(benches))


def test_the_suite_gathers_recorded_figures_judges_goals_and_reports_failures(
    suite: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "ok.py").write_text(FAKE.format(code=0))
    (tmp_path / "broken.py").write_text(FAKE.format(code=3))
    use(
        monkeypatch,
        suite,
        suite.Bench("one", "ok.py", expects=FAKE_FIGURES),
        suite.Bench("two", "broken.py", expects=FAKE_FIGURES),
    )

    assert suite.main(["--out", str(tmp_path / "out"), "--markdown"]) == 1
    text = capsys.readouterr().out
    rows = rows_of(text, "fake")
    assert rows["ratio met"].endswith("yes") and ">= 0.9" in rows["ratio met"]
    assert rows["ratio missed"].endswith("NO")
    assert rows["at most, met"].endswith("yes") and "<= 10 fsync/s" in rows["at most, met"]
    assert rows["no goal"].endswith("sessions")
    assert "| fake | ratio met | 95 | tx/s | 0.95 | limit 100 tx/s | >= 0.9 | yes |" in text
    assert "benchmarks that failed: two" in text
    # Each script recorded once and both ran: 8 rows, 6 with a goal, 2 of them missed.
    assert "missed: 2 of 8 figures (2 goals missed of 6 judged, 0 not measured)" in text
    assert (tmp_path / "out" / "one.txt").read_text().strip() == "the fake benchmark's own report"

    with pytest.raises(SystemExit):
        suite.main(["--out", str(tmp_path / "out2"), "--only", "nonesuch"])
    assert "no benchmark named nonesuch" in capsys.readouterr().err


def test_a_missed_goal_alone_makes_the_suite_exit_non_zero(
    suite: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "slow.py").write_text(PRELUDE + 'record("slow", "rate", 80.0, "tx/s", goal=90)\n')
    use(monkeypatch, suite, suite.Bench("slow", "slow.py", expects=("rate",)))

    assert suite.main(["--out", str(tmp_path / "out")]) == 1
    text = capsys.readouterr().out
    assert rows_of(text, "slow")["rate"].endswith("NO")
    assert "benchmarks that failed" not in text
    assert "missed: 1 of 1 figures (1 goals missed of 1 judged, 0 not measured)" in text


def test_every_goal_met_and_every_figure_measured_exits_zero(
    suite: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "good.py").write_text(
        PRELUDE
        + 'record("good", "rate", 95.0, "tx/s", ratio=0.95, versus="limit 100 tx/s", goal=0.9)\n'
        + 'record("good", "write rate, 100 msgs per commit", 1.0, "msg/s")\n'
    )
    use(monkeypatch, suite, suite.Bench("good", "good.py", expects=("rate", "write rate, * msgs per commit")))

    assert suite.main(["--out", str(tmp_path / "out")]) == 0
    assert "missed: 0 of 2 figures (0 goals missed of 1 judged, 0 not measured)" in capsys.readouterr().out


def test_a_bench_that_crashes_leaves_its_expected_figures_as_not_measured_rows(
    suite: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "crash.py").write_text(
        PRELUDE + 'record("crash", "first", 1.0, "s", most=2)\nraise RuntimeError("the line did not start")\n'
    )
    (tmp_path / "fine.py").write_text(PRELUDE + 'record("fine", "rate", 5.0, "tx/s", goal=1)\n')
    use(
        monkeypatch,
        suite,
        suite.Bench("crash", "crash.py", expects=("first", "second", "third")),
        suite.Bench("fine", "fine.py", expects=("rate",)),
    )

    assert suite.main(["--out", str(tmp_path / "out"), "--markdown"]) == 1
    text = capsys.readouterr().out
    rows = rows_of(text, "crash")
    assert rows["first"].endswith("yes")  # what it recorded before the crash stays
    for figure in ("second", "third"):
        assert "not measured" in rows[figure] and rows[figure].endswith("NO (not measured)")
    assert "| crash | second | not measured |" in text
    assert "benchmarks that failed: crash" in text
    assert "missed: 2 of 4 figures (0 goals missed of 2 judged, 2 not measured)" in text
    assert "the line did not start" in (tmp_path / "out" / "crash.txt").read_text()


def test_missing_and_nan_figures_count_as_missed_even_when_the_bench_exits_zero(
    suite: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "quiet.py").write_text(
        PRELUDE
        + 'record("quiet", "recorded", 3.0, "cycles/s", goal=1)\n'
        + 'record("quiet", "could not measure", float("nan"), "cycles/s", goal=1)\n'
        + 'record("quiet", "no reference", 50.0, "tx/s", ratio=float("nan"), versus="raw client: failed", goal=0.9)\n'
        + 'record("quiet", "renamed figure", 1.0, "s")\n'
    )
    use(
        monkeypatch,
        suite,
        suite.Bench("quiet", "quiet.py", expects=("recorded", "could not measure", "no reference", "never recorded")),
    )

    assert suite.main(["--out", str(tmp_path / "out")]) == 1
    text = capsys.readouterr().out
    rows = rows_of(text, "quiet")
    assert rows["recorded"].endswith("yes")
    for figure in ("could not measure", "no reference", "never recorded"):
        assert rows[figure].endswith("NO (not measured)"), rows[figure]
    assert "benchmarks that failed" not in text
    assert "recorded but not expected by the suite (add them to its Bench.expects): quiet: renamed figure" in text
    assert "missed: 3 of 5 figures (0 goals missed of 1 judged, 3 not measured)" in text


def test_a_bench_that_hangs_is_killed_and_its_figures_are_not_measured(
    suite: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "hang.py").write_text("import time\ntime.sleep(600)\n")
    # The timeout only has to be shorter than the sleep: a machine that is slow cannot make this pass wrongly.
    use(monkeypatch, suite, suite.Bench("hang", "hang.py", expects=("rate",), timeout=1.0))

    assert suite.main(["--out", str(tmp_path / "out")]) == 1
    text = capsys.readouterr().out
    assert rows_of(text, "hang")["rate"].endswith("NO (not measured)")
    assert "benchmarks that failed: hang" in text
    assert "killed by the suite after 1 s" in (tmp_path / "out" / "hang.txt").read_text()


def test_every_benchmark_the_suite_runs_exists_and_owes_figures(tmp_path: Path) -> None:
    # A benchmark without expected figures could crash and leave nothing behind: no row would say so.
    real = load_suite().benches(tmp_path)
    names = {"gateway", "line", "modbus", "modbus-tcp", "server", "spool", "mcp", "sparkplug", "sink", "hostile"}
    assert {b.name for b in real} == names
    for bench in real:
        assert (BENCH_DIR / bench.script).is_file(), bench.script
        assert bench.expects and len(set(bench.expects)) == len(bench.expects), bench.name


def test_the_line_references_are_the_spec_arithmetic_not_the_driver_budget() -> None:
    # The line limit and the virtual line's silences are what the driver is measured against: they come from the
    # Modbus serial-line spec worked out in hil/line.py and line_bench.py, and must agree with it by hand.
    from hil.line import char_bits, t35

    assert [char_bits(8, "E", 1), char_bits(8, "N", 1), char_bits(8, "N", 2), char_bits(7, "E", 1)] == [11, 10, 11, 10]
    assert t35(9600, 11) == pytest.approx(3.5 * 11 / 9600)
    assert t35(19200, 11) == pytest.approx(3.5 * 11 / 19200)
    assert t35(38400, 11) == t35(115200, 11) == pytest.approx(0.00175)

    sys.path.insert(0, str(BENCH_DIR))
    try:
        spec = importlib.util.spec_from_file_location("bench_line", BENCH_DIR / "line_bench.py")
        assert spec and spec.loader
        line_bench = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = line_bench
        spec.loader.exec_module(line_bench)
    finally:
        sys.path.remove(str(BENCH_DIR))
    # Read 10 holding registers from unit 1 at 0 (CRC not checked here), read 10 coils: 5 + 2 x 10 and 5 + 2 bytes.
    holding, coils = bytes.fromhex("01030000000a0000"), bytes.fromhex("01010000000a0000")
    assert line_bench.response_length(holding) == 25
    assert line_bench.response_length(coils) == 7
    one = (8 + 25) * 11 / 9600 + 2 * 3.5 * 11 / 9600
    assert line_bench.computed_limit([holding], 9600, 11) == pytest.approx(1 / one)
    assert line_bench.computed_limit([holding, holding], 115200, 11) == pytest.approx(1 / (33 * 11 / 115200 + 0.0035))
