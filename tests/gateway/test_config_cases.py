"""`fieldgate check` on every folder of tests/config_cases: its exit code and output must be expected.txt exactly.

A case is a folder with a `config.yaml` and an `expected.txt` (see tests/config_cases/README.md): a new check of
the config is a new folder, not new code. `FIELDGATE_REGEN_CASES=1` writes expected.txt from what the command
prints now instead of comparing, and fails each case so that nobody commits a regenerated file unread.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.cli import main

CASES = Path(__file__).resolve().parents[1] / "config_cases"
REGEN = os.environ.get("FIELDGATE_REGEN_CASES") == "1"


def case_folders() -> list[Path]:
    """Every case folder, by name."""
    return sorted(p for p in CASES.iterdir() if (p / "config.yaml").is_file())


def rendered(code: int, out: str, err: str) -> str:
    """What expected.txt holds: the exit code, then stdout and stderr under their names (an empty one left out)."""
    parts = [f"exit: {code}\n"]
    for name, text in (("stdout", out), ("stderr", err)):
        if text:
            parts.append(f"--- {name}\n{text}")
    return "".join(parts)


def test_every_case_folder_has_both_files() -> None:
    folders = [p for p in CASES.iterdir() if p.is_dir()]
    assert folders, f"no cases in {CASES}"
    for folder in folders:
        assert (folder / "config.yaml").is_file(), f"{folder.name}: no config.yaml"
        assert REGEN or (folder / "expected.txt").is_file(), f"{folder.name}: no expected.txt (regenerate it)"


@pytest.mark.parametrize("case", case_folders(), ids=lambda p: p.name)
def test_check_prints_what_the_case_expects(
    case: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # From the case's folder, so that messages name `config.yaml` as a user who ran it there would see it.
    monkeypatch.chdir(case)
    code = main(["check", "-c", "config.yaml"])
    captured = capsys.readouterr()
    got = rendered(code, captured.out, captured.err)
    expected = case / "expected.txt"
    if REGEN:
        expected.write_text(got, encoding="utf-8")
        pytest.fail(f"regenerated {expected}: read it before committing it, then run again without REGEN")
    assert got == expected.read_text(encoding="utf-8")
