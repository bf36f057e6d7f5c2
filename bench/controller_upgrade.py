"""``make bench-controller-upgrade``: what moving the controller to a new release costs
the people and gateways using it.

One controller (started from release A's artifact) on SQLite, serving TLS with the CA it
makes on its first start; three real ``gateway-daemon run`` processes (hellos,
heartbeats), each enrolled with a one-time code from the controller; and three fake
gateways in a long job that report DOWNLOADING progress at a fixed rate
(``controller_reporters``). A client calls ListGateways and GetJob in a loop with one
WatchJob stream open (``controller_callers``), over TLS with the admin token.
Two runs of the same length, in this order:

1. upgrades: the controller is moved 10 times between releases A (1.1.0) and B (1.2.0),
   both built from this code, each by the UpgradeController RPC; a swap lasts from that
   call until GetController answers from the new process and the old process is gone;
2. steady state: the same load with no upgrade, for the baseline latency.

Then the fake gateways stop, the controller drains its queue, the job is finished, and
the job's events are read again from seq 0: every confirmed report must be there once.

Needs RabbitMQ with its management API on 127.0.0.1 (a vhost of its own, removed at the
end). Prints one table and writes bench/results/controller-upgrade.json. Not a test:
timing never decides pass or fail; exit 0 unless the bench itself broke (1), no broker
(2) or interrupted (130).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before bench/, whose hitless.py would shadow the package

import grpc  # noqa: E402
from controller_callers import Call, Callers  # noqa: E402
from controller_reporters import FakeGateways  # noqa: E402

from gateway_daemon.cli import ENV_ENROLL_CODE  # noqa: E402
from gateway_daemon.vpn.supervisor import is_running  # noqa: E402
from hitless import logs  # noqa: E402
from hitless.config import BusConfig, HostPort  # noqa: E402
from hitless.trust import keys as trust_keys  # noqa: E402
from hitless.trust import release  # noqa: E402
from hitless.v1 import controller_pb2, controller_pb2_grpc  # noqa: E402
from tests.support.fleet import bearer  # noqa: E402
from tests.support.procs import Proc, Procs, command, free_port  # noqa: E402
from tests.support.rabbit import Management, amqp_url  # noqa: E402
from tests.support.wait import wait_for  # noqa: E402
from upgradectl.build import build_release  # noqa: E402
from upgradectl.client import ControllerClient  # noqa: E402
from upgradectl.credentials import Credentials  # noqa: E402
from upgradectl.model import JobEvent  # noqa: E402

UPGRADES = 10
RELEASE_A, RELEASE_B = "1.1.0", "1.2.0"
FLEET_VERSION = "1.0.0"  # what every gateway announces, so a job to A has work to do
REAL_GATEWAYS = ("gw-1", "gw-2", "gw-3")
FAKE_GATEWAYS = ("fake-1", "fake-2", "fake-3")
REPORTS_PER_S = 10.0  # per fake gateway
JOB_DEADLINE_S = 3600
SWAP_STEP_S = 60.0  # deadline of each step of one swap
DRAIN_QUIET_S = 10.0  # no new event for this long after the reporters stopped: done
DRAIN_MAX_S = 60.0
BENCH_DEADLINE_S = 600  # everything, setup and cleanup included
RESULTS = ROOT / "bench" / "results" / "controller-upgrade.json"

EXIT_OK, EXIT_BROKEN, EXIT_NO_BROKER, EXIT_INTERRUPTED = 0, 1, 2, 130


class Interrupted(Exception):
    """SIGTERM, or the bench's own deadline passed."""


@dataclass(frozen=True)
class Swap:
    """One controller upgrade as the bench saw it (monotonic seconds)."""

    version: str
    old_pid: int
    new_pid: int
    start: float  # UpgradeController sent
    ready: float  # ... answered: the new process said READY, the old one hands over
    serving: float  # GetController answered from the new process
    gone: float  # the old process has exited
    spawn_to_ready_ms: float | None  # from the old controller's log


def _log_events(path: Path, names: set[str]) -> list[dict[str, Any]]:
    events = []
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        with contextlib.suppress(json.JSONDecodeError):
            event = json.loads(line)
            if event.get("event") in names:
                events.append(event)
    return events


def _spawn_to_ready_ms(log: Path, new_pid: int) -> float | None:
    """From the old controller's ``controller_upgrade_started`` (the artifact is staged,
    the new process about to start) to its ``controller_handing_over`` (READY read)."""
    started: dict[str, Any] | None = None
    for event in _log_events(log, {"controller_upgrade_started", "controller_handing_over"}):
        if event["event"] == "controller_upgrade_started":
            started = event
        elif event.get("pid") == new_pid and started is not None:
            t0 = datetime.fromisoformat(started["timestamp"])
            t1 = datetime.fromisoformat(event["timestamp"])
            return (t1 - t0).total_seconds() * 1000
    return None


class Bench:
    """Everything the bench starts, stopped in reverse order by ``close`` even on failure."""

    def __init__(self, work: Path, vhost: str, mgmt: Management) -> None:
        self.work = work
        self.vhost = vhost
        self.mgmt = mgmt
        self.amqp = amqp_url(vhost)
        self.target = HostPort("127.0.0.1", free_port())
        self.gateway_listen = HostPort("127.0.0.1", free_port())
        self._stack = contextlib.ExitStack()
        self.procs = Procs(work)
        self._stack.callback(self.procs.stop_all)
        self.keys = trust_keys.init(work / "keys")
        self.credentials: Credentials | None = None
        self._channel: Any = None
        self._stub: Any = None
        self.client: Any = None
        self.controller: Proc | None = None
        self.fakes: FakeGateways | None = None
        self.callers: Callers | None = None
        self.job_id = ""

    def close(self) -> None:
        self._stack.close()

    # Setting up ------------------------------------------------------------------------

    @property
    def ca_cert(self) -> Path:
        """The controller's CA certificate (made on its first start)."""
        return self.work / "controller" / "pki" / "ca.pem"

    def _connect(self) -> None:
        """Once the controller has made its CA and first admin token: a client and a stub
        that call with it, over TLS."""
        path = self.work / "controller" / "admin.token"
        wait_for(
            lambda: path.exists() and bool(path.read_text().strip()),
            timeout=60,
            what="the controller's first admin token",
            interval=0.1,
            describe=self.procs.dump_logs,
        )
        self.credentials = Credentials(path.read_text().strip(), f"the file {path}")
        ca_pem = self.ca_cert.read_bytes()
        self.client = ControllerClient(
            self.target, timeout=30, ca_cert=ca_pem, credentials=self.credentials
        )
        self._stack.callback(self.client.close)
        self._channel = grpc.secure_channel(str(self.target), grpc.ssl_channel_credentials(ca_pem))
        self._stack.callback(self._channel.close)
        self._stub = controller_pb2_grpc.ControllerStub(
            grpc.intercept_channel(self._channel, bearer(self.credentials.secret))
        )

    def setup(self) -> None:
        artifacts = {v: self.work / f"hitless-{v}.pyz" for v in (RELEASE_A, RELEASE_B)}
        for version, path in artifacts.items():
            build_release(version, path)
        self.controller = self.procs.start(
            "controller",
            [
                sys.executable, str(artifacts[RELEASE_A]), "controller-svc", "serve",
                "--listen", str(self.target),
                "--gateway-listen", str(self.gateway_listen),
                "--data-dir", str(self.work / "controller"),
                "--amqp", self.amqp,
                "--trust-root", str(self.keys.root_json),
            ],
        )  # fmt: skip
        self._connect()
        wait_for(
            self._controller_pid,
            timeout=60,
            what="the controller to answer",
            interval=0.1,
            describe=self.procs.dump_logs,
        )
        for version, path in artifacts.items():
            targets = release.sign_targets(
                self.client.get_targets_metadata() or None,
                self.keys.dir,
                add={release.target_name(version): path},
            )
            self.client.publish_release(
                version, path, f"bench release {version}", targets_metadata=targets
            )
        for gid in REAL_GATEWAYS:
            # The code in the environment, not on the command line where ps shows it.
            code = self.client.create_enrollment(gid).code
            self.procs.start(
                gid,
                [
                    command("gateway-daemon"), "run",
                    "--id", gid,
                    "--controller", str(self.target),
                    "--amqp", self.amqp,
                    "--state-dir", str(self.work / gid),
                    "--listen", f"127.0.0.1:{free_port()}",
                    "--ca-cert", str(self.ca_cert),
                ],
                env={ENV_ENROLL_CODE: code},
            )  # fmt: skip
        self.fakes = FakeGateways(BusConfig(self.amqp), FAKE_GATEWAYS, FLEET_VERSION, REPORTS_PER_S)
        self._stack.callback(self.fakes.close)
        self.fakes.open(timeout=30)
        self.fakes.hello()
        everyone = {*REAL_GATEWAYS, *FAKE_GATEWAYS}
        wait_for(
            lambda: everyone <= {g.id for g in self.client.list_gateways()},
            timeout=60,
            what=f"gateways {sorted(everyone)} to say hello",
            interval=0.2,
            describe=self.procs.dump_logs,
        )
        # The controller runs A already, so the job goes straight to the fake gateways.
        job = self.client.start_upgrade(
            version=RELEASE_A,
            gateway_ids=FAKE_GATEWAYS,
            request_id=f"bench-{uuid.uuid4()}",
            deadline_seconds=JOB_DEADLINE_S,
        )
        self.job_id = job.job_id
        self.fakes.take_commands(self.mgmt, self.vhost, self.job_id, timeout=30)

    def start_load(self) -> Callers:
        assert self.fakes is not None
        self.fakes.start()
        assert self.credentials is not None
        callers = Callers(
            self.target, self.job_id, self.ca_cert.read_bytes(), self.credentials
        ).start()
        self.callers = callers
        self._stack.callback(callers.close)
        wait_for(
            lambda: (
                len(callers.calls) > 20
                and {e.gateway_id for e in callers.events if e.gateway_state == "DOWNLOADING"}
                >= set(FAKE_GATEWAYS)
            ),
            timeout=60,
            what="calls flowing and every fake gateway's progress on the watch",
            interval=0.1,
            describe=lambda: (
                f"calls={len(callers.calls)} events={len(callers.events)} "
                f"watch_error={callers.watch_error}"
            ),
        )
        return callers

    # The controller --------------------------------------------------------------------

    def _controller(self) -> controller_pb2.ControllerInfo | None:
        try:
            info: controller_pb2.ControllerInfo = self._stub.GetController(
                controller_pb2.GetControllerRequest(), timeout=5
            )
        except grpc.RpcError:
            return None  # mid-swap: the next probe asks again
        return info

    def _controller_pid(self) -> int | None:
        info = self._controller()
        return info.pid if info else None

    def swap(self, version: str) -> Swap:
        """Move the controller to ``version``; return once the old process is gone."""
        before = self._controller()
        if before is None:
            raise RuntimeError("the controller does not answer GetController before a swap")
        start = time.monotonic()
        info = self._stub.UpgradeController(
            controller_pb2.UpgradeControllerRequest(version=version), timeout=SWAP_STEP_S
        )
        ready = time.monotonic()
        if info.version != version or info.pid == before.pid:
            raise RuntimeError(f"UpgradeController({version}) answered {info}")
        wait_for(
            lambda: self._controller_pid() == info.pid,
            timeout=SWAP_STEP_S,
            what=f"GetController to answer from the new controller (pid {info.pid})",
            interval=0.02,
        )
        serving = time.monotonic()
        wait_for(
            lambda: not is_running(before.pid),
            timeout=SWAP_STEP_S,
            what=f"the old controller (pid {before.pid}) to exit",
            interval=0.02,
        )
        gone = time.monotonic()
        assert self.controller is not None
        self.controller.popen.poll()  # reap the first controller, our own child
        spawn_ms = _spawn_to_ready_ms(self.controller.log_path, info.pid)
        return Swap(version, before.pid, info.pid, start, ready, serving, gone, spawn_ms)

    # Counting reports ------------------------------------------------------------------

    def drain_and_finish(self) -> list[JobEvent]:
        """Stop reporting, let the controller catch up, finish the job; every event of it."""
        assert self.fakes is not None and self.callers is not None
        callers, fakes = self.callers, self.fakes
        fakes.stop()

        def progress() -> int:
            return sum(1 for e in callers.events if e.gateway_state == "DOWNLOADING")

        deadline = time.monotonic() + DRAIN_MAX_S
        last, last_change = progress(), time.monotonic()
        while progress() < len(fakes.sent) and time.monotonic() < deadline:
            if time.monotonic() - last_change > DRAIN_QUIET_S:
                break  # nothing more is coming: what is missing was lost
            time.sleep(0.1)
            if (now := progress()) != last:
                last, last_change = now, time.monotonic()
        fakes.finish()
        if not callers.wait_watch_done(timeout=60):
            raise RuntimeError("the watch did not end within 60s of the job finishing")
        # A fresh read of the whole job: what the database holds, through the API.
        return list(self.client.watch_job(self.job_id, 0))


def _percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def summarize(
    bench: Bench,
    swaps: list[Swap],
    steady: tuple[float, float],
    events: list[JobEvent],
) -> dict[str, Any]:
    assert bench.callers is not None and bench.fakes is not None
    callers, fakes = bench.callers, bench.fakes
    calls = callers.calls
    windows = [(s.start, s.gone) for s in swaps]
    swap_calls = [c for c in calls if any(c.overlaps(a, b) for a, b in windows)]
    steady_calls = [c for c in calls if steady[0] <= c.start and c.end <= steady[1]]
    failed = [c for c in calls if c.error]
    steady_ms = [c.ms for c in steady_calls]
    swap_ms = [c.ms for c in swap_calls]

    published = Counter((s.gateway_id, s.bytes_done) for s in fakes.sent)
    recorded = Counter(
        (e.gateway_id, e.bytes_done)
        for e in events
        if e.gateway_state == "DOWNLOADING" and e.gateway_id in FAKE_GATEWAYS
    )
    lost = published - recorded

    def phase_counts(phase: str) -> dict[str, int]:
        sent = [s for s in fakes.sent if s.phase == phase]
        return {
            "published": len(sent),
            "lost": sum(1 for s in sent if (s.gateway_id, s.bytes_done) in lost),
        }

    watched = {e.seq for e in callers.events}

    def where(call: Call) -> dict[str, Any]:
        """A failed call placed against the swaps: which one, and when after its READY."""
        index = next((i for i, (a, b) in enumerate(windows) if call.overlaps(a, b)), None)
        placed: dict[str, Any] = {
            "status": call.status,
            "method": call.method,
            "error": call.error,
            "ms": _ms(call.end - call.start),
        }
        if index is not None:
            placed.update(swap=index + 1, start_after_ready_ms=_ms(call.start - swaps[index].ready))
        return placed

    per_swap: list[dict[str, Any]] = [
        {
            "to": s.version,
            "old_pid": s.old_pid,
            "new_pid": s.new_pid,
            "upgrade_call_ms": _ms(s.ready - s.start),
            "spawn_to_ready_ms": round(s.spawn_to_ready_ms, 1) if s.spawn_to_ready_ms else None,
            "new_pid_answers_ms": _ms(s.serving - s.start),
            "old_exit_after_ready_ms": _ms(s.gone - s.ready),
            "swap_ms": _ms(s.gone - s.start),
            "longest_call_ms": round(
                max((c.ms for c in calls if c.overlaps(s.start, s.gone)), default=0.0), 1
            ),
        }
        for s in swaps
    ]

    def p50_max(key: str) -> dict[str, float]:
        values = [float(w[key]) for w in per_swap if w[key] is not None]
        return {"p50": round(statistics.median(values), 1), "max": round(max(values), 1)}

    upgrades_s = swaps[-1].gone - swaps[0].start
    return {
        "upgrades": len(swaps),
        "upgrades_took_s": round(upgrades_s, 1),
        "steady_s": round(steady[1] - steady[0], 1),
        "gateways_real": len(REAL_GATEWAYS),
        "gateways_fake": len(FAKE_GATEWAYS),
        "calls": len(calls),
        "failed_calls": len(failed) + (1 if callers.watch_error else 0),
        "failures": [where(c) for c in failed[:20]],
        "watch_error": callers.watch_error,
        "client_retries": callers.call_retries.count,
        "calls_during_swaps": len(swap_calls),
        "steady_calls": len(steady_calls),
        "steady_calls_per_s": round(len(steady_calls) / (steady[1] - steady[0]), 1),
        "swap_latency_ms_max": round(max(swap_ms, default=0.0), 1),
        "swap_latency_ms_p99": round(_percentile(swap_ms, 99), 1),
        "swap_latency_ms_p50": round(_percentile(swap_ms, 50), 1),
        "steady_latency_ms_p50": round(_percentile(steady_ms, 50), 1),
        "steady_latency_ms_p99": round(_percentile(steady_ms, 99), 1),
        "steady_latency_ms_max": round(max(steady_ms, default=0.0), 1),
        "watch_events": len(callers.events),
        "watch_resumes": callers.watch_resumes.count,
        "watch_missed": len({e.seq for e in events} - watched),
        "reports_per_s": REPORTS_PER_S * len(FAKE_GATEWAYS),
        "reports_published": sum(published.values()),
        "reports_recorded": sum(recorded.values()),
        "reports_lost": sum(lost.values()),
        "reports_duplicated": sum((recorded - published).values())
        + sum(max(0, n - 1) for n in recorded.values()),
        "reports_publish_failed": len(fakes.publish_failures),
        "reports_during_upgrades": phase_counts("upgrades"),
        "reports_during_steady": phase_counts("steady"),
        "swap_phases_ms": {
            "upgrade_call": p50_max("upgrade_call_ms"),
            "spawn_to_ready": p50_max("spawn_to_ready_ms"),
            "new_pid_answers": p50_max("new_pid_answers_ms"),
            "old_exit_after_ready": p50_max("old_exit_after_ready_ms"),
        },
        "swaps": per_swap,
    }


def table(r: dict[str, Any]) -> str:
    p = r["swap_phases_ms"]

    def pm(key: str) -> str:
        return f"{p[key]['p50']} / {p[key]['max']}"

    rows = [
        ("upgrades A<->B (took) / steady run", f"{r['upgrades']} ({r['upgrades_took_s']} s) / "
         f"{r['steady_s']} s", ""),
        ("gateways reporting: real / fake", f"{r['gateways_real']} / {r['gateways_fake']}", ""),
        ("calls / failed (incl. the watch)", f"{r['calls']} / {r['failed_calls']}", "0 failed"),
        ("client retries on UNAVAILABLE", str(r["client_retries"]), ""),
        ("calls overlapping a swap", str(r["calls_during_swaps"]), ""),
        ("longest call during a swap ms", str(r["swap_latency_ms_max"]), ""),
        ("during swaps p50 / p99 ms", f"{r['swap_latency_ms_p50']} / {r['swap_latency_ms_p99']}",
         ""),
        ("steady p50 / p99 / max ms", f"{r['steady_latency_ms_p50']} / "
         f"{r['steady_latency_ms_p99']} / {r['steady_latency_ms_max']} "
         f"({r['steady_calls_per_s']} calls/s)", ""),
        ("watch: events / resumes / missed", f"{r['watch_events']} / {r['watch_resumes']} / "
         f"{r['watch_missed']}", "missed 0"),
        ("reports published / recorded", f"{r['reports_published']} / {r['reports_recorded']} "
         f"({r['reports_per_s']:.0f}/s)", ""),
        ("reports lost / duplicated", f"{r['reports_lost']} / {r['reports_duplicated']}",
         "0 / 0"),
        ("  of which during upgrades / steady", f"{r['reports_during_upgrades']['published']} / "
         f"{r['reports_during_steady']['published']} (lost {r['reports_during_upgrades']['lost']}"
         f" / {r['reports_during_steady']['lost']})", ""),
        ("UpgradeController call p50 / max ms", pm("upgrade_call"), ""),
        ("spawn -> ready p50 / max ms", pm("spawn_to_ready"), ""),
        ("call -> new pid answers p50 / max ms", pm("new_pid_answers"), ""),
        ("ready -> old exited p50 / max ms", pm("old_exit_after_ready"), ""),
        ("load average start / end", f"{r['load_start']} / {r['load_end']}", ""),
    ]  # fmt: skip
    for f in r["failures"][:5]:
        status = f["status"] or "?"
        when = (
            f"swap {f['swap']}, {f['start_after_ready_ms']:+.0f} ms from READY"
            if "swap" in f
            else "steady"
        )
        rows.append(
            (
                "  failed: " + f["method"],
                f"{status} after {f['ms']:.0f} ms ({when})",
                "",
            )
        )
    rows.append(("per swap: call / spawn->ready /", "", ""))
    rows.append(("  old gone / longest call, ms", "", ""))
    for i, s in enumerate(r["swaps"], 1):
        spawn = s["spawn_to_ready_ms"]
        rows.append(
            (
                f"  {i:2} -> {s['to']}",
                f"{s['upgrade_call_ms']:.0f} / {'?' if spawn is None else f'{spawn:.0f}'} / "
                f"{s['swap_ms']:.0f} / {s['longest_call_ms']:.0f}",
                "",
            )
        )
    width = max(len(name) for name, _, _ in rows)
    vwidth = max(len(value) for _, value, _ in rows)
    lines = [f"{'':{width}}  {'measured':{vwidth}}  target"]
    lines += [
        f"{name:{width}}  {value:{vwidth}}  {target}".rstrip() for name, value, target in rows
    ]
    return "\n".join(lines)


def _load() -> str:
    """The 1, 5 and 15 minute load averages: the machine is shared with other runs."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run(bench: Bench) -> dict[str, Any]:
    print("setting up: releases, controller, gateways, job ...", flush=True)
    bench.setup()
    callers = bench.start_load()
    assert bench.fakes is not None
    print(f"{UPGRADES} controller upgrades under load ...", flush=True)
    bench.fakes.phase = "upgrades"
    swaps = []
    for i in range(UPGRADES):
        version = RELEASE_B if i % 2 == 0 else RELEASE_A
        swap = bench.swap(version)
        swaps.append(swap)
        print(
            f"  upgrade {i + 1:2}/{UPGRADES} to {version}: pid {swap.old_pid} -> {swap.new_pid}, "
            f"{(swap.gone - swap.start) * 1000:.0f} ms",
            flush=True,
        )
    took = swaps[-1].gone - swaps[0].start
    print(f"steady state for {took:.1f} s ...", flush=True)
    bench.fakes.phase = "steady"
    steady_start = time.monotonic()
    time.sleep(took)  # the baseline runs for as long as the upgrades took: nothing to await
    steady_end = time.monotonic()
    callers.stop_calls()
    print("draining the reports and reading the job back ...", flush=True)
    events = bench.drain_and_finish()
    return summarize(bench, swaps, (steady_start, steady_end), events)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def _shielded() -> Iterator[None]:
    """Let the cleanup (itself bounded) run to its end: Ctrl-C or SIGTERM meanwhile and the
    bench's deadline are held off until it is done."""
    signal.alarm(0)
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def main() -> int:
    logs.configure("bench-controller-upgrade", json=False, level="WARNING")
    mgmt = Management()
    if not mgmt.available():
        print(
            "bench-controller-upgrade: needs RabbitMQ with the management API on "
            "127.0.0.1:15672 (rabbitmq-plugins enable rabbitmq_management)",
            file=sys.stderr,
        )
        return EXIT_NO_BROKER
    previous: list[tuple[int, Callable[..., Any] | int | None]] = [
        (sig, signal.signal(sig, _interrupt)) for sig in (signal.SIGTERM, signal.SIGALRM)
    ]
    signal.alarm(BENCH_DEADLINE_S)
    load_start = _load()
    vhost = f"hitless-bench-controller-{uuid.uuid4().hex[:8]}"
    mgmt.create_vhost(vhost)
    try:
        with tempfile.TemporaryDirectory(prefix="hitless-bench-controller-") as tmp:
            bench = Bench(Path(tmp), vhost, mgmt)
            try:
                result = run(bench)
            except (Interrupted, KeyboardInterrupt):
                raise
            except Exception as exc:
                print(f"bench-controller-upgrade: broken: {type(exc).__name__}: {exc}",
                      file=sys.stderr)  # fmt: skip
                print(bench.procs.dump_logs()[-6000:], file=sys.stderr)
                return EXIT_BROKEN
            finally:
                with _shielded():
                    bench.close()
    except (Interrupted, KeyboardInterrupt) as exc:
        reason = f"deadline of {BENCH_DEADLINE_S}s" if str(exc) == "SIGALRM" else "interrupted"
        print(f"bench-controller-upgrade: stopped ({reason}); everything it started is stopped",
              file=sys.stderr)  # fmt: skip
        return EXIT_INTERRUPTED
    finally:
        signal.alarm(0)
        for sig, handler in previous:
            signal.signal(sig, handler)
        mgmt.delete_vhost(vhost)
    result.update(load_start=load_start, load_end=_load())
    print(table(result))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
