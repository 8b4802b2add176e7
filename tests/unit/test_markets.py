"""Markets (issue 11, item 1): the bundled ccxt snapshot, resolution of symbols and native ids,
the domain's instrument data taken from it, the real ccxt classes loaded with it offline, and
``ledger markets show`` / ``sync``. No network: a sync talks to a recorded venue on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import ccxt
import ccxt.async_support
import pytest
from venue_server import recorded_venue, recording

from ledger.app.cli import main
from ledger.app.servers import free_port
from ledger.domain.enums import Exchange, InstrumentKind
from ledger.domain.instruments import Instrument, classify, instrument_for
from ledger.venues import exchanges
from ledger.venues.markets import MarketError, Markets, bundled, instrument_table, snapshot_path

D = Decimal
OKX, BINANCE, UPBIT = Exchange.OKX, Exchange.BINANCE, Exchange.UPBIT

# (exchange, name sent, unified symbol, native id, kind, settle; contract size, amount step, price step, min amount)
FACTS = [
    (OKX, "BTC-USDT-SWAP", "BTC/USDT:USDT", "BTC-USDT-SWAP", "linear", "USDT", "0.01", "0.01", "0.1", "0.01"),
    (OKX, "ETH-USDT-SWAP", "ETH/USDT:USDT", "ETH-USDT-SWAP", "linear", "USDT", "0.1", "0.01", "0.01", "0.01"),
    (OKX, "BTC-USD-SWAP", "BTC/USD:BTC", "BTC-USD-SWAP", "inverse", "BTC", "100", "1", "0.1", "1"),
    (OKX, "BTC-USDT", "BTC/USDT", "BTC-USDT", "spot", "USDT", None, "0.00000001", "0.1", "0.00001"),
    (BINANCE, "BTC/USDT:USDT", "BTC/USDT:USDT", "BTCUSDT", "linear", "USDT", "1", "0.001", "0.1", "0.001"),
    (BINANCE, "BTCUSD_PERP", "BTC/USD:BTC", "BTCUSD_PERP", "inverse", "BTC", "100", "1", "0.1", "1"),
    (BINANCE, "BTC/USDT", "BTC/USDT", "BTCUSDT", "spot", "USDT", None, "0.00001", "0.01", "0.00001"),
    (UPBIT, "KRW-BTC", "BTC/KRW", "KRW-BTC", "spot", "KRW", None, "0.00000001", "0.00000001", None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("exchange", "name", "symbol", "native", "kind", "settle", "size", "amount", "price", "minimum"), FACTS
)
def test_each_snapshot_market_gives_its_exact_facts(
    exchange: Exchange,
    name: str,
    symbol: str,
    native: str,
    kind: str,
    settle: str,
    size: str | None,
    amount: str,
    price: str,
    minimum: str | None,
) -> None:
    market = bundled(exchange).resolve(name)
    assert (market.symbol, market.id, market.kind.value, market.settle) == (symbol, native, kind, settle)
    exact = [None if v is None else D(v) for v in (size, amount, price, minimum)]
    assert [market.contract_size, market.amount_precision, market.price_precision, market.limits["amount"][0]] == exact
    for value in (market.contract_size, market.amount_precision, market.price_precision):
        assert value is None or type(value) is Decimal
    assert bundled(exchange).resolve(symbol) is market
    assert bundled(exchange).resolve(native).id == native  # Binance BTCUSDT: see the ambiguity tests


def test_a_market_as_json_has_every_fact_as_exact_strings() -> None:
    assert bundled(OKX).resolve("BTC-USDT-SWAP").as_dict() == {
        "exchange": "okx",
        "symbol": "BTC/USDT:USDT",
        "id": "BTC-USDT-SWAP",
        "type": "swap",
        "kind": "linear",
        "base": "BTC",
        "quote": "USDT",
        "settle": "USDT",
        "contract_size": "0.01",
        "precision": {"amount": "0.01", "price": "0.1"},
        "limits": {
            "amount": {"min": "0.01", "max": "100000000"},
            "price": {"min": None, "max": None},
            "cost": {"min": None, "max": None},
            "leverage": {"min": "1", "max": "100"},
        },
        "active": True,
    }


def test_ledger_quantity_steps_are_in_base_units_for_linear_contracts() -> None:
    # ccxt counts OKX swap amounts in contracts (0.01 contract of 0.01 BTC); the ledger in BTC.
    assert bundled(OKX).resolve("BTC-USDT-SWAP").quantity_step == D("0.0001")
    assert bundled(OKX).resolve("BTC-USD-SWAP").quantity_step == D("1")  # inverse: contracts
    assert bundled(BINANCE).resolve("BTC/USDT:USDT").quantity_step == D("0.001")


# --------------------------------------------------------------------------- resolution


def test_names_resolve_without_regard_to_case() -> None:
    market = bundled(OKX).resolve("BTC-USDT-SWAP")
    assert bundled(OKX).resolve("btc-usdt-swap") is market is bundled(OKX).resolve("btc/usdt:usdt")


def test_an_id_binance_shares_between_spot_and_perpetual_is_the_default_type_spot() -> None:
    markets = bundled(BINANCE)
    assert markets.default_type == "spot"
    assert markets.resolve("BTCUSDT").symbol == "BTC/USDT"
    assert markets.resolve("BTC/USDT:USDT").id == "BTCUSDT"  # the perpetual by its unified symbol
    swap = Markets(BINANCE, markets, default_type="swap")
    assert swap.resolve("BTCUSDT").symbol == "BTC/USDT:USDT"


def test_an_id_the_default_type_does_not_pick_is_refused_with_its_candidates() -> None:
    markets = Markets(BINANCE, bundled(BINANCE), default_type="future")
    with pytest.raises(MarketError) as caught:
        markets.resolve("BTCUSDT")
    assert str(caught.value) == (
        "binance id 'BTCUSDT' names 2 markets and the default type 'future' does not pick one: "
        "use the unified symbol BTC/USDT or BTC/USDT:USDT"
    )
    assert markets.resolve("BTC/USDT:USDT").kind is InstrumentKind.LINEAR
    assert ("BTCUSDT", markets.resolve("BTC/USDT")) not in list(markets.spellings())


def test_an_unknown_market_says_how_to_list_or_add_markets() -> None:
    with pytest.raises(MarketError) as caught:
        bundled(UPBIT).resolve("KRW-DOGE")
    assert str(caught.value) == (
        "upbit has no market 'KRW-DOGE' in the snapshot: `ledger markets show upbit` lists them, "
        "`ledger markets sync upbit --symbol KRW-DOGE` adds it"
    )


# --------------------------------------------------------------------------- the domain's instrument data


def test_instruments_of_known_markets_come_from_the_market() -> None:
    assert instrument_for(OKX, "BTC-USDT-SWAP", instrument_table()) == Instrument(
        InstrumentKind.LINEAR, "BTC", "USDT", "USDT", D(1), D("0.01"), "BTC/USDT:USDT"
    )
    inverse = Instrument(InstrumentKind.INVERSE, "BTC", "USD", "BTC", D(100), D(100), "BTC/USD:BTC")
    assert (
        instrument_for(OKX, "BTC-USD-SWAP", instrument_table())
        == inverse
        == instrument_for(OKX, "btc/usd:btc", instrument_table())
    )
    assert instrument_for(BINANCE, "BTCUSD_PERP", instrument_table()) == inverse
    assert instrument_for(BINANCE, "BTCUSDT", instrument_table()).kind is InstrumentKind.SPOT  # the default type
    assert instrument_for(UPBIT, "KRW-BTC", instrument_table()) == Instrument(
        InstrumentKind.SPOT, "BTC", "KRW", "KRW", D(1), D(1), "BTC/KRW"
    )


def test_symbols_not_in_the_snapshot_keep_the_shape_rule() -> None:
    assert instrument_for(OKX, "DOGE-USD-SWAP", instrument_table()) == classify(OKX, "DOGE-USD-SWAP")
    assert instrument_for(OKX, "DOGE-USD-SWAP", instrument_table()) == Instrument(
        InstrumentKind.INVERSE, "DOGE", "USD", "DOGE", D(10), D(10)
    )
    assert instrument_for(BINANCE, "SOLUSDT", instrument_table()).market is None


def test_the_domain_takes_instrument_data_as_input() -> None:
    face_50 = Instrument(InstrumentKind.INVERSE, "BTC", "USD", "BTC", D(50), D(50), "BTC/USD:BTC")
    table = {(OKX, "BTC-USD-SWAP"): face_50}
    assert instrument_for(OKX, "BTC-USD-SWAP", table) is face_50
    assert instrument_for(OKX, "BTC-USDT-SWAP", table) == classify(OKX, "BTC-USDT-SWAP")  # not in that table


def test_the_domain_imports_no_ccxt() -> None:
    code = (
        "import sys; import ledger.domain.decider, ledger.domain.arithmetic;"
        "from ledger.domain.instruments import instrument_for;"
        "from ledger.domain.enums import Exchange; from ledger.venues.markets import instrument_table;"
        "instrument_for(Exchange.OKX, 'BTC-USD-SWAP', instrument_table());"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'ccxt'))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout == "[]\n"


# --------------------------------------------------------------------------- the real ccxt classes, offline


def test_ccxt_classes_are_loaded_with_the_snapshot_without_a_request() -> None:
    with recorded_venue([]) as venue:
        binance = exchanges.client(BINANCE, base_url=venue.url)
        assert type(binance) is ccxt.binance
        assert binance.market("BTC/USDT:USDT")["id"] == "BTCUSDT"
        assert binance.market("BTCUSDT")["symbol"] == "BTC/USDT"  # ccxt's own rule agrees: defaultType spot
        assert binance.amount_to_precision("BTC/USDT:USDT", "0.12345") == "0.123"
        assert binance.price_to_precision("BTC/USDT:USDT", "45000.123") == "45000.1"
        assert binance.market("BTCUSD_PERP")["contractSize"] == 100
        okx = exchanges.client(OKX, base_url=venue.url)
        assert type(okx) is ccxt.okx
        assert okx.market("BTC-USDT-SWAP")["contractSize"] == 0.01
        assert okx.amount_to_precision("BTC-USDT-SWAP", "1.239") == "1.23"  # contracts
        upbit = exchanges.client(UPBIT, base_url=venue.url)
        assert upbit.market("KRW-BTC")["symbol"] == "BTC/KRW"
        assert venue.requests == []


async def test_the_async_classes_are_loaded_with_the_snapshot_too() -> None:
    okx = exchanges.async_client(OKX)
    try:
        assert type(okx) is ccxt.async_support.okx
        assert okx.market("BTC/USD:BTC")["id"] == "BTC-USD-SWAP"
        assert okx.options["defaultType"] == "spot"
    finally:
        await okx.close()


# --------------------------------------------------------------------------- the command line


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_markets_show_prints_the_snapshot_as_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = _run(capsys, "markets", "show", "okx")
    assert (status, err) == (0, "")
    assert out.splitlines() == [  # numbers right-aligned, no trailing spaces
        "symbol         id             type  kind     settle  contract_size  amount_step  price_step  min_amount",
        "BTC/USD:BTC    BTC-USD-SWAP   swap  inverse  BTC               100            1         0.1           1",
        "BTC/USDT       BTC-USDT       spot  spot     USDT                    0.00000001         0.1     0.00001",
        "BTC/USDT:USDT  BTC-USDT-SWAP  swap  linear   USDT             0.01         0.01         0.1        0.01",
        "ETH/USD:ETH    ETH-USD-SWAP   swap  inverse  ETH                10            1        0.01           1",
        "ETH/USDT       ETH-USDT       spot  spot     USDT                      0.000001        0.01      0.0001",
        "ETH/USDT:USDT  ETH-USDT-SWAP  swap  linear   USDT              0.1         0.01        0.01        0.01",
    ]


def test_markets_show_one_market_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _run(capsys, "markets", "show", "binance", "BTCUSD_PERP", "--json")
    assert status == 0
    assert json.loads(out) == [
        {
            "exchange": "binance",
            "symbol": "BTC/USD:BTC",
            "id": "BTCUSD_PERP",
            "type": "swap",
            "kind": "inverse",
            "base": "BTC",
            "quote": "USD",
            "settle": "BTC",
            "contract_size": "100",
            "precision": {"amount": "1", "price": "0.1"},
            "limits": {
                "amount": {"min": "1", "max": "1000000"},
                "price": {"min": "1000", "max": "4520958"},
                "cost": {"min": None, "max": None},
                "leverage": {"min": None, "max": None},
            },
            "active": True,
        }
    ]


def test_markets_show_of_an_unknown_market_is_one_line_and_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = _run(capsys, "markets", "show", "okx", "BTC-EUR-SWAP")
    assert (status, out) == (2, "")
    assert err == (
        "ledger: okx has no market 'BTC-EUR-SWAP' in the snapshot: `ledger markets show okx` lists them, "
        "`ledger markets sync okx --symbol BTC-EUR-SWAP` adds it\n"
    )


def test_markets_sync_without_a_venue_is_one_line_and_changes_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    port = free_port()  # nothing listens there
    output = tmp_path / "okx.json"
    status, out, err = _run(
        capsys, "markets", "sync", "okx", "--base-url", f"http://127.0.0.1:{port}", "--output", str(output)
    )
    assert (status, out) == (1, "")
    assert err == (
        f"ledger: okx: cannot load markets from http://127.0.0.1:{port} (no answer: NetworkError): check the network "
        "(or --base-url) and run `ledger markets sync` again; the snapshot is unchanged\n"
    )
    assert not output.exists()


@pytest.mark.parametrize("exchange", list(Exchange))
def test_the_bundled_snapshot_is_what_sync_makes_of_the_recorded_venue(exchange: Exchange, tmp_path: Path) -> None:
    """How the snapshot was made: ``ledger markets sync`` against the recorded responses."""
    output = tmp_path / f"{exchange.value}.json"
    with recorded_venue(recording("markets", exchange.value)) as venue:
        result = exchanges.sync(exchange, output=output, base_url=venue.url)
    assert venue.unanswered == []
    assert result.missing == []
    assert output.read_text(encoding="utf-8") == snapshot_path(exchange).read_text(encoding="utf-8")


def test_sync_adds_the_markets_asked_for_and_names_those_the_venue_does_not_list(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    output = tmp_path / "upbit.json"
    output.write_text(json.dumps({"exchange": "upbit", "ccxt": "0", "markets": []}), encoding="utf-8")
    with recorded_venue(recording("markets", "upbit")) as venue:
        status, out, err = _run(
            capsys, "markets", "sync", "upbit", "--base-url", venue.url, "--output", str(output),
            "--symbol", "KRW-ETH", "--symbol", "BTC/KRW", "--symbol", "KRW-DOGE",
        )  # fmt: skip
    assert (status, err) == (0, "")
    assert out == f"upbit: 2 markets written to {output}; not listed by the venue: KRW-DOGE\n"
    written = json.loads(output.read_text(encoding="utf-8"))
    assert (written["ccxt"], [m["id"] for m in written["markets"]]) == (ccxt.__version__, ["KRW-BTC", "KRW-ETH"])
