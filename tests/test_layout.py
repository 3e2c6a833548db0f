"""The house rules of shared/ARCHITECTURE.md that import-linter cannot see: module size and driver folders.

The import rules themselves (drivers and bridge apart, the shared kernel below them, no cycles) are
import-linter's contracts in pyproject.toml, run by `make lint`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: A module that grows past this holds more than one idea: split it along its seams.
MAX_MODULE_LINES = 400

PRODUCT = ("gateway", "drivers", "bridge")


def product_modules() -> list[Path]:
    """Every Python module of the product (not the tests, not hil/)."""
    return sorted(p for top in PRODUCT for p in (ROOT / top).rglob("*.py"))


def test_no_product_module_holds_more_than_one_idea() -> None:
    """Each module of gateway/, drivers/ and bridge/ stays within MAX_MODULE_LINES lines."""
    long = {
        str(p.relative_to(ROOT)): n
        for p in product_modules()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


@pytest.mark.parametrize("driver", ["modbus", "mcp"])
def test_a_driver_folder_explains_itself(driver: str) -> None:
    """A field driver is a folder with its README, sample config and frozen settings (ARCHITECTURE.md 3)."""
    folder = ROOT / "drivers" / driver
    for name in ("README.md", "sample-config.yaml", "settings.py"):
        assert (folder / name).is_file(), f"drivers/{driver}/{name} is missing"
