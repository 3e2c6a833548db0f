"""Under CI (`CI=true`) a skip is a failure with its reason; elsewhere it stays a skip; xfail is untouched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

CASES = {
    "test_tool.py": (
        "import shutil, pytest\n"
        "def test_needs_a_tool():\n"
        "    pytest.skip('frobnicate is not installed')\n"
        "@pytest.mark.skipif(True, reason='no IPv6 loopback here')\n"
        "def test_marked():\n"
        "    pass\n"
        "@pytest.fixture\n"
        "def mount():\n"
        "    pytest.skip('mounting a tmpfs is not permitted here')\n"
        "def test_in_setup(mount):\n"
        "    pass\n"
        "@pytest.mark.xfail(reason='known', strict=True)\n"
        "def test_expected_failure():\n"
        "    assert False\n"
        "def test_plain():\n"
        "    pass\n"
    ),
    "test_module.py": "import pytest\npytest.skip('no root here', allow_module_level=True)\n",
}


def _run(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    for name, text in CASES.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), str(TESTS)])
    # The project's own conftest, loaded as a plugin into a run of these few files.
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-p",
            "conftest",
            "-q",
            "-rA",
            "--continue-on-collection-errors",
            str(tmp_path),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("ci", ["true", "TRUE", "1"])
def test_under_ci_every_skip_fails_with_its_reason(tmp_path: Path, ci: str) -> None:
    result = _run(tmp_path, ci)
    out = result.stdout
    assert result.returncode != 0, out
    assert "1 failed, 1 passed, 1 xfailed, 3 errors" in out, out
    for reason in ("frobnicate is not installed", "no IPv6 loopback here", "mounting a tmpfs is not permitted here"):
        assert f"skipped under CI=true, where nothing may skip: Skipped: {reason}" in out, out
    assert "skipped under CI=true, where nothing may skip:" in out and "no root here" in out, out
    assert "SKIPPED" not in out, out  # -rA lists every skip as SKIPPED


@pytest.mark.parametrize("ci", [None, "false", ""])
def test_outside_ci_a_skip_stays_a_skip(tmp_path: Path, ci: str | None) -> None:
    result = _run(tmp_path, ci)
    assert result.returncode == 0, result.stdout
    assert "1 passed, 4 skipped, 1 xfailed" in result.stdout, result.stdout
