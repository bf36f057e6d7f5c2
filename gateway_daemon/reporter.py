"""What the gateway tells the controller: status reports, refusals, hello and heartbeats."""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import cast

from google.protobuf.timestamp_pb2 import Timestamp

from gateway_daemon.state import Outcome
from hitless import logs
from hitless.bus import topology
from hitless.bus.amqp import Publisher
from hitless.errors import BusError
from hitless.v1 import bus_pb2, common_pb2

log = logs.get(__name__)

# What this release understands beyond commands, announced in every hello
# (bus_pb2.GatewayHello.features): "precheck", it answers pre-checks.
FEATURES = ("precheck",)


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.now(UTC))
    return stamp


class Reporter:
    def __init__(self, publisher: Publisher, gateway_id: str, version: str) -> None:
        self._publisher = publisher
        self._gateway_id = gateway_id
        self._version = version

    def status(
        self,
        command: bus_pb2.UpgradeCommand,
        state: str,
        *,
        from_version: str,
        to_version: str,
        error: str = "",
        bytes_done: int = 0,
        bytes_total: int = 0,
        vpn_sessions_dropped: int = 0,
        health: str = "",
        required: bool = True,
    ) -> None:
        """Report ``state`` (a GatewayJobState name such as "SUCCEEDED") for a command.

        A required report that cannot be published raises, so the command is redelivered
        and the outcome (kept on disk) reported again; progress reports are best effort.
        """
        report = bus_pb2.StatusReport(
            report_id=str(uuid.uuid4()),
            command_id=command.command_id,
            job_id=command.job_id,
            gateway_id=self._gateway_id,
            state=cast(
                common_pb2.GatewayJobState,
                common_pb2.GatewayJobState.Value(f"GATEWAY_JOB_STATE_{state}"),
            ),
            from_version=from_version,
            to_version=to_version,
            error=error,
            bytes_done=bytes_done,
            bytes_total=bytes_total,
            vpn_sessions_dropped=vpn_sessions_dropped,
            health=health,
            at=_now(),
        )
        key = topology.report_key(self._gateway_id, topology.STATUS)
        try:
            self._publisher.publish(topology.REPORTS, key, report, message_id=report.report_id)
        except BusError as exc:
            if required:
                raise
            log.warning("progress_report_dropped", state=state, error=str(exc))
            return
        log.info(
            "reported",
            job_id=command.job_id,
            state=state,
            error=error or None,
            vpn_sessions_dropped=vpn_sessions_dropped or None,
        )

    def outcome(self, command: bus_pb2.UpgradeCommand, outcome: Outcome, health: str = "") -> None:
        """Report a command's recorded outcome (required: raises if not published), with
        the data plane's ``health`` as its soak saw it, if it had one."""
        self.status(
            command,
            outcome.state,
            from_version=outcome.from_version,
            to_version=outcome.to_version,
            error=outcome.error,
            vpn_sessions_dropped=outcome.vpn_sessions_dropped,
            health=health,
        )

    def refused(self, command_id: str, job_id: str, kind: str, reason: str) -> None:
        """Report a command this gateway refused to run (``bus_pb2.CommandRefused``; the
        ids as the message claimed them). Required: raises if not published, so the
        message is delivered again and the refusal reported again."""
        message = bus_pb2.CommandRefused(
            report_id=str(uuid.uuid4()),
            gateway_id=self._gateway_id,
            command_id=command_id,
            job_id=job_id,
            kind=kind,
            reason=reason,
            at=_now(),
            from_version=self._version,
        )
        key = topology.report_key(self._gateway_id, topology.REFUSED)
        self._publisher.publish(topology.REPORTS, key, message, message_id=message.report_id)
        log.warning("command_refused", command_id=command_id, kind=kind, reason=reason)

    def precheck(self, result: bus_pb2.PreCheckResult) -> None:
        """Answer a pre-check with ``result`` (``gateway_daemon.precheck.measure``), stamped
        now, on this gateway's ``precheck`` report key. Raises BusError when it cannot be
        published: the request goes back to the queue once, and is answered again if its
        deadline has not passed."""
        result.at.CopyFrom(_now())
        key = topology.report_key(self._gateway_id, topology.PRECHECK)
        self._publisher.publish(
            topology.REPORTS, key, result, message_id=result.check_id or None, timeout=5
        )

    def hello(
        self,
        endpoints: Sequence[str],
        heartbeat_interval_s: float,
        *,
        ha_peer: str = "",
        pid: int | None = None,
    ) -> None:
        """Announce this gateway: its version, the pid of its forwarding process (``pid``;
        None: this process), served addresses, how often it sends a heartbeat (the
        controller counts it OFFLINE after three missed), and the peer of its
        high-availability pair, if any."""
        message = bus_pb2.GatewayHello(
            gateway_id=self._gateway_id,
            version=self._version,
            pid=os.getpid() if pid is None else pid,
            listen=list(endpoints),
            at=_now(),
            ha_peer=ha_peer,
            features=list(FEATURES),
        )
        message.heartbeat_interval.FromTimedelta(timedelta(seconds=heartbeat_interval_s))
        key = topology.report_key(self._gateway_id, topology.HELLO)
        self._publisher.publish(topology.REPORTS, key, message)

    def heartbeat(
        self, vpn_sessions: int = 0, *, stopping: bool = False, timeout: float = 5
    ) -> None:
        """Say the gateway runs (or, ``stopping``, that it stops now: the controller calls
        it OFFLINE at once), waiting up to ``timeout`` seconds for the broker's confirm.
        Raises BusError when it is not confirmed."""
        message = bus_pb2.GatewayHeartbeat(
            gateway_id=self._gateway_id,
            version=self._version,
            at=_now(),
            vpn_sessions=vpn_sessions,
            stopping=stopping,
        )
        key = topology.report_key(self._gateway_id, topology.HEARTBEAT)
        self._publisher.publish(topology.REPORTS, key, message, timeout=timeout)
