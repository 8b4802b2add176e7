"""The command handler's memory of the users it appended for: no load round trip for them.

For each user whose last batch's appends all went through, the handler keeps the token that
batch wrote and the user's state as it left it: the user's orders and positions that are not
final (``user_id`` is the user's), the user's slots (``ledger.domain.evolution.slot_user``) and
the positions those slots reserve (an id with no state yet). The next batch starts from that
instead of reading the user's token and snapshots from Redis; what a command needs beyond it (a
final order, another user's order) is loaded as before.

It is a guess the append step checks. Every write of a user's state moves the user's token, in
the same atomic step (the append script is the only writer of snapshots, tokens and slots;
compaction removes only final orders and closed positions, which are not kept here, and
rehydration writes back only those), and the append refuses with ``conflict`` when the token is
not the one the decision expected. So when anything else appended for the user since (a second
``serve``, an entry claimed from a stalled handler) the commands conflict and are decided again
on state loaded from Redis: a stale memory costs a retry, never a wrong decision. A user is
forgotten as soon as one of its commands did not append as decided (a conflict, a duplicate, a
command set aside for an archived aggregate) and while a batch is under way (``take`` removes
what it gives: a batch that fails keeps nothing of what it decided).

Absences are not kept (an order id nobody has is looked up each time: ids of adopted orders are
derived, so one may appear later), and at most ``BOOK_AGGREGATES`` orders and positions in all
are (the users used longest ago are forgotten first; a user with more than that alone is not
kept).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from ledger.domain.evolution import slot_user
from ledger.domain.state import Book, OrderState, PositionState

# Orders and positions kept in all (about 1 KB of the handler's memory each).
BOOK_AGGREGATES = 20_000


@dataclass(slots=True)
class _Kept:
    token: str
    orders: dict[str, OrderState] = field(default_factory=dict)
    positions: dict[str, PositionState | None] = field(default_factory=dict)
    slots: dict[str, str | None] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.orders) + len(self.positions)


class UserBooks:
    """What the handler of one shard last appended for each user (see the module)."""

    def __init__(self, capacity: int = BOOK_AGGREGATES) -> None:
        self.capacity = capacity
        self._users: OrderedDict[str, _Kept] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return len(self._users)

    def take(self, book: Book, users: Iterable[str]) -> dict[str, str]:
        """Put what is kept for ``users`` into ``book`` and forget it here; return their tokens."""
        tokens: dict[str, str] = {}
        for user in users:
            kept = self._users.pop(user, None)
            if kept is None:
                continue
            self._size -= kept.size
            tokens[user] = kept.token
            book.orders.update(kept.orders)
            book.positions.update(kept.positions)
            book.slots.update(kept.slots)
        return tokens

    def keep(self, book: Book, tokens: dict[str, str]) -> None:
        """Keep, for each user of ``tokens`` (the token its last append wrote), its part of
        ``book`` as the batch left it."""
        kept = {user: _Kept(token) for user, token in tokens.items()}
        for slot, held in book.slots.items():
            owner = kept.get(slot_user(slot))
            if owner is not None:
                owner.slots[slot] = held
                if held is not None and held in book.positions and book.positions[held] is None:
                    owner.positions[held] = None  # reserved by the slot: no state yet
        for order_id, order in book.orders.items():
            if order is not None and not order.status.is_final and (owner := kept.get(order.user_id)):
                owner.orders[order_id] = order
        for position_id, position in book.positions.items():
            if position is not None and not position.status.is_final and (owner := kept.get(position.user_id)):
                owner.positions[position_id] = position
        for user, entry in kept.items():
            if (before := self._users.pop(user, None)) is not None:
                self._size -= before.size
            if entry.size <= self.capacity:
                self._users[user] = entry
                self._size += entry.size
        while self._size > self.capacity:
            _user, oldest = self._users.popitem(last=False)
            self._size -= oldest.size
