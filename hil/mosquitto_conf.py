"""The Mosquitto settings every broker the tests and benches start shares (one place; hil imports nothing of tests/)."""

from __future__ import annotations

import os


def base_config(port: int) -> list[str]:
    """A loopback listener on `port`, anonymous, no persistence, unbounded queues, logs on stderr with timestamps."""
    lines = [
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        "persistence false",
        # 0 = unlimited: the default 1000 drops QoS 1 messages to a slow but connected subscriber.
        "max_queued_messages 0",
        "max_inflight_messages 0",
        # stderr goes to the log file, so config errors before logging starts land there too.
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "log_timestamp_format %H:%M:%S",
    ]
    if os.geteuid() == 0:
        # As root, mosquitto 2 switches to the `mosquitto` user before it reads its files (TLS files in a 0700
        # tmp dir: "Unable to load CA certificates ... Permission denied"; a bench's work dir).
        lines.append("user root")
    return lines
