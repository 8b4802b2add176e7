"""Venue accounts and options for the live venue: the file ``LEDGER_CREDENTIALS`` names.

A JSON object, one entry per exchange traded ``live``::

    {
      "okx": {
        "sandbox": false,
        "base_url": "https://www.okx.com",
        "timeout_ms": 10000,
        "accounts": {
          "main": {"apiKey": "...", "secret": "...", "password": "...", "users": ["alice", "bob"]}
        }
      },
      "binance": {"demo": true, "accounts": {"b1": {"apiKey": "...", "secret": "...", "users": ["alice"]}}}
    }

* ``accounts``: name (1 to 32 of ``A-Z a-z 0-9 _ . -``) -> the API key, secret and (OKX) password
  of one venue account, and the ``users`` (ledger user ids) whose orders it sends. A user trades
  on at most one account per exchange; a user with none has its live orders rejected before
  anything is sent. ``position_mode`` (optional): how the account holds contract positions at the
  venue, ``net`` (the default: one-way, OKX ``net_mode``, Binance ``dualSidePosition`` false) or
  ``hedge`` (a long and a short at once: OKX ``long_short_mode``, Binance ``dualSidePosition``
  true). It must be the venue account's own setting: in ``net`` an order is sent one-way with its
  ``reduce_only`` (an ``open_position`` / ``close_position`` order too, whose position side then
  stays the ledger's alone); in ``hedge`` an order with a ``position_side`` is sent with the
  venue's long or short side (``ledger.venues.live.intent``).
* ``sandbox`` (OKX, Binance spot: ccxt ``set_sandbox_mode``), ``demo`` (Binance futures: ccxt
  ``enable_demo_trading``), ``base_url`` (replaces the scheme and host of every REST URL, applied
  after them: a testnet, or a stand-in venue on loopback), ``ws_url`` (the same for every
  WebSocket URL: ``ws(s)://host[:port][/path]``; with ``base_url`` and no ``ws_url`` orders are
  followed by polling, never over a WebSocket of another venue than the REST one),
  ``timeout_ms`` (one request; default ``DEFAULT_TIMEOUT_MS``). Unknown keys are refused, so a
  typo never goes unnoticed.

Secrets never leave this module's objects in text: ``Account``'s ``repr`` shows the account name
only, and nothing logs an ``Account``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ledger.domain.enums import Exchange
from ledger.domain.values import RULES
from ledger.errors import InvalidInput
from ledger.venues.markets import bundled

DEFAULT_TIMEOUT_MS = 10_000
BASE_URL = re.compile(r"\Ahttps?://[A-Za-z0-9.-]+(?::[0-9]{1,5})?(?:/[A-Za-z0-9._~/-]*)?\Z")
WS_URL = re.compile(r"\Awss?://" + BASE_URL.pattern.removeprefix(r"\Ahttps?://"))  # host, port, path alike
ACCOUNT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_SECRETS = ("apiKey", "secret", "password")
_ACCOUNT_KEYS = {*_SECRETS, "users", "position_mode"}
NET, HEDGE = "net", "hedge"
POSITION_MODES = (NET, HEDGE)
_EXCHANGE_KEYS = {"accounts", "sandbox", "demo", "base_url", "ws_url", "timeout_ms"}
# What ccxt offers per exchange: sandbox mode (OKX, Binance spot testnet), demo trading (Binance futures).
SANDBOX = frozenset({Exchange.OKX, Exchange.BINANCE})
DEMO = frozenset({Exchange.BINANCE})


class CredentialsError(InvalidInput):
    """The live venue's configuration cannot work; the message says what to change."""


def check_base_url(url: str) -> str:
    """A base URL override: ``http(s)://host[:port][/path]``, nothing else."""
    if not BASE_URL.fullmatch(url):
        raise InvalidInput(f"base URL must be http(s)://host[:port][/path] (got {url!r})")
    return url


def check_ws_url(url: str) -> str:
    """A WebSocket URL override: ``ws(s)://host[:port][/path]``, nothing else."""
    if not WS_URL.fullmatch(url):
        raise InvalidInput(f"WebSocket URL must be ws(s)://host[:port][/path] (got {url!r})")
    return url


@dataclass(frozen=True, slots=True)
class Account:
    """One venue account: its name and secrets (never in its ``repr``) and its users."""

    exchange: Exchange
    name: str
    api_key: str = field(repr=False)
    secret: str = field(repr=False)
    password: str | None = field(repr=False)
    users: frozenset[str]
    position_mode: str = NET

    @property
    def hedge(self) -> bool:
        """Whether the venue account holds a long and a short of one market apart (hedge mode)."""
        return self.position_mode == HEDGE

    def ccxt_config(self) -> dict[str, str]:
        config = {"apiKey": self.api_key, "secret": self.secret}
        if self.password is not None:
            config["password"] = self.password
        return config


@dataclass(frozen=True, slots=True)
class VenueOptions:
    """The ccxt options of one exchange."""

    sandbox: bool = False
    demo: bool = False
    base_url: str | None = None
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    ws_url: str | None = None


@dataclass(frozen=True, slots=True)
class VenueConfig:
    """The accounts and options of one exchange."""

    exchange: Exchange
    options: VenueOptions
    accounts: Mapping[str, Account]

    def account_for(self, user_id: str) -> Account | None:
        """The account that trades for ``user_id``, None when none does."""
        return next((a for a in self.accounts.values() if user_id in a.users), None)


def no_account(user_id: str, exchange: Exchange | str) -> str:
    """Why nothing can reach the venue for ``user_id`` (an order rejected, a reconciliation refused)."""
    return f"no live account for user {user_id} on {exchange}: add the user to LEDGER_CREDENTIALS"


def _fail(where: str, problem: str) -> CredentialsError:
    return CredentialsError(f"LEDGER_CREDENTIALS: {where}: {problem}")


def _text(where: str, value: object) -> str:
    if not isinstance(value, str) or not value or not value.isprintable():
        raise _fail(where, "must be a non-empty string of printable characters")
    return value


def _account(exchange: Exchange, name: str, raw: object) -> Account:
    where = f"{exchange}.accounts.{name}"
    if not ACCOUNT_NAME.fullmatch(name):
        raise _fail(f"{exchange}.accounts", f"account name {name!r} must be 1 to 32 of A-Z a-z 0-9 _ . -")
    if not isinstance(raw, dict):
        raise _fail(where, "must be an object with apiKey, secret, users (and password for okx)")
    unknown = sorted(set(raw) - _ACCOUNT_KEYS)
    if unknown:
        raise _fail(where, f"unknown key {unknown[0]!r}: use {', '.join(sorted(_ACCOUNT_KEYS))}")
    for key in ("apiKey", "secret"):
        if key not in raw:
            raise _fail(where, f"{key} is missing")
    if exchange is Exchange.OKX and "password" not in raw:
        raise _fail(where, "password is missing (OKX API keys have a passphrase)")
    users = raw.get("users")
    if not isinstance(users, list) or not users or not all(RULES["user_id"].matches(u) for u in users):
        raise _fail(f"{where}.users", f"must be a non-empty list of user ids ({RULES['user_id'].description})")
    password = raw.get("password")
    position_mode = raw.get("position_mode", NET)
    if position_mode not in POSITION_MODES:
        raise _fail(f"{where}.position_mode", f"must be {' or '.join(POSITION_MODES)} (the venue account's own mode)")
    return Account(
        exchange=exchange,
        name=name,
        api_key=_text(f"{where}.apiKey", raw["apiKey"]),
        secret=_text(f"{where}.secret", raw["secret"]),
        password=None if password is None else _text(f"{where}.password", password),
        users=frozenset(users),
        position_mode=position_mode,
    )


def _options(exchange: Exchange, raw: Mapping[str, Any]) -> VenueOptions:
    for flag, allowed, what in (("sandbox", SANDBOX, "sandbox mode"), ("demo", DEMO, "demo trading")):
        value = raw.get(flag, False)
        if not isinstance(value, bool):
            raise _fail(f"{exchange}.{flag}", "must be true or false")
        if value and exchange not in allowed:
            raise _fail(f"{exchange}.{flag}", f"ccxt has no {what} for {exchange}: remove it")
    base_url, ws_url = raw.get("base_url"), raw.get("ws_url")
    for key, value, check in (("base_url", base_url, check_base_url), ("ws_url", ws_url, check_ws_url)):
        if value is not None:
            try:
                check(value if isinstance(value, str) else repr(value))
            except InvalidInput as exc:
                raise _fail(f"{exchange}.{key}", str(exc)) from None
    timeout = raw.get("timeout_ms", DEFAULT_TIMEOUT_MS)
    if not isinstance(timeout, int) or isinstance(timeout, bool) or not 1 <= timeout <= 600_000:
        raise _fail(f"{exchange}.timeout_ms", "must be a whole number of milliseconds from 1 to 600000")
    return VenueOptions(raw.get("sandbox", False), raw.get("demo", False), base_url, timeout, ws_url)


def parse_credentials(data: object) -> dict[Exchange, VenueConfig]:
    """The venue configuration of a parsed credentials file (see the module doc)."""
    if not isinstance(data, dict):
        raise _fail("the file", "must hold a JSON object of exchange -> accounts and options")
    configs: dict[Exchange, VenueConfig] = {}
    for name, raw in data.items():
        try:
            exchange = Exchange(name)
        except ValueError:
            raise _fail(repr(name), f"unknown exchange: use {', '.join(e.value for e in Exchange)}") from None
        if not isinstance(raw, dict):
            raise _fail(name, "must be an object with accounts (and options)")
        unknown = sorted(set(raw) - _EXCHANGE_KEYS)
        if unknown:
            raise _fail(name, f"unknown key {unknown[0]!r}: use {', '.join(sorted(_EXCHANGE_KEYS))}")
        accounts_raw = raw.get("accounts")
        if not isinstance(accounts_raw, dict) or not accounts_raw:
            raise _fail(f"{name}.accounts", "must name at least one account")
        accounts = {key: _account(exchange, key, value) for key, value in accounts_raw.items()}
        seen: dict[str, str] = {}
        for account in accounts.values():
            for user in sorted(account.users):
                if user in seen:
                    both = f"{seen[user]!r} and {account.name!r}"
                    raise _fail(f"{name}.accounts", f"user {user!r} is in {both}: keep one")
                seen[user] = account.name
        configs[exchange] = VenueConfig(exchange, _options(exchange, raw), accounts)
    return configs


def load_credentials(path: Path) -> dict[Exchange, VenueConfig]:
    """Read and check the credentials file at ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise _fail(str(path), f"cannot be read ({exc.strerror}): check the path") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(str(path), f"is not JSON ({exc.msg} at line {exc.lineno})") from None
    return parse_credentials(data)


def live_configs(execution: Mapping[Exchange, str], credentials: Path | None) -> dict[Exchange, VenueConfig]:
    """The accounts and options of the exchanges configured ``live`` (``LEDGER_EXECUTION``), from
    the file ``credentials`` names; ``CredentialsError`` (one line that says what to do) when one
    has no account or no markets. ``ledger serve`` checks this before it starts anything."""
    live = [exchange for exchange, mode in execution.items() if mode == "live"]
    if not live:
        return {}
    if credentials is None:
        names = ",".join(f"{e}=live" for e in live)
        raise CredentialsError(
            f"LEDGER_EXECUTION has {names} but LEDGER_CREDENTIALS is not set: name the venue accounts file "
            "(README, Configuration) or set those exchanges to paper"
        )
    configs = load_credentials(credentials)
    for exchange in live:
        if exchange not in configs:
            raise CredentialsError(
                f"LEDGER_EXECUTION has {exchange}=live but {credentials} has no {exchange} account: "
                f"add one or set {exchange}=paper"
            )
        if not len(bundled(exchange)):
            raise CredentialsError(f"{exchange}=live needs its markets: run `ledger markets sync {exchange}`")
    return {exchange: configs[exchange] for exchange in live}
