"""Fixtures shared by the bridge tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.broker_auth import set_password


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A users file with alice (pw-alice); hashed once per module, argon2 is slow on purpose."""
    path = tmp_path_factory.mktemp("users") / "users"
    set_password(path, "alice", "pw-alice")
    return path
