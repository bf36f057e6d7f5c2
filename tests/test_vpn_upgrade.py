"""The gateway's VPN service through upgrades, with real processes: the controller, the
broker, gateway daemons with ``--vpn-listen``, and VPN users on real TLS sessions.

An ordinary upgrade leaves the service (same process) and its users alone, and the new
daemon watches it from then on; a release that restarts the VPN service drops the users,
who can reconnect at once to the new version's service, and the job records how many were
dropped. Heartbeats carry the number of users connected."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from gateway_daemon.vpn import control
from gateway_daemon.vpn.config import VpnConfig
from hitless.config import HostPort
from hitless.v1 import controller_pb2
from tests.support.fleet import Fleet
from tests.support.procs import free_port
from tests.support.vpn_users import VpnUser, connect_users, service_pid, stop_service
from tests.support.wait import wait_for

BASE = "1.0.0"
GATEWAY = "gw-1"


@dataclass(frozen=True)
class VpnGateway:
    fleet: Fleet
    vpn: VpnConfig

    def users(self, count: int, prefix: str = "user") -> list[VpnUser]:
        return connect_users(count, self.vpn.listen.port, self.vpn.cert, prefix)

    def service_pid(self) -> int | None:
        return service_pid(self.vpn.state_dir)

    def reported_sessions(self) -> int:
        """What the controller last heard from the gateway's heartbeats."""
        request = controller_pb2.ListGatewaysRequest()
        gateways = self.fleet.stub().ListGateways(request, timeout=10).gateways
        return next(g.vpn_sessions for g in gateways if g.id == GATEWAY)

    def wait_reported(self, sessions: int) -> None:
        wait_for(
            lambda: self.reported_sessions() == sessions,
            timeout=15,
            what=f"a heartbeat reporting {sessions} VPN sessions",
            interval=0.1,
            describe=lambda: f"{self.reported_sessions()} reported",
        )


@pytest.fixture
def gateway(fleet: Fleet) -> Iterator[VpnGateway]:
    """gw-1 on the installed version, with a VPN service and heartbeats every 0.3 s. The
    service outlives the daemon on purpose: it is stopped after the gateway."""
    vpn = VpnConfig(HostPort("127.0.0.1", free_port()), fleet.root / GATEWAY)
    proc = fleet.start_gateway(
        GATEWAY, None, "--vpn-listen", str(vpn.listen), "--heartbeat-interval", "0.3"
    )
    try:
        fleet.wait_gateways({GATEWAY: BASE})
        wait_for(lambda: service_pid(vpn.state_dir), timeout=15, what="the VPN service")
        yield VpnGateway(fleet, vpn)
    finally:
        fleet.procs.stop(proc)
        stop_service(vpn.state_dir)


def close_all(users: list[VpnUser]) -> None:
    for user in users:
        user.close()


def test_vpn_users_stay_connected_through_an_ordinary_upgrade(gateway: VpnGateway) -> None:
    fleet = gateway.fleet
    users = gateway.users(3)
    try:
        gateway.wait_reported(3)
        before = gateway.service_pid()
        fleet.release("1.1.0")
        job = fleet.cli_json("upgrade", "--latest", "--wait", "--yes")
        assert job["state"] == "SUCCEEDED", job
        pongs = [u.pongs for u in users]
        wait_for(
            lambda: all(u.pongs > p for u, p in zip(users, pongs, strict=True)),
            timeout=5,
            what="every user's keepalives answered after the upgrade",
        )
        assert [u.dropped for u in users] == [None, None, None]
        assert gateway.service_pid() == before, "the VPN service must be the same process"
        status = fleet.cli_json("status", job["job_id"])
        assert [g["vpn_sessions_dropped"] for g in status["gateways"]] == [0]
        fleet.wait_gateways({GATEWAY: "1.1.0"})
        gateway.wait_reported(3)  # the new version's heartbeats count the same users
    finally:
        close_all(users)

    # The new version watches the service it attached to: killed, it is started again.
    assert before is not None
    os.kill(before, signal.SIGKILL)
    wait_for(
        lambda: gateway.service_pid() not in (None, before),
        timeout=15,
        what="the upgraded daemon to restart the killed VPN service",
        describe=fleet.procs.dump_logs,
    )
    again = gateway.users(1, "again")
    close_all(again)


def test_a_vpn_restarting_upgrade_drops_the_users_who_reconnect_at_once(
    gateway: VpnGateway,
) -> None:
    fleet = gateway.fleet
    users = gateway.users(2)
    try:
        gateway.wait_reported(2)
        before = gateway.service_pid()
        fleet.release("2.0.0", restarts_vpn_service=True)
        job = fleet.cli_json("upgrade", "--latest", "--wait", "--yes")
        assert job["state"] == "SUCCEEDED", job
        # By the time the job has succeeded, the new service takes users.
        again = gateway.users(2, "again")
        wait_for(lambda: not any(u.connected for u in users), timeout=5, what="users dropped")
        assert {u.dropped for u in users} == {"BYE service restarting"}
    finally:
        close_all(users)
    try:
        after = control.status(gateway.vpn.control_socket)
        assert after.pid != before
        assert after.version == "2.0.0", "the new release's VPN service must run"
        assert [g["vpn_sessions_dropped"] for g in job["gateways"]] == [2]
        status = fleet.cli_json("status", job["job_id"])
        assert [(g["state"], g["vpn_sessions_dropped"]) for g in status["gateways"]] == [
            ("SUCCEEDED", 2)
        ]
        gateway.wait_reported(2)
    finally:
        close_all(again)
