"""Periodic reconciliation (``ledger serve`` role ``reconcile``, issue 11, item 3).

With ``LEDGER_RECONCILE_S`` (or ``serve --reconcile-s``) set to N > 0, every N seconds this role
reconciles every (exchange, user) that has a live account (``ledger.venues.accounts``: the users
of each account of each exchange in ``live`` mode) with ``ledger.client.reconcile.Reconciler``,
exactly as ``ledger reconcile USER EXCHANGE`` does: what the venue knows and the ledger lacks is
recorded through the command path, a position mismatch becomes a drift, a drift the venue agrees
with again is resolved, every finding goes to ``ledger:ops``. Its commands have deterministic ids,
so two ``serve`` processes reconciling the same user (or an operator's ``ledger reconcile`` at the
same time) record each fact once.

A round never stops the role: a reconciliation that fails (the venue away, a timeout, the handler
not running) is logged with the user, exchange and account and tried again next round. The role
runs in the venue's process group (``ledger.app.service.PROCESS_GROUPS``), which already holds
the ccxt clients' code; off (0, the default) it runs nothing.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from consumers.backoff import sleep_or_stop
from ledger.client.api import LedgerClient
from ledger.client.reconcile import Reconciler
from ledger.config import Settings
from ledger.domain.enums import Exchange
from ledger.venues.accounts import VenueConfig, live_configs
from ledger.venues.live import VenueClients

log = structlog.get_logger("ledger.reconciling")


class PeriodicReconciliation:
    """Reconciles every (exchange, user) with a live account every ``interval_s`` seconds."""

    def __init__(
        self, redis: Any, configs: dict[Exchange, VenueConfig], interval_s: float, settings: Settings | None = None
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.configs = configs
        self.interval_s = interval_s
        self.rounds = 0

    def pairs(self) -> list[tuple[VenueConfig, str, str]]:
        """(exchange's configuration, account name, user) of every user with a live account."""
        return [
            (config, account.name, user)
            for _exchange, config in sorted(self.configs.items())
            for account in sorted(config.accounts.values(), key=lambda a: a.name)
            for user in sorted(account.users)
        ]

    async def run(self, stop: asyncio.Event) -> None:
        clients = VenueClients({exchange: config.options for exchange, config in self.configs.items()})
        try:
            while not stop.is_set():
                await self.round(clients)
                await sleep_or_stop(stop, self.interval_s)
        finally:
            await clients.close()

    async def round(self, clients: VenueClients) -> int:
        """Reconcile every pair once; return how many reconciliations failed (logged)."""
        ledger = LedgerClient(self.redis)
        failed = 0
        for config, account, user in self.pairs():
            bound = log.bind(user_id=user, exchange=str(config.exchange), account=account, round=self.rounds)
            try:
                result = await Reconciler(self.redis, ledger, config, clients, self.settings).run(user)
            except Exception as exc:  # noqa: BLE001 - one failing reconciliation must not stop the others
                failed += 1
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                bound.error("periodic reconciliation failed: tried again next round", error=reason)
                continue
            bound.info("periodic reconciliation", recorded=len(result.recorded), findings=len(result.findings))
        self.rounds += 1
        return failed


async def reconcile_role(redis: Any, settings: Settings) -> list[PeriodicReconciliation]:
    """``ledger serve`` role ``reconcile``: one periodic reconciliation of every live exchange's
    users, when ``reconcile_s`` > 0 and an exchange is in ``live`` mode; else nothing."""
    configs = live_configs(settings.execution, settings.credentials) if settings.reconcile_s else {}
    return [PeriodicReconciliation(redis, configs, settings.reconcile_s, settings)] if configs else []
