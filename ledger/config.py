"""Configuration from ``LEDGER_*`` environment variables, overridable by command-line flags."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

from ledger.enums import Exchange
from ledger.values import ValueRuleError, parse_decimal

EXECUTION_MODES = ("paper", "external", "live")


class ConfigError(ValueError):
    """A setting that cannot work; the message says what to change."""


def parse_execution(text: str) -> dict[Exchange, str]:
    """``paper`` for every exchange, or per exchange: ``okx=live,binance=paper``.

    Exchanges not named keep the default, ``paper``.
    """
    modes = dict.fromkeys(Exchange, "paper")
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


@dataclass(frozen=True, slots=True)
class Settings:
    redis_url: str | None = None
    database_url: str | None = None
    shards: int = 1
    execution: dict[Exchange, str] = field(default_factory=lambda: parse_execution("paper"))
    paper_fee_rate: Decimal = Decimal("0.0005")
    paper_poll_ms: int = 100
    home: Path = Path(".ledger")
    batch_size: int = 256
    claim_idle_ms: int = 10_000
    max_deliveries: int = 5
    reply_ttl_s: int = 600
    log_format: str = "auto"
    log_level: str = "info"

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
            values["paper_fee_rate"] = _fee_rate(rate)
        if home := env.get("LEDGER_HOME"):
            values["home"] = Path(home)
        for name, key in (
            ("shards", "LEDGER_SHARDS"),
            ("batch_size", "LEDGER_BATCH_SIZE"),
            ("claim_idle_ms", "LEDGER_CLAIM_IDLE_MS"),
            ("max_deliveries", "LEDGER_MAX_DELIVERIES"),
            ("reply_ttl_s", "LEDGER_REPLY_TTL_S"),
            ("paper_poll_ms", "LEDGER_PAPER_POLL_MS"),
        ):
            if key in env:
                values[name] = _positive_int(key, env[key])
        for name, key in (("log_format", "LEDGER_LOG_FORMAT"), ("log_level", "LEDGER_LOG_LEVEL")):
            if key in env:
                values[name] = env[key]
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> Settings:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def _positive_int(key: str, text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{key}: must be a whole number ≥ 1 (got {text!r})")
    return int(text)


def _fee_rate(text: str) -> Decimal:
    try:
        return parse_decimal(text, "LEDGER_PAPER_FEE_RATE")
    except ValueRuleError as exc:
        raise ConfigError(str(exc)) from exc
