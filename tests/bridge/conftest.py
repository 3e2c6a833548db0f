"""Fixtures shared by the bridge tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.broker_users import set_password


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A users file with alice (pw-alice); hashed once per module, argon2 is slow on purpose."""
    path = tmp_path_factory.mktemp("users") / "users"
    set_password(path, "alice", "pw-alice")
    return path


#: What the outbox logs when one of its loops hits an error it did not expect: it goes on, but that is a bug.
LOOP_FAILURES = ("replay failed", "spool commit failed", "housekeeping failed")


@pytest.fixture
def no_loop_failure(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """The test also fails when an outbox loop failed on the way, even if it healed itself afterwards."""
    yield
    failed = [
        r.getMessage()
        for r in caplog.get_records("call")  # in teardown, caplog.records holds the teardown's only
        if r.name == "bridge.outbox" and r.getMessage().split(": ", 1)[-1].startswith(LOOP_FAILURES)
    ]
    assert failed == []
