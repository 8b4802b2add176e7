"""One entry of a Redis stream as the consumers hand it to their handlers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Entry:
    """A stream entry: its id and its fields (as read, before any decoding)."""

    id: str
    fields: dict[str, Any]
