"""One mapping per aggregate between its state, its live hash, its history row and its model.

An order or a position appears in four shapes: the state the decider holds
(``ledger.domain.state``), the live Redis hash of CONTRACT §6 (strings: decimals without exponent,
``None`` as ``""``, booleans ``"true"``/``"false"``, timestamps as epoch milliseconds, JSON
objects compact with sorted keys), the PostgreSQL row of CONTRACT §9 / ``schema.sql`` (exact
``Decimal``, timezone-aware ``datetime``, a ``metadata`` JSONB object that also keeps the state
values the table has no column for) and the public pydantic model (``ledger.client.models``). Each
aggregate declares its fields ONCE, below (``POSITION``, ``ORDER``): for each state field, how
it is encoded (its ``Codec``) and where it appears (``In`` flags). Every representation is
derived from that one declaration: the live hash a projection writes and a query reads, the
columns of the SQL statements (``AggregateMapping.sql``) and the row the projector writes, the
CLI's ``--json`` columns (the §6 names) and the keyword arguments of the model. As in the
*eventsourcing* library's ``Mapper``, one object converts both ways, and as procrastinate's
``Job.from_row``, a model is built from a row by the names of its columns.

Values move between representations as a dict keyed by state field name holding state-typed
values (``Decimal``, ``int`` milliseconds, enum members): ``values(state)`` gives it,
``from_live`` / ``from_row`` read it back, ``to_live`` / ``to_row`` / ``model_kwargs`` write
it. A field that a representation does not carry (or, in a live hash, carries as ``""``) reads
back as the state's default; a ``REQUIRED`` field missing from a hash or row raises
``KeyError`` (it is not the ledger's), and a value that cannot be read raises ``ValueError``.

Pure: no Redis, PostgreSQL or asyncio here.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from enum import IntFlag, StrEnum
from typing import Any

import msgspec

from ledger.domain import wire
from ledger.domain.enums import Exchange, OrderSide, OrderStatus, OrderType, PositionSide, PositionStatus
from ledger.domain.state import OrderState, PositionState
from ledger.domain.values import datetime_to_ms, format_decimal, ms_to_datetime

__all__ = [
    "AMOUNTS",
    "BOOL",
    "DECIMAL",
    "INT",
    "JSON",
    "MILLIS",
    "ORDER",
    "POSITION",
    "TEXT",
    "UUID",
    "AggregateMapping",
    "Codec",
    "Field",
    "In",
    "enum_codec",
    "order_changes",
]


# --------------------------------------------------------------------------- codecs


def _identity(value: Any) -> Any:
    return value


def _decimal(text: Any) -> Decimal:
    """A decimal from its text; a ``ValueError`` (never an ``ArithmeticError``) when it is none."""
    try:
        return Decimal(text)
    except (ArithmeticError, TypeError) as exc:
        raise ValueError(f"not a decimal: {text!r}") from exc


def _json_text(value: Any) -> str:
    # Most objects are empty: "{}" at once (what json.dumps writes for one), without its set-up.
    return "{}" if value == {} else json.dumps(value, separators=(",", ":"), sort_keys=True)


def _amounts_json(value: Mapping[str, Decimal]) -> dict[str, str]:
    return {currency: format_decimal(amount) for currency, amount in value.items()}


def _amounts(value: Any) -> dict[str, Decimal]:
    if not isinstance(value, dict):
        raise ValueError(f"not an object of amounts: {value!r}")
    return {str(currency): _decimal(amount) for currency, amount in value.items()}


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"not a JSON object: {value!r}")
    return dict(value)


@dataclass(frozen=True, slots=True)
class Codec:
    """How one kind of value is written in each representation (never called with ``None``).

    ``text``/``parse``: the live hash; ``json``/``unjson``: inside the row's ``metadata``
    object; ``sql``/``unsql``: a column value as psycopg passes it; ``cast``: what a SELECT
    appends to the column so that it reads back as ``unsql`` expects (UUIDs as text)."""

    name: str
    text: Callable[[Any], str]
    parse: Callable[[str], Any]
    json: Callable[[Any], Any] = _identity
    unjson: Callable[[Any], Any] = _identity
    sql: Callable[[Any], Any] = _identity
    unsql: Callable[[Any], Any] = _identity
    cast: str = ""


TEXT = Codec("text", str, str)
UUID = Codec("uuid", str, str, cast="::text")
DECIMAL = Codec("decimal", format_decimal, _decimal, json=format_decimal, unjson=_decimal)
INT = Codec("int", str, int, unjson=int, unsql=int)
BOOL = Codec("bool", lambda value: "true" if value else "false", lambda text: text == "true")
MILLIS = Codec("millis", str, int, unjson=int, sql=ms_to_datetime, unsql=datetime_to_ms)
JSON = Codec("json", _json_text, lambda text: _object(json.loads(text)), unjson=_object, sql=dict, unsql=_object)
AMOUNTS = Codec(
    "amounts",
    lambda value: _json_text(_amounts_json(value)),
    lambda text: _amounts(json.loads(text)),
    json=_amounts_json,
    unjson=_amounts,
    sql=_amounts_json,
    unsql=_amounts,
)


def enum_codec(vocabulary: type[StrEnum]) -> Codec:
    """A closed vocabulary: its wire string everywhere."""
    return Codec(vocabulary.__name__, str, vocabulary, json=str, unjson=vocabulary, sql=str, unsql=vocabulary)


# --------------------------------------------------------------------------- fields


class In(IntFlag):
    """Where a field appears (a field with none of these is kept in the state only)."""

    LIVE = 1  # a field of the live hash
    SIX = 2 | LIVE  # one of the names CONTRACT §6 lists (the CLI's --json columns)
    ROW = 4  # a column of the history table
    META = 8  # a key of the history row's ``metadata`` object (the table has no column for it)
    MODEL = 16  # a field of the public model, of the same name
    REQUIRED = 32  # a hash or row without it is not the ledger's


_NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True, slots=True)
class Field:
    """One state field and how it appears in each representation.

    ``live``: its live hash names (default: its own; the first is the one read back);
    ``column``: its column (default: its own name when it has ``In.ROW``)."""

    name: str
    codec: Codec | None
    where: In = In(0)
    live: tuple[str, ...] = ()
    column: str | None = None

    def __post_init__(self) -> None:
        if self.where & (In.LIVE | In.ROW | In.META) and self.codec is None:
            raise TypeError(f"field {self.name}: a field stored anywhere needs a codec")
        if not self.live and self.where & In.LIVE:
            object.__setattr__(self, "live", (self.name,))
        if self.column is None and self.where & In.ROW:
            object.__setattr__(self, "column", self.name)
        for name in (self.name, *self.live, self.column or self.name):
            if not _NAME.fullmatch(name):
                raise ValueError(f"field {self.name}: {name!r} is not a plain lower-case name")

    def has(self, where: In) -> bool:
        return self.where & where == where

    @property
    def coder(self) -> Codec:
        if self.codec is None:
            raise TypeError(f"field {self.name} is kept in the state only")
        return self.codec

    @property
    def col(self) -> str:
        if self.column is None:
            raise TypeError(f"field {self.name} has no column")
        return self.column


@dataclass(frozen=True)
class AggregateMapping:
    """The fields of one aggregate and their representations (see the module's docstring).

    ``constants``: columns whose value is the same in every row (a history row is a closed
    position: no unrealized PnL); ``nested_none``: whether the row's ``metadata`` keeps a
    ``None`` of a nested field as ``null`` (positions) or leaves the key out (orders)."""

    name: str
    state: type[msgspec.Struct]
    fields: tuple[Field, ...]
    constants: Mapping[str, Any] = field(default_factory=dict)
    nested_none: bool = False
    _defaults: dict[str, Callable[[], Any]] = field(init=False, repr=False, compare=False)
    _by_place: dict[In, tuple[Field, ...]] = field(init=False, repr=False, compare=False)
    _required: frozenset[str] = field(init=False, repr=False, compare=False)
    _text: dict[str, Callable[[Any], str]] = field(init=False, repr=False, compare=False)
    _live: tuple[tuple[str, Callable[[Any], str], tuple[str, ...]], ...] = field(init=False, repr=False, compare=False)
    _names: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        declared = [f.name for f in self.fields]
        state_fields = list(self.state.__struct_fields__)
        if sorted(declared) != sorted(state_fields):
            missing, extra = set(state_fields) - set(declared), set(declared) - set(state_fields)
            raise TypeError(f"{self.name} mapping: state fields not declared {missing}, unknown {extra}")
        defaults: dict[str, Callable[[], Any]] = {}
        for info in msgspec.structs.fields(self.state):
            if info.default_factory is not msgspec.NODEFAULT:
                defaults[info.name] = info.default_factory
            elif info.default is not msgspec.NODEFAULT:
                defaults[info.name] = functools.partial(_identity, info.default)
        object.__setattr__(self, "_defaults", defaults)
        # Computed once: flag arithmetic is slow, and the live projection maps every event.
        places = (In.LIVE, In.SIX, In.ROW, In.META, In.MODEL, In.REQUIRED)
        by_place = {place: tuple(f for f in self.fields if f.has(place)) for place in places}
        object.__setattr__(self, "_by_place", by_place)
        object.__setattr__(self, "_required", frozenset(f.name for f in by_place[In.REQUIRED]))
        object.__setattr__(self, "_text", {f.name: f.codec.text for f in self.fields if f.codec is not None})
        object.__setattr__(self, "_live", tuple((f.name, f.coder.text, f.live) for f in by_place[In.LIVE]))
        object.__setattr__(self, "_names", tuple(f.name for f in self.fields))

    # ------------------------------------------------------------- declared facts

    def _where(self, where: In) -> tuple[Field, ...]:
        return self._by_place[where]

    @property
    def live_fields(self) -> tuple[str, ...]:
        """Every field of the live hash, in the order it is written."""
        return tuple(name for f in self._where(In.LIVE) for name in f.live)

    @property
    def contract_fields(self) -> tuple[str, ...]:
        """The live hash fields CONTRACT §6 names, in its order."""
        return tuple(f.live[0] for f in self._where(In.SIX))

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column of the history table the mapping writes and reads."""
        return (*(f.column for f in self._where(In.ROW) if f.column), *self.constants)

    @property
    def model_fields(self) -> tuple[str, ...]:
        return tuple(f.name for f in self._where(In.MODEL))

    def default(self, name: str) -> Any:
        """The state's default of a field (a fresh one when it is mutable); KeyError: none."""
        return self._defaults[name]()

    # ------------------------------------------------------------- state

    def values(self, state: msgspec.Struct) -> dict[str, Any]:
        """Every declared field of ``state``."""
        return {name: getattr(state, name) for name in self._names}

    # ------------------------------------------------------------- live hash

    def to_live(self, values: Mapping[str, Any]) -> dict[str, str]:
        """The live hash fields of the given values (all of them, or the ones an update sets)."""
        hashed: dict[str, str] = {}
        for name, write, live_names in self._live:
            if name in values:
                value = values[name]
                text = "" if value is None else write(value)
                for live_name in live_names:
                    hashed[live_name] = text
        return hashed

    def from_live(self, fields: Mapping[str, str]) -> dict[str, Any]:
        """The values a live hash holds (``""`` or absent: the default; see the docstring)."""
        values: dict[str, Any] = {}
        for f in self._where(In.LIVE):
            name = f.live[0]
            if f.name in self._required:
                values[f.name] = f.coder.parse(fields[name])
            else:
                text = fields.get(name, "")
                values[f.name] = f.coder.parse(text) if text != "" else self.default(f.name)
        return values

    def cells(self, state: msgspec.Struct, names: Iterable[str]) -> dict[str, str]:
        """Fields of ``state`` written as the live hash writes them, by field name (``ledger replay``)."""
        text = self._text
        return {name: "" if (value := getattr(state, name)) is None else text[name](value) for name in names}

    # ------------------------------------------------------------- history row

    def to_row(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The history row of the values, keyed by column (``metadata`` a plain dict)."""
        row: dict[str, Any] = {}
        for f in self._where(In.ROW):
            value = values[f.name]
            row[f.col] = None if value is None else f.coder.sql(value)
        metadata = dict(values["metadata"])
        for f in self._where(In.META):
            value = values[f.name]
            if value is not None:
                metadata[f.name] = f.coder.json(value)
            elif self.nested_none:
                metadata[f.name] = None
        row["metadata"] = metadata
        row.update(self.constants)
        return row

    def from_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """The values a history row holds (as read with ``select``'s columns)."""
        values: dict[str, Any] = {}
        for f in self._where(In.ROW):
            value = row[f.col] if f.name in self._required else row.get(f.col)
            values[f.name] = self.default(f.name) if value is None else f.coder.unsql(value)
        metadata = dict(values["metadata"])
        for f in self._where(In.META):
            value = metadata.pop(f.name, None)
            values[f.name] = self.default(f.name) if value is None else f.coder.unjson(value)
        values["metadata"] = metadata
        return values

    @property
    def select(self) -> str:
        """The column list of a SELECT that ``from_row`` reads."""
        return ", ".join(
            f"{f.col}{f.coder.cast} AS {f.col}" if f.coder.cast else f.col for f in self._where(In.ROW)
        ) + "".join(f", {column}" for column in self.constants)

    def sql(self, statement: str) -> str:
        """A statement of ``projections/sql`` with this aggregate's column lists put in:
        ``{columns}`` (every column), ``{values}`` (their named parameters), ``{updates}`` (an
        upsert's ``SET``, every column but ``id``) and ``{select}``."""
        updates = ",\n    ".join(f"{c} = excluded.{c}" for c in self.columns if c != "id")
        return statement.format(
            columns=", ".join(self.columns),
            values=", ".join(f"%({c})s" for c in self.columns),
            updates=updates,
            select=self.select,
        )

    # ------------------------------------------------------------- model

    def model_kwargs(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The model's fields from the values (a field the values lack: the state's default)."""
        return {name: values[name] if name in values else self.default(name) for name in self.model_fields}


def _six(name: str, codec: Codec, *more: In) -> Field:
    """A field of the live hash named in CONTRACT §6, with a column and a model field."""
    where = In.SIX | In.ROW | In.MODEL
    for flag in more:
        where |= flag
    return Field(name, codec, where)


_R = In.REQUIRED

POSITION = AggregateMapping(
    "position",
    PositionState,
    (
        # In the order the live hash is written; the §6 names in the contract's order.
        _six("id", UUID, _R),
        _six("user_id", TEXT, _R),
        _six("exchange", enum_codec(Exchange), _R),
        _six("symbol", TEXT, _R),
        _six("side", enum_codec(PositionSide), _R),
        Field("size", DECIMAL, In.SIX | In.MODEL | _R),  # the open size (a history row: 0)
        _six("entry_price", DECIMAL, _R),
        _six("leverage", INT),
        # ``pnl`` is the seed's name for it, kept for the seed's readers.
        Field("realized_pnl", DECIMAL, In.SIX | In.ROW | In.MODEL, live=("realized_pnl", "pnl")),
        Field("gross_pnl", DECIMAL, In.LIVE | In.ROW | In.MODEL),
        _six("fees", DECIMAL),
        Field("other_fees", AMOUNTS, In.LIVE | In.META | In.MODEL),
        Field("exit_price", DECIMAL, In.LIVE | In.ROW | In.MODEL),
        _six("status", enum_codec(PositionStatus), _R),
        Field("stop_loss", DECIMAL, In.SIX | In.META | In.MODEL),
        Field("take_profit", DECIMAL, In.SIX | In.META | In.MODEL),
        Field("excess_qty", DECIMAL, In.LIVE | In.META | In.MODEL),
        Field("metadata", JSON, In.LIVE | In.ROW | In.MODEL),
        # Inverse: the face value its PnL uses, also against a mark ("" elsewhere and in positions
        # opened before values were recorded: today's market data, Instrument.as_recorded).
        Field("contract_value", DECIMAL, In.LIVE | In.MODEL),
        _six("created_at", MILLIS, _R),
        _six("updated_at", MILLIS, _R),
        _six("version", INT, _R),
        # History only (an open position has neither).
        Field("close_reason", TEXT, In.ROW | In.MODEL),
        Field("closed_at", MILLIS, In.ROW | In.MODEL),
        # The table's ``size`` is the total quantity the position opened over its life.
        Field("entry_qty", DECIMAL, In.ROW, column="size"),
        # The running sums behind the averages: state only.
        Field("entry_basis", None),
        Field("exit_qty", None),
        Field("exit_basis", None),
    ),
    constants={"unrealized_pnl": Decimal(0)},
    nested_none=True,
)

ORDER = AggregateMapping(
    "order",
    OrderState,
    (
        _six("id", UUID, _R),
        _six("user_id", TEXT, _R),
        _six("exchange", enum_codec(Exchange), _R),
        _six("symbol", TEXT, _R),
        _six("side", enum_codec(OrderSide), _R),
        _six("order_type", enum_codec(OrderType), _R),
        _six("quantity", DECIMAL, _R),
        _six("price", DECIMAL),
        Field("trigger_price", DECIMAL, In.LIVE | In.ROW | In.MODEL),
        _six("filled_qty", DECIMAL),
        _six("avg_fill_price", DECIMAL),
        Field("fill_basis", DECIMAL, In.LIVE | In.MODEL),  # what avg_fill_price averages over
        _six("status", enum_codec(OrderStatus), _R),
        _six("exchange_order_id", TEXT),
        _six("client_order_id", TEXT),
        _six("position_side", enum_codec(PositionSide)),
        Field("position_id", UUID, In.LIVE | In.ROW | In.MODEL),
        _six("reduce_only", BOOL),
        Field("leverage", INT, In.LIVE | In.META | In.MODEL),
        _six("grid_level", INT),
        Field("reject_reason", TEXT, In.LIVE | In.ROW | In.MODEL),
        Field("metadata", JSON, In.LIVE | In.ROW | In.MODEL),
        _six("created_at", MILLIS, _R),
        _six("updated_at", MILLIS, _R),
        _six("version", INT, _R),
        # What an order placed by open_position / close_position carries for its position:
        # history keeps it in ``metadata``.
        Field("intent", TEXT, In.META),
        Field("close_reason", TEXT, In.META),
        Field("stop_loss", DECIMAL, In.META),
        Field("take_profit", DECIMAL, In.META),
        Field("fill_ids", None),  # the venue's trade ids, for deduplication: state only
        Field("contract_value", None),  # inverse: the face value placed at, for its fills: state only
    ),
)


def order_changes(event: wire.OrderChange) -> dict[str, Any]:
    """The order fields an order event after placement sets, as state values (the fill ids it
    adds to the state aside: the live hash and history do not hold them)."""
    changes: dict[str, Any] = {"status": event.status, "updated_at": event.ts, "version": event.version}
    if isinstance(event, wire.OrderAccepted):
        changes["exchange_order_id"] = event.exchange_order_id
    elif isinstance(event, wire.OrderRejected):
        changes["reject_reason"] = event.reason
    elif isinstance(event, wire.OrderFilled):
        changes.update(
            filled_qty=Decimal(event.filled_qty),
            avg_fill_price=Decimal(event.avg_fill_price),
            fill_basis=Decimal(event.fill_basis),
        )
    return changes
