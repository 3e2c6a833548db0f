"""`fieldgate passwd` (the embedded broker's users file) and `fieldgate check` on broker access."""

from __future__ import annotations

import io
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

from gateway.cli import main

ROOT = Path(__file__).parents[2]
HASHER = PasswordHash((Argon2Hasher(),))


def users_of(path: Path) -> dict[str, str]:
    """{user: hash} of the users file's non-comment lines."""
    lines = [x for x in path.read_text().splitlines() if x and not x.startswith("#")]
    return dict(x.split(":", 1) for x in lines)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A config whose broker reads `users` next to it."""
    path = tmp_path / "config.yaml"
    path.write_text("gateway: {id: t1, http: null}\nbroker: {users: users}\n")
    return path


def passwd(config: Path, user: str, password: str, monkeypatch: pytest.MonkeyPatch) -> int:
    """`fieldgate passwd -c CONFIG --password-stdin USER` in this process."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(password + "\n"))
    return main(["passwd", "-c", str(config), "--password-stdin", user])


def test_passwd_makes_the_file_0600_and_adds_then_replaces(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    users = config.parent / "users"
    assert passwd(config, "alice", "first secret", monkeypatch) == 0
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    users.write_text("# dashboards\n" + users.read_text())  # a comment a technician added
    assert passwd(config, "bob", "bob secret", monkeypatch) == 0
    assert passwd(config, "alice", "second secret", monkeypatch) == 0
    out = capsys.readouterr()
    assert "secret" not in out.out + out.err
    assert out.out.splitlines() == [
        f"{users}: added user alice",
        f"{users}: added user bob",
        f"{users}: replaced user alice",
    ]
    lines = users.read_text().splitlines()
    assert lines[0] == "# dashboards" and [x.split(":")[0] for x in lines[1:]] == ["alice", "bob"]
    got = users_of(users)
    assert HASHER.verify("second secret", got["alice"]) and not HASHER.verify("first secret", got["alice"])
    assert HASHER.verify("bob secret", got["bob"]) and got["bob"].startswith("$argon2id$")
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    assert sorted(p.name for p in config.parent.iterdir()) == ["config.yaml", "users"]  # no temp file left


def test_passwd_keeps_the_mode_of_an_existing_file(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    users = config.parent / "users"
    users.write_text("")
    users.chmod(0o640)  # e.g. root:fieldgate, so that the gateway's user can read it
    assert passwd(config, "alice", "pw", monkeypatch) == 0
    assert stat.S_IMODE(users.stat().st_mode) == 0o640 and set(users_of(users)) == {"alice"}


def test_passwd_prompts_twice_and_refuses_a_mismatch(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    answers = iter(["one", "two", "same", "same"])
    prompts: list[str] = []

    def fake_getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return next(answers)

    monkeypatch.setattr("getpass.getpass", fake_getpass)
    assert main(["passwd", "-c", str(config), "carol"]) == 1
    assert "do not match" in capsys.readouterr().err and not (config.parent / "users").exists()
    assert main(["passwd", "-c", str(config), "carol"]) == 0
    assert prompts == ["Password for carol: ", "Again: "] * 2
    assert HASHER.verify("same", users_of(config.parent / "users")["carol"])


@pytest.mark.parametrize("user", ["$fieldgate", "a:b", "with space", "#x", ""])
def test_passwd_refuses_names_that_cannot_be_a_line(
    config: Path, user: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert passwd(config, user, "pw", monkeypatch) == 1
    assert "cannot be a broker user" in capsys.readouterr().err
    assert not (config.parent / "users").exists()


def test_passwd_refuses_an_empty_password(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert passwd(config, "alice", "", monkeypatch) == 1
    assert "empty password" in capsys.readouterr().err


def test_passwd_needs_broker_users_in_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("gateway: {id: t1}\n")
    assert passwd(cfg, "alice", "pw", monkeypatch) == 1
    assert "broker.users is not set" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [cfg]


def test_passwd_reads_the_real_stdin(config: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "passwd", "-c", str(config), "--password-stdin", "dash"],
        input="s3cret-pw\n",
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "s3cret-pw" not in r.stdout + r.stderr
    assert HASHER.verify("s3cret-pw", users_of(config.parent / "users")["dash"])


# --- fieldgate check -------------------------------------------------------------------------------


def check(text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`fieldgate check` on `text`: (exit code, stderr)."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(text)
    code = main(["check", "-c", str(cfg)])
    return code, capsys.readouterr().err


def test_check_warns_about_a_broker_beyond_loopback_only_without_users(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = "gateway: {http: null}\nbroker:\n  listeners: [tcp://0.0.0.0:1883, tcp://127.0.0.1:1884]\n"
    code, err = check(text, tmp_path, capsys)
    assert code == 0
    assert err.splitlines() == [
        f"warning: {tmp_path / 'config.yaml'}:3: broker.listeners[0]: listens on 0.0.0.0:1883 without authentication"
    ]
    code, err = check(text + "  users: users\n", tmp_path, capsys)
    assert code == 0 and err == ""


def test_check_validates_the_acl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = check("broker:\n  acl: {bob: {read: ['#']}}\n", tmp_path, capsys)
    assert code == 2 and "`acl` rules users of the `users` file" in err
    bad = "broker:\n  users: users\n  acl:\n    bob: {read: ['a/#/b', 'a+'], writ: ['x']}\n"
    code, err = check(bad, tmp_path, capsys)
    assert code == 2
    assert "broker.acl.bob.read[0]: 'a/#/b' is not an MQTT topic filter" in err
    assert "broker.acl.bob.read[1]: 'a+' is not an MQTT topic filter" in err
    assert "broker.acl.bob.writ: unknown key 'writ' (did you mean 'write'?)" in err
    good = "broker:\n  users: users\n  acl:\n    bob: {read: ['fieldgate/#', '+/x'], write: ['fieldgate/+/+/set/+']}\n"
    assert check(good, tmp_path, capsys)[0] == 0
