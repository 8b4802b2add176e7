"""The command handler's memory of the users it appended for: no load round trip for them.

For each user whose last batch's appends all went through, the handler keeps the token that
batch wrote and the user's state as its appends left it: the user's orders and positions that
are not final (``user_id`` is the user's), the user's slots (``ledger.domain.evolution.slot_user``)
and the positions those slots reserve (an id with no state yet). A batch takes the entries of its
users (``take``) and looks up in them what its commands need before reading Redis (``recall``);
what they lack (a final order, another user's order) is loaded as before. The work is the
batch's: only what a command needs is copied, and only what the batch's book holds is written
back (``keep``).

It is a guess the append step checks. Every write of a user's state moves the user's token, in
the same atomic step (the append script is the only writer of snapshots, tokens and slots;
compaction removes only final orders and closed positions, which are not kept here, and
rehydration writes back only those), and the append refuses with ``conflict`` when the token is
not the one the decision expected. So when anything else appended for the user since (a second
``serve``, an entry claimed from a stalled handler) the commands conflict and are decided again
on state loaded from Redis: a stale memory costs a retry, never a wrong decision. A user is
forgotten as soon as one of its commands did not append as decided (a conflict, a duplicate, a
command set aside for an archived aggregate), and while a batch is under way its users' entries
are the batch's (a batch that fails gives nothing back).

Absences are not kept (an order id nobody has is looked up each time: ids of adopted orders are
derived, so one may appear later), and at most ``BOOK_AGGREGATES`` orders and positions in all
are (the users used longest ago are forgotten first; a user with more than that alone is not
kept).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ledger.domain.decider import Requirements
from ledger.domain.evolution import slot_user
from ledger.domain.state import Book, OrderState, PositionState

# Orders and positions kept in all (about 1 KB of the handler's memory each).
BOOK_AGGREGATES = 20_000


@dataclass(slots=True)
class Kept:
    """One user's entry: the token its last append wrote and its state as the appends left it."""

    token: str
    orders: dict[str, OrderState] = field(default_factory=dict)
    positions: dict[str, PositionState | None] = field(default_factory=dict)
    slots: dict[str, str | None] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.orders) + len(self.positions)

    def recall(self, book: Book, wanted: Requirements) -> bool:
        """Copy into ``book`` what of ``wanted`` it lacks and this entry has; whether any was."""
        found = False
        for order_id in wanted.order_ids:
            if order_id not in book.orders and order_id in self.orders:
                book.orders[order_id] = self.orders[order_id]
                found = True
        for position_id in wanted.position_ids:
            if position_id not in book.positions and position_id in self.positions:
                book.positions[position_id] = self.positions[position_id]
                found = True
        for slot in wanted.slots:
            if slot not in book.slots and slot in self.slots:
                book.slots[slot] = self.slots[slot]
                found = True
        return found


class UserBooks:
    """What the handler of one shard last appended for each user (see the module)."""

    def __init__(self, capacity: int = BOOK_AGGREGATES) -> None:
        self.capacity = capacity
        self._users: OrderedDict[str, Kept] = OrderedDict()
        self._size = 0

    def take(self, users: Iterable[str]) -> dict[str, Kept]:
        """The entries of ``users`` that are kept, now the batch's (no longer here)."""
        taken: dict[str, Kept] = {}
        for user in users:
            kept = self._users.pop(user, None)
            if kept is not None:
                self._size -= kept.size
                taken[user] = kept
        return taken

    def keep(self, book: Book, tokens: dict[str, str], taken: dict[str, Kept]) -> None:
        """Keep each user of ``tokens`` (the token its last append wrote): its entry ``taken``
        (or a new one) with what the batch's ``book`` holds of the user written over it."""
        entries: dict[str, Kept] = {}
        for user, token in tokens.items():
            entry = taken.get(user) or Kept(token)
            entry.token = token
            entries[user] = entry
        for slot, held in book.slots.items():
            owner = entries.get(slot_user(slot))
            if owner is not None:
                before = owner.slots.get(slot)
                if before is not None and before != held and owner.positions.get(before, False) is None:
                    del owner.positions[before]  # a reservation the slot no longer makes
                owner.slots[slot] = held
                if held is not None and held in book.positions and book.positions[held] is None:
                    owner.positions[held] = None  # reserved by the slot: no state yet
        _merge(book.orders, entries, lambda entry: entry.orders)
        _merge(book.positions, entries, lambda entry: entry.positions)
        for user, entry in entries.items():  # none is here: ``take`` gave the batch's users' entries
            if entry.size <= self.capacity:
                self._users[user] = entry
                self._size += entry.size
        while self._size > self.capacity:
            _user, oldest = self._users.popitem(last=False)
            self._size -= oldest.size


def _merge(
    states: Mapping[str, OrderState | PositionState | None],
    entries: dict[str, Kept],
    kept_of: Callable[[Kept], dict[str, Any]],
) -> None:
    """Write each state over its owner's entry (``kept_of`` it): a final one leaves it."""
    for aggregate_id, state in states.items():
        if state is not None and (owner := entries.get(state.user_id)):
            if state.status.is_final:
                kept_of(owner).pop(aggregate_id, None)
            else:
                kept_of(owner)[aggregate_id] = state
