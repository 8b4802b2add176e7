"""One error root (``ledger.errors``): every exception class of the product derives from
``LedgerError`` and keeps its built-in base, and the command line turns each into one line.
Pure: no servers."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import psycopg
import pytest
import redis.exceptions

import consumers
import ledger
import projections
from ledger.app.cli import EXIT_FAILURE, EXIT_USAGE, failure_line
from ledger.domain.state import StateError
from ledger.domain.wire import WireError
from ledger.errors import HandlingSignal, Inconsistent, InvalidInput, LedgerError, OperationFailed

PACKAGES = (ledger, consumers, projections)

# Every exception class the product defines: (its family, the built-in class it keeps).
EXPECTED: dict[str, tuple[type[LedgerError], type[Exception]]] = {
    "ledger.client.api.CommandRejected": (OperationFailed, RuntimeError),
    "ledger.client.api.LedgerTimeout": (OperationFailed, RuntimeError),
    "ledger.app.console.CliError": (OperationFailed, RuntimeError),
    "ledger.app.console.UsageError": (InvalidInput, ValueError),
    "ledger.config.ConfigError": (InvalidInput, ValueError),
    "ledger.errors.HandlingSignal": (HandlingSignal, Exception),
    "ledger.errors.Inconsistent": (Inconsistent, RuntimeError),
    "ledger.errors.InvalidInput": (InvalidInput, ValueError),
    "ledger.errors.LedgerError": (LedgerError, Exception),
    "ledger.errors.OperationFailed": (OperationFailed, RuntimeError),
    "ledger.store.redis_conn.ShardCountMismatch": (OperationFailed, RuntimeError),
    "ledger.app.servers.ServerError": (OperationFailed, RuntimeError),
    "ledger.config.ServerNotConfigured": (OperationFailed, RuntimeError),
    "ledger.domain.state.StateError": (Inconsistent, RuntimeError),
    "ledger.domain.values.ValueRuleError": (InvalidInput, ValueError),
    "ledger.domain.wire.UnknownEventType": (InvalidInput, ValueError),
    "ledger.domain.wire.WireError": (InvalidInput, ValueError),
    "ledger.store.log.LogError": (OperationFailed, RuntimeError),
    "consumers.together.RolesStuck": (OperationFailed, RuntimeError),
    "projections.rebuild.RebuildError": (OperationFailed, RuntimeError),
    "consumers.runner.LeaseLost": (HandlingSignal, Exception),
    "consumers.runner.Undeliverable": (HandlingSignal, Exception),
}
# The decider's internal control flow: caught in `decide`, returned as a `Rejection` value.
OUTSIDE = {"ledger.domain.decider._Rejected"}


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        names.append(package.__name__)
        names += [m.name for m in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")]
    return names


def _exception_classes() -> dict[str, type[BaseException]]:
    found = {}
    for name in _modules():
        module = importlib.import_module(name)
        for _attr, value in inspect.getmembers(module, inspect.isclass):
            if issubclass(value, BaseException) and value.__module__ == name:
                found[f"{name}.{value.__qualname__}"] = value
    return found


def test_every_exception_class_of_the_product_is_under_the_one_root() -> None:
    classes = _exception_classes()
    assert set(EXPECTED) | OUTSIDE <= set(classes)
    families = (InvalidInput, OperationFailed, Inconsistent, HandlingSignal)
    for name, cls in classes.items():
        if name in OUTSIDE:
            assert not issubclass(cls, LedgerError), name
            continue
        assert issubclass(cls, LedgerError), name
        assert sum(issubclass(cls, family) for family in families) <= 1, name
        assert name.startswith("ledger.errors.") or any(issubclass(cls, family) for family in families), name
    for name, (family, builtin) in EXPECTED.items():
        assert issubclass(classes[name], family) and issubclass(classes[name], builtin), name


def test_the_root_is_public_where_it_always_was() -> None:
    from ledger.client import api

    assert ledger.LedgerError is api.LedgerError is LedgerError
    assert issubclass(ledger.CommandRejected, LedgerError) and issubclass(ledger.LedgerTimeout, LedgerError)
    assert issubclass(ledger.CommandRejected, RuntimeError) and issubclass(ledger.LedgerTimeout, RuntimeError)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (InvalidInput("--data: must be a JSON object"), (EXIT_USAGE, "--data: must be a JSON object")),
        (
            WireError("INVALID_JSON", "data is not valid JSON: truncated"),
            (EXIT_USAGE, "data is not valid JSON: truncated"),
        ),
        (ValueError("status: give status or exact_status"), (EXIT_USAGE, "status: give status or exact_status")),
        (OperationFailed("no reply within 1 s: retry"), (EXIT_FAILURE, "no reply within 1 s: retry")),
        (
            StateError("OrderFilled v2 of o1: an order event for an order never placed\nmore"),
            (EXIT_FAILURE, "OrderFilled v2 of o1: an order event for an order never placed"),
        ),
        (LedgerError(""), (EXIT_FAILURE, "LedgerError")),
        (
            ExceptionGroup("tasks", [OperationFailed("the archive misses 3 entries.")]),
            (EXIT_FAILURE, "the archive misses 3 entries"),
        ),
        (
            redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:1."),
            (
                EXIT_FAILURE,
                "Redis: Error 111 connecting to 127.0.0.1:1: start it (`ledger serve` starts a private one) or "
                "point --redis-url / LEDGER_REDIS_URL at a running one",
            ),
        ),
        (
            psycopg.OperationalError("connection failed: refused"),
            (
                EXIT_FAILURE,
                "PostgreSQL: connection failed: refused: start it or point --database-url / "
                "LEDGER_DATABASE_URL at a running one",
            ),
        ),
    ],
)
def test_the_command_line_reports_every_ledger_error_on_one_line(exc: BaseException, expected: tuple[int, str]) -> None:
    assert failure_line(exc) == expected


def test_a_bug_is_not_reported_as_a_failure() -> None:
    """Anything outside the table keeps its traceback (it is a bug)."""
    assert failure_line(KeyError("x")) is None
    assert failure_line(AttributeError("x")) is None


def _asserts(node: ast.AST) -> bool:
    """An assert statement, or an AssertionError raised by hand (an "unreachable" marker)."""
    if isinstance(node, ast.Assert):
        return True
    raised = node.exc if isinstance(node, ast.Raise) else None
    target = raised.func if isinstance(raised, ast.Call) else raised
    return isinstance(target, ast.Name) and target.id == "AssertionError"


def test_no_assert_in_product_code() -> None:
    """``python -O`` removes assert statements: product code raises real exceptions, and code
    that cannot be reached is written so that it is not there."""
    found = []
    for package in PACKAGES:
        for path in sorted(Path(package.__path__[0]).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            found += [f"{path}:{node.lineno}" for node in ast.walk(tree) if _asserts(node)]
    assert found == []
