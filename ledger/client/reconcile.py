"""Reconciliation of one (user, exchange) on a live venue with the ledger (issue 11, item 3).

What the venue knows is fetched through the live venue's client (``ledger.venues.live``), what
the ledger knows is read from the user's shard (the live keys list the user's orders and open
positions, the snapshots hold each order's fill ids), and every difference is either RECORDED
through the normal command path or REPORTED as a finding; nothing is ever overwritten:

* an order of the ledger not yet final (``pending``, ``open``, ``partially_filled``,
  ``pending_cancel``) is looked up at the venue (by its venue id, or, with none yet, by the
  client order id derived from the ledger's order id), with its trades (OKX ``fills-history``,
  Binance ``myTrades``, Upbit: the order's own trades). Each trade whose id is not among the
  order's fill ids is recorded as ``record_fill`` (the venue's trade id as ``fill_id``); an order
  found by its client id as ``order_accepted``; a final status the ledger lacks as
  ``order_cancelled`` / ``order_expired`` / ``order_rejected``. These are the live venue role's
  own commands with its own deterministic ids (``ledger.venues.commands``): the role and
  reconciliation, or two reconciliations, never record one fact twice (the handler answers a
  repeated ``command_id`` with its first outcome);
* a venue order of the markets looked at (the order of a recent trade, an open order, an algo
  order waiting for its trigger: ``_strangers`` says in which order and why) that belongs to no
  order of the user in the ledger is ADOPTED (an algo order with the ledger's trigger order
  type): ``adopt_order`` (command id ``venue:<exchange>:adopt:<16 hex of SHA-1 of the venue
  order id>``; the ledger's order id is derived from (user, exchange, venue order id),
  ``wire.adopted_order_id``) in the user's spelling of the market (of an open position, else of
  an order, else as the caller named it), then its trades as ``record_fill`` and its final
  status, with the live venue role's command ids. It is adopted once: an adopted order is found
  by its derived id ever after. What cannot be adopted is an ``unknown_order`` finding whose
  evidence has the ``reason``: an order whose client id is one the ledger derives (one of the
  ledger's own, never adopted) that the user does not hold, or a report that is no ledger order
  (an order type or side the ledger does not know, no amount, a value the wire rules refuse). A
  ``record_fill`` for an unknown order stays rejected (CONTRACT §3);
* a trade of an order the ledger holds as final that the ledger never recorded is a fact too:
  recorded as ``record_fill`` with the venue role's fill command id (the decider flags it ``late``
  after a cancel or an expiry, ``overfill`` beyond the quantity); a refusal is a
  ``command_rejected`` finding;
* once the commands are recorded (and projected), the venue's net position of each contract
  market (where ccxt has ``fetchPositions``) is compared with the sum of the ledger's open
  positions of that market: two spellings of one market (``BTC-USDT-SWAP`` and
  ``BTC/USDT:USDT``) are two ledger positions, compared by their canonical market
  (``ledger.venues.markets``), summed, long minus short. A difference is a
  ``position_mismatch`` finding with the evidence;
* the fee the venue reports for each fill the ledger recorded (its recent trades, where ccxt
  lists them) is compared with the fee the ledger recorded: a difference is a ``fee_mismatch``
  finding with both fees. The ledger's fee is read from PostgreSQL's ``fills`` (the only record
  left of a fill whose event retention trimmed from Redis), and from the shard's Redis log for
  the fills the projector has not written yet or when no archive can be read (a fill in neither
  is not compared, and a warning says so);
* a ``position_mismatch`` or ``fee_mismatch`` is also RECORDED as a drift (``record_drift``,
  kind ``position_size`` or ``fee``, the finding's evidence; its command id is made of the figures
  compared, so the same difference is one drift however often it is seen), unless a drift of that
  (user, exchange, canonical market, kind) is open: it still is. A market whose sizes agree again
  while its ``position_size`` drift is open gets ``resolve_drift`` (``agreed``). Only an explicit
  ``adjust_position`` (or ``resolve_drift``) changes anything more;
* a command the ledger refuses is a ``command_rejected`` finding with its code and message.

The markets looked at are the canonical markets of the user's orders and open positions in the
live keys, plus any the caller names. Every finding is logged with its ids and appended to the
operations stream ``ledger:ops`` (action ``reconcile.finding``) when it is new or its evidence
changed since the user's last reconciliation (``_report``: a periodic reconciliation does not
append the same finding every round); it stays a finding until the venue and the ledger agree.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import psycopg
import structlog

from ledger.client import queries
from ledger.config import Settings, known_url
from ledger.defaults import FINAL_ORDER_TTL_S
from ledger.domain import wire
from ledger.domain.decider import RejectCode, drift_market
from ledger.domain.enums import OPEN_ORDER_STATUSES, Exchange, PositionSide
from ledger.domain.evolution import drift_slot
from ledger.domain.state import OrderState
from ledger.domain.values import ZERO, check_identifier, format_decimal, now_ms
from ledger.domain.wire import DriftKind
from ledger.errors import InvalidInput, OperationFailed
from ledger.sqlfiles import load_queries
from ledger.store.eventstore import EventStore
from ledger.store.keys import ShardKeys, reconcile_findings
from ledger.store.log import aggregate_reader, open_archive
from ledger.store.operations import record_operation
from ledger.store.redis_conn import final_order_ttl, text
from ledger.venues import commands
from ledger.venues.accounts import VenueConfig, no_account
from ledger.venues.live import Ambiguous, VenueClient, VenueClients, VenueFill, VenueOrder, is_algo, venue_client_id
from ledger.venues.markets import Market, MarketError, bundled, instrument_table

FINDING_ACTION = "reconcile.finding"
UNKNOWN_ORDER = "unknown_order"
POSITION_MISMATCH = "position_mismatch"
COMMAND_REJECTED = "command_rejected"
FEE_MISMATCH = "fee_mismatch"
_Fee = tuple[Decimal, str | None]  # a fill's fee as the ledger recorded it: amount, currency (None: settlement)
_Fills = dict[tuple[str, str], _Fee]  # (order id, fill id) -> the fee the ledger recorded
# Refusals of a drift command that only say another drift command got there first (the drift
# is still open, or already resolved): no finding.
_DRIFT_MOVED = (RejectCode.DRIFT_OPEN, RejectCode.NO_DRIFT)
FINDING_COLUMNS = ("kind", "market", "subject", "evidence")
_SQL = load_queries("ledger.client", "reconcile.sql")
_OURS = "ours"  # _claim: the venue order is one of the user's own ledger orders
_WEEK_S = 7 * 24 * 3600
_CLOCK_MARGIN_S = 60

log = structlog.get_logger("ledger.reconcile")


@dataclass(frozen=True, slots=True)
class Finding:
    """A difference reconciliation reports and does not resolve: its class, the canonical market,
    what it is about (a venue order id, a command id, the market) and the evidence."""

    kind: str
    market: str
    subject: str
    evidence: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "market": self.market, "subject": self.subject, "evidence": self.evidence}


@dataclass(slots=True)
class Reconciliation:
    """What one reconciliation found: the commands it recorded (their ``command_id``, ``type``,
    ``order_id`` and, for a fill, ``fill_id``) and the findings it reported."""

    user_id: str
    exchange: Exchange
    account: str
    markets: list[str] = field(default_factory=list)
    recorded: list[dict[str, str]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def unresolved(self) -> bool:
        return bool(self.findings)

    def as_dict(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "exchange": self.exchange.value,
            "account": self.account,
            "markets": self.markets,
            "recorded": self.recorded,
            "findings": [f.as_dict() for f in self.findings],
        }


@dataclass(slots=True)
class _Stranger:
    """A venue order no order of the user explains: as the venue reported it, why it is not
    adopted (None: it is), its recent trades seen, whether an open-orders list named it (else a
    trade did, and ``report`` was fetched with its trades) and whether it is a waiting algo order."""

    report: VenueOrder
    reason: str | None
    trades: list[VenueFill] = field(default_factory=list)
    listed: bool = False
    algo: bool = False

    def evidence(self) -> dict[str, Any]:
        found: dict[str, Any] = {
            "client_order_id": self.report.client_id,
            "status": self.report.status,
            "filled": format_decimal(self.report.filled),
            "trades": [_trade(t) for t in self.trades],
        }
        return found if self.reason is None else {**found, "reason": self.reason}


def _signed(size: Decimal, side: PositionSide) -> Decimal:
    return size if side is PositionSide.LONG else -size


class Reconciler:
    """Reconciles users of one exchange: the venue's accounts and clients, and the ledger's
    command path (a ``LedgerClient``: each command waits for its reply and its projection)."""

    def __init__(
        self, redis: Any, ledger: Any, config: VenueConfig, clients: VenueClients, settings: Settings | None = None
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.ledger = ledger
        self.config = config
        self.exchange = config.exchange
        self.clients = clients
        self.markets = bundled(config.exchange)

    async def run(self, user_id: str, symbols: Sequence[str] = ()) -> Reconciliation:
        user_id = check_identifier("user_id", user_id)
        account = self.config.account_for(user_id)
        if account is None:
            raise InvalidInput(no_account(user_id, self.exchange))
        venue = self.clients.get(account)
        shard = await self.ledger.shard_of(user_id)
        settings = self.settings
        archive = aggregate_reader(lambda: known_url(settings, "postgres")) if settings is not None else None
        store = EventStore(self.redis, shard, archive=archive)
        result = Reconciliation(user_id, self.exchange, account.name)
        bound = log.bind(user_id=user_id, exchange=str(self.exchange), account=account.name, shard=shard)

        orders = await queries.get_orders(self.redis, user_id, self.exchange)
        positions = await queries.get_positions(self.redis, user_id, self.exchange)
        markets = self._markets([o.symbol for o in orders] + [p.symbol for p in positions] + list(symbols))
        result.markets = sorted(markets)
        known = {o.exchange_order_id: o.id for o in orders if o.exchange_order_id and o.id}
        spellings: dict[str, str] = {}  # canonical market -> the user's spelling: of an open position, an order
        for name in [p.symbol for p in positions] + [o.symbol for o in orders] + list(symbols):
            for canonical in self._markets([name]):
                spellings.setdefault(canonical, name)
        pending: list[tuple[wire.Command, str]] = []
        trades: dict[str, list[VenueFill]] = {}  # the venue's recent trades of each market (one list a run)
        try:
            for order in orders:  # an algo (trigger) order's trades are those of the order it placed
                market = self.markets.find(order.symbol) if order.exchange_order_id else None
                if market is not None and is_algo(self.exchange, market, order.order_type):
                    placed = await venue.triggered(order.exchange_order_id or "", market)
                    if placed is not None and order.id is not None:
                        known[placed] = order.id
            for order in reversed(orders):  # oldest first
                if order.id is None or order.status not in OPEN_ORDER_STATUSES:
                    continue
                state = await store.order(order.id)
                market = self.markets.find(order.symbol)
                if state is not None and market is not None:
                    pending += [(c, market.symbol) for c in await self._follow(venue, state, market, known)]
            lists_trades = bool(venue.ccxt.has.get("fetchMyTrades"))
            since = now_ms() - await self._trade_window_ms()
            for market in markets.values():
                listed = await venue.recent_fills(market) if lists_trades else None
                trades[market.symbol] = listed or []
                recent = None if listed is None else [t for t in listed if t.ts is not None and t.ts >= since]
                adoptions, findings = await self._strangers(venue, store, user_id, market, recent, known, spellings)
                pending += [(c, market.symbol) for c in adoptions]
                result.findings += findings
        except Ambiguous as exc:
            raise OperationFailed(f"{self.exchange} did not answer: {exc}; run the reconciliation again") from exc

        for command, symbol in pending:
            await self._record(command, symbol, result, bound)
        positions = await queries.get_positions(self.redis, user_id, self.exchange)
        for market in markets.values():
            net = await venue.position(market)
            if net is None:
                continue
            finding, figures = self._position(market, net, positions)
            if finding is not None:
                result.findings.append(finding)
            await self._drift(store, user_id, market.symbol, DriftKind.POSITION_SIZE, finding, figures, result, bound)
        reported = {symbol: _reported_fees(trades[symbol], known) for symbol in markets}
        recorded = await self._recorded_fees(store, {fill for fills in reported.values() for fill in fills}, bound)
        for symbol in markets:
            fees, figures = _fee_mismatch(symbol, reported[symbol], recorded)
            if fees is not None:  # a fill's fee never changes: no fee drift is ever found agreeing again
                result.findings.append(fees)
                await self._drift(store, user_id, symbol, DriftKind.FEE, fees, figures, result, bound)
        await self._report(result, user_id, account.name, bound)
        bound.info("reconciled", recorded=len(result.recorded), findings=len(result.findings))
        return result

    async def _report(self, result: Reconciliation, user_id: str, account: str, bound: Any) -> None:
        """Append each finding to ``ledger:ops`` when it is new or its evidence changed since the
        user's last reconciliation (``keys.reconcile_findings``: a periodic round that finds the
        same difference again does not append it again); log it either way; forget the findings
        no longer found (one found again later is appended again)."""
        key = reconcile_findings(self.exchange, user_id)
        last = {text(field): text(value) for field, value in (await self.redis.hgetall(key)).items()}
        found: dict[str, str] = {}
        for finding in result.findings:
            field = f"{finding.kind}|{finding.market}|{finding.subject}"
            evidence = json.dumps(finding.evidence, sort_keys=True, separators=(",", ":"), default=str)
            digest = hashlib.sha1(evidence.encode()).hexdigest()
            seen_digest, _, seen_op = last.get(field, "").partition(" ")
            if seen_digest == digest:
                found[field] = last[field]
                bound.info(
                    "reconciliation finding unchanged", kind=finding.kind, subject=finding.subject, op_id=seen_op
                )
                continue
            target = f"{self.exchange}/{account}/{user_id}/{finding.market}"
            detail = {"user_id": user_id, "exchange": self.exchange.value, **finding.as_dict()}
            operation = await record_operation(self.redis, FINDING_ACTION, target, finding.kind, detail)
            found[field] = f"{digest} {operation.id}"
            bound.warning("reconciliation finding", kind=finding.kind, subject=finding.subject, op_id=operation.id)
        if found != last:
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(key)
            if found:
                pipe.hset(key, mapping=found)
            await pipe.execute()

    def _markets(self, names: Iterable[str]) -> dict[str, Market]:
        """The canonical markets of ``names`` (names no bundled market resolves are left out)."""
        found: dict[str, Market] = {}
        for name in names:
            try:
                market = self.markets.find(name)
            except MarketError:
                continue
            if market is not None:
                found[market.symbol] = market
        return found

    async def _follow(
        self, venue: VenueClient, state: OrderState, market: Market, known: dict[str, str]
    ) -> list[wire.Command]:
        """The commands that bring a ledger order not yet final level with the venue."""
        found: list[wire.Command] = []
        venue_id = state.exchange_order_id
        algo = is_algo(self.exchange, market, state.order_type)
        if venue_id is None:
            venue_id = await venue.lookup(venue_client_id(self.exchange, state.id), market, algo=algo)
            if venue_id is None:
                return found  # not at the venue: the live venue role sends it (or has not yet)
            found.append(commands.accepted(state.id, state.user_id, venue_id))
            known[venue_id] = state.id
        report = await venue.fetch(venue_id, market, algo=algo)
        known[report.exchange_order_id] = state.id  # an algo order's: the order it placed
        recorded = set(state.fill_ids)
        found += [commands.fill(state.id, state.user_id, t) for t in report.fills if t.fill_id not in recorded]
        _final, last = commands.final(state.id, state.user_id, self.exchange, state.quantity, report)
        if last is not None:
            found.append(last)
        return found

    async def _strangers(
        self,
        venue: VenueClient,
        store: EventStore,
        user_id: str,
        market: Market,
        trades: list[VenueFill] | None,
        known: dict[str, str],
        spellings: dict[str, str],
    ) -> tuple[list[wire.Command], list[Finding]]:
        """Venue orders of ``market`` that no order of the user explains (the orders of its recent
        trades, its open orders, its algo orders waiting for their trigger): each is adopted
        (``adopt_order``, in the user's spelling of the market), then its trades and its final
        status are recorded like any order's. What cannot be adopted is an ``unknown_order``
        finding whose evidence says why. Trades of orders the ledger holds as final that it never
        recorded come first among the commands, as their ``record_fill``.

        The lists are read in that order so that an algo order triggering meanwhile is never
        adopted twice: an algo order listed as waiting whose trigger has since placed an order
        takes that order's place among the strangers (its trades are the algo order's). Only
        trades younger than the live order hashes (``_trade_window_ms``, applied by ``run``) are looked at: an order
        of the ledger is known by its hash, and an order whose hash has expired could no longer
        be told from a stranger when its client id does not name it (the order an algo order
        placed); its client id is checked for every order (``_claim``), however old. ``trades``:
        the market's trades within that window (None: the venue lists no trades of the account)."""
        strangers: dict[str, _Stranger] = {}
        late: list[wire.Command] = []  # trades of orders the ledger holds as final, never recorded
        if trades is not None:  # None: the venue lists no trades of the account (Upbit)
            for trade in trades:
                order_id = trade.exchange_order_id
                if order_id is None:
                    continue
                if order_id not in strangers and not await self._known(store, user_id, order_id, known):
                    report = await venue.fetch(order_id, market)
                    if (reason := await self._claim(store, user_id, report, known)) != _OURS:
                        strangers[order_id] = _Stranger(report, reason)
                if order_id in strangers:
                    strangers[order_id].trades.append(trade)
                    continue
                state = await store.order(known[order_id])
                if state is not None and state.status.is_final and trade.fill_id not in state.fill_ids:
                    late.append(commands.fill(state.id, user_id, trade))
        for algo in (False, True):
            for order in await venue.open_orders(market, algo=algo):
                venue_id = order.exchange_order_id
                if venue_id in strangers or await self._known(store, user_id, venue_id, known):
                    continue
                if (reason := await self._claim(store, user_id, order, known)) == _OURS:
                    continue
                placed = await venue.triggered(venue_id, market) if algo else None
                if placed is not None and await self._known(store, user_id, placed, known):
                    continue  # in the books already, as the order it placed
                strangers.pop(placed or "", None)
                strangers[venue_id] = _Stranger(order, reason, listed=True, algo=algo)
        adoptions: list[wire.Command] = []
        unknown: list[Finding] = []
        for venue_id, stranger in strangers.items():
            if stranger.reason is None:
                try:
                    adoptions += await self._adopt(venue, user_id, market, stranger, spellings[market.symbol])
                    continue
                except InvalidInput as exc:
                    stranger.reason = f"not adopted: {exc}"
            unknown.append(Finding(UNKNOWN_ORDER, market.symbol, venue_id, stranger.evidence()))
        return late + adoptions, unknown

    async def _trade_window_ms(self) -> int:
        """How far back trades are looked at for strangers: while every order they may belong to
        still has its live hash (a final order's lasts ``final_order_ttl_s``: the shorter of the
        one the live projection records and this process's), less a minute for the venue's
        clock; at most a week (the longest a venue's trade list reaches)."""
        configured = FINAL_ORDER_TTL_S if self.settings is None else self.settings.final_order_ttl_s
        ttl_s = min(configured, await final_order_ttl(self.redis, configured))
        return max(min(ttl_s, _WEEK_S) - _CLOCK_MARGIN_S, 0) * 1000

    async def _claim(self, store: EventStore, user_id: str, order: VenueOrder, known: dict[str, str]) -> str | None:
        """Who a venue order's client id says it belongs to: ``_OURS`` when it is derived from an
        order the user holds on this exchange (then ``known``), the reason it is not adopted when
        it is derived from another (one of the ledger's own, never adopted), None when the ledger
        never made it (a stranger to adopt)."""
        ledger_id = wire.ledger_order_id(order.client_id)
        if ledger_id is None:
            return None
        state = await store.order(ledger_id)
        if state is not None and state.user_id == user_id and state.exchange is self.exchange:
            known[order.exchange_order_id] = state.id
            return _OURS
        return (
            f"its client id is the ledger's own (order {ledger_id}), which {user_id} does not hold on "
            f"{self.exchange}: not adopted"
        )

    async def _known(self, store: EventStore, user_id: str, venue_id: str, known: dict[str, str]) -> bool:
        """Whether the ledger holds the venue order ``venue_id``: one of the user's orders with that
        venue id, or adopted already (found by its derived id even once its live hash expired)."""
        if venue_id in known:
            return True
        adopted = await store.order(wire.adopted_order_id(user_id, self.exchange, venue_id))
        if adopted is None:
            return False
        known[venue_id] = adopted.id
        return True

    async def _adopt(
        self, venue: VenueClient, user_id: str, market: Market, stranger: _Stranger, symbol: str
    ) -> list[wire.Command]:
        """The commands that bring a venue order the ledger never placed into the books: its
        adoption (an algo order as it was listed: its trigger order type and price), its trades
        (the live venue role's fill command ids; an algo order's: those of the order it placed)
        and its final status."""
        listed = stranger.report
        if stranger.algo or stranger.listed:  # a list has no trades: the order is fetched with them
            report = await venue.fetch(listed.exchange_order_id, market, algo=stranger.algo)
        else:
            report = listed  # fetched with its trades when a trade named it
        adopt = commands.adopted(user_id, self.exchange, symbol, listed if stranger.algo else report)
        found: list[wire.Command] = [adopt, *(commands.fill(adopt.order_id, user_id, t) for t in report.fills)]
        _final, last = commands.final(adopt.order_id, user_id, self.exchange, Decimal(adopt.quantity), report)
        return found if last is None else [*found, last]

    def _position(self, market: Market, net: Decimal, positions: list[Any]) -> tuple[Finding | None, str]:
        """A ``position_mismatch`` when the venue's net position of ``market`` differs from the
        sum of the ledger's open positions of that market (by canonical market), and the figures
        compared (the drift's command id is made of them)."""
        mine = sorted(
            (p for p in positions if market.symbol in self._markets([p.symbol])), key=lambda p: (p.symbol, p.id or "")
        )
        ledger_net = sum((_signed(p.size, p.side) for p in mine), ZERO)
        figures = "|".join([format_decimal(net), *(f"{p.id}:{format_decimal(p.size)}:{p.version}" for p in mine)])
        if ledger_net == net:
            return None, figures
        evidence = {
            "venue": format_decimal(net),
            "ledger": format_decimal(ledger_net),
            "difference": format_decimal(net - ledger_net),
            "positions": [
                {"position_id": p.id, "symbol": p.symbol, "side": str(p.side), "size": format_decimal(p.size)}
                for p in mine
            ],
        }
        return Finding(POSITION_MISMATCH, market.symbol, market.symbol, evidence), figures

    async def _recorded_fees(self, store: EventStore, fills: set[tuple[str, str]], bound: Any) -> _Fills:
        """The fee the ledger recorded for each fill of ``fills`` it holds: from PostgreSQL's
        ``fills`` (the projector's record; the only one left of a fill trimmed from Redis), then,
        for the rest (not projected yet, or no archive to read), from the shard's Redis log. A
        fill found in neither while the archive could not be read is not compared: one warning
        says how many and why."""
        found: _Fills = {}
        if not fills:
            return found
        unread = "no configuration to find it by"
        if self.settings is not None:
            async with open_archive(self.settings) as (conn, reason):
                if conn is not None:
                    found.update(await _archived_fees(conn, fills))
                unread = "" if conn is not None else reason
        found.update(await _logged_fees(store, fills - found.keys()))
        if unread and (left := len(fills) - len(found)):
            bound.warning(
                "fees not compared: neither in the Redis log nor readable in the PostgreSQL archive; "
                "set LEDGER_DATABASE_URL and reconcile again",
                fills=left,
                reason=unread,
            )
        return found

    async def _drift(
        self,
        store: EventStore,
        user_id: str,
        market: str,
        kind: DriftKind,
        finding: Finding | None,
        figures: str,
        result: Reconciliation,
        bound: Any,
    ) -> None:
        """A difference becomes a drift (``record_drift``) unless one is open for its key: it
        still is, and nothing is recorded; no difference on a key with an open drift resolves it
        (``resolve_drift``, ``agreed``)."""
        slot = drift_slot(user_id, self.exchange, drift_market(self.exchange, market, instrument_table()), kind)
        open_id = text(await self.redis.hget(store.keys.slots, slot))
        if finding is not None and open_id:
            bound.info("drift still open", drift_id=open_id, kind=str(kind), market=market)
            return
        command: wire.Command
        if finding is not None:
            command = commands.record_drift(user_id, self.exchange, market, kind, finding.evidence, figures)
        elif open_id:
            command = commands.drift_agreed(user_id, self.exchange, market, kind, open_id)
        else:
            return
        await self._record(command, market, result, bound)

    async def _record(self, command: wire.Command, market: str, result: Reconciliation, bound: Any) -> None:
        """Submit one command; a refusal becomes a ``command_rejected`` finding."""
        fields = {"command_id": command.command_id, "type": str(command.__struct_config__.tag)}
        if (order_id := getattr(command, "order_id", None)) is not None:  # a drift command names none
            fields["order_id"] = str(order_id)
        if isinstance(command, wire.RecordFill):
            fields["fill_id"] = command.fill_id
        try:
            reply = await self.ledger.submit(command)
        except OperationFailed as exc:
            reply = getattr(exc, "reply", None)
            if not isinstance(reply, dict):  # not the handler's refusal (a timeout): nothing is known
                raise
            error = reply.get("error") or {}
            if error.get("code") in _DRIFT_MOVED:  # another drift command got there first
                bound.info("drift command overtaken", command_id=command.command_id, reason=error.get("message"))
                return
            evidence = {**fields, "code": str(error.get("code")), "message": str(error.get("message"))}
            result.findings.append(Finding(COMMAND_REJECTED, market, command.command_id, evidence))
            return
        if isinstance(command, wire.RecordDrift | wire.ResolveDrift):
            fields["drift_id"] = await self._stream_of(reply["shard"], reply["events"][0]["id"])
        result.recorded.append(fields)
        bound.info("reconciliation recorded", **fields)

    async def _stream_of(self, shard: int, entry_id: str) -> str:
        """The aggregate (``stream``) of the event at ``entry_id``: a drift's id."""
        entries = await self.redis.xrange(ShardKeys(shard).events, entry_id, entry_id)
        event = wire.decode_entry(entry_id, entries[0][1]) if entries else None
        if event is None:
            raise OperationFailed(f"event {entry_id} of shard {shard} is gone: run the reconciliation again")
        return event.stream


async def _archived_fees(conn: psycopg.AsyncConnection[Any], fills: set[tuple[str, str]]) -> _Fills:
    """The fees PostgreSQL's ``fills`` holds for ``fills`` (one query)."""
    pairs = sorted(fills)
    params = {"orders": [order for order, _fill in pairs], "fills": [fill for _order, fill in pairs]}
    cur = await conn.execute(_SQL["fill_fees"], params)
    return {(order, fill): (Decimal(fee), currency) for order, fill, fee, currency in await cur.fetchall()}


async def _logged_fees(store: EventStore, fills: set[tuple[str, str]]) -> _Fills:
    """The fees the shard's Redis log holds for ``fills``: one walk, stopped once every fill is
    found."""
    found: _Fills = {}
    if not fills:
        return found
    async for stored in store.iterate():
        event = stored.event
        if isinstance(event, wire.OrderFilled) and (event.stream, event.fill_id) in fills:
            found[event.stream, event.fill_id] = (Decimal(event.fee), event.fee_currency)
            if len(found) == len(fills):
                break
    return found


def _reported_fees(trades: list[VenueFill], known: dict[str, str]) -> dict[tuple[str, str], VenueFill]:
    """The venue's trades of orders the ledger holds that carry the venue's own fee (not one
    computed for it), by (order id, fill id)."""
    return {
        (order_id, trade.fill_id): trade
        for trade in trades
        if (order_id := known.get(trade.exchange_order_id or "")) is not None
        and trade.fee is not None
        and trade.fee_source is None
    }


def _fee_mismatch(
    market: str, reported: dict[tuple[str, str], VenueFill], recorded: _Fills
) -> tuple[Finding | None, str]:
    """A ``fee_mismatch`` of ``market`` when the fee the venue reports for a fill differs from
    the fee the ledger recorded for it, in amount or in currency (both named); and the figures
    compared (the drift's command id is made of them)."""
    differing = []
    for key, trade in sorted(reported.items()):
        if key not in recorded:
            continue
        fee, currency = recorded[key]
        venue_currency = trade.fee_currency.upper() if trade.fee_currency else None
        if trade.fee != fee or (venue_currency and currency and venue_currency != currency):
            differing.append(
                {
                    "order_id": key[0],
                    "fill_id": key[1],
                    "venue_fee": format_decimal(trade.fee or ZERO),
                    "venue_fee_currency": venue_currency,
                    "ledger_fee": format_decimal(fee),
                    "ledger_fee_currency": currency,
                }
            )
    if not differing:
        return None, ""
    figures = "|".join(f"{d['order_id']}:{d['fill_id']}:{d['venue_fee']}:{d['ledger_fee']}" for d in differing)
    return Finding(FEE_MISMATCH, market, market, {"fills": differing}), figures


def _trade(trade: VenueFill) -> dict[str, str | None]:
    return {
        "fill_id": trade.fill_id,
        "quantity": format_decimal(trade.quantity),
        "price": format_decimal(trade.price),
        "fee": None if trade.fee is None else format_decimal(trade.fee),
    }


__all__ = ["Finding", "Reconciler", "Reconciliation"]
