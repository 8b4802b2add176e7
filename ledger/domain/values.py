"""Value rules of CONTRACT §1: identifiers, decimals on the wire, timestamps.

Everything a user sends passes through these checks before it reaches a Redis key, a SQL
statement or the domain. Each failure names the field and the rule it broke.
"""

from __future__ import annotations

import contextlib
import functools
import re
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import (
    ROUND_HALF_EVEN,
    Context,
    Decimal,
    DivisionByZero,
    InvalidOperation,
    Overflow,
    getcontext,
    localcontext,
)
from typing import Any, ParamSpec, TypeVar

from ledger.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class TextRule:
    """The rule of one text field, declared once: the wire types, key builders, models and the
    SQL columns (checked against ``schema.sql`` by the tests) all take it from here.

    ``body`` is the character class and length without anchors. Python's ``$`` matches before a
    trailing newline, so every check is a full match: ``fullmatch`` here, and ``\\A...\\Z`` in
    ``pattern`` (msgspec searches with ``re.search``).
    """

    body: str
    max_length: int
    description: str
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_regex", re.compile(self.body))  # compiled once, not looked up per check

    @property
    def pattern(self) -> str:
        return rf"\A(?:{self.body})\Z"

    def matches(self, value: object) -> bool:
        return isinstance(value, str) and self._regex.fullmatch(value) is not None


# A decimal PostgreSQL NUMERIC(38, 18) holds exactly: at most 20 integer and 18 fraction digits.
MAX_INTEGER_DIGITS = 20
MAX_FRACTION_DIGITS = 18
# Free text (reasons) ends up in TEXT/VARCHAR columns and in the JSONB event archive: PostgreSQL
# refuses NUL there, and control characters have no business in a reason, so none are allowed.
_PRINTABLE = r"[^\x00-\x1f\x7f]"

RULES: dict[str, TextRule] = {
    "user_id": TextRule(r"[A-Za-z0-9_.@-]{1,64}", 64, "1 to 64 characters of A-Z a-z 0-9 _ . @ -"),
    "symbol": TextRule(r"[A-Za-z0-9._/:-]{1,48}", 48, "1 to 48 characters of A-Z a-z 0-9 . _ / : -"),
    "command_id": TextRule(r"[A-Za-z0-9_.:-]{1,64}", 64, "1 to 64 characters of A-Z a-z 0-9 _ . : -"),
    "client_order_id": TextRule(r"[A-Za-z0-9_.:-]{1,64}", 64, "1 to 64 characters of A-Z a-z 0-9 _ . : -"),
    "exchange_order_id": TextRule(r"[A-Za-z0-9_.:/@-]{1,128}", 128, "1 to 128 characters of A-Z a-z 0-9 _ . : / @ -"),
    "fill_id": TextRule(r"[A-Za-z0-9_.:/@-]{1,128}", 128, "1 to 128 characters of A-Z a-z 0-9 _ . : / @ -"),
    "fee_currency": TextRule(r"[A-Za-z0-9]{1,16}", 16, "1 to 16 letters or digits"),
    "uuid": TextRule(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", 36, "a lower-case UUID string"),
    # Ids a client sends back: a UUID in either case (the ledger lower-cases it).
    "id": TextRule(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", 36, "a UUID string"),
    "close_reason": TextRule(rf"{_PRINTABLE}{{1,64}}", 64, "1 to 64 characters, no control characters"),
    "reject_reason": TextRule(rf"{_PRINTABLE}{{1,256}}", 256, "1 to 256 characters, no control characters"),
    "decimal": TextRule(
        rf"-?[0-9]{{1,{MAX_INTEGER_DIGITS}}}(?:\.[0-9]{{1,{MAX_FRACTION_DIGITS}}})?",
        1 + MAX_INTEGER_DIGITS + 1 + MAX_FRACTION_DIGITS,
        f'a decimal string such as "0.1" (≤{MAX_INTEGER_DIGITS} integer and ≤{MAX_FRACTION_DIGITS} fraction digits)',
    ),
}

# The largest amount a command may imply (a notional, hence a fee or a PnL): every value derived
# from it keeps within the decimal rule above, so whatever the ledger accepts, a venue can fill.
MAX_AMOUNT = Decimal(10) ** MAX_INTEGER_DIGITS - 1

# ``metadata`` objects travel in events and end up in PostgreSQL JSONB, which refuses NUL in any
# string; the size and depth caps keep one command from bloating every store it reaches.
METADATA_MAX_BYTES = 16_384
METADATA_MAX_DEPTH = 16

# CONTRACT §7: divisions use 28 significant digits, half-even. Sums and products stay exact.
DIVISION = Context(prec=28, rounding=ROUND_HALF_EVEN)
# Python's default context rounds every `+`, `-` and `*` to 28 digits too: a product of a 28-digit
# average price and a quantity, or a sum of a 20-integer-digit and an 18-fraction-digit amount,
# would be silently rounded. Domain arithmetic runs in this context instead (see `exact`): wide
# enough that no sum or product of ledger values is ever rounded.
EXACT = Context(prec=1000, rounding=ROUND_HALF_EVEN, traps=[InvalidOperation, DivisionByZero, Overflow])

_P = ParamSpec("_P")
_R = TypeVar("_R")
# The EXACT context this task runs in, while one is active (``exact_arithmetic``).
_ACTIVE: ContextVar[Context | None] = ContextVar("ledger_exact_context", default=None)


@contextlib.contextmanager
def exact_arithmetic() -> Iterator[None]:
    """Run a block with exact sums and products (the ``EXACT`` decimal context). The functions
    marked ``exact`` that it calls run in it as they are, without setting a context each: a
    caller making many of them (the handler deciding a batch) sets it once."""
    if getcontext() is _ACTIVE.get():
        yield
        return
    with localcontext(EXACT) as context:
        token = _ACTIVE.set(context)
        try:
            yield
        finally:
            _ACTIVE.reset(token)


def exact(function: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``function`` with exact sums and products (``exact_arithmetic``)."""

    @functools.wraps(function)
    def in_exact_context(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if getcontext() is _ACTIVE.get():  # already exact: the common case, kept cheap
            return function(*args, **kwargs)
        with exact_arithmetic():
            return function(*args, **kwargs)

    return in_exact_context


ZERO = Decimal(0)


def text(value: Any) -> Any:
    """A value read from Redis as ``str`` whether the client decodes responses or not: bytes that
    are not UTF-8 become lone surrogates, which encode back to the same bytes."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


class ValueRuleError(InvalidInput):
    """A value broke a rule of CONTRACT §1; the message names the field and the rule."""

    def __init__(self, field: str, rule: str, value: object) -> None:
        super().__init__(f"{field}: must be {rule} (got {value!r})")
        self.field = field
        self.rule = rule


def check_identifier(kind: str, value: object, field: str | None = None) -> str:
    """Return `value` if it fully matches the text rule `kind` (user_id, symbol, ...)."""
    rule = RULES[kind]
    if not rule.matches(value):
        raise ValueRuleError(field or kind, rule.description, value)
    return value  # type: ignore[return-value]


def parse_decimal(value: object, field: str, *, positive: bool = False) -> Decimal:
    """Parse a wire decimal string (never a float) into an exact Decimal: the one decimal rule.

    The string must fit PostgreSQL NUMERIC(38, 18) exactly (CONTRACT §7, §9): up to 20 integer
    digits and 18 fraction digits, no exponent ("1E+5" is refused). A ``Decimal`` is normalized
    to its plain text first, so it passes when its value fits.
    """
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueRuleError(field, "a finite decimal", value)
        value = format_decimal(value)
    rule = RULES["decimal"]
    if not rule.matches(value):
        raise ValueRuleError(field, rule.description, value)
    number = Decimal(value)  # type: ignore[arg-type]
    if positive and number <= 0:
        raise ValueRuleError(field, "greater than zero", value)
    return number


def check_json_object(value: object, field: str) -> dict[str, Any]:
    """Check a JSON object (``metadata``) against what every store can hold.

    PostgreSQL JSONB refuses NUL (``\\u0000``) in any string or key; the depth and size caps
    (``METADATA_MAX_DEPTH``, ``METADATA_MAX_BYTES``) bound what one command can write.
    """
    if not isinstance(value, dict):
        raise ValueRuleError(field, "a JSON object", type(value).__name__)
    size = _check_json(value, field, 1)
    if size > METADATA_MAX_BYTES:
        raise ValueRuleError(field, f"at most {METADATA_MAX_BYTES} bytes of JSON", f"about {size} bytes")
    return value


def _check_json(value: object, field: str, depth: int) -> int:
    """Validate one JSON value; return an upper bound of its encoded size in bytes."""
    if depth > METADATA_MAX_DEPTH:
        raise ValueRuleError(field, f"nested at most {METADATA_MAX_DEPTH} levels deep", "deeper")
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueRuleError(field, "free of NUL characters (\\u0000)", value[:40])
        return 6 * len(value) + 2
    if isinstance(value, dict):
        return 2 + sum(_check_json(k, field, depth) + _check_json(v, field, depth + 1) + 2 for k, v in value.items())
    if isinstance(value, list):
        return 2 + sum(_check_json(v, field, depth + 1) + 1 for v in value)
    return len(str(value))


def format_decimal(value: Decimal) -> str:
    """Write a Decimal without exponent, keeping the trailing zeros it carries ("0.10"); a
    negative zero is written "0"."""
    text = str(value)  # what format(value, "f") writes unless it has an exponent, and faster
    if "E" in text:
        text = format(value, "f")
    if text[0] == "-" and value.is_zero():
        return text[1:]
    return text


def divide(numerator: Decimal, denominator: Decimal) -> Decimal:
    """Divide in the contract's context (28 significant digits, half-even)."""
    return DIVISION.divide(numerator, denominator)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_MS = timedelta(milliseconds=1)


def ms_to_datetime(ms: int) -> datetime:
    return EPOCH + ms * ONE_MS


def datetime_to_ms(moment: datetime) -> int:
    if moment.tzinfo is None:
        raise ValueRuleError("timestamp", "timezone-aware", moment)
    return (moment - EPOCH) // ONE_MS


# Timestamps on the wire: what Python's datetime (hence the models) and PostgreSQL TIMESTAMPTZ
# both hold, from the epoch to the last millisecond of year 9999.
MIN_TS_MS = 0
MAX_TS_MS = datetime_to_ms(datetime.max.replace(tzinfo=UTC))
