"""The handler's cheap per-command helpers keep their guarantees: ids are full random UUIDs
(``consumers.command_handler.new_uuid``), and exact decimal arithmetic holds whether a caller set
the context once for many calls or not (``ledger.domain.values.exact_arithmetic``)."""

from __future__ import annotations

import os
import uuid
from decimal import Context, Decimal, getcontext, localcontext

from consumers.command_handler import new_uuid
from ledger.domain.values import EXACT, RULES, exact, exact_arithmetic

# 28 digits (Python's default context) would round this sum to 1; the exact context keeps it.
TINY = Decimal("0.000000000000000000000000000001")
EXACT_SUM = Decimal("1.000000000000000000000000000001")


@exact
def _add(a: Decimal, b: Decimal) -> tuple[Decimal, Context]:
    return a + b, getcontext()


def test_ids_are_version_4_uuids_in_lower_case_and_never_repeat() -> None:
    ids = [new_uuid() for _ in range(1000)]  # several blocks of random bytes

    assert len(set(ids)) == 1000
    for text in ids:
        assert RULES["uuid"].matches(text), text
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, text)
    # 122 random bits: every digit but the version and the variant's high bits varies.
    assert {text[14] for text in ids} == {"4"}
    assert {text[19] for text in ids} == set("89ab")
    assert len({text[0] for text in ids}) == 16


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


def test_an_exact_function_is_exact_alone_and_leaves_the_callers_context() -> None:
    before = getcontext()

    total, inside = _add(Decimal(1), TINY)

    assert total == EXACT_SUM
    assert inside is not before
    assert getcontext() is before
    assert Decimal(1) + TINY == Decimal(1)  # the caller's 28 digits are back


def test_a_block_sets_the_exact_context_once_for_every_exact_function_it_calls() -> None:
    before = getcontext()
    with exact_arithmetic():
        block = getcontext()
        assert (block.prec, block.rounding, block.traps) == (EXACT.prec, EXACT.rounding, EXACT.traps)
        first, inside_first = _add(Decimal(1), TINY)
        second, inside_second = _add(first, TINY)
        with exact_arithmetic():
            assert getcontext() is block
        assert Decimal(1) + TINY == EXACT_SUM  # plain arithmetic in the block is exact too

    assert (first, second) == (EXACT_SUM, Decimal("1.000000000000000000000000000002"))
    assert inside_first is block and inside_second is block
    assert getcontext() is before


def test_an_exact_function_inside_another_context_of_the_block_is_still_exact() -> None:
    with exact_arithmetic(), localcontext(prec=5):
        total, inside = _add(Decimal(1), TINY)
        assert getcontext().prec == 5

    assert total == EXACT_SUM
    assert inside.prec == EXACT.prec
