"""``make bench-stream``: artifact download throughput over the controller's gRPC stream,
beside plain loopback TCP moving the same bytes with the same concurrency, in the same run.

The server is a real controller process (``controller-svc serve`` on SQLite, its own
broker vhost, ``--no-self-upgrade``) with one release published through its API: a zip
holding the version stamp and ``artifact_bytes`` of random bytes, stored uncompressed,
with targets metadata signed by the targets key (as ``bench/verify.py`` does).

Downloaders are worker processes (processes, so the GIL does not serialise them; started
from a fork server), each enrolled as a gateway of its own before anything is timed. A
round releases every worker from a barrier at once:

- gRPC: each worker runs ``gateway_daemon.download.download`` of the artifact to a new
  file, as a gateway's agent does in an upgrade: over the channel (``ControllerChannel``)
  its metadata update opened, here one ``FetchMetadata`` of timestamp.json before the
  barrier, so the connection and its TLS handshake (client certificate, gateway port) are
  not timed; then the stream, the file written;
- gRPC, new channel: the same download over a channel of its own, its TLS handshake timed
  (what every download cost before the channel was shared);
- bare gRPC, TLS and plaintext: the same bytes in the same chunks from a grpcio server
  that does nothing else (``bench/support/bare_stream.py``, a process of its own; raw
  ``bytes`` messages, no protobuf, no admission limit, nothing written), over a channel
  connected before the barrier, with the gateway port's TLS (client certificate) and
  without: grpcio in the product's configuration with none of the product's work, a
  reference point for the gRPC rounds (when it cannot start, the bench says so and runs
  without these rounds);
- raw TCP: each worker connects to a socket server in this process, which sends the same
  bytes with ``socket.sendfile`` (the kernel copies from the page cache; no TLS, no
  framing), and reads them with ``recv_into`` into one buffer, writing nothing. This is the
  floor: what the loopback interface moves with that many connections on these cores.

Throughput is all the bytes moved over the round's wall time (the first worker released
to the last one done), in MB/s (10^6 bytes per second). The kinds alternate, ``ROUNDS``
rounds each after one warm-up round of each; the median round is reported. The ratio is
gRPC over raw TCP. Both share this machine's cores with the other side: on a 2-core
machine client and server compete for the same CPUs. The controller's CPU time per round
(/proc) and each downloader's (``time.process_time``) are reported beside them.

``measure(artifact_bytes, concurrency)`` runs the whole thing for one concurrency and
returns ``stream_mbps``, ``raw_tcp_mbps`` and ``stream_ratio`` (for ``bench/fleet.py``)
with the details;
the main prints one table for 1, 8 and 32 downloaders and writes
bench/results/stream.json. Not a test: timing never decides pass or fail. Needs RabbitMQ
with its management API on 127.0.0.1 (a throwaway vhost, or the existing one ``--vhost``
names). Exit 0, or 1 when the bench itself broke, or 2 when there is no broker.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before bench/, whose hitless.py would shadow the package

from bench.support import bare_stream  # noqa: E402
from bench.verify import cpu_seconds, enroll, publish, stamped_zip  # noqa: E402
from gateway_daemon import identity  # noqa: E402
from gateway_daemon.download import ControllerChannel, download  # noqa: E402
from gateway_daemon.trust import ControllerSource  # noqa: E402
from hitless import logs  # noqa: E402
from hitless.config import HostPort  # noqa: E402
from hitless.digest import file_sha256  # noqa: E402
from hitless.trust import keys as trust_keys  # noqa: E402
from tests.support.procs import Procs, command, free_port  # noqa: E402
from tests.support.rabbit import Management, amqp_url  # noqa: E402
from tests.support.wait import wait_for  # noqa: E402
from upgradectl.client import ControllerClient  # noqa: E402
from upgradectl.credentials import Credentials  # noqa: E402
from upgradectl.errors import CliError  # noqa: E402

ARTIFACT_BYTES = 20 * 1024 * 1024
CONCURRENCY = (1, 8, 32)
ROUNDS = 3
VERSION = "2.0.0"
BARRIER_TIMEOUT_S = 60.0
ROUND_TIMEOUT_S = 300.0
RECV_BUFFER = 1 << 20
RESULTS = ROOT / "bench" / "results" / "stream.json"
EXIT_OK, EXIT_BROKEN, EXIT_NO_BROKER = 0, 1, 2
GRPC, GRPC_NEW_CHANNEL, TCP = "grpc", "grpc-new-channel", "tcp"
BARE_TLS, BARE_PLAIN = "bare-grpc-tls", "bare-grpc-plain"
KINDS = (GRPC, GRPC_NEW_CHANNEL, BARE_TLS, BARE_PLAIN, TCP)


# Raw TCP ---------------------------------------------------------------------------------


class RawServer:
    """A loopback TCP server that sends the file ``path`` to each connection with
    ``socket.sendfile`` and closes it; a thread per connection. ``close`` stops it."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.port: int = self._listener.getsockname()[1]
        self._accepting = threading.Thread(target=self._accept, name="raw-accept", daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._send, args=(conn,), daemon=True).start()

    def _send(self, conn: socket.socket) -> None:
        with conn, self._path.open("rb") as f:
            conn.sendfile(f)

    def close(self) -> None:
        self._listener.close()


def receive_all(port: int, size: int) -> int:
    """Read everything the raw server at ``port`` sends; raises when it is not ``size``."""
    buffer = memoryview(bytearray(RECV_BUFFER))
    got = 0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        while n := sock.recv_into(buffer):
            got += n
    if got != size:
        raise RuntimeError(f"the raw server sent {got} bytes, not {size}")
    return got


# Worker processes ------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    kind: str
    identity_dir: str
    controller: str  # the gateway port
    raw_port: int
    bare_tls_port: int
    bare_plain_port: int
    sha256: str
    size: int
    dest: str


@dataclass(frozen=True)
class Outcome:
    started: float  # time.monotonic() when released from the barrier (one clock per host)
    ended: float
    cpu_s: float  # the worker's CPU time for the transfer, all its threads
    error: str


def worker(barrier: Barrier, tasks: Any, results: Any) -> None:
    """One downloader process: for each task, prepare, wait at ``barrier``, move the bytes
    once and put an Outcome in ``results``; stop at None."""
    logs.configure("bench-stream-gateway", json=True, level="CRITICAL")
    while (task := tasks.get()) is not None:
        error = ""
        dest = Path(task.dest)
        channel: ControllerChannel | None = None
        bare: grpc.Channel | None = None
        try:
            enrolled = identity.load(Path(task.identity_dir))
            if enrolled is None:
                raise RuntimeError(f"no gateway identity in {task.identity_dir}")
            credentials = enrolled.channel_credentials()
            controller = HostPort.parse(task.controller)
            dest.unlink(missing_ok=True)
            if task.kind == GRPC:
                # As in an upgrade: the metadata update opened the channel the download uses.
                channel = ControllerChannel(controller, credentials)
                ControllerSource(controller, credentials, channel).fetch_metadata("timestamp.json")
            elif task.kind in (BARE_TLS, BARE_PLAIN):
                bare = _bare_channel(task, credentials)
                grpc.channel_ready_future(bare).result(timeout=BARRIER_TIMEOUT_S)
        except Exception as exc:  # reported with the outcome; the barrier still needs us
            error = f"prepare: {type(exc).__name__}: {exc}"
        barrier.wait(BARRIER_TIMEOUT_S)
        started, cpu = time.monotonic(), time.process_time()
        if not error:
            try:
                if task.kind == GRPC:
                    download(controller, task.sha256, task.size, dest, channel=channel)
                elif task.kind == GRPC_NEW_CHANNEL:
                    download(controller, task.sha256, task.size, dest, credentials=credentials)
                elif bare is not None:
                    if (got := bare_stream.fetch(bare)) != task.size:
                        raise RuntimeError(f"the bare server sent {got} bytes, not {task.size}")
                else:
                    receive_all(task.raw_port, task.size)
            except Exception as exc:  # counted per round
                error = f"{type(exc).__name__}: {exc}"
        ended, cpu = time.monotonic(), time.process_time() - cpu
        for opened in (channel, bare):
            if opened is not None:
                opened.close()
        dest.unlink(missing_ok=True)
        results.put(Outcome(started, ended, cpu, error))


def _bare_channel(task: Task, credentials: grpc.ChannelCredentials) -> grpc.Channel:
    if task.kind == BARE_PLAIN:
        return grpc.insecure_channel(f"127.0.0.1:{task.bare_plain_port}")
    # The gateway port's certificate names the controller's listen address, 127.0.0.1.
    return grpc.secure_channel(f"127.0.0.1:{task.bare_tls_port}", credentials)


@dataclass
class Downloaders:
    """``count`` worker processes, owned here: ``close`` stops them."""

    barrier: Barrier
    tasks: Any
    results: Any
    procs: list[Any] = field(default_factory=list)

    @classmethod
    def start(cls, count: int) -> Downloaders:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["gateway_daemon.download", "gateway_daemon.identity"])
        fleet = cls(ctx.Barrier(count), ctx.Queue(), ctx.Queue())
        for _ in range(count):
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


@dataclass
class Stand:
    """A running controller with the artifact published, gateways enrolled, and the raw
    TCP server sending the same file."""

    work: Path
    controller_pid: int
    bare_pid: int | None  # None: the bare server did not start, no bare rounds
    bare_ports: tuple[int, int] | None  # TLS, plaintext
    gateway: HostPort
    identities: list[Path]
    sha256: str
    size: int
    raw: RawServer

    def measure(self, concurrency: int, rounds: int = ROUNDS) -> dict[str, Any]:
        """Throughput of ``concurrency`` downloaders at once: gRPC over the channel the
        metadata update opened, gRPC over a new channel, the bare gRPC server with TLS and
        in plaintext (when it runs), and raw TCP, alternating, ``rounds`` rounds each after
        a warm-up round of each; medians (the bare ones None without the bare server)."""
        if concurrency > len(self.identities):
            raise ValueError(f"{concurrency} downloaders, but {len(self.identities)} enrolled")
        fleet = Downloaders.start(concurrency)
        bare = self.bare_pid is not None and self.bare_ports is not None
        kinds = KINDS if bare else tuple(k for k in KINDS if k not in (BARE_TLS, BARE_PLAIN))
        per_kind: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
        try:
            for i in range(rounds + 1):
                for kind in kinds:
                    tasks = [
                        Task(kind, str(self.identities[n]), str(self.gateway), self.raw.port,
                             *(self.bare_ports or (0, 0)), self.sha256, self.size,
                             str(self.work / "dl" / f"{kind}-{n}.pyz"))
                        for n in range(concurrency)
                    ]  # fmt: skip
                    server = self.controller_pid
                    if kind in (BARE_TLS, BARE_PLAIN) and self.bare_pid is not None:
                        server = self.bare_pid
                    cpu0 = cpu_seconds(server)
                    outcomes = fleet.run(tasks)
                    cpu = cpu_seconds(server) - cpu0
                    failed = sorted({o.error[:200] for o in outcomes if o.error})
                    if failed:
                        raise RuntimeError(f"{kind} round failed: {failed[:3]}")
                    wall = max(o.ended for o in outcomes) - min(o.started for o in outcomes)
                    if i > 0:
                        per_kind[kind].append(
                            {"wall_s": wall, "mbps": concurrency * self.size / wall / 1e6,
                             "controller_cpu_s": cpu,
                             "client_cpu_s": statistics.median(o.cpu_s for o in outcomes)}
                        )  # fmt: skip
        finally:
            fleet.close()

        def median(kind: str, key: str) -> float:
            return statistics.median(r[key] for r in per_kind[kind])

        def bare_median(kind: str, key: str, scale: float = 1.0, digits: int = 1) -> float | None:
            return round(scale * median(kind, key), digits) if bare else None

        grpc_mbps, raw_mbps = median(GRPC, "mbps"), median(TCP, "mbps")
        bare_tls = median(BARE_TLS, "mbps") if bare else None
        bare_plain = median(BARE_PLAIN, "mbps") if bare else None
        return {
            "concurrency": concurrency,
            "artifact_bytes": self.size,
            "rounds": rounds,
            "stream_mbps": round(grpc_mbps, 1),
            "raw_tcp_mbps": round(raw_mbps, 1),
            "stream_ratio": round(grpc_mbps / raw_mbps, 3),
            "stream_new_channel_mbps": round(median(GRPC_NEW_CHANNEL, "mbps"), 1),
            "stream_new_channel_ratio": round(median(GRPC_NEW_CHANNEL, "mbps") / raw_mbps, 3),
            "bare_grpc_tls_mbps": bare_median(BARE_TLS, "mbps"),
            "bare_grpc_tls_ratio": None if bare_tls is None else round(bare_tls / raw_mbps, 3),
            "bare_grpc_plain_mbps": bare_median(BARE_PLAIN, "mbps"),
            "bare_grpc_plain_ratio": (
                None if bare_plain is None else round(bare_plain / raw_mbps, 3)
            ),
            "stream_of_bare_tls": None if bare_tls is None else round(grpc_mbps / bare_tls, 3),
            # The server's CPU per round: the bare server's, in these rounds.
            "bare_server_cpu_s": bare_median(BARE_TLS, "controller_cpu_s", digits=2),
            "bare_client_cpu_ms": bare_median(BARE_TLS, "client_cpu_s", scale=1000),
            "stream_wall_s": round(median(GRPC, "wall_s"), 3),
            "raw_tcp_wall_s": round(median(TCP, "wall_s"), 3),
            "controller_cpu_s": round(median(GRPC, "controller_cpu_s"), 2),
            "client_cpu_ms": round(1000 * median(GRPC, "client_cpu_s"), 1),
            "client_new_channel_cpu_ms": round(1000 * median(GRPC_NEW_CHANNEL, "client_cpu_s"), 1),
            "raw_tcp_client_cpu_ms": round(1000 * median(TCP, "client_cpu_s"), 1),
            "stream_mbps_each": [round(r["mbps"], 1) for r in per_kind[GRPC]],
            "raw_tcp_mbps_each": [round(r["mbps"], 1) for r in per_kind[TCP]],
        }


def _admin_token(data_dir: Path, procs: Procs) -> Credentials:
    path = data_dir / "admin.token"
    wait_for(
        lambda: path.exists() and bool(path.read_text().strip()),
        timeout=60, what="the controller's first admin token", interval=0.1,
        describe=procs.dump_logs,
    )  # fmt: skip
    return Credentials(path.read_text().strip(), f"the file {path}")


@contextmanager
def stand(artifact_bytes: int, gateways: int, vhost: str | None = None) -> Iterator[Stand]:
    """A controller serving a release of about ``artifact_bytes`` bytes to ``gateways``
    enrolled gateways, on broker vhost ``vhost`` (an existing one, left as it is) or on a
    throwaway one; all of it removed afterwards. Raises RuntimeError when RabbitMQ's
    management API is not on 127.0.0.1."""
    mgmt = Management()
    if not mgmt.available():
        raise RuntimeError("needs RabbitMQ with the management API on 127.0.0.1:15672")
    throwaway = vhost is None
    vhost = vhost or f"hitless-bench-stream-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="hitless-bench-stream-") as tmp:
        work = Path(tmp)
        (work / "dl").mkdir()
        procs = Procs(work)
        client: ControllerClient | None = None
        raw: RawServer | None = None
        try:
            if throwaway:
                # Inside the try: a request that times out may still have made the vhost.
                mgmt.create_vhost(vhost)
            keys = trust_keys.init(work / "keys")
            api = HostPort("127.0.0.1", free_port())
            controller = procs.start(
                "controller",
                [
                    command("controller-svc"), "serve",
                    "--listen", str(api),
                    "--gateway-listen", f"127.0.0.1:{free_port()}",
                    "--data-dir", str(work / "controller"),
                    "--amqp", amqp_url(vhost),
                    "--trust-root", str(keys.root_json),
                    "--no-self-upgrade",
                ],
            )  # fmt: skip
            token = _admin_token(work / "controller", procs)
            ca_pem = (work / "controller" / "pki" / "ca.pem").read_bytes()
            client = ControllerClient(api, timeout=60, ca_cert=ca_pem, credentials=token)

            def answers() -> bool:
                assert client is not None
                try:
                    client.list_releases()
                except CliError:
                    return False
                return True

            wait_for(answers, timeout=60, what="the controller to answer", interval=0.2,
                     describe=procs.dump_logs)  # fmt: skip
            artifact = stamped_zip(work / "artifact.pyz", VERSION, os.urandom(artifact_bytes))
            publish(client, keys, VERSION, artifact)
            sha256, size = file_sha256(artifact)
            identities = [work / "identities" / f"gw-{n}" for n in range(gateways)]
            enrolled = [enroll(client, api, ca_pem, p.name, p) for p in identities]
            raw = RawServer(artifact)
            bare_pid: int | None = None
            bare_ports: tuple[int, int] | None = None
            try:
                bare_pid, bare_ports = _start_bare(procs, work, artifact)
            except (AssertionError, RuntimeError, OSError, ValueError, KeyError) as exc:
                print(f"bench-stream: no bare gRPC rounds: {exc}", file=sys.stderr)
            yield Stand(
                work, controller.popen.pid, bare_pid, bare_ports,
                enrolled[0].download_address(api), identities, sha256, size, raw,
            )  # fmt: skip
        finally:
            if raw is not None:
                raw.close()
            if client is not None:
                client.close()
            procs.stop_all()
            try:
                if throwaway:
                    mgmt.delete_vhost(vhost)
            except OSError as exc:
                print(f"bench-stream: vhost {vhost} left behind: {exc}", file=sys.stderr)


def _start_bare(procs: Procs, work: Path, artifact: Path) -> tuple[int, tuple[int, int]]:
    """``bench/support/bare_stream.py`` serving ``artifact`` with the controller's TLS
    material; returns its pid and its (TLS, plaintext) ports."""
    ports_file = work / "bare-ports.json"
    bare = procs.start(
        "bare-grpc",
        [sys.executable, "-m", "bench.support.bare_stream",
         "--pki", str(work / "controller" / "pki"), "--file", str(artifact),
         "--ports-file", str(ports_file)],
        env={"PYTHONPATH": str(ROOT)},
    )  # fmt: skip

    def ready() -> bool:
        if bare.popen.poll() is not None:
            raise RuntimeError(f"the bare gRPC server exited {bare.popen.returncode}: "
                               f"{bare.log()[-2000:]}")  # fmt: skip
        return ports_file.exists()

    wait_for(ready, timeout=60, what="the bare gRPC server's ports", interval=0.1,
             describe=procs.dump_logs)  # fmt: skip
    ports = json.loads(ports_file.read_text())
    return bare.popen.pid, (int(ports["tls_port"]), int(ports["plain_port"]))


def measure(
    artifact_bytes: int = ARTIFACT_BYTES,
    concurrency: int = 1,
    *,
    rounds: int = ROUNDS,
    vhost: str | None = None,
) -> dict[str, Any]:
    """Download throughput of ``concurrency`` gateways fetching an artifact of about
    ``artifact_bytes`` bytes at once from a controller of its own (on broker vhost
    ``vhost``, default a throwaway one), beside raw loopback TCP moving the same bytes with
    the same concurrency, ``rounds`` rounds of each. Returns a dict with ``stream_mbps``
    and ``raw_tcp_mbps`` (MB/s, 10^6 bytes per second, all downloaders together),
    ``stream_ratio`` (their quotient) and the details of ``Stand.measure``. Raises
    RuntimeError when there is no broker or a round fails."""
    with stand(artifact_bytes, concurrency, vhost) as s:
        return s.measure(concurrency, rounds)


# Output ----------------------------------------------------------------------------------


def table(result: dict[str, Any]) -> str:
    def cell(value: float | None, width: int, spec: str) -> str:
        return f"{'-' if value is None else format(value, spec):>{width}}"

    mbps = ("stream_mbps", "stream_new_channel_mbps", "bare_grpc_tls_mbps",
            "bare_grpc_plain_mbps", "raw_tcp_mbps")  # fmt: skip
    ratios = ("stream_ratio", "stream_new_channel_ratio", "bare_grpc_tls_ratio",
              "bare_grpc_plain_ratio")  # fmt: skip
    names = ("gRPC", "new ch", "bare TLS", "bare", "raw TCP")
    widths = (8, 8, 9, 8, 9)
    lines = [
        f"artifact {result['artifact_bytes']} B, median of {result['rounds']} rounds after a "
        f"warm-up, {result['cpus']} CPUs shared by clients and server",
        f"  {'':>11} {' MB/s ':-^{sum(widths) - 1}} {' ÷ raw TCP ':-^{sum(widths[:4]) - 1}}"
        f"{'gRPC ÷':>12}{'ctl':>7}{'client':>8}",
        f"  {'downloaders':>11}"
        + "".join(f"{n:>{w}}" for n, w in zip(names, widths, strict=True))
        + "".join(f"{n:>{w}}" for n, w in zip(names[:4], widths[:4], strict=True))
        + f"{'bare TLS':>12}{'CPU s':>7}{'CPU ms':>8}",
    ]
    for r in result["runs"]:
        lines.append(
            f"  {r['concurrency']:>11}"
            + "".join(cell(r.get(k), w, ".0f") for k, w in zip(mbps, widths, strict=True))
            + "".join(cell(r.get(k), w, ".3f") for k, w in zip(ratios, widths[:4], strict=True))
            + cell(r.get("stream_of_bare_tls"), 12, ".2f")
            + cell(r["controller_cpu_s"], 7, ".2f")
            + cell(r["client_cpu_ms"], 8, ".1f")
        )
    lines += [
        "  gRPC: gateway_daemon.download.download per downloader (TLS, client certificate, "
        "file written) over the channel its metadata fetch opened; new ch: over a",
        "  channel of its own (TLS handshake timed); bare TLS / bare: the same chunks from a "
        "grpcio server doing nothing else (bench/support/bare_stream.py),",
        "  with the same TLS / in plaintext, nothing written; raw TCP: sendfile to recv_into, "
        "nothing written.",
        "  MB/s: all downloaders' bytes over the round's wall time. ctl CPU s: the "
        "controller's CPU per gRPC round. client CPU ms: one downloader's, median.",
        f"  load average start / end: {result['load_start']} / {result['load_end']}",
    ]
    return "\n".join(lines)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description="artifact streaming against raw TCP")
    parser.add_argument(
        "--vhost", help="an existing broker vhost to use (default: a throwaway one)"
    )
    args = parser.parse_args()
    logs.configure("bench-stream", json=False, level="WARNING")
    if not Management().available():
        print("bench-stream: needs RabbitMQ with the management API on 127.0.0.1:15672",
              file=sys.stderr)  # fmt: skip
        return EXIT_NO_BROKER
    load_start, started = _load(), time.monotonic()
    runs = []
    try:
        with stand(ARTIFACT_BYTES, max(CONCURRENCY), args.vhost) as s:
            for concurrency in CONCURRENCY:
                print(f"{concurrency} downloaders ...", flush=True)
                runs.append(s.measure(concurrency))
    except Exception as exc:
        print(f"bench-stream: broken: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_BROKEN
    result = {
        "artifact_bytes": runs[0]["artifact_bytes"],
        "rounds": ROUNDS,
        "cpus": os.cpu_count(),
        "runs": runs,
        "load_start": load_start,
        "load_end": _load(),
        "took_s": round(time.monotonic() - started, 1),
    }
    print(table(result))
    print(f"bench took {result['took_s']} s")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
