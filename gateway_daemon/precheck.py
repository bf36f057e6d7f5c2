"""Pre-checks: what this gateway answers when the controller asks whether anything would
stop an upgrade to a release now (``bus_pb2.PreCheckRequest`` -> ``PreCheckResult``).

Everything is measured, nothing changed, on disk or in the agent's state:

- free space on the filesystem where releases are downloaded and staged (the state
  directory's ``downloads`` and ``releases``), against ``ARTIFACT_COPIES`` times the
  artifact's size (the download and its staged copy);
- whether the controller's download service answers a gRPC health check
  (``grpc.health.v1.Health/Check`` for ``hitless.v1.Artifacts``, which a gateway's
  certificate may call), over the channel the downloads use, within
  ``HEALTH_TIMEOUT_S``;
- VPN users connected now, and the tunnels established now out of those configured;
- the version it runs, against the one asked for.

Each finding that would stop an upgrade (too little space, a controller that does not
answer) is one line of ``problems``, and the controller leaves such a gateway out of the
job. The tunnels and VPN users are only said: the plan shows them.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway_daemon.download import ControllerChannel
from gateway_daemon.health import Counted
from gateway_daemon.state import AgentState
from hitless.v1 import artifacts_pb2, bus_pb2

# The longest a pre-check waits for the controller's health answer, in seconds; less when
# the request's deadline is nearer, so that the answer, sent ANSWER_MARGIN_S before the
# deadline, is still read (never less than _MIN_HEALTH_TIMEOUT_S).
HEALTH_TIMEOUT_S = 3.0
ANSWER_MARGIN_S = 0.5
_MIN_HEALTH_TIMEOUT_S = 0.1
# The download and the staged copy of a release, each the artifact's size.
ARTIFACT_COPIES = 2
_MIB = 1024 * 1024
# A health check that found no connection is tried again only with at least this long left.
_RETRY_FLOOR_S = 0.2
# What the health check asks about: the service gateways download from.
_DOWNLOAD_SERVICE = artifacts_pb2.DESCRIPTOR.services_by_name["Artifacts"].full_name

VpnSessions = Callable[[], int]
TunnelCounts = Callable[[], tuple[int, int]]


def measure(
    request: bus_pb2.PreCheckRequest,
    *,
    version: str,
    state: AgentState,
    channel: ControllerChannel,
    vpn_sessions: VpnSessions,
    tunnels: TunnelCounts,
    now: datetime,
) -> bus_pb2.PreCheckResult:
    """This gateway's answer to ``request`` (its ``at`` left for the reporter to stamp).

    ``version`` is the version this process runs; ``channel`` the one downloads use;
    ``vpn_sessions`` gives the VPN users connected now and ``tunnels`` (up, configured);
    ``now`` (tz-aware) bounds the health check's wait by the request's deadline. Raises
    nothing for what it measures: a failure is a problem line."""
    result = bus_pb2.PreCheckResult(
        check_id=request.check_id,
        gateway_id=request.gateway_id,
        version=version,
    )
    problems: list[str] = []

    needed = ARTIFACT_COPIES * max(0, request.artifact_size)
    result.needed_bytes = needed
    try:
        free, where = free_space((state.downloads_dir, state.releases_dir))
    except OSError as exc:
        problems.append(
            f"cannot measure the free space in {state.downloads_dir}: {exc}; check that the "
            "state directory (--state-dir) is readable by the gateway"
        )
    else:
        result.free_bytes = free
        if free < needed:
            problems.append(
                f"only {free / _MIB:.1f} MiB free in {where}; the release's download and "
                f"staged copy need {needed / _MIB:.1f} MiB: free space there, or move "
                "--state-dir"
            )

    timeout = HEALTH_TIMEOUT_S
    if request.HasField("deadline"):
        left = (request.deadline.ToDatetime(now.tzinfo) - now).total_seconds()
        timeout = max(_MIN_HEALTH_TIMEOUT_S, min(timeout, left - ANSWER_MARGIN_S))
    error = controller_error(channel, timeout)
    result.controller_reachable = error is None
    if error is not None:
        result.controller_error = error
        problems.append(
            f"the controller's download service at {channel.controller} did not answer: {error}"
        )

    # Said, never a problem: a tunnel whose site has not handshaken yet may be idle, not
    # broken, and whether a downgrade may run is the job's to say (--allow-downgrade).
    result.vpn_sessions = max(0, vpn_sessions())
    result.tunnels_up, result.tunnels_configured = tunnels()
    result.problems.extend(problems)
    return result


def free_space(dirs: tuple[Path, ...]) -> tuple[int, Path]:
    """(bytes free, directory) for the directory of ``dirs`` with the least space free
    to an unprivileged writer (``shutil.disk_usage``). A directory that does not exist is
    measured at its nearest existing parent; none is created. Raises OSError when one
    cannot be measured."""
    found: list[tuple[int, Path]] = []
    for directory in dirs:
        existing = directory
        while not existing.exists() and existing.parent != existing:
            existing = existing.parent
        found.append((shutil.disk_usage(existing).free, directory))
    return min(found)


def controller_error(channel: ControllerChannel, timeout_s: float) -> str | None:
    """Why the controller's download service did not answer a health check over
    ``channel`` within ``timeout_s`` seconds; None when it answered SERVING, or answered
    that it is busy (RESOURCE_EXHAUSTED: reachable, and a download waits for it).

    A call that failed on the connection closes it (``ControllerChannel.reset``: the agent
    takes one message at a time, so no download is using it), and one that found no
    connection (UNAVAILABLE: e.g. a controller that has just handed over to its next
    version) is tried once more on a new one within the time left."""
    ends = time.monotonic() + timeout_s
    error = _health(channel, timeout_s)
    left = ends - time.monotonic()
    if error is not None and error[0] == grpc.StatusCode.UNAVAILABLE and left > _RETRY_FLOOR_S:
        error = _health(channel, left)
    return None if error is None else error[1]


def _health(
    channel: ControllerChannel, timeout_s: float
) -> tuple[grpc.StatusCode | None, str] | None:
    """One health check of the download service: None when it answered SERVING or busy,
    else (the call's status code, or None, and why)."""
    stub = health_pb2_grpc.HealthStub(channel.get())
    try:
        reply = stub.Check(
            health_pb2.HealthCheckRequest(service=_DOWNLOAD_SERVICE), timeout=timeout_s
        )
    except grpc.RpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return None
        channel.reset()
        name = code.name if code is not None else "no status"
        return code, f"{name}: {exc.details() or 'no details'}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return None, f"it reports {status} for {_DOWNLOAD_SERVICE}"
    return None


def tunnel_counts(plane: Counted) -> tuple[int, int]:
    """(established now, configured) UDP tunnels of ``plane``: a tunnel is established
    once its site's handshake gave it a session and an endpoint to send to. TCP tunnels
    are not counted: each carries connections a site opens when it has traffic, so one
    with none open is idle, not down (``DataPlane.health``)."""
    health = plane.health()
    return len(health.up), health.configured
