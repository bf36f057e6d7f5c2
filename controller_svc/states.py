"""The two state machines of an upgrade, as enums and transition rules.

    Job:              PENDING -> RUNNING -> SUCCEEDED | PARTIAL | FAILED
                      PENDING -> FAILED    (its deadline passed before any command was sent)
                      PENDING | RUNNING <-> PAUSED   (an operator paused it: nothing starts)
                      ... -> ABORTED      (more gateways failed than --max-failures allows)
                      ... -> CANCELLED    (an operator cancelled it)
    Gateway in a job: QUEUED -> DOWNLOADING -> VERIFYING -> SWAPPING [-> SOAKING]
                             -> SUCCEEDED | FAILED | ROLLED_BACK | UNREACHABLE
                      (SOAKING: a job with a soak; the gateway watches its data plane's
                      health, then SUCCEEDED, or ROLLED_BACK to the version before)
                      QUEUED -> SKIPPED    (the job was aborted, or its deadline came,
                                            before this gateway's turn)
                      QUEUED -> CANCELLED  (the job was cancelled before it started)
                      QUEUED -> SUPERSEDED (a newer job for the gateway came before it
                                            started: it runs that one instead)
                      SUCCEEDED -> QUEUED  (a hop of its path through intermediate
                                            releases succeeded: the next hop's command;
                                            made by the controller, never by a report,
                                            in ``transitions.next_hop``)

A job that is aborted or cancelled while gateways are in flight keeps its state (RUNNING
or PAUSED) with its ``ending`` recorded until they are final, then moves to that ending:
in-flight gateways finish or roll back, and are never cut short.

A job's moves are the table ``JOB_MOVES``; every writer of a job's state checks its move
with ``check_job_move``, which raises IllegalJobMove for any other. Reports may skip
gateway states (a gateway already on the target reports SUCCEEDED at once; a report may
be lost) but never go back: a late DOWNLOADING after SWAPPING is ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum

from controller_svc.errors import FailedPrecondition


class JobState(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    PARTIAL = "PARTIAL"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    PAUSED = "PAUSED"
    ABORTED = "ABORTED"

    @property
    def terminal(self) -> bool:
        return self in _JOB_TERMINAL

    @property
    def dispatches(self) -> bool:
        """Whether gateways of a job in this state may be started."""
        return self in (JobState.PENDING, JobState.RUNNING)


class GatewayState(StrEnum):
    QUEUED = "QUEUED"
    DOWNLOADING = "DOWNLOADING"
    VERIFYING = "VERIFYING"
    SWAPPING = "SWAPPING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    ROLLED_BACK = "ROLLED_BACK"
    UNREACHABLE = "UNREACHABLE"
    SKIPPED = "SKIPPED"
    CANCELLED = "CANCELLED"
    SUPERSEDED = "SUPERSEDED"
    SOAKING = "SOAKING"

    @property
    def terminal(self) -> bool:
        return self in _GATEWAY_TERMINAL


_JOB_TERMINAL = frozenset(
    {
        JobState.SUCCEEDED,
        JobState.PARTIAL,
        JobState.FAILED,
        JobState.CANCELLED,
        JobState.ABORTED,
    }
)
_GATEWAY_TERMINAL = frozenset(
    {
        GatewayState.SUCCEEDED,
        GatewayState.FAILED,
        GatewayState.ROLLED_BACK,
        GatewayState.UNREACHABLE,
        GatewayState.SKIPPED,
        GatewayState.CANCELLED,
        GatewayState.SUPERSEDED,
    }
)
_RANK = {
    GatewayState.QUEUED: 0,
    GatewayState.DOWNLOADING: 1,
    GatewayState.VERIFYING: 2,
    GatewayState.SWAPPING: 3,
    GatewayState.SOAKING: 4,
}
NEEDS_REASON = frozenset({GatewayState.FAILED, GatewayState.ROLLED_BACK})

# The moves a job may make. A terminal state has none. PENDING -> FAILED is the deadline
# passing before any gateway moved; CANCELLED and ABORTED are reachable from every
# unfinished state. A paused job ends like a running one when its last gateways finish
# (nothing was left to start), and resumes RUNNING.
_ENDS = frozenset(
    {
        JobState.SUCCEEDED,
        JobState.PARTIAL,
        JobState.FAILED,
        JobState.CANCELLED,
        JobState.ABORTED,
    }
)
JOB_MOVES: Mapping[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset(
        {
            JobState.RUNNING,
            JobState.PAUSED,
            JobState.FAILED,
            JobState.CANCELLED,
            JobState.ABORTED,
        }
    ),
    JobState.RUNNING: _ENDS | {JobState.PAUSED},
    JobState.PAUSED: _ENDS | {JobState.RUNNING},
    JobState.SUCCEEDED: frozenset(),
    JobState.PARTIAL: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
    JobState.ABORTED: frozenset(),
}


class IllegalJobMove(FailedPrecondition):
    """A job was asked to move between two states ``JOB_MOVES`` does not connect."""

    def __init__(self, job_id: str, current: JobState, new: JobState) -> None:
        allowed = ", ".join(sorted(JOB_MOVES[current])) or "none: it is final"
        super().__init__(
            f"job {job_id} cannot move from {current} to {new} (moves from {current}: {allowed})"
        )
        self.job_id, self.current, self.new = job_id, current, new


def can_move_job(current: JobState, new: JobState) -> bool:
    """Whether a job in ``current`` may move to ``new`` (``JOB_MOVES``)."""
    return new in JOB_MOVES[current]


def check_job_move(job_id: str, current: JobState, new: JobState) -> None:
    """Raise IllegalJobMove unless ``JOB_MOVES`` allows ``current`` -> ``new``."""
    if not can_move_job(current, new):
        raise IllegalJobMove(job_id, current, new)


def can_move(current: GatewayState, new: GatewayState) -> bool:
    """Whether a gateway in ``current`` may move to ``new``.

    Terminal states are final. Otherwise a gateway moves forward, to any later state or
    any terminal one; DOWNLOADING -> DOWNLOADING carries progress, SOAKING -> SOAKING the
    soak's health.
    """
    if current.terminal:
        return False
    if new.terminal:
        return True
    if new is current and new in (GatewayState.DOWNLOADING, GatewayState.SOAKING):
        return True  # progress, or the soak's health
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
