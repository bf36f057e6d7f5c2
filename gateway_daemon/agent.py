"""The gateway's upgrade agent: takes one command and carries it through

    DOWNLOADING -> VERIFYING -> (staged) -> SWAPPING -> handoff -> SUCCEEDED (new process)
                                                              -> ROLLED_BACK (this process)

Before taking a command it refuses (FAILED, with the reason) one issued before a command it
already took (a late delivery must not undo a newer job), one that would take it to an
older version than it runs now unless the job allowed a downgrade, and, once downloaded, an
artifact whose stamped version is not the command's target.

Every outcome is written to disk before the command is acked, so a redelivered command
is answered from there and never run twice. The command is acked when ``handle`` returns.
Once a swap succeeded this process has handed over: it takes no further command (it
raises ``AgentRetired``, and the command goes back to the queue for the new version).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway_daemon.download import download
from gateway_daemon.errors import (
    AgentRetired,
    DownloadFailed,
    HandoffFailed,
    VerificationFailed,
)
from gateway_daemon.reporter import Reporter
from gateway_daemon.state import AgentState, Outcome, Taken
from gateway_daemon.verify import verify
from hitless import logs, semver, version
from hitless.bus import codec, topology
from hitless.bus.amqp import DeadLetter, Delivery
from hitless.config import GatewayConfig
from hitless.errors import DecodeError
from hitless.v1 import bus_pb2

log = logs.get(__name__)

Swap = Callable[[bus_pb2.UpgradeCommand, Path], None]
PROGRESS_INTERVAL_S = 0.5


@dataclass(frozen=True)
class _Order:
    """When a command's job was issued and whether it allows a downgrade, from the
    message's headers (``topology.ISSUED_AT_HEADER``, ``ALLOW_DOWNGRADE_HEADER``)."""

    issued_at: datetime
    allow_downgrade: bool

    @classmethod
    def of(cls, headers: Mapping[str, Any]) -> _Order | None:
        """None for a command without them (from an older controller); ValueError for
        headers that are there but malformed."""
        issued = headers.get(topology.ISSUED_AT_HEADER)
        if issued is None:
            return None
        if isinstance(issued, bytes):
            issued = issued.decode("utf-8", errors="replace")
        try:
            when = datetime.fromisoformat(str(issued))
        except ValueError:
            raise ValueError(
                f"{topology.ISSUED_AT_HEADER} {str(issued)[:40]!r} is not an ISO 8601 time"
            ) from None
        if when.tzinfo is None:
            raise ValueError(f"{topology.ISSUED_AT_HEADER} {str(issued)[:40]!r} has no time zone")
        allow = headers.get(topology.ALLOW_DOWNGRADE_HEADER, False)
        if not isinstance(allow, bool):
            raise ValueError(f"{topology.ALLOW_DOWNGRADE_HEADER} must be true or false")
        return cls(when.astimezone(UTC), allow)


class Agent:
    def __init__(
        self,
        config: GatewayConfig,
        version: str,
        state: AgentState,
        reporter: Reporter,
        swap: Swap,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._config = config
        self._version = version
        self._state = state
        self._reporter = reporter
        self._swap = swap
        self._clock = clock
        self._retired = False

    def handle(self, delivery: Delivery) -> None:
        if self._retired:
            raise AgentRetired(
                "this process handed the gateway to the next version; the command is "
                "requeued for it"
            )
        try:
            # Fields this release does not know are skipped: a newer controller may send them.
            command = codec.decode(bus_pb2.UpgradeCommand, delivery.body, strict=False)
        except DecodeError as exc:
            raise DeadLetter(f"not an upgrade command: {exc}") from exc
        if command.gateway_id != self._config.gateway_id:
            raise DeadLetter(
                f"command for gateway {command.gateway_id!r} reached {self._config.gateway_id!r}"
            )
        bound = log.bind(job_id=command.job_id, command_id=command.command_id)
        done = self._state.outcome(command.command_id)
        if done is not None:
            bound.info("command_already_done", state=done.state)
            self._reporter.outcome(command, done)
            return
        if command.HasField("deadline") and command.deadline.ToDatetime(UTC) < self._clock():
            bound.warning("command_expired")
            self._finish(
                command,
                Outcome("UNREACHABLE", command.target_version, self._version,
                        "the command expired before the gateway took it"),
            )
            return
        try:
            order = _Order.of(delivery.headers)
            refusal = self._refusal(command, order)
        except ValueError as exc:
            refusal = f"the command's headers are malformed: {exc}"
            order = None
        if refusal is not None:
            bound.warning("command_refused", reason=refusal)
            self._finish(command, Outcome("FAILED", command.target_version, self._version,
                                          refusal))  # fmt: skip
            return
        if order is not None:
            self._state.record_taken(Taken(order.issued_at, command.job_id))
        if command.target_version == self._version:
            self._finish(command, Outcome("SUCCEEDED", self._version, self._version))
            return
        bound.info("upgrade_started", target_version=command.target_version)
        self._upgrade(command)

    def _refusal(self, command: bus_pb2.UpgradeCommand, order: _Order | None) -> str | None:
        """Why this gateway must not run ``command``, issued as ``order`` says, now; or None.

        A command without ``order`` (from a controller before these headers, or forged) is
        never a downgrade: only the superseding rule needs to know when it was issued.
        """
        newest = self._state.newest_taken()
        issued = order.issued_at if order is not None else None
        if (
            issued is not None
            and newest is not None
            and issued < newest.issued_at
            and newest.job_id != command.job_id
        ):
            return (
                f"superseded: this gateway already took a newer command (job {newest.job_id}, "
                f"issued {newest.issued_at:%Y-%m-%d %H:%M:%S} UTC) than this one (issued "
                f"{issued:%Y-%m-%d %H:%M:%S} UTC); start a new job if {command.target_version} "
                "is still wanted"
            )
        target, running = command.target_version, self._version
        if (
            not (order is not None and order.allow_downgrade)
            and semver.is_valid(target)
            and semver.is_valid(running)
            and semver.parse(target) < semver.parse(running)
        ):
            return (
                f"this gateway runs {running} by now, and {target} is older: the job did not "
                "allow a downgrade; start a new one with --allow-downgrade if it is wanted"
            )
        return None

    def _upgrade(self, command: bus_pb2.UpgradeCommand) -> None:
        sha, size, target = command.artifact_sha256, command.artifact_size, command.target_version
        partial = self._state.downloads_dir / f"{sha}.pyz"
        last_report = 0.0

        def progress(done: int, total: int) -> None:
            nonlocal last_report
            now = time.monotonic()
            if now - last_report >= PROGRESS_INTERVAL_S or done == total:
                last_report = now
                self._status(command, "DOWNLOADING", bytes_done=done, bytes_total=total,
                             required=False)

        self._status(command, "DOWNLOADING", bytes_done=0, bytes_total=size, required=False)
        try:
            download(self._config.controller, sha, size, partial, progress=progress)
            self._status(command, "VERIFYING", bytes_done=size, bytes_total=size)
            verify(partial, sha256=sha, size=size)
        except (DownloadFailed, VerificationFailed) as exc:
            partial.unlink(missing_ok=True)
            self._finish(command, Outcome("FAILED", target, self._version, str(exc)))
            return
        stamp = version.stamped(partial)
        if stamp != target:
            partial.unlink(missing_ok=True)
            found = "no version stamp" if stamp is None else f"the stamp {stamp!r}"
            self._finish(command, Outcome(
                "FAILED", target, self._version,
                f"the artifact of release {target} carries {found}: it is not that release; "
                f"build it (upgradectl releases build --version V) and publish it under a new "
                f"version V, since {target} names the artifact already stored",
            ))  # fmt: skip
            return
        staged = self._state.releases_dir / f"{target}-{sha[:12]}.pyz"
        staged.parent.mkdir(parents=True, exist_ok=True)
        partial.replace(staged)
        self._status(command, "SWAPPING")
        try:
            self._swap(command, staged)
            self._retired = True
        except HandoffFailed as exc:
            self._finish(
                command,
                Outcome("ROLLED_BACK", target, self._version, f"handoff to {target} failed: {exc}"),
            )

    def _status(self, command: bus_pb2.UpgradeCommand, state: str, **extra: object) -> None:
        self._reporter.status(
            command,
            state,
            from_version=self._version,
            to_version=command.target_version,
            **extra,  # type: ignore[arg-type]
        )

    def _finish(self, command: bus_pb2.UpgradeCommand, outcome: Outcome) -> None:
        self._state.record_outcome(command.command_id, outcome)
        self._reporter.outcome(command, outcome)
