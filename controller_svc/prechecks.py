"""Pre-checks: before an upgrade starts (and for ``upgrade --dry-run``), each gateway is
asked over the bus whether anything would stop it, and answers from where it runs.

The controller publishes a ``PreCheckRequest`` on each gateway's own command queue with
the header ``x-hitless-kind: precheck`` and a TTL of the wait (a gateway that is offline
never sees it; the broker drops it, and the dead-lettered copy is ignored). The gateway
measures without changing anything (free space where releases are staged, whether the
controller's download service answers, its tunnels and VPN users now) and answers with a
``PreCheckResult`` on its report key, which ``PreChecks.take`` matches to the question.
A gateway that does not answer in time is reported as such, never failed for it: whether
it is UNREACHABLE is the job's deadline to say.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from hitless import logs
from hitless.bus import topology
from hitless.bus.amqp import Publisher
from hitless.bus.amqp.publisher import Confirm
from hitless.errors import BusError
from hitless.v1 import bus_pb2

log = logs.get(__name__)

# How long a pre-check waits for the gateways' answers, in seconds.
WAIT_S = 3.0
# The longest problem line kept from a gateway, and how many lines.
MAX_PROBLEM_CHARS = 500
MAX_PROBLEMS = 10


@dataclass(frozen=True)
class Answer:
    """What one gateway said (``answered`` False: nothing came in time)."""

    gateway_id: str
    answered: bool
    problems: tuple[str, ...] = ()
    free_bytes: int = 0
    needed_bytes: int = 0
    controller_reachable: bool = False
    vpn_sessions: int = 0
    tunnels_up: int = 0
    tunnels_configured: int = 0

    @property
    def passed(self) -> bool:
        """Answered with no problem."""
        return self.answered and not self.problems


class PreChecks:
    """The questions in flight in this controller and the answers to them. Thread-safe."""

    def __init__(self, publisher: Publisher) -> None:
        self._publisher = publisher
        self._changed = threading.Condition()
        # check id -> gateway id, for questions asked and not yet answered or given up.
        self._asked: dict[str, str] = {}
        self._answers: dict[str, Answer] = {}

    def ask(
        self, gateway_ids: Sequence[str], target_version: str, artifact_size: int, wait_s: float
    ) -> dict[str, Answer]:
        """Ask each of ``gateway_ids`` and wait up to ``wait_s`` seconds for the answers:
        gateway id -> Answer, ``answered`` False for each that did not answer (offline,
        busy with a command, its queue not declared yet, or the broker away)."""
        deadline = datetime.now(UTC) + timedelta(seconds=wait_s)
        ttl_ms = max(1, int(wait_s * 1000))
        asked: dict[str, str] = {}
        confirms: list[tuple[str, Confirm]] = []
        for gateway_id in gateway_ids:
            check_id = str(uuid.uuid4())
            request = bus_pb2.PreCheckRequest(
                check_id=check_id,
                gateway_id=gateway_id,
                target_version=target_version,
                artifact_size=artifact_size,
            )
            request.deadline.FromDatetime(deadline)
            with self._changed:
                self._asked[check_id] = gateway_id
            asked[check_id] = gateway_id
            try:
                confirms.append(
                    (
                        check_id,
                        self._publisher.publish_nowait(
                            topology.COMMANDS,
                            topology.command_key(gateway_id),
                            request,
                            message_id=check_id,
                            headers={topology.KIND_HEADER: topology.PRECHECK},
                            expiration_ms=ttl_ms,
                        ),
                    )
                )
            except BusError as exc:
                log.warning("precheck_not_sent", gateway_id=gateway_id, error=str(exc))
        ends = time.monotonic() + wait_s
        # Those no gateway can answer (not routed: its queue is not declared yet; or not
        # confirmed) are not waited for.
        waiting = set()
        for check_id, confirm in confirms:
            try:
                confirm.wait(max(0.0, ends - time.monotonic()))
                waiting.add(check_id)
            except BusError:
                continue
        with self._changed:
            self._changed.wait_for(
                lambda: all(c in self._answers for c in waiting),
                max(0.0, ends - time.monotonic()),
            )
            found = {asked[c]: self._answers.pop(c) for c in asked if c in self._answers}
            for check_id in asked:
                self._asked.pop(check_id, None)
        return {gid: found.get(gid, Answer(gid, answered=False)) for gid in gateway_ids}

    def take(self, result: bus_pb2.PreCheckResult) -> bool:
        """Record a gateway's answer; False when no question of this controller waits for
        it (late, another controller's, or made up), which is then dropped."""
        with self._changed:
            if self._asked.get(result.check_id) != result.gateway_id:
                return False
            self._answers[result.check_id] = Answer(
                gateway_id=result.gateway_id,
                answered=True,
                problems=tuple(p[:MAX_PROBLEM_CHARS] for p in result.problems[:MAX_PROBLEMS]),
                free_bytes=max(0, result.free_bytes),
                needed_bytes=max(0, result.needed_bytes),
                controller_reachable=result.controller_reachable,
                vpn_sessions=max(0, result.vpn_sessions),
                tunnels_up=max(0, result.tunnels_up),
                tunnels_configured=max(0, result.tunnels_configured),
            )
            self._changed.notify_all()
            return True


def failing(answers: Mapping[str, Answer]) -> dict[str, str]:
    """Gateway id -> why it is left out of a job: each that answered with problems."""
    return {
        gid: "pre-check: " + "; ".join(answer.problems)
        for gid, answer in answers.items()
        if answer.answered and answer.problems
    }
