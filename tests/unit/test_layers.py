"""The layers of the tree (README, Architecture), checked from the code's own imports: the pure
domain imports no I/O, only the composition root imports ``consumers`` and ``projections``, nothing
imports the composition root, and no package or module imports itself back through a cycle."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ledger", "projections", "consumers")
IO = {"redis", "psycopg", "psycopg_pool", "asyncio", "ccxt", "socket", "subprocess", "aiohttp"}


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _is_module(name: str) -> bool:
    base = ROOT / name.replace(".", "/")
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def _imports() -> dict[str, set[str]]:
    """Every product module -> the modules it imports (``from p import m`` counts as ``p.m``)."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            names = found.setdefault(_module(path), set())
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    subs = {f"{node.module}.{alias.name}" for alias in node.names}
                    modules = {name for name in subs if _is_module(name)}
                    names |= modules or {node.module}
                    if len(modules) < len(subs):
                        names.add(node.module)
    return found


IMPORTS = _imports()


def _layer(module: str) -> str:
    """A package of ``ledger`` (``ledger.domain``) or one of its shared modules (``ledger.config``);
    ``consumers`` and ``projections`` whole."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "ledger" else parts[0]


def _cycles(graph: dict[str, set[str]]) -> Iterator[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(node: str) -> Iterator[list[str]]:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                yield from visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                yield sorted(component)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            yield from visit(node)


def test_the_domain_imports_no_io_and_nothing_above_it() -> None:
    allowed = ("ledger.domain", "ledger.errors", "ledger.defaults")
    offenders = {
        (module, name)
        for module, names in IMPORTS.items()
        if module.startswith("ledger.domain")
        for name in names
        if name.split(".")[0] in IO or (name.split(".")[0] in PACKAGES and not name.startswith(allowed))
    }
    assert offenders == set()


def test_only_the_composition_root_imports_consumers_and_projections() -> None:
    offenders = {
        (module, name)
        for module, names in IMPORTS.items()
        if module.startswith("ledger") and not module.startswith("ledger.app")
        for name in names
        if name.split(".")[0] in ("consumers", "projections")
    }
    assert offenders == set()


def test_nothing_imports_the_composition_root() -> None:
    offenders = {
        (module, name)
        for module, names in IMPORTS.items()
        if not module.startswith("ledger.app") and module != "ledger"
        for name in names
        if name.startswith("ledger.app")
    }
    assert offenders == set()


def test_no_import_cycles_between_modules_or_layers() -> None:
    modules = {m: {n for n in names if n in IMPORTS and n != m and n != "ledger"} for m, names in IMPORTS.items()}
    assert list(_cycles(modules)) == []
    layers: dict[str, set[str]] = {}
    for module, names in modules.items():
        if module == "ledger":
            continue  # the public API re-exported by the package itself
        layers.setdefault(_layer(module), set()).update(_layer(n) for n in names if _layer(n) != _layer(module))
    assert list(_cycles(layers)) == []
