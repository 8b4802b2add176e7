"""The ledger's ids (``ledger.domain.ids``): time-ordered version 7 UUIDs that never repeat, in
one process or across a fork, and the API's and CLI's default command ids built on them."""

from __future__ import annotations

import os
import time
import uuid

from ledger.domain.ids import new_command_id, new_uuid
from ledger.domain.values import RULES


def test_ids_are_time_ordered_version_7_uuids_in_lower_case_and_never_repeat() -> None:
    before = time.time_ns() // 1_000_000
    ids = [new_uuid() for _ in range(3000)]  # several blocks of random bytes, many in one millisecond
    after = time.time_ns() // 1_000_000

    assert len(set(ids)) == 3000
    for text in ids:
        assert RULES["uuid"].matches(text), text
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant, str(parsed)) == (7, uuid.RFC_4122, text)
        assert before <= parsed.int >> 80 <= after  # the first 48 bits: the Unix time in ms
    assert [uuid.UUID(t).int >> 80 for t in ids] == sorted(uuid.UUID(t).int >> 80 for t in ids)
    # 74 random bits: every digit after the time but the version and the variant's high bits varies.
    assert {text[14] for text in ids} == {"7"}
    assert {text[19] for text in ids} == set("89ab")
    for at in (15, 16, 17, 20, 21, 22, *range(24, 36)):
        assert len({text[at] for text in ids}) == 16, at


def test_a_forked_process_does_not_hand_out_the_parents_ids() -> None:
    new_uuid()  # the parent holds a block of random digits
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(write, new_uuid().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    from_child = os.read(read, 64).decode()
    os.close(read)

    assert RULES["uuid"].matches(from_child)
    assert from_child != new_uuid()


def test_a_default_command_id_is_its_origin_and_a_time_ordered_uuid_within_the_contracts_rule() -> None:
    before = time.time_ns() // 1_000_000
    ids = [new_command_id("api") for _ in range(500)]
    after = time.time_ns() // 1_000_000

    assert len(set(ids)) == 500
    for text in ids:
        assert RULES["command_id"].matches(text), text
        origin, _, rest = text.partition("-")
        parsed = uuid.UUID(rest)
        assert (origin, parsed.version, str(parsed)) == ("api", 7, rest)
        assert before <= parsed.int >> 80 <= after
    assert ids == sorted(ids, key=lambda text: uuid.UUID(text[4:]).int >> 80)
    assert len(new_command_id("cli")) == 40
