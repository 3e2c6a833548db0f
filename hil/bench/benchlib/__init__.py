"""What the benchmarks in hil/bench share, once: their reports, process control, load fleets and configs.

Each bench script is one scenario on top of it. Importing it puts the repository root on sys.path, so
that the scripts run from a checkout where the project is not installed: each script imports it ahead
of the project's packages (it sorts with the third-party imports, which come first). Linux only (/proc).

- report: the report's header, tables, lines and last line; record() hands a headline figure to `make bench`.
- procs: /proc readings (CPU, RSS, descriptors, children), limits, quiet logs; `fieldgate run` as a child.
- children: spawned processes driven over a pipe (Child), one role each, so that their CPU is their own.
- gateway_child: the gateway in such a child, answering status and profile requests.
- profiling: profiles grouped by component.
- fleet: MCP devices by the thousand, or a bare paho publisher, as load.
- mqtt: free ports, a test subscriber, the embedded broker or Mosquitto in a process of their own.
- configs: gateway configs as dicts, written with yaml.safe_dump.
"""

from __future__ import annotations

from ._root import ROOT
from .mqtt import free_port, subscribe
from .procs import CLK_TCK, cpu_seconds, rss_kb
from .report import (
    RESULTS_ENV,
    git_revision,
    heading,
    latency_summary,
    loadavg,
    note,
    package_version,
    percentile,
    print_header,
    print_table,
    progress,
    record,
    run_summary,
    summary,
)

__all__ = [
    "CLK_TCK",
    "RESULTS_ENV",
    "ROOT",
    "cpu_seconds",
    "free_port",
    "git_revision",
    "heading",
    "latency_summary",
    "loadavg",
    "note",
    "package_version",
    "percentile",
    "print_header",
    "print_table",
    "progress",
    "record",
    "rss_kb",
    "run_summary",
    "subscribe",
    "summary",
]
