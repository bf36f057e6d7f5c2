"""A gateway whose descriptor limits the test sets, and reads, from outside: the way an
operator's ``prlimit --pid`` or a service manager's LimitNOFILE leaves a running gateway."""

from __future__ import annotations

import os
import resource
from pathlib import Path

from tests.support.gateway_upgrades import GatewayUpgrades
from tests.support.procs import Procs, command
from tests.support.tunnel_gateway import GATEWAY_ID, TunnelGateway, write_lab

# Runs the gateway without CAP_SYS_RESOURCE (also when the tests run as root): it may
# raise a soft descriptor limit up to its hard one, never the hard one.
NO_SYS_RESOURCE = ("setpriv", "--inh-caps=-sys_resource", "--bounding-set=-sys_resource")


def start_without_sys_resource(
    procs: Procs, root: Path, *, amqp_url: str, upgrades: GatewayUpgrades
) -> TunnelGateway:
    """``tunnel_gateway.start_gateway``'s gateway (one UDP and one TCP tunnel), run by
    ``setpriv`` without CAP_SYS_RESOURCE; returns once it serves."""
    tunnels, sites = write_lab(root, 1, 1)
    argv = [
        *NO_SYS_RESOURCE, command("gateway-daemon"), "run",
        "--id", GATEWAY_ID,
        "--amqp", amqp_url,
        "--state-dir", str(root / "state"),
        "--tunnels", str(tunnels),
        *upgrades.provision(GATEWAY_ID, root / "state"),
    ]  # fmt: skip
    gateway = TunnelGateway(procs.start(GATEWAY_ID, argv), sites)
    gateway.wait_serving()
    return gateway


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def descriptor_limits(pid: int) -> tuple[int, int]:
    """Process ``pid``'s RLIMIT_NOFILE: (soft, hard)."""
    return resource.prlimit(pid, resource.RLIMIT_NOFILE)


def set_descriptor_limits(pid: int, soft: int, hard: int) -> None:
    """Set process ``pid``'s RLIMIT_NOFILE (lowering is always allowed)."""
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
