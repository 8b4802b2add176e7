"""The one retry loop of the ledger (as arq keeps one polling helper): every long-running part
(the consumer runner, the projector's schema step, the paper venue's watcher, the reader of
compacted outcomes) calls ``poll``.

``Backoff`` is the pure rule: after consecutive failures wait ``first_s``, then twice as long
each time, at most ``max_s``; a success starts again from ``first_s`` (defaults in
``ledger.defaults``). ``poll`` repeats an attempt until the stop event is set or the attempt
says it is done; an error of ``retry_on`` is reported to ``on_retry`` with the delay about to be
waited, and waited out; after a success it waits ``idle_s`` (a poll interval), cut short by
``wake`` when given.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ledger import defaults


@dataclass(slots=True)
class Backoff:
    """Delays after consecutive failures: ``first_s``, doubled each time, capped at ``max_s``."""

    first_s: float = defaults.BACKOFF_FIRST_S
    max_s: float = defaults.BACKOFF_MAX_S
    _next_s: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if not 0 < self.first_s <= self.max_s:
            raise ValueError(f"back-off {self.first_s} s to {self.max_s} s: give 0 < first <= max")
        self._next_s = self.first_s

    def failed(self) -> float:
        """The delay to wait after this failure (the next one will be longer, up to ``max_s``)."""
        delay = self._next_s
        self._next_s = min(delay * 2, self.max_s)
        return delay

    def succeeded(self) -> None:
        self._next_s = self.first_s


# Reported a retryable error and the delay about to be waited (seconds).
RetryHook = Callable[[BaseException, float], Awaitable[None]]
# One attempt; True ends the loop (the work is done).
Attempt = Callable[[], Awaitable[bool]]


async def poll(
    stop: asyncio.Event,
    attempt: Attempt,
    *,
    retry_on: tuple[type[BaseException], ...],
    on_retry: RetryHook,
    backoff: Backoff | None = None,
    idle_s: float = 0.0,
    wake: asyncio.Event | None = None,
) -> bool:
    """Run ``attempt`` until ``stop`` is set (return False) or it returns True (return True)."""
    backoff = backoff or Backoff()
    while not stop.is_set():
        if wake is not None:
            wake.clear()
        try:
            if await attempt():
                return True
        except retry_on as exc:
            delay = backoff.failed()
            await on_retry(exc, delay)
            await sleep_or_stop(stop, delay)
            continue
        backoff.succeeded()
        if idle_s > 0:
            await sleep_or_stop(stop, idle_s, wake)
    return False


async def sleep_or_stop(stop: asyncio.Event, seconds: float, wake: asyncio.Event | None = None) -> None:
    """Wait ``seconds``, or less if ``stop`` (or ``wake``) is set meanwhile."""
    waiters = [asyncio.ensure_future(stop.wait())]
    if wake is not None:
        waiters.append(asyncio.ensure_future(wake.wait()))
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this is cancelled: no waiter is left behind
        for task in waiters:
            task.cancel()
