"""The command handler's memory of users (``consumers.user_books``): what it keeps of a batch's
book for a user, and its bound. (That a stale memory never makes a wrong decision is tested on a
real Redis: ``tests/integration/test_handler_memory.py`` and the model test.)"""

from __future__ import annotations

from decimal import Decimal

from consumers.user_books import Kept, UserBooks
from ledger.domain.decider import Requirements
from ledger.domain.enums import OrderStatus, PositionStatus
from ledger.domain.evolution import drift_slot, slot_user
from ledger.domain.state import Book, OrderState, PositionState, slot_field


def _order(order_id: str, user: str, status: OrderStatus = OrderStatus.OPEN) -> OrderState:
    return OrderState(
        id=order_id,
        user_id=user,
        exchange="okx",
        symbol="BTC-USDT-SWAP",
        side="buy",
        order_type="limit",
        quantity=Decimal("1"),
        status=status,
    )


def _position(position_id: str, user: str, status: PositionStatus = PositionStatus.OPEN) -> PositionState:
    return PositionState(
        id=position_id,
        user_id=user,
        exchange="okx",
        symbol="BTC-USDT-SWAP",
        side="long",
        size=Decimal("1"),
        entry_price=Decimal("100"),
        status=status,
    )


def test_a_slot_names_its_user() -> None:
    assert slot_user(slot_field("alice", "okx", "BTC-USDT-SWAP", "long")) == "alice"
    assert slot_user(drift_slot("alice", "okx", "BTC/USDT:USDT", "position")) == "alice"
    assert slot_user(slot_field("drift", "okx", "BTC-USDT-SWAP", "long")) == "drift"  # a user called drift
    assert slot_user(drift_slot("drift", "okx", "BTC/USDT:USDT", "position")) == "drift"


def test_a_user_keeps_its_open_state_its_slots_and_their_reservations_only() -> None:
    long_slot = slot_field("alice", "okx", "BTC-USDT-SWAP", "long")
    short_slot = slot_field("alice", "okx", "BTC-USDT-SWAP", "short")
    reserved_slot = slot_field("alice", "okx", "ETH-USDT-SWAP", "long")
    drift = drift_slot("alice", "okx", "BTC/USDT:USDT", "position")
    book = Book(
        orders={
            "o-open": _order("o-open", "alice"),
            "o-filled": _order("o-filled", "alice", OrderStatus.FILLED),
            "o-bob": _order("o-bob", "bob"),  # another user's order, named by one of alice's commands
            "o-none": None,  # an order nobody has
        },
        positions={
            "p-open": _position("p-open", "alice"),
            "p-closed": _position("p-closed", "alice", PositionStatus.CLOSED),
            "p-bob": _position("p-bob", "bob"),
            "p-reserved": None,  # reserved by alice's entry order: no state yet
            "p-none": None,  # named by a command, known by no slot
        },
        slots={
            long_slot: "p-open",
            short_slot: None,
            reserved_slot: "p-reserved",
            drift: "d-1",
            slot_field("bob", "okx", "BTC-USDT-SWAP", "long"): "p-bob",
        },
    )
    books = UserBooks()
    books.keep(book, {"alice": "t-1"}, {})

    taken = books.take(["alice", "bob"])
    assert taken == {
        "alice": Kept(
            "t-1",
            orders={"o-open": book.orders["o-open"]},  # type: ignore[dict-item]
            positions={"p-open": book.positions["p-open"], "p-reserved": None},
            slots={long_slot: "p-open", short_slot: None, reserved_slot: "p-reserved", drift: "d-1"},
        )
    }
    assert books.take(["alice"]) == {}  # the batch's now: a batch that fails gives nothing back


def test_a_batch_recalls_what_its_commands_want_and_writes_back_what_it_changed() -> None:
    slot = slot_field("alice", "okx", "BTC-USDT-SWAP", "long")
    books = UserBooks()
    books.keep(
        Book(
            orders={"o-1": _order("o-1", "alice"), "o-2": _order("o-2", "alice")},
            positions={"p-1": _position("p-1", "alice")},
            slots={slot: "p-1"},
        ),
        {"alice": "t-1"},
        {},
    )
    taken = books.take(["alice"])
    book = Book()

    assert taken["alice"].recall(book, Requirements(frozenset({"o-1", "o-9"}), frozenset(), frozenset({slot})))
    assert book == Book(orders={"o-1": taken["alice"].orders["o-1"]}, slots={slot: "p-1"})
    assert not taken["alice"].recall(book, Requirements(frozenset({"o-1", "o-9"})))  # nothing more to give

    book.orders["o-1"] = _order("o-1", "alice", OrderStatus.FILLED)  # the batch filled it
    book.orders["o-3"] = _order("o-3", "alice")  # and placed another
    book.positions["p-2"] = None  # reserved by it, instead of the position it closed
    book.slots[slot] = "p-2"
    books.keep(book, {"alice": "t-2"}, taken)

    again = books.take(["alice"])["alice"]
    assert again.token == "t-2"
    assert set(again.orders) == {"o-2", "o-3"}  # o-2, untouched, still kept; o-1 final, gone
    assert again.positions == {"p-1": taken["alice"].positions["p-1"], "p-2": None}
    assert again.slots == {slot: "p-2"}


def test_a_reservation_its_slot_no_longer_makes_is_forgotten() -> None:
    slot = slot_field("alice", "okx", "BTC-USDT-SWAP", "long")
    books = UserBooks()
    books.keep(Book(positions={"p-1": None}, slots={slot: "p-1"}), {"alice": "t-1"}, {})
    taken = books.take(["alice"])
    books.keep(Book(slots={slot: None}), {"alice": "t-2"}, taken)  # its entry order was cancelled

    assert books.take(["alice"])["alice"] == Kept("t-2", slots={slot: None})


def test_the_users_used_longest_ago_are_forgotten_first_and_one_too_large_is_not_kept() -> None:
    books = UserBooks(capacity=3)
    for user in ("u1", "u2", "u3"):
        books.keep(Book(orders={f"{user}-o": _order(f"{user}-o", user)}), {user: f"t-{user}"}, {})
    taken = books.take(["u1"])
    books.keep(Book(orders={"u1-o2": _order("u1-o2", "u1")}), {"u1": "t-u1b"}, taken)
    # u1 now holds two, so u2, the oldest, goes: 2 + 1 <= 3
    assert books.take(["u2"]) == {}
    assert {user: kept.token for user, kept in books.take(["u1", "u3"]).items()} == {"u1": "t-u1b", "u3": "t-u3"}

    big = Book(orders={f"o{i}": _order(f"o{i}", "big") for i in range(4)})
    books.keep(big, {"big": "t-big"}, {})
    assert books.take(["big"]) == {}
