"""The real ccxt exchange classes, loaded with the bundled market snapshot.

One ccxt class per ``Exchange``: ``ccxt.okx``, ``ccxt.binance``, ``ccxt.upbit`` (and the same
names in ``ccxt.async_support`` for the live venue). Binance is one client for spot, USDⓈ-M and
COIN-M: ``ccxt.binance`` loads all three (``binanceusdm`` / ``binancecoinm`` are the same class
with another ``defaultType``), so one snapshot and one client per account cover every Binance
market, and an id shared by two markets is resolved by ``DEFAULT_TYPE`` like everywhere else.
OKX loads spot, futures and swaps (options are not ledger instruments).

``client()`` builds an instance offline: ``set_markets`` with the snapshot, no request.
``sync()`` is ``ledger markets sync``: ``load_markets`` from the venue (or from ``base_url``,
which replaces the scheme and host of every REST URL of the class, for a testnet or a recorded
venue on loopback) and the snapshot rewritten with the markets it already held plus those asked for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import ccxt
import ccxt.async_support

from ledger.domain.enums import Exchange
from ledger.errors import OperationFailed
from ledger.venues.accounts import check_base_url, check_ws_url
from ledger.venues.markets import DEFAULT_TYPE, Markets, bundled, read_snapshot, snapshot_path, snapshot_text

CCXT_CLASS: Mapping[Exchange, str] = {Exchange.OKX: "okx", Exchange.BINANCE: "binance", Exchange.UPBIT: "upbit"}
OPTIONS: Mapping[Exchange, Mapping[str, Any]] = {Exchange.OKX: {"fetchMarkets": {"types": ["spot", "future", "swap"]}}}
SYNC_TIMEOUT_MS = 10_000


class MarketsUnavailable(OperationFailed):
    """The venue did not give its markets (no network, a closed port, an error answer)."""


def _with_base_url(urls: Any, base_url: str, schemes: tuple[str, ...] = ("http://", "https://")) -> Any:
    """``urls`` (a URL, or dicts of them) with each http(s) (or ``schemes``) URL's scheme and host replaced."""
    if isinstance(urls, dict):
        return {name: _with_base_url(url, base_url, schemes) for name, url in urls.items()}
    if isinstance(urls, str) and urls.startswith(schemes):
        parts = urlsplit(urls)
        return base_url.rstrip("/") + urls[len(f"{parts.scheme}://{parts.netloc}") :]
    return urls


def _config(exchange: Exchange, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    options = {"defaultType": DEFAULT_TYPE[exchange], **OPTIONS.get(exchange, {})}
    return {"enableRateLimit": True, **(extra or {}), "options": {**options, **(extra or {}).get("options", {})}}


def _build(
    module: Any,
    exchange: Exchange,
    base_url: str | None,
    extra: Mapping[str, Any] | None,
    *,
    sandbox: bool = False,
    demo: bool = False,
) -> Any:
    """A ccxt instance; sandbox mode and demo trading switch its URLs first, ``base_url`` last."""
    instance = getattr(module, CCXT_CLASS[exchange])(_config(exchange, extra))
    if sandbox:
        instance.set_sandbox_mode(True)
    if demo:
        instance.enable_demo_trading(True)
    if base_url is not None:
        instance.urls["api"] = _with_base_url(instance.urls["api"], check_base_url(base_url))
    return instance


def _loaded(instance: Any, exchange: Exchange) -> Any:
    instance.set_markets([market.raw for market in bundled(exchange)])
    return instance


def client(exchange: Exchange, *, base_url: str | None = None, config: Mapping[str, Any] | None = None) -> Any:
    """A synchronous ccxt instance of ``exchange`` with the bundled markets (no request made)."""
    return _loaded(_build(ccxt, exchange, base_url, config), exchange)


def async_client(
    exchange: Exchange,
    *,
    base_url: str | None = None,
    config: Mapping[str, Any] | None = None,
    sandbox: bool = False,
    demo: bool = False,
) -> Any:
    """A ``ccxt.async_support`` instance with the bundled markets; the caller closes it."""
    return _loaded(_build(ccxt.async_support, exchange, base_url, config, sandbox=sandbox, demo=demo), exchange)


def pro_client(
    exchange: Exchange,
    *,
    base_url: str | None = None,
    ws_url: str | None = None,
    config: Mapping[str, Any] | None = None,
    sandbox: bool = False,
    demo: bool = False,
) -> Any:
    """A ``ccxt.pro`` instance (its WebSocket API, and the REST calls that API makes, e.g. Binance's
    listenKey) with the bundled markets; ``ws_url`` replaces the scheme and host of every WebSocket
    URL as ``base_url`` does for REST. ``ccxt.pro`` is imported on first use; the caller closes it."""
    import ccxt.pro

    instance = _build(ccxt.pro, exchange, base_url, config, sandbox=sandbox, demo=demo)
    if ws_url is not None:
        instance.urls["api"] = _with_base_url(instance.urls["api"], check_ws_url(ws_url), ("ws://", "wss://"))
    return _loaded(instance, exchange)


@dataclass(frozen=True, slots=True)
class SyncResult:
    exchange: Exchange
    path: Path
    written: list[str]  # unified symbols
    missing: list[str]  # names kept or asked for that the venue no longer lists

    def summary(self) -> str:
        line = f"{self.exchange}: {len(self.written)} markets written to {self.path}"
        return line + (f"; not listed by the venue: {', '.join(self.missing)}" if self.missing else "")


def _fetch(exchange: Exchange, base_url: str | None, timeout_ms: int) -> list[dict[str, Any]]:
    instance = _build(ccxt, exchange, base_url, {"timeout": timeout_ms})
    try:
        return list(instance.load_markets().values())
    except ccxt.BaseError as exc:
        source = base_url or "the venue"
        kind = "no answer" if isinstance(exc, ccxt.NetworkError) else "an error answer"
        raise MarketsUnavailable(
            f"{exchange}: cannot load markets from {source} ({kind}: {type(exc).__name__}): "
            "check the network (or --base-url) and run `ledger markets sync` again; the snapshot is unchanged"
        ) from exc
    finally:
        instance.close()


def sync(
    exchange: Exchange,
    *,
    output: Path | None = None,
    base_url: str | None = None,
    symbols: Sequence[str] = (),
    timeout_ms: int = SYNC_TIMEOUT_MS,
) -> SyncResult:
    """Load ``exchange``'s markets from the venue and write the snapshot (default: the bundled
    one) with the markets it held (a new file: those of the bundled one) plus ``symbols``
    (unified symbols or native ids)."""
    path = output or snapshot_path(exchange)
    held = path if path.is_file() else snapshot_path(exchange)
    kept = [m["symbol"] for m in read_snapshot(held)["markets"]] if held.is_file() else []
    fresh = Markets.from_ccxt(exchange, _fetch(exchange, base_url, timeout_ms))
    chosen = {}
    missing = []
    for name in [*kept, *symbols]:
        market = fresh.find(name)
        if market is None:
            missing.append(name)
        else:
            chosen[market.symbol] = market.raw
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(snapshot_text(exchange, ccxt.__version__, chosen.values()), encoding="utf-8")
    return SyncResult(exchange, path, sorted(chosen), missing)
