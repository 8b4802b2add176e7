"""The command handler's memory of users (``consumers.user_books``): what it keeps of a batch's
book for a user, and its bound. (That a stale memory never makes a wrong decision is tested on a
real Redis: ``tests/integration/test_handler_memory.py`` and the model test.)"""

from __future__ import annotations

from decimal import Decimal

from consumers.user_books import UserBooks
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
    books.keep(book, {"alice": "t-1"})

    again = Book()
    assert books.take(again, ["alice", "bob"]) == {"alice": "t-1"}
    assert again == Book(
        orders={"o-open": book.orders["o-open"]},
        positions={"p-open": book.positions["p-open"], "p-reserved": None},
        slots={long_slot: "p-open", short_slot: None, reserved_slot: "p-reserved", drift: "d-1"},
    )
    assert len(books) == 0  # taken: a batch that fails keeps nothing of what it decided
    assert books.take(Book(), ["alice"]) == {}


def test_the_users_used_longest_ago_are_forgotten_first_and_one_too_large_is_not_kept() -> None:
    books = UserBooks(capacity=3)
    for user in ("u1", "u2", "u3"):
        books.keep(Book(orders={f"{user}-o": _order(f"{user}-o", user)}), {user: f"t-{user}"})
    books.keep(Book(orders={"u1-o": _order("u1-o", "u1"), "u1-o2": _order("u1-o2", "u1")}), {"u1": "t-u1b"})
    # u1 now holds two (its one before replaced), so u2, the oldest, goes: 2 + 1 <= 3
    assert books.take(Book(), ["u2"]) == {}
    assert books.take(Book(), ["u1", "u3"]) == {"u1": "t-u1b", "u3": "t-u3"}

    big = Book(orders={f"o{i}": _order(f"o{i}", "big") for i in range(4)})
    books.keep(big, {"big": "t-big"})
    assert books.take(Book(), ["big"]) == {}
