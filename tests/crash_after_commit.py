"""``ledger serve`` whose PostgreSQL projector is SIGKILLed right after its first batch COMMIT,
before the runner's XACK: the fault of ``test_projector.py::test_kill_between_commit_and_xack``,
injected from the test side (run as ``python tests/crash_after_commit.py serve --role projector``).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from consumers.entries import Entry
from ledger.app.cli import main
from projections.projector import BatchResult, Projector

_project = Projector.project


async def _project_then_die(self: Projector, entries: Sequence[Entry]) -> BatchResult:
    result: Any = await _project(self, entries)
    os.kill(os.getpid(), signal.SIGKILL)
    return result  # never reached: the process is gone before the runner acknowledges the batch


Projector.project = _project_then_die  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
