"""The edge node's bdSeq file (bridge/sparkplug/bdseq.py): 0..255 and around, kept across restarts, written down
before it is used, a damaged file moved aside and counted, a state dir that cannot be written no reason to stop."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from bridge import statefiles
from bridge.sparkplug.bdseq import BdSeqFile


@pytest.fixture(autouse=True)
def fresh_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test counts moved-aside files from zero."""
    monkeypatch.setattr(statefiles, "_counts", dict.fromkeys(statefiles.FILES, 0))


def bdseq_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "sparkplug" / "scada.bdseq"


def test_next_runs_0_to_255_and_wraps_writing_each_number_down(tmp_path: Path) -> None:
    """0, 1, ..., 255, 0: each number is in the file (decimal text) once next() returned it; no temp file is left."""
    path = bdseq_path(tmp_path)
    seq = BdSeqFile(path)
    got = []
    for _ in range(258):
        got.append(seq.next())
        assert path.read_text() == f"{got[-1]}\n"
    assert got == [*range(256), 0, 1]
    assert sorted(p.name for p in path.parent.iterdir()) == ["scada.bdseq"]


def test_a_new_instance_on_the_same_file_continues_the_numbering(tmp_path: Path) -> None:
    """A restart takes the number after the last one used, also across the wrap."""
    path = bdseq_path(tmp_path)
    first = BdSeqFile(path)
    assert [first.next() for _ in range(3)] == [0, 1, 2]
    assert BdSeqFile(path).next() == 3
    path.write_text("255\n")
    assert BdSeqFile(path).next() == 0


@pytest.mark.parametrize("text", ["7", " 7 \n", "007\n"])
def test_a_number_with_spaces_or_leading_zeros_is_read(tmp_path: Path, text: str) -> None:
    """What an operator might write by hand still reads as the number."""
    path = bdseq_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(text)
    assert BdSeqFile(path).next() == 8
    assert statefiles.corrupt_counts()["sparkplug"] == 0


@pytest.mark.parametrize(
    "content",
    [b"garbage", b"999\n", b"256", b"-1", b"1.5", b"", b"\x00\xff\x17\x80" * 100, "\u00b2".encode(), b"1" * 100],
    ids=["garbage", "999", "256", "negative", "float", "empty", "binary", "superscript two", "long digits"],
)
def test_a_corrupt_file_is_moved_aside_counted_and_numbering_starts_at_0(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Anything but a number 0-255 is renamed `<name>.corrupt-<secs>` (kept for the operator), counted as
    `sparkplug`, logged as corrupt, and the next connection takes bdSeq 0."""
    path = bdseq_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with caplog.at_level(logging.ERROR):
        seq = BdSeqFile(path)
    assert statefiles.corrupt_counts()["sparkplug"] == 1
    assert "corrupt" in caplog.text
    (aside,) = [p for p in path.parent.iterdir() if p.name.startswith("scada.bdseq.corrupt-")]
    assert aside.read_bytes() == content
    assert not path.exists()
    assert seq.next() == 0 and path.read_text() == "0\n"
    assert BdSeqFile(path).next() == 1
    assert statefiles.corrupt_counts()["sparkplug"] == 1


def test_a_state_dir_that_cannot_be_written_logs_and_still_gives_numbers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The connection goes ahead with the next number in memory; each failed write is logged."""
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state dir should be")  # fails as root too, unlike a chmod
    seq = BdSeqFile(blocker / "sparkplug" / "scada.bdseq")
    with caplog.at_level(logging.WARNING, logger="bridge.sparkplug"):
        got = [seq.next() for _ in range(3)]
    assert got == [0, 1, 2]
    assert caplog.text.count("cannot write") == 3
    assert statefiles.corrupt_counts()["sparkplug"] == 0


def test_a_directory_in_place_of_the_file_gives_numbers_and_is_not_counted_corrupt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A path that cannot be read (not as data) is logged; numbering starts at 0 and carries on."""
    path = bdseq_path(tmp_path)
    path.mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="bridge.sparkplug"):
        seq = BdSeqFile(path)
        assert [seq.next(), seq.next()] == [0, 1]
    assert "cannot read" in caplog.text and "cannot write" in caplog.text
    assert path.is_dir()


def test_the_number_is_fsynced_before_the_rename_and_the_rename_is_synced_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new number reaches the disk before the rename makes it the file, and the rename reaches it before the
    number is used (a power cut leaves the old or the new number, and never brings back one already used)."""
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append(f"fsync {os.readlink(f'/proc/self/fd/{fd}').rsplit('/', 1)[-1]}")
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls.append(f"replace {Path(src).name} {Path(dst).name}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = bdseq_path(tmp_path)
    assert BdSeqFile(path).next() == 0
    assert calls == ["fsync scada.bdseq.tmp", "replace scada.bdseq.tmp scada.bdseq", "fsync sparkplug"]
