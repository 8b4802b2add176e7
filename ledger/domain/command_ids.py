"""The deterministic ids of the commands an executor publishes about one order.

The paper venue (``consumers.paper``, prefix ``paper``) and the live venue with reconciliation
(``ledger.venues.commands``, prefix ``venue``) report an order's acknowledgement, rejection,
confirmed cancel and expiry as ``<prefix>:<order_id>:accept`` / ``:reject`` / ``:cancel`` /
``:expire``: a redelivered report publishes the same command again and the handler's
deduplication (CONTRACT §3) records it once. Fill ids are each executor's own (the paper venue
fills an order once, the live venue once per venue trade).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CommandIds:
    """The command ids of one executor, ``<prefix>:<order_id>:<what>``."""

    prefix: str

    def _of(self, order_id: str, what: str) -> str:
        return f"{self.prefix}:{order_id}:{what}"

    def accept(self, order_id: str) -> str:
        return self._of(order_id, "accept")

    def reject(self, order_id: str) -> str:
        return self._of(order_id, "reject")

    def cancel(self, order_id: str) -> str:
        return self._of(order_id, "cancel")

    def expire(self, order_id: str) -> str:
        return self._of(order_id, "expire")
