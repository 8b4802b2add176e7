"""``ledger reconcile USER EXCHANGE``: reconcile one user on a live venue with the ledger
(``ledger.client.reconcile``) and print what it recorded and what it found; exit status 1 while
a finding is unresolved."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from ledger.app.console import print_table
from ledger.client.api import PositionManager
from ledger.client.reconcile import FINDING_COLUMNS, Reconciliation
from ledger.config import Settings
from ledger.domain.enums import Exchange
from ledger.venues.accounts import live_configs

RECORDED_COLUMNS = ("command_id", "type", "order_id", "fill_id")


def summary(result: Reconciliation) -> str:
    markets = ", ".join(result.markets) or "none"
    return (
        f"reconciled {result.user_id} on {result.exchange} (account {result.account}; markets: {markets}): "
        f"{len(result.recorded)} recorded, {len(result.findings)} found"
    )


def unresolved_line(result: Reconciliation) -> str:
    count = len(result.findings)
    return (
        f"ledger: {count} finding{'s' if count != 1 else ''} unresolved (also in the operations stream: "
        "`ledger dead ops`): resolve them at the venue or in the ledger, then reconcile again"
    )


async def run_reconcile(
    redis: Any, settings: Settings, user_id: str, exchange: Exchange, *, symbols: Sequence[str], as_json: bool
) -> int:
    venue = live_configs({exchange: "live"}, settings.credentials)[exchange]
    result = await PositionManager(redis).sync_positions_from_exchange(
        user_id, exchange, venue=venue, symbols=symbols, settings=settings
    )
    if as_json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(summary(result))
        if result.recorded:
            print_table(result.recorded, RECORDED_COLUMNS)
        if result.findings:
            rows = [{**f.as_dict(), "evidence": json.dumps(f.evidence, sort_keys=True)} for f in result.findings]
            print_table(rows, FINDING_COLUMNS)
    if result.unresolved:
        print(unresolved_line(result), file=sys.stderr)
        return 1
    return 0
