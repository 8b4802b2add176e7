"""Value rules of CONTRACT §1: identifiers, decimals on the wire, timestamps.

Everything a user sends passes through these checks before it reaches a Redis key, a SQL
statement or the domain. Each failure names the field and the rule it broke.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import (
    ROUND_HALF_EVEN,
    Context,
    Decimal,
    DivisionByZero,
    InvalidOperation,
    Overflow,
    localcontext,
)
from typing import ParamSpec, TypeVar

USER_ID_PATTERN = r"^[A-Za-z0-9_.@-]{1,64}$"
SYMBOL_PATTERN = r"^[A-Za-z0-9._/:-]{1,48}$"
COMMAND_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
UUID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
# A decimal PostgreSQL NUMERIC(38, 18) holds exactly: at most 20 integer and 18 fraction digits.
DECIMAL_PATTERN = r"^-?[0-9]{1,20}(\.[0-9]{1,18})?$"
FEE_CURRENCY_PATTERN = r"^[A-Za-z0-9]{1,16}$"
EXCHANGE_ORDER_ID_PATTERN = r"^[A-Za-z0-9_.:/@-]{1,128}$"
FILL_ID_PATTERN = EXCHANGE_ORDER_ID_PATTERN

_RULES = {
    "user_id": (re.compile(USER_ID_PATTERN), "1 to 64 characters of A-Z a-z 0-9 _ . @ -"),
    "symbol": (re.compile(SYMBOL_PATTERN), "1 to 48 characters of A-Z a-z 0-9 . _ / : -"),
    "command_id": (re.compile(COMMAND_ID_PATTERN), "1 to 64 characters of A-Z a-z 0-9 _ . : -"),
    "uuid": (re.compile(UUID_PATTERN), "a lower-case UUID string"),
}

# CONTRACT §7: divisions use 28 significant digits, half-even. Sums and products stay exact.
DIVISION = Context(prec=28, rounding=ROUND_HALF_EVEN)
# Python's default context rounds every `+`, `-` and `*` to 28 digits too: a product of a 28-digit
# average price and a quantity, or a sum of a 20-integer-digit and an 18-fraction-digit amount,
# would be silently rounded. Domain arithmetic runs in this context instead (see `exact`): wide
# enough that no sum or product of ledger values is ever rounded.
EXACT = Context(prec=1000, rounding=ROUND_HALF_EVEN, traps=[InvalidOperation, DivisionByZero, Overflow])

_P = ParamSpec("_P")
_R = TypeVar("_R")


def exact(function: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``function`` with exact sums and products (the ``EXACT`` decimal context)."""

    @functools.wraps(function)
    def in_exact_context(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with localcontext(EXACT):
            return function(*args, **kwargs)

    return in_exact_context


class ValueRuleError(ValueError):
    """A value broke a rule of CONTRACT §1; the message names the field and the rule."""

    def __init__(self, field: str, rule: str, value: object) -> None:
        super().__init__(f"{field}: must be {rule} (got {value!r})")
        self.field = field
        self.rule = rule


def check_identifier(kind: str, value: object, field: str | None = None) -> str:
    """Return `value` if it matches the identifier rule `kind` (user_id, symbol, ...)."""
    pattern, rule = _RULES[kind]
    if not isinstance(value, str) or not pattern.match(value):
        raise ValueRuleError(field or kind, rule, value)
    return value


_DECIMAL_RE = re.compile(DECIMAL_PATTERN)


def parse_decimal(value: object, field: str, *, positive: bool = False) -> Decimal:
    """Parse a wire decimal string (never a float) into an exact Decimal.

    The string must fit PostgreSQL NUMERIC(38, 18) exactly (CONTRACT §7, §9): up to 20 integer
    digits and 18 fraction digits, no exponent.
    """
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueRuleError(field, "a finite decimal", value)
        value = format_decimal(value)
    if not isinstance(value, str) or not _DECIMAL_RE.match(value):
        raise ValueRuleError(field, 'a decimal string such as "0.1" (≤20 integer and ≤18 fraction digits)', value)
    try:
        number = Decimal(value)
    except InvalidOperation as exc:  # pragma: no cover - the pattern admits only valid text
        raise ValueRuleError(field, "a decimal string", value) from exc
    if positive and number <= 0:
        raise ValueRuleError(field, "greater than zero", value)
    return number


def format_decimal(value: Decimal) -> str:
    """Write a Decimal without exponent, keeping the trailing zeros it carries ("0.10")."""
    text = format(value, "f")
    if text.startswith("-") and not value.is_zero():
        return text
    return text.lstrip("-")


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
