"""The README's API example runs, so it cannot rot.

README.md marks the example's code (``<!-- readme-example: code -->`` before a ``python`` fence)
and what it prints (``<!-- readme-example: output -->`` before a ``text`` fence). The code is
``examples/quickstart.py`` verbatim; it runs as a subprocess, as its docstring says, against
``ledger serve`` (``serve`` with every role ``ledger serve`` runs by default, in this process to
spare a second start-up; a real Redis and PostgreSQL), and must print exactly the
README's output: the order id differs on every run, and ``create_order`` returns the order as
the live projection shows it, ``pending`` or, when the paper venue accepted it first, ``open``.
"""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from ledger.app.service import ROLES
from tests.live_helpers import running_ledger
from tests.pipeline_helpers import ROOT, ledger_env

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def marked_block(readme: str, mark: str, language: str) -> str:
    """The fenced block right after ``<!-- readme-example: MARK -->``; exactly one must exist."""
    found = re.findall(rf"<!-- readme-example: {mark} -->\n```{language}\n(.*?)^```$", readme, re.S | re.M)
    assert len(found) == 1, f"README.md must mark exactly one {language} block as readme-example: {mark}"
    return str(found[0])


def normalized(output: str) -> list[str]:
    """Lines with every order id as ``<id>`` and the freshly placed order's status as ``pending``."""
    lines = [UUID.sub("<id>", line) for line in output.splitlines()]
    return ["order <id> pending" if line == "order <id> open" else line for line in lines]


def test_the_marked_blocks_are_the_example_file_and_its_output() -> None:
    readme = (ROOT / "README.md").read_text()

    assert marked_block(readme, "code", "python") == (ROOT / "examples" / "quickstart.py").read_text()
    assert normalized(marked_block(readme, "output", "text"))[2:] == [
        "order <id> pending",
        "cancel accepted: True",
        "closed: True",
        "open positions: []",
    ]


async def test_the_readme_api_example_prints_what_the_readme_shows(
    redis_url: str, database_url: str, tmp_path: Path
) -> None:
    readme = (ROOT / "README.md").read_text()
    code = marked_block(readme, "code", "python")
    expected = marked_block(readme, "output", "text")

    async with running_ledger(redis_url, tmp_path, roles=tuple(ROLES), database_url=database_url):
        example = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            cwd=tmp_path,
            env=ledger_env(redis_url),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(example.communicate(), timeout=60)

    assert (example.returncode, stderr.decode()) == (0, "")
    assert normalized(stdout.decode()) == normalized(expected)
