"""``ledger demo``: a worked example of the ledger's decisions and position arithmetic.

It runs the pure decider in memory (no servers): a long on OKX built from two fills and closed
in two steps, then prints every event and the resulting PnL figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import uuid

from ledger import wire
from ledger.decider import Book, Context, Decision, decide, evolve, requirements
from ledger.values import now_ms

USER = "demo-trader"


class _InMemoryLedger:
    def __init__(self) -> None:
        self.book = Book()
        self.counter = itertools.count(1)

    def submit(self, type_name: str, **data: object) -> Decision:
        data.update(command_id=f"demo-{next(self.counter)}", user_id=USER)
        command = wire.decode_command({"type": type_name, "data": json.dumps(data)})
        while missing := requirements(command, self.book).missing(self.book):
            self.book.orders.update(dict.fromkeys(missing.order_ids))
            self.book.positions.update(dict.fromkeys(missing.position_ids))
            self.book.slots.update(dict.fromkeys(missing.slots))
        decision = decide(command, self.book, Context(now=now_ms(), new_id=lambda: str(uuid.uuid4())))
        if not isinstance(decision, Decision):
            raise RuntimeError(f"{type_name} rejected: {decision.code} {decision.message}")
        evolve(self.book, decision.events)
        for event in decision.events:
            print(f"  {event.type:<18} {event.stream[:8]} v{event.version}")
        return decision


def run_demo(_args: argparse.Namespace) -> int:
    ledger = _InMemoryLedger()
    print("open_position long 0.2 BTC-USDT-SWAP on okx, leverage 10")
    opened = ledger.submit("open_position", exchange="okx", symbol="BTC-USDT-SWAP", side="long", size="0.2", leverage=10)
    print("fills: 0.1 @ 45000 (fee 0.45 USDT), 0.1 @ 46000 (fee 0.46 USDT)")
    ledger.submit("record_fill", order_id=opened.order_id, fill_id="t1", quantity="0.1", price="45000", fee="0.45")
    ledger.submit("record_fill", order_id=opened.order_id, fill_id="t2", quantity="0.1", price="46000", fee="0.46")
    position_id = opened.position_id
    for step, (size, price, fee) in enumerate((("0.05", "47000", "0.2"), ("0.15", "44000", "0.3")), 1):
        print(f"close_position {size} filled @ {price} (fee {fee} USDT)")
        closing = ledger.submit("close_position", position_id=position_id, size=size)
        ledger.submit("record_fill", order_id=closing.order_id, fill_id=f"c{step}", quantity=size, price=price, fee=fee)
    position = ledger.book.positions[position_id]  # type: ignore[index]
    assert position is not None
    print()
    print(f"status        {position.status}")
    print(f"entry_price   {position.entry_price}   (0.1*45000 + 0.1*46000) / 0.2")
    print(f"exit_price    {position.exit_price}   (0.05*47000 + 0.15*44000) / 0.2")
    print(f"gross_pnl     {position.gross_pnl}   (47000-45500)*0.05 + (44000-45500)*0.15")
    print(f"fees          {position.fees}   0.45 + 0.46 + 0.2 + 0.3")
    print(f"realized_pnl  {position.realized_pnl}   gross - fees")
    return 0
