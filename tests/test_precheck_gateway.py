"""The gateway's side of pre-checks, with a real broker, controller and gateway processes:
the test asks a gateway as the controller does (a PreCheckRequest on its command queue with
the header ``x-hitless-kind: precheck``) and reads the answer from a queue of its own on
hitless.reports. A gateway answers from what it measures and changes nothing; one that
cannot meet an upgrade says why; a pre-check it cannot read, or one for another gateway,
is dead-lettered with the reason; one past its deadline gets no answer."""

from __future__ import annotations

import socket
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from controller_svc.signing import Trust
from gateway_daemon.vpn.config import VpnConfig
from hitless.bus import codec, topology
from hitless.config import HostPort
from hitless.v1 import bus_pb2
from tests.support.fleet import Fleet
from tests.support.procs import free_port
from tests.support.rabbit import Management
from tests.support.tmpfs import tiny_filesystem
from tests.support.tunnel_gateway import write_lab
from tests.support.tunnel_probes import udp_round_trip
from tests.support.vpn_users import connect_users, service_pid, stop_service
from tests.support.wait import wait_for

BASE = "1.0.0"  # the version of the installed package (pyproject.toml)
MIB = 1024 * 1024


class Gateway:
    """One gateway as the controller sees it on the bus: asked on its command queue, its
    reports read from a queue of this test's own bound to everything it reports."""

    def __init__(self, fleet: Fleet, rabbit: Management, vhost: str, gateway_id: str) -> None:
        self.fleet, self.rabbit, self.vhost, self.id = fleet, rabbit, vhost, gateway_id
        self._queue = f"test.reports.{uuid.uuid4().hex[:8]}"
        rabbit.request("PUT", f"/queues/{vhost}/{self._queue}", {"durable": False})
        rabbit.request(
            "POST",
            f"/bindings/{vhost}/e/{topology.REPORTS.name}/q/{self._queue}",
            {"routing_key": topology.report_key(gateway_id, "*")},
        )

    def ask(
        self,
        *,
        gateway_id: str | None = None,
        target_version: str = "1.1.0",
        artifact_size: int = 1 * MIB,
        deadline: datetime | None = None,
        body: str | None = None,
    ) -> str:
        """Publish a pre-check to this gateway's queue (``body`` instead of the encoded
        request, when given); its check id."""
        check_id = str(uuid.uuid4())
        request = bus_pb2.PreCheckRequest(
            check_id=check_id,
            gateway_id=self.id if gateway_id is None else gateway_id,
            target_version=target_version,
            artifact_size=artifact_size,
        )
        request.deadline.FromDatetime(deadline or datetime.now(UTC) + timedelta(seconds=30))
        routed = self.rabbit.publish(
            self.vhost,
            topology.COMMANDS.name,
            topology.command_key(self.id),
            codec.encode(request).decode() if body is None else body,
            message_id=check_id,
            headers={topology.KIND_HEADER: topology.PRECHECK},
        )
        assert routed, f"the pre-check was not routed to {self.id}'s queue"
        return check_id

    def reports(self, kind: str) -> list[dict[str, Any]]:
        """What the gateway reported under ``kind`` so far (messages left in the queue)."""
        key = topology.report_key(self.id, kind)
        messages = self.rabbit.get_messages(self.vhost, self._queue, count=500)
        return [m for m in messages if m["routing_key"] == key]

    def answer(self, check_id: str) -> bus_pb2.PreCheckResult | None:
        for message in self.reports(topology.PRECHECK):
            result = codec.decode(bus_pb2.PreCheckResult, message["payload"].encode())
            if result.check_id == check_id:
                return result
        return None

    def wait_answer(self, check_id: str) -> bus_pb2.PreCheckResult:
        return wait_for(
            lambda: self.answer(check_id),
            timeout=30,
            what=f"{self.id}'s answer to pre-check {check_id}",
            describe=self.fleet.procs.dump_logs,
        )

    def dead_letters(self) -> dict[str, str]:
        """message id -> reason, of what hitless.dead holds."""
        return {
            m["properties"].get("message_id", ""): m["properties"]["headers"].get(
                topology.REASON_HEADER, ""
            )
            for m in self.rabbit.get_messages(self.vhost, topology.DEAD_LETTERS.name, 100)
        }


@pytest.fixture
def gw1(fleet: Fleet, rabbit: Management, vhost: str) -> Gateway:
    """gw-1 on BASE, known to the controller."""
    fleet.start_gateway("gw-1")
    fleet.wait_gateways({"gw-1": BASE})
    return Gateway(fleet, rabbit, vhost, "gw-1")


def _state_files(state_dir: Path) -> dict[str, bytes | int]:
    """Every file under the state directory: agent.json by content, the rest by size."""
    return {
        str(p.relative_to(state_dir)): p.read_bytes()
        if p.name == "agent.json"
        else p.stat().st_size
        for p in sorted(state_dir.rglob("*"))
        if p.is_file()
    }


def test_a_gateway_answers_a_precheck_and_changes_nothing(gw1: Gateway) -> None:
    fleet = gw1.fleet
    state_dir = fleet.root / "gw-1"
    before = _state_files(state_dir)

    check_id = gw1.ask(target_version="1.1.0", artifact_size=3 * MIB)
    answer = gw1.wait_answer(check_id)

    assert list(answer.problems) == []
    assert (answer.check_id, answer.gateway_id, answer.version) == (check_id, "gw-1", BASE)
    assert answer.needed_bytes == 2 * 3 * MIB
    assert answer.free_bytes > answer.needed_bytes
    assert answer.controller_reachable, answer.controller_error
    assert answer.controller_error == ""
    assert (answer.vpn_sessions, answer.tunnels_up, answer.tunnels_configured) == (0, 0, 0)
    assert answer.HasField("at")
    assert gw1.reports(topology.REFUSED) == [], "a pre-check is never taken for a command"
    assert gw1.reports(topology.STATUS) == []
    assert _state_files(state_dir) == before, "a pre-check must change nothing on disk"

    # The gateway takes a real command after it, as before.
    fleet.release("1.1.0")
    release = next(r for r in fleet.cli_json("releases", "list") if r["version"] == "1.1.0")
    command = bus_pb2.UpgradeCommand(
        command_id=str(uuid.uuid4()),
        job_id=f"after-precheck-{uuid.uuid4().hex[:8]}",
        gateway_id="gw-1",
        target_version="1.1.0",
        artifact_sha256=release["sha256"],
        artifact_size=release["size"],
    )
    command.deadline.FromDatetime(datetime.now(UTC) + timedelta(minutes=5))
    signer = Trust(fleet.root / "signer-tuf", fleet.keys.root_json.read_bytes(), fleet.keys.online)
    headers = signer.command_headers(command, datetime.now(UTC), allow_downgrade=False)
    assert gw1.rabbit.publish(
        gw1.vhost, topology.COMMANDS.name, topology.command_key("gw-1"),
        codec.encode(command).decode(), message_id=command.command_id, headers=headers,
    )  # fmt: skip
    fleet.wait_gateways({"gw-1": "1.1.0"}, timeout=60)
    assert fleet.greeting("gw-1") == "hitless-gateway gw-1 1.1.0"

    # The new version answers pre-checks too, with its own version.
    answer = gw1.wait_answer(gw1.ask(target_version="1.0.0"))
    assert answer.version == "1.1.0"
    assert list(answer.problems) == []  # a downgrade is the job's to allow, not a problem


def test_a_gateway_on_a_small_filesystem_says_it_has_no_room(
    fleet: Fleet, rabbit: Management, vhost: str
) -> None:
    state_dir = fleet.root / "gw-small"  # where Fleet.start_gateway keeps gw-small's state
    with tiny_filesystem(state_dir, "4m"):
        proc = fleet.start_gateway("gw-small")
        try:
            fleet.wait_gateways({"gw-small": BASE})
            gateway = Gateway(fleet, rabbit, vhost, "gw-small")
            answer = gateway.wait_answer(gateway.ask(artifact_size=50_000_000))
        finally:
            fleet.procs.stop(proc)

    assert answer.needed_bytes == 100_000_000
    assert 0 < answer.free_bytes <= 4 * MIB
    assert answer.controller_reachable
    (problem,) = answer.problems
    free = answer.free_bytes / MIB
    assert problem == (
        f"only {free:.1f} MiB free in {state_dir / 'downloads'}; the release's download and "
        "staged copy need 95.4 MiB: free space there, or move --state-dir"
    )


def test_a_precheck_for_another_gateway_or_unreadable_is_dead_lettered(gw1: Gateway) -> None:
    misaddressed = gw1.ask(gateway_id="gw-2")
    garbage = gw1.ask(body="{this is not json")
    valid = gw1.ask()
    assert list(gw1.wait_answer(valid).problems) == []  # it went on consuming

    def both_dead() -> dict[str, str] | None:
        found = gw1.dead_letters()
        return found if {misaddressed, garbage} <= found.keys() else None

    reasons = wait_for(
        both_dead,
        timeout=15,
        what="both pre-checks in hitless.dead",
        describe=lambda: str(gw1.dead_letters()),
    )
    assert reasons[misaddressed] == (
        f"pre-check '{misaddressed}' names gateway 'gw-2', not this one (gw-1): not answered"
    )
    assert reasons[garbage].startswith(
        "a pre-check that cannot be read: hitless.v1.PreCheckRequest"
    )
    assert gw1.answer(misaddressed) is None
    assert gw1.answer(garbage) is None
    assert gw1.reports(topology.REFUSED) == [], "a pre-check is never refused as a command"


def test_a_precheck_past_its_deadline_gets_no_answer(gw1: Gateway) -> None:
    expired = gw1.ask(deadline=datetime.now(UTC) - timedelta(seconds=1))
    later = gw1.ask()
    gw1.wait_answer(later)  # taken after the expired one: that one was handled by now
    assert gw1.answer(expired) is None
    assert expired not in gw1.dead_letters()
    assert "precheck_expired" in gw1.fleet.procs.dump_logs()


def test_a_gateway_that_cannot_reach_the_download_service_says_so(
    fleet: Fleet, rabbit: Management, vhost: str
) -> None:
    nowhere = f"127.0.0.1:{free_port()}"  # nothing listens there
    fleet.start_gateway("gw-lost", nowhere)
    fleet.wait_gateways({"gw-lost": BASE})
    gateway = Gateway(fleet, rabbit, vhost, "gw-lost")

    answer = gateway.wait_answer(gateway.ask())
    assert not answer.controller_reachable
    assert answer.controller_error.startswith("UNAVAILABLE: "), answer.controller_error
    (problem,) = answer.problems
    assert problem == (
        f"the controller's download service at {nowhere} did not answer: {answer.controller_error}"
    )


def test_a_precheck_counts_the_vpn_users_connected(
    fleet: Fleet, rabbit: Management, vhost: str
) -> None:
    vpn = VpnConfig(HostPort("127.0.0.1", free_port()), fleet.root / "gw-1")
    proc = fleet.start_gateway("gw-1", None, "--vpn-listen", str(vpn.listen))
    users = []
    try:
        fleet.wait_gateways({"gw-1": BASE})
        wait_for(lambda: service_pid(vpn.state_dir), timeout=15, what="the VPN service")
        gateway = Gateway(fleet, rabbit, vhost, "gw-1")
        users = connect_users(2, vpn.listen.port, vpn.cert)
        answer = gateway.wait_answer(gateway.ask())
        assert answer.vpn_sessions == 2
        assert list(answer.problems) == []
    finally:
        for user in users:
            user.close()
        fleet.procs.stop(proc)
        stop_service(vpn.state_dir)


def test_a_precheck_counts_the_tunnels_established(
    fleet: Fleet, rabbit: Management, vhost: str
) -> None:
    config, sites = write_lab(fleet.root, udp_tunnels=2, tcp_tunnels=1)
    fleet.start_gateway("gw-1", None, "--tunnels", str(config))
    fleet.wait_gateways({"gw-1": BASE})
    gateway = Gateway(fleet, rabbit, vhost, "gw-1")

    # TCP tunnels carry connections a site opens when it has traffic: not counted.
    answer = gateway.wait_answer(gateway.ask())
    assert (answer.tunnels_up, answer.tunnels_configured) == (0, 2)
    assert list(answer.problems) == []  # said, not held against it

    udp_round_trip(sites)  # the first UDP tunnel's site handshakes: that tunnel is up
    answer = gateway.wait_answer(gateway.ask())
    assert (answer.tunnels_up, answer.tunnels_configured) == (1, 2)
    assert list(answer.problems) == []


def test_a_silent_controller_is_waited_for_no_longer_than_the_deadline_allows(
    fleet: Fleet, rabbit: Management, vhost: str
) -> None:
    """A download service that takes the connection and never answers (the kernel accepts
    it; nobody reads): the gateway gives up in time for its answer to be read."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        fleet.start_gateway("gw-1", address)
        fleet.wait_gateways({"gw-1": BASE})
        gateway = Gateway(fleet, rabbit, vhost, "gw-1")

        deadline = datetime.now(UTC) + timedelta(seconds=2)
        answer = gateway.wait_answer(gateway.ask(deadline=deadline))
    assert not answer.controller_reachable
    assert answer.controller_error.startswith("DEADLINE_EXCEEDED: "), answer.controller_error
    assert answer.at.ToDatetime(UTC) < deadline, "the answer came too late to be read"
