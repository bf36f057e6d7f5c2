"""``make bench-verify``: what verifying a release against the controller's TUF metadata
adds to a gateway's upgrade, for one gateway and for 100 at once, beside the work it did
before releases were signed, measured in the same run.

The server is a real controller process (``controller-svc serve`` on SQLite, its own
broker vhost, ``--no-self-upgrade``) trusting a root made by ``hitless.trust.keys.init``.
Two releases are published through its gRPC API, each with targets metadata signed with
the targets key (``PublishRelease`` with ``ReleaseMetadata.targets_metadata``, as
``upgradectl releases publish --keys`` does):

- the large release: a zip holding the version stamp and 20 MiB of random bytes, stored
  uncompressed. Random bytes are enough: verification reads every byte whatever they are,
  and nothing here runs the artifact;
- the tiny release: a zip holding the version stamp only (about 130 bytes).

Clients run in processes other than the controller's. Gateways call the controller's
gateway port as gateways do: over TLS with a client certificate, each enrolled once
(``Enrollment.Enroll`` with a code from ``CreateEnrollment``, as ``gateway-daemon
enroll`` does) before anything is timed; every connection below is a TLS handshake.

1. One gateway (this process). Each step runs ``REPEATS`` times, after one untimed run
   that loads what the steps import; the median and the minimum are reported, and what
   trust adds to an upgrade (metadata update + verify_artifact - file_sha256):

   - download: ``gateway_daemon.download.download`` of the large artifact to a new file;
   - metadata update, fresh cache: ``TrustClient.target`` over ``ControllerSource`` (the
     controller's ``FetchMetadata``, over one channel kept for the update) from the trust
     anchor with an empty cache: 2.root.json (not found: no root rotation), timestamp, snapshot,
     targets, each verified;
   - metadata update, warm cache: the same client again with nothing new published: only
     2.root.json and timestamp.json are fetched;
   - ``verify_artifact`` on the downloaded file (its length and sha256 against the signed
     target);
   - baseline: ``hitless.digest.file_sha256`` of the same file, the check a gateway made
     before releases were signed. The file is in the page cache for both reads.

2. 100 gateways at once. 100 worker processes (processes, not threads, so the GIL does not
   serialise the clients; started from a fork server) wait at a barrier, then each makes
   one call. The barrier is reused for each round. The three kinds of round alternate,
   ``ROUNDS`` times each, after one warm-up round of each kind that is not counted (a
   gateway is a long-running process, so its first call's imports and setup are not part
   of an upgrade):

   - metadata update, fresh cache: ``GatewayTrust.release`` (what a gateway runs before it
     stages), from a new state directory each time. It retries a fetch the controller
     turns away, with the gateway's backoff;
   - baseline, one tiny Download each: ``download()`` of the tiny artifact (it waits and
     retries while the controller is busy);
   - baseline, one FetchMetadata each: ``ControllerSource.fetch_metadata("timestamp.json")``,
     one attempt with no retry (a refused call is counted, not retried).

   Per-client latency runs from that client's release from the barrier until its call
   returns. Wall time runs from the first client's release until the last one is done.
   Refusals are the controller's ``call_refused`` log lines (its per-kind budgets,
   ``controller_svc.limits``). The controller's CPU time is read from /proc, and each
   client's CPU time for its call from ``time.process_time``. The 100 clients share this
   machine's cores with the controller, so client-side work (parsing and verifying
   metadata) lengthens every latency. On a real fleet each gateway has its
   own CPU, so these latencies are an upper bound, and the controller's CPU per round is
   the cost that stays.

Prints one table and writes bench/results/verify.json (times in ms or s, sizes in bytes).
Not a test: timing never decides pass or fail. Needs RabbitMQ with its management API on
127.0.0.1 (a throwaway vhost). Exit 0, or 1 when the bench itself broke, or 2 when there
is no broker.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before bench/, whose hitless.py would shadow the package

from gateway_daemon import identity  # noqa: E402
from gateway_daemon.download import download  # noqa: E402
from gateway_daemon.trust import ControllerSource, GatewayTrust, provision  # noqa: E402
from hitless import logs  # noqa: E402
from hitless.config import HostPort  # noqa: E402
from hitless.digest import file_sha256  # noqa: E402
from hitless.trust import keys as trust_keys  # noqa: E402
from hitless.trust import release  # noqa: E402
from hitless.trust.client import TrustClient, verify_artifact  # noqa: E402
from hitless.trust.errors import MetadataNotFound  # noqa: E402
from hitless.version import STAMP_PATH  # noqa: E402
from tests.support.procs import Procs, command, free_port  # noqa: E402
from tests.support.rabbit import Management, amqp_url  # noqa: E402
from tests.support.wait import wait_for  # noqa: E402
from upgradectl.client import ControllerClient  # noqa: E402
from upgradectl.credentials import Credentials  # noqa: E402
from upgradectl.errors import CliError  # noqa: E402

PAYLOAD_BYTES = 20 * 1024 * 1024
LARGE, TINY = "2.0.0", "1.0.1"
REPEATS = 5
CLIENTS = 100
ROUNDS = 5
BARRIER_TIMEOUT_S = 60.0
ROUND_TIMEOUT_S = 120.0
RESULTS = ROOT / "bench" / "results" / "verify.json"
EXIT_OK, EXIT_BROKEN, EXIT_NO_BROKER = 0, 1, 2

# Fleet rounds: what each client does once released from the barrier.
METADATA, DOWNLOAD, TIMESTAMP = "metadata", "download", "timestamp"
FLEET_LABELS = {
    METADATA: "metadata update, fresh cache",
    DOWNLOAD: "baseline: one tiny Download",
    TIMESTAMP: "baseline: one FetchMetadata",
}


# The artifacts ---------------------------------------------------------------------------


def stamped_zip(path: Path, version: str, payload: bytes) -> Path:
    """Write a zip at ``path`` holding the version stamp and ``payload`` (stored), which
    the controller takes as release ``version``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(STAMP_PATH, f"{version}\n")
        if payload:
            zf.writestr("payload.bin", payload)
    path.write_bytes(buffer.getvalue())
    return path


# One gateway -----------------------------------------------------------------------------


class CountedSource:
    """A MetadataSource that records each file asked for and its size (0: not found)."""

    def __init__(self, source: ControllerSource) -> None:
        self._source = source
        self.fetched: list[tuple[str, int]] = []

    def fetch_metadata(self, name: str) -> bytes:
        try:
            data = self._source.fetch_metadata(name)
        except MetadataNotFound:
            self.fetched.append((name, 0))
            raise
        self.fetched.append((name, len(data)))
        return data


def timed(step: Callable[[], object]) -> float:
    """Seconds ``step`` took."""
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def one_gateway(
    gateway: identity.Identity,
    controller: HostPort,
    anchor: bytes,
    sha256: str,
    size: int,
    work: Path,
) -> dict[str, Any]:
    """The single gateway's steps, ``REPEATS`` times each, on the gateway port
    ``controller`` with ``gateway``'s certificate: seconds per run, and what the metadata
    updates fetched. One untimed run first loads what the steps import."""
    credentials = gateway.channel_credentials()
    runs: dict[str, list[float]] = {}
    fetched: dict[str, list[tuple[str, int]]] = {}
    name = release.target_name(LARGE)
    dest = work / "one" / "large.pyz"

    def record(step: str, seconds: float) -> None:
        runs.setdefault(step, []).append(seconds)

    for i in range(REPEATS + 1):
        warmup = i == 0
        dest.unlink(missing_ok=True)
        took = timed(partial(download, controller, sha256, size, dest, credentials=credentials))
        source = CountedSource(ControllerSource(controller, credentials))
        client = TrustClient(anchor, work / "one" / f"cache-{i}", source)
        started = time.perf_counter()
        target = client.target(name)
        fresh = time.perf_counter() - started
        fetched["fresh"], source.fetched = source.fetched, []
        warm = timed(partial(client.target, name))
        fetched["warm"], source.fetched = source.fetched, []
        if target.length != size or target.hashes.get("sha256") != sha256:
            raise AssertionError(f"the signed target {target} is not the published artifact")
        checked = timed(partial(verify_artifact, dest, target))
        digest = timed(partial(file_sha256, dest))
        if not warmup:
            for step, seconds in (("download", took), ("fresh", fresh), ("warm", warm),
                                  ("verify", checked), ("sha256", digest)):  # fmt: skip
                record(step, seconds)
    return {"runs_s": runs, "fetched": fetched}


# 100 gateways ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    kind: str
    state_dir: str
    identity_dir: str  # where the gateway's identity (enrollment) is kept
    controller: str  # the gateway port
    trust_root: str
    version: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Outcome:
    started: float  # time.monotonic() when released from the barrier (one clock per host)
    ended: float
    cpu_s: float  # the client process's CPU time for the call, all its threads
    error: str


def _prepare(task: Task) -> Callable[[], object]:
    """What a gateway does before the release: its state, its trust anchor, its
    certificate, its client."""
    state = Path(task.state_dir)
    controller = HostPort.parse(task.controller)
    enrolled = identity.load(Path(task.identity_dir))
    if enrolled is None:
        raise RuntimeError(f"no gateway identity in {task.identity_dir}")
    credentials = enrolled.channel_credentials()
    if task.kind == METADATA:
        provision(state, Path(task.trust_root))
        trust = GatewayTrust(state, controller, credentials)
        return lambda: trust.release(task.version)
    if task.kind == DOWNLOAD:
        dest = state / "tiny.pyz"
        return lambda: download(controller, task.sha256, task.size, dest, credentials=credentials)
    source = ControllerSource(controller, credentials)
    return lambda: source.fetch_metadata("timestamp.json")


def worker(barrier: Barrier, tasks: Any, results: Any) -> None:
    """One gateway process: for each task, prepare, wait at ``barrier``, run it once and
    put an Outcome in ``results``; stop at None."""
    logs.configure("bench-verify-gateway", json=True, level="CRITICAL")
    while (task := tasks.get()) is not None:
        error = ""
        try:
            step = _prepare(task)
        except Exception as exc:  # reported with the outcome; the barrier still needs us
            error = f"prepare: {type(exc).__name__}: {exc}"
        barrier.wait(BARRIER_TIMEOUT_S)
        started, cpu = time.monotonic(), time.process_time()
        if not error:
            try:
                step()
            except Exception as exc:  # counted per round: a refusal is a result here
                error = f"{type(exc).__name__}: {exc}"
        results.put(Outcome(started, time.monotonic(), time.process_time() - cpu, error))


@dataclass
class Fleet:
    """``CLIENTS`` worker processes, owned here: ``close`` stops them."""

    ctx: Any
    barrier: Barrier
    tasks: Any
    results: Any
    procs: list[Any] = field(default_factory=list)

    @classmethod
    def start(cls) -> Fleet:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(
            ["gateway_daemon.trust", "gateway_daemon.download", "gateway_daemon.identity"]
        )
        fleet = cls(ctx, ctx.Barrier(CLIENTS), ctx.Queue(), ctx.Queue())
        for _ in range(CLIENTS):
            proc = ctx.Process(target=worker, args=(fleet.barrier, fleet.tasks, fleet.results))
            proc.start()
            fleet.procs.append(proc)
        return fleet

    def run(self, tasks: Sequence[Task]) -> list[Outcome]:
        for task in tasks:
            self.tasks.put(task)
        return [self.results.get(timeout=ROUND_TIMEOUT_S) for _ in tasks]

    def close(self) -> None:
        for _ in self.procs:
            self.tasks.put(None)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5)


# The controller --------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def refusals(log: Path) -> int:
    """Calls the controller turned away so far (its ``call_refused`` lines)."""
    return sum('"call_refused"' in line for line in log.read_text(errors="replace").splitlines())


def publish(client: ControllerClient, keys: trust_keys.KeyPaths, version: str, path: Path) -> None:
    """Publish ``path`` as release ``version`` with the next targets metadata, signed with
    the targets key, listing it."""
    targets = release.sign_targets(
        client.get_targets_metadata(), keys.dir, add={release.target_name(version): path}
    )
    client.publish_release(version, path, f"bench-verify {version}", targets_metadata=targets)


# Summaries -------------------------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of ``values``."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def summarize_one(one: dict[str, Any], size: int) -> dict[str, Any]:
    runs = one["runs_s"]
    steps = {
        k: {"median_ms": ms(statistics.median(v)), "min_ms": ms(min(v))} for k, v in runs.items()
    }
    med = {k: statistics.median(v) for k, v in runs.items()}
    added = med["fresh"] + med["verify"] - med["sha256"]
    return {
        "steps": steps,
        "download_mb_per_s": round(size / med["download"] / 1e6, 1),
        "verify_over_sha256": round(med["verify"] / med["sha256"], 2),
        "added_fresh_ms": ms(added),
        "added_fresh_pct_of_download": round(100 * added / med["download"], 1),
        "added_warm_ms": ms(med["warm"] + med["verify"] - med["sha256"]),
        "fetched_fresh": [{"name": n, "bytes": b} for n, b in one["fetched"]["fresh"]],
        "fetched_warm": [{"name": n, "bytes": b} for n, b in one["fetched"]["warm"]],
    }


def summarize_round(kind: str, outcomes: list[Outcome], refused: int, cpu: float) -> dict[str, Any]:
    done = [o for o in outcomes if not o.error]
    latencies = [o.ended - o.started for o in done]
    client_cpu = [o.cpu_s for o in done]
    errors = sorted({o.error[:200] for o in outcomes if o.error})
    return {
        "kind": kind,
        "clients": len(outcomes),
        "ok": len(done),
        "failed": len(outcomes) - len(done),
        "errors": errors[:3],
        "latencies_s": latencies,
        "client_cpu_s": client_cpu,
        "wall_s": round(max(o.ended for o in outcomes) - min(o.started for o in outcomes), 3),
        "release_spread_ms": ms(
            max(o.started for o in outcomes) - min(o.started for o in outcomes)
        ),
        "refused": refused,
        "controller_cpu_s": round(cpu, 2),
    }


def summarize_fleet(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per kind: per-client latency percentiles over every measured round's clients, the
    median wall time, refusals and controller CPU per round (warm-up rounds left out)."""
    out: dict[str, Any] = {}
    for kind in FLEET_LABELS:
        mine = [r for r in rounds if r["kind"] == kind and not r["warmup"]]
        latencies = [x for r in mine for x in r["latencies_s"]]
        client_cpu = [x for r in mine for x in r["client_cpu_s"]]
        out[kind] = {
            "rounds": len(mine),
            "calls": sum(r["clients"] for r in mine),
            "ok": sum(r["ok"] for r in mine),
            "failed": sum(r["failed"] for r in mine),
            "p50_ms": ms(percentile(latencies, 50)) if latencies else None,
            "p99_ms": ms(percentile(latencies, 99)) if latencies else None,
            "max_ms": ms(max(latencies)) if latencies else None,
            "client_cpu_ms_median": ms(statistics.median(client_cpu)) if client_cpu else None,
            "wall_s_median": round(statistics.median(r["wall_s"] for r in mine), 3),
            "wall_s_each": [r["wall_s"] for r in mine],
            "refused_per_round": [r["refused"] for r in mine],
            "controller_cpu_s_per_round": round(
                statistics.median(r["controller_cpu_s"] for r in mine), 2
            ),
            "release_spread_ms_median": round(
                statistics.median(r["release_spread_ms"] for r in mine), 1
            ),
            "errors": sorted({e for r in mine for e in r["errors"]})[:3],
        }
    return out


def table(r: dict[str, Any]) -> str:
    one, fleet = r["one_gateway"], r["fleet"]
    s = one["steps"]

    def step(key: str) -> str:
        return f"{s[key]['median_ms']:9.2f} ms  (min {s[key]['min_ms']:.2f})"

    def files(fetched: list[dict[str, Any]]) -> str:
        return ", ".join(f"{f['name']} {f['bytes']} B" if f["bytes"] else f"{f['name']} none"
                         for f in fetched)  # fmt: skip

    lines = [
        f"one gateway: {r['artifact_bytes']} B artifact (20 MiB random payload), "
        f"median of {r['repeats']}",
        f"  {'download (download())':44}{step('download')}  {one['download_mb_per_s']} MB/s",
        f"  {'metadata update, fresh cache':44}{step('fresh')}",
        f"      {len(one['fetched_fresh'])} RPCs: {files(one['fetched_fresh'])}",
        f"  {'metadata update, warm cache':44}{step('warm')}",
        f"      {len(one['fetched_warm'])} RPCs: {files(one['fetched_warm'])}",
        f"  {'verify_artifact (length + sha256)':44}{step('verify')}",
        f"  {'baseline: file_sha256 (before signing)':44}{step('sha256')}",
        f"  {'verify_artifact / file_sha256':44}{one['verify_over_sha256']:9.2f} x",
        f"  {'added: fresh update + verify - sha256':44}{one['added_fresh_ms']:9.2f} ms  "
        f"({one['added_fresh_pct_of_download']}% of the download)",
        f"  {'added: warm update + verify - sha256':44}{one['added_warm_ms']:9.2f} ms",
        "",
        f"{r['clients']} gateways at once (processes, barrier), {r['rounds']} rounds each after "
        f"a warm-up round; per-client latency over all rounds, {r['cpus']} CPUs shared",
        f"  {'':32}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'wall s':>8}{'ok/calls':>10}"
        f"{'refused':>9}{'ctl CPU s':>10}{'client CPU ms':>14}",
    ]
    for kind, label in FLEET_LABELS.items():
        f = fleet[kind]
        refused = sum(f["refused_per_round"])
        lines.append(
            f"  {label:32}{f['p50_ms'] or 0:9.1f}{f['p99_ms'] or 0:9.1f}{f['max_ms'] or 0:9.1f}"
            f"{f['wall_s_median']:8.2f}{str(f['ok']) + '/' + str(f['calls']):>10}"
            f"{refused:>9}{f['controller_cpu_s_per_round']:10.2f}"
            f"{f['client_cpu_ms_median'] or 0:14.1f}"
        )
    lines += [
        "  one FetchMetadata: timestamp.json, one attempt, no retry. wall s: first client "
        "released to last done, median of rounds.",
        "  refused: calls the controller turned away, all rounds. ctl CPU s: the controller's "
        "CPU per round, median. client CPU ms: one client's CPU for its call, median.",
    ]
    lines.append(f"  load average start / end: {r['load_start']} / {r['load_end']}")
    return "\n".join(lines)


# The run ---------------------------------------------------------------------------------


def _load() -> str:
    """The 1, 5 and 15 minute load averages: the machine is shared with other runs."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def enroll(
    client: ControllerClient, api: HostPort, ca_pem: bytes, gateway_id: str, state_dir: Path
) -> identity.Identity:
    """Gateway ``gateway_id`` enrolled at the controller (a code from ``client``, then
    ``Enrollment.Enroll`` at ``api``); its identity is kept in ``state_dir``."""
    code = client.create_enrollment(gateway_id).code
    return identity.enroll(state_dir, gateway_id, api, ca_pem, code)


def _admin_token(data_dir: Path, procs: Procs) -> Credentials:
    """The admin API token the controller makes at its first start."""
    path = data_dir / "admin.token"
    wait_for(
        lambda: path.exists() and bool(path.read_text().strip()),
        timeout=60,
        what="the controller's first admin token",
        interval=0.1,
        describe=procs.dump_logs,
    )
    return Credentials(path.read_text().strip(), f"the file {path}")


def run(work: Path, amqp: str) -> dict[str, Any]:
    # The fork server starts before this process opens any gRPC channel.
    print(f"starting {CLIENTS} gateway processes ...", flush=True)
    fleet = Fleet.start()
    procs = Procs(work)
    target = HostPort("127.0.0.1", free_port())
    gateway_port = HostPort("127.0.0.1", free_port())
    client: ControllerClient | None = None
    try:
        keys = trust_keys.init(work / "keys")
        controller = procs.start(
            "controller",
            [
                command("controller-svc"), "serve",
                "--listen", str(target),
                "--gateway-listen", str(gateway_port),
                "--data-dir", str(work / "controller"),
                "--amqp", amqp,
                "--trust-root", str(keys.root_json),
                "--no-self-upgrade",
            ],
        )  # fmt: skip
        token = _admin_token(work / "controller", procs)
        ca_pem = (work / "controller" / "pki" / "ca.pem").read_bytes()
        client = ControllerClient(target, timeout=60, ca_cert=ca_pem, credentials=token)

        def answers() -> bool:
            assert client is not None
            try:
                client.list_releases()
            except CliError:
                return False
            return True

        wait_for(answers, timeout=60, what="the controller to answer", interval=0.2,
                 describe=procs.dump_logs)  # fmt: skip
        large = stamped_zip(work / "large.pyz", LARGE, os.urandom(PAYLOAD_BYTES))
        tiny = stamped_zip(work / "tiny.pyz", TINY, b"")
        print("publishing the releases ...", flush=True)
        publish(client, keys, LARGE, large)
        publish(client, keys, TINY, tiny)
        large_sha, large_size = file_sha256(large)
        tiny_sha, tiny_size = file_sha256(tiny)

        print(f"enrolling {CLIENTS} gateways ...", flush=True)
        identities = [work / "identities" / f"gw-{n}" for n in range(CLIENTS)]
        enrolled = [enroll(client, target, ca_pem, p.name, p) for p in identities]
        gateway = enrolled[0].download_address(target)

        print(f"one gateway, {REPEATS} runs ...", flush=True)
        one = one_gateway(
            enrolled[0], gateway, keys.root_json.read_bytes(), large_sha, large_size, work
        )

        rounds = []
        pid = controller.popen.pid
        for i in range(ROUNDS + 1):
            warmup = i == 0
            for kind in FLEET_LABELS:
                tasks = [
                    Task(kind, str(work / "fleet" / f"{kind}-{i}" / f"gw-{n}"),
                         str(identities[n]), str(gateway), str(keys.root_json), LARGE,
                         tiny_sha, tiny_size)
                    for n in range(CLIENTS)
                ]  # fmt: skip
                refused0, cpu0 = refusals(controller.log_path), cpu_seconds(pid)
                outcomes = fleet.run(tasks)
                cpu = cpu_seconds(pid) - cpu0
                summary = summarize_round(kind, outcomes, refusals(controller.log_path) - refused0,
                                          cpu)  # fmt: skip
                summary["warmup"] = warmup
                rounds.append(summary)
                name = "warm-up" if warmup else f"round {i}/{ROUNDS}"
                print(f"  {name} {FLEET_LABELS[kind]}: wall {summary['wall_s']} s, "
                      f"{summary['ok']}/{summary['clients']} ok, {summary['refused']} refused",
                      flush=True)  # fmt: skip
    finally:
        fleet.close()
        if client is not None:
            client.close()
        procs.stop_all()
    return {
        "artifact_bytes": large_size,
        "payload_bytes": PAYLOAD_BYTES,
        "tiny_artifact_bytes": tiny_size,
        "repeats": REPEATS,
        "clients": CLIENTS,
        "rounds": ROUNDS,
        "cpus": os.cpu_count(),
        "one_gateway": summarize_one(one, large_size),
        "fleet": summarize_fleet(rounds),
        "fleet_rounds": [
            {k: v for k, v in r.items() if k not in ("latencies_s", "client_cpu_s")} for r in rounds
        ],
    }


def main() -> int:
    logs.configure("bench-verify", json=False, level="WARNING")
    mgmt = Management()
    if not mgmt.available():
        print("bench-verify: needs RabbitMQ with the management API on 127.0.0.1:15672",
              file=sys.stderr)  # fmt: skip
        return EXIT_NO_BROKER
    load_start = _load()
    started = time.monotonic()
    vhost = f"hitless-bench-verify-{uuid.uuid4().hex[:8]}"
    mgmt.create_vhost(vhost)
    try:
        with tempfile.TemporaryDirectory(prefix="hitless-bench-verify-") as tmp:
            try:
                result = run(Path(tmp), amqp_url(vhost))
            except Exception as exc:
                print(f"bench-verify: broken: {type(exc).__name__}: {exc}", file=sys.stderr)
                return EXIT_BROKEN
    finally:
        mgmt.delete_vhost(vhost)
    result.update(load_start=load_start, load_end=_load(),
                  took_s=round(time.monotonic() - started, 1))  # fmt: skip
    print(table(result))
    print(f"bench took {result['took_s']} s")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
