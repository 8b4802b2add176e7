"""Configuration from ``LEDGER_*`` environment variables, overridable by command-line flags."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from redis.connection import parse_url as parse_redis_url

from ledger import defaults
from ledger.domain.enums import Exchange
from ledger.domain.values import ValueRuleError, parse_decimal
from ledger.errors import InvalidInput, OperationFailed

EXECUTION_MODES = ("paper", "external", "live")
DEFAULT_EXECUTION = "paper"  # the mode of an exchange LEDGER_EXECUTION does not name
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# How `ledger serve` runs its roles: `roles`, a child process per group of roles under a
# supervisor; `1`, every role in one process.
PROCESS_MODES = ("roles", "1")
# More shards than this are never useful on one Redis and each shard runs consumers of every
# role; since the count is fixed once recorded in ledger:meta, a typo must not be recorded.
MAX_SHARDS = 1024

# Whole-number settings: field -> (environment variable, command-line flag or None, maximum).
WHOLE_NUMBERS: dict[str, tuple[str, str | None, int | None]] = {
    "shards": ("LEDGER_SHARDS", "--shards", MAX_SHARDS),
    "batch_size": ("LEDGER_BATCH_SIZE", None, None),
    "claim_idle_ms": ("LEDGER_CLAIM_IDLE_MS", None, None),
    "max_deliveries": ("LEDGER_MAX_DELIVERIES", None, None),
    "reply_ttl_s": ("LEDGER_REPLY_TTL_S", None, None),
    "paper_poll_ms": ("LEDGER_PAPER_POLL_MS", None, None),
    "retention_ms": ("LEDGER_RETENTION_MS", None, None),
    "trim_interval_s": ("LEDGER_TRIM_INTERVAL_S", None, None),
    "final_order_ttl_s": ("LEDGER_FINAL_ORDER_TTL_S", None, None),
}


# --------------------------------------------------------------------------- durability


class Durability(StrEnum):
    """What a machine crash (power loss, kernel panic) may cost the servers started here.

    A crash of the server process alone loses nothing acknowledged at any level: Redis writes
    its AOF and PostgreSQL its WAL to the OS before answering.
    """

    ALWAYS = "always"
    """Redis ``appendfsync always``, PostgreSQL ``fsync=on``: nothing acknowledged is lost."""
    EVERYSEC = "everysec"
    """Redis ``appendfsync everysec`` (PostgreSQL ``fsync=on``): up to about a second of
    acknowledged commands and events can be lost from Redis."""
    OFF = "off"
    """Redis ``appendfsync no``, PostgreSQL ``fsync=off``: throwaway data only (tests, demo);
    recent writes can be lost and the PostgreSQL cluster corrupted."""

    @property
    def appendfsync(self) -> str:
        return "no" if self is Durability.OFF else self.value

    @property
    def fsync(self) -> str:
        return "off" if self is Durability.OFF else "on"


DEFAULT_DURABILITY = Durability.ALWAYS


# --------------------------------------------------------------------------- private servers
# The embedded default (ledger.app.servers) records the URL of each private server it started
# under LEDGER_HOME; any process of the ledger finds it there.

_KINDS = ("redis", "postgres")


def read_private_url(base: Path, kind: str) -> str | None:
    """The URL recorded in ``base/<kind>.url`` (``kind`` is ``redis`` or ``postgres``), or
    None. It is not checked; see :func:`url_answers`."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, not {kind!r}")
    try:
        url = private_url_file(base, kind).read_text().strip()
    except OSError:
        return None
    return url or None


class ServerNotConfigured(OperationFailed):
    """No server of a kind is configured and no ``ledger serve`` recorded a private one."""


# The setting and environment variable that name each server.
SERVER_SETTINGS = {"redis": ("redis_url", "LEDGER_REDIS_URL"), "postgres": ("database_url", "LEDGER_DATABASE_URL")}


def known_url(settings: Settings, kind: str) -> str:
    """The configured server of ``kind`` (``redis`` or ``postgres``), else the private one a
    ``ledger serve`` recorded under ``settings.home``; raises ``ServerNotConfigured`` saying what to set."""
    attribute, env = SERVER_SETTINGS[kind]
    url = getattr(settings, attribute) or read_private_url(settings.home, kind)
    if url is None:
        raise ServerNotConfigured(f"no {kind} configured: set {env} or start `ledger serve` first")
    return str(url)


def private_url_file(base: Path, kind: str) -> Path:
    """Where the URL of the private server of ``kind`` under ``base`` is recorded."""
    return Path(base) / f"{kind}.url"


class ConfigError(InvalidInput):
    """A setting that cannot work; the message says what to change."""


def parse_execution(text: str) -> dict[Exchange, str]:
    """``paper`` for every exchange, or per exchange: ``okx=live,binance=paper``.

    Exchanges not named keep the default, ``paper``.
    """
    modes = dict.fromkeys(Exchange, DEFAULT_EXECUTION)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, mode = part.partition("=")
        if not sep:
            name, mode = "", name
        if mode not in EXECUTION_MODES:
            raise ConfigError(f"LEDGER_EXECUTION: {mode!r} is not one of {', '.join(EXECUTION_MODES)}")
        if not name:
            modes = dict.fromkeys(Exchange, mode)
            continue
        try:
            modes[Exchange(name)] = mode
        except ValueError:
            raise ConfigError(f"LEDGER_EXECUTION: unknown exchange {name!r}") from None
    return modes


def format_execution(modes: Mapping[Exchange, str]) -> str:
    """``modes`` as ``LEDGER_EXECUTION`` spells it (``parse_execution`` reads it back to the same
    modes): the one mode when every exchange has it, else each exchange not ``paper``."""
    if len(set(modes.values())) == 1 and len(modes) == len(Exchange):
        return next(iter(modes.values()))
    return ",".join(f"{exchange}={mode}" for exchange, mode in modes.items() if mode != DEFAULT_EXECUTION)


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting, checked when built (from the environment, flags or code): a value that
    cannot work raises :class:`ConfigError` before anything uses it."""

    redis_url: str | None = None
    database_url: str | None = None
    shards: int = defaults.SHARDS
    execution: dict[Exchange, str] = field(default_factory=lambda: parse_execution(DEFAULT_EXECUTION))
    paper_fee_rate: Decimal = defaults.PAPER_FEE_RATE
    paper_poll_ms: int = defaults.PAPER_POLL_MS
    home: Path = Path(".ledger")
    durability: Durability = DEFAULT_DURABILITY
    batch_size: int = defaults.BATCH_SIZE
    claim_idle_ms: int = defaults.CLAIM_IDLE_MS
    max_deliveries: int = defaults.MAX_DELIVERIES
    reply_ttl_s: int = defaults.REPLY_TTL_S
    # Retention (off unless set): `serve` trims every shard's streams every trim_interval_s down to
    # what is archived, processed by every group and older than retention_ms (projections.trim).
    retention_ms: int | None = None
    trim_interval_s: int = defaults.TRIM_INTERVAL_S
    # Periodic reconciliation (0: off): `serve` reconciles every (exchange, user) with a live
    # account every reconcile_s seconds (consumers.reconciling).
    reconcile_s: int = defaults.RECONCILE_S
    # How long a final order stays readable in its live hash orders:{id} (projections.live).
    final_order_ttl_s: int = defaults.FINAL_ORDER_TTL_S
    # The live venue's accounts and ccxt options (a JSON file: ledger.venues.accounts).
    credentials: Path | None = None
    log_format: str = "auto"
    log_level: str = "info"
    processes: str = defaults.PROCESSES

    def __post_init__(self) -> None:
        for name in WHOLE_NUMBERS:
            if getattr(self, name) is not None:  # only retention_ms may be unset (off)
                whole_number(name, getattr(self, name))
        object.__setattr__(self, "durability", _durability(self.durability))
        object.__setattr__(self, "reconcile_s", reconcile_seconds(self.reconcile_s))
        object.__setattr__(self, "paper_fee_rate", _fee_rate(self.paper_fee_rate))
        _one_of("LEDGER_LOG_FORMAT", self.log_format, LOG_FORMATS)
        _one_of("LEDGER_LOG_LEVEL", self.log_level.lower(), LOG_LEVELS)
        _one_of("LEDGER_PROCESSES / --processes", self.processes, PROCESS_MODES)
        if self.redis_url is not None:
            _check_redis_url(self.redis_url)
        if self.database_url is not None:
            _check_database_url(self.database_url)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        if url := env.get("LEDGER_REDIS_URL"):
            values["redis_url"] = url
        if url := env.get("LEDGER_DATABASE_URL"):
            values["database_url"] = url
        if mode := env.get("LEDGER_EXECUTION"):
            values["execution"] = parse_execution(mode)
        if rate := env.get("LEDGER_PAPER_FEE_RATE"):
            values["paper_fee_rate"] = rate
        if home := env.get("LEDGER_HOME"):
            values["home"] = Path(home)
        if durability := env.get("LEDGER_DURABILITY"):
            values["durability"] = durability
        if (reconcile := env.get("LEDGER_RECONCILE_S")) is not None:
            values["reconcile_s"] = reconcile
        if credentials := env.get("LEDGER_CREDENTIALS"):
            values["credentials"] = Path(credentials)
        for name, (key, _flag, _maximum) in WHOLE_NUMBERS.items():
            if key in env:
                values[name] = whole_number(name, env[key])
        for name, key in (
            ("log_format", "LEDGER_LOG_FORMAT"),
            ("log_level", "LEDGER_LOG_LEVEL"),
            ("processes", "LEDGER_PROCESSES"),
        ):
            if key in env:
                values[name] = env[key]
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> Settings:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def whole_number(name: str, value: object) -> int:
    """The rule of the whole-number setting ``name`` (a field of :data:`WHOLE_NUMBERS`): 1 up
    to its maximum, given as an ``int`` or as the text of an environment variable or a flag."""
    key, flag, maximum = WHOLE_NUMBERS[name]
    number: int | None = None
    if isinstance(value, str) and value.isascii() and value.isdigit():
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    if number is None or number < 1 or (maximum is not None and number > maximum):
        where = f"{key} / {flag}" if flag else key
        bound = f"from 1 to {maximum}" if maximum is not None else "≥ 1"
        raise ConfigError(f"{where}: must be a whole number {bound} (got {value!r})")
    return number


# The longest interval of the periodic reconciliation: a day.
MAX_RECONCILE_S = 86_400


def reconcile_seconds(value: object) -> int:
    """LEDGER_RECONCILE_S / --reconcile-s: whole seconds from 0 (off) to a day, as an ``int`` or
    the text of an environment variable or a flag."""
    seconds = int(value) if isinstance(value, str) and value.isascii() and value.isdigit() else value
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not 0 <= seconds <= MAX_RECONCILE_S:
        raise ConfigError(
            f"LEDGER_RECONCILE_S / --reconcile-s: must be whole seconds from 0 (off) to {MAX_RECONCILE_S} "
            f"(got {value!r})"
        )
    return seconds


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: must be one of {', '.join(allowed)} (got {value!r})")


def _durability(value: object) -> Durability:
    try:
        return Durability(str(value))
    except ValueError:
        raise ConfigError(f"LEDGER_DURABILITY: must be one of {', '.join(Durability)} (got {value!r})") from None


def _check_redis_url(url: str) -> None:
    try:
        parse_redis_url(url)
    except ValueError as exc:
        raise ConfigError(f"LEDGER_REDIS_URL / --redis-url: {exc}: use redis://[:password@]host:port/db") from None


def _check_database_url(url: str) -> None:
    try:
        conninfo_to_dict(url)
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0].replace(url, "the URL")
        raise ConfigError(
            f"LEDGER_DATABASE_URL / --database-url: {reason}: use postgresql://user[:password]@host:port/dbname"
        ) from None


def _fee_rate(value: object) -> Decimal:
    """A paper fee rate: a decimal from 0 up to (not including) 1; 0.0005 is 5 basis points."""
    try:
        rate = parse_decimal(value, "LEDGER_PAPER_FEE_RATE")
    except ValueRuleError as exc:
        raise ConfigError(str(exc)) from None
    if not 0 <= rate < 1:
        raise ConfigError(f"LEDGER_PAPER_FEE_RATE: must be from 0 up to 1, such as 0.0005 (got {value!r})")
    return rate
