"""The cases of ``make bench-handoff-faults`` (``bench/handoff_faults.py``), and how one
is played: a gateway of its own, a traffic run per run, the upgrade, the fault (in the
release, or a SIGKILL sent from here), and what the traffic tool and the gateway saw.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.hitless import _raise_priority
from gateway_daemon.tunnels import drops
from tests.support import fault_releases, releases
from tests.support.gateway_upgrades import GatewayUpgrades, state_name
from tests.support.procs import Procs, command, group_members
from tests.support.tunnel_gateway import GATEWAY_ID, TunnelGateway, holds_socket_of, start_gateway
from tests.support.tunnel_probes import tcp_round_trip, udp_round_trip
from tests.support.wait import wait_for

UDP_TUNNELS = 6
TCP_TUNNELS = 2
RATE_PPS = 20_000  # bench-hitless's offered load
TCP_RATE = 100_000  # bytes/s per TCP tunnel and direction
HANDOFF_TIMEOUT_S = 20.0  # the ready deadline the fault tests give a loaded machine
# Traffic goes on this long once the handoff has settled: the survivor under load.
TAIL_S = 1.0

TIMED_OUT_READY = "timed out waiting for the new process to say ready"


@dataclass(frozen=True)
class Release:
    """How a case's release is built: clean, ``releases.BROKEN[broken]`` or
    ``fault_releases.FAULTS[fault]``."""

    broken: str | None = None
    fault: str | None = None

    def build(self, version: str, output: Path) -> Path:
        """Build this release, stamped ``version``, at ``output``; return ``output``."""
        if self.fault is not None:
            return fault_releases.build(version, output, self.fault)
        return releases.build(version, output, self.broken)


CLEAN = Release()


@dataclass(frozen=True)
class Case:
    """One row of the table: a fault (or none), played ``runs`` times."""

    name: str
    kind: str  # "baseline", "kill-old", "kill-new", "hang-new"
    what: str
    start: Release = CLEAN  # the release the gateway starts from
    target: Release | None = CLEAN  # what each run upgrades to; None: no upgrade
    alternate: bool = False  # upgrade to two versions in turn (each run changes version)
    killer: str = ""  # "old-holding" or "new-at-spawn": the bench sends the SIGKILL
    mark: str = ""  # what the faulty release writes as the fault strikes

    @property
    def expected(self) -> str:
        """The job state this case's upgrades should end in."""
        return "ROLLED_BACK" if self.kind in ("kill-new", "hang-new") else "SUCCEEDED"


def _struck(name: str, kind: str, what: str, fault: str, *, old_side: bool = False) -> Case:
    """A case whose fault is in a release (``fault_releases``), saying so as it strikes:
    the new version's, or (``old_side``) every version's, the gateway's first one too,
    so that each upgrade meets it in the old process."""
    release = Release(fault=fault)
    return Case(
        name, kind, what, start=release if old_side else CLEAN, target=release,
        alternate=old_side, mark=fault_releases.mark(fault),
    )  # fmt: skip


CASES: tuple[Case, ...] = (
    Case("steady", "baseline", "no upgrade", target=None),
    Case("clean-upgrade", "baseline", "upgrades with no fault", alternate=True),
    Case(
        "kill-old/self-check", "kill-old", "old SIGKILLed while the new one checks itself",
        target=Release(fault="selfcheck-outlives-old"), alternate=True, killer="old-holding",
    ),
    _struck(
        "kill-old/cutover", "kill-old", "old dies as it is asked to cut over",
        "old-dies-at-cutover", old_side=True,
    ),
    _struck(
        "kill-old/after-cutover", "kill-old", "old dies once the final state is sent",
        "old-dies-after-cutover", old_side=True,
    ),
    Case("kill-new/spawn", "kill-new", "new SIGKILLed as it starts", killer="new-at-spawn"),
    _struck(
        "kill-new/descriptors", "kill-new", "new dies once the descriptors arrived",
        "dies-receiving-descriptors",
    ),
    _struck("kill-new/self-check", "kill-new", "new dies in its self-check", "dies-in-selfcheck"),
    Case("hang-new/spawn", "hang-new", "new hangs as it starts", target=Release(broken="hang")),
    _struck(
        "hang-new/descriptors", "hang-new", "new hangs once the descriptors arrived",
        "hangs-receiving-descriptors",
    ),
    Case(
        "hang-new/self-check", "hang-new", "new hangs in its self-check",
        target=Release(broken="stuck-in-selfcheck"),
    ),
    _struck("hang-new/cutover", "hang-new", "new says ready, then hangs", "hangs-at-cutover"),
)  # fmt: skip


class Killer:
    """A thread that SIGKILLs one of the gateway's processes at a handoff step, within
    ``timeout`` s; ``killed`` holds the pid it killed."""

    def __init__(self, gateway: TunnelGateway, how: str, timeout: float) -> None:
        self.gateway = gateway
        self.old = gateway.serving_pid()
        self.killed: list[int] = []
        self._probe: Callable[[], bool] = {
            "old-holding": self._old_once_the_new_one_holds_the_sockets,
            "new-at-spawn": self._new_as_it_starts,
        }[how]
        self._timeout = timeout
        self._thread = threading.Thread(target=self._go, name=f"kill-{how}", daemon=True)

    def start(self) -> Killer:
        self._thread.start()
        return self

    def join(self) -> None:
        self._thread.join(self._timeout + 5)

    def _go(self) -> None:
        # Past the deadline nothing is killed, and the run says the fault did not strike.
        with contextlib.suppress(AssertionError):
            wait_for(self._probe, timeout=self._timeout, what="the step", interval=0.01)

    def _old_once_the_new_one_holds_the_sockets(self) -> bool:
        pid = self.gateway.new_process()
        if pid is None or not holds_socket_of(pid, self.old, self.gateway.sites.udp_gateway[1]):
            return False
        os.kill(self.old, signal.SIGKILL)
        self.killed.append(self.old)
        return True

    def _new_as_it_starts(self) -> bool:
        pid = self.gateway.new_process()
        if pid is None:
            return False
        os.kill(pid, signal.SIGKILL)
        self.killed.append(pid)
        return True


class Bench:
    """One vhost, one artifact service, and a gateway per case."""

    def __init__(
        self, work: Path, amqp: str, runs: int, handoff_timeout: float, rate: float = RATE_PPS
    ) -> None:
        self.work = work
        self.amqp = amqp
        self.runs = runs
        self.rate = rate
        self.handoff_timeout = handoff_timeout
        self.upgrades = GatewayUpgrades(amqp, work / "store")
        self.tool_nice = 0
        # What the gateway's shared UDP sockets got (SO_RCVBUF, rmem_max), as it logs them.
        self.udp_buffers: dict[str, Any] = {}

    def close(self) -> None:
        self.upgrades.close()

    def case(self, index: int, case: Case, steady_s: float) -> list[dict[str, Any]]:
        """Play ``case`` ``runs`` times on a gateway of its own; each run's numbers."""
        root = self.work / f"case-{index}"
        root.mkdir()
        start = case.start.build(f"1.{index}.0", root / "start.pyz")
        targets: list[tuple[str, Path]] = []
        if case.target is not None:
            count = 2 if case.alternate else 1
            targets = [
                (v, case.target.build(v, root / f"{v}.pyz"))
                for v in [f"2.{index}.{i}" for i in range(count)]
            ]
        procs = Procs(root)
        try:
            gateway = start_gateway(
                procs, root, amqp_url=self.amqp, upgrades=self.upgrades,
                udp_tunnels=UDP_TUNNELS, tcp_tunnels=TCP_TUNNELS, release=start,
                handoff_timeout=self.handoff_timeout,
            )  # fmt: skip
            logged = gateway.events("tunnels_udp_buffers")
            if logged:
                self.udp_buffers = {k: logged[-1].get(k) for k in ("rcvbuf", "rmem_max")}
            sites_file = root / "sites.json"
            sites_file.write_text(json.dumps(gateway.sites.to_dict()))
            results = []
            running = f"1.{index}.0"
            for i in range(self.runs):
                if not gateway.proc.group_alive():
                    results.append({"traffic_error": "no process of the gateway is left"})
                    continue
                # Never the version it runs: that command succeeds with no handoff at all.
                target = next((t for t in targets if t[0] != running), None)
                try:
                    result = self.run(case, gateway, sites_file, target, steady_s)
                except AssertionError as exc:
                    result = {"traffic_error": str(exc)[:800]}
                if target is not None and result.get("state") == "SUCCEEDED":
                    running = target[0]
                results.append(result)
                print(f"  {case.name} run {i + 1}/{self.runs}: {_brief(result)}", flush=True)
            return results
        finally:
            procs.stop_all()

    def run(
        self,
        case: Case,
        gateway: TunnelGateway,
        sites_file: Path,
        target: tuple[str, Path] | None,
        steady_s: float,
    ) -> dict[str, Any]:
        old = gateway.serving_pid()
        serving = len(gateway.events("gateway_serving"))
        marks = gateway.proc.log().count(case.mark) if case.mark else 0
        errors = sites_file.with_name("traffic.err")
        tool = self.traffic(gateway, sites_file, errors)
        try:
            result = self._measure(case, gateway, tool, target, steady_s, old, serving, marks)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"the traffic tool's report is not JSON: {exc}") from exc
        finally:
            if tool.poll() is None:
                tool.kill()
                tool.wait(10)
        if "traffic_error" in result:
            result["traffic_error"] += f": {errors.read_text(errors='replace')[-800:]}"
        return result

    def _measure(
        self,
        case: Case,
        gateway: TunnelGateway,
        tool: subprocess.Popen[str],
        target: tuple[str, Path] | None,
        steady_s: float,
        old: int,
        serving: int,
        marks: int,
    ) -> dict[str, Any]:
        """One run, the traffic flowing: the upgrade (and the fault), then the counts."""
        ports = (gateway.sites.udp_gateway[1], gateway.sites.plain_gateway[1])
        gateway_drops = drops.on_ports(ports)
        began = time.monotonic()
        killer = None
        if case.killer:
            killer = Killer(gateway, case.killer, timeout=self.handoff_timeout + 30).start()
        state, error = "", ""
        if target is None:
            _keep_going(tool, began + steady_s)
        else:
            version, artifact = target
            try:
                report = self.upgrades.upgrade(
                    GATEWAY_ID, version, artifact, timeout=self.handoff_timeout + 40
                )
                state, error = state_name(report), report.error
            except AssertionError as exc:  # no final report: the job sits where it is
                state, error = "NO FINAL REPORT", str(exc)
        took = time.monotonic() - began
        if killer is not None:
            killer.join()
        settled = _settle(gateway, state, serving)
        _keep_going(tool, time.monotonic() + TAIL_S)
        tool.send_signal(signal.SIGINT)
        out, _ = tool.communicate(timeout=60)
        injected = _injected(case, killer, gateway, marks, error)
        if not out:  # exit 1 with a report: it saw problems, which the report counts
            return {
                "state": state or "-", "error": error, "injected": injected,
                "traffic_error": f"the traffic tool exited with {tool.returncode}, no report",
            }  # fmt: skip
        traffic: dict[str, Any] = json.loads(out)
        udp, tcp = traffic["udp"], traffic["tcp"]
        now = gateway.serving_pid()
        gateway_dropped = drops.on_ports(ports) - gateway_drops
        result: dict[str, Any] = {
            "state": state or "-",
            "error": error,
            "injected": injected,
            "took_s": round(took, 2),
            "settled": settled,
            "sent": udp["sent"],
            "lost": udp["lost"],
            "duplicated": udp["duplicated"],
            "rejected": udp["rejected"],
            "tcp_resets": tcp["resets"],
            "tcp_byte_exact": tcp["byte_exact"],
            "gateway_rcvbuf_drops": gateway_dropped,
            "tool_rcvbuf_drops": udp.get("rcvbuf_drops", 0),
            "max_gap_ms": round(udp["max_gap_ms"], 1),
            "serves": _who(now, old, gateway),
            "probe": _probe(gateway),
        }
        if case.kind == "kill-old":
            result["in_flight_udp"] = max(
                0, udp["lost"] - gateway_dropped - result["tool_rcvbuf_drops"]
            )
            result["in_flight_tcp"] = tcp["resets"]
        result["meets_target"] = _meets(case, result)
        return result

    def traffic(
        self, gateway: TunnelGateway, sites_file: Path, errors: Path
    ) -> subprocess.Popen[str]:
        """Start the traffic tool (until SIGINT), its stderr to ``errors``; returns once
        every site's tunnel is up."""
        up_before = _tunnels_up(gateway)
        argv = [
            command("gateway-daemon"), "traffic", "--sites", str(sites_file),
            "--rate", str(self.rate), "--duration", "3600", "--tcp-rate", str(TCP_RATE),
            "--drain", "3", "--json",
        ]  # fmt: skip
        with errors.open("w") as err:
            tool = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True)
        self.tool_nice = _raise_priority(tool.pid)
        try:
            wait_for(
                lambda: _tunnels_up(gateway) >= up_before + UDP_TUNNELS + TCP_TUNNELS,
                timeout=30,
                what="the traffic tool's sites to handshake",
            )
        except AssertionError:
            tool.kill()
            tool.wait(10)
            raise
        return tool


def _tunnels_up(gateway: TunnelGateway) -> int:
    return len(gateway.events("udp_tunnel_up")) + len(gateway.events("tcp_tunnel_up"))


def _keep_going(tool: subprocess.Popen[str], until: float) -> None:
    """Let the traffic run until ``until`` (time.monotonic): the length of a
    measurement, not a synchronisation; returns early if the tool died."""
    wait_for(
        lambda: time.monotonic() >= until or tool.poll() is not None,
        timeout=max(0.0, until - time.monotonic()) + 5,
        what="the traffic to run its time",
        interval=0.05,
    )


def _settle(gateway: TunnelGateway, state: str, serving: int) -> bool:
    """Wait (bounded) until the handoff is over: the new process serves after a success,
    no new process is left after a failure. Whether it came to that."""
    try:
        if state == "SUCCEEDED":
            gateway.wait_serving(count=serving + 1, timeout=20)
        else:
            wait_for(lambda: gateway.new_process() is None, timeout=20, what="no new process")
    except AssertionError:
        return False
    return True


def _who(now: int, old: int, gateway: TunnelGateway) -> str:
    """Which process serves: "old", "new", or "none" (the last to say so is gone)."""
    if now not in group_members(gateway.proc.pgid):
        return "none"
    return "old" if now == old else "new"


def _probe(gateway: TunnelGateway) -> str:
    """Whether the gateway serves: "ok" when a new UDP and a new TCP tunnel exchange go
    through, else what failed."""
    try:
        udp_round_trip(gateway.sites, b"after the fault")
        tcp_round_trip(gateway.sites, b"a new tunnel connection after the fault")
    except (AssertionError, OSError) as exc:
        return f"failed: {exc or type(exc).__name__}"
    return "ok"


def _injected(
    case: Case, killer: Killer | None, gateway: TunnelGateway, marks: int, error: str
) -> bool:
    """Whether the case's fault struck in this run."""
    if case.kind == "baseline":
        return True
    if killer is not None:
        return bool(killer.killed)
    if case.mark:
        return gateway.proc.log().count(case.mark) > marks
    return TIMED_OUT_READY in error  # the releases that hang without a word


def _meets(case: Case, r: dict[str, Any]) -> bool:
    """Issue 11's target for this kind of case."""
    clean = r["duplicated"] == 0 and r["rejected"] == 0 and r["probe"] == "ok"
    if case.kind == "kill-old":
        # Lost only what the dead process held: no receive buffer overflowed.
        lost_beyond = r["lost"] - r["in_flight_udp"]
        return bool(
            clean and lost_beyond == 0 and r["state"] == "SUCCEEDED" and r["serves"] == "new"
        )
    whole = clean and r["lost"] == 0 and r["tcp_resets"] == 0 and r["tcp_byte_exact"]
    if case.kind == "baseline":
        return bool(whole and (case.target is None or r["state"] == "SUCCEEDED"))
    return bool(whole and r["state"] == "ROLLED_BACK" and r["serves"] == "old")


def _brief(r: dict[str, Any]) -> str:
    if "sent" not in r:
        return f"{r.get('state', '-')}, NOT MEASURED: {r['traffic_error']}"
    text = (
        f"{r['state']}, lost {r['lost']}, dup {r['duplicated']}, resets {r['tcp_resets']}, "
        f"serves {r['serves']} (probe {r['probe']})"
    )
    if not r["injected"]:
        text += ", FAULT DID NOT STRIKE"
    return text
