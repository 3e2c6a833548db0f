"""Run the independent Sparkplug B decoder (tests/sparkplug/independent/decode.py) on messages, for the tests.

The decoder is pysparkplug in a venv of its own (`.venv-sparkplug`, created by `make test`): it owes nothing to
our codec, so a test that decodes our bytes with both catches a mistake the two would not share. Import it as
`from sparkplug.sparkplug_decode import decode_independently` (the `tests` folder is on pytest's pythonpath).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
#: The Python of the decoder's venv (pysparkplug needs paho-mqtt<2, so it cannot share ours).
SPB_PYTHON = ROOT / ".venv-sparkplug" / "bin" / "python"
#: The decoder script (filter mode: JSON lines of topic + hex payload in, decoded JSON lines out).
DECODER = ROOT / "tests" / "sparkplug" / "independent" / "decode.py"


def decode_independently(messages: list[tuple[str, bytes]], timeout: float = 60.0) -> list[dict[str, Any]]:
    """Decode (topic, payload) pairs in order with pysparkplug; one dict per message (an `error` key if it failed).

    Births are remembered across the list as a host would (a DATA metric sent by alias gets its name and
    datatype from the last birth), so pass a node's messages in the order they went out.
    """
    if not SPB_PYTHON.exists():
        raise RuntimeError(
            f"the independent Sparkplug decoder's venv is missing ({SPB_PYTHON}): run `make test` "
            "(it creates .venv-sparkplug from tests/sparkplug/independent/requirements.txt)"
        )
    lines = "".join(json.dumps({"topic": topic, "payload": payload.hex()}) + "\n" for topic, payload in messages)
    proc = subprocess.run(
        [str(SPB_PYTHON), str(DECODER)],
        input=lines,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the independent decoder exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    out = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    if len(out) != len(messages):
        raise RuntimeError(
            f"the independent decoder answered {len(out)} lines for {len(messages)} messages: "
            f"{proc.stderr.strip()[-2000:]}"
        )
    return out
