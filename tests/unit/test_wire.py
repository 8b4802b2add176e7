"""The wire codec (CONTRACT §1, §3, §5) and the value rules of ``ledger.domain.values``."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger.domain import wire
from ledger.domain.enums import Exchange, OrderSide, OrderType, PositionSide
from ledger.domain.values import ValueRuleError, format_decimal, parse_decimal
from ledger.store.redis_conn import entry_order, entry_text
from tests.domain_helpers import INVERSE, LINEAR, Driver, event_fields, of_type

OID = "00000000-0000-0000-0000-00000000002a"
ENVELOPE = {"command_id": "cmd-1", "user_id": "alice"}

# One complete, valid `data` object per command type of CONTRACT §3.
COMMANDS: dict[str, dict[str, Any]] = {
    "place_order": {
        "exchange": "okx",
        "symbol": LINEAR,
        "side": "buy",
        "order_type": "limit",
        "quantity": "0.1",
        "price": "45000",
        "trigger_price": "44900",
        "client_order_id": "grid-7",
        "position_side": "long",
        "reduce_only": False,
        "leverage": 10,
        "grid_level": 3,
        "metadata": {"strategy": "grid", "levels": [1, 2]},
    },
    "cancel_order": {"order_id": OID},
    "order_accepted": {"order_id": OID, "exchange_order_id": "okx-123456"},
    "order_rejected": {"order_id": OID, "reason": "insufficient margin"},
    "record_fill": {
        "order_id": OID,
        "fill_id": "T-99",
        "quantity": "0.1",
        "price": "45000.5",
        "fee": "0.45",
        "fee_currency": "USDT",
        "ts": 1_700_000_000_123,
    },
    "order_cancelled": {"order_id": OID},
    "order_expired": {"order_id": OID},
    "open_position": {
        "exchange": "binance",
        "symbol": "BTC/USDT:USDT",
        "side": "short",
        "size": "0.25",
        "leverage": 5,
        "price": "45000",
        "stop_loss": "47000",
        "take_profit": "40000",
        "metadata": {},
    },
    "close_position": {"position_id": OID, "size": "0.05", "reason": "take_profit", "price": "1"},
    "liquidate_position": {"position_id": OID, "price": "40000"},
    "adopt_order": {
        "exchange": "okx",
        "symbol": LINEAR,
        "side": "sell",
        "order_type": "limit",
        "quantity": "0.1",
        "exchange_order_id": "612345678901234567",
        "price": "46000",
        "trigger_price": "45900",
        "position_side": "short",
        "reduce_only": True,
        "leverage": 3,
        "venue_client_order_id": "web-1",
        "metadata": {"found_by": "reconcile"},
    },
    "record_drift": {"exchange": "okx", "symbol": LINEAR, "kind": "position_size", "evidence": {"venue": "0.3"}},
    "adjust_position": {
        "exchange": "okx",
        "symbol": LINEAR,
        "side": "long",
        "size": "0.3",
        "reason": "venue holds 0.3",
        "price": "45000",
        "fee_adjustment": "-0.5",
    },
    "resolve_drift": {"exchange": "okx", "symbol": LINEAR, "kind": "fee", "reason": "checked", "resolution": "agreed"},
}


def _entry(type_name: str, **data: Any) -> dict[str, str]:
    return {"type": type_name, "data": json.dumps({**ENVELOPE, **data})}


def _wire_error(fields: dict[Any, Any]) -> wire.WireError:
    with pytest.raises(wire.WireError) as caught:
        wire.decode_command(fields)
    return caught.value


# --------------------------------------------------------------------------- commands


def test_every_command_type_of_the_contract_has_a_sample() -> None:
    assert set(COMMANDS) == set(wire.COMMAND_TYPES)


@pytest.mark.parametrize("type_name", sorted(COMMANDS))
def test_command_decodes_from_a_raw_entry(type_name: str) -> None:
    command = wire.decode_command(_entry(type_name, **COMMANDS[type_name]))

    assert type(command) is wire.COMMAND_TYPES[type_name]
    assert (command.command_id, command.user_id) == ("cmd-1", "alice")
    for name, value in COMMANDS[type_name].items():
        assert getattr(command, name) == value, name


@pytest.mark.parametrize("type_name", sorted(COMMANDS))
def test_command_decodes_from_a_bytes_entry(type_name: str) -> None:
    raw = _entry(type_name, **COMMANDS[type_name])

    command = wire.decode_command({b"type": raw["type"].encode(), b"data": raw["data"].encode()})

    assert command == wire.decode_command(raw)


@pytest.mark.parametrize("type_name", sorted(COMMANDS))
def test_command_fields_round_trip(type_name: str) -> None:
    command = wire.decode_command(_entry(type_name, **COMMANDS[type_name]))

    assert wire.decode_command(wire.command_fields(command)) == command


def test_decoded_strings_become_enums() -> None:
    command = wire.decode_command(_entry("place_order", **COMMANDS["place_order"]))

    assert isinstance(command, wire.PlaceOrder)
    assert command.exchange is Exchange.OKX
    assert command.side is OrderSide.BUY
    assert command.order_type is OrderType.LIMIT
    assert command.position_side is PositionSide.LONG


def test_optional_fields_take_their_defaults() -> None:
    minimal = {"exchange": "okx", "symbol": LINEAR, "side": "sell", "order_type": "market"}
    place = wire.decode_command(_entry("place_order", **minimal, quantity="1"))
    close = wire.decode_command(_entry("close_position", position_id=OID))

    assert isinstance(place, wire.PlaceOrder) and isinstance(close, wire.ClosePosition)
    assert (place.price, place.position_side, place.leverage) == (None, None, None)
    assert (place.reduce_only, place.metadata) == (False, None)
    assert (close.size, close.reason, close.price) == (None, "manual", None)


def test_malformed_json_is_invalid_json_with_no_readable_ids() -> None:
    error = _wire_error({"type": "cancel_order", "data": '{"command_id": "cmd-1", '})

    assert error.code == "INVALID_JSON"
    assert (error.command_id, error.user_id) == (None, None)


def test_data_that_is_not_an_object_is_invalid_json() -> None:
    error = _wire_error({"type": "cancel_order", "data": "[1, 2]"})

    assert error.code == "INVALID_JSON"


def test_unknown_type_is_reported_with_the_readable_ids() -> None:
    error = _wire_error(_entry("teleport_order", order_id=OID))

    assert error.code == "UNKNOWN_TYPE"
    assert (error.command_id, error.user_id) == ("cmd-1", "alice")
    assert "teleport_order" in error.message


def test_entry_without_type_is_a_missing_field() -> None:
    error = _wire_error({"data": json.dumps({**ENVELOPE, "order_id": OID})})

    assert error.code == "MISSING_FIELD"
    assert error.command_id == "cmd-1"


def test_entry_without_data_is_a_missing_field() -> None:
    error = _wire_error({"type": "cancel_order"})

    assert error.code == "MISSING_FIELD"


def test_missing_required_field_is_named() -> None:
    data = {k: v for k, v in COMMANDS["place_order"].items() if k != "quantity"}

    error = _wire_error(_entry("place_order", **data))

    assert error.code == "MISSING_FIELD"
    assert "quantity" in error.message
    assert (error.command_id, error.user_id) == ("cmd-1", "alice")


def test_missing_user_id_is_a_missing_field_and_only_the_command_id_is_read() -> None:
    data = {"command_id": "c-9", "order_id": OID}

    error = _wire_error({"type": "cancel_order", "data": json.dumps(data)})

    assert error.code == "MISSING_FIELD"
    assert (error.command_id, error.user_id) == ("c-9", None)


@pytest.mark.parametrize("number", [0.1, 1])
def test_decimal_given_as_a_json_number_is_an_invalid_field(number: float) -> None:
    error = _wire_error(_entry("place_order", **{**COMMANDS["place_order"], "quantity": number}))

    assert error.code == "INVALID_FIELD"
    assert "quantity" in error.message
    assert "JSON strings" in error.message
    assert (error.command_id, error.user_id) == ("cmd-1", "alice")


def test_user_id_with_a_space_is_an_invalid_field_and_is_not_echoed() -> None:
    data = {"command_id": "cmd-1", "user_id": "al ice", "order_id": OID}

    error = _wire_error({"type": "cancel_order", "data": json.dumps(data)})

    assert error.code == "INVALID_FIELD"
    assert "user_id" in error.message
    assert (error.command_id, error.user_id) == ("cmd-1", None)


def test_symbol_of_48_characters_is_accepted_and_49_is_too_long() -> None:
    ok = wire.decode_command(_entry("place_order", **{**COMMANDS["place_order"], "symbol": "A" * 48}))
    assert isinstance(ok, wire.PlaceOrder) and ok.symbol == "A" * 48

    error = _wire_error(_entry("place_order", **{**COMMANDS["place_order"], "symbol": "A" * 49}))

    assert error.code == "INVALID_FIELD"
    assert "symbol" in error.message


def test_unknown_field_is_an_invalid_field() -> None:
    error = _wire_error(_entry("cancel_order", order_id=OID, force=True))

    assert error.code == "INVALID_FIELD"
    assert "force" in error.message


@pytest.mark.parametrize(
    ("type_name", "field", "value"),
    [
        ("place_order", "exchange", "kraken"),
        ("place_order", "side", "long"),
        ("place_order", "order_type", "iceberg"),
        ("place_order", "quantity", "1e5"),
        ("place_order", "quantity", "0.1234567890123456789"),  # 19 fraction digits
        ("place_order", "price", "123456789012345678901"),  # 21 integer digits
        ("place_order", "symbol", "BTC USDT"),
        ("place_order", "leverage", 0),
        ("place_order", "metadata", [1]),
        ("place_order", "client_order_id", "a b"),
        ("cancel_order", "order_id", "../../etc/passwd"),
        ("cancel_order", "command_id", "x" * 65),
        ("record_fill", "ts", -1),
    ],
)
def test_invalid_field_values(type_name: str, field: str, value: Any) -> None:
    data = {**COMMANDS[type_name], field: value}

    error = _wire_error(_entry(type_name, **data))

    assert error.code == "INVALID_FIELD", error.message
    assert field in error.message


# --------------------------------------------------------------------------- events


def _every_event_type() -> list[wire.Event]:
    """A session that produces each of the event types of CONTRACT §5 at least once."""
    driver = Driver()
    limit = driver.place("buy", "0.3", order_type="limit", price="45000")
    driver.ok("order_accepted", order_id=limit, exchange_order_id="okx-1")  # OrderAccepted
    driver.fill(limit, "0.1", "45000", fee="0.045")  # OrderFilled, PositionOpened
    driver.ok("cancel_order", order_id=limit)  # OrderCancelRequested
    driver.ok("order_cancelled", order_id=limit)  # OrderCancelled
    driver.ok("order_rejected", order_id=driver.place("buy", "1"), reason="no margin")
    driver.ok("order_expired", order_id=driver.place("buy", "1", order_type="limit", price="1"))
    driver.fill(driver.place("buy", "0.1"), "0.1", "46000")  # PositionIncreased
    reduce = driver.place("sell", "0.05")
    driver.fill(reduce, "0.05", "47000", fee="0.1", fee_currency="BNB")  # PositionReduced
    driver.fill(driver.place("sell", "0.15"), "0.15", "44000")  # PositionClosed
    order_id, position_id = driver.open_position("short", "10", symbol=INVERSE, leverage=50)
    driver.fill(order_id, "10", "50000")
    driver.ok("liquidate_position", position_id=position_id, price="51000")
    return driver.log


def test_the_sample_session_covers_every_contract_event_type() -> None:
    contract_types = {
        "OrderPlaced", "OrderAccepted", "OrderRejected", "OrderFilled", "OrderCancelRequested",
        "OrderCancelled", "OrderExpired", "PositionOpened", "PositionIncreased",
        "PositionReduced", "PositionClosed", "PositionLiquidated",
    }  # fmt: skip

    assert {event.type for event in _every_event_type()} == contract_types


def test_every_event_round_trips_through_its_stream_fields() -> None:
    for event in _every_event_type():
        fields = event_fields(event)
        assert fields["type"] == event.type

        decoded = wire.decode_event(fields["type"], fields["data"])

        assert decoded == event
        assert type(decoded) is type(event)


def test_event_data_carries_the_envelope_of_the_contract() -> None:
    envelope = {
        "event_id", "stream", "version", "command_id", "user_id", "exchange", "symbol", "ts",
        "schema",
    }  # fmt: skip
    for event in _every_event_type():
        data = json.loads(wire.encode(event))

        assert envelope <= set(data), event.type
        assert isinstance(data["ts"], int) and isinstance(data["schema"], int)
        assert data["schema"] == type(event).SCHEMA


_DECIMAL_TEXT = re.compile(r"^-?[0-9]+(\.[0-9]+)?$")


def _decimal_strings(value: Any) -> list[str]:
    """Every string in a JSON value that looks like a number (with or without exponent)."""
    if isinstance(value, dict):
        return [s for item in value.values() for s in _decimal_strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _decimal_strings(item)]
    if isinstance(value, str) and re.fullmatch(r"-?[0-9.]+([eE][-+]?[0-9]+)?", value):
        return [value]
    return []


def test_tiny_quantities_are_written_without_exponent() -> None:
    driver = Driver()
    decision = driver.fill(driver.place("buy", "0.0000001"), "0.0000001", "45000")

    [filled] = of_type(decision.events, wire.OrderFilled)
    [opened] = of_type(decision.events, wire.PositionOpened)
    assert json.loads(wire.encode(filled))["quantity"] == "0.0000001"  # str(Decimal) is "1E-7"
    assert json.loads(wire.encode(opened))["size"] == "0.0000001"


def test_no_decimal_in_any_event_is_written_with_an_exponent() -> None:
    driver = Driver()
    # Inverse averages divide 10 by 0.0002: Decimal's own result is "5E+4".
    order_id, _ = driver.open_position("long", "10", symbol=INVERSE)
    decision = driver.fill(order_id, "10", "50000", fee="0.00000001")
    events = _every_event_type() + decision.events

    [opened] = of_type(decision.events, wire.PositionOpened)
    assert opened.entry_price == "50000"
    for event in events:
        for text in _decimal_strings(json.loads(wire.encode(event))):
            assert _DECIMAL_TEXT.fullmatch(text), f"{event.type}: {text}"


def test_unknown_event_type_raises_unknown_event_type() -> None:
    with pytest.raises(wire.UnknownEventType) as caught:
        wire.decode_event("PositionTeleported", b"{}")

    assert caught.value.code == "UNKNOWN_TYPE"
    assert isinstance(caught.value, wire.WireError)


def test_malformed_event_data_is_invalid_json() -> None:
    with pytest.raises(wire.WireError) as caught:
        wire.decode_event(b"OrderCancelled", b"{oops")

    assert caught.value.code == "INVALID_JSON"


# --------------------------------------------------------------------------- upcasting


def _cancelled_v1() -> dict[str, Any]:
    """An OrderCancelled as a test-only schema 1 wrote it: without `symbol`."""
    return {
        "type": "OrderCancelled",
        "event_id": "00000000-0000-0000-0000-000000000099",
        "stream": OID,
        "version": 3,
        "command_id": "cmd-7",
        "user_id": "alice",
        "exchange": "okx",
        "ts": 1_700_000_000_000,
        "schema": 1,
        "status": "cancelled",
    }


def _add_symbol(data: dict[str, Any]) -> dict[str, Any]:
    data["symbol"] = LINEAR
    return data


def test_old_schema_is_read_through_a_registered_upcaster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire.OrderCancelled, "SCHEMA", 2)
    wire.register_upcaster("OrderCancelled", 1, _add_symbol)
    try:
        event = wire.decode_event("OrderCancelled", json.dumps(_cancelled_v1()))
    finally:
        wire.unregister_upcaster("OrderCancelled", 1)

    assert isinstance(event, wire.OrderCancelled)
    assert event.symbol == LINEAR
    assert event.schema == 2
    assert (event.stream, event.version, event.command_id) == (OID, 3, "cmd-7")


def test_old_schema_without_its_upcaster_is_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire.OrderCancelled, "SCHEMA", 2)

    with pytest.raises(wire.WireError) as caught:
        wire.decode_event("OrderCancelled", json.dumps(_cancelled_v1()))

    assert caught.value.code == "MISSING_FIELD"


def test_current_schema_is_read_without_upcasting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire.OrderCancelled, "SCHEMA", 2)
    calls: list[dict[str, Any]] = []

    def spy(data: dict[str, Any]) -> dict[str, Any]:
        calls.append(data)
        return data

    wire.register_upcaster("OrderCancelled", 1, spy)
    try:
        current = {**_cancelled_v1(), "symbol": LINEAR, "schema": 2}
        event = wire.decode_event("OrderCancelled", json.dumps(current))
    finally:
        wire.unregister_upcaster("OrderCancelled", 1)

    assert event.schema == 2 and event.symbol == LINEAR
    assert calls == []


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0.1", Decimal("0.1")),
        ("-2.50", Decimal("-2.50")),
        ("12345678901234567890.123456789012345678", Decimal("12345678901234567890.123456789012345678")),
        ("0", Decimal(0)),
    ],
)
def test_parse_decimal_accepts_plain_decimal_strings(text: str, value: Decimal) -> None:
    parsed = parse_decimal(text, "quantity")

    assert parsed == value
    assert str(parsed) == str(value)  # digits kept as given


@pytest.mark.parametrize(
    "value",
    [
        "1e5",
        "1E+1",
        "0.1234567890123456789",  # 19 fraction digits: NUMERIC(38, 18) would round it
        "123456789012345678901",  # 21 integer digits
        0.1,
        1,
        "abc",
        "",
        " 1",
        "1.",
        ".5",
        "NaN",
        "Infinity",
        Decimal("NaN"),
        None,
    ],
)
def test_parse_decimal_rejects(value: object) -> None:
    with pytest.raises(ValueRuleError) as caught:
        parse_decimal(value, "price")

    assert caught.value.field == "price"


def test_parse_decimal_positive_rejects_zero_and_negatives() -> None:
    for text in ("0", "0.000", "-1"):
        with pytest.raises(ValueRuleError):
            parse_decimal(text, "size", positive=True)
    assert parse_decimal("0.000000000000000001", "size", positive=True) == Decimal("1E-18")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Decimal("1E+1"), "10"),
        (Decimal("5E+4"), "50000"),
        (Decimal("0.10"), "0.10"),
        (Decimal("1E-7"), "0.0000001"),
        (Decimal("-0"), "0"),
        (Decimal("-0.00"), "0.00"),
        (Decimal("-1.5"), "-1.5"),
        (Decimal("123.4560"), "123.4560"),
    ],
)
def test_format_decimal_writes_no_exponent(value: Decimal, text: str) -> None:
    assert format_decimal(value) == text


@given(st.decimals(allow_nan=False, allow_infinity=False, places=None), st.integers(-30, 30))
def test_format_decimal_is_the_fixed_point_text_of_any_decimal(value: Decimal, shift: int) -> None:
    """Fixed point as ``format(value, "f")`` writes it, whatever the exponent (small values and
    large ones that ``str`` writes with one), the sign of a zero dropped."""
    value = value.scaleb(shift)
    expected = format(value, "f")
    if value.is_zero():
        expected = expected.lstrip("-")
    assert format_decimal(value) == expected
    assert "E" not in format_decimal(value) and Decimal(format_decimal(value)) == value


def test_parse_decimal_accepts_a_decimal_it_can_write() -> None:
    assert parse_decimal(Decimal("1E+1"), "price") == Decimal(10)
    with pytest.raises(ValueRuleError):
        parse_decimal(Decimal("1E-19"), "price")


@given(st.integers(0, 2**48), st.integers(0, 2**64 - 1))
def test_an_entry_key_and_its_id_are_one_another(ms: int, seq: int) -> None:
    """``entry_text`` writes the id ``entry_order`` reads: ``ms-seq``, sorting as the stream."""
    assert entry_text((ms, seq)) == f"{ms}-{seq}"
    assert entry_order(entry_text((ms, seq))) == (ms, seq)
