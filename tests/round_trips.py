"""A recorder of the round trips a component makes to the real Redis of the test session (what
one step costs the server: ``test_live_steps``, ``test_handler_memory``)."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any


class RoundTrips:
    """The real client, recording each round trip its user makes (the live projection, the
    handler's event store): a command's name, or the names of a pipeline's commands."""

    def __init__(self, real: Any, then: dict[str, Callable[[], Awaitable[Any]]] | None = None) -> None:
        self.real = real
        self.trips: list[str] = []
        self.then = then or {}  # command -> what happens once its first call has returned

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.real, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            if inspect.isawaitable(result):  # a round trip (not, say, a cluster's keyslot)
                self.trips.append(str(args[0]) if name == "execute_command" else name)
                if name in self.then:
                    return self._then(result, self.then.pop(name))
            return result

        return call

    @staticmethod
    async def _then(result: Awaitable[Any], then: Callable[[], Awaitable[Any]]) -> Any:
        value = await result
        await then()
        return value

    def pipeline(self, transaction: bool = False) -> _Pipeline:
        return _Pipeline(self, self.real.pipeline(transaction=transaction))


class _Pipeline:
    def __init__(self, owner: RoundTrips, real: Any) -> None:
        self.owner = owner
        self.real = real
        self.names: list[str] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.real, name)

        def queue(*args: Any, **kwargs: Any) -> _Pipeline:
            self.names.append(name)
            method(*args, **kwargs)
            return self

        return queue

    async def execute(self) -> list[Any]:
        self.owner.trips.append(f"pipeline({', '.join(self.names)})")
        return await self.real.execute()  # type: ignore[no-any-return]
