"""A real gateway process serving encrypted tunnels, its lab (config and sites), traffic
through it on a thread, and the processes of its handoffs, for upgrade tests."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
from pathlib import Path

from gateway_daemon.tunnels.lab import Sites, make_lab
from gateway_daemon.tunnels.report import TrafficReport
from gateway_daemon.tunnels.traffic import TrafficConfig, TrafficRun
from tests.support.gateway_upgrades import GatewayUpgrades
from tests.support.procs import Proc, Procs, command, free_port, group_members
from tests.support.wait import wait_for

GATEWAY_ID = "gw-t"


@dataclasses.dataclass
class TunnelGateway:
    proc: Proc
    sites: Sites

    def events(self, name: str) -> list[dict[str, object]]:
        """The JSON log lines of every process of this gateway with ``event == name``."""
        out = []
        for line in self.proc.log().splitlines():
            if line.startswith("{") and f'"{name}"' in line:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # two processes' lines interleaved in the shared log
                if record.get("event") == name:
                    out.append(record)
        return out

    def serving_pid(self) -> int:
        return int(str(self.events("gateway_serving")[-1]["pid"]))

    def wait_serving(self, count: int = 1, timeout: float = 20.0) -> None:
        """Until ``count`` processes of this gateway have said they serve."""
        wait_for(
            lambda: len(self.events("gateway_serving")) >= count,
            timeout=timeout,
            what=f"gateway process #{count} to serve",
            describe=lambda: self.proc.log()[-3000:],
        )

    def wait_consuming(self, timeout: float = 30.0) -> None:
        """Until the agent of the process serving now takes commands: the forwarding
        process serves before its agent has loaded its trust and consumes its queue."""
        wait_for(
            lambda: '"bus_consuming"' in self.proc.log().split('"gateway_serving"')[-1],
            timeout=timeout,
            what="the gateway's agent to consume its queue",
            describe=lambda: self.proc.log()[-3000:],
        )

    def new_process(self) -> int | None:
        """The pid of a next version being started by the serving process, if any."""
        serving = self.serving_pid()
        for pid in group_members(self.proc.pgid):
            if pid == serving:
                continue
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--handoff-fd" in argv:
                return pid
        return None


def write_lab(directory: Path, udp_tunnels: int, tcp_tunnels: int) -> tuple[Path, Sites]:
    """A tunnels config on free loopback ports and the sites that match it."""
    config, sites = make_lab(
        udp_tunnels,
        tcp_tunnels,
        udp_listen=("127.0.0.1", free_port()),
        udp_plain=("127.0.0.1", free_port()),
        tcp_listen=("127.0.0.1", free_port()),
    )
    path = directory / "tunnels.json"
    path.write_text(json.dumps(config.to_dict()))
    return path, sites


def start_gateway(
    procs: Procs,
    root: Path,
    *,
    amqp_url: str,
    upgrades: GatewayUpgrades,
    udp_tunnels: int = 6,
    tcp_tunnels: int = 2,
    release: Path | None = None,
    handoff_timeout: float = 20.0,
) -> TunnelGateway:
    """Start a gateway (from ``release``, or the installed package) serving a fresh lab,
    provisioned by ``upgrades`` (its identity and trust root; it downloads from there);
    return once it serves. ``handoff_timeout`` is its ready deadline: a new version starts
    two interpreters at idle priority, which took over 5 s on this 2-core machine with two
    test workers and traffic on a slow day; a test of a version that never gets ready
    passes a shorter one."""
    tunnels, sites = write_lab(root, udp_tunnels, tcp_tunnels)
    program = (
        [sys.executable, str(release), "gateway-daemon"] if release else [command("gateway-daemon")]
    )
    argv = [
        *program, "run",
        "--id", GATEWAY_ID,
        "--amqp", amqp_url,
        "--state-dir", str(root / "state"),
        "--tunnels", str(tunnels),
        "--handoff-timeout", str(handoff_timeout),
        *upgrades.provision(GATEWAY_ID, root / "state"),
    ]  # fmt: skip
    gateway = TunnelGateway(procs.start(GATEWAY_ID, argv), sites)
    gateway.wait_serving()
    gateway.wait_consuming()
    return gateway


class Traffic:
    """The traffic tool on a thread, until ``stop()``; then its report."""

    def __init__(self, sites: Sites, rate: float = 2000, tcp_rate: float = 300_000) -> None:
        self.run = TrafficRun(
            TrafficConfig(sites, rate=rate, duration=120, tcp_rate=tcp_rate, drain=3)
        )
        self._result: list[TrafficReport] = []
        self._thread = threading.Thread(target=self._go, name="traffic", daemon=True)

    def _go(self) -> None:
        self._result.append(self.run.run())

    def __enter__(self) -> Traffic:
        self._thread.start()
        assert self.run.started.wait(10), "the traffic tool could not set up its sites"
        return self

    def __exit__(self, *_exc: object) -> None:
        self.run.stop()
        self._thread.join(15)

    def stop(self) -> TrafficReport:
        self.__exit__()
        assert self._result, "the traffic run did not finish"
        return self._result[0]


def holds_socket_of(pid: int, other: int, port: int) -> bool:
    """Whether process ``pid`` holds the UDP socket that process ``other`` has bound to
    ``port`` (the same open file, passed by SCM_RIGHTS)."""
    inodes = set()
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port:
            inodes.add(f"socket:[{fields[9]}]")
    for proc in (other, pid):
        try:
            links = {os.readlink(f"/proc/{proc}/fd/{fd}") for fd in os.listdir(f"/proc/{proc}/fd")}
        except OSError:
            return False
        if not links & inodes:
            return False
    return True
