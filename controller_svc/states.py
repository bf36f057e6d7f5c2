"""The two state machines of an upgrade, as enums and transition rules.

    Job:              PENDING -> RUNNING -> SUCCEEDED | PARTIAL | FAILED  (| CANCELLED)
    Gateway in a job: QUEUED -> DOWNLOADING -> VERIFYING -> SWAPPING
                             -> SUCCEEDED | FAILED | ROLLED_BACK | UNREACHABLE

Reports may skip states (a gateway already on the target reports SUCCEEDED at once; a
report may be lost) but never go back: a late DOWNLOADING after SWAPPING is ignored.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class JobState(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    PARTIAL = "PARTIAL"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in _JOB_TERMINAL


class GatewayState(StrEnum):
    QUEUED = "QUEUED"
    DOWNLOADING = "DOWNLOADING"
    VERIFYING = "VERIFYING"
    SWAPPING = "SWAPPING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    ROLLED_BACK = "ROLLED_BACK"
    UNREACHABLE = "UNREACHABLE"

    @property
    def terminal(self) -> bool:
        return self in _GATEWAY_TERMINAL


_JOB_TERMINAL = frozenset(
    {JobState.SUCCEEDED, JobState.PARTIAL, JobState.FAILED, JobState.CANCELLED}
)
_GATEWAY_TERMINAL = frozenset(
    {
        GatewayState.SUCCEEDED,
        GatewayState.FAILED,
        GatewayState.ROLLED_BACK,
        GatewayState.UNREACHABLE,
    }
)
_RANK = {
    GatewayState.QUEUED: 0,
    GatewayState.DOWNLOADING: 1,
    GatewayState.VERIFYING: 2,
    GatewayState.SWAPPING: 3,
}
NEEDS_REASON = frozenset({GatewayState.FAILED, GatewayState.ROLLED_BACK})


def can_move(current: GatewayState, new: GatewayState) -> bool:
    """Whether a gateway in ``current`` may move to ``new``.

    Terminal states are final. Otherwise a gateway moves forward, to any later state or
    any terminal one; DOWNLOADING -> DOWNLOADING carries progress.
    """
    if current.terminal:
        return False
    if new.terminal:
        return True
    if new is GatewayState.DOWNLOADING and current is GatewayState.DOWNLOADING:
        return True
    return _RANK[new] > _RANK[current]


def job_outcome(states: Iterable[GatewayState]) -> JobState | None:
    """The job's final state once every gateway is terminal, else None."""
    states = list(states)
    if any(not s.terminal for s in states):
        return None
    succeeded = sum(1 for s in states if s is GatewayState.SUCCEEDED)
    if succeeded == len(states):
        return JobState.SUCCEEDED
    if succeeded == 0:
        return JobState.FAILED
    return JobState.PARTIAL
