"""The ``ledger`` command line (CONTRACT §11)."""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import psycopg

from ledger import keys, servers
from ledger.config import ConfigError, Settings
from ledger.enums import Exchange, OrderStatus
from ledger.keys import ShardKeys, shard_of
from ledger.logs import configure_logging
from ledger.redis_conn import ShardCountMismatch, connect, recorded_shards
from ledger.values import ValueRuleError, check_identifier, format_decimal, parse_decimal
from projections import history
from projections.queries import marks, order_hashes, position_from_hash, position_hashes


class CliError(RuntimeError):
    """A failure to report on one line with a non-zero exit status."""


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env().with_overrides(
        redis_url=getattr(args, "redis_url", None),
        database_url=getattr(args, "database_url", None),
        shards=getattr(args, "shards", None),
    )


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    widths = {c: max([len(c)] + [len("" if r.get(c) is None else str(r.get(c))) for r in rows]) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(("" if r.get(c) is None else str(r.get(c))).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- commands


def cmd_serve(args: argparse.Namespace) -> int:
    from ledger.service import ROLES, serve

    settings = _settings(args)
    configure_logging(settings.log_format, settings.log_level)
    roles = args.role or list(ROLES)
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise CliError(f"unknown role {unknown[0]!r}; roles: {', '.join(ROLES)}")
    asyncio.run(serve(settings, roles))
    return 0


async def _client(settings: Settings) -> Any:
    from ledger.service import redis_url

    return await connect(redis_url(settings, start=False))


async def _submit(args: argparse.Namespace) -> int:
    settings = _settings(args)
    try:
        data = json.loads(args.data)
    except json.JSONDecodeError as exc:
        raise CliError(f"--data is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CliError("--data must be a JSON object")
    user_id = data.get("user_id")
    if not isinstance(user_id, str):
        raise CliError("--data needs a user_id")
    data.setdefault("command_id", f"cli-{secrets.token_hex(8)}")
    redis = await _client(settings)
    try:
        shards = await recorded_shards(redis) or settings.shards
        keys = ShardKeys(shard_of(user_id, shards))
        reply_key = keys.reply(user_id, data["command_id"])
        await redis.xadd(keys.commands, {"type": args.type, "data": json.dumps(data)})
        answer = await redis.blpop([reply_key], timeout=args.wait)
    finally:
        await redis.aclose()
    if answer is None:
        raise CliError(f"no reply within {args.wait} s: is `ledger serve` running? (command_id {data['command_id']})")
    reply = json.loads(answer[1])
    _print_json(reply)
    return 0 if reply["status"] == "accepted" else 1


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
    if args.json:
        _print_json({"shards": shards, "streams": rows})
    elif shards is None:
        print("no ledger in this Redis yet (ledger:meta has no shards): start `ledger serve`")
    else:
        print(f"shards: {shards}")
        print(_table(rows, ["shard", "stream", "length", "group", "consumers", "pending", "lag"]))
    return 0


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
                    "lag": group.get("lag"),
                }
            )
    return rows


POSITION_COLUMNS = (
    "id",
    "user_id",
    "exchange",
    "symbol",
    "side",
    "size",
    "entry_price",
    "leverage",
    "realized_pnl",
    "fees",
    "status",
    "stop_loss",
    "take_profit",
    "created_at",
    "updated_at",
    "version",
)
ORDER_COLUMNS = (
    "id",
    "user_id",
    "exchange",
    "symbol",
    "side",
    "order_type",
    "quantity",
    "price",
    "filled_qty",
    "avg_fill_price",
    "status",
    "exchange_order_id",
    "client_order_id",
    "position_side",
    "reduce_only",
    "grid_level",
    "created_at",
    "updated_at",
    "version",
)


def position_rows(hashes: list[dict[str, str]], prices: dict[tuple[str, str], Decimal]) -> list[dict[str, Any]]:
    """Live position hashes as CONTRACT §11 prints them: §6 names, plus PnL when a mark is known."""
    rows = []
    for fields in hashes:
        row: dict[str, Any] = {name: fields.get(name, "") for name in POSITION_COLUMNS}
        mark = prices.get((fields["exchange"], fields["symbol"]))
        if mark is not None:
            position = position_from_hash(fields, mark)
            row["mark"] = format_decimal(mark)
            for name in ("unrealized_pnl", "pnl_percentage", "notional_value"):
                row[name] = format_decimal(getattr(position, name))
        rows.append(row)
    return rows


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
        print(_table(rows, columns + ["mark", "unrealized_pnl", "pnl_percentage"]) if rows else "no open positions")
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
        print(_table(rows, columns + ["status", "grid_level"]) if rows else "no orders")
    return 0


async def _mark(args: argparse.Namespace) -> int:
    try:
        exchange = Exchange(args.exchange)
        check_identifier("symbol", args.symbol)
        price = parse_decimal(args.price, "price", positive=True)
    except (ValueError, ValueRuleError) as exc:
        raise CliError(str(exc)) from exc
    redis = await _client(_settings(args))
    try:
        await redis.hset(keys.marks(exchange), args.symbol, format_decimal(price))
    finally:
        await redis.aclose()
    print(f"marks:{exchange} {args.symbol} = {format_decimal(price)}")
    return 0


async def _history(args: argparse.Namespace) -> int:
    from ledger.service import database_url

    settings = _settings(args)
    try:
        async with await psycopg.AsyncConnection.connect(database_url(settings, start=False), autocommit=True) as conn:
            positions = await history.closed_positions(conn, args.user, args.exchange, args.symbol, limit=args.limit)
            orders = await history.final_orders(conn, args.user, args.exchange, limit=args.limit)
    except (ValueError, psycopg.OperationalError) as exc:
        raise CliError(str(exc)) from exc
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
    print(_table(positions, columns + ["closed_at"]) if positions else "  none")
    print("\nfinal orders")
    columns = ["id", "exchange", "symbol", "side", "order_type", "quantity", "price", "filled_qty", "status"]
    print(_table(orders, columns + ["updated_at"]) if orders else "  none")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ledger.demo import run_demo

    return run_demo(args)


# --------------------------------------------------------------------------- parser


def _connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", help="Redis URL (env LEDGER_REDIS_URL; default: private server in ./.ledger)")
    parser.add_argument("--shards", type=int, help="number of shards (env LEDGER_SHARDS, default 1)")


def _filter_flags(parser: argparse.ArgumentParser, *, user_required: bool = False) -> None:
    parser.add_argument("--user", required=user_required, help="user id (default: every user with open positions)")
    parser.add_argument("--exchange", choices=[e.value for e in Exchange])
    parser.add_argument("--symbol")
    parser.add_argument("--json", action="store_true", help="print a JSON array")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ledger", description="The shared event-sourced position and order ledger.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the ledger (handler, projections, projector, paper venue)")
    _connection_flags(serve)
    serve.add_argument("--database-url", help="PostgreSQL URL (env LEDGER_DATABASE_URL)")
    serve.add_argument("--role", action="append", help="run only this role (repeatable)")
    serve.set_defaults(func=cmd_serve)

    submit = commands.add_parser("submit", help="publish one command and print its reply")
    _connection_flags(submit)
    submit.add_argument("type", help="command type, e.g. place_order")
    submit.add_argument("--data", required=True, help="the command's JSON object (command_id is generated if absent)")
    submit.add_argument("--wait", type=float, default=10.0, help="seconds to wait for the reply")
    submit.set_defaults(func=lambda a: asyncio.run(_submit(a)))

    status = commands.add_parser("status", help="per shard: streams, consumer groups, pending, lag, dead letters")
    _connection_flags(status)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=lambda a: asyncio.run(_status(a)))

    positions = commands.add_parser("positions", help="open positions from the live projection")
    _connection_flags(positions)
    _filter_flags(positions)
    positions.set_defaults(func=lambda a: asyncio.run(_positions(a)))

    orders = commands.add_parser("orders", help="orders from the live projection")
    _connection_flags(orders)
    _filter_flags(orders)
    orders.add_argument("--status", choices=[s.value for s in OrderStatus])
    orders.set_defaults(func=lambda a: asyncio.run(_orders(a)))

    mark = commands.add_parser("mark", help="set the mark price of a symbol (HSET marks:EXCHANGE)")
    _connection_flags(mark)
    mark.add_argument("exchange", choices=[e.value for e in Exchange])
    mark.add_argument("symbol")
    mark.add_argument("price")
    mark.set_defaults(func=lambda a: asyncio.run(_mark(a)))

    history_cmd = commands.add_parser("history", help="closed positions and final orders from PostgreSQL")
    history_cmd.add_argument("--database-url", help="PostgreSQL URL (env LEDGER_DATABASE_URL)")
    _filter_flags(history_cmd, user_required=True)
    history_cmd.add_argument("--limit", type=int, default=100)
    history_cmd.set_defaults(func=lambda a: asyncio.run(_history(a)))

    demo = commands.add_parser("demo", help="start the ledger and run a scripted HYPERRSI-like and GRID-like session")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CliError, ConfigError, ShardCountMismatch, servers.ServerError) as exc:
        print(f"ledger: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
