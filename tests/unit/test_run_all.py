"""How a process runs its roles (``ledger.app.service.run_all``): a failed role ends them all,
and a role that swallows its cancellation cannot keep the process up with the others gone (it
did: the retention role failed, the projector stopped, the handler went on for ever and the
archive fell behind without a line in the log). Pure asyncio: no servers."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time

import pytest
from structlog.testing import capture_logs

from ledger.app.service import RolesStuck, run_all


class Fails:
    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.sleep(0.01)
        raise ValueError("the retention pass broke")


class Waits:
    """Ends at ``stop``; records that it was cancelled."""

    def __init__(self) -> None:
        self.cancelled = False

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await stop.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


class SwallowsCancellation:
    """A loop that catches what it should not (``CancelledError``) until ``release``."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        while not self.release.is_set():
            try:
                await self.poll_forever()
            except asyncio.CancelledError:
                continue

    async def poll_forever(self) -> None:
        await asyncio.sleep(0.01)


async def test_every_role_ends_at_stop() -> None:
    stop = asyncio.Event()
    waiting = [Waits(), Waits()]
    running = asyncio.create_task(run_all(waiting, stop))
    await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(running, 1)
    assert [w.cancelled for w in waiting] == [False, False]


async def test_a_failed_role_cancels_the_others_and_is_raised() -> None:
    waiting = Waits()
    with pytest.raises(BaseExceptionGroup) as caught:
        await asyncio.wait_for(run_all([waiting, Fails()], asyncio.Event()), 1)
    assert [str(e) for e in caught.value.exceptions] == ["the retention pass broke"]
    assert waiting.cancelled


async def test_a_role_that_swallows_its_cancellation_is_reported_and_left() -> None:
    stuck = SwallowsCancellation()
    started = time.monotonic()
    with capture_logs() as logs, pytest.raises(RolesStuck) as caught:
        await run_all([stuck, Fails()], asyncio.Event(), grace_s=0.2)
    assert 0.2 <= time.monotonic() - started < 1.0
    assert isinstance(caught.value.__cause__, ValueError)
    assert str(caught.value) == (
        "1 role task(s) did not end 0.2 s after they were cancelled (SwallowsCancellation): "
        "exit the process (a bug: the log says where)"
    )
    [line] = [entry for entry in logs if entry["event"] == "role task still running after its cancellation"]
    assert line["task"] == "SwallowsCancellation"
    assert "in run" in line["where"] and "test_run_all.py" in line["where"]
    stuck.release.set()


async def test_being_cancelled_cancels_every_role() -> None:
    waiting = [Waits(), Waits()]
    running = asyncio.create_task(run_all(waiting, asyncio.Event()))
    await asyncio.sleep(0.01)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert [w.cancelled for w in waiting] == [True, True]


def test_a_process_whose_role_is_stuck_exits_instead_of_hanging() -> None:
    """The real thing: ``run_loop`` (what ``serve`` and its role processes run) exits with
    status 1, where the event loop's own shutdown would wait for the stuck task for ever."""
    program = textwrap.dedent(
        """
        import asyncio
        from ledger.app import service
        from ledger.app.logs import configure_logging
        from ledger.app.processes import run_loop

        class Fails:
            async def run(self, stop):
                await asyncio.sleep(0.05)
                raise ValueError("the retention pass broke")

        class Stuck:
            async def run(self, stop):
                while True:
                    try:
                        await asyncio.sleep(0.01)
                    except asyncio.CancelledError:
                        continue

        configure_logging("json", "info")
        run_loop(service.run_all([Stuck(), Fails()], asyncio.Event(), grace_s=0.3))
        """
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr[-2000:]
    assert time.monotonic() - started < 30
    assert "role task still running after its cancellation" in done.stderr
    assert "role process failed and a role did not stop: exiting now" in done.stderr
    assert "the retention pass broke" in done.stderr
