"""The live venue: orders of the exchanges configured ``live`` go to the venue through ccxt.

Like the paper venue (``consumers.paper``), it is a role that reads each shard's event log
(consumer group ``ledger-venue``, exclusive per shard through ``ledger:{s}:lease:ledger-venue``)
and answers by PUBLISHING COMMANDS to the shard's ``ledger:{s}:commands``, as a strategy
reporting an external execution would. The group starts at the end of the log (``$``): orders
placed before the venue ever ran are never sent; it runs whatever the configuration, so an
exchange switched to ``live`` later sends only what is placed from then on.

Two halves:

* The event consumer records, for each ``OrderPlaced`` of a ``live`` exchange that is still
  ``pending``, the INTENT to send it (``ledger:{s}:venue:orders``, stage ``new``), for an
  ``OrderAdopted`` (an order found at the venue, ``adopt_order``) a record at stage ``open`` with
  its venue id (never sent; followed like the rest), and, for an
  ``OrderCancelRequested``, a cancel flag (``ledger:{s}:venue:cancels``). An order that cannot be
  sent as it is (no account for its user, no market, a quantity or price off the market's
  steps, an order type the venue does not send) is rejected at once: nothing reached a venue.
* The driver (while it holds the lease, every ``poll_interval_s``) moves each order on:

  - ``new``: marked ``sending`` (with the time) BEFORE the request; then ``create_order`` with the
    client order id derived from the ledger's order id (``ledger.venues.live.venue_client_id``).
    The venue's id -> ``open`` and ``order_accepted``. A definite refusal -> ``order_rejected``
    with the venue's code and message. An ambiguous outcome (timeout, disconnect, 5xx) leaves it
    ``sending``: it is never a rejection.
  - ``sending`` (after an ambiguous outcome, or a crash between the mark and the answer): looked
    up by its client order id BEFORE anything is sent again. Found -> ``open`` and
    ``order_accepted``. Not found for ``resend_after_s`` since the mark (a venue can lag in
    listing a new order) -> ``new`` again, sent with the same client id (a venue refuses a
    second order with it: the last guard).
  - ``open``: the cancel is sent once when flagged; then the order and its trades are fetched:
    each trade not yet published -> ``record_fill`` (the venue's trade id as ``fill_id``); once
    the venue says it is final and lists trades for all it filled: ``canceled`` ->
    ``order_cancelled``, ``expired`` -> ``order_expired``, ``rejected`` -> ``order_rejected``,
    ``closed`` with less traded than the ledger's quantity (an Upbit market buy) ->
    ``order_expired`` (the rest never executes). A cancel refused because the order already
    filled changes nothing: the fetch records the fills, never ``order_cancelled``.
  - ``done``: nothing more; kept ``DONE_RETENTION_MS`` (a redelivered ``OrderPlaced`` finds it and
    sends nothing), then dropped.

Following orders: WebSocket first, polling after a disconnect. Where ccxt has ``watch_orders`` and
``watch_my_trades`` for the exchange (OKX, Binance, Upbit: ``VenueClient.watches``; not with a REST
``base_url`` override and no ``ws_url``), one ``Feed`` per (exchange, account, user-data stream) of
the process (``ledger.venues.live.STREAMS``: one for OKX and Upbit; Binance spot, USDⓈ-M and COIN-M
each their own), shared by every shard's venue with working orders of that stream on the account
(a spot-only account opens no futures stream), watches both over one socket; each
pushed trade of an ``open`` order becomes its ``record_fill``, and a pushed final status is
confirmed by one fetch of the order (its trades listed in full, so an order never ends before all
its fills are in: the same ``_follow`` as polling), both with the polling path's command ids, so a
fact seen both ways, or pushed twice, is recorded once. While an account is followed, the driver
fetches none of its open orders but the ``due`` ones: an order just accepted (pushes for it may
have come before its venue id was known) and one whose fetch failed. When the socket fails the
feed runs one polling round of the account's open orders at once, the driver polls them every
pass again, and the feed reconnects with back-off (``consumers.backoff``); once it has been up
for ``catch_up_after_s`` (or a first push came) one more polling round covers what happened
between the failure and the new subscription, and the driver stops polling the account. Trigger
orders kept apart by the venue (``Intent.algo``) and orders of markets no stream carries (``STREAMS``)
are always polled. A stream the venue refuses to open (``StreamRefused``: an API key without futures
permission) is not opened again by the process: one error line says so, and its orders are polled.
Pushes reach the ledger only through the same fenced scripts: a venue that lost its lease leaves the feed.

When ``ledger:meta`` no longer records ``live`` for an exchange (``ledger execution set`` while
this process runs with it ``live``), the venue steps aside (``consumers.guard``): the recorded
modes are read with each batch holding an order to send or adopt (in the pipeline that reads the
orders' states) and with each pass of the driver (in the pipeline of its reads, so at most once
per ``poll_interval_s`` and shard); one error line per exchange every 10 s says so. Then:

* an ``OrderPlaced`` or ``OrderAdopted`` read is skipped and acknowledged, as for an exchange
  configured otherwise: nothing is recorded, nothing is sent;
* an intent not sent yet (stage ``new``, also one going back to ``new`` to be sent again) is not
  sent: it is rejected (``order_rejected``, "not sent: okx is no longer recorded as live ..."),
  since no venue has it and a venue of the recorded mode may execute the order;
* an order sent already (stages ``sending`` and ``open``) is a real order: it stays followed (its
  lookup, cancel, fills and final status recorded) until it is final, and cancel requests still
  reach it.

Exactly once: every command id is deterministic (``venue:<order_id>:accept`` / ``:reject`` /
``:cancel`` / ``:expire``, ``venue:<order hex>:fill:<16 hex of SHA-1 of the trade id>``, built by
``ledger.venues.commands``, which reconciliation shares), so a command published twice is answered
by the handler's deduplication; each write (the record and
the commands it implies) is ONE script fenced by the lease, so a driver that outlived its lease
writes nothing.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any, Literal

import msgspec
import structlog

from consumers.backoff import poll
from consumers.deadletter import decode_events
from consumers.entries import Entry
from consumers.guard import ExecutionGuard
from consumers.paper import _FENCE, LOST
from consumers.runner import RETRYABLE, ConsumerSettings, LeaseLost, StreamConsumer
from consumers.together import run_all
from ledger.client.models import read_mark
from ledger.config import Settings
from ledger.domain import wire
from ledger.domain.enums import Exchange, OrderSide, OrderStatus, OrderType, PositionSide
from ledger.domain.state import OrderState
from ledger.domain.values import format_decimal, now_ms
from ledger.store.eventstore import ORDER_SNAPSHOT
from ledger.store.keys import ShardKeys, marks, shard_key
from ledger.store.redis_conn import text
from ledger.venues import commands
from ledger.venues.accounts import VenueConfig, live_configs, no_account
from ledger.venues.live import (
    FINAL_STATUSES,
    Ambiguous,
    Intent,
    Refused,
    StreamRefused,
    VenueClient,
    VenueClients,
    VenueFill,
    VenueOrder,
    intent,
)

GROUP = "ledger-venue"
DEFAULT_POLL_INTERVAL_S = 1.0
DEFAULT_RESEND_AFTER_S = 30.0
DEFAULT_CATCH_UP_AFTER_S = 1.0
DONE_RETENTION_MS = 86_400_000
_RELEVANT_EVENTS = {"OrderPlaced", "OrderCancelRequested", "OrderAdopted"}

log = structlog.get_logger("ledger.venue")

# KEYS: 1 lease, 2 records, 3 cancel flags, 4 commands stream.
# ARGV: 1 consumer name, 2 order id ('' = publish only), 3 record JSON, 4 mode: 'nx' (record a
# new intent; nothing is published when one is there already), 'set', or 'done' (the cancel flag
# goes too), 5.. command type and data pairs.
_SAVE = (
    _FENCE
    + """
if ARGV[2] ~= '' then
  if ARGV[4] == 'nx' then
    if redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[3]) == 0 then
      return 0
    end
  else
    redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
  end
  if ARGV[4] == 'done' then
    redis.call('HDEL', KEYS[3], ARGV[2])
  end
end
for i = 5, #ARGV, 2 do
  redis.call('XADD', KEYS[4], '*', 'type', ARGV[i], 'data', ARGV[i + 1])
end
return 1
"""
)

# KEYS: 1 lease, 2 records, 3 cancel flags. ARGV: 1 consumer name, 2 order id.
# Flags the cancel of an order the venue still works on (0: none, or done).
_FLAG_CANCEL = (
    _FENCE
    + """
local record = redis.call('HGET', KEYS[2], ARGV[2])
if not record or cjson.decode(record)['stage'] == 'done' then
  return 0
end
redis.call('HSET', KEYS[3], ARGV[2], '1')
return 1
"""
)


class VenueKeys:
    """The keys of the live venue on one shard (all on the shard's hash tag)."""

    __slots__ = ("shard", "orders", "cancels", "lease")

    def __init__(self, shard: int) -> None:
        self.shard = shard
        self.orders = shard_key(shard, "venue:orders")
        self.cancels = shard_key(shard, "venue:cancels")
        self.lease = ShardKeys(shard).lease(GROUP)


Stage = Literal["new", "sending", "open", "done"]


class LiveOrder(msgspec.Struct, kw_only=True, frozen=True):
    """What the venue knows of one order (the JSON value of ``ledger:{s}:venue:orders``)."""

    user_id: str
    exchange: Exchange
    account: str
    symbol: str  # as the strategy sent it
    side: OrderSide
    order_type: OrderType
    quantity: str  # ledger units
    price: str | None = None
    mark: str | None = None  # the mark an Upbit market buy's cost was computed with
    reduce_only: bool = False
    trigger_price: str | None = None
    position_side: PositionSide | None = None
    client_id: str
    stage: Stage = "new"
    sent_at: int | None = None  # when it was last marked ``sending``
    exchange_order_id: str | None = None
    cancel_sent: bool = False
    fills: list[str] = []  # the venue trade ids published
    updated_at: int = 0


_record_decoder = msgspec.json.Decoder(LiveOrder)


def _intent(order_id: str, record: LiveOrder) -> Intent:
    return intent(
        record.exchange,
        order_id,
        symbol=record.symbol,
        side=record.side,
        order_type=record.order_type,
        quantity=Decimal(record.quantity),
        price=None if record.price is None else Decimal(record.price),
        reduce_only=record.reduce_only,
        mark=None if record.mark is None else Decimal(record.mark),
        trigger_price=None if record.trigger_price is None else Decimal(record.trigger_price),
        position_side=record.position_side,
    )


FeedKey = tuple[Exchange, str, str]  # (exchange, account name, user-data stream: ``STREAMS``)


def _stream_key(record: LiveOrder, stream: str | None) -> FeedKey | None:
    """The feed of an order whose updates ``stream`` carries (None: none does, it is polled)."""
    return None if stream is None else (record.exchange, record.account, stream)


class Feed:
    """The WebSocket feed of one (exchange, account, stream) in this process: one watcher task,
    whatever the number of shards; each shard's venue with working orders of the stream on the
    account joins it (module doc, "Following orders")."""

    def __init__(self, client: VenueClient, stream: str, catch_up_after_s: float) -> None:
        self.client = client
        self.stream = stream
        self.key: FeedKey = (client.exchange, client.account, stream)
        self.catch_up_after_s = catch_up_after_s
        self.venues: set[LiveVenue] = set()
        self.subscribed = False  # up, and the catch-up round done: the driver polls none of its orders
        self.task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self.log = log.bind(exchange=str(client.exchange), account=client.account, stream=stream)

    def join(self, venue: LiveVenue) -> None:
        """``venue`` gets the pushes from now on; what was pushed before it joined, it polls once
        on its next pass (its orders of the account are ``stale``)."""
        self.venues.add(venue)
        venue.stale.add(self.key)
        if self.task is None or self.task.done():
            self.subscribed = False
            self._stop = asyncio.Event()
            self.task = asyncio.create_task(self._run(), name="feed-{}-{}-{}".format(*self.key))

    async def leave(self, venue: LiveVenue) -> None:
        self.venues.discard(venue)
        if not self.venues and self.task is not None:
            self._stop.set()
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task, self.subscribed = None, False
            if self.stream not in self.client.refused:  # a refused stream's line said why already
                self.log.info("websocket feed stopped: no working orders")

    async def _run(self) -> None:
        try:
            await poll(self._stop, self._follow, retry_on=(Exception,), on_retry=self._lost)
        finally:
            await self.client.unwatch(self.stream)

    async def _follow(self) -> bool:
        """Hand what the venue pushes to the venues until none is left; ``Ambiguous`` when the
        socket fails. The catch-up round runs once the socket has been up ``catch_up_after_s``
        (or a first push came)."""
        caught_up = False
        watch: asyncio.Future[list[VenueFill | VenueOrder]] | None = None
        try:
            while self.venues:
                watch = watch or asyncio.ensure_future(self.client.watch(self.stream))
                timeout = None if caught_up else self.catch_up_after_s
                done, _ = await asyncio.wait({watch}, timeout=timeout)
                if done:
                    pushed, watch = watch.result(), None
                    await self._deliver(pushed)
                if not caught_up and self.venues:
                    caught_up = True
                    await self._round("caught up after (re)connecting")
                    self.subscribed = True
            return True
        finally:
            if watch is not None:
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)

    async def _lost(self, exc: BaseException, retry_in_s: float) -> None:
        self.subscribed = False
        if isinstance(exc, StreamRefused):  # not opened again: the venues leave it on their next pass
            self.log.error(str(exc))
            self._stop.set()
            await self._round("websocket refused")
            return
        self.log.warning("websocket lost: polling, reconnecting with back-off", error=str(exc), retry_in_s=retry_in_s)
        await self._round("websocket lost")
        if not self.venues:
            self._stop.set()

    def _drop(self, venue: LiveVenue) -> None:
        """A venue that lost its lease leaves (its driver joins again once it holds it)."""
        self.venues.discard(venue)
        venue.following.discard(self.key)

    async def _round(self, why: str) -> None:
        """One polling round of every venue's open orders of the account."""
        for venue in list(self.venues):
            try:
                polled = await venue.tick(feed=self.key)
            except LeaseLost:
                self._drop(venue)
            except Exception as exc:  # that venue's driver polls the account on its next pass
                venue.stale.add(self.key)
                venue.log.error("polling round failed", error=repr(exc), why=why, **self._fields())
            else:
                venue.log.info("polling round", why=why, moved=polled, **self._fields())

    async def _deliver(self, pushed: list[VenueFill | VenueOrder]) -> None:
        for venue in list(self.venues):
            try:
                await venue.pushed(self.client, pushed)
            except LeaseLost:
                self._drop(venue)
            except Exception as exc:  # e.g. Redis unavailable: that venue polls the account instead
                venue.stale.add(self.key)
                venue.log.error("pushed updates not handled: polling them", error=repr(exc), **self._fields())

    def _fields(self) -> dict[str, str]:
        return {"exchange": str(self.key[0]), "account": self.key[1], "stream": self.stream}


class Feeds:
    """The feeds of a process, one per (exchange, account, stream), shared by its venues."""

    def __init__(self, catch_up_after_s: float = DEFAULT_CATCH_UP_AFTER_S) -> None:
        self.catch_up_after_s = catch_up_after_s
        self._feeds: dict[FeedKey, Feed] = {}

    def get(self, key: FeedKey) -> Feed | None:
        return self._feeds.get(key)

    def join(self, venue: LiveVenue, client: VenueClient, stream: str) -> None:
        key = (client.exchange, client.account, stream)
        if key not in self._feeds:
            self._feeds[key] = Feed(client, stream, self.catch_up_after_s)
        self._feeds[key].join(venue)

    async def leave(self, venue: LiveVenue, key: FeedKey) -> None:
        feed = self._feeds.get(key)
        if feed is not None:
            await feed.leave(venue)


class LiveVenue:
    """The live venue of one shard: an event consumer plus a driver (module doc)."""

    def __init__(
        self,
        redis: Any,
        shard: int,
        *,
        configs: Mapping[Exchange, VenueConfig],
        clients: VenueClients,
        execution: Mapping[Exchange, str],
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        resend_after_s: float = DEFAULT_RESEND_AFTER_S,
        consumer_settings: ConsumerSettings | None = None,
        name: str | None = None,
        feeds: Feeds | None = None,
        guard: ExecutionGuard | None = None,
    ) -> None:
        self.redis = redis
        self.shard = shard
        self.keys = ShardKeys(shard)
        self.venue_keys = VenueKeys(shard)
        self.configs = configs
        self.clients = clients
        self.guard = guard or ExecutionGuard("live", execution, log)
        self.live = frozenset(str(e) for e in self.guard.exchanges)
        self.acting: frozenset[Exchange] = frozenset()  # what the driver may send, read by its last pass
        self.poll_interval_s = poll_interval_s
        self.resend_after_ms = int(resend_after_s * 1000)
        self.consumer = StreamConsumer(
            redis,
            stream=self.keys.events,
            group=GROUP,
            handler=self.handle,
            dead_stream=self.keys.dead,
            name=name,
            settings=consumer_settings,
            start_id="$",
            lease_key=self.venue_keys.lease,
            reads=bool(self.live),
        )
        self.log = log.bind(shard=shard)
        self._invalid_marks: dict[tuple[str, str], str] = {}
        self.feeds = feeds or Feeds()
        self.following: set[FeedKey] = set()  # the feeds this venue joined
        self.stale: set[FeedKey] = set()  # feeds whose pushes were not handled: their orders polled on the next pass
        self._streams: set[FeedKey] = set()  # the streams of the working orders (last full pass)
        self._venue_ids: dict[tuple[Exchange, str], str] = {}  # (exchange, venue id) -> order id, open orders
        self._due: set[str] = set()  # open orders fetched on the next pass though followed (module doc)
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    # ----------------------------------------------------------------- running

    async def run(self, stop: asyncio.Event) -> None:
        await run_all([self.consumer.run, self._drive], stop)

    async def burst(self) -> int:
        """Handle every event available now; return how many entries were read."""
        return await self.consumer.burst()

    async def _drive(self, stop: asyncio.Event) -> None:
        every = self.poll_interval_s
        try:
            await poll(stop, self._drive_once, retry_on=(Exception,), on_retry=self._drive_failed, idle_s=every)
        finally:
            await self.follow(set())
        self.log.info("driver stopped")

    async def _drive_once(self) -> bool:
        if text(await self.redis.get(self.venue_keys.lease)) == self.consumer.name:
            await self.tick()
            await self.follow(self._streams)
        else:
            await self.follow(set())
        return False

    async def follow(self, streams: set[FeedKey]) -> None:
        """Join the feeds of ``streams`` whose venue pushes orders (``VenueClient.watches``) and did
        not refuse the stream, and leave the others."""
        wanted = set()
        for key in streams:
            exchange, account, stream = key
            client = self._client(exchange, account)
            if client is not None and client.watches and stream not in client.refused:
                wanted.add(key)
                if key not in self.following:
                    self.feeds.join(self, client, stream)
                    self.following.add(key)
                    self.log.info(
                        "following orders over websocket", exchange=str(exchange), account=account, stream=stream
                    )
        for key in self.following - wanted:
            self.following.discard(key)
            await self.feeds.leave(self, key)

    def _followed(self, key: FeedKey | None) -> bool:
        """Whether pushes follow the orders of the feed ``key`` now (else the driver polls them)."""
        feed = self.feeds.get(key) if key is not None and key in self.following else None
        return feed is not None and feed.subscribed and key not in self.stale

    def _feed_key(self, order_id: str, record: LiveOrder) -> FeedKey | None:
        """The feed carrying this order's updates (None: it is polled, ``VenueClient.stream``)."""
        client = self._client(record.exchange, record.account)
        try:
            return None if client is None else _stream_key(record, client.stream(_intent(order_id, record)))
        except Refused:  # the markets changed since the intent was recorded: ``_step`` says so
            return None

    async def _drive_failed(self, exc: BaseException, retry_in_s: float) -> None:
        if isinstance(exc, RETRYABLE):
            self.log.warning("driver: a server is unavailable, retrying", error=str(exc), retry_in_s=retry_in_s)
        else:
            self.log.error("driver tick failed", error=repr(exc), retry_in_s=retry_in_s)

    # ----------------------------------------------------------------- events

    async def handle(self, entries: list[Entry]) -> None:
        """Record intents and cancel flags (idempotent: delivery is at least once)."""
        decoded = await decode_events(
            self.redis,
            entries,
            stream=self.keys.events,
            dead_stream=self.keys.dead,
            group=GROUP,
            log=self.log,
            types=_RELEVANT_EVENTS,
        )
        events = [event for _entry_id, event in decoded if str(event.exchange) in self.live]
        placed = [e for e in events if isinstance(e, wire.OrderPlaced)]
        states, acting = await self._placed_reads([e.stream for e in placed])
        events = [e for e in events if not isinstance(e, wire.OrderPlaced) or e.exchange in acting]
        for event in events:
            if isinstance(event, wire.OrderAdopted):
                await self._adopted(event, states.get(event.stream))
            elif isinstance(event, wire.OrderPlaced):
                await self._placed(event, states.get(event.stream))
            elif isinstance(event, wire.OrderCancelRequested):
                flagged = await self._eval(
                    _FLAG_CANCEL, 3, self.venue_keys.orders, self.venue_keys.cancels, event.stream
                )
                self.log.info(
                    "cancel requested" if flagged else "cancel request for an order the venue no longer works on",
                    order_id=event.stream,
                    user_id=event.user_id,
                    event_id=event.event_id,
                )

    async def _placed(self, event: wire.OrderPlaced, state: OrderState | None) -> None:
        order_id = event.stream
        fields = {"order_id": order_id, "user_id": event.user_id, "exchange": str(event.exchange)}
        if state is not None and state.status is not OrderStatus.PENDING:
            self.log.debug("order no longer pending, nothing to send", status=str(state.status), **fields)
            return
        config = self.configs.get(event.exchange)
        account = config.account_for(event.user_id) if config is not None else None
        if account is None:
            await self._reject(order_id, event.user_id, no_account(event.user_id, event.exchange), None)
            return
        mark = await self._mark(event) if event.order_type is OrderType.MARKET and event.price is None else None
        record = self._new_record(
            event,
            account.name,
            mark=None if mark is None else format_decimal(mark),
            # A net (one-way) account takes no position side: the side stays the ledger's alone.
            position_side=event.position_side if account.hedge else None,
            client_id="",
        )
        try:
            order = _intent(order_id, record)
        except Refused as exc:
            await self._reject(order_id, event.user_id, str(exc), None)
            return
        record = msgspec.structs.replace(record, client_id=order.client_id)
        if await self._save(order_id, record, mode="nx"):
            self.log.info("intent to send recorded", client_id=order.client_id, account=account.name, **fields)

    @staticmethod
    def _new_record(event: wire.OrderPlaced, account: str, **venue: Any) -> LiveOrder:
        """The venue record of a placed or adopted order: the order as its event has it, and
        ``venue``, what the venue role adds (the position side it sends, the client id, ...)."""
        return LiveOrder(
            user_id=event.user_id,
            exchange=event.exchange,
            account=account,
            symbol=event.symbol,
            side=event.side,
            order_type=event.order_type,
            quantity=event.quantity,
            price=event.price,
            reduce_only=event.reduce_only,
            trigger_price=event.trigger_price,
            updated_at=now_ms(),
            **venue,
        )

    async def _adopted(self, event: wire.OrderAdopted, state: OrderState | None) -> None:
        """An adopted order is at the venue already: it is never sent, but recorded ``open`` with
        its venue id, so the driver follows it like one it sent (fills, a cancel, the final
        status). One the driver could not follow (no account, a type or market it does not send)
        is left to reconciliation."""
        order_id = event.stream
        fields = {"order_id": order_id, "user_id": event.user_id, "exchange": str(event.exchange)}
        if state is not None and state.status.is_final:
            return
        config = self.configs.get(event.exchange)
        account = config.account_for(event.user_id) if config is not None else None
        record = self._new_record(
            event,
            "" if account is None else account.name,
            position_side=event.position_side,
            client_id=event.client_order_id or "",
            stage="open",
            exchange_order_id=event.exchange_order_id,
        )
        reason = no_account(event.user_id, event.exchange) if account is None else None
        try:
            _intent(order_id, record)
        except Refused as exc:
            reason = reason or str(exc)
        if reason is not None:
            self.log.info("adopted order not followed: reconciliation records its fills", reason=reason, **fields)
            return
        if await self._save(order_id, record, mode="nx"):
            self._open(order_id, event.exchange, event.exchange_order_id)
            self.log.info("adopted order followed", exchange_order_id=event.exchange_order_id, **fields)

    async def _mark(self, event: wire.OrderPlaced) -> Decimal | None:
        raw = await self.redis.hget(marks(event.exchange), event.symbol)
        return read_mark(raw, event.exchange, event.symbol, self._invalid_marks)

    # ----------------------------------------------------------------- the driver

    async def tick(self, feed: FeedKey | None = None) -> int:
        """One pass of the driver over every order the venue works on; how many moved. With
        ``feed``: a polling round of the open orders that feed carries only, each fetched."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.venue_keys.orders)
        pipe.hkeys(self.venue_keys.cancels)
        if self.guard.exchanges:
            self.guard.read(pipe)
        raw, cancel_ids, *modes = await pipe.execute()
        cancels = {text(k) for k in cancel_ids}
        if modes:
            self.acting = self.guard.acting(modes[0])
        working: list[tuple[str, LiveOrder]] = []
        expired: list[str] = []
        now = now_ms()
        for key, value in raw.items():
            order_id, record = text(key), _record_decoder.decode(value)
            if record.stage != "done":
                working.append((order_id, record))
            elif now - record.updated_at > DONE_RETENTION_MS:
                expired.append(order_id)
        streams = {order_id: self._feed_key(order_id, record) for order_id, record in working}
        if feed is not None:
            working = [(o, r) for o, r in working if streams[o] == feed and r.stage == "open"]
        else:
            if expired:
                await self.redis.hdel(self.venue_keys.orders, *expired)
            self._streams = {key for key in streams.values() if key is not None}
            self._venue_ids = {
                (r.exchange, r.exchange_order_id): o for o, r in working if r.stage == "open" and r.exchange_order_id
            }
        stale = set(self.stale) if feed is None else set()  # polled in this pass, then cleared
        results = await asyncio.gather(
            *(
                self._advance(oid, rec, oid in cancels, feed is not None or streams[oid] in stale)
                for oid, rec in working
            ),
            return_exceptions=True,
        )
        moved = 0
        for (order_id, _record), result in zip(working, results, strict=True):
            if isinstance(result, LeaseLost):
                self.log.warning("driver: lease lost mid-tick, left to the new holder", error=str(result))
                return moved
            if isinstance(result, BaseException):
                if isinstance(result, RETRYABLE):
                    raise result
                self.log.error("driver: order not moved", order_id=order_id, error=repr(result))
            else:
                moved += result
        self.stale -= stale
        return moved

    def _client(self, exchange: Exchange, account: str) -> VenueClient | None:
        config = self.configs.get(exchange)
        found = config.accounts.get(account) if config is not None else None
        return None if found is None else self.clients.get(found)

    def _lock(self, order_id: str) -> asyncio.Lock:
        """The lock of one order: the driver, a polling round and pushes move it one at a time."""
        lock = self._locks.get(order_id)
        if lock is None:
            lock = self._locks[order_id] = asyncio.Lock()
        return lock

    async def _record(self, order_id: str) -> LiveOrder | None:
        raw = await self.redis.hget(self.venue_keys.orders, order_id)
        return None if raw is None else _record_decoder.decode(raw)

    async def _advance(self, order_id: str, record: LiveOrder, cancel: bool, poll: bool = False) -> int:
        """Move one order on (``poll``: fetch it even if pushes follow it); under the order's lock,
        from its record as it is now (a push may have moved it since the pass read it)."""
        if not poll and self._quiet(order_id, record, cancel):
            return 0
        async with self._lock(order_id):
            fresh = await self._record(order_id)
            if fresh is None or fresh.stage == "done" or fresh.stage != record.stage:
                return 0
            return await self._step(order_id, fresh, cancel, poll)

    def _quiet(self, order_id: str, record: LiveOrder, cancel: bool) -> bool:
        """An open order that pushes follow, with no cancel to send and not due: nothing to do."""
        if record.stage != "open" or (cancel and not record.cancel_sent) or order_id in self._due:
            return False
        return self._followed(self._feed_key(order_id, record))

    async def _step(self, order_id: str, record: LiveOrder, cancel: bool, poll: bool) -> int:
        fields = {
            "order_id": order_id,
            "user_id": record.user_id,
            "exchange": str(record.exchange),
            "account": record.account,
            "client_id": record.client_id,
        }
        client = self._client(record.exchange, record.account)
        if client is None:
            self.log.error("the order's account is no longer configured: add it back to LEDGER_CREDENTIALS", **fields)
            return 0
        try:
            order = _intent(order_id, record)
        except Refused as exc:  # the markets changed since the intent was recorded
            if record.stage == "new":
                await self._reject(order_id, record.user_id, str(exc), record)
                return 1
            self.log.error("the order's market no longer resolves: it is left alone", error=str(exc), **fields)
            return 0
        if record.stage == "new":
            return await self._send(order_id, record, order, client, cancel, fields)
        if record.stage == "sending":
            return await self._find(order_id, record, order, client, cancel, fields)
        fetch = poll or order_id in self._due or not self._followed(_stream_key(record, client.stream(order)))
        return await self._follow(order_id, record, order, client, cancel, fields, fetch=fetch)

    async def _send(
        self, order_id: str, record: LiveOrder, order: Intent, client: VenueClient, cancel: bool, fields: dict[str, Any]
    ) -> int:
        if cancel:
            await self._finish(order_id, record, commands.cancelled(order_id, record.user_id))
            self.log.info("cancelled before it was sent: nothing sent", **fields)
            return 1
        if record.exchange not in self.acting:
            reason = (
                f"not sent: {record.exchange} is no longer recorded as live (ledger execution set) and no venue "
                "has this order: place it again"
            )
            await self._reject(order_id, record.user_id, reason, record)
            return 1
        record = msgspec.structs.replace(record, stage="sending", sent_at=now_ms(), updated_at=now_ms())
        await self._save(order_id, record, mode="set")
        self.log.info("sending order", amount=format_decimal(order.amount), market=order.market.symbol, **fields)
        try:
            venue_id = await client.create(order)
        except Refused as exc:
            await self._reject(order_id, record.user_id, str(exc), record)
            return 1
        except Ambiguous as exc:
            self.log.warning(
                "order outcome unknown: it stays pending until a lookup resolves it", error=str(exc), **fields
            )
            return 1
        await self._opened(order_id, record, venue_id, fields)
        return 1

    async def _find(
        self, order_id: str, record: LiveOrder, order: Intent, client: VenueClient, cancel: bool, fields: dict[str, Any]
    ) -> int:
        try:
            venue_id = await client.lookup(record.client_id, order.market, algo=order.algo)
        except Ambiguous as exc:
            self.log.warning("lookup by client id failed: retrying", error=str(exc), **fields)
            return 0
        if venue_id is not None:
            self.log.info("found at the venue by its client id", exchange_order_id=venue_id, **fields)
            await self._opened(order_id, record, venue_id, fields)
            return 1
        if now_ms() - (record.sent_at or 0) < self.resend_after_ms:
            return 0
        if cancel:
            await self._finish(order_id, record, commands.cancelled(order_id, record.user_id))
            self.log.info("not at the venue and cancelled: nothing sent", **fields)
            return 1
        self.log.warning("not at the venue: sending it again with the same client id", **fields)
        await self._save(order_id, msgspec.structs.replace(record, stage="new", updated_at=now_ms()), mode="set")
        return 1

    async def _opened(self, order_id: str, record: LiveOrder, venue_id: str, fields: dict[str, Any]) -> None:
        record = msgspec.structs.replace(record, stage="open", exchange_order_id=venue_id, updated_at=now_ms())
        accept = commands.accepted(order_id, record.user_id, venue_id)
        await self._save(order_id, record, accept, mode="set")
        self._open(order_id, record.exchange, venue_id)
        self.log.info("order accepted by the venue", exchange_order_id=venue_id, command_id=accept.command_id, **fields)

    def _open(self, order_id: str, exchange: Exchange, venue_id: str) -> None:
        """An order now open at the venue: pushes about ``venue_id`` are its own; fetched once on
        the next pass (what was pushed before its venue id was known did not reach it)."""
        self._venue_ids[(exchange, venue_id)] = order_id
        self._due.add(order_id)

    async def pushed(self, client: VenueClient, updates: list[VenueFill | VenueOrder]) -> None:
        """What the venue pushed, in order, for the open orders of this shard (another shard's, or
        an order the ledger does not follow, is left to that shard, or to reconciliation)."""
        for update in updates:
            if isinstance(update, VenueFill):
                await self._pushed_fill(client, update)
            else:
                await self._pushed_order(client, update)

    async def _pushed_fill(self, client: VenueClient, fill: VenueFill) -> None:
        """A pushed trade becomes its order's ``record_fill`` (one it has already is absorbed)."""
        order_id = self._venue_ids.get((client.exchange, fill.exchange_order_id or ""))
        if order_id is not None:
            async with self._lock(order_id):
                record = await self._record(order_id)
                if record is None or record.stage != "open" or fill.fill_id in record.fills:
                    return
                fields = {"order_id": order_id, "user_id": record.user_id, "exchange": str(record.exchange)}
                command = self._fill(order_id, record, fill, {**fields, "exchange_order_id": fill.exchange_order_id})
                record = msgspec.structs.replace(record, fills=[*record.fills, fill.fill_id], updated_at=now_ms())
                await self._save(order_id, record, command, mode="set")

    async def _pushed_order(self, client: VenueClient, report: VenueOrder) -> None:
        """A pushed final status is confirmed by one fetch of the order (module doc); any other
        changes nothing (its trades carry its fills)."""
        order_id = self._venue_ids.get((client.exchange, report.exchange_order_id))
        if order_id is None or report.status not in FINAL_STATUSES:
            return
        async with self._lock(order_id):
            record = await self._record(order_id)
            if record is None or record.stage != "open":
                return
            await self._step(order_id, record, False, True)
            record = await self._record(order_id)
        if record is not None and record.stage == "open":  # the fetch lags the push: fetched again
            self._due.add(order_id)

    async def _follow(
        self,
        order_id: str,
        record: LiveOrder,
        order: Intent,
        client: VenueClient,
        cancel: bool,
        fields: dict[str, Any],
        *,
        fetch: bool = True,
    ) -> int:
        venue_id = record.exchange_order_id or ""
        fields = {**fields, "exchange_order_id": venue_id}
        if cancel and not record.cancel_sent:
            try:
                refusal = await client.cancel(venue_id, order.market, algo=order.algo)
            except Ambiguous as exc:
                self.log.warning("cancel unanswered: retrying", error=str(exc), **fields)
                return 0
            record = msgspec.structs.replace(record, cancel_sent=True, updated_at=now_ms())
            await self._save(order_id, record, mode="set")
            if refusal is None:
                self.log.info("cancel sent", **fields)
            else:
                self.log.info("cancel refused: the venue's status decides", reason=refusal, **fields)
        if not fetch:
            return 0
        try:
            report = await client.fetch(venue_id, order.market, algo=order.algo)
        except Ambiguous as exc:
            self.log.warning("status unknown: retrying", error=str(exc), **fields)
            self._due.add(order_id)
            return 0
        self._due.discard(order_id)
        fills: list[wire.Command] = [
            self._fill(order_id, record, fill, fields) for fill in report.fills if fill.fill_id not in record.fills
        ]
        final, last = commands.final(order_id, record.user_id, record.exchange, Decimal(record.quantity), report)
        if not fills and not final:
            return 0
        record = msgspec.structs.replace(
            record, fills=[*record.fills, *(f.fill_id for f in report.fills if f.fill_id not in record.fills)]
        )
        if not final:
            await self._save(order_id, msgspec.structs.replace(record, updated_at=now_ms()), *fills, mode="set")
            return 1
        await self._finish(order_id, record, *fills, *([last] if last is not None else []))
        self.log.info(
            "order final at the venue",
            status=report.status,
            command_id=None if last is None else last.command_id,
            **fields,
        )
        return 1

    def _fill(self, order_id: str, record: LiveOrder, fill: VenueFill, fields: dict[str, Any]) -> wire.RecordFill:
        command = commands.fill(order_id, record.user_id, fill)
        self.log.info(
            "fill",
            fill_id=fill.fill_id,
            quantity=command.quantity,
            price=command.price,
            fee=command.fee,
            command_id=command.command_id,
            **fields,
        )
        return command

    # ----------------------------------------------------------------- writes

    async def _reject(self, order_id: str, user_id: str, reason: str, record: LiveOrder | None) -> None:
        reject = commands.rejected(order_id, user_id, reason)
        if record is None:
            await self._publish(reject)
        else:
            await self._finish(order_id, record, reject)
        self.log.info("order rejected", reason=reason, order_id=order_id, user_id=user_id, command_id=reject.command_id)

    async def _finish(self, order_id: str, record: LiveOrder, *commands: wire.Command) -> None:
        await self._save(
            order_id, msgspec.structs.replace(record, stage="done", updated_at=now_ms()), *commands, mode="done"
        )

    async def _publish(self, *commands: wire.Command) -> None:
        await self._save("", None, *commands, mode="set")

    async def _save(self, order_id: str, record: LiveOrder | None, *commands: wire.Command, mode: str) -> bool:
        data = b"" if record is None else msgspec.json.encode(record)
        args = [item for command in commands for item in wire.command_fields(command).values()]
        keys = self.venue_keys
        return bool(
            await self._eval(_SAVE, 4, keys.orders, keys.cancels, self.keys.commands, order_id, data, mode, *args)
        )

    async def _eval(self, script: str, numkeys: int, *args: Any) -> int:
        """Run a fenced script (KEYS[1] is the lease, ARGV[1] this consumer); ``LeaseLost`` when
        the lease names another consumer."""
        keys, argv = args[: numkeys - 1], args[numkeys - 1 :]
        result = int(await self.redis.eval(script, numkeys, self.venue_keys.lease, *keys, self.consumer.name, *argv))
        if result == LOST:
            raise LeaseLost(f"{self.venue_keys.lease} no longer names {self.consumer.name!r}: nothing written")
        return result

    # ----------------------------------------------------------------- reads

    async def _placed_reads(self, order_ids: Sequence[str]) -> tuple[dict[str, OrderState], frozenset[Exchange]]:
        """The states of placed (or adopted) orders and the exchanges the venue acts on now (their
        recorded mode still ``live``: ``consumers.guard``), in one pipeline."""
        ids = sorted(set(order_ids))
        if not ids:
            return {}, frozenset()
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(self.keys.orders, ids)
        self.guard.read(pipe)
        values, modes = await pipe.execute()
        states = {oid: ORDER_SNAPSHOT.decode(raw) for oid, raw in zip(ids, values, strict=True) if raw}
        return states, self.guard.acting(modes)

    async def working(self) -> dict[str, LiveOrder]:
        """Every order record of this shard, by order id (for tools and tests)."""
        raw = await self.redis.hgetall(self.venue_keys.orders)
        return {text(k): _record_decoder.decode(v) for k, v in raw.items()}


# --------------------------------------------------------------------------- the role


class VenueRole:
    """The live venues of every shard and the ccxt clients they share (closed when they stop)."""

    def __init__(self, venues: list[LiveVenue], clients: VenueClients) -> None:
        self.venues = venues
        self.clients = clients

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await run_all([venue.run for venue in self.venues], stop)
        finally:
            await self.clients.close()


async def venue_role(redis: Any, settings: Settings) -> list[Any]:
    """``ledger serve`` role ``venue``: the live venue of every shard. It runs even when no
    exchange is ``live``, keeping its place in the log without reading it (module doc;
    ``consumers.runner``, ``reads``)."""
    configs = live_configs(settings.execution, settings.credentials)
    clients = VenueClients({exchange: config.options for exchange, config in configs.items()})
    consumer_settings = ConsumerSettings.from_settings(settings)
    feeds = Feeds()
    guard = ExecutionGuard("live", settings.execution, log)
    venues = [
        LiveVenue(
            redis,
            shard,
            configs=configs,
            clients=clients,
            execution=settings.execution,
            consumer_settings=consumer_settings,
            feeds=feeds,
            guard=guard,
        )
        for shard in range(settings.shards)
    ]
    return [VenueRole(venues, clients)]


__all__ = [
    "GROUP",
    "Feed",
    "Feeds",
    "LiveOrder",
    "LiveVenue",
    "VenueKeys",
    "VenueRole",
    "venue_role",
]
