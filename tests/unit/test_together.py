"""How a process runs its roles, and a role its parts (``consumers.together.run_all``): a failed
loop stops the others (told to stop first, cancelled after a grace), and one that swallows its
cancellation cannot keep the process up with the others gone. It did: the retention role failed, the projector was
cancelled, the handler's blocking XREADGROUP lost its cancellation (redis-py returns the reply
that came with it) and went on for ever, and the archive fell behind with no line in the log.
Pure asyncio: no servers."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time

import pytest
from structlog.testing import capture_logs

from consumers.together import RolesStuck, run_all


class Fails:
    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.sleep(0.01)
        raise ValueError("the retention pass broke")


class Waits:
    """Ends at ``stop`` (then ``ended``), or when cancelled (then ``cancelled``)."""

    def __init__(self) -> None:
        self.ended = self.cancelled = False

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await stop.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        self.ended = True


class IgnoresStop(Waits):
    """Ends only when cancelled."""

    async def run(self, stop: asyncio.Event) -> None:
        await super().run(asyncio.Event())


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
    running = asyncio.create_task(run_all([w.run for w in waiting], stop))
    await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(running, 1)
    assert [(w.ended, w.cancelled) for w in waiting] == [(True, False), (True, False)]


async def test_nothing_to_run_waits_for_stop() -> None:
    stop = asyncio.Event()
    running = asyncio.create_task(run_all([], stop))
    await asyncio.sleep(0.05)
    assert not running.done()
    stop.set()
    await asyncio.wait_for(running, 1)


async def test_a_failed_role_stops_the_others_then_cancels_those_that_go_on() -> None:
    waiting, ignoring = Waits(), IgnoresStop()
    started = time.monotonic()
    with pytest.raises(BaseExceptionGroup) as caught:
        await asyncio.wait_for(run_all([waiting.run, ignoring.run, Fails().run], asyncio.Event(), grace_s=0.2), 2)
    assert 0.2 <= time.monotonic() - started < 1.0
    assert [str(e) for e in caught.value.exceptions] == ["the retention pass broke"]
    assert (waiting.ended, waiting.cancelled) == (True, False)  # finished its batch: not cancelled
    assert (ignoring.ended, ignoring.cancelled) == (False, True)


async def test_a_role_that_swallows_its_cancellation_is_reported_and_left() -> None:
    stuck = SwallowsCancellation()
    started = time.monotonic()
    try:
        with capture_logs() as logs, pytest.raises(RolesStuck) as caught:
            await run_all([stuck.run, Fails().run], asyncio.Event(), grace_s=0.2)
    finally:
        stuck.release.set()
    assert 0.4 <= time.monotonic() - started < 1.5  # told to stop, then cancelled: twice the grace
    assert isinstance(caught.value.__cause__, ValueError)
    assert str(caught.value) == (
        "1 role task(s) did not end 0.2 s after they were cancelled (SwallowsCancellation.run): "
        "exit the process (a bug: the log says where)"
    )
    [line] = [entry for entry in logs if entry["event"] == "role task still running after its cancellation"]
    assert line["task"] == "SwallowsCancellation.run"
    outer, inner, innermost = line["where"]
    assert outer.endswith(" SwallowsCancellation.run") and "test_together.py:" in outer
    assert inner.endswith(" SwallowsCancellation.poll_forever")
    assert innermost.endswith(" sleep") and "asyncio" in innermost


async def test_being_cancelled_stops_every_role() -> None:
    waiting = [Waits(), Waits()]
    running = asyncio.create_task(run_all([w.run for w in waiting], asyncio.Event()))
    await asyncio.sleep(0.01)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert [(w.ended, w.cancelled) for w in waiting] == [(True, False), (True, False)]


@pytest.mark.parametrize("nested", [False, True], ids=["a role", "a part of a role"])
def test_a_process_whose_role_is_stuck_exits_instead_of_hanging(nested: bool) -> None:
    """The real thing: ``run_loop`` (what ``serve`` and its role processes run) exits with
    status 1, where the event loop's own shutdown would wait for the stuck task for ever; also
    when the stuck loop is a part of a role (its ``RolesStuck`` then comes among the roles')."""
    program = textwrap.dedent(
        """
        import asyncio, sys
        from consumers.together import run_all
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

        class Role:
            async def run(self, stop):
                await run_all([Stuck().run, Fails().run], stop, grace_s=0.3)

        class Idle:
            async def run(self, stop):
                await stop.wait()

        configure_logging("json", "info")
        loops = [Role().run, Idle().run] if sys.argv[1] == "nested" else [Stuck().run, Fails().run]
        run_loop(run_all(loops, asyncio.Event(), grace_s=0.3))
        """
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", program, "nested" if nested else "flat"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert time.monotonic() - started < 30
    assert "role task still running after its cancellation" in done.stderr
    assert "role process failed and a role did not stop: exiting now" in done.stderr
    assert "the retention pass broke" in done.stderr
