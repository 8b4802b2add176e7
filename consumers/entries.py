"""One entry of a Redis stream as the consumers hand it to their handlers."""

from __future__ import annotations

from typing import Any, NamedTuple


class Entry(NamedTuple):
    """A stream entry: its id and its fields (as read, before any decoding; a tuple: one is
    built for every entry every consumer reads)."""

    id: str
    fields: dict[str, Any]
