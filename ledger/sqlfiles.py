"""SQL statements kept in ``*.sql`` files in the ``sql/`` folder of the package that runs them.

A file holds named statements, procrastinate-style: each starts with a line ``-- name --``,
optionally followed by comment lines describing it, then the statement itself. Parameters use
psycopg's named style (``%(user_id)s``); a literal percent sign is written ``%%``.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

__all__ = ["load_queries", "parse_queries"]

# A query's name line; \n, not $ (which also matches before a trailing newline), ends it.
_NAME = re.compile(r"^-- ([a-z_][a-z0-9_]*) --(?=\n|\Z)", re.MULTILINE)


def parse_queries(text: str) -> dict[str, str]:
    """Split the text of a ``.sql`` file into ``{name: statement}``."""
    queries: dict[str, str] = {}
    parts = _NAME.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = body.strip().splitlines()
        while lines and lines[0].startswith("--"):
            lines.pop(0)
        statement = "\n".join(lines).strip()
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        if not statement:
            raise ValueError(f"query {name!r} is empty")
        queries[name] = statement
    return queries


@functools.cache
def load_queries(package: str, filename: str) -> dict[str, str]:
    """The named statements of ``<package>/sql/<filename>`` (package data)."""
    text = resources.files(package).joinpath("sql", filename).read_text(encoding="utf-8")
    return parse_queries(text)
