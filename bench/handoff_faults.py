"""``make bench-handoff-faults``: what a process dying or hanging in the middle of a
handoff costs the traffic through a gateway.

A real gateway process (from a built release) serves 6 UDP and 2 TCP tunnels; the
traffic tool (``gateway-daemon traffic``, a process of its own) plays the sites at 20,000
packets/s in all (``--rate``; bench-hitless's load) plus a TCP stream each way per
tunnel. Under that traffic each fault below is played ``--runs`` times (default 5), each
run an upgrade through the gateway's real agent and handoff, with a fresh traffic run of
its own:

- kill-old: the old process is SIGKILLed while the new one holds the sockets and checks
  itself (the bench kills it), as it is asked to cut over (still forwarding), or right
  after it has paused and sent the final state (the old version's release kills itself
  there: ``tests.support.fault_releases``). The new one must serve alone;
- kill-new: the new process is SIGKILLed as it starts (the bench kills it), once the
  descriptors have arrived, or in its self-check (its release kills itself there);
- hang-new: the new version hangs as it starts, once the descriptors have arrived, in its
  self-check, or after it said ready (it never takes the final state).

Beside them, the baseline, measured the same way in the same invocation: upgrades with
no fault, and steady runs with no upgrade (each as long as a clean upgrade run took).
Each case gets a gateway of its own. The hangs cost the gateway's ready deadline
(``--handoff-timeout``, default 20 s), or after READY its 5 s wait for STARTED.

Per fault it prints lost, duplicated and rejected datagrams, TCP tunnel connections reset,
receive-buffer drops (the gateway's shared sockets, and the tool's own), the job's state
and who serves afterwards (checked with a fresh UDP and TCP tunnel exchange). For the
kill-old faults, "in flight" is what the dead process took with it: the datagrams lost
that no receive buffer dropped (the shared sockets outlive it, so only what it had read
and not yet sent is gone), and the TCP connections reset (bytes were in its buffers).

Targets (issue 11): 0 lost, 0 duplicated, 0 reset in the kill-new and hang cases, the old
process serving on; in the kill-old cases only what was in flight in the dead process,
the new one serving. Needs RabbitMQ with its management API on 127.0.0.1 (a vhost of its
own, removed at the end). Prints one table and writes bench/results/handoff_faults.json.
Not a test: no number decides pass or fail (the "met" column only says which targets
were met). It exits 0 once every case was played, 2 without a broker, 3 when a fault did
not strike in some run (that run measured no fault).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.hitless import _load  # noqa: E402
from bench.support.fault_cases import (  # noqa: E402
    CASES,
    HANDOFF_TIMEOUT_S,
    RATE_PPS,
    TCP_RATE,
    TCP_TUNNELS,
    UDP_TUNNELS,
    Bench,
    Case,
)
from tests.support.rabbit import Management, amqp_url  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "handoff_faults.json"

EXIT_NO_BROKER = 2
EXIT_NOT_INJECTED = 3


def summarize(case: Case, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over a case's runs, beside each run's numbers."""
    played = [r for r in runs if "sent" in r]

    def total(key: str) -> int:
        return sum(int(r.get(key, 0)) for r in played)

    gaps = [float(r["max_gap_ms"]) for r in played]
    states: dict[str, int] = {}
    for r in runs:
        state = r.get("state", "NOT MEASURED")
        states[state] = states.get(state, 0) + 1
    out: dict[str, Any] = {
        "case": case.name,
        "kind": case.kind,
        "fault": case.what,
        "expected_state": case.expected if case.target is not None else "-",
        "runs": len(runs),
        "played": len(played),
        "injected": sum(1 for r in played if r["injected"]),
        "states": states,
        "sent": total("sent"),
        "lost": total("lost"),
        "duplicated": total("duplicated"),
        "rejected": total("rejected"),
        "tcp_resets": total("tcp_resets"),
        "gateway_rcvbuf_drops": total("gateway_rcvbuf_drops"),
        "tool_rcvbuf_drops": total("tool_rcvbuf_drops"),
        "max_gap_ms_p50": round(statistics.median(gaps), 1) if gaps else None,
        "max_gap_ms_max": max(gaps) if gaps else None,
        "serves": sorted({str(r["serves"]) for r in played}),
        "probes_ok": sum(1 for r in played if r["probe"] == "ok"),
        "meets_target": len(played) == len(runs) and all(r["meets_target"] for r in played),
        "per_run": runs,
    }
    if case.kind == "kill-old":
        out["in_flight_udp"] = total("in_flight_udp")
        out["in_flight_tcp"] = total("in_flight_tcp")
    return out


TARGETS = {
    "baseline": "0 / 0 / 0",
    "kill-old": "in flight only; 0 dup",
    "kill-new": "0 / 0 / 0, old serves",
    "hang-new": "0 / 0 / 0, old serves",
}


def table(cases: list[dict[str, Any]]) -> str:
    header = (
        "case", "jobs", "lost / dup / resets", "in flight udp / tcp", "rcvbuf gw / tool",
        "max gap p50 / max ms", "serves (probe ok)", "target", "met",
    )  # fmt: skip
    rows = [header]
    for c in cases:
        jobs = " ".join(f"{s}x{n}" for s, n in sorted(c["states"].items()))
        if c["injected"] < c["played"]:
            jobs += f" (struck {c['injected']}/{c['played']})"
        rows.append(
            (
                c["case"],
                jobs,
                f"{c['lost']} / {c['duplicated']} / {c['tcp_resets']}",
                f"{c['in_flight_udp']} / {c['in_flight_tcp']}" if "in_flight_udp" in c else "",
                f"{c['gateway_rcvbuf_drops']} / {c['tool_rcvbuf_drops']}",
                f"{c['max_gap_ms_p50']} / {c['max_gap_ms_max']}",
                f"{','.join(c['serves'])} ({c['probes_ok']}/{c['played']})",
                TARGETS[c["kind"]],
                "yes" if c["meets_target"] else "NO",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(f"{v:{w}}" for v, w in zip(row, widths, strict=True)) for row in rows
    )


def reasons(cases: list[dict[str, Any]], width: int = 160) -> str:
    """Each case's distinct job errors (and run errors), shortened: why it rolled back."""
    lines = []
    for c in cases:
        said = [str(r.get(k, "")) for r in c["per_run"] for k in ("error", "traffic_error")]
        seen = dict.fromkeys(said)
        lines += [f"{c['case']}: {e[:width]}" for e in seen if e]
    return "\n".join(lines)


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=5, help="runs per fault (default 5)")
    parser.add_argument(
        "--cases", default="", metavar="NAME,...",
        help="only these cases (default: all): " + ", ".join(c.name for c in CASES),
    )  # fmt: skip
    parser.add_argument(
        "--handoff-timeout", type=float, default=HANDOFF_TIMEOUT_S, metavar="S",
        help=f"the gateway's ready deadline, what a hang costs (default {HANDOFF_TIMEOUT_S:g})",
    )  # fmt: skip
    parser.add_argument(
        "--rate", type=float, default=RATE_PPS, metavar="PPS",
        help=f"UDP packets/s offered, all tunnels and both directions (default {RATE_PPS})",
    )  # fmt: skip
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args(argv)
    args.cases = [n for n in args.cases.split(",") if n]
    unknown = sorted(set(args.cases) - {c.name for c in CASES})
    if unknown or args.runs < 1 or args.handoff_timeout <= 0 or args.rate <= 0:
        parser.error(
            f"unknown cases {unknown}" if unknown else "--runs, --handoff-timeout, --rate > 0"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _arguments(argv)
    chosen = [(i, c) for i, c in enumerate(CASES) if not args.cases or c.name in args.cases]
    mgmt = Management()
    if not mgmt.available():
        print(
            "bench-handoff-faults: needs RabbitMQ with the management API on 127.0.0.1:15672",
            file=sys.stderr,
        )
        return EXIT_NO_BROKER
    load_start = _load()
    vhost = f"hitless-bench-faults-{uuid.uuid4().hex[:8]}"
    mgmt.create_vhost(vhost)
    summaries: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="hitless-bench-faults-") as tmp:
            bench = Bench(Path(tmp), amqp_url(vhost), args.runs, args.handoff_timeout, args.rate)
            try:
                # A steady run lasts as long as a clean upgrade run took, when one was timed.
                steady_s = 5.0
                for index, case in sorted(chosen, key=lambda ic: ic[1].name == "steady"):
                    print(f"{case.name}: {case.what} ...", flush=True)
                    runs = bench.case(index, case, steady_s)
                    summaries.append(summarize(case, runs))
                    took = [r["took_s"] for r in runs if "took_s" in r]
                    if case.name == "clean-upgrade" and took:
                        steady_s = statistics.median(took)
                tool_nice, udp_buffers = bench.tool_nice, bench.udp_buffers
            finally:
                bench.close()
    finally:
        mgmt.delete_vhost(vhost)
    summaries.sort(key=lambda s: [c.name for c in CASES].index(s["case"]))
    result = {
        "runs": args.runs,
        "udp_tunnels": UDP_TUNNELS,
        "tcp_tunnels": TCP_TUNNELS,
        "rate_pps": args.rate,
        "tcp_rate": TCP_RATE,
        "handoff_timeout_s": args.handoff_timeout,
        "tool_nice": tool_nice,
        "gateway_udp_buffers": udp_buffers,
        "load_start": load_start,
        "load_end": _load(),
        "cases": summaries,
    }
    print(
        f"{args.rate:g} packets/s through {UDP_TUNNELS} UDP and {TCP_TUNNELS} TCP tunnels, "
        f"{args.runs} runs per case; gateway SO_RCVBUF {udp_buffers.get('rcvbuf')} "
        f"(rmem_max {udp_buffers.get('rmem_max')}); load {load_start} -> {result['load_end']}"
    )
    print(table(summaries))
    print(reasons(summaries))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.results}")
    missed = [s["case"] for s in summaries if s["injected"] < s["played"]]
    if missed:
        print(f"the fault did not strike in every run of: {', '.join(missed)}", file=sys.stderr)
        return EXIT_NOT_INJECTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
