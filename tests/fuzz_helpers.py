"""Black-box pieces of the command-path fuzz test (tests/integration/test_fuzz.py).

Everything a strategy in another language could know is written here from the contract, not
imported from the ledger: the identifier rules of CONTRACT §1, the key patterns of §2 and §6 (full
matches), the reply shape of §4, which entries carry a readable ``command_id`` and ``user_id``,
and the entries themselves (valid commands, hostile mutations of them, raw junk), built as the
bytes a strategy would XADD.

The one exception is :func:`internal_keys`: the keys the ledger keeps for itself are not in the
contract, so they come from where the project documents them, ``ledger/keys.py``.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hypothesis import strategies as st

# --------------------------------------------------------------------------- CONTRACT §1

USER_ID = r"[A-Za-z0-9_.@-]{1,64}"
SYMBOL = r"[A-Za-z0-9._/:-]{1,48}"
COMMAND_ID = r"[A-Za-z0-9_.:-]{1,64}"
EXCHANGE = r"(?:okx|binance|upbit)"
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
ENTRY_ID = r"[0-9]+-[0-9]+"
SHARD = r"\{(?P<shard>0|[1-9][0-9]*)\}"
GRID_LEVEL = r"(?:0|[1-9][0-9]*)"

# --------------------------------------------------------------------------- CONTRACT §2, §6, §8

# (what, full-match pattern, Redis type). The braces of {exchange}, {user_id} ... in §6 are
# placeholders; the {s} of §2 is literal.
CONTRACT_KEYS: tuple[tuple[str, re.Pattern[str], str], ...] = tuple(
    (what, re.compile(pattern), kind)
    for what, pattern, kind in (
        ("shard count", r"ledger:meta", "hash"),
        ("command stream", rf"ledger:{SHARD}:commands", "stream"),
        ("event log", rf"ledger:{SHARD}:events", "stream"),
        ("dead letters", rf"ledger:{SHARD}:dead", "stream"),
        ("reply", rf"ledger:{SHARD}:reply:(?P<user_id>{USER_ID}):(?P<command_id>{COMMAND_ID})", "list"),
        ("open position", rf"positions:{USER_ID}:{EXCHANGE}:{SYMBOL}:(?:long|short)", "hash"),
        ("user's open positions", rf"positions:index:{USER_ID}:{EXCHANGE}", "set"),
        ("all open positions", r"positions:active", "set"),
        ("order", rf"orders:{UUID}", "hash"),
        ("user's orders", rf"orders:user:{USER_ID}:{EXCHANGE}", "set"),
        ("open orders", rf"orders:open:{EXCHANGE}:{SYMBOL}", "set"),
        ("GRID active level", rf"{EXCHANGE}:user:{USER_ID}:symbol:{SYMBOL}:active_grid:{GRID_LEVEL}", "hash"),
        ("GRID order prices", rf"orders:{EXCHANGE}:user:{USER_ID}:symbol:{SYMBOL}:orders", "hash"),
        ("GRID placement index", rf"orders:{EXCHANGE}:user:{USER_ID}:symbol:{SYMBOL}:order_placed_index", "hash"),
        ("marks", rf"marks:{EXCHANGE}", "hash"),
    )
)
# The legacy live keys of CONTRACT §6.
LIVE_KEYS = {
    "open position",
    "user's open positions",
    "all open positions",
    "order",
    "user's orders",
    "open orders",
    "GRID active level",
    "GRID order prices",
    "GRID placement index",
}


def internal_keys(shards: int, consumers: Iterable[Any]) -> dict[str, str]:
    """The ledger's own keys (key -> Redis type), as ``ledger/keys.py`` documents them.

    The project declares no single list of its internal keys, so they are gathered from
    ``ledger.store.keys``: every key of ``ShardKeys`` (its slots), the dead-letter index of each dead
    stream (``dead_index``), and, for each consumer that runs, its try counters (``tries``) and
    its lease (``ShardKeys.lease``, the consumer's ``lease_key``). ``ledger:live:position-keys``
    (``POSITION_KEYS``) is the live projection's id -> key lookup. The fences of live keys
    (``keys.fence``) are matched by :func:`classify`.
    """
    from consumers.command_handler import OutcomeReader
    from ledger.store import keys

    found = {keys.POSITION_KEYS: "hash"}
    for shard in range(shards):
        shard_keys = keys.ShardKeys(shard)
        for slot in shard_keys.__slots__:
            value = getattr(shard_keys, slot)
            if isinstance(value, str) and value not in (shard_keys.commands, shard_keys.events, shard_keys.dead):
                found[value] = "*"
        found[keys.dead_index(shard_keys.dead)] = "hash"
    for consumer in consumers:
        if isinstance(consumer, OutcomeReader):  # no keys of its own: ShardKeys.waiting is a shard key
            continue
        found[keys.tries(consumer.stream, consumer.group)] = "hash"
        if consumer.lease_key is not None:
            found[consumer.lease_key] = "string"
    return found


def classify(key: str, shards: int, internal: dict[str, str]) -> tuple[str, str] | None:
    """(what, Redis type) of a key the contract or the documented internal keys allow, else None.

    A fence (``keys.fence(live_key)``, kept after its live key is gone) is allowed when its live
    key is one of CONTRACT §6 or ``POSITION_KEYS`` and the project's builder gives it back.
    """
    from ledger.store import keys

    if key in internal:
        return "internal", internal[key]
    if key.startswith(keys.FENCE_PREFIX + "{") and key.endswith("}"):
        live_key = key[len(keys.FENCE_PREFIX) + 1 : -1]
        fenced = classify(live_key, shards, {keys.POSITION_KEYS: "hash"})
        if fenced is not None and (fenced[0] in LIVE_KEYS or live_key == keys.POSITION_KEYS):
            return ("fence", "hash") if keys.fence(live_key) == key else None
        return None
    for what, pattern, kind in CONTRACT_KEYS:
        match = pattern.fullmatch(key)
        if match is None:
            continue
        groups = match.groupdict()
        if "shard" in groups and int(groups["shard"]) >= shards:
            return None
        return what, kind
    return None


# --------------------------------------------------------------------------- CONTRACT §4

REPLY_FIELDS = {"command_id", "status", "error", "order_id", "position_id", "events"}


def reply_problems(reply: Any, command_id: str, event_types: set[str]) -> list[str]:
    """What is wrong with a reply's JSON value (CONTRACT §4); empty when nothing is."""
    if not isinstance(reply, dict):
        return [f"not a JSON object: {reply!r}"]
    problems = []
    if set(reply) != REPLY_FIELDS:
        problems.append(f"fields {sorted(reply)} instead of {sorted(REPLY_FIELDS)}")
    if reply.get("command_id") != command_id:
        problems.append(f"command_id {reply.get('command_id')!r} instead of {command_id!r}")
    status, error = reply.get("status"), reply.get("error")
    if status not in ("accepted", "rejected"):
        problems.append(f"status {status!r}")
    if (status == "accepted") != (error is None):
        problems.append(f"status {status!r} with error {error!r}")
    if error is not None and not (
        isinstance(error, dict)
        and set(error) == {"code", "message"}
        and all(isinstance(error[k], str) and error[k] for k in ("code", "message"))
    ):
        problems.append(f"error {error!r} is not {{code, message}}")
    for name in ("order_id", "position_id"):
        value = reply.get(name)
        if value is not None and not (isinstance(value, str) and re.fullmatch(UUID, value)):
            problems.append(f"{name} {value!r} is neither null nor a UUID")
    events = reply.get("events")
    if not isinstance(events, list) or not all(
        isinstance(e, dict)
        and set(e) == {"type", "id"}
        and e["type"] in event_types
        and isinstance(e["id"], str)
        and re.fullmatch(ENTRY_ID, e["id"])
        for e in events
    ):
        problems.append(f"events {events!r} is not a list of {{type, id}}")
    elif status == "rejected" and events:
        problems.append(f"a rejection lists events {events!r}")
    return problems


# --------------------------------------------------------------------------- reading an entry


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} overflows a double")
    return value


def _lone_surrogate(value: Any) -> bool:
    """True if a string, or a string in (lists of) lists, holds a lone surrogate."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str) and any("\ud800" <= ch <= "\udfff" for ch in item):
            return True
        if isinstance(item, list):
            stack += item
    return False


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Every member of every object, duplicates included, is checked for lone surrogates."""
    for key, value in pairs:
        if _lone_surrogate(key) or _lone_surrogate(value):
            raise ValueError("a lone surrogate is not text")
    return dict(pairs)


def readable_ids(fields: dict[bytes, bytes]) -> tuple[str, str] | None:
    """(user_id, command_id) of an entry whose ``data`` is a strict JSON object (RFC 8259 text in
    UTF-8, no NaN/Infinity, no number beyond a double, no lone surrogate, not nested beyond the
    parser's depth) with a valid ``command_id`` and ``user_id`` (CONTRACT §1); None otherwise.

    This is what a strategy can expect to be answered on ``ledger:{s}:reply:{user_id}:{command_id}``.
    """
    raw = fields.get(b"data")
    if raw is None:
        return None
    try:
        data = json.loads(
            raw.decode("utf-8"), parse_constant=_no_constants, parse_float=_finite, object_pairs_hook=_strict_object
        )
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    user_id, command_id = data.get("user_id"), data.get("command_id")
    if not (isinstance(user_id, str) and re.fullmatch(USER_ID, user_id)):
        return None
    if not (isinstance(command_id, str) and re.fullmatch(COMMAND_ID, command_id)):
        return None
    return user_id, command_id


def show(fields: dict[bytes, bytes], limit: int = 300) -> str:
    """An entry as ``type=... data=...``, long values cut (for failure messages)."""
    parts = []
    for name, value in fields.items():
        text = value.decode("utf-8", "backslashreplace")
        if len(text) > limit:
            text = f"{text[:limit]}...<{len(value)} bytes>"
        parts.append(f"{name.decode('utf-8', 'backslashreplace')}={text!r}")
    return " ".join(parts)


# --------------------------------------------------------------------------- the entries

USERS = ("alice", "bob.9", "c@d-e_1", "U" * 64)  # the last one as long as CONTRACT §1 allows
MARKETS = (  # (exchange, symbol): linear, unified linear, inverse, spot, then shapes nobody planned for
    ("okx", "BTC-USDT-SWAP"),
    ("binance", "BTC/USDT:USDT"),
    ("okx", "BTC-USD-SWAP"),
    ("upbit", "KRW-BTC"),
    ("binance", "1000PEPE/USDT:USDT"),
    ("okx", "BTC-USDT-250328"),
    ("binance", "X"),
    ("upbit", "S" * 48),
)
# Decimals at the edges of what PostgreSQL NUMERIC(38, 18) holds (CONTRACT §1, §9): 20 integer
# digits, 18 fraction digits, both.
EDGE_DECIMALS = ("99999999999999999999", "0.000000000000000001", "12345678901234567890.123456789012345678")
QUANTITIES = ("0.1", "1", "0.5", "2", "0.00000001", "123.456", *EDGE_DECIMALS)
PRICES = ("100", "45000.5", "0.0001", "99999", "110", *EDGE_DECIMALS)
# Metadata a strategy may well send: JSON numbers of every kind, unicode, empty keys, nesting.
METADATA: tuple[dict[str, Any], ...] = (
    {"strategy": "GRID", "n": 1, "tags": ["a", "ü"]},
    {"strategy": "HYPERRSI", "rsi": 28.5, "big": 2**70, "tiny": 1e-300, "huge": 1e300, "neg": -0.0},
    {"": "", "k\u00e9y": [1, 2.5, None, True, {"x": []}], "text": "\u2028 \u202e ü 😀 \t"},
    {"a": {"b": {"c": {"d": {"e": "deep enough"}}}}},
)

# Hostile values (JSON-able) for any field: wrong types, numbers for strings, tricks, huge ones.
WRONG_TYPES: tuple[Any, ...] = (None, True, False, 0, -1, 1.5, 0.1, [], ["a"], {}, {"a": 1}, "", " ")
DECIMAL_TRICKS = (
    "1" * 40,
    "0." + "1" * 40,
    "1" * 21,
    "0." + "1" * 19,
    "1e5",
    "1E+400",
    "-5",
    "0",
    "-0",
    "NaN",
    "Infinity",
    "-Infinity",
    "sNaN",
    "0x10",
    " 1",
    "1 ",
    "+1",
    "1_000",
    "１２３",  # full-width digits
    "١٢٣",  # Arabic-Indic digits
    "1\n",
    "1\u0000",
    ".5",
    "5.",
)
TS_TRICKS = (253_402_300_800_000, 253_402_300_799_999, -1, 2**63, 2**64, 10**30, "1700000000000", 1.7e12)
INT_TRICKS = (0, -1, 1001, 2**31, 2**63, 10**30, 1.0, "10", True)
TEXT_TRICKS = (
    "\u0000",
    "a\u0000b",
    "x\n",
    "\u202eevil",
    "\u200f",
    "\ufeff",
    "\u2028",
    "\ud800",
    "\udfff\ud800",
    "r" * 10_000,
    "é" * 300,
    "😀" * 100,
)


def injections(value: str) -> list[str]:
    """Key injections and unicode tricks around an identifier (CONTRACT §1: never in a key)."""
    fullwidth = "".join(chr(ord(c) + 0xFEE0) if c.isdigit() else c for c in value)
    return [
        value + "\n",
        "\n" + value,
        value + "\r\n",
        value + ":x",
        "{" + value + "}",
        value + "}:{0}",
        value + "*",
        value + " ",
        "a b",
        value + "\u0000",
        value + "\u202e",
        "\u200f" + value,
        value + "\ud800",
        fullwidth if fullwidth != value else value + "１",
        value.replace("a", "а") if "a" in value else "аlice",  # Cyrillic a
        value + "x" * 65,
        "",
    ]


@dataclass
class KnownOrder:
    user: str
    remaining: str = "1"  # quantity not filled yet (the whole quantity once filled: an overfill)
    final: bool = False


@dataclass
class KnownPosition:
    user: str
    open: bool = False


@dataclass
class Known:
    """What the strategy learned from replies and live keys (CONTRACT §4, §6)."""

    orders: dict[str, KnownOrder] = field(default_factory=dict)
    positions: dict[str, KnownPosition] = field(default_factory=dict)
    fills: list[tuple[str, str, str]] = field(default_factory=list)  # (user, order id, fill id)
    counter: int = 0

    def next_id(self, prefix: str, width: int = 0) -> str:
        """A fresh id; padded to ``width`` characters with zeros after the prefix."""
        self.counter += 1
        return prefix + str(self.counter).rjust(width - len(prefix), "0")


KINDS = (  # the command types of CONTRACT §3, weighted towards what makes positions open and close
    *["place_order"] * 2,
    *["open_position"] * 3,
    *["record_fill"] * 6,
    "cancel_order",
    "order_accepted",
    "order_rejected",
    "order_cancelled",
    "order_expired",
    *["close_position"] * 3,
    "liquidate_position",
)
ORDER_KINDS = {"record_fill", "cancel_order", "order_accepted", "order_rejected", "order_cancelled", "order_expired"}
POSITION_KINDS = {"close_position", "liquidate_position"}
_K = TypeVar("_K")


@dataclass(frozen=True)
class Planned:
    """One entry to XADD: its fields in order, what it is, and whether it is well formed."""

    fields: dict[bytes, bytes]
    label: str
    well_formed: bool


def encode(data: Any, ascii_only: bool) -> bytes:
    """JSON text as a strategy would send it; lone surrogates unescaped become invalid UTF-8."""
    return json.dumps(data, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def entry(type_name: str | bytes, data: bytes | None, label: str, well_formed: bool = False) -> Planned:
    fields: dict[bytes, bytes] = {}
    fields[b"type"] = type_name if isinstance(type_name, bytes) else type_name.encode("utf-8", "surrogatepass")
    if data is not None:
        fields[b"data"] = data
    return Planned(fields, label, well_formed)


def valid_command(draw: st.DrawFn, known: Known) -> tuple[str, dict[str, Any]]:
    """A well-formed command (CONTRACT §1, §3); its outcome may still be a rejection."""
    kind = draw(st.sampled_from(KINDS))
    order_id, order = _pick(draw, known.orders, [k for k, o in known.orders.items() if not o.final])
    position_id, position = _pick(draw, known.positions, [k for k, p in known.positions.items() if p.open])
    subject = order if kind in ORDER_KINDS else position if kind in POSITION_KINDS else None
    # Mostly the owner of the order or position; sometimes another user (it is not theirs).
    user = subject.user if subject is not None and draw(st.integers(0, 9)) else draw(st.sampled_from(USERS))
    data: dict[str, Any] = {
        "command_id": known.next_id(*draw(st.sampled_from([("c", 0), ("cmd:", 0), ("c.", 0), ("C-", 0), ("L", 64)]))),
        "user_id": user,
    }
    exchange, symbol = draw(st.sampled_from(MARKETS))
    if kind == "place_order":
        order_type = draw(st.sampled_from(["market", "limit", "stop_market", "stop_limit", "take_profit_market"]))
        data |= {
            "exchange": exchange,
            "symbol": symbol,
            "side": draw(st.sampled_from(["buy", "sell"])),
            "order_type": order_type,
            "quantity": draw(st.sampled_from(QUANTITIES)),
        }
        if order_type != "market" or draw(st.booleans()):
            data["price"] = draw(st.sampled_from(PRICES))
        if order_type.startswith(("stop", "take")):
            data["trigger_price"] = draw(st.sampled_from(PRICES))
        optional = {
            "position_side": st.sampled_from(["long", "short"]),
            "reduce_only": st.booleans(),
            "leverage": st.integers(1, 125),
            "grid_level": st.integers(0, 20),
            "client_order_id": st.just(known.next_id("coid-")),
            "metadata": st.sampled_from(METADATA),
        }
        for name in draw(st.lists(st.sampled_from(sorted(optional)), max_size=3, unique=True)):
            data[name] = draw(optional[name])
    elif kind == "open_position":
        data |= {
            "exchange": exchange,
            "symbol": symbol,
            "side": draw(st.sampled_from(["long", "short"])),
            "size": draw(st.sampled_from(QUANTITIES)),
            "leverage": draw(st.integers(1, 125)),
        }
        if draw(st.booleans()):
            data["price"] = draw(st.sampled_from(PRICES))
        if draw(st.booleans()):
            data["stop_loss"] = "50"
            data["metadata"] = draw(st.sampled_from(METADATA))
    elif kind == "record_fill":
        remaining = order.remaining if order is not None else "1"
        repeat = [f for f in known.fills if f[1] == order_id]
        if repeat and draw(st.integers(0, 4)) == 0:
            fill_id = repeat[0][2]  # the venue reports the same trade again
        else:
            fill_id = known.next_id(*draw(st.sampled_from([("f", 0), ("trade/", 0), ("T:", 0), ("F@", 128)])))
        quantity = draw(st.sampled_from([remaining, remaining, "0.1", "0.00000001", "3"]))
        data |= {
            "order_id": order_id,
            "fill_id": fill_id,
            "quantity": quantity if quantity not in ("", "0") else "0.1",
            "price": draw(st.sampled_from(PRICES)),
        }
        if draw(st.booleans()):
            data["fee"] = draw(st.sampled_from(["0.01", "0", "0.45", "-0.01"]))
            data["fee_currency"] = draw(st.sampled_from(["USDT", "BTC", "BNB", "KRW"]))
        if draw(st.booleans()):
            # From the epoch to the last millisecond of year 9999 (what every store can hold).
            data["ts"] = draw(st.sampled_from([0, 1_700_000_000_000, 253_402_300_799_999]) | st.integers(0, 2**41))
        known.fills.append((user, order_id, fill_id))
    elif kind in ("cancel_order", "order_cancelled", "order_expired", "order_accepted", "order_rejected"):
        data["order_id"] = order_id
        if kind == "order_accepted":
            # Venue ids are unique per exchange; a venue repeating one is a fact to record.
            venue_ids = [f"ex-{n}" for n in range(1, known.counter + 1, 7)]
            data["exchange_order_id"] = draw(
                st.sampled_from([known.next_id("ex-"), known.next_id("E/", 128), *venue_ids[:3]])
            )
        if kind == "order_rejected":
            data["reason"] = draw(st.sampled_from(["insufficient margin", "price out of band", "ü 😀"]))
    else:
        data["position_id"] = position_id
        if kind == "close_position":
            if draw(st.booleans()):
                data["size"] = draw(st.sampled_from(QUANTITIES))
            if draw(st.booleans()):
                data["reason"] = draw(st.sampled_from(["manual", "take_profit", "stop loss hit"]))
            if draw(st.booleans()):
                data["price"] = draw(st.sampled_from(PRICES))
        else:
            data["price"] = draw(st.sampled_from(PRICES))
    return kind, data


def _pick(draw: st.DrawFn, pool: Mapping[str, _K], live: list[str]) -> tuple[str, _K | None]:
    """Mostly a live id (an order not final, an open position), sometimes any known one, now and
    then an id nobody knows. Ids are in the order they were learned, never sorted: the ledger's
    ids are random, and the same draws must pick the same order or position in every run."""
    choice = draw(st.sampled_from(["live", "live", "live", "live", "any", "unknown"]))
    ids = [] if choice == "unknown" else live if choice == "live" and live else list(pool)
    if not ids:
        return str(uuid.uuid4()), None
    picked = draw(st.sampled_from(ids))
    return picked, pool[picked]


def _deep(levels: int, leaf: Any = None) -> str:
    """JSON text nested ``levels`` deep (built as text: json.dumps would recurse)."""
    kind = levels % 2
    return ("[" * levels + json.dumps(leaf) + "]" * levels) if kind else ('{"a":' * levels + "1" + "}" * levels)


MUTATIONS = (
    "set-field",
    "inject-id",
    "drop-field",
    "number-for-string",
    "huge-value",
    "type-name",
    "no-type",
    "no-data",
    "extra-entry-field",
    "duplicate-json-key",
    "data-not-object",
    "deep-data",
    "deep-metadata",
    "random-bytes",
    "random-text",
)
ID_FIELDS = (
    "user_id",
    "command_id",
    "symbol",
    "exchange",
    "order_id",
    "position_id",
    "fill_id",
    "exchange_order_id",
    "client_order_id",
    "fee_currency",
)
DECIMAL_FIELDS = ("quantity", "price", "size", "fee", "trigger_price", "stop_loss", "take_profit")


def hostile(draw: st.DrawFn, kind: str, data: dict[str, Any]) -> Planned:
    """A hostile mutation of a valid command ``kind``/``data``."""
    mutation = draw(st.sampled_from(MUTATIONS))
    ascii_only = draw(st.booleans())
    data = dict(data)
    label = mutation
    if mutation == "set-field":
        name = draw(st.sampled_from(sorted({*data, "side", "order_type", "reduce_only", "metadata", "reason"})))
        data[name] = draw(st.sampled_from([*WRONG_TYPES, *TEXT_TRICKS]))
        label += f":{name}"
    elif mutation == "inject-id":
        name = draw(st.sampled_from([n for n in ID_FIELDS if n in data] or ["user_id"]))
        data[name] = draw(st.sampled_from(injections(str(data.get(name, "alice")))))
        label += f":{name}"
    elif mutation == "drop-field":
        name = draw(st.sampled_from(sorted(data)))
        del data[name]
        label += f":{name}"
    elif mutation == "number-for-string":
        names = [n for n in (*DECIMAL_FIELDS, "user_id", "command_id") if n in data]
        name = draw(st.sampled_from(names))
        value = data[name]
        try:
            number: Any = int(value) if value.isdigit() else float(value)
        except ValueError:
            number = 123
        data[name] = number
        label += f":{name}"
    elif mutation == "huge-value":
        choices: list[tuple[str, Any]] = [(n, v) for n in DECIMAL_FIELDS if n in data for v in DECIMAL_TRICKS]
        choices += [("ts", v) for v in TS_TRICKS] if kind == "record_fill" else []
        choices += [(n, v) for n in ("leverage", "grid_level") for v in INT_TRICKS]
        choices += [("reason", "r" * 10_000), ("reason", "stop\u0000"), ("reason", "line\nbreak"), ("reason", "")]
        choices += [("metadata", m) for m in ("big", "deep", "nul", "nul-key", "not-object")]
        name, value = draw(st.sampled_from(choices))
        data[name] = hostile_metadata(value) if name == "metadata" else value
        label += f":{name}"
    elif mutation == "type-name":
        type_name = draw(
            st.sampled_from(
                [
                    "nope",
                    "",
                    kind.upper(),
                    kind + "\n",
                    kind + "\u0000",
                    " " + kind,
                    "PlaceOrder",
                    "record_fill",
                    "open_position",
                ]
            )
        )
        return entry(type_name, encode(data, ascii_only), f"{label}:{type_name!r}")
    elif mutation == "no-type":
        return Planned({b"data": encode(data, ascii_only)}, label, False)
    elif mutation == "no-data":
        return entry(kind, None, label)
    elif mutation == "extra-entry-field":
        planned = entry(kind, encode(data, ascii_only), label)
        return Planned({**planned.fields, b"data2": b"{}", b"x\x00": b"\xff"}, label, False)
    elif mutation == "duplicate-json-key":
        name = draw(st.sampled_from(sorted(data)))
        text = encode(data, ascii_only)
        injected = draw(st.sampled_from(injections(str(data[name]))))
        twice = json.dumps(injected).encode("utf-8", "surrogatepass")
        where = draw(st.sampled_from(["after", "before"]))
        body = (
            text[:-1] + b', "' + name.encode() + b'": ' + twice + b"}"
            if where == "after"
            else b'{"' + name.encode() + b'": ' + twice + b", " + text[1:]
        )
        return entry(kind, body, f"{label}:{name}:{where}")
    elif mutation == "data-not-object":
        return entry(kind, encode(draw(st.sampled_from([[data], "x", 1, None, True, []])), ascii_only), label)
    elif mutation == "deep-data":
        return entry(kind, _deep(draw(st.sampled_from([1000, 1001, 5000, 100_000]))).encode(), label)
    elif mutation == "deep-metadata":
        levels = draw(st.sampled_from([1000, 1001, 3000]))
        text = encode(data, True)
        return entry(kind, text[:-1] + b', "metadata": ' + _deep(levels).encode() + b"}", label)
    elif mutation == "random-bytes":
        return entry(draw(st.binary(max_size=12)), draw(st.binary(max_size=200)), label)
    else:
        return entry(kind, draw(st.text(max_size=80)).encode("utf-8", "surrogatepass"), label)
    return entry(kind, encode(data, ascii_only), label)


def hostile_metadata(name: str) -> Any:
    """1 MB of metadata, 20 levels of it, NUL in a value or a key, or not an object."""
    if name == "big":
        return {"blob": "x" * 1_000_000}
    if name == "deep":
        value: dict[str, Any] = {"leaf": 1}
        for _ in range(20):
            value = {"a": value}
        return value
    return {"nul": {"note": "a\u0000b"}, "nul-key": {"a\u0000": 1}, "not-object": ["a"]}[name]
