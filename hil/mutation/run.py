"""Mutation testing of the core modules with mutmut: one run per module, then a score table per module.

Each module runs in its own work folder, `mutants/<module>/` under the tree this file sits in: a copy of the
tree with a `[tool.mutmut]` section written for that module alone (its files, its fast in-process tests).
mutmut then makes its own `mutants/` inside that folder, imports the mutated copy ahead of the editable
install, and runs per mutated function only the selected tests that call it.

    .venv/bin/python hil/mutation/run.py                   # every module
    .venv/bin/python hil/mutation/run.py --only spool,outbox
    .venv/bin/python hil/mutation/run.py --only spool --keep --retry-survivors   # after adding a test

Exit status: 0 when every module run reaches MIN_SCORE, 1 otherwise (2 on a usage or tool error).
Mutants listed in `equivalent/<module>.txt` (beside this file) are counted apart and left out of the score.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
TREE = HERE.parent.parent  # the work tree run.py belongs to: /work/main or any copy of it
WORK = TREE / "mutants"
EQUIVALENT_DIR = HERE / "equivalent"  # one file per module, so each has one owner
MIN_SCORE = 0.85
SOURCE_PACKAGES = ["bridge", "drivers", "gateway"]
# Not copied into a work folder: the venv, caches, outputs, and the work folders themselves.
SKIP_TOP = {".git", ".venv", "var", "mutants", ".hypothesis", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
SKIP_ANY = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")


@dataclass(frozen=True)
class Module:
    """One module under mutation: its source files, the mutants that count, and the tests that judge them."""

    name: str
    files: list[str]
    # Test folders, and a pytest -k expression choosing the module's test files (and tests) in them. The
    # arguments stay the same when a test file is added (`test_spool_contract.py` matches `test_spool`),
    # so that mutmut keeps its results for --keep instead of starting over.
    folders: list[str]
    keyword: str
    # mutmut mutant-name globs; empty means every mutant of `files` counts.
    functions: list[str] = field(default_factory=list)


# Tests are in-process only: a gateway, broker or writer started as a subprocess imports the unmutated package.
MODULES = [
    Module(
        "spool",
        ["bridge/spool.py", "bridge/spool_file.py", "bridge/spool_io.py"],
        ["tests/bridge"],
        # the kill -9 tests' writer runs in a subprocess, on the unmutated spool
        "(test_buffers or test_spool or test_state_files) and not kill_9",
    ),
    Module(
        "outbox",
        # Outbox and its parts: live queue, group commit, replay, retained topics, buffer calls, deliveries.
        [
            "bridge/outbox.py",
            "bridge/outbox_live.py",
            "bridge/outbox_commit.py",
            "bridge/outbox_replay.py",
            "bridge/outbox_retained.py",
            "bridge/outbox_buffer.py",
            "bridge/delivery.py",
        ],
        ["tests/bridge"],
        # tests/security/test_outbox_ts.py takes 14 s a run and test_outbox_faults.py holds its case in-process
        "test_outbox",
    ),
    Module(
        "reload",
        ["gateway/reload.py"],
        ["tests/gateway"],
        # test_reload.py's other tests run whole gateways: slow, and all they use of this module is the diff
        "test_reload_diff or test_the_diff_names",
    ),
    Module(
        "mcp_codec",
        ["drivers/mcp/codec.py"],
        ["tests/drivers/mcp"],
        "test_codec or test_payload",
    ),
    Module(
        "mcp_session",
        # The session's I/O, its sans-IO protocol rules and its output (events.py holds plain dataclasses only).
        ["drivers/mcp/session.py", "drivers/mcp/protocol.py", "drivers/mcp/output.py"],
        ["tests/drivers/mcp"],
        # test_protocol drives the protocol in memory; the contract tests drive the session in-process on a loop
        # clock they move; the others start a whole gateway per test (~50 s per surviving mutant). The one left
        # out waits 3 s of real time for a rule a loop-clock test covers.
        "(test_session or test_server_edges or test_protocol) and not test_a_peer_whose_reads_always_end_mid_frame",
    ),
    Module(
        "acl",
        ["bridge/broker_acl.py", "bridge/broker_auth.py"],
        ["tests/bridge"],
        "test_broker_auth or test_acl",
        # Only the ACL: topic matching, the per-user access and the topic plugin, not logins (broker_auth.py's
        # login gate) or the users file (broker_users.py, not mutated).
        functions=[
            "bridge.broker_acl.x_covers__mutmut_*",
            "bridge.broker_acl.xǁAccessǁ*",
            "bridge.broker_acl.x_default_access__mutmut_*",
            "bridge.broker_acl.xǁBrokerAuthǁaccess__mutmut_*",
            "bridge.broker_auth.xǁTopicAclPluginǁ*",
        ],
    ),
    Module(
        "modbus_codec",
        ["drivers/modbus/codec.py"],
        ["tests/drivers/modbus"],
        "test_codec",
    ),
    Module(
        "planner",
        ["drivers/modbus/planner.py"],
        ["tests/drivers/modbus"],
        "test_planner",
    ),
]

CAUGHT = {"killed", "timeout"}


def tool_status(code: int | None) -> str:
    """mutmut's name for a mutant's stored exit code (its own table, so new codes keep their meaning)."""
    from mutmut.stats import status_by_exit_code

    return str(status_by_exit_code[code])


@dataclass(frozen=True)
class Equivalent:
    """A mutant judged equivalent: same behaviour as the original for every input."""

    module: str
    mutant: str
    fingerprint: str
    why: str


def read_equivalents(folder: Path = EQUIVALENT_DIR) -> list[Equivalent]:
    """`module  mutant-name  fingerprint  why...` per line of each `<module>.txt`; `#` starts a comment."""
    out: list[Equivalent] = []
    for path in sorted(folder.glob("*.txt")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(None, 3)
            if len(parts) < 4:
                raise SystemExit(f"{path}:{n}: want `module mutant fingerprint why`, got {line!r}")
            if parts[0] != path.stem:
                raise SystemExit(f"{path}:{n}: an entry of module {parts[0]!r} in the file of {path.stem!r}")
            out.append(Equivalent(*parts))
    return out


def fingerprint(diff: str) -> str:
    """The changed lines of a mutant's diff, hashed: stable when other code moves, stale when the line changes."""
    changed = [
        line[0] + line[1:].strip()
        for line in diff.splitlines()
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    return hashlib.sha256("\n".join(changed).encode()).hexdigest()[:10]


def selection(module: Module) -> list[str]:
    """The pytest arguments choosing the module's tests."""
    return [*module.folders, "-k", module.keyword]


def skipped(name: str) -> bool:
    """A top-level entry of the tree that a work folder does not need."""
    return name in SKIP_TOP or name.endswith(".egg-info")


def prepare(module: Module, folder: Path, keep: bool) -> None:
    """Copy the tree into the module's work folder and write its mutmut section."""
    if folder.exists() and not keep:
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for entry in TREE.iterdir():
        if skipped(entry.name) or entry.name == "pyproject.toml":
            continue
        target = folder / entry.name
        if entry.is_dir():
            # copy2 keeps mtimes: with --keep, mutmut re-mutates only the sources that changed since.
            shutil.copytree(entry, target, ignore=SKIP_ANY, dirs_exist_ok=True, copy_function=shutil.copy2)
        else:
            shutil.copy2(entry, target)
    others = sorted(e.name for e in TREE.iterdir() if not skipped(e.name) and e.name not in SOURCE_PACKAGES)
    section = {
        "source_paths": SOURCE_PACKAGES,
        "only_mutate": module.files,
        "also_copy": others,
        "pytest_add_cli_args_test_selection": selection(module),
        "pytest_add_cli_args": ["-p", "no:cacheprovider"],
        # Timeouts are judged on CPU time, so a busy machine does not turn slow tests into timeouts.
        "timeout_multiplier": 15.0,
        "use_git_change_detection": False,
    }
    text = (TREE / "pyproject.toml").read_text(encoding="utf-8")
    text = re.sub(r"(?ms)^\[tool\.mutmut\].*?(?=^\[|\Z)", "", text)
    text += "\n[tool.mutmut]\n" + "".join(f"{k} = {json.dumps(v, ensure_ascii=False)}\n" for k, v in section.items())
    tomllib.loads(text)  # a broken section would make mutmut fall back to guessing
    (folder / "pyproject.toml").write_text(text, encoding="utf-8")


def results(module: Module, folder: Path) -> dict[str, str]:
    """Every counted mutant of the module and its status, from mutmut's `.meta` files."""
    out: dict[str, str] = {}
    for rel in module.files:
        meta = folder / "mutants" / (rel + ".meta")
        if not meta.exists():
            continue
        for name, code in json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"].items():
            if module.functions and not any(fnmatch.fnmatch(name, g) for g in module.functions):
                continue
            out[name] = tool_status(code)
    return out


def mutmut(folder: Path, *args: str, log: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run mutmut in a work folder with this interpreter (the venv's)."""
    cmd = [sys.executable, "-m", "mutmut", *args]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    if log is None:
        return subprocess.run(cmd, cwd=folder, env=env, text=True, capture_output=True)
    with log.open("a", encoding="utf-8") as f:
        return subprocess.run(cmd, cwd=folder, env=env, text=True, stdout=f, stderr=subprocess.STDOUT)


def diff_of(folder: Path, mutant: str) -> str:
    """The mutant's diff against the original source, as `mutmut show` prints it."""
    return mutmut(folder, "show", mutant).stdout


@dataclass
class Score:
    """One module's counts."""

    module: str
    counts: Counter[str]
    equivalent: int
    seconds: float
    survivors: list[tuple[str, str]]  # (mutant, fingerprint), not listed as equivalent
    stale: list[str]  # equivalent entries whose mutant now differs or is caught

    @property
    def counted(self) -> int:
        """Mutants in the score: all but the listed equivalent ones."""
        return sum(self.counts.values())

    @property
    def score(self) -> float:
        """Caught (killed or timed out) over counted."""
        caught = sum(self.counts[s] for s in CAUGHT)
        return caught / self.counted if self.counted else 0.0


def run_module(module: Module, args: argparse.Namespace) -> Score:
    """Prepare, run mutmut, and score one module."""
    folder = WORK / module.name
    log = folder / "mutmut.log"
    seconds = 0.0
    returncode = 0
    if not args.report:
        prepare(module, folder, keep=args.keep)
        names: list[str] = []
        if args.keep and args.retry_survivors:
            names = [n for n, s in results(module, folder).items() if s not in CAUGHT]
        elif module.functions:
            names = list(module.functions)
        start = time.monotonic()
        print(f"{module.name}: mutating {', '.join(module.files)}; tests {' '.join(selection(module))}", flush=True)
        returncode = mutmut(folder, "run", "--max-children", str(args.max_children), *names, log=log).returncode
        seconds = time.monotonic() - start
    status = results(module, folder)
    if returncode != 0 or not status:
        print(f"{module.name}: mutmut failed (exit {returncode}); its output is in {log}", file=sys.stderr)
        if log.exists():
            print("".join(log.read_text(encoding="utf-8", errors="replace").splitlines(True)[-30:]), file=sys.stderr)
        raise SystemExit(2)
    # Read now, not at the start: the list may have grown while mutmut ran.
    listed = {e.mutant: e for e in read_equivalents() if e.module == module.name}
    counts: Counter[str] = Counter()
    equivalent = 0
    survivors: list[tuple[str, str]] = []
    stale: list[str] = []
    for name, state in sorted(status.items()):
        entry = listed.pop(name, None)
        if state in CAUGHT:
            counts[state] += 1
            if entry:
                stale.append(f"{name}: listed as equivalent but {state}")
            continue
        if state == "not checked":  # a stopped run: neither caught nor a survivor yet
            counts[state] += 1
            continue
        print_ = fingerprint(diff_of(folder, name))
        if entry and entry.fingerprint == print_:
            equivalent += 1
            continue
        if entry:
            stale.append(f"{name}: listed with fingerprint {entry.fingerprint}, the mutant now has {print_}")
        counts[state] += 1
        survivors.append((name, print_))
    stale += [f"{name}: listed as equivalent but no such mutant" for name in listed]
    return Score(module.name, counts, equivalent, seconds, survivors, stale)


def table(scores: list[Score]) -> str:
    """The score table, as Markdown."""
    head = "| module | mutants | killed | timeout | survived | no tests | other | equivalent | score | time |"
    rows = [head, "|" + "---|" * 10]
    for s in scores:
        c = s.counts
        other = s.counted - c["killed"] - c["timeout"] - c["survived"] - c["no tests"]
        rows.append(
            f"| {s.module} | {s.counted + s.equivalent} | {c['killed']} | {c['timeout']} | {c['survived']} "
            f"| {c['no tests']} | {other} | {s.equivalent} | {s.score:.1%} | {s.seconds:.0f} s |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen modules, print the table and each survivor; exit 1 if a module is below MIN_SCORE."""
    names = [m.name for m in MODULES]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help=f"comma-separated modules, of: {','.join(names)}")
    parser.add_argument("--max-children", type=int, default=2, help="parallel test processes (default 2)")
    parser.add_argument("--nice", type=int, default=10, help="niceness (default 10: others share the cores)")
    parser.add_argument("--keep", action="store_true", help="reuse the module's work folder and mutmut's results")
    parser.add_argument("--retry-survivors", action="store_true", help="with --keep: run again the mutants not caught")
    parser.add_argument("--show", action="store_true", help="print the diff of every survivor")
    parser.add_argument("--report", action="store_true", help="score the work folders as they are (a stopped run too)")
    parser.add_argument("--keyword", help="with one module in --only: this pytest -k expression instead of its own")
    args = parser.parse_args(argv)
    chosen = MODULES
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in names]
        if unknown:
            parser.error(f"unknown module(s) {unknown}; known: {names}")
        chosen = [m for m in MODULES if m.name in wanted]
    if args.keyword:
        if len(chosen) != 1:
            parser.error("--keyword needs exactly one module in --only")
        chosen = [replace(chosen[0], keyword=args.keyword)]
    if args.nice:
        os.nice(args.nice)
    read_equivalents()  # a malformed line stops the run before it starts
    scores = []
    for module in chosen:
        score = run_module(module, args)
        scores.append(score)
        print(f"{module.name}: {score.score:.1%} in {score.seconds:.0f} s", flush=True)
    print()
    print(table(scores))
    for s in scores:
        for name, print_ in s.survivors:
            print(f"survivor {s.module} {name} {print_}")
            if args.show:
                print(diff_of(WORK / s.module, name))
        for line in s.stale:
            print(f"stale equivalent entry ({s.module}) {line}")
    low = [s.module for s in scores if s.score < MIN_SCORE]
    if low:
        print(f"below {MIN_SCORE:.0%}: {', '.join(low)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
