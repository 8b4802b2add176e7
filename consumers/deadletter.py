"""Dead letters: entries that could not be processed, kept with the reason (CONTRACT §2)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ledger.values import now_ms


def dead_letter_fields(
    fields: Mapping[str, Any], *, stream: str, entry_id: str, group: str, code: str, reason: str
) -> dict[str, Any]:
    """The original fields plus ``dead_*`` fields saying where the entry came from and why."""
    return {
        **fields,
        "dead_code": code,
        "dead_reason": reason,
        "dead_stream": stream,
        "dead_entry_id": entry_id,
        "dead_group": group,
        "dead_ts": str(now_ms()),
    }
