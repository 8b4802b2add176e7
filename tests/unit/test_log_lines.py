"""Log lines of processes sharing one output (``serve``'s role processes inherit its stderr): each
line is written whole, in one write, so lines of two processes never mix within a line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

LINES = 3000
_CHILD = f"""
from ledger.app.logs import configure_logging
import structlog
configure_logging("json", "info")
log = structlog.get_logger("t")
for n in range({LINES}):
    log.info("line", n=n, pad="x" * 100)
"""


def test_two_processes_logging_to_one_file_never_mix_their_lines(tmp_path: Path) -> None:
    out = tmp_path / "both.log"
    with open(out, "wb") as shared:
        children = [
            subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.DEVNULL, stderr=shared) for _ in range(2)
        ]
        for child in children:
            assert child.wait(timeout=60) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 2 * LINES
    assert sorted(json.loads(line)["n"] for line in lines) == sorted(list(range(LINES)) * 2)
