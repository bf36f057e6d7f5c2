"""The gateway's upgrade agent: takes one command and carries it through

    (signed?) -> DOWNLOADING -> VERIFYING -> (staged) -> SWAPPING -> handoff
              -> SUCCEEDED (new process) | ROLLED_BACK (this process)

It runs only the signed copy of a command (``topology.SIGNED_COMMAND_HEADER``), never the
message body: the signature must verify against a command key its trusted root carries
and the command must name this gateway (``hitless.trust.commands``). A command id taken
before with other content is a replay. Each of those is refused: reported as a security
event (``Reporter.refused``) and dead-lettered, with nothing recorded under the command
id and nothing run. A signed command past its deadline is not run either: UNREACHABLE,
and reported as a refusal too (it is late, or an old command played back).

Before taking a signed command it refuses (FAILED, with the reason) one issued before a
command it already took (a late delivery must not undo a newer job) and one that would
take it to an older version than it runs now unless the signed command allows a
downgrade. The release's length and sha256 come from the signed TUF metadata, updated
from the controller before anything is downloaded (``gateway_daemon.trust``), never from
the command; a release the metadata does not list (never signed, or yanked) is refused.
Once downloaded, the artifact must match the signed length and sha256 and carry the
release's version stamp.

Every outcome is written to disk before the command is acked, so a redelivered command
is answered from there and never run twice. The command is acked when ``handle`` returns.
Once a swap succeeded this process has handed over: it takes no further command (it
raises ``AgentRetired``, and the command goes back to the queue for the new version).

A message with the header ``topology.KIND_HEADER`` set to ``topology.PRECHECK`` is a
pre-check, never a command: answered from what this gateway measures
(``gateway_daemon.precheck``), with nothing recorded; one that cannot be read or names
another gateway is dead-lettered, and one past its deadline dropped unanswered.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from tuf.api.metadata import Root

from gateway_daemon.control import PlaneGone
from gateway_daemon.download import download
from gateway_daemon.errors import (
    AgentRetired,
    DownloadFailed,
    GatewayError,
    HandoffFailed,
)
from gateway_daemon.handoff.parent import ResumeFailed
from gateway_daemon.precheck import TunnelCounts, VpnSessions, measure
from gateway_daemon.reporter import Reporter
from gateway_daemon.state import AgentState, CommandState, CommandStates, Outcome, Taken
from gateway_daemon.trust import GatewayTrust
from hitless import logs, semver, version
from hitless.bus import codec, topology
from hitless.bus.amqp import DeadLetter, Delivery
from hitless.config import GatewayConfig
from hitless.errors import DecodeError
from hitless.trust.client import verify_artifact
from hitless.trust.commands import SignedCommand, check_deadline, open_command
from hitless.trust.errors import (
    ArtifactMismatch,
    BadCommandSignature,
    CommandExpired,
    CommandMisaddressed,
    CommandRefused,
    MetadataRefused,
    TrustError,
    UnknownCommandKey,
    UnknownTarget,
    UnsignedCommand,
)
from hitless.trust.keys import command_keys
from hitless.v1 import bus_pb2

log = logs.get(__name__)

Swap = Callable[[bus_pb2.UpgradeCommand, Path], None]
PROGRESS_INTERVAL_S = 0.5
# A command signed by a key the trusted root does not carry makes the gateway look for a
# newer root at most this often.
REFRESH_INTERVAL_S = 60.0

# The kind a refusal is reported as (``bus_pb2.CommandRefused.kind``).
_REFUSAL_KINDS: list[tuple[type[Exception], str]] = [
    (UnsignedCommand, "unsigned"),
    (UnknownCommandKey, "unknown-key"),
    (BadCommandSignature, "bad-signature"),
    (CommandMisaddressed, "misaddressed"),
]
# Refusals of a release by its signed metadata: security events, besides FAILED.
_UNTRUSTED_RELEASE = (MetadataRefused, UnknownTarget, ArtifactMismatch)


@dataclass(frozen=True)
class _Opened:
    """A command whose signature verified, the sha256 of the signed bytes, and the id of
    the command key that signed it."""

    command: bus_pb2.UpgradeCommand
    digest: str
    keyid: str


class _Refused(Exception):
    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


class Agent:
    def __init__(
        self,
        config: GatewayConfig,
        version: str,
        state: AgentState,
        reporter: Reporter,
        swap: Swap,
        trust: GatewayTrust,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        vpn_sessions: VpnSessions = lambda: 0,
        tunnels: TunnelCounts = lambda: (0, 0),
    ) -> None:
        """``vpn_sessions`` gives the VPN users connected now and ``tunnels`` the data
        plane's tunnels (established, configured), for pre-checks; the defaults: none."""
        self._config = config
        self._version = version
        self._state = state
        self._reporter = reporter
        self._swap = swap
        self._trust = trust
        self._clock = clock
        self._vpn_sessions = vpn_sessions
        self._tunnels = tunnels
        self._retired = False
        self._refreshed_at = -REFRESH_INTERVAL_S
        self._states = CommandStates()

    def handle(self, delivery: Delivery) -> None:
        if self._retired:
            raise AgentRetired(
                "this process handed the gateway to the next version; the command is "
                "requeued for it"
            )
        if _text(delivery.headers.get(topology.KIND_HEADER, "")) == topology.PRECHECK:
            self._precheck(delivery)
            return
        try:
            opened = self._open(delivery)
        except _Refused as refused:
            claimed = _claimed_ids(delivery.body)
            self._reporter.refused(*claimed, refused.kind, refused.reason)
            raise DeadLetter(f"refused ({refused.kind}): {refused.reason}") from None
        command = opened.command
        bound = log.bind(job_id=command.job_id, command_id=command.command_id)
        done = self._state.outcome(command.command_id)
        if done is not None:
            bound.info("command_already_done", state=done.state)
            self._reporter.outcome(command, done)
            return
        self._state.record_command(command.command_id, opened.digest)
        try:
            check_deadline(command, self._clock())
        except CommandExpired as exc:
            # Late, or an old signed command played back: not run either way, and said.
            bound.warning("command_expired")
            self._reporter.refused(command.command_id, command.job_id, "expired", str(exc))
            self._finish(
                command,
                Outcome(CommandState.UNREACHABLE, command.target_version, self._version,
                        "the command expired before the gateway took it"),
            )  # fmt: skip
            return
        refusal = self._refusal(command)
        if refusal is not None:
            bound.warning("command_refused", reason=refusal)
            self._finish(command, Outcome(CommandState.FAILED, command.target_version,
                                          self._version, refusal))  # fmt: skip
            return
        if command.HasField("issued_at"):
            issued = command.issued_at.ToDatetime(UTC)
            self._state.record_taken(Taken(issued, command.job_id))
        if command.target_version == self._version:
            self._finish(command, Outcome(CommandState.SUCCEEDED, self._version, self._version))
            return
        bound.info("upgrade_started", target_version=command.target_version)
        self._upgrade(command, opened.keyid)

    def _precheck(self, delivery: Delivery) -> None:
        """Answer a pre-check (``gateway_daemon.precheck``): measured, nothing changed.
        Raises DeadLetter for one that is not a PreCheckRequest or names another gateway;
        one past its deadline is dropped unanswered (nobody reads the answer)."""
        try:
            request = codec.decode(bus_pb2.PreCheckRequest, delivery.body, strict=False)
        except DecodeError as exc:
            raise DeadLetter(f"a pre-check that cannot be read: {exc}") from None
        gateway_id = self._config.gateway_id
        if request.gateway_id != gateway_id:
            raise DeadLetter(
                f"pre-check {request.check_id[:100]!r} names gateway "
                f"{request.gateway_id[:100]!r}, not this one ({gateway_id}): not answered"
            )
        bound = log.bind(check_id=request.check_id[:100])
        now = self._clock()
        if request.HasField("deadline") and request.deadline.ToDatetime(UTC) <= now:
            bound.info("precheck_expired", deadline=request.deadline.ToDatetime(UTC).isoformat())
            return
        started = time.monotonic()
        result = measure(
            request, version=self._version, state=self._state, channel=self._trust.channel,
            vpn_sessions=self._vpn_sessions, tunnels=self._tunnels, now=now,
        )  # fmt: skip
        self._reporter.precheck(result)
        bound.info("precheck_answered", target_version=request.target_version[:100],
                   problems=list(result.problems),
                   elapsed_ms=round((time.monotonic() - started) * 1000, 1))  # fmt: skip

    def _open(self, delivery: Delivery) -> _Opened:
        """The signed copy of the command in ``delivery``'s headers, once it verifies and
        is not a replay. Raises _Refused with the kind and the reason."""
        headers = delivery.headers
        encoded = headers.get(topology.SIGNED_COMMAND_HEADER)
        keyid = headers.get(topology.COMMAND_KEYID_HEADER)
        signature = headers.get(topology.COMMAND_SIGNATURE_HEADER)
        if encoded is None or keyid is None or signature is None:
            raise _Refused(
                "unsigned",
                "the command carries no signature (headers "
                f"{topology.SIGNED_COMMAND_HEADER}, {topology.COMMAND_KEYID_HEADER}, "
                f"{topology.COMMAND_SIGNATURE_HEADER}): it was not run",
            )
        try:
            payload = base64.b64decode(_text(encoded), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _Refused("bad-signature", f"the signed command is not base64: {exc}") from exc
        signed = SignedCommand(payload, _text(keyid)[:128], _text(signature)[:256])
        gateway_id = self._config.gateway_id
        try:
            try:
                command = open_command(signed, self._trust.root(), gateway_id)
            except UnknownCommandKey:
                # A rotation may have given the command role a new key: look for a newer
                # root once before refusing.
                command = open_command(signed, self._refreshed_root(), gateway_id)
        except CommandRefused as exc:
            kind = next(k for kind_of, k in _REFUSAL_KINDS if isinstance(exc, kind_of))
            raise _Refused(kind, str(exc)) from exc
        digest = hashlib.sha256(payload).hexdigest()
        taken = self._state.command_digest(command.command_id)
        if taken is not None and taken != digest:
            raise _Refused(
                "replayed",
                f"command {command.command_id} was taken before with other content "
                f"(signed bytes sha256 {taken[:16]}..., now {digest[:16]}...): a replay; "
                "it was not run",
            )
        return _Opened(command, digest, signed.keyid)

    def _refreshed_root(self) -> Root:
        """The trusted root after an update, at most once per REFRESH_INTERVAL_S (commands
        signed by unknown keys must not make the gateway fetch metadata for each)."""
        now = time.monotonic()
        if now - self._refreshed_at < REFRESH_INTERVAL_S:
            return self._trust.root()
        self._refreshed_at = now
        try:
            return self._trust.refresh()
        except TrustError as exc:
            log.warning("metadata_refresh_failed", error=str(exc))
            return self._trust.root()

    def _refusal(self, command: bus_pb2.UpgradeCommand) -> str | None:
        """Why this gateway must not run the signed ``command`` now; or None."""
        newest = self._state.newest_taken()
        issued = command.issued_at.ToDatetime(UTC) if command.HasField("issued_at") else None
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
            not command.allow_downgrade
            and semver.is_valid(target)
            and semver.is_valid(running)
            and semver.parse(target) < semver.parse(running)
        ):
            return (
                f"this gateway runs {running} by now, and {target} is older: the job did not "
                "allow a downgrade; start a new one with --allow-downgrade if it is wanted"
            )
        return None

    def _upgrade(self, command: bus_pb2.UpgradeCommand, keyid: str) -> None:
        target = command.target_version
        # Fetching the signed metadata is the start of the download.
        self._status(command, CommandState.DOWNLOADING, bytes_done=0,
                     bytes_total=command.artifact_size, required=False)  # fmt: skip
        try:
            signed = self._trust.release(target)
        except TrustError as exc:
            self._untrusted(command, f"release {target} did not verify: {exc}", exc)
            return
        if keyid not in command_keys(self._trust.root()):
            # The update brought a root that retired the key this command was signed with.
            reason = (
                f"command {command.command_id} is signed by key {keyid}, which the newest "
                f"trusted root (version {self._trust.root().version}) no longer carries: it "
                "was not run"
            )
            self._reporter.refused(command.command_id, command.job_id, "unknown-key", reason)
            self._finish(command, Outcome(CommandState.FAILED, target, self._version, reason))
            return
        sha, size = str(signed.hashes.get("sha256", "")), signed.length
        if (command.artifact_sha256, command.artifact_size) != (sha, size):
            log.warning(
                "command_artifact_differs",
                command_sha256=command.artifact_sha256[:64],
                signed_sha256=sha,
                note="the signed metadata decides",
            )
        partial = self._state.downloads_dir / f"{sha}.pyz"
        last_report = 0.0

        def progress(done: int, total: int) -> None:
            nonlocal last_report
            now = time.monotonic()
            if now - last_report >= PROGRESS_INTERVAL_S or done == total:
                last_report = now
                self._status(
                    command,
                    CommandState.DOWNLOADING,
                    bytes_done=done,
                    bytes_total=total,
                    required=False,
                )

        try:
            download(
                self._config.controller, sha, size, partial,
                channel=self._trust.channel, progress=progress, command_id=command.command_id,
            )  # fmt: skip
            self._status(command, CommandState.VERIFYING, bytes_done=size, bytes_total=size)
            verify_artifact(partial, signed)
        except DownloadFailed as exc:
            partial.unlink(missing_ok=True)
            self._finish(command, Outcome(CommandState.FAILED, target, self._version, str(exc)))
            return
        except TrustError as exc:
            partial.unlink(missing_ok=True)
            self._untrusted(command, f"verification failed: {exc}", exc)
            return
        stamp = version.stamped(partial)
        if stamp != target:
            partial.unlink(missing_ok=True)
            found = "no version stamp" if stamp is None else f"the stamp {stamp!r}"
            self._finish(command, Outcome(
                CommandState.FAILED, target, self._version,
                f"the artifact of release {target} carries {found}: it is not that release; "
                f"build it (upgradectl releases build --version V) and publish it under a new "
                f"version V, since {target} names the artifact already stored",
            ))  # fmt: skip
            return
        staged = self._state.releases_dir / f"{target}-{sha[:12]}.pyz"
        staged.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        partial.replace(staged)
        verified = bus_pb2.UpgradeCommand()
        verified.CopyFrom(command)
        verified.artifact_sha256, verified.artifact_size = sha, size
        self._status(command, CommandState.SWAPPING)
        try:
            self._swap(verified, staged)
            self._retired = True
        except PlaneGone as exc:
            # The forwarding process died mid-handoff: the new version may serve alone and
            # report, or nothing serves. Either way this agent reports nothing more: the
            # command goes back to the queue for whoever serves next.
            self._retired = True
            raise AgentRetired(f"the forwarding process is gone: {exc}") from exc
        except HandoffFailed as exc:
            # Rolled back: this process serves as before. ResumeFailed: it could not.
            state = (
                CommandState.FAILED if isinstance(exc, ResumeFailed) else CommandState.ROLLED_BACK
            )
            self._finish(
                command, Outcome(state, target, self._version, f"handoff to {target} failed: {exc}")
            )
        except (GatewayError, OSError) as exc:
            # Whatever went wrong in this process, the job ends with a report, never
            # left in SWAPPING.
            log.exception("handoff_failed_in_this_process", target_version=target)
            self._finish(command, Outcome(
                CommandState.FAILED, target, self._version,
                f"handoff to {target} failed in the running version: {type(exc).__name__}: {exc}",
            ))  # fmt: skip

    def _untrusted(self, command: bus_pb2.UpgradeCommand, reason: str, exc: TrustError) -> None:
        """The release did not verify: FAILED with the reason; a security event too when
        the signed metadata refused it (not when it could not be fetched)."""
        if isinstance(exc, _UNTRUSTED_RELEASE):
            self._reporter.refused(command.command_id, command.job_id, "unverified-release",
                                   reason)  # fmt: skip
        self._finish(
            command, Outcome(CommandState.FAILED, command.target_version, self._version, reason)
        )

    def _status(
        self, command: bus_pb2.UpgradeCommand, state: CommandState, **extra: object
    ) -> None:
        self._states.move(command.command_id, state)
        self._reporter.status(
            command,
            state,
            from_version=self._version,
            to_version=command.target_version,
            **extra,  # type: ignore[arg-type]
        )

    def _finish(self, command: bus_pb2.UpgradeCommand, outcome: Outcome) -> None:
        self._states.move(command.command_id, outcome.state)
        self._state.record_outcome(command.command_id, outcome)
        self._reporter.outcome(command, outcome)


def _text(value: object) -> str:
    """A header value as text (pika gives longstr values as bytes)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _claimed_ids(body: bytes) -> tuple[str, str]:
    """(command_id, job_id) as a refused message's body claims them, for the report."""
    try:
        claimed = codec.decode(bus_pb2.UpgradeCommand, body, strict=False)
    except DecodeError:
        return "", ""
    return claimed.command_id[:100], claimed.job_id[:100]
