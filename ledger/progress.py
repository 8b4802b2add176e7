"""Progress bars of the long operator commands (``ledger export``, ``ledger rebuild``): a rich bar
on the stream when it is a terminal, nothing when it is piped, redirected or None, so what a
script or a test captures is never mixed with redraws."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


@contextmanager
def progress_bar(stream: TextIO | None, description: str, total: int) -> Iterator[Callable[[], None]]:
    """A rich progress bar on ``stream`` when it is a terminal; yields the function to call per
    step (it does nothing when the stream is piped or None)."""
    if stream is None or not stream.isatty():
        yield lambda: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(file=stream), transient=False) as bar:
        task = bar.add_task(description, total=total or None)
        yield lambda: bar.advance(task)
