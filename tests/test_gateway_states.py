"""The states a gateway reports for a command: one enum, one transition table, and the
tracker every writer in the gateway moves a command through."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, cast

import pytest

from gateway_daemon.agent import Agent
from gateway_daemon.errors import TransitionRefused
from gateway_daemon.state import (
    KEEP_OUTCOMES,
    TRANSITIONS,
    AgentState,
    CommandState,
    CommandStates,
    Outcome,
    transition,
)
from hitless.v1 import bus_pb2, common_pb2

S = CommandState
# Every move the gateway makes, written out once more by hand: the table must say the same.
ALLOWED = {
    (S.QUEUED, S.DOWNLOADING),
    (S.QUEUED, S.SUCCEEDED),  # already on the target
    (S.QUEUED, S.FAILED),  # refused: superseded, a downgrade not allowed
    (S.QUEUED, S.UNREACHABLE),  # expired before it was taken
    (S.DOWNLOADING, S.DOWNLOADING),  # progress
    (S.DOWNLOADING, S.VERIFYING),
    (S.DOWNLOADING, S.FAILED),
    (S.VERIFYING, S.SWAPPING),
    (S.VERIFYING, S.FAILED),
    (S.SWAPPING, S.SUCCEEDED),  # reported by the new version
    (S.SWAPPING, S.ROLLED_BACK),
    (S.SWAPPING, S.FAILED),
    (S.SWAPPING, S.SOAKING),  # the new version, when the job has a soak
    (S.SOAKING, S.SUCCEEDED),  # its health held
    (S.SOAKING, S.ROLLED_BACK),  # it fell: the version before took the plane back
    (S.SOAKING, S.FAILED),  # it fell and the hand-back failed too
}


def test_the_table_allows_exactly_the_gateways_moves() -> None:
    table = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    assert table == ALLOWED
    assert set(TRANSITIONS) == set(CommandState)


@pytest.mark.parametrize(("current", "new"), list(itertools.product(CommandState, repeat=2)))
def test_transition_allows_the_table_and_refuses_the_rest(
    current: CommandState, new: CommandState
) -> None:
    if (current, new) in ALLOWED:
        assert transition(current, new) is new
    else:
        with pytest.raises(TransitionRefused, match=f"from {current} to {new}"):
            transition(current, new)


def test_ended_states_lead_nowhere() -> None:
    ended = {s for s in CommandState if s.terminal}
    assert ended == {S.SUCCEEDED, S.FAILED, S.ROLLED_BACK, S.UNREACHABLE}
    assert not any(TRANSITIONS[s] for s in ended)


def test_every_reported_state_is_a_state_of_the_protocol() -> None:
    for state in CommandState:
        assert common_pb2.GatewayJobState.Value(f"GATEWAY_JOB_STATE_{state}") > 0


def test_a_tracker_moves_a_command_along_the_table_and_refuses_a_step_back() -> None:
    states = CommandStates()
    assert states.get("c-1") is S.QUEUED
    for step in (S.DOWNLOADING, S.DOWNLOADING, S.VERIFYING, S.SWAPPING):
        states.move("c-1", step)
    with pytest.raises(TransitionRefused, match="from SWAPPING to DOWNLOADING"):
        states.move("c-1", S.DOWNLOADING)
    assert states.get("c-1") is S.SWAPPING, "a refused move changes nothing"
    states.move("c-1", S.ROLLED_BACK)
    with pytest.raises(TransitionRefused, match="it has ended"):
        states.move("c-1", S.FAILED)
    # Another command has a state of its own.
    assert states.move("c-2", S.UNREACHABLE) is S.UNREACHABLE


def test_a_tracker_keeps_the_newest_commands_only() -> None:
    states = CommandStates()
    for n in range(KEEP_OUTCOMES + 5):
        states.move(f"c-{n}", S.DOWNLOADING)
    assert states.get("c-0") is S.QUEUED
    assert states.get(f"c-{KEEP_OUTCOMES + 4}") is S.DOWNLOADING


def test_an_outcome_read_back_from_disk_carries_the_enum(tmp_path: Path) -> None:
    state = AgentState(tmp_path / "state")
    state.record_outcome("c-1", Outcome(S.ROLLED_BACK, "1.1.0", "1.0.0", "handoff failed"))
    outcome = state.outcome("c-1")
    assert outcome is not None and outcome.state is S.ROLLED_BACK
    # The file keeps the plain name, as earlier releases wrote and read it.
    assert '"state": "ROLLED_BACK"' in state.path.read_text()


class _Reports:
    """Records what the agent would publish (the table is what is under test here)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def status(self, command: bus_pb2.UpgradeCommand, state: str, **_: object) -> None:
        self.sent.append((command.command_id, str(state)))

    def outcome(self, command: bus_pb2.UpgradeCommand, outcome: Outcome) -> None:
        self.sent.append((command.command_id, str(outcome.state)))


def test_the_agent_reports_and_records_only_moves_the_table_allows(tmp_path: Path) -> None:
    reports = _Reports()
    state = AgentState(tmp_path / "state")
    agent = Agent(
        cast(Any, None), "1.0.0", state, cast(Any, reports), lambda c, p: None,
        cast(Any, None),
    )  # fmt: skip
    first = bus_pb2.UpgradeCommand(command_id="c-1", job_id="j-1", target_version="1.1.0")
    for step in (S.DOWNLOADING, S.DOWNLOADING, S.VERIFYING, S.SWAPPING):
        agent._status(first, step)
    agent._finish(first, Outcome(S.ROLLED_BACK, "1.1.0", "1.0.0", "handoff failed"))
    with pytest.raises(TransitionRefused):
        agent._status(first, S.DOWNLOADING)
    second = bus_pb2.UpgradeCommand(command_id="c-2", job_id="j-1", target_version="1.1.0")
    with pytest.raises(TransitionRefused):
        agent._finish(second, Outcome(S.ROLLED_BACK, "1.1.0", "1.0.0", "no swap was started"))
    assert reports.sent == [
        ("c-1", "DOWNLOADING"),
        ("c-1", "DOWNLOADING"),
        ("c-1", "VERIFYING"),
        ("c-1", "SWAPPING"),
        ("c-1", "ROLLED_BACK"),
    ]
    assert state.outcome("c-2") is None, "a refused move records nothing"
