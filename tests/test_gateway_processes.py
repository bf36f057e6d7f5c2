"""One process forwards, another upgrades: a gateway runs as its forwarding process
(``gateway-daemon run``: the data plane) and the agent it starts (commands, downloads,
reports). Real processes on a real broker: the agent killed, aborted or starved of
descriptors never stops the forwarding, and the forwarding process loads none of the
agent's libraries."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

from gateway_daemon.agent_process import COMMAND_NICE
from tests.support import fault_releases, releases, tunnel_probes
from tests.support.gateway_upgrades import GatewayUpgrades, state_name
from tests.support.procs import Procs
from tests.support.rabbit import amqp_url
from tests.support.tunnel_gateway import (
    GATEWAY_ID,
    Traffic,
    TunnelGateway,
    start_gateway,
)
from tests.support.wait import wait_for
from tests.test_hitless_upgrade import assert_clean

AGENT_LIBRARIES = ("grpc", "pika", "tuf", "sqlalchemy")


def _agent_pid(gateway: TunnelGateway, count: int = 1) -> int:
    """The pid of the ``count``-th agent this gateway's processes started."""
    wait_for(
        lambda: len(gateway.events("agent_started")) >= count,
        timeout=20,
        what=f"agent #{count} to start",
        describe=lambda: gateway.proc.log()[-3000:],
    )
    return int(str(gateway.events("agent_started")[count - 1]["agent_pid"]))


def _agent_attached(gateway: TunnelGateway, count: int) -> None:
    """Until ``count`` agents have attached and the last one consumes its queue."""
    wait_for(
        lambda: (
            len(gateway.events("agent_serving")) >= count
            and '"bus_consuming"' in gateway.proc.log().split('"agent_serving"')[-1]
        ),
        timeout=30,
        what=f"agent #{count} to attach and consume",
        describe=lambda: gateway.proc.log()[-3000:],
    )


def _nice_values(pid: int) -> list[int]:
    """The nice value of each thread of process ``pid`` (field 19 of its stat)."""
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            out.append(int(stat.rsplit(")", 1)[1].split()[16]))
    return out


def _mapped(pid: int, needle: str) -> bool:
    return needle in Path(f"/proc/{pid}/maps").read_text()


def _serves_new_tunnels(gateway: TunnelGateway) -> None:
    """A new UDP and a new TCP tunnel are set up and carry data both ways: the data plane
    takes new tunnels, not only carries the old ones (after the traffic run, whose sites
    hold the tunnels' plain sides)."""
    tunnel_probes.udp_round_trip(gateway.sites)
    tunnel_probes.tcp_round_trip(gateway.sites)


def test_the_forwarding_process_loads_none_of_the_agents_libraries() -> None:
    code = (
        "import sys\n"
        "import gateway_daemon.cli, gateway_daemon.forwarding, gateway_daemon.dataplane\n"
        "import gateway_daemon.handoff.parent, gateway_daemon.handoff.child\n"
        f"print(sorted(m for m in {AGENT_LIBRARIES!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    # And the agent's does load them: the check above can fail.
    code = code.replace("gateway_daemon.cli,", "gateway_daemon.agent_process, gateway_daemon.cli,")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['grpc', 'pika', 'tuf']", out.stdout + out.stderr


def test_killing_the_agent_never_stops_forwarding_and_a_new_agent_upgrades(
    vhost: str, tmp_path: Path, procs: Procs, upgrades: GatewayUpgrades
) -> None:
    b = releases.build("1.2.0", tmp_path / "b.pyz")
    gateway = start_gateway(procs, tmp_path, amqp_url=amqp_url(vhost), upgrades=upgrades)
    forwarding = gateway.serving_pid()
    agent = _agent_pid(gateway)
    _agent_attached(gateway, 1)
    # The gRPC library runs in the agent only.
    assert _mapped(agent, "cygrpc") and not _mapped(forwarding, "cygrpc")
    with Traffic(gateway.sites) as traffic:
        os.kill(agent, signal.SIGKILL)
        second = _agent_pid(gateway, 2)
        assert second != agent
        _agent_attached(gateway, 2)
        os.kill(second, signal.SIGABRT)  # as a library's abort() would
        _agent_pid(gateway, 3)
        _agent_attached(gateway, 3)
        assert gateway.serving_pid() == forwarding, "the forwarding process never changed"
        report = upgrades.upgrade(GATEWAY_ID, "1.2.0", b)
        assert state_name(report) == "SUCCEEDED", report.error
        gateway.wait_serving(count=2)
        result = traffic.stop()
    assert_clean(result)
    _serves_new_tunnels(gateway)
    exited = [e["exit_code"] for e in gateway.events("agent_exited")]
    assert exited == [-signal.SIGKILL, -signal.SIGABRT], exited


def test_an_agent_out_of_descriptors_leaves_the_data_plane_serving(
    vhost: str, tmp_path: Path, procs: Procs, upgrades: GatewayUpgrades
) -> None:
    b = releases.build("1.2.0", tmp_path / "b.pyz")
    gateway = start_gateway(procs, tmp_path, amqp_url=amqp_url(vhost), upgrades=upgrades)
    agent = _agent_pid(gateway)
    _agent_attached(gateway, 1)
    with Traffic(gateway.sites) as traffic:
        # The agent may hold what it holds now and open nothing more.
        held = len(os.listdir(f"/proc/{agent}/fd"))
        resource.prlimit(agent, resource.RLIMIT_NOFILE, (held, held))
        upgrades.sign("1.2.0", b)
        command = upgrades.command(GATEWAY_ID, "1.2.0", b)
        upgrades.send(command, upgrades.signed_headers(command))
        # The agent cannot open a connection to fetch the release: the job ends, with a
        # report.
        final = upgrades.wait_final(command.command_id, timeout=60)
        assert state_name(final) == "FAILED", final
        # The command ran on a thread at background priority; the agent's others did not.
        nices = _nice_values(agent)
        assert COMMAND_NICE in nices and 0 in nices, nices
        result = traffic.stop()
    assert_clean(result)
    _serves_new_tunnels(gateway)
    assert len(gateway.events("gateway_serving")) == 1, "the data plane never moved"
    assert len(os.listdir(f"/proc/{agent}/fd")) <= held, "the agent could open no more"


def test_a_new_version_whose_agent_cannot_start_is_rolled_back(
    vhost: str, tmp_path: Path, procs: Procs, upgrades: GatewayUpgrades
) -> None:
    """The new forwarding process says READY only once its agent has reached the broker:
    one whose agent exits at start is rolled back with the exit code, and the old
    version forwards on with its own agent."""
    bad = fault_releases.build("1.2.0", tmp_path / "bad.pyz", "agent-exits-at-start")
    gateway = start_gateway(
        procs, tmp_path, amqp_url=amqp_url(vhost), upgrades=upgrades, handoff_timeout=15.0
    )
    old = gateway.serving_pid()
    with Traffic(gateway.sites) as traffic:
        report = upgrades.upgrade(GATEWAY_ID, "1.2.0", bad, timeout=45)
        assert state_name(report) == "ROLLED_BACK", report.error
        assert "the new version's agent exited with 3 before it was ready" in report.error
        assert fault_releases.mark("agent-exits-at-start") in gateway.proc.log()
        result = traffic.stop()
    assert_clean(result)
    assert gateway.serving_pid() == old and gateway.new_process() is None
    _serves_new_tunnels(gateway)
    good = releases.build("1.2.1", tmp_path / "good.pyz")
    report = upgrades.upgrade(GATEWAY_ID, "1.2.1", good)
    assert state_name(report) == "SUCCEEDED", report.error


def test_an_agent_killed_during_a_handoff_leaves_its_outcome_to_the_next_one_and_no_rerun(
    vhost: str, tmp_path: Path, procs: Procs, upgrades: GatewayUpgrades
) -> None:
    """The agent dies while the forwarding process hands off to a version that hangs: no
    agent starts until the handoff has ended (rolled back), the next one is told how it
    ended and records it, and the redelivered command is answered from that record: one
    report, and the faulty version started once."""
    hang = fault_releases.build("1.2.0", tmp_path / "hang.pyz", "hangs-receiving-descriptors")
    gateway = start_gateway(
        procs, tmp_path, amqp_url=amqp_url(vhost), upgrades=upgrades, handoff_timeout=5.0
    )
    old, agent = gateway.serving_pid(), _agent_pid(gateway)
    _agent_attached(gateway, 1)
    upgrades.sign("1.2.0", hang)
    command = upgrades.command(GATEWAY_ID, "1.2.0", hang)
    upgrades.send(command, upgrades.signed_headers(command))
    mark = fault_releases.mark("hangs-receiving-descriptors")
    wait_for(
        lambda: mark in gateway.proc.log(),
        timeout=30,
        what="the new version to hang holding the descriptors",
        describe=lambda: gateway.proc.log()[-3000:],
    )
    os.kill(agent, signal.SIGKILL)
    final = upgrades.wait_final(command.command_id, timeout=60)
    assert state_name(final) == "ROLLED_BACK", final.error
    assert final.error.startswith("handoff to 1.2.0 failed: ") and "ready" in final.error
    kept, late = (
        gateway.events("handoff_answer_kept"),
        gateway.events("handoff_outcome_recorded_late"),
    )
    assert len(kept) == 1 and len(late) == 1, gateway.proc.log()[-3000:]
    # The second agent started only once the handoff had ended.
    log = gateway.proc.log()
    assert log.index('"handoff_answer_kept"') < log.rindex('"agent_started"')
    _agent_attached(gateway, 2)
    assert log.count(mark) == 1, "the upgrade was run again"
    statuses = upgrades.statuses(command.command_id)
    assert statuses.count("SWAPPING") == 1 and statuses[-1] == "ROLLED_BACK", statuses
    assert gateway.serving_pid() == old
