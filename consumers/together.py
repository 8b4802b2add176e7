"""Running several long-running loops as one (``run_all``): a process's roles
(``ledger.app.service``), and inside a role its parts (the projector's consumer per shard, a
venue's consumer and its driver, the live venues of every shard).

Like a task group, a failure of one ends them all and is raised; unlike one, the others are first
told to stop as ``stop`` would (each finishes its batch), cancelled only when one has not ended a
grace later, and never waited for beyond a second grace: a task blocked in a Redis read may never
see its cancellation (redis-py loses one that arrives together with the read's reply:
redis/redis-py#2028, about one in a hundred cancellations of an ``XREADGROUP BLOCK`` here), and a
task group would wait for it for ever, the process up with the other loops gone (it happened: the
retention role failed, the handler went on, the projector was gone and the archive fell behind
with no line in the log). Such a task is logged with where it waits and ``RolesStuck`` raised,
on which the process exits without it (``ledger.app.processes.run_loop``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Coroutine, Sequence
from typing import Any

import structlog

from ledger.errors import OperationFailed

log = structlog.get_logger("consumers.together")

# After one loop failed: how long the others are given to finish their batch and end, then how
# long to end once cancelled (what one had read and not finished is redelivered), before the
# process exits without them.
GRACE_S = 10.0


class RolesStuck(OperationFailed):
    """A loop of ``run_all`` did not end once cancelled (it swallowed the cancellation): the
    process exits without waiting for it (``ledger.app.processes.run_loop``)."""


# A long-running loop: runs until the event is set (``run(stop)`` of a role, a consumer).
Loop = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


async def run_all(loops: Sequence[Loop], stop: asyncio.Event, *, grace_s: float = GRACE_S) -> None:
    """Run every loop until ``stop``; when one fails (or this is cancelled) the others are
    told to stop, then cancelled after ``grace_s``, and the failures raised together; one still
    running ``grace_s`` after its cancellation is logged and ``RolesStuck`` raised (module doc).
    With no loop (a role that is off, such as retention without a retention), it waits for
    ``stop``: a process with nothing to do stays up rather than end and be restarted."""
    if not loops:
        await stop.wait()
        return
    halt = asyncio.Event()  # what the loops see: ``stop``, or a failure
    relay = asyncio.create_task(_relay(stop, halt))
    tasks = [asyncio.create_task(loop(halt), name=_name(loop)) for loop in loops]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        relay.cancel()
        halt.set()
        await _end(tasks, grace_s)
    errors = [exc for task in tasks if not task.cancelled() and (exc := task.exception()) is not None]
    if errors:
        raise BaseExceptionGroup("unhandled errors in the roles", errors)


async def _relay(stop: asyncio.Event, halt: asyncio.Event) -> None:
    await stop.wait()
    halt.set()


def _name(loop: Loop) -> str:
    """A loop's class and method, and its owner's name where it has one (a stream consumer's)."""
    owner = getattr(loop, "__self__", None)
    what = getattr(loop, "__qualname__", type(loop).__name__)
    name = getattr(owner, "name", None)
    return f"{what} {name}" if isinstance(name, str) else what


def _awaiting(task: asyncio.Task[None]) -> list[str]:
    """Where a suspended task is, outermost first: each coroutine (or async generator) it awaits
    in turn, down to the one waiting on a future (``Task.get_stack`` shows only the first)."""
    where: list[str] = []
    awaited: Any = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
        if frame is not None:
            where.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_qualname}")
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None)
    return where


async def _end(tasks: Sequence[asyncio.Task[None]], grace_s: float) -> None:
    """Wait ``grace_s`` for the tasks still running (told to stop), cancel those that go on and
    wait ``grace_s`` again; ``RolesStuck`` (each one's place logged) for those still running."""
    running = await _running_after([task for task in tasks if not task.done()], grace_s)
    for task in running:
        task.cancel()
    stuck = await _running_after(running, grace_s)
    if not stuck:
        return
    for task in stuck:
        log.error("role task still running after its cancellation", task=task.get_name(), where=_awaiting(task))
    failed = next((exc for task in tasks if task.done() and not task.cancelled() and (exc := task.exception())), None)
    raise RolesStuck(
        f"{len(stuck)} role task(s) did not end {grace_s:g} s after they were cancelled "
        f"({', '.join(sorted(task.get_name() for task in stuck))}): exit the process (a bug: the log says where)"
    ) from failed


async def _running_after(tasks: Collection[asyncio.Task[None]], seconds: float) -> set[asyncio.Task[None]]:
    """Those of ``tasks`` still running ``seconds`` from now (at once when none is)."""
    if not tasks:
        return set()
    _ended, running = await asyncio.wait(tasks, timeout=seconds)
    return running
