"""The one back-off rule and retry loop (``consumers.backoff``)."""

from __future__ import annotations

import asyncio

import pytest

from consumers.backoff import Backoff, poll, sleep_or_stop
from ledger import defaults


def test_delays_double_from_the_first_up_to_the_cap_and_a_success_starts_again() -> None:
    backoff = Backoff(0.1, 0.5)
    assert [backoff.failed() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    backoff.succeeded()
    assert backoff.failed() == 0.1


def test_defaults_come_from_the_one_place() -> None:
    backoff = Backoff()
    assert (backoff.first_s, backoff.max_s) == (defaults.BACKOFF_FIRST_S, defaults.BACKOFF_MAX_S)


def test_an_impossible_back_off_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^back-off 2 s to 1 s: give 0 < first <= max$"):
        Backoff(2, 1)


def test_poll_retries_reports_each_delay_and_ends_when_the_attempt_is_done() -> None:
    outcomes: list[BaseException | bool] = [OSError("down"), OSError("down"), False, OSError("down"), True]
    reported: list[tuple[str, float]] = []

    async def attempt() -> bool:
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def on_retry(exc: BaseException, delay: float) -> None:
        reported.append((str(exc), delay))

    async def main() -> bool:
        return await poll(asyncio.Event(), attempt, retry_on=(OSError,), on_retry=on_retry, backoff=Backoff(0.01, 0.5))

    assert asyncio.run(main()) is True
    assert reported == [("down", 0.01), ("down", 0.02), ("down", 0.01)]
    assert outcomes == []


def test_poll_returns_false_once_stopped() -> None:
    async def main() -> bool:
        stop = asyncio.Event()

        async def attempt() -> bool:
            stop.set()
            return False

        async def on_retry(exc: BaseException, delay: float) -> None:
            raise AssertionError("no error happened")

        return await poll(stop, attempt, retry_on=(OSError,), on_retry=on_retry, idle_s=10.0)

    assert asyncio.run(main()) is False


def test_a_cancelled_sleep_leaves_no_waiter_behind() -> None:
    async def run() -> set[asyncio.Task[object]]:
        before = asyncio.all_tasks()
        sleeping = asyncio.create_task(sleep_or_stop(asyncio.Event(), 60, asyncio.Event()))
        await asyncio.sleep(0.01)
        sleeping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sleeping
        await asyncio.sleep(0)  # the waiters' cancellations run
        return {task for task in asyncio.all_tasks() - before if not task.done()}

    assert asyncio.run(run()) == set()
