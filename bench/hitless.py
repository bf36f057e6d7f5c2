"""``make bench-hitless``: what a hitless upgrade costs a gateway carrying tunnels.

One gateway process (started from a built release) serves 50 UDP and 10 TCP tunnels; the
traffic tool (``gateway-daemon traffic``, a process of its own) plays the sites. Three
runs, in this order, on the same machine:

1. saturation: the traffic tool offers far more than the gateway can forward for a few
   seconds; what arrives per second is the saturation rate (of the gateway, or of the
   tool if it saturates first: the gateway's CPU share says which);
2. upgrades: 20,000 packets/s in total plus the TCP streams, and 20 upgrades back to back
   (releases A and B alternately) through the gateway's real agent and handoff, each to a
   new ``gateway-daemon run --handoff-fd`` process of the release artifact;
3. steady state: the same traffic for as long as the upgrades took, with no upgrade.

The releases come from the product's artifact service over mutual TLS, as from the
controller's gateway port (``tests.support.gateway_upgrades``: the gateway is given its
certificate before it starts). Needs RabbitMQ with its management API on 127.0.0.1 (a
vhost of its own, removed at the end). Prints one table and writes
bench/results/hitless.json. Not a test: timing never decides pass or fail; the targets are
printed beside what was measured.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway_daemon.tunnels import drops  # noqa: E402
from tests.support import releases  # noqa: E402
from tests.support.gateway_upgrades import GatewayUpgrades, state_name  # noqa: E402
from tests.support.procs import Procs, command  # noqa: E402
from tests.support.rabbit import Management, amqp_url  # noqa: E402
from tests.support.tunnel_gateway import GATEWAY_ID, TunnelGateway, write_lab  # noqa: E402
from tests.support.wait import wait_for  # noqa: E402

UDP_TUNNELS = 50
TCP_TUNNELS = 10
OFFERED_PPS = 20_000
TCP_RATE = 100_000  # bytes/s per TCP tunnel and direction
UPGRADES = 20
SATURATION_OFFER_PPS = 200_000
SATURATION_S = 3.0
RESULTS = ROOT / "bench" / "results" / "hitless.json"
TOOL_NICE = -5


def rcvbuf_errors() -> int:
    """Udp RcvbufErrors of the whole machine (/proc/net/snmp)."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()]
    names, values = [row for row in lines if row[0] == "Udp:"][:2]
    return int(values[names.index("RcvbufErrors")])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Bench:
    def __init__(self, work: Path, amqp: str) -> None:
        self.work = work
        self.procs = Procs(work)
        self.upgrades = GatewayUpgrades(amqp, work / "store")
        self.tunnels, sites = write_lab(work, UDP_TUNNELS, TCP_TUNNELS)
        self.sites_file = work / "sites.json"
        self.sites_file.write_text(json.dumps(sites.to_dict()))
        self.a = releases.build("1.1.0", work / "a.pyz")
        self.b = releases.build("1.2.0", work / "b.pyz")
        argv = [
            sys.executable, str(self.a), "gateway-daemon", "run",
            "--id", GATEWAY_ID,
            "--amqp", amqp,
            "--state-dir", str(work / "state"),
            "--tunnels", str(self.tunnels),
            *self.upgrades.provision(GATEWAY_ID, work / "state"),
        ]  # fmt: skip
        self.gateway = TunnelGateway(self.procs.start(GATEWAY_ID, argv), sites)
        self.gateway.wait_serving()
        self.gateway_ports = (sites.udp_gateway[1], sites.plain_gateway[1])
        self._runs = 0
        self.tool_nice = 0

    def close(self) -> None:
        self.procs.stop_all()
        self.upgrades.close()

    def traffic(
        self, rate: float, duration: float, tcp_rate: float, *, paced: bool = True
    ) -> subprocess.Popen[str]:
        """Start the traffic tool; returns once every site has its tunnel up. A paced
        tool (keeping a rate, not flooding) runs at raised priority."""
        self._runs += 1
        up_before = self._tunnels_up()
        argv = [
            command("gateway-daemon"), "traffic", "--sites", str(self.sites_file),
            "--rate", str(rate), "--duration", str(duration), "--tcp-rate", str(tcp_rate),
            "--drain", "3", "--json",
        ]  # fmt: skip
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        if paced:
            self.tool_nice = _raise_priority(proc.pid)
        wait_for(
            lambda: self._tunnels_up() >= up_before + UDP_TUNNELS + TCP_TUNNELS,
            timeout=30,
            what="the traffic tool's sites to handshake",
            interval=0.05,
        )
        return proc

    def _tunnels_up(self) -> int:
        return len(self.gateway.events("udp_tunnel_up")) + len(self.gateway.events("tcp_tunnel_up"))

    def saturation(self) -> tuple[float, float]:
        """(packets/s that arrived, the gateway's CPU share while offered far too much)."""
        # At normal priority: flooding, the tool must not take the gateway's CPU.
        proc = self.traffic(SATURATION_OFFER_PPS, SATURATION_S, 0, paced=False)
        pid = self.gateway.serving_pid()
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        out, _ = proc.communicate(timeout=60)
        cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
        report = json.loads(out)
        return report["udp"]["received"] / report["duration_s"], cpu

    def upgrade_run(self) -> tuple[dict[str, Any], float, list[dict[str, Any]]]:
        before = rcvbuf_errors()
        gateway_before = drops.on_ports(self.gateway_ports)
        handoffs_before = len(self.gateway.events("handoff_done"))
        proc = self.traffic(OFFERED_PPS, 3600, TCP_RATE)
        started = time.monotonic()
        for i in range(UPGRADES):
            version, artifact = ("1.2.0", self.b) if i % 2 == 0 else ("1.1.0", self.a)
            report = self.upgrades.upgrade(GATEWAY_ID, version, artifact, timeout=60)
            if state_name(report) != "SUCCEEDED":
                proc.kill()
                raise SystemExit(
                    f"upgrade {i + 1} to {version}: {state_name(report)}: {report.error}"
                )
            print(f"  upgrade {i + 1:2}/{UPGRADES} to {version}: SUCCEEDED", flush=True)
        took = time.monotonic() - started
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        result = json.loads(out)
        result["rcvbuf_errors"] = rcvbuf_errors() - before
        result["gateway_rcvbuf_drops"] = drops.on_ports(self.gateway_ports) - gateway_before
        wait_for(
            lambda: len(self.gateway.events("tunnels_cutover")) >= UPGRADES,
            timeout=5,
            what="every new process to log its cutover pause",
        )
        return result, took, self.gateway.events("handoff_done")[handoffs_before:]

    def steady_run(self, duration: float) -> dict[str, Any]:
        before = rcvbuf_errors()
        gateway_before = drops.on_ports(self.gateway_ports)
        proc = self.traffic(OFFERED_PPS, duration, TCP_RATE)
        pid = self.gateway.serving_pid()
        tool0, gw0, t0 = cpu_seconds(proc.pid), cpu_seconds(pid), time.monotonic()
        # Both CPU shares before the tool's drain (it exits after reporting).
        wait_for(
            lambda: time.monotonic() - t0 >= duration * 0.9 or proc.poll() is not None,
            timeout=duration + 60,
            what="most of the steady run",
            interval=0.2,
        )
        elapsed = time.monotonic() - t0
        tool_cpu = (cpu_seconds(proc.pid) - tool0) / elapsed if proc.poll() is None else None
        gateway_cpu = (cpu_seconds(pid) - gw0) / elapsed
        out, _ = proc.communicate(timeout=duration + 60)
        result: dict[str, Any] = json.loads(out)
        result["tool_cpu"] = None if tool_cpu is None else round(tool_cpu, 2)
        result["gateway_cpu"] = round(gateway_cpu, 2)
        result["rcvbuf_errors"] = rcvbuf_errors() - before
        result["gateway_rcvbuf_drops"] = drops.on_ports(self.gateway_ports) - gateway_before
        return result

    def udp_buffers(self) -> dict[str, Any]:
        """What the gateway's shared UDP sockets really got (it logs getsockopt)."""
        events = self.gateway.events("tunnels_udp_buffers")
        return {k: events[-1][k] for k in ("rcvbuf", "rmem_max")} if events else {}


def _from_nearest(when: float, cutovers: list[float]) -> float | None:
    if not when or not cutovers:
        return None
    nearest = min(cutovers, key=lambda at: abs(when - at))
    return round((when - nearest) * 1000, 1)


def _raise_priority(pid: int) -> int:
    """Give the traffic tool (one thread) ``TOOL_NICE`` when allowed; return its nice.

    The tool plays remote sites, whose CPU is not the gateway's. Sharing this machine's
    two cores with the gateway, the broker and a starting release, it would otherwise
    stall now and then (its own send stall is in the table), and what it does not send
    shows as gaps and cutover pauses the gateway did not cause. The gateway's loop runs
    at nice -10, so the tool still never takes CPU from it."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, pid, TOOL_NICE)
    return os.getpriority(os.PRIO_PROCESS, pid)


def summarize(
    saturation: float, gateway_cpu: float, upgraded: dict[str, Any], took: float,
    handoffs: list[dict[str, Any]], cutovers: list[dict[str, Any]], steady: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    pauses = [float(str(e["pause_ms"])) for e in cutovers]
    u, t, s = upgraded["udp"], upgraded["tcp"], steady["udp"]

    def phase(key: str) -> dict[str, float]:
        values = [float(h[key]) for h in handoffs]
        return {"p50": round(statistics.median(values), 2), "max": round(max(values), 2)}

    return {
        "offered_pps": OFFERED_PPS,
        "saturation_pps": round(saturation),
        "saturation_gateway_cpu": round(gateway_cpu, 2),
        "udp_tunnels": UDP_TUNNELS,
        "tcp_tunnels": TCP_TUNNELS,
        "upgrades": len(handoffs),
        "upgrades_took_s": round(took, 1),
        "sent": u["sent"],
        "received": u["received"],
        "lost": u["lost"],
        "duplicated": u["duplicated"],
        "reordered": u["reordered"],
        "rejected": u["rejected"],
        "tcp_resets": t["resets"],
        "tcp_byte_exact": t["byte_exact"],
        "tcp_bytes": t["bytes_received"],
        "cutover_ms_p50": round(statistics.median(pauses), 3),
        "cutover_ms_max": round(max(pauses), 3),
        "handoff_gap_ms_max": round(u["max_gap_ms"], 2),
        "handoff_gap_ms_p99": round(u["p99_gap_ms"], 2),
        "handoff_tcp_gap_ms_max": round(t["max_gap_ms"], 2),
        "steady_gap_ms_max": round(s["max_gap_ms"], 2),
        "steady_gap_ms_p99": round(s["p99_gap_ms"], 2),
        "tool_send_gap_ms_max": u.get("max_send_gap_ms", 0.0),
        # Where the longest gap of the upgrade run fell: ms from the nearest cutover
        # (negative: it ended before that cutover began).
        "handoff_gap_from_cutover_ms": _from_nearest(
            u.get("max_gap_ended", 0.0), [float(c.get("at", 0.0)) for c in cutovers]
        ),
        # When each run's longest gap ended, on CLOCK_MONOTONIC (time.monotonic, seconds
        # since boot): the time to look up in a trace of the run, e.g. `perf sched record
        # -k CLOCK_MONOTONIC` then `perf sched timehist`.
        "handoff_gap_ended_monotonic_s": u.get("max_gap_ended", 0.0),
        "steady_gap_ended_monotonic_s": s.get("max_gap_ended", 0.0),
        "steady_tool_send_gap_ms_max": s.get("max_send_gap_ms", 0.0),
        # CPU shares (of one core) during the steady run: is the instrument saturated?
        "steady_tool_cpu": steady.get("tool_cpu"),
        "steady_gateway_cpu": steady.get("gateway_cpu"),
        "steady_tcp_gap_ms_max": round(steady["tcp"]["max_gap_ms"], 2),
        "steady_lost": s["lost"],
        "rcvbuf_errors": upgraded["rcvbuf_errors"],
        "gateway_rcvbuf_drops": upgraded["gateway_rcvbuf_drops"],
        "tool_rcvbuf_drops": u.get("rcvbuf_drops", 0),
        "steady_rcvbuf_errors": steady["rcvbuf_errors"],
        "steady_gateway_rcvbuf_drops": steady["gateway_rcvbuf_drops"],
        "steady_tool_rcvbuf_drops": s.get("rcvbuf_drops", 0),
        "phases_ms": {
            "spawn_to_ready": phase("spawn_to_ready_ms"),
            "descriptor_transfer": phase("descriptors_ms"),
            "state_transfer": phase("state_ms"),
            "control_cutover": phase("cutover_ms"),
        },
        "cutover_breakdown_us": breakdown(handoffs, cutovers),
        # Each upgrade's pause and its steps (old and new process), for a closer look.
        "cutovers": [
            {
                "pause_ms": pause,
                "spawn_to_ready_ms": round(float(h["spawn_to_ready_ms"]), 1),
                **{f"old {k}": v for k, v in h.get("cutover_marks_us", {}).items()},
                **{f"new {k}": v for k, v in c.get("marks_us", {}).items()},
            }
            for pause, h, c in zip(pauses, handoffs, cutovers, strict=False)
        ],
        "descriptors": handoffs[0]["descriptors"] if handoffs else 0,
        "final_state_bytes": handoffs[0]["final_state_bytes"] if handoffs else 0,
    }


def breakdown(
    handoffs: list[dict[str, Any]], cutovers: list[dict[str, Any]]
) -> dict[str, dict[str, float]]:
    """Each cutover step's p50 and max, in microseconds from the old process's last
    forward: the old process's marks (``handoff_done``) and the new one's
    (``tunnels_cutover``)."""
    steps: dict[str, list[float]] = {}
    for event, key, prefix in [(h, "cutover_marks_us", "old ") for h in handoffs] + [
        (c, "marks_us", "new ") for c in cutovers
    ]:
        for name, value in (event.get(key) or {}).items():
            steps.setdefault(prefix + name, []).append(float(value))
    return {
        name: {"p50": round(statistics.median(v), 1), "max": round(max(v), 1)}
        for name, v in sorted(steps.items(), key=lambda kv: statistics.median(kv[1]))
    }


def table(r: dict[str, Any]) -> str:
    p = r["phases_ms"]
    rows = [
        (
            "offered / saturation pps",
            f"{r['offered_pps']} / {r['saturation_pps']} "
            f"(gateway CPU {r['saturation_gateway_cpu']:.0%} of a core)",
            "",
        ),
        ("upgrades (took)", f"{r['upgrades']} ({r['upgrades_took_s']} s)", ""),
        ("udp sent / received", f"{r['sent']} / {r['received']}", ""),
        ("lost / duplicated", f"{r['lost']} / {r['duplicated']}", "0 / 0"),
        ("tcp resets (byte-exact)", f"{r['tcp_resets']} ({r['tcp_byte_exact']})", "0"),
        (
            "rcvbuf drops: host / gateway / tool",
            f"{r['rcvbuf_errors']} / {r['gateway_rcvbuf_drops']} / {r['tool_rcvbuf_drops']}",
            "0",
        ),
        (
            "steady rcvbuf: host / gateway / tool",
            f"{r['steady_rcvbuf_errors']} / "
            f"{r['steady_gateway_rcvbuf_drops']} / {r['steady_tool_rcvbuf_drops']}",
            "",
        ),
        (
            "gateway SO_RCVBUF (rmem_max)",
            f"{r['udp_buffers'].get('rcvbuf')} ({r['udp_buffers'].get('rmem_max')})",
            "",
        ),
        ("load average start / end", f"{r['load_start']} / {r['load_end']}", ""),
        ("traffic tool's nice", str(r["tool_nice"]), ""),
        (
            "cutover pause p50 / max ms",
            f"{r['cutover_ms_p50']} / {r['cutover_ms_max']}",
            "<= 1 / <= 5",
        ),
        (
            "max gap: upgrades / steady ms",
            f"{r['handoff_gap_ms_max']} / {r['steady_gap_ms_max']}",
            "<= 2x steady",
        ),
        ("longest gap ended, from nearest cutover ms", str(r["handoff_gap_from_cutover_ms"]), ""),
        (
            "p99 gap: upgrades / steady ms",
            f"{r['handoff_gap_ms_p99']} / {r['steady_gap_ms_p99']}",
            "",
        ),
        (
            "steady CPU of a core: tool / gateway",
            f"{r['steady_tool_cpu']} / {r['steady_gateway_cpu']}",
            "",
        ),
        (
            "tool's own send stall: upgrades / steady ms",
            f"{r['tool_send_gap_ms_max']} / {r['steady_tool_send_gap_ms_max']}",
            "",
        ),
        (
            "spawn->ready p50 / max ms",
            f"{p['spawn_to_ready']['p50']} / {p['spawn_to_ready']['max']}",
            "",
        ),
        (
            "descriptors p50 / max ms",
            f"{p['descriptor_transfer']['p50']} / {p['descriptor_transfer']['max']} "
            f"({r['descriptors']} fds)",
            "",
        ),
        (
            "snapshot p50 / max ms",
            f"{p['state_transfer']['p50']} / {p['state_transfer']['max']}",
            "",
        ),
        (
            "pause->started p50 / max ms",
            f"{p['control_cutover']['p50']} / {p['control_cutover']['max']} "
            f"(final state {r['final_state_bytes']} B)",
            "",
        ),
    ]
    rows += [
        (f"  {name} us p50 / max", f"{v['p50']} / {v['max']}", "")
        for name, v in r["cutover_breakdown_us"].items()
    ]
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{'':{width}}  {'measured':40}  target"]
    lines += [f"{name:{width}}  {value:40}  {target}" for name, value, target in rows]
    return "\n".join(lines)


def _load() -> str:
    """The 1, 5 and 15 minute load averages: the machine is shared with other runs."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    mgmt = Management()
    if not mgmt.available():
        print(
            "bench-hitless: needs RabbitMQ with the management API on 127.0.0.1:15672",
            file=sys.stderr,
        )
        return 2
    load_start = _load()
    vhost = f"hitless-bench-{uuid.uuid4().hex[:8]}"
    mgmt.create_vhost(vhost)
    try:
        with tempfile.TemporaryDirectory(prefix="hitless-bench-") as tmp:
            bench = Bench(Path(tmp), amqp_url(vhost))
            try:
                print("saturation ...", flush=True)
                saturation, cpu = bench.saturation()
                print(
                    f"  saturation: {saturation:.0f} packets/s arrived "
                    f"(gateway CPU {cpu:.0%} of a core)",
                    flush=True,
                )
                print(f"{UPGRADES} upgrades at {OFFERED_PPS} packets/s ...", flush=True)
                upgraded, took, handoffs = bench.upgrade_run()
                cutovers = bench.gateway.events("tunnels_cutover")
                print(f"steady state for {took:.1f} s ...", flush=True)
                steady = bench.steady_run(took)
                buffers = bench.udp_buffers()
                tool_nice = bench.tool_nice
            finally:
                bench.close()
    finally:
        mgmt.delete_vhost(vhost)
    result = summarize(saturation, cpu, upgraded, took, handoffs, cutovers, steady)
    result.update(udp_buffers=buffers, load_start=load_start, load_end=_load(), tool_nice=tool_nice)
    print(table(result))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
