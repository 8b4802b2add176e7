"""The ids of the commands the paper and the live venue publish about an order are pinned: a
redelivered report must publish the same id again for the handler's deduplication to absorb it,
so changing one would record a report twice across an upgrade."""

from __future__ import annotations

from consumers import paper
from ledger.venues import commands

ORDER = "0b7e4c2a-9f3d-4e1b-8a6c-5d2f1e0a9b8c"


def test_paper_and_venue_command_ids_are_exactly_as_published() -> None:
    assert [
        (ids.accept(ORDER), ids.reject(ORDER), ids.cancel(ORDER), ids.expire(ORDER))
        for ids in (paper.IDS, commands.IDS)
    ] == [
        (
            "paper:0b7e4c2a-9f3d-4e1b-8a6c-5d2f1e0a9b8c:accept",
            "paper:0b7e4c2a-9f3d-4e1b-8a6c-5d2f1e0a9b8c:reject",
            "paper:0b7e4c2a-9f3d-4e1b-8a6c-5d2f1e0a9b8c:cancel",
            "paper:0b7e4c2a-9f3d-4e1b-8a6c-5d2f1e0a9b8c:expire",
        ),
        (
            "venue:0b7e4c2a-9f3d-4e1b-8a6c-5d2f1e0a9b8c:accept",
            "venue:0b7e4c2a-9f3d-4e1b-8a6c-5d2f1e0a9b8c:reject",
            "venue:0b7e4c2a-9f3d-4e1b-8a6c-5d2f1e0a9b8c:cancel",
            "venue:0b7e4c2a-9f3d-4e1b-8a6c-5d2f1e0a9b8c:expire",
        ),
    ]


def test_fill_ids_stay_each_venues_own() -> None:
    """The paper venue fills an order once; the live venue once per venue trade."""
    assert paper.fill_command_id(ORDER) == "paper:0b7e4c2a-9f3d-4e1b-8a6c-5d2f1e0a9b8c:fill"
    assert commands.fill_command_id(ORDER, "7001") == "venue:0b7e4c2a9f3d4e1b8a6c5d2f1e0a9b8c:fill:8611389f952d506d"
