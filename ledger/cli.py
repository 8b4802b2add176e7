"""The ``ledger`` command line (CONTRACT §11)."""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
from collections.abc import Sequence
from typing import Any

from ledger import servers
from ledger.config import ConfigError, Settings
from ledger.keys import ShardKeys, shard_of
from ledger.logs import configure_logging
from ledger.redis_conn import ShardCountMismatch, connect, recorded_shards


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
                {**base, "group": group["name"], "consumers": group["consumers"], "pending": group["pending"], "lag": group.get("lag")}
            )
    return rows


def cmd_demo(args: argparse.Namespace) -> int:
    from ledger.demo import run_demo

    return run_demo(args)


# --------------------------------------------------------------------------- parser


def _connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", help="Redis URL (env LEDGER_REDIS_URL; default: private server in ./.ledger)")
    parser.add_argument("--shards", type=int, help="number of shards (env LEDGER_SHARDS, default 1)")


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

    demo = commands.add_parser("demo", help="a worked example of the ledger")
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
