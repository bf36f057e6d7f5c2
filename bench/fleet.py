"""``make bench-fleet``: a whole fleet upgraded at once, beside the floor measured in the
same run.

    python bench/fleet.py [--real N] [--simulated M] [--db sqlite|postgresql|both]
                          [--real-db sqlite|postgresql] [--sample K] [--sim-processes P]
                          [--handoff-timeout S]

Part 1, real gateways (default N = 100). A real controller process (``controller-svc
serve``, TLS, ``--no-self-upgrade``, its own broker vhost) and N real ``gateway-daemon run``
processes, each enrolled with a one-time code (``CreateEnrollment``; the gateway trades it
for its client certificate at its first start). The release is the product's own zipapp
(``upgradectl releases build``, the real CLI) padded to ``ARTIFACT_BYTES``: the zip is
written again with one more entry, ``bench-padding.bin``, holding random bytes stored
uncompressed (random, so nothing along the way can compress it; stored, so the gateway's
zipimport never reads it). It is signed and published with ``upgradectl releases publish
--keys``. Then ``upgradectl upgrade --latest --wait --yes --json``, the real CLI process,
and the bench measures:

- the seconds from that call to the last gateway's SUCCEEDED (the report's time), and
  the CLI's own exit time and code (a CLI that gives up early does not end the job);
- per-phase medians over the gateways, from the job's events (``WatchJob`` from seq 0,
  whose times are the gateways' reports): queued (job created) -> first DOWNLOADING,
  DOWNLOADING -> VERIFYING (the download), VERIFYING -> SWAPPING (verify and stage),
  SWAPPING -> SUCCEEDED (the hitless swap: the new process starts and takes over);
- the controller's CPU seconds during the upgrade and its peak RSS (sampled every
  ``SAMPLE_S``), summed over its process group, from /proc; the bytes served (each
  gateway's ``bytes_done`` when it reported VERIFYING) beside the bytes the fleet had to
  fetch.

The floor, in the same run: (a) the fleet's bytes over plain loopback TCP with the same
concurrency (N connections at once, ``bench/stream.py``'s ``measure``, which also gives
the artifact stream's own throughput through a controller, and a bare grpcio stream with
the same TLS; without that module, a raw TCP measurement here and no stream figure), and
(b) the interpreter starts of N swaps: a swap starts the new release's two processes,
its forwarding process and its agent, so 2N interpreters, all started at once on the
same cores, each importing what its process imports (``python ARTIFACT gateway-daemon
--help``: the zipapp's entry point imports ``gateway_daemon.cli``, what the forwarding
process loads, then argparse prints its help; and the release's
``gateway_daemon.agent_process`` imported from the zipapp, what the agent loads; both
exit without the interpreter's final collections, as the product's commands do). The
floor is (a) + (b); the target is the real upgrade within 1.5x of it. (b) is measured
first: the real gateways' ready deadline (``--handoff-timeout``) is, unless given, the
gateway's own (30 s, for one new version on its own gateway) plus twice (b), since here
every gateway's new version starts at once on the same few cores.

Part 2, simulated gateways (default M = 1,000), once per database: a controller of its own
on SQLite, then on a PostgreSQL database that the bench creates and drops (127.0.0.1:5432,
user postgres). ``bench/fleet_sim.py`` processes (``--sim-processes``, default 4) play the
gateways: a real AMQP consumer per gateway queue, real hellos, heartbeats and status
reports (DOWNLOADING, VERIFYING, SWAPPING, SUCCEEDED, no swap), and a sample of them
(``--sample``, default 20, enrolled for their certificates) downloads the artifact over
gRPC. The controller runs without a broker management API, so the gateways share one
broker login (README, "Broker users and permissions"). With ``upgradectl upgrade --latest
--wait`` it measures: the seconds from the call to the job recorded finished; the dispatch
(the job's creation to the last command arriving at a simulated gateway); report
ingestion (the status reports of the gateways outside the sample, confirmed by the
broker, over the time from the first of them to the first GetJob showing all those gateways
SUCCEEDED: the sample's downloads would measure the stream instead; beside it, how long
the simulated gateways took to send them, to tell a slow sender from a slow controller)
and lag (last report confirmed to the job recorded finished; "job recorded finished" is
the first moment a client saw it: the CLI's exit or the call loop's GetJob, whichever came
first), the deepest backlog of the controller's reports queue (ready messages, not those
the controller holds unacknowledged);
and, from one in-process gRPC client calling ListGateways and GetJob back to back (every
page, when the controller pages), their latency p50/p99 during the job.

Beside it, the report path's own capacity, which the rate above cannot show (it is bounded
by how fast the simulated gateways send): ``bench/controller_reporters.py`` on the same
database, ``INGEST_REPORTS_PER_GATEWAY`` status reports per simulated gateway waiting in
the reports queue, applied by the controller's own consumer and engine; and the CLI's own
start-up: ``upgradectl --help``, median of ``CLI_RUNS``.

Develop with small sizes (``--real 5 --simulated 50``). Prints one table and writes
bench/results/fleet.json (one row per database). Everything the bench starts is stopped,
and its vhosts, broker users and PostgreSQL databases removed, on success, failure,
Ctrl-C or SIGTERM. Not a test: timing never decides pass or fail. Exit 0, 1 when the
bench itself broke, 2 without a broker (or PostgreSQL, when asked for), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import uuid
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before bench/, whose hitless.py would shadow the package

import grpc  # noqa: E402

from gateway_daemon import identity  # noqa: E402
from gateway_daemon.cli import ENV_ENROLL_CODE  # noqa: E402
from gateway_daemon.handoff.parent import Deadlines  # noqa: E402
from hitless import logs  # noqa: E402
from hitless.config import HostPort  # noqa: E402
from hitless.trust import keys as trust_keys  # noqa: E402
from hitless.v1 import common_pb2, controller_pb2, controller_pb2_grpc  # noqa: E402
from tests.support.fleet import bearer  # noqa: E402
from tests.support.procs import Proc, Procs, command, free_port, group_members  # noqa: E402
from tests.support.rabbit import Management, amqp_url  # noqa: E402
from tests.support.wait import wait_for  # noqa: E402

FLEET_VERSION = "1.0.0"  # what the installed package (the gateways' start) reports
NEW_VERSION = "1.1.0"
ARTIFACT_BYTES = 20 * 1024 * 1024
PADDING_ENTRY = "bench-padding.bin"
SIM = ROOT / "bench" / "fleet_sim.py"
RESULTS = ROOT / "bench" / "results" / "fleet.json"
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
DBS = ("sqlite", "postgresql")

CLI_RUNS = 5
HANDLES_PER_QUEUE = 3  # seen on RabbitMQ 3.10: 514 classic queues held 1,503 handles
START_BATCH = 10  # real gateways started at once (each start is an interpreter's imports)
SAMPLE_S = 0.2  # RSS and queue-depth sampling
CALL_TIMEOUT_S = 30.0
JOB_TIMEOUT_S = 900.0
SETUP_TIMEOUT_S = 300.0
BENCH_DEADLINE_S = 3 * 3600
TERMINAL = {"SUCCEEDED", "PARTIAL", "FAILED", "ABORTED", "CANCELLED"}
PHASES = (
    ("queued_to_downloading", None, "DOWNLOADING"),
    ("download", "DOWNLOADING", "VERIFYING"),
    ("verify", "VERIFYING", "SWAPPING"),
    ("swap", "SWAPPING", "SUCCEEDED"),
)
TARGETS = {
    "real_floor_ratio": "<= 1.5",
    "simulated_seconds": "<= 60",
    "stream_ratio": ">= 0.5",
    "ingest_reports_per_s": ">= 5000 (postgresql)",
    "api_p99_ms": "<= 100",
}

EXIT_OK, EXIT_BROKEN, EXIT_NO_SERVICE, EXIT_INTERRUPTED = 0, 1, 2, 130
# The report path's capacity (``ingest_capacity``): this many queued status reports per
# simulated gateway.
INGEST_REPORTS_PER_GATEWAY = 20


class Interrupted(Exception):
    """SIGTERM, or the bench's own deadline passed."""


# Measuring processes ---------------------------------------------------------------------


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every live process in group ``pgid``, with the CPU of
    children they have reaped (/proc/PID/stat fields 14-17, proc(5))."""
    total = 0.0
    for pid in group_members(pgid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


def group_rss_bytes(pgid: int) -> int:
    """Resident set size of group ``pgid`` now (VmRSS of each member, proc(5))."""
    total = 0
    for pid in group_members(pgid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


class Sampler:
    """Calls ``probe`` every ``SAMPLE_S`` on a thread of its own and keeps the largest
    value; ``stop`` ends the thread."""

    def __init__(self, probe: Callable[[], int]) -> None:
        self.peak = 0
        self._probe = probe
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # a probe that fails once is skipped
                self.peak = max(self.peak, self._probe())
            self._stop.wait(SAMPLE_S)


# Numbers ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def rounded(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _stamp(ts: Any) -> float:
    """Seconds since the epoch of a protobuf Timestamp."""
    return float(ts.seconds) + float(ts.nanos) / 1e9


# The release -----------------------------------------------------------------------------


def padded_release(work: Path, total_bytes: int) -> Path:
    """The product's zipapp at ``NEW_VERSION`` (``upgradectl releases build``, the real CLI)
    written again with ``PADDING_ENTRY``, random bytes stored uncompressed, so that the
    artifact has about ``total_bytes`` bytes. Raises CalledProcessError when the build
    fails."""
    base = work / "release-base.pyz"
    subprocess.run(
        [command("upgradectl"), "releases", "build", "--version", NEW_VERSION, "-o", str(base)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    original = base.read_bytes()
    shebang = original[: original.index(b"PK\x03\x04")]
    # Each entry costs its name twice plus a local (30 B) and a central (46 B) header.
    overhead = 2 * len(PADDING_ENTRY) + 76
    padding = max(0, total_bytes - len(original) - overhead)
    out = io.BytesIO()
    out.write(shebang)
    with zipfile.ZipFile(base) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        pad = zipfile.ZipInfo(PADDING_ENTRY, date_time=(1980, 1, 1, 0, 0, 0))
        pad.compress_type = zipfile.ZIP_STORED
        dst.writestr(pad, os.urandom(padding))
    artifact = work / f"release-{NEW_VERSION}.pyz"
    artifact.write_bytes(out.getvalue())
    base.unlink()
    return artifact


# The floor -------------------------------------------------------------------------------


def cli_start_ms(runs: int = CLI_RUNS) -> float:
    """Median wall milliseconds of ``upgradectl --help``: the CLI's interpreter start and
    imports, with no call to any controller."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([command("upgradectl"), "--help"], check=True, capture_output=True)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def interpreter_starts(artifact: Path, n: int) -> float:
    """Wall seconds for the interpreters of ``n`` swaps started at once: per swap, the new
    release's forwarding process (``python ARTIFACT gateway-daemon --help``) and its agent
    (``gateway_daemon.agent_process`` imported from the release file). Both exit as the
    product's commands do, without the interpreter's final collections
    (``hitless.heap.freeze_at_exit``): the floor counts starts, and a new version that
    takes over does not exit."""
    forwarding = [sys.executable, str(artifact), "gateway-daemon", "--help"]
    agent = [
        sys.executable, "-c",
        f"import sys; sys.path.insert(0, {str(artifact)!r}); import gateway_daemon.agent_process; "
        "from hitless import heap; heap.freeze_at_exit()",
    ]  # fmt: skip
    started = time.perf_counter()
    children = [
        subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(n)
        for argv in (forwarding, agent)
    ]
    try:
        for child in children:
            if child.wait(timeout=SETUP_TIMEOUT_S) != 0:
                raise RuntimeError(f"{' '.join(child.args)} exited {child.returncode}")  # type: ignore[arg-type]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    return time.perf_counter() - started


def raw_tcp_mbps(artifact: Path, concurrency: int) -> float:
    """MB/s (10^6 B/s) of ``concurrency`` loopback TCP connections at once, each sent the
    whole ``artifact`` with ``socket.sendfile`` and read with ``recv_into``: the floor when
    ``bench/stream.py`` is not there to measure it."""
    size = artifact.stat().st_size
    listener = socket.create_server(("127.0.0.1", 0), backlog=max(concurrency, 16))
    port = listener.getsockname()[1]

    def serve() -> None:
        for _ in range(concurrency):
            conn, _ = listener.accept()
            threading.Thread(target=send, args=(conn,), daemon=True).start()

    def send(conn: socket.socket) -> None:
        with conn, artifact.open("rb") as f:
            conn.sendfile(f)

    def receive(got: list[int]) -> None:
        buffer = memoryview(bytearray(1 << 20))
        with socket.create_connection(("127.0.0.1", port)) as sock:
            while n := sock.recv_into(buffer):
                got.append(n)

    counts: list[list[int]] = [[] for _ in range(concurrency)]
    threading.Thread(target=serve, daemon=True).start()
    readers = [threading.Thread(target=receive, args=(c,), daemon=True) for c in counts]
    started = time.perf_counter()
    try:
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(SETUP_TIMEOUT_S)
        took = time.perf_counter() - started
    finally:
        listener.close()
    moved = sum(sum(c) for c in counts)
    if moved != size * concurrency:
        raise RuntimeError(f"raw TCP moved {moved} bytes, not {size * concurrency}")
    return moved / took / 1e6


def stream_numbers(artifact: Path, concurrency: int) -> dict[str, Any]:
    """``stream_mbps``, ``raw_tcp_mbps`` and ``stream_ratio`` for ``concurrency`` downloads
    of an artifact of this size at once, from ``bench/stream.py``'s ``measure`` (a
    controller of its own); without that module, raw TCP alone (``raw_tcp_mbps``) and no
    stream figure."""
    size = artifact.stat().st_size
    try:
        from bench import stream
    except ImportError:
        return {
            "stream_mbps": None,
            "raw_tcp_mbps": raw_tcp_mbps(artifact, concurrency),
            "stream_ratio": None,
            "source": "bench/fleet.py raw TCP (bench/stream.py absent)",
        }
    try:
        measured: dict[str, Any] = stream.measure(size, concurrency)
    except Exception as exc:  # its own stand broke: the floor still needs raw TCP
        return {
            "stream_mbps": None,
            "raw_tcp_mbps": raw_tcp_mbps(artifact, concurrency),
            "stream_ratio": None,
            "source": f"bench/fleet.py raw TCP (bench/stream.py failed: {exc!r})",
        }
    return {**measured, "source": "bench/stream.py"}


# A controller ----------------------------------------------------------------------------


def create_pg_database() -> tuple[str, Callable[[], None]]:
    """A new PostgreSQL database on 127.0.0.1:5432 (user postgres): its SQLAlchemy URL and
    the function that drops it. Raises psycopg.OperationalError when the server does not
    answer."""
    import psycopg

    name = f"hitless_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return PG_URL.format(name=name), drop


def retried(action: Callable[[], object], attempts: int = 4) -> None:
    """Run a management API call that is safe to repeat (PUT, DELETE), again after a
    timeout: a broker busy with other work answers its HTTP API late."""
    for attempt in range(1, attempts + 1):
        try:
            action()
            return
        except (TimeoutError, urllib.error.URLError):
            if attempt == attempts:
                raise
            time.sleep(attempt)  # backoff before asking again


def vhost_up(amqp: str) -> bool:
    """Whether the broker opens an AMQP connection to the URL's vhost now (RabbitMQ starts
    a vhost's processes after the management API has answered its creation)."""
    import pika

    params = pika.URLParameters(amqp)
    params.socket_timeout = params.stack_timeout = 10
    try:
        pika.BlockingConnection(params).close()
    except Exception:  # pika's handshake timeouts share no base class with its AMQPError
        return False
    return True


class Controller:
    """One ``controller-svc serve`` process on its own vhost and database, with the admin
    token it made, a gRPC stub and the real CLI pointed at it. ``close`` stops everything
    started for it and removes the vhost, broker users and database, even half set up."""

    def __init__(self, work: Path, db: str, mgmt: Management) -> None:
        self.work = work
        self.db = db
        self.mgmt = mgmt
        # Keys of its own: a key directory remembers the targets version it signed last.
        work.mkdir(parents=True, exist_ok=True)
        self.keys = trust_keys.init(work / "keys")
        self.vhost = f"hitless-bench-fleet-{uuid.uuid4().hex[:8]}"
        self.amqp = amqp_url(self.vhost)
        self.api = HostPort("127.0.0.1", free_port())
        self.gateway_port = HostPort("127.0.0.1", free_port())
        self.procs = Procs(work)
        self.proc: Proc | None = None
        self.token = ""
        self._stack = contextlib.ExitStack()
        self._channel: grpc.Channel | None = None
        self.stub: Any = None

    @property
    def data_dir(self) -> Path:
        return self.work / "controller"

    @property
    def ca_cert(self) -> Path:
        return self.data_dir / "pki" / "ca.pem"

    @property
    def env(self) -> dict[str, str]:
        """What the real CLI needs to reach this controller as its admin."""
        return {
            "HITLESS_CONTROLLER": str(self.api),
            "HITLESS_CA_CERT": str(self.ca_cert),
            "HITLESS_TOKEN": self.token,
        }

    @property
    def pgid(self) -> int:
        assert self.proc is not None
        return self.proc.pgid

    def start(self) -> Controller:
        self.work.mkdir(parents=True, exist_ok=True)
        # Undone first, so that a create that timed out but happened is undone too.
        self._stack.callback(retried, lambda: self.mgmt.delete_users(f"{self.vhost}-"))
        self._stack.callback(retried, lambda: self.mgmt.delete_vhost(self.vhost))
        retried(lambda: self.mgmt.create_vhost(self.vhost))
        wait_for(
            functools.partial(vhost_up, self.amqp), timeout=SETUP_TIMEOUT_S,
            what=f"the broker to open connections to vhost {self.vhost}", interval=1,
        )  # fmt: skip
        argv = [
            command("controller-svc"), "serve",
            "--listen", str(self.api),
            "--gateway-listen", str(self.gateway_port),
            "--data-dir", str(self.data_dir),
            "--amqp", self.amqp,
            "--trust-root", str(self.keys.root_json),
            "--no-self-upgrade",
            "--http", "off",
            "--broker-user-prefix", f"{self.vhost}-",
        ]  # fmt: skip
        if self.db == "postgresql":
            url, drop = create_pg_database()
            self._stack.callback(drop)
            argv += ["--db", url]
        self._stack.callback(self.procs.stop_all)
        self.proc = self.procs.start("controller", argv)
        token_file = self.data_dir / "admin.token"
        wait_for(
            lambda: token_file.exists() and token_file.read_text().strip(),
            timeout=60, what="the controller's first admin token", interval=0.1,
            describe=self.procs.dump_logs,
        )  # fmt: skip
        self.token = token_file.read_text().strip()
        self._channel = grpc.secure_channel(
            str(self.api), grpc.ssl_channel_credentials(self.ca_cert.read_bytes())
        )
        self._stack.callback(self._channel.close)
        self.stub = controller_pb2_grpc.ControllerStub(
            grpc.intercept_channel(self._channel, bearer(self.token))
        )
        wait_for(self._answers, timeout=60, what="the controller to answer", interval=0.2,
                 describe=self.procs.dump_logs)  # fmt: skip
        return self

    def close(self) -> None:
        self._stack.close()

    def _answers(self) -> bool:
        try:
            self.stub.ListReleases(controller_pb2.ListReleasesRequest(), timeout=2)
        except grpc.RpcError:
            return False
        return True

    def cli(self, *args: str, timeout: float = SETUP_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """``upgradectl ARGS`` as this controller's admin; raises when it exits non-zero."""
        result = subprocess.run(
            [command("upgradectl"), *args], env={**os.environ, **self.env},
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(
                f"upgradectl {' '.join(args)} exited {result.returncode}: {result.stderr}"
            )
        return result

    def publish(self, artifact: Path) -> None:
        self.cli(
            "releases", "publish", "--version", NEW_VERSION, "--artifact", str(artifact),
            "--keys", str(self.keys.dir),
        )  # fmt: skip

    def enrollment_code(self, gateway_id: str) -> str:
        request = controller_pb2.CreateEnrollmentRequest(gateway_id=gateway_id)
        return str(self.stub.CreateEnrollment(request, timeout=CALL_TIMEOUT_S).code)

    def gateways(self) -> list[Any]:
        """Every gateway the controller knows (every page, when it pages)."""
        _, items = all_pages(
            self.stub.ListGateways, controller_pb2.ListGatewaysRequest(), "gateways"
        )
        return items

    def job(self, job_id: str = "") -> Any:
        """GetJob with every gateway of the job (every page, when it pages)."""
        first, items = all_pages(
            self.stub.GetJob, controller_pb2.GetJobRequest(job_id=job_id), "gateways"
        )
        del first.gateways[:]
        first.gateways.extend(items)
        return first

    def events(self, job_id: str) -> list[Any]:
        """Every event of a finished job, from seq 0 (a stream that ends early is resumed)."""
        events: list[Any] = []
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline:
            after = events[-1].seq if events else 0
            request = controller_pb2.WatchJobRequest(job_id=job_id, after_seq=after)
            try:
                for event in self.stub.WatchJob(request, timeout=JOB_TIMEOUT_S):
                    events.append(event)
                return events
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
        raise RuntimeError(f"the events of job {job_id} did not come within {JOB_TIMEOUT_S}s")

    def wait_finished(self, job_id: str, timeout: float = JOB_TIMEOUT_S) -> Any:
        return wait_for(
            lambda: (job if job_state(job := self.job(job_id)) in TERMINAL else None),
            timeout=timeout, what=f"job {job_id} to finish", interval=0.2,
            describe=lambda: _job_summary(self.job(job_id)),
        )  # fmt: skip


def all_pages(call: Any, request: Any, field: str) -> tuple[Any, list[Any]]:
    """Call ``call`` and, while the answer carries a ``next_page_token`` and the request
    takes a ``page_token`` (AIP-158), the next pages: the first answer and the items of
    ``field`` over all pages. A controller that does not page answers once."""
    first = None
    items: list[Any] = []
    takes_token = "page_token" in request.DESCRIPTOR.fields_by_name
    while True:
        answer = call(request, timeout=CALL_TIMEOUT_S)
        first = first or answer
        items.extend(getattr(answer, field))
        token = (
            answer.next_page_token if "next_page_token" in answer.DESCRIPTOR.fields_by_name else ""
        )
        if not token or not takes_token:
            return first, items
        following = type(request)()
        following.CopyFrom(request)
        following.page_token = token
        request = following


def job_state(job: Any) -> str:
    return str(common_pb2.JobState.Name(job.state)).removeprefix("JOB_STATE_")


def gateway_state(value: int) -> str:
    return str(common_pb2.GatewayJobState.Name(value)).removeprefix("GATEWAY_JOB_STATE_")


def _job_summary(job: Any) -> str:
    counts: dict[str, int] = {}
    for g in job.gateways:
        counts[gateway_state(g.state)] = counts.get(gateway_state(g.state), 0) + 1
    return f"job {job.job_id} {job_state(job)}, gateways {counts}"


# The upgrade, through the real CLI ---------------------------------------------------------


@dataclass(frozen=True)
class UpgradeCall:
    """One ``upgradectl upgrade --latest --wait`` as the bench saw it (wall-clock seconds)."""

    started: float
    ended: float
    exit_code: int
    job_id: str
    cli_state: str  # the job's state in the CLI's JSON ("" when it printed none)
    stderr: str


def run_upgrade(ctl: Controller) -> UpgradeCall:
    """Run the real CLI's ``upgrade --latest --wait --yes --json`` to its end. A CLI that
    gives up (the job goes on in the controller) is recorded, not an error: the job is then
    the controller's most recent one."""
    argv = [command("upgradectl"), "upgrade", "--latest", "--wait", "--yes", "--json"]
    started = time.time()
    result = subprocess.run(
        argv, env={**os.environ, **ctl.env}, capture_output=True, text=True,
        timeout=JOB_TIMEOUT_S,
    )  # fmt: skip
    ended = time.time()
    shown: dict[str, Any] = {}
    with contextlib.suppress(ValueError):
        shown = json.loads(result.stdout)
    job_id = str(shown.get("job_id") or "")
    if not job_id:
        try:
            job_id = ctl.job("").job_id
        except grpc.RpcError as exc:
            raise RuntimeError(
                f"upgradectl upgrade exited {result.returncode} and no job exists: "
                f"{result.stderr.strip()}"
            ) from exc
    return UpgradeCall(
        started, ended, result.returncode, job_id, str(shown.get("state") or ""),
        result.stderr.strip()[-2000:],
    )  # fmt: skip


def first_times(events: Sequence[Any]) -> dict[str, dict[str, float]]:
    """gateway id -> gateway state -> the time of its first event in that state."""
    seen: dict[str, dict[str, float]] = {}
    for event in events:
        if event.gateway_id and event.gateway_state:
            state = gateway_state(event.gateway_state)
            seen.setdefault(event.gateway_id, {}).setdefault(state, _stamp(event.at))
    return seen


def phase_medians(seen: dict[str, dict[str, float]], created: float) -> dict[str, Any]:
    """Median and max seconds of each of ``PHASES`` over the gateways that passed through
    both of its ends (queued starts at the job's creation)."""
    out: dict[str, Any] = {}
    for name, begin, end in PHASES:
        values = [
            times[end] - (times[begin] if begin else created)
            for times in seen.values()
            if end in times and (begin is None or begin in times)
        ]
        out[name] = {
            "median_s": rounded(median(values), 3),
            "max_s": rounded(max(values, default=None), 3) if values else None,
            "gateways": len(values),
        }
    return out


# Part 1: real gateways -------------------------------------------------------------------


def online_on(ctl: Controller, version: str) -> set[str]:
    return {g.id for g in ctl.gateways() if g.state == "ONLINE" and g.version == version}


def _all_online(ctl: Controller, ids: Sequence[str]) -> bool:
    return set(ids) <= online_on(ctl, FLEET_VERSION)


def part_real(
    ctl: Controller, artifact: Path, n: int, handoff_timeout_s: float | None = None
) -> dict[str, Any]:
    """Start ``n`` real gateways enrolled at ``ctl``, upgrade them all with the real CLI,
    and measure (module docstring, Part 1)."""
    ctl.publish(artifact)
    ids = [f"gw-{i:04d}" for i in range(n)]
    print(f"  starting {n} gateway processes ({START_BATCH} at a time) ...", flush=True)
    for first in range(0, n, START_BATCH):
        batch = ids[first : first + START_BATCH]
        for gid in batch:
            # The code in the environment, not on the command line where ps shows it.
            ctl.procs.start(
                gid,
                [
                    command("gateway-daemon"), "run",
                    "--id", gid,
                    "--controller", str(ctl.api),
                    "--amqp", ctl.amqp,
                    "--state-dir", str(ctl.work / "gateways" / gid),
                    "--listen", f"127.0.0.1:{free_port()}",
                    "--ca-cert", str(ctl.ca_cert),
                    *(
                        ("--handoff-timeout", str(handoff_timeout_s))
                        if handoff_timeout_s is not None else ()
                    ),
                ],
                env={ENV_ENROLL_CODE: ctl.enrollment_code(gid)},
            )  # fmt: skip
        wait_for(
            functools.partial(_all_online, ctl, batch),
            timeout=SETUP_TIMEOUT_S, what=f"gateways {batch[0]}..{batch[-1]} online",
            interval=0.5, describe=lambda: ctl.procs.dump_logs()[-6000:],
        )  # fmt: skip
    pgid = ctl.pgid
    cpu0 = group_cpu_seconds(pgid)
    print(f"  upgrade --latest --wait of {n} gateways ...", flush=True)
    with Sampler(lambda: group_rss_bytes(pgid)) as rss:
        call = run_upgrade(ctl)
        job = ctl.wait_finished(call.job_id)
    cpu = group_cpu_seconds(pgid) - cpu0
    events = ctl.events(call.job_id)
    seen = first_times(events)
    verified = {
        e.gateway_id: e.bytes_done
        for e in events
        if e.gateway_id and e.gateway_state and gateway_state(e.gateway_state) == "VERIFYING"
    }
    succeeded = [t["SUCCEEDED"] for t in seen.values() if "SUCCEEDED" in t]
    last = max(succeeded, default=None)
    return {
        "real_gateways": n,
        "real_job_state": job_state(job),
        "real_succeeded": len(succeeded),
        "real_seconds": rounded(last - call.started if last else None),
        "real_cli_seconds": round(call.ended - call.started, 2),
        "real_cli_exit": call.exit_code,
        "real_cli_error": call.stderr if call.exit_code else "",
        "real_phases": phase_medians(seen, _stamp(job.created_at)),
        "controller_cpu_s": round(cpu, 2),
        "controller_rss_mb": round(rss.peak / 1e6, 1),
        # What each gateway had downloaded when it reported VERIFYING.
        "bytes_served": sum(verified.values()),
        "bytes_needed": artifact.stat().st_size * n,
    }


def real_handoff_timeout(starts_s: float) -> float:
    """The real gateways' ready deadline (``--handoff-timeout``), in seconds: the gateway's
    own (``Deadlines.ready_s``, for one new version starting on its own gateway) plus
    twice what the floor's ``starts_s`` took: here every gateway's new version starts at
    once on this machine's few cores, which no real gateway has to share."""
    return float(math.ceil(Deadlines.ready_s + 2 * starts_s))


def floor(artifact: Path, n: int, stream: dict[str, Any]) -> dict[str, Any]:
    """The floor of Part 1 (module docstring): the fleet's bytes at the raw TCP rate
    measured with the same concurrency, plus ``n`` interpreter starts at once."""
    tcp_s = artifact.stat().st_size * n / (stream["raw_tcp_mbps"] * 1e6)
    starts_s = interpreter_starts(artifact, n)
    return {
        "floor_seconds": round(tcp_s + starts_s, 2),
        "floor_tcp_seconds": round(tcp_s, 2),
        "floor_starts_seconds": round(starts_s, 2),
    }


# Part 2: simulated gateways --------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    method: str
    start: float  # wall clock
    end: float
    error: str


class CallLoop:
    """ListGateways and GetJob (the most recent job) back to back, every page, on a thread
    of its own; remembers when a GetJob first showed that job finished, and when it first
    showed every gateway of ``unsampled`` SUCCEEDED."""

    def __init__(self, ctl: Controller, unsampled: Sequence[str]) -> None:
        self.calls: list[Call] = []
        self.finished_seen: float | None = None
        self.unsampled_seen: float | None = None
        self._unsampled = frozenset(unsampled)
        self.last_state = ""
        self._ctl = ctl
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-calls", daemon=True)

    def __enter__(self) -> CallLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(CALL_TIMEOUT_S * 2)

    def _run(self) -> None:
        methods: tuple[tuple[str, Callable[[], Any]], ...] = (
            ("ListGateways", self._ctl.gateways),
            ("GetJob", self._ctl.job),
        )
        while not self._stop.is_set():
            for method, call in methods:
                start, error, answer = time.time(), "", None
                try:
                    answer = call()
                except grpc.RpcError as exc:
                    error = exc.code().name
                end = time.time()
                self.calls.append(Call(method, start, end, error))
                if method == "GetJob" and answer is not None:
                    self.last_state = job_state(answer)
                    if self.finished_seen is None and self.last_state in TERMINAL:
                        self.finished_seen = end
                    if self.unsampled_seen is None and self._unsampled <= {
                        g.gateway_id
                        for g in answer.gateways
                        if gateway_state(g.state) == "SUCCEEDED"
                    }:
                        self.unsampled_seen = end


class QueueDepth:
    """The ready messages in one queue (a passive declare's message count: exact, unlike
    the management API's periodic statistics), on the connection of the thread that
    probes."""

    def __init__(self, amqp: str, queue: str) -> None:
        self._amqp = amqp
        self._queue = queue
        self._connection: Any = None
        self._channel: Any = None

    def probe(self) -> int:
        import pika

        if self._channel is None:
            self._connection = pika.BlockingConnection(pika.URLParameters(self._amqp))
            self._channel = self._connection.channel()
        count: int = self._channel.queue_declare(self._queue, passive=True).method.message_count
        return count

    def close(self) -> None:
        if self._connection is not None and self._connection.is_open:
            with contextlib.suppress(Exception):
                self._connection.close()


def split(items: Sequence[str], parts: int) -> list[list[str]]:
    parts = max(1, min(parts, len(items)))
    return [list(items[i::parts]) for i in range(parts)]


def part_simulated(
    ctl: Controller, artifact: Path, m: int, sample: int, processes: int
) -> dict[str, Any]:
    """``m`` simulated gateways (``bench/fleet_sim.py``) upgraded at ``ctl`` with the real
    CLI, measured as the module docstring says (Part 2)."""
    ctl.publish(artifact)
    ids = [f"sim-{i:05d}" for i in range(m)]
    sampled = ids[:: max(1, m // sample)][:sample] if sample else []
    identities = ctl.work / "sim-identities"
    ca_pem = ctl.ca_cert.read_bytes()
    for gid in sampled:
        identity.enroll(identities / gid, gid, ctl.api, ca_pem, ctl.enrollment_code(gid))
    print(f"  starting {m} simulated gateways in {processes} processes ...", flush=True)
    sims: list[tuple[Proc, Path, Path]] = []
    for k, chunk in enumerate(split(ids, processes)):
        out, ready = ctl.work / f"sim-{k}.json", ctl.work / f"sim-{k}.ready"
        proc = ctl.procs.start(
            f"sim-{k}",
            [
                sys.executable, str(SIM),
                "--amqp", ctl.amqp,
                "--ids", ",".join(chunk),
                "--version", FLEET_VERSION,
                "--out", str(out),
                "--ready", str(ready),
                "--sample", ",".join(g for g in sampled if g in chunk),
                "--identities", str(identities),
                "--controller", str(ctl.api),
            ],
        )  # fmt: skip
        sims.append((proc, out, ready))

    def sims_ready() -> bool:
        for proc, _, _ in sims:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited {proc.popen.returncode}: {proc.log()}")
        return all(ready.exists() for _, _, ready in sims)

    wait_for(sims_ready, timeout=SETUP_TIMEOUT_S, what="the simulated gateways to serve",
             interval=0.2, describe=lambda: ctl.procs.dump_logs()[-4000:])  # fmt: skip
    wanted = set(ids)
    wait_for(
        lambda: wanted <= online_on(ctl, FLEET_VERSION), timeout=SETUP_TIMEOUT_S,
        what=f"{m} simulated gateways online at the controller", interval=0.5,
        describe=lambda: f"{len(wanted & online_on(ctl, FLEET_VERSION))} of {m} online",
    )  # fmt: skip
    pgid = ctl.pgid
    depth = QueueDepth(ctl.amqp, "hitless.controller.reports")
    cpu0 = group_cpu_seconds(pgid)
    print(f"  upgrade --latest --wait of {m} simulated gateways ...", flush=True)
    try:
        with (
            CallLoop(ctl, [g for g in ids if g not in sampled]) as loop,
            Sampler(lambda: group_rss_bytes(pgid)) as rss,
            Sampler(depth.probe) as backlog,
        ):
            call = run_upgrade(ctl)
            wait_for(lambda: loop.finished_seen, timeout=JOB_TIMEOUT_S,
                     what=f"job {call.job_id} to finish", interval=0.1,
                     describe=lambda: loop.last_state)  # fmt: skip
    finally:
        depth.close()
    cpu = group_cpu_seconds(pgid) - cpu0
    cli_saw_end = call.cli_state in TERMINAL
    assert loop.finished_seen is not None
    finished = min(loop.finished_seen, call.ended) if cli_saw_end else loop.finished_seen
    job = ctl.job(call.job_id)
    events = ctl.events(call.job_id)
    # A gateway whose command never came writes its summary only when stopped.
    with contextlib.suppress(AssertionError):
        wait_for(lambda: all(out.exists() for _, out, _ in sims), timeout=60,
                 what="every simulated gateway to finish its reports", interval=0.2)  # fmt: skip
    for proc, _, _ in sims:
        ctl.procs.stop(proc)  # SIGTERM: each writes its summary once more, then exits
    summaries = [json.loads(out.read_text()) for _, out, _ in sims if out.exists()]
    return summarize_simulated(
        m, call, job, events, finished, summaries, loop, set(sampled), cpu, rss.peak,
        backlog.peak,
    )  # fmt: skip


def summarize_simulated(
    m: int, call: UpgradeCall, job: Any, events: Sequence[Any], finished: float,
    summaries: Sequence[dict[str, Any]], loop: CallLoop, sampled: set[str], cpu: float,
    rss: int, backlog: int,
) -> dict[str, Any]:  # fmt: skip
    seen = {gid: times for s in summaries for gid, times in s["seen"].items()}
    arrivals = [t["command"] for t in seen.values() if "command" in t]
    reports = [t[state] for t in seen.values() for state in t if state != "command"]
    last_report = max(reports, default=None)
    created = _stamp(job.created_at)
    running = [
        _stamp(e.at)
        for e in events
        if not e.gateway_id and job_state_name(e.job_state) == "RUNNING"
    ]
    during = [c for c in loop.calls if c.start >= call.started and c.end <= finished]
    # Ingestion: the reports of the gateways that do not download (a sample's downloads
    # would measure the stream), up to the first GetJob showing them all SUCCEEDED.
    unsampled = [
        t[state] for gid, t in seen.items() if gid not in sampled for state in t
        if state != "command"
    ]  # fmt: skip
    applied = loop.unsampled_seen or finished
    first_unsampled = min(unsampled, default=None)
    api: dict[str, Any] = {}
    for method in ("ListGateways", "GetJob"):
        ms = [(c.end - c.start) * 1000 for c in during if c.method == method and not c.error]
        failed = [c.error for c in during if c.method == method and c.error]
        api[method] = {
            "calls": len(ms),
            # GetJob of the latest job is NOT_FOUND until StartUpgrade has recorded it.
            "not_found": failed.count("NOT_FOUND"),
            "errors": len(failed) - failed.count("NOT_FOUND"),
            "p50_ms": rounded(percentile(ms, 50), 1),
            "p99_ms": rounded(percentile(ms, 99), 1),
        }
    # The slowest calls, and when each began (seconds from the upgrade call): where in the
    # job the p99 comes from.
    slowest = sorted((c for c in during if not c.error), key=lambda c: c.start - c.end)[:8]
    p99s = [v["p99_ms"] for v in api.values() if v["p99_ms"] is not None]
    downloads = [d for s in summaries for d in s["downloads"]]
    good = [d for d in downloads if not d["error"]]
    counts: dict[str, int] = {}
    for g in job.gateways:
        counts[gateway_state(g.state)] = counts.get(gateway_state(g.state), 0) + 1
    return {
        "simulated_gateways": m,
        "simulated_job_state": job_state(job),
        "simulated_gateway_states": counts,
        "simulated_seconds": round(finished - call.started, 2),
        "simulated_cli_seconds": round(call.ended - call.started, 2),
        "simulated_cli_exit": call.exit_code,
        "simulated_cli_error": call.stderr if call.exit_code else "",
        "start_call_to_created_s": round(created - call.started, 3),
        "dispatch_s": rounded(max(arrivals) - created if arrivals else None, 3),
        "first_command_s": rounded(min(arrivals) - created if arrivals else None, 3),
        "running_event_s": rounded(min(running) - created if running else None, 3),
        "commands_received": len(arrivals),
        "reports_sent": len(reports),
        "reports_per_s": (
            round(len(unsampled) / (applied - first_unsampled), 1)
            if first_unsampled is not None and applied > first_unsampled
            else None
        ),
        "reports_send_s": rounded(
            max(unsampled) - first_unsampled if first_unsampled is not None else None, 3
        ),
        "reports_per_s_window_s": rounded(
            applied - first_unsampled if first_unsampled is not None else None, 3
        ),
        "report_lag_s": rounded(finished - last_report if last_report else None, 3),
        "reports_backlog_peak": backlog,
        "events": len(events),
        "api": api,
        "api_p99_ms": max(p99s, default=None),
        "api_slowest": [
            {
                "method": c.method,
                "ms": round((c.end - c.start) * 1000, 1),
                "at_s": round(c.start - call.started, 2),
            }
            for c in slowest
        ],
        "sample_downloads": len(downloads),
        "sample_download_errors": [d["error"] for d in downloads if d["error"]][:5],
        "sample_download_s_median": rounded(median([d["seconds"] for d in good]), 3),
        "heartbeats_sent": sum(s["heartbeats"] for s in summaries),
        "sim_failures": sum(s["failure_count"] for s in summaries),
        "sim_failure_examples": [f for s in summaries for f in s["failures"]][:5],
        "duplicate_commands": sum(s["duplicate_commands"] for s in summaries),
        "prechecks_answered": sum(s.get("prechecks_answered", 0) for s in summaries),
        "sim_controller_cpu_s": round(cpu, 2),
        "sim_controller_rss_mb": round(rss / 1e6, 1),
    }


def job_state_name(value: int) -> str:
    return str(common_pb2.JobState.Name(value)).removeprefix("JOB_STATE_") if value else ""


# Output ----------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per measure, one column per database, the target beside it."""

    def phase(name: str) -> Callable[[dict[str, Any]], Any]:
        return lambda r: (r.get("real_phases") or {}).get(name, {}).get("median_s")

    def api(method: str, key: str) -> Callable[[dict[str, Any]], Any]:
        return lambda r: (r.get("api") or {}).get(method, {}).get(key)

    def ratio(r: dict[str, Any]) -> Any:
        return r.get("real_floor_ratio")

    def key(name: str) -> Callable[[dict[str, Any]], Any]:
        return lambda r: r.get(name)

    def cli(prefix: str) -> Callable[[dict[str, Any]], Any]:
        def shown(r: dict[str, Any]) -> Any:
            if r.get(f"{prefix}_cli_seconds") is None:
                return None
            return f"{_fmt(r[f'{prefix}_cli_seconds'])} (exit {r[f'{prefix}_cli_exit']})"

        return shown

    measures: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
        ("artifact bytes", key("artifact_bytes"), ""),
        ("stream / raw TCP MB/s", lambda r: (
            f"{_fmt(r.get('stream_mbps'))} / {_fmt(r.get('raw_tcp_mbps'))}"), ""),
        ("stream ratio", key("stream_ratio"), TARGETS["stream_ratio"]),
        ("  bare grpcio, same TLS: MB/s (ratio)", lambda r: (
            f"{_fmt(r.get('bare_grpc_tls_mbps'))} ({_fmt(r.get('bare_grpc_tls_ratio'))})"), ""),
        ("CLI start-up ms (--help, median)", key("cli_start_ms"), ""),
        ("Part 1: real gateways", key("real_gateways"), ""),
        ("  job state (succeeded)", lambda r: (
            f"{r['real_job_state']} ({r['real_succeeded']})" if "real_job_state" in r else None),
         ""),
        ("  call -> last SUCCEEDED s", key("real_seconds"), ""),
        ("  CLI exited after s", cli("real"), ""),
        ("  floor s (TCP + starts)", lambda r: (
            f"{_fmt(r['floor_seconds'])} ({_fmt(r['floor_tcp_seconds'])} + "
            f"{_fmt(r['floor_starts_seconds'])})" if "floor_seconds" in r else None), ""),
        ("  real / floor", ratio, TARGETS["real_floor_ratio"]),
        ("  gateways' ready deadline s", key("real_handoff_timeout_s"), ""),
        ("  median queued -> downloading s", phase("queued_to_downloading"), ""),
        ("  median download s", phase("download"), ""),
        ("  median verify s", phase("verify"), ""),
        ("  median swap s", phase("swap"), ""),
        ("  controller CPU s / peak RSS MB", lambda r: (
            f"{_fmt(r['controller_cpu_s'])} / {_fmt(r['controller_rss_mb'])}"
            if "controller_cpu_s" in r else None), ""),
        ("  bytes served / needed MB", lambda r: (
            f"{r['bytes_served'] / 1e6:,.0f} / {r['bytes_needed'] / 1e6:,.0f}"
            if "bytes_served" in r else None), ""),
        ("Part 2: simulated gateways", key("simulated_gateways"), ""),
        ("  job state", key("simulated_job_state"), ""),
        ("  call -> job recorded finished s", key("simulated_seconds"),
         TARGETS["simulated_seconds"]),
        ("  CLI exited after s", cli("simulated"), ""),
        ("  dispatch: created -> last command s", key("dispatch_s"), ""),
        ("  reports sent / per s", lambda r: (
            f"{_fmt(r['reports_sent'])} / {_fmt(r['reports_per_s'])}"
            if "reports_sent" in r else None), ""),
        ("  report path alone: queued / per s", lambda r: (
            f"{_fmt(r['ingest_reports'])} / {_fmt(r['ingest_reports_per_s'])}"
            if r.get("ingest_reports") else None), TARGETS["ingest_reports_per_s"]),
        ("  reports: sending took / applied after s", lambda r: (
            f"{_fmt(r['reports_send_s'])} / {_fmt(r['reports_per_s_window_s'])}"
            if "reports_send_s" in r else None), ""),
        ("  report lag s / peak ready backlog", lambda r: (
            f"{_fmt(r['report_lag_s'])} / {_fmt(r['reports_backlog_peak'])}"
            if "report_lag_s" in r else None), ""),
        ("  ListGateways p50 / p99 ms", lambda r: (
            f"{_fmt(api('ListGateways', 'p50_ms')(r))} / {_fmt(api('ListGateways', 'p99_ms')(r))}"
            if "api" in r else None), ""),
        ("  GetJob p50 / p99 ms", lambda r: (
            f"{_fmt(api('GetJob', 'p50_ms')(r))} / {_fmt(api('GetJob', 'p99_ms')(r))}"
            if "api" in r else None), ""),
        ("  API p99 ms", key("api_p99_ms"), TARGETS["api_p99_ms"]),
        ("  sample downloads (median s)", lambda r: (
            f"{r['sample_downloads']} ({_fmt(r['sample_download_s_median'])})"
            if "sample_downloads" in r else None), ""),
        ("  controller CPU s / peak RSS MB", lambda r: (
            f"{_fmt(r['sim_controller_cpu_s'])} / {_fmt(r['sim_controller_rss_mb'])}"
            if "sim_controller_cpu_s" in r else None), ""),
    ]  # fmt: skip
    header = ["", *(r["db"] for r in rows), "target"]
    lines = [[name, *(_fmt(get(r)) for r in rows), target] for name, get, target in measures]
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [header, *lines]
    )


def _load() -> str:
    """The 1, 5 and 15 minute load averages: the machine is shared with other runs."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# Running it ------------------------------------------------------------------------------


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def _shielded() -> Iterator[None]:
    """Let the cleanup (itself bounded) run to its end: Ctrl-C, SIGTERM and the bench's
    deadline are held off until it is done."""
    signal.alarm(0)
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def running_controller(work: Path, db: str, mgmt: Management) -> Iterator[Controller]:
    """A started controller, closed (with all it started) however the block ends."""
    ctl = Controller(work, db, mgmt)
    try:
        ctl.start()
        yield ctl
    finally:
        with _shielded():
            ctl.close()


def run(args: argparse.Namespace, work: Path, mgmt: Management) -> dict[str, Any]:
    dbs = list(DBS) if args.db == "both" else [args.db]
    real_db = args.real_db if args.real_db in dbs else dbs[0]
    print("CLI start-up, the release, the stream floor ...", flush=True)
    cli_ms = round(cli_start_ms(), 1)
    artifact = padded_release(work, args.artifact_bytes)
    concurrency = args.real or args.sample or 1
    stream = stream_numbers(artifact, concurrency)
    print(
        f"  {concurrency} downloads at once: stream {stream.get('stream_mbps')} MB/s, "
        f"raw TCP {stream.get('raw_tcp_mbps')} MB/s ({stream['source']})",
        flush=True,
    )
    common = {
        "artifact_bytes": artifact.stat().st_size,
        "stream_mbps": rounded(stream.get("stream_mbps"), 1),
        "raw_tcp_mbps": rounded(stream.get("raw_tcp_mbps"), 1),
        "stream_ratio": rounded(stream.get("stream_ratio"), 3),
        # Bare grpcio with the same TLS, no admission limit (bench/support/bare_stream.py).
        "bare_grpc_tls_mbps": rounded(stream.get("bare_grpc_tls_mbps"), 1),
        "bare_grpc_tls_ratio": rounded(stream.get("bare_grpc_tls_ratio"), 3),
        "stream_concurrency": concurrency,
        "cli_start_ms": cli_ms,
    }
    rows = []
    for db in dbs:
        row: dict[str, Any] = {"db": db, **common}
        if args.real and db == real_db:
            print(f"  the floor: {args.real} interpreter starts at once ...", flush=True)
            row.update(floor(artifact, args.real, stream))
            handoff_timeout = args.handoff_timeout or real_handoff_timeout(
                row["floor_starts_seconds"]
            )
            row["real_handoff_timeout_s"] = handoff_timeout
            print(
                f"Part 1 on {db}: {args.real} real gateways (ready deadline "
                f"{handoff_timeout:g} s) ...",
                flush=True,
            )
            with running_controller(work / f"real-{db}", db, mgmt) as ctl:
                row.update(part_real(ctl, artifact, args.real, handoff_timeout))
            if row.get("real_seconds") and row["floor_seconds"]:
                row["real_floor_ratio"] = round(row["real_seconds"] / row["floor_seconds"], 2)
        if args.simulated:
            print(f"Part 2 on {db}: {args.simulated} simulated gateways ...", flush=True)
            with running_controller(work / f"sim-{db}", db, mgmt) as ctl:
                row.update(
                    part_simulated(ctl, artifact, args.simulated, args.sample, args.sim_processes)
                )
            print(f"  the report path alone on {db} ...", flush=True)
            row.update(ingest_capacity(work, db, args.simulated))
        rows.append(row)
    return {
        "rows": rows,
        "stream": stream,
        "cpus": os.cpu_count(),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def ingest_capacity(work: Path, db: str, gateways: int) -> dict[str, Any]:
    """The controller's report path alone on ``db``: ``bench/controller_reporters.py``
    (its own vhost and database) with ``INGEST_REPORTS_PER_GATEWAY`` status reports per
    gateway of one job waiting in the reports queue. Returns ``ingest_reports`` and
    ``ingest_reports_per_s`` (None when that run broke: its output is printed)."""
    count = INGEST_REPORTS_PER_GATEWAY * gateways
    results = work / f"reporters-{db}.json"
    argv = [
        sys.executable, str(ROOT / "bench" / "controller_reporters.py"),
        "--db", db, "--gateways", str(gateways), "--reports", str(count),
        "--results", str(results),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=SETUP_TIMEOUT_S)
    if done.returncode != 0 or not results.exists():
        print(f"  the report path alone broke (exit {done.returncode}):\n{done.stdout}"
              f"{done.stderr}", flush=True)  # fmt: skip
        return {"ingest_reports": count, "ingest_reports_per_s": None}
    run = json.loads(results.read_text())["runs"][0]
    return {"ingest_reports": count, "ingest_reports_per_s": run["reports_per_s"]}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench/fleet.py", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--real",
        type=int,
        default=100,
        metavar="N",
        help="real gateway processes in Part 1 (0: skip it; default 100)",
    )
    parser.add_argument(
        "--simulated",
        type=int,
        default=1000,
        metavar="M",
        help="simulated gateways in Part 2 (0: skip it; default 1000)",
    )
    parser.add_argument(
        "--db",
        choices=(*DBS, "both"),
        default="both",
        help="the controller's database in Part 2 (default both)",
    )
    parser.add_argument(
        "--real-db",
        choices=DBS,
        default="sqlite",
        help="the database Part 1 runs on (default sqlite)",
    )
    parser.add_argument(
        "--sample",
        type=int,
        default=20,
        metavar="K",
        help="simulated gateways that really download (default 20)",
    )
    parser.add_argument(
        "--sim-processes",
        type=int,
        default=4,
        metavar="P",
        help="processes the simulated gateways run in (default 4)",
    )
    parser.add_argument(
        "--handoff-timeout",
        type=float,
        metavar="S",
        help="the real gateways' --handoff-timeout (default: the gateway's own, "
        f"{Deadlines.ready_s:g} s, plus twice the floor's N interpreter starts): N new "
        "versions starting at once on this machine's cores take longer to say ready than "
        "one does on its own gateway",
    )
    parser.add_argument(
        "--artifact-bytes",
        type=int,
        default=ARTIFACT_BYTES,
        metavar="B",
        help=f"the padded release's size (default {ARTIFACT_BYTES})",
    )
    return parser


def _warn_file_handles(mgmt: Management, simulated: int) -> None:
    """Say so when the broker's open-files limit looks too small for ``simulated`` more
    classic queues. RabbitMQ's file handle cache allows about ``fd_total`` - 100 handles
    and counts some for every classic queue; past it, new vhosts and queues wait for
    handles that idle queues never give back, and the broker stops creating vhosts."""
    with contextlib.suppress(Exception):  # only a warning: the bench goes on without it
        node = mgmt.request("GET", "/nodes")[0]
        queues = mgmt.request("GET", "/overview")["object_totals"]["queues"]
        if (queues + simulated) * HANDLES_PER_QUEUE > node["fd_total"]:
            print(
                f"bench-fleet: warning: RabbitMQ may open {node['fd_total']} files and holds "
                f"{queues} queues; {simulated} more gateway queues may exhaust its file "
                "handles (raise its limit: ulimit -n 65536, or LimitNOFILE= in its unit)",
                file=sys.stderr,
            )


def main() -> int:
    args = _parser().parse_args()
    logs.configure("bench-fleet", json=False, level="WARNING")
    mgmt = Management()
    if not mgmt.available():
        print("bench-fleet: needs RabbitMQ with the management API on 127.0.0.1:15672",
              file=sys.stderr)  # fmt: skip
        return EXIT_NO_SERVICE
    if args.db != "sqlite" and (args.simulated or args.real_db == "postgresql"):
        try:
            _, drop = create_pg_database()
            drop()
        except Exception as exc:
            print(f"bench-fleet: needs PostgreSQL on 127.0.0.1:5432 (user postgres): {exc}",
                  file=sys.stderr)  # fmt: skip
            return EXIT_NO_SERVICE
    _warn_file_handles(mgmt, args.simulated)
    previous = [(sig, signal.signal(sig, _interrupt)) for sig in (signal.SIGTERM, signal.SIGALRM)]
    signal.alarm(BENCH_DEADLINE_S)
    load_start = _load()
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="hitless-bench-fleet-") as tmp:
            result = run(args, Path(tmp), mgmt)
    except (Interrupted, KeyboardInterrupt) as exc:
        reason = f"deadline of {BENCH_DEADLINE_S}s" if str(exc) == "SIGALRM" else "interrupted"
        print(f"bench-fleet: stopped ({reason}); everything it started is stopped",
              file=sys.stderr)  # fmt: skip
        return EXIT_INTERRUPTED
    except Exception as exc:
        traceback.print_exc()
        print(f"bench-fleet: broken: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_BROKEN
    finally:
        signal.alarm(0)
        for sig, handler in previous:
            signal.signal(sig, handler)
    result.update(load_start=load_start, load_end=_load(),
                  took_s=round(time.monotonic() - started, 1))  # fmt: skip
    print(table(result["rows"]))
    print(f"load average {load_start} -> {result['load_end']}; bench took {result['took_s']} s")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
