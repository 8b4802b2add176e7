"""``ledger serve``'s child processes: which roles run together, and the setting that chooses
the mode (the processes themselves: tests/blackbox/test_serve_processes.py)."""

from __future__ import annotations

import pytest

from ledger.app.processes import niceness, process_groups
from ledger.app.service import BACKGROUND_NICE, PROCESS_GROUPS, ROLES
from ledger.config import ConfigError, Settings


def test_every_role_runs_in_exactly_one_process_group() -> None:
    grouped = [role for group in PROCESS_GROUPS for role in group]
    assert sorted(grouped) == sorted(ROLES)
    assert len(grouped) == len(set(grouped))


def test_the_groups_keep_only_the_roles_asked_for_in_their_order() -> None:
    assert process_groups(list(ROLES)) == list(PROCESS_GROUPS)
    assert process_groups(["paper", "retention", "handler"]) == [("handler",), ("paper",), ("retention",)]
    assert process_groups(["venue", "paper"]) == [("paper", "venue")]
    assert process_groups(["projection"]) == [("projection",)]


def test_the_order_path_runs_at_normal_priority_and_the_history_and_retention_lower() -> None:
    assert BACKGROUND_NICE == 10
    assert [niceness(group) for group in PROCESS_GROUPS] == [0, 0, 10]
    assert niceness(("retention",)) == niceness(("projector",)) == 10
    assert niceness(("handler",)) == niceness(("projection", "paper")) == 0


def test_the_process_mode_setting() -> None:
    assert Settings().processes == "roles"
    assert Settings.from_env({"LEDGER_PROCESSES": "1"}).processes == "1"
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"LEDGER_PROCESSES": "4"})
    assert str(caught.value) == "LEDGER_PROCESSES / --processes: must be one of roles, 1 (got '4')"
