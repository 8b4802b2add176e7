"""The ``ledger`` command line (CONTRACT §11)."""

from __future__ import annotations

import argparse
import asyncio
import functools
import inspect
import json
import math
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import psycopg
import redis.exceptions

from ledger.app import servers
from ledger.app.console import (
    NO_LEDGER,
    ORDER_COLUMNS,
    CliError,
    UsageError,
    position_rows,
    print_table,
    shard_count,
)
from ledger.app.export import FORMATS
from ledger.app.logs import configure_logging
from ledger.client import history
from ledger.client.queries import marks, order_hashes, position_hashes
from ledger.config import PROCESS_MODES, ServerNotConfigured, Settings, parse_execution, whole_number
from ledger.defaults import BLOCK_MS, REPLY_WAIT_S
from ledger.domain import wire
from ledger.domain.enums import Exchange, OrderStatus
from ledger.domain.ids import new_command_id
from ledger.domain.values import check_identifier, format_decimal, parse_decimal
from ledger.errors import InvalidInput, LedgerError
from ledger.store import keys
from ledger.store.chain import parse_expect
from ledger.store.keys import ShardKeys, shard_of
from ledger.store.redis_conn import CONNECT_TIMEOUT_S, connect, final_order_ttl, recorded_shards, text
from projections.projector import open_gaps

if TYPE_CHECKING:
    from projections.verify import Report, VenueReport

T = TypeVar("T")
VerifyReport = TypeVar("VerifyReport", "Report", "VenueReport")

EXIT_FAILURE = 1  # the ledger or a server could not do what was asked
EXIT_USAGE = 2  # the command line or a setting is wrong (argparse's own status)
HISTORY_MAX_LIMIT = history.MAX_LIMIT
LAG_PAGE = 1000


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env().with_overrides(
        redis_url=getattr(args, "redis_url", None),
        database_url=getattr(args, "database_url", None),
        shards=getattr(args, "shards", None),
    )


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


# --------------------------------------------------------------------------- commands


def cmd_serve(args: argparse.Namespace) -> int:
    from ledger.app.processes import serve_command
    from ledger.app.service import ROLES

    settings = _settings(args).with_overrides(processes=args.processes, reconcile_s=args.reconcile_s)
    configure_logging(settings.log_format, settings.log_level)
    roles = args.role or list(ROLES)
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise UsageError(f"--role: unknown role {unknown[0]!r}: use one of {', '.join(ROLES)}")
    return serve_command(settings, roles)


async def _client(settings: Settings) -> Any:
    from ledger.app.service import redis_url

    return await connect(redis_url(settings, start=False))


def _command_data(text_: str) -> dict[str, Any]:
    """``--data``: a JSON object whose ``user_id`` and ``command_id`` (generated when absent)
    can name the reply key; every other field is the ledger's to judge."""
    try:
        data = json.loads(text_)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise UsageError(f"--data: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UsageError("--data: must be a JSON object")
    data.setdefault("command_id", new_command_id("cli"))
    for name in ("user_id", "command_id"):
        try:
            check_identifier(name, data.get(name))
        except ValueError as exc:
            raise UsageError(f"--data: {exc}") from None
    return data


def _command(type_name: str, data: dict[str, Any]) -> wire.Command:
    """``submit``'s command, checked by the handler's own wire rules: one it would dead-letter is
    refused here (nothing is published)."""
    try:
        return wire.decode_command({"type": type_name, "data": wire.encode(data)})
    except wire.WireError as exc:
        raise UsageError(f"--data: {exc.message} ({exc.code}): fix the command; nothing was published") from None


async def _submit(args: argparse.Namespace) -> int:
    command = _command(args.type, _command_data(args.data))
    settings = _settings(args)
    redis = await _client(settings)
    try:
        recorded = await recorded_shards(redis)
        shards = settings.shards if recorded is None else recorded  # the count `serve` is about to record
        shard_keys = ShardKeys(shard_of(command.user_id, shards))
        reply_key = shard_keys.reply(command.user_id, command.command_id)
        await redis.xadd(shard_keys.commands, wire.command_fields(command))
        reply = await _await_reply(redis, reply_key, args.wait)
    finally:
        await redis.aclose()
    if reply is None:
        raise CliError(
            f"no reply within {args.wait:g} s (command_id {command.command_id}): check that `ledger serve` runs, "
            "then submit again with the same command_id (it is answered once)"
        )
    _print_json(reply)
    return 0 if reply["status"] == "accepted" else EXIT_FAILURE


async def _await_reply(redis: Any, reply_key: str, wait_s: float) -> dict[str, Any] | None:
    """Take a command's reply from its list (BLPOP), waiting up to ``wait_s``; None if none came."""
    answer = None
    deadline = time.monotonic() + wait_s
    while answer is None and (left := deadline - time.monotonic()) > 0:
        # BLPOP BLOCK_MS at a time: a long --wait never meets the client's socket timeout
        answer = await redis.blpop([reply_key], timeout=max(0.01, min(BLOCK_MS / 1000, left)))
    return None if answer is None else json.loads(text(answer[1]))  # type: ignore[no-any-return]


async def _archive(settings: Settings) -> psycopg.AsyncConnection[Any]:
    """An autocommit connection to the ledger's PostgreSQL: the configured one, else the private
    one ``serve`` started (never started here)."""
    from ledger.app.service import database_url

    url = database_url(settings, start=False)
    return await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=int(CONNECT_TIMEOUT_S))


async def _status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    redis = await _client(settings)
    try:
        shards = await recorded_shards(redis)
        rows: list[dict[str, Any]] = []
        for shard in range(shards or 0):
            rows += await _shard_status(redis, ShardKeys(shard))
    finally:
        await redis.aclose()
    gaps = await _history_gaps(settings)
    if args.json:
        _print_json({"shards": shards, "streams": rows, "history_gaps": gaps})
    elif shards is None:
        print(NO_LEDGER)
    else:
        print(f"shards: {shards}")
        print_table(rows, ["shard", "stream", "length", "group", "consumers", "pending", "lag"])
        print(_gaps_line(gaps))
    return 0


async def _history_gaps(settings: Settings) -> dict[str, Any]:
    """The PostgreSQL history's open gaps per shard (events it could not write), or why they are
    unknown: ``status`` reports on Redis whether or not PostgreSQL answers."""

    try:
        async with await _archive(settings) as conn:
            found = await open_gaps(conn)
    except (psycopg.Error, servers.ServerError, ServerNotConfigured) as exc:
        return {"available": False, "reason": str(exc).strip().splitlines()[0]}
    shards = {str(shard): {"open": count, "first_entry_id": first} for shard, (count, first) in sorted(found.items())}
    return {"available": True, "shards": shards}


def _gaps_line(gaps: dict[str, Any]) -> str:
    if not gaps["available"]:
        return f"history gaps: unknown (PostgreSQL: {gaps['reason']})"
    if not gaps["shards"]:
        return "history gaps: none"
    listed = ", ".join(f"shard {s}: {g['open']} from {g['first_entry_id']}" for s, g in gaps["shards"].items())
    return f"history gaps: {listed} (see the projector's dead letters in ledger:{{s}}:dead)"


async def _shard_status(redis: Any, keys: ShardKeys) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name, stream in (("commands", keys.commands), ("events", keys.events), ("dead", keys.dead)):
        length = await redis.xlen(stream)
        groups = await redis.xinfo_groups(stream) if length or await redis.exists(stream) else []
        base = {"shard": keys.shard, "stream": name, "length": length}
        if not groups:
            rows.append(base)
        for group in groups:
            rows.append(
                {
                    **base,
                    "group": group["name"],
                    "consumers": group["consumers"],
                    "pending": group["pending"],
                    "lag": await group_lag(redis, stream, text(group["last-delivered-id"])),
                }
            )
    return rows


async def group_lag(redis: Any, stream: str, last_delivered_id: str) -> int:
    """The entries of ``stream`` after a group's last-delivered-id, counted from the ids.

    Redis's own ``lag`` (entries-added minus entries-read) is null after an AOF reload or a
    deletion and can be wrong after a trim, so it is never used. The count walks from both ends
    a page at a time and stops at the first that runs out: the entries after the id, or the
    stream's length minus the entries up to it, whichever are fewer to read.
    """
    length = await redis.xlen(stream)
    after, up_to = 0, 0
    after_from, up_to_till = f"({last_delivered_id}", last_delivered_id
    while True:
        page = await redis.xrange(stream, min=after_from, max="+", count=LAG_PAGE)
        after += len(page)
        if len(page) < LAG_PAGE:
            return after
        after_from = f"({text(page[-1][0])}"
        page = await redis.xrevrange(stream, max=up_to_till, min="-", count=LAG_PAGE)
        up_to += len(page)
        if len(page) < LAG_PAGE:
            return max(0, length - up_to)
        up_to_till = f"({text(page[-1][0])}"


async def _positions(args: argparse.Namespace) -> int:
    redis = await _client(_settings(args))
    try:
        hashes = await position_hashes(redis, args.user, args.exchange, args.symbol)
        prices: dict[tuple[str, str], Decimal] = {}
        for exchange in {h["exchange"] for h in hashes}:
            symbols = sorted({h["symbol"] for h in hashes if h["exchange"] == exchange})
            prices.update({(exchange, s): p for s, p in (await marks(redis, exchange, symbols)).items()})
    finally:
        await redis.aclose()
    rows = position_rows(hashes, prices)
    if args.json:
        _print_json(rows)
    else:
        columns = ["id", "user_id", "exchange", "symbol", "side", "size", "entry_price", "leverage", "realized_pnl"]
        print_table(rows, columns + ["mark", "unrealized_pnl", "pnl_percentage"], "no open positions")
    return 0


async def _orders(args: argparse.Namespace) -> int:
    redis = await _client(_settings(args))
    try:
        hashes = await order_hashes(redis, args.user, args.exchange, args.status, args.symbol)
    finally:
        await redis.aclose()
    rows = [{name: fields.get(name, "") for name in ORDER_COLUMNS} for fields in hashes]
    if args.json:
        _print_json(rows)
    else:
        columns = [
            "id",
            "exchange",
            "symbol",
            "side",
            "order_type",
            "quantity",
            "price",
            "filled_qty",
            "avg_fill_price",
        ]
        print_table(rows, columns + ["status", "grid_level"], "no orders")
    return 0


async def _mark(args: argparse.Namespace) -> int:
    exchange, price = Exchange(args.exchange), format_decimal(args.price)
    redis = await _client(_settings(args))
    try:
        await redis.hset(keys.marks(exchange), args.symbol, price)
    finally:
        await redis.aclose()
    print(f"marks:{exchange} {args.symbol} = {price}")
    return 0


async def _history(args: argparse.Namespace) -> int:

    if args.id is not None:
        if args.user or args.exchange or args.symbol:
            raise UsageError("history: give an order or position ID, or --user U (with filters), not both")
        return await _history_trail(args)
    if args.user is None:
        raise UsageError("history: give an order or position ID, or --user U")
    async with await _archive(_settings(args)) as conn:
        positions = await history.closed_positions(conn, args.user, args.exchange, args.symbol, limit=args.limit)
        orders = await history.final_orders(conn, args.user, args.exchange, limit=args.limit)
    if args.json:
        _print_json({"positions": positions, "orders": orders})
        return 0
    print("closed positions")
    columns = [
        "id",
        "exchange",
        "symbol",
        "side",
        "size",
        "entry_price",
        "exit_price",
        "realized_pnl",
        "fees",
        "status",
    ]
    print_table(positions, columns + ["closed_at"], "  none")
    print("\nfinal orders")
    columns = ["id", "exchange", "symbol", "side", "order_type", "quantity", "price", "filled_qty", "status"]
    print_table(orders, columns + ["updated_at"], "  none")
    return 0


async def _history_trail(args: argparse.Namespace) -> int:
    from ledger.app.audit_trail import read_trail

    settings = _settings(args)
    redis = await _client(settings)
    try:
        trail = await read_trail(redis, settings, args.id)
    finally:
        await redis.aclose()
    if args.json:
        _print_json(trail.as_dict())
    else:
        print(trail.heading())
        print_table(*trail.rows())
    return 0


async def _replay(args: argparse.Namespace) -> int:
    from ledger.app.replay import ORDER_TABLE, POSITION_TABLE, Selection, replay
    from ledger.store.log import open_archive

    settings = _settings(args)
    redis = await _client(settings)
    try:
        selection = Selection(args.user, args.exchange, args.symbol)
        async with open_archive(settings) as (conn, archive):
            result = await replay(redis, conn, until=args.until, selection=selection, no_archive=archive)
    finally:
        await redis.aclose()
    if args.json:
        print(result.json())
        return 0
    print(result.heading())
    print_table(result.positions, POSITION_TABLE, "no positions")
    print_table(result.orders, ORDER_TABLE, "no orders")
    return 0


async def _dead(args: argparse.Namespace) -> int:
    from ledger.app import dead
    from ledger.store.operations import operations

    redis = await _client(_settings(args))
    try:
        if args.action == "ops":
            result: Any = [op.as_dict() for op in await operations(redis, args.limit)]
            return _print_listing(args, result, ["id", "time", "actor", "action", "target", "reason"], "no operations")
        shards = await dead.shards_of(redis, args.shard)
        if args.action == "list":
            letters, total = await dead.dead_letters(redis, shards, args.limit)
            rows = [letter.summary() if args.json else letter.terminal_row() for letter in letters]
            columns = ["shard", "id", "time", "kind", "type", "code", "reason", "stream", "group", "entry_id"]
            _print_listing(args, rows, columns, "no dead letters")
            if not args.json and len(rows) < total:
                print(f"({len(rows)} of {total} shown: raise --limit)")
            return 0
        letter = await dead.find(redis, shards, args.id)
        if args.action == "show":
            _print_json(letter.as_dict())
            return 0
        if args.action == "drop":
            _print_json(await dead.drop(redis, letter, args.note))
            return 0
        return await _dead_retry(redis, letter, args)
    finally:
        await redis.aclose()


async def _dead_retry(redis: Any, letter: Any, args: argparse.Namespace) -> int:
    """Retry a dead letter; print the operation and, for a command, its reply once it comes."""
    from ledger.app import dead

    data = None if args.data is None else _command_data(args.data)
    operation = await dead.retry(redis, letter, args.note, type_name=args.type, data=data)
    published = operation["detail"].get("published")
    if published is None or published["reply_key"] is None:
        _print_json({"operation": operation})
        return 0
    reply = await _await_reply(redis, published["reply_key"], args.wait)
    if reply is None:
        raise CliError(
            f"no reply within {args.wait:g} s on {published['reply_key']}: check that `ledger serve` runs; "
            f"the command is published again as entry {published['entry_id']} (operation {operation['id']})"
        )
    _print_json({"operation": operation, "reply": reply})
    return 0 if reply["status"] == "accepted" else EXIT_FAILURE


async def _verify(args: argparse.Namespace) -> int:
    """``verify``: the live projection and the history compared with the log (exit 1 on any
    difference)."""
    from projections.verify import verify

    if args.venue:
        return await _verify_venue(args)
    if args.chain:
        return await _verify_chain(args)
    if args.expect:
        raise UsageError("--expect: checkpoints are checked by `verify --chain`: add --chain")

    async def check(
        redis: Any, conn: psycopg.AsyncConnection[Any], shards: list[int], count: int, settings: Settings
    ) -> Report:
        ttl_s = await final_order_ttl(redis, settings.final_order_ttl_s)  # the live projection's, if recorded
        return await verify(redis, conn, shards, count, repair=args.repair, final_order_ttl_s=ttl_s)

    return await _verification(args, check, lambda report: report.summary())


async def _verify_venue(args: argparse.Namespace) -> int:
    """``verify --venue``: the drifts the log leaves open, one per line (exit 1 while one is)."""
    from projections.verify import verify_venue

    if args.chain or args.repair or args.expect:
        raise UsageError("--venue checks the drifts alone: run it without --chain, --repair and --expect")
    return await _verification(
        args,
        lambda redis, conn, shards, _count, _config: verify_venue(redis, conn, shards),
        lambda report: "\n".join(report.lines()),
    )


async def _verification(
    args: argparse.Namespace,
    check: Callable[[Any, psycopg.AsyncConnection[Any], list[int], int, Settings], Awaitable[VerifyReport]],
    summary: Callable[[VerifyReport], str],
) -> int:
    """Run ``check(redis, archive, shards, shard count, settings)`` on the shards ``--shard``
    picks and print its report: JSON with ``--json``, else the differences as a table and the
    ``summary`` (exit 1 unless the report is ok)."""
    settings = _settings(args)
    redis = await _client(settings)
    try:
        count, shards = await _chosen_shards(redis, args.shard)
        async with await _archive(settings) as conn:
            report = await check(redis, conn, shards, count, settings)
    finally:
        await redis.aclose()
    if args.json:
        _print_json(report.as_dict())
    else:
        if report.differences:
            print_table([d.as_dict() for d in report.differences], ["store", "key", "field", "expected", "found"])
        print(summary(report))
    return 0 if report.ok else EXIT_FAILURE


async def _chosen_shards(redis: Any, shard: int | None) -> tuple[int, list[int]]:
    """The ledger's shard count and the shards ``--shard`` picks (default: all)."""
    count = await shard_count(redis)
    if shard is not None and shard >= count:
        raise UsageError(f"--shard: this ledger has shards 0 to {count - 1}, not {shard}")
    return count, list(range(count)) if shard is None else [shard]


async def _verify_chain(args: argparse.Namespace) -> int:
    """``verify --chain``: the events' hash chain checked in Redis and the archive (exit 1 on a break)."""
    from projections.chain_check import verify_chain

    if args.repair:
        raise UsageError("--repair rewrites the live projection: run it without --chain (events are never rewritten)")
    settings = _settings(args)
    redis = await _client(settings)
    try:
        _count, shards = await _chosen_shards(redis, args.shard)
        unknown = sorted({s for s, _n, _h in args.expect or ()} - set(shards))
        if unknown:
            raise UsageError(f"--expect: checkpoint of shard {unknown[0]}, which this check does not cover")
        async with await _archive(settings) as conn:
            report = await verify_chain(redis, conn, shards, args.expect or ())
    finally:
        await redis.aclose()
    if args.json:
        _print_json(report.as_dict())
    else:
        for finding in report.findings:
            print(finding.message)
        for shard in report.shards:
            print(shard.line())
    return 0 if report.ok else EXIT_FAILURE


async def _trim(args: argparse.Namespace) -> int:
    """``trim``: remove from Redis the stream entries that are archived and processed by every
    group (events) or answered (commands), nothing else, ever; then compact the outcomes and final
    snapshots that are archived and older than the retention (projections.compact)."""
    from ledger.store.operations import record_operation
    from projections.trim import retention_pass

    if args.retention_ms < 0:
        raise UsageError("--retention-ms: must be 0 or more milliseconds")
    settings = _settings(args)
    redis = await _client(settings)
    try:
        _count, shards = await _chosen_shards(redis, args.shard)
        async with await _archive(settings) as conn:
            done = await retention_pass(redis, conn, shards, retention_ms=args.retention_ms, dry_run=args.dry_run)
        detail = done.detail()
        if not args.dry_run:
            await record_operation(redis, "trim", ",".join(str(s) for s in shards), args.reason, detail)
    finally:
        await redis.aclose()
    if args.json:
        _print_json(detail)
    else:
        print_table(detail["streams"], ["shard", "stream", "up_to", "limited_by", "removed"])
        print()
        print_table(detail["compacted"], ["shard", "hash", "entries", "already", "eligible", "compacted"])
    return 0


async def _rebuild(args: argparse.Namespace) -> int:
    """``rebuild``: a projection rebuilt from the log while ``serve`` runs (projections.rebuild)."""
    from ledger.store.log import open_archive
    from projections.rebuild import rebuild_live, rebuild_postgres

    if args.projection == "postgres" and args.shard is not None:
        raise UsageError("--shard: the history tables hold every shard's rows and are rebuilt whole; drop --shard")
    settings = _settings(args)
    redis = await _client(settings)
    try:
        count, shards = await _chosen_shards(redis, args.shard)
        if args.projection == "live":
            async with open_archive(settings) as (conn, _why):
                done = await rebuild_live(
                    redis,
                    shards,
                    count,
                    conn=conn,
                    reason=args.reason,
                    progress=sys.stderr,
                    final_order_ttl_s=await final_order_ttl(redis, settings.final_order_ttl_s),
                )
        else:
            async with await _archive(settings) as conn:
                done = await rebuild_postgres(redis, conn, count, reason=args.reason, progress=sys.stderr)
    finally:
        await redis.aclose()
    if args.json:
        _print_json(done.as_dict())
    else:
        print(done.summary())
    return 0


async def _checkpoint(args: argparse.Namespace) -> int:
    """``checkpoint``: the chain head of every shard, to write down and check later."""
    from projections.chain_check import read_head

    redis = await _client(_settings(args))
    try:
        _count, shards = await _chosen_shards(redis, args.shard)
        heads = [await read_head(redis, shard) for shard in shards]
    finally:
        await redis.aclose()
    rows = [
        {"shard": shard, "entry_id": None, "n": 0, "hash": None, "checkpoint": None} if head is None else head.as_dict()
        for shard, head in zip(shards, heads, strict=True)
    ]
    if args.json:
        _print_json(rows)
    else:
        print_table(rows, ["shard", "n", "entry_id", "hash", "checkpoint"])
    return 0


def _print_listing(args: argparse.Namespace, rows: list[dict[str, Any]], columns: list[str], empty: str) -> int:
    if args.json:
        _print_json(rows)
    else:
        print_table(rows, columns, empty)
    return 0


def cmd_markets(args: argparse.Namespace) -> int:
    """``markets show`` (the bundled snapshot) and ``markets sync`` (refresh it from the venue)."""
    from ledger.venues import exchanges, markets

    exchange = Exchange(args.exchange)
    if args.action == "sync":
        print(exchanges.sync(exchange, output=args.output, base_url=args.base_url, symbols=args.symbol).summary())
        return 0
    found = markets.show(exchange, args.symbol)
    if args.json:
        _print_json([market.as_dict() for market in found])
    else:
        print_table([market.row() for market in found], markets.TABLE_COLUMNS, "no markets")
    return 0


async def _reconcile(args: argparse.Namespace) -> int:
    from ledger.app.reconcile import run_reconcile

    settings = _settings(args)
    configure_logging(settings.log_format, settings.log_level)  # stderr: stdout is the result
    redis = await _client(settings)
    try:
        exchange = Exchange(args.exchange)
        return await run_reconcile(redis, settings, args.user, exchange, symbols=args.symbol, as_json=args.json)
    finally:
        await redis.aclose()


async def _execution(args: argparse.Namespace) -> int:
    """``execution show`` / ``set SPEC``: the execution modes recorded in ledger:meta."""
    from ledger.app.execution import print_execution, set_execution, show_execution

    redis = await _client(_settings(args))
    try:
        if args.action == "set":
            print("\n".join(await set_execution(redis, args.spec, args.reason)))
            return 0
        modes = await show_execution(redis)
    finally:
        await redis.aclose()
    if args.json:
        _print_json(modes)
    else:
        print_execution(modes)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ledger.app.demo import run_demo

    return run_demo(args)


# --------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (CONTRACT §11)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def _option(parse: Callable[[str], T], name: str) -> Callable[[str], T]:
    """An argparse ``type`` from a parser that raises ``ValueError`` with the rule it broke."""

    def convert(value: str) -> T:
        try:
            return parse(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name
    return convert


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"must be a number of seconds > 0 (got {value!r})")
    return seconds


def _limit(value: str) -> int:
    if not (value.isascii() and value.isdigit() and 1 <= int(value) <= HISTORY_MAX_LIMIT):
        raise ValueError(f"must be a whole number from 1 to {HISTORY_MAX_LIMIT} (got {value!r})")
    return int(value)


def _shard_number(value: str) -> int:
    if not (value.isascii() and value.isdigit()):
        raise ValueError(f"must be a shard number such as 0 (got {value!r})")
    return int(value)


async def _export(args: argparse.Namespace) -> int:
    from ledger.app.export import export_to
    from ledger.store.log import open_archive

    settings = _settings(args)
    redis = await _client(settings)
    try:
        async with open_archive(settings) as (conn, archive):
            written = await export_to(
                args.output,
                sys.stdout,
                redis=redis,
                conn=conn,
                fmt=args.format,
                since=args.since,
                until=args.until,
                user=args.user,
                no_archive=archive,
                progress_stream=sys.stderr,
            )
    finally:
        await redis.aclose()
    if args.output is not None:
        print(f"{written} events written to {args.output}")
    return 0


def _moment(value: str) -> int:
    from ledger.app.replay import parse_moment

    return parse_moment(value)


def _entry_id(value: str) -> str:
    from ledger.app.dead import entry_id

    return entry_id(value)


SHARDS = _option(functools.partial(whole_number, "shards"), "shards")
SECONDS = _option(_seconds, "seconds")
LIMIT = _option(_limit, "limit")
USER_ID = _option(functools.partial(check_identifier, "user_id"), "user_id")
SYMBOL = _option(functools.partial(check_identifier, "symbol"), "symbol")
PRICE = _option(functools.partial(parse_decimal, field="price", positive=True), "price")
AGGREGATE_ID = _option(lambda v: check_identifier("id", v).lower(), "id")
SHARD = _option(_shard_number, "shard")
ENTRY_ID = _option(_entry_id, "entry_id")
MOMENT = _option(_moment, "moment")
EXPECT = _option(parse_expect, "checkpoint")
EXECUTION = _option(parse_execution, "execution")


def _base_url(value: str) -> str:
    from ledger.venues.exchanges import check_base_url

    return check_base_url(value)


BASE_URL = _option(_base_url, "base URL")


# --------------------------------------------------------------------------- the declaration
# Every command, its actions and their flags, declared once; ``build_parser`` turns it into
# argparse. A flag used by several commands is one constant below.


@dataclass(frozen=True)
class Flag:
    """One ``add_argument``: its names (or positional name) and options."""

    names: tuple[str, ...]
    options: dict[str, Any]


def flag(*names: str, **options: Any) -> Flag:
    return Flag(names, options)


@dataclass(frozen=True)
class Command:
    """A command (or an action of one): its flags, its handler (sync, or async: run with
    ``asyncio.run``) and its actions, one of which must be named."""

    name: str
    help: str
    flags: tuple[Flag, ...] = ()
    run: Callable[[argparse.Namespace], Any] | None = None
    actions: tuple[Command, ...] = ()


EXCHANGES = [e.value for e in Exchange]
REDIS_URL = flag("--redis-url", help="Redis URL (env LEDGER_REDIS_URL; default: private server in ./.ledger)")
DATABASE_URL = flag("--database-url", help="PostgreSQL URL (env LEDGER_DATABASE_URL)")
SHARDS_FLAG = flag("--shards", type=SHARDS, help="number of shards (env LEDGER_SHARDS, default 1)")
ONE_SHARD = flag("--shard", type=SHARD, help="only this shard (default: every shard)")
JSON_ARRAY = flag("--json", action="store_true", help="print a JSON array")
JSON_OBJECT = flag("--json", action="store_true", help="print a JSON object")
REASON = "recorded in the operations stream"
FILTERS = (
    flag("--user", type=USER_ID, help="user id (default: every user with open positions)"),
    flag("--exchange", choices=EXCHANGES),
    flag("--symbol", type=SYMBOL),
    JSON_ARRAY,
)
DEAD_ID = flag("id", type=ENTRY_ID, help="the dead letter's id (its entry id in ledger:{s}:dead)")
DEAD_LIMIT = flag("--limit", type=LIMIT, default=100, help=f"at most this many (per shard), 1 to {HISTORY_MAX_LIMIT}")
NOTE = "why (recorded in the operations stream)"
REPLY_WAIT = f"seconds to wait for %s reply (default {REPLY_WAIT_S:g})"

COMMANDS = (
    Command(
        "serve",
        "run the ledger (handler, projections, projector, paper venue)",
        (
            REDIS_URL,
            SHARDS_FLAG,
            DATABASE_URL,
            flag("--role", action="append", help="run only this role (repeatable)"),
            flag(
                "--processes",
                choices=PROCESS_MODES,
                help="roles: a child process per group of roles, supervised (default); 1: every role in this "
                "process (env LEDGER_PROCESSES)",
            ),
            flag(
                "--reconcile-s",
                help="reconcile every user of the live venues every N seconds; 0: off (env LEDGER_RECONCILE_S, "
                "default 0)",
            ),
        ),
        cmd_serve,
    ),
    Command(
        "submit",
        "publish one command and print its reply",
        (
            REDIS_URL,
            SHARDS_FLAG,
            flag("type", help="command type, e.g. place_order"),
            flag("--data", required=True, help="the command's JSON object (command_id is generated if absent)"),
            flag("--wait", type=SECONDS, default=REPLY_WAIT_S, help=REPLY_WAIT % "the"),
        ),
        _submit,
    ),
    Command(
        "status",
        "per shard: streams, consumer groups, pending, lag, dead letters, history gaps",
        (REDIS_URL, DATABASE_URL, flag("--json", action="store_true")),
        _status,
    ),
    Command("positions", "open positions from the live projection", (REDIS_URL, *FILTERS), _positions),
    Command(
        "orders",
        "orders from the live projection",
        (REDIS_URL, *FILTERS, flag("--status", choices=[s.value for s in OrderStatus])),
        _orders,
    ),
    Command(
        "mark",
        "set the mark price of a symbol (HSET marks:EXCHANGE)",
        (REDIS_URL, flag("exchange", choices=EXCHANGES), flag("symbol", type=SYMBOL), flag("price", type=PRICE)),
        _mark,
    ),
    Command(
        "history",
        "the audit trail of one order or position (ID), or a user's closed positions and final orders",
        (
            flag("id", nargs="?", type=AGGREGATE_ID, help="an order or position id: print its every event and state"),
            REDIS_URL,
            DATABASE_URL,
            *FILTERS,
            flag("--limit", type=LIMIT, default=100, help=f"rows of each kind, 1 to {HISTORY_MAX_LIMIT} (default 100)"),
        ),
        _history,
    ),
    Command(
        "replay",
        "positions and orders rebuilt from the log as of a moment",
        (
            REDIS_URL,
            DATABASE_URL,
            flag(
                "--until", type=MOMENT, help="epoch milliseconds or ISO 8601, UTC unless it names a zone (default: now)"
            ),
            *FILTERS,
        ),
        _replay,
    ),
    Command(
        "export",
        "every event of the log (Redis and the archive), streamed",
        (
            REDIS_URL,
            DATABASE_URL,
            flag("--format", choices=FORMATS, default=FORMATS[0], help=f"default {FORMATS[0]}"),
            flag("--since", type=MOMENT, help="events from this moment: epoch milliseconds or ISO 8601"),
            flag("--until", type=MOMENT, help="events up to this moment: epoch milliseconds or ISO 8601"),
            flag("--user", type=USER_ID, help="only this user's events"),
            flag("--output", type=Path, help="write to this file (default: standard output)"),
        ),
        _export,
    ),
    Command(
        "dead",
        "dead letters: list, show, retry, drop; the operations stream",
        run=_dead,
        actions=(
            Command(
                "list", "dead letters with their reasons, oldest first", (REDIS_URL, ONE_SHARD, JSON_ARRAY, DEAD_LIMIT)
            ),
            Command("show", "one whole dead letter (JSON)", (REDIS_URL, ONE_SHARD, DEAD_ID)),
            Command(
                "retry",
                "republish a dead command (as it was or fixed) or re-run a dead event",
                (
                    REDIS_URL,
                    ONE_SHARD,
                    DEAD_ID,
                    flag("--type", help="a dead command's fixed type (default: as it was)"),
                    flag("--data", help="a dead command's fixed JSON data (default: as it was)"),
                    flag("--note", default="", help=NOTE),
                    flag("--wait", type=SECONDS, default=REPLY_WAIT_S, help=REPLY_WAIT % "a command's"),
                ),
            ),
            Command(
                "drop",
                "remove a dead letter, with a note",
                (REDIS_URL, ONE_SHARD, DEAD_ID, flag("--note", required=True, help=NOTE)),
            ),
            Command(
                "ops", "the operations stream: every operator action, oldest first", (REDIS_URL, JSON_ARRAY, DEAD_LIMIT)
            ),
        ),
    ),
    Command(
        "markets",
        "the exchanges' markets (ccxt): the bundled snapshot, and sync",
        run=cmd_markets,
        actions=(
            Command(
                "show",
                "markets of the snapshot, or the one a unified symbol or native id names",
                (
                    flag("exchange", choices=EXCHANGES),
                    flag(
                        "symbol", nargs="?", type=SYMBOL, help="a unified symbol or native id (default: every market)"
                    ),
                    JSON_ARRAY,
                ),
            ),
            Command(
                "sync",
                "load the markets from the venue (ccxt load_markets), rewrite the snapshot",
                (
                    flag("exchange", choices=EXCHANGES),
                    flag("--output", type=Path, help="write here (default: the bundled snapshot)"),
                    flag(
                        "--symbol", type=SYMBOL, action="append", default=[], help="also keep this market (repeatable)"
                    ),
                    flag("--base-url", type=BASE_URL, help="the venue's REST host (a testnet, a stand-in)"),
                ),
            ),
        ),
    ),
    Command(
        "reconcile",
        "compare a user's orders, fills and positions on a live venue with the ledger: record what the "
        "ledger lacks as commands, report the rest (exit 1 while a finding is unresolved)",
        (
            REDIS_URL,
            flag("user", type=USER_ID, help="the ledger user"),
            flag("exchange", choices=EXCHANGES),
            flag("--symbol", type=SYMBOL, action="append", default=[], help="also look at this market (repeatable)"),
            JSON_OBJECT,
        ),
        _reconcile,
    ),
    Command(
        "verify",
        "rebuild the projections from the log and compare: live Redis keys and PostgreSQL rows",
        (
            REDIS_URL,
            DATABASE_URL,
            ONE_SHARD,
            flag(
                "--repair",
                action="store_true",
                help="after showing the differences, rewrite the live keys from the log",
            ),
            JSON_OBJECT,
            flag("--chain", action="store_true", help="check the events' hash chain in Redis and the archive instead"),
            flag(
                "--venue",
                action="store_true",
                help="list the drifts from the venues still unresolved instead (exit 1 while one is)",
            ),
            flag(
                "--expect",
                type=EXPECT,
                action="append",
                help="with --chain: a checkpoint SHARD:N:HASH (from `ledger checkpoint`) "
                "that must still hold (repeatable)",
            ),
        ),
        _verify,
    ),
    Command(
        "checkpoint",
        "the hash chain head of every shard: write it down, check it later with verify --expect",
        (REDIS_URL, ONE_SHARD, JSON_ARRAY),
        _checkpoint,
    ),
    Command(
        "trim",
        "remove from Redis the stream entries archived and processed by every group (never anything else) "
        "and compact the outcomes and final snapshots archived and older than the retention",
        (
            REDIS_URL,
            flag("--database-url", help="PostgreSQL URL (env LEDGER_DATABASE_URL): proves what is archived"),
            ONE_SHARD,
            flag("--retention-ms", type=int, default=0, help="keep entries younger than this (default 0)"),
            flag("--dry-run", action="store_true", help="print what may go, change nothing"),
            flag("--reason", default="manual trim", help=REASON),
            flag("--json", action="store_true", help="print a JSON object: streams, compacted"),
        ),
        _trim,
    ),
    Command(
        "rebuild",
        "rebuild a projection from the log while serve runs (live: in place; postgres: swapped)",
        (
            REDIS_URL,
            DATABASE_URL,
            flag("--projection", choices=("live", "postgres"), required=True, help="which projection"),
            flag("--shard", type=SHARD, help="live only: only this shard (default: every shard)"),
            flag("--reason", default="manual rebuild", help=REASON),
            JSON_OBJECT,
        ),
        _rebuild,
    ),
    Command(
        "execution",
        "the execution mode of each exchange recorded for every serve: show, set (switch)",
        run=_execution,
        actions=(
            Command("show", "the recorded mode of each exchange", (REDIS_URL, JSON_OBJECT)),
            Command(
                "set",
                "record new modes (stop every serve first, start them all with LEDGER_EXECUTION=SPEC after)",
                (
                    REDIS_URL,
                    flag(
                        "spec",
                        type=EXECUTION,
                        help="as LEDGER_EXECUTION: paper, external, live, or per exchange okx=live,binance=paper",
                    ),
                    flag("--reason", default="execution switch", help=REASON),
                ),
            ),
        ),
    ),
    Command("demo", "start the ledger and run a scripted HYPERRSI-like and GRID-like session", run=cmd_demo),
)


def _runner(handler: Callable[[argparse.Namespace], Any]) -> Callable[[argparse.Namespace], Any]:
    """The ``func`` argparse records: the handler, run to completion when it is a coroutine."""

    def run(args: argparse.Namespace) -> Any:
        result = handler(args)
        return asyncio.run(result) if inspect.iscoroutine(result) else result

    return run


def _add(commands: Any, command: Command) -> None:
    parser = commands.add_parser(command.name, help=command.help)
    for declared in command.flags:
        parser.add_argument(*declared.names, **declared.options)
    if command.actions:
        actions = parser.add_subparsers(dest="action", required=True)
        for action in command.actions:
            _add(actions, action)
    if command.run is not None:
        parser.set_defaults(func=_runner(command.run))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ledger", description="The shared event-sourced position and order ledger.")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        _add(commands, command)
    return parser


# --------------------------------------------------------------------------- the edge

_START_REDIS = "start it (`ledger serve` starts a private one) or point --redis-url / LEDGER_REDIS_URL at a running one"
_START_POSTGRES = "start it or point --database-url / LEDGER_DATABASE_URL at a running one"

# Every expected failure, most specific class first: (classes, exit status, what failed, what to
# do). Anything else is a bug and keeps its traceback.
FAILURES: tuple[tuple[tuple[type[BaseException], ...], int, str, str], ...] = (
    ((redis.exceptions.AuthenticationError,), EXIT_FAILURE, "Redis", "put the right password in the Redis URL"),
    ((redis.exceptions.ConnectionError, redis.exceptions.TimeoutError), EXIT_FAILURE, "Redis", _START_REDIS),
    ((redis.exceptions.RedisError,), EXIT_FAILURE, "Redis", "check that the URL names the ledger's Redis"),
    ((psycopg.OperationalError,), EXIT_FAILURE, "PostgreSQL", _START_POSTGRES),
    ((psycopg.errors.UndefinedTable,), EXIT_FAILURE, "PostgreSQL", "start `ledger serve` once: it applies schema.sql"),
    ((psycopg.Error,), EXIT_FAILURE, "PostgreSQL", "check that the URL names the ledger's database"),
    ((InvalidInput, ValueError), EXIT_USAGE, "", ""),
    ((LedgerError, OSError), EXIT_FAILURE, "", ""),
)


def failure_line(exc: BaseException) -> tuple[int, str] | None:
    """The exit status and the one line that report an expected failure; None for a bug."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    for classes, status, what, todo in FAILURES:
        if isinstance(exc, classes):
            lines = str(exc).strip().splitlines()
            reason = lines[0].strip().rstrip(".:") if lines else type(exc).__name__
            return status, ": ".join(part for part in (what, reason, todo) if part)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        failure = failure_line(exc)
        if failure is None:
            raise
        status, line = failure
        print(f"ledger: {line}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
