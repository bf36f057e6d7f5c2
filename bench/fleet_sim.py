"""Simulated gateways for ``make bench-fleet``: many gateways in one process, each a real
AMQP consumer on its own command queue, sending real hellos, heartbeats and reports.

    python bench/fleet_sim.py --amqp URL --ids gw-1,gw-2,... --version 1.0.0
                              --out FILE --ready FILE [--sample ID,...]
                              [--identities DIR --controller HOST:PORT]
                              [--heartbeat-interval S] [--lanes N]

What each gateway does, as a real gateway does it on the bus:

- at start, a hello (``GatewayHello``) and then a heartbeat every ``--heartbeat-interval``
  seconds (the heartbeats of all the process's gateways spread evenly over the interval);
- on a pre-check from its queue (header ``x-hitless-kind: precheck``; the controller asks
  every gateway whose hello announces the feature, as the gateway's ``Reporter`` does): a
  ``PreCheckResult`` with no problem, on the gateway's lane. A real gateway measures its free
  space and calls the controller's download service first; a simulated one does neither.
- on an upgrade command from its queue (``hitless.gateway.<id>``, declared here with the
  topology's arguments, consumed with manual acks): the status reports DOWNLOADING,
  VERIFYING, SWAPPING and SUCCEEDED, built and published by the gateway's own
  ``gateway_daemon.reporter.Reporter`` (broker confirms, ``mandatory``), then a hello at the
  new version, as the new process of a real gateway says. The command's signature is not
  checked and nothing is swapped.
- a gateway in ``--sample`` downloads the artifact between DOWNLOADING and VERIFYING with
  ``gateway_daemon.download.download`` over the controller's gateway port, with the client
  certificate its enrollment left in ``<identities>/<id>`` (``gateway_daemon.identity``).

One pika connection consumes every queue of the process (one consumer per queue);
reports go out through ``--lanes`` publishers (``hitless.bus.amqp.Publisher``, one
connection each), a gateway always on the same lane so its reports keep their order.

The process writes ``--ready`` once every hello is confirmed and every consumer is
registered, and writes ``--out`` (JSON, replaced atomically) once every gateway has sent
SUCCEEDED and again when it stops (SIGTERM or SIGINT): per gateway, the wall-clock time
(``time.time()``, comparable with the controller's timestamps on this host) the command
arrived and each report was confirmed; the downloads; the failures. Exit 0, or 1 when the
broker could not be reached.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import inspect
import json
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before bench/, whose hitless.py would shadow the package

import pika  # noqa: E402
from pika.adapters.blocking_connection import BlockingChannel  # noqa: E402

from gateway_daemon import identity  # noqa: E402
from gateway_daemon.download import download  # noqa: E402
from gateway_daemon.reporter import Reporter  # noqa: E402
from hitless import logs  # noqa: E402
from hitless.bus import codec, topology  # noqa: E402
from hitless.bus.amqp import Publisher, declare, declare_topology  # noqa: E402
from hitless.bus.amqp.channel import parameters  # noqa: E402
from hitless.config import BusConfig, HostPort  # noqa: E402
from hitless.errors import BusError, DecodeError  # noqa: E402
from hitless.v1 import bus_pb2  # noqa: E402

CONNECT_TIMEOUT_S = 30.0
LANE_JOIN_S = 10.0
STATES = ("DOWNLOADING", "VERIFYING", "SWAPPING", "SUCCEEDED")
# Free space a simulated gateway reports beyond what a release needs, in bytes.
SIMULATED_FREE_BYTES = 10 * 1024**3
EXIT_OK, EXIT_NO_BROKER = 0, 1


class Lane:
    """One publisher and the thread that runs its gateways' work in order."""

    def __init__(self, bus: BusConfig, name: str) -> None:
        self.publisher = Publisher(bus, name=name)
        self._work: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self, timeout: float) -> None:
        self.publisher.start()
        if not self.publisher.wait_connected(timeout):
            raise BusError(f"a report publisher could not reach the broker in {timeout:.0f}s")
        self._thread.start()

    def submit(self, work: Callable[[], None]) -> None:
        self._work.put(work)

    def close(self) -> None:
        self._work.put(None)
        self._thread.join(LANE_JOIN_S)
        self.publisher.close()

    def _run(self) -> None:
        while (work := self._work.get()) is not None:
            work()


class SimulatedFleet:
    """The gateways of this process, their lanes, and what they saw and sent."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.bus = BusConfig(args.amqp)
        self.ids: tuple[str, ...] = tuple(i for i in args.ids.split(",") if i)
        self.sample = frozenset(i for i in (args.sample or "").split(",") if i)
        self.identities = Path(args.identities) if args.identities else None
        self.controller = HostPort.parse(args.controller) if args.controller else None
        self.heartbeat_interval = args.heartbeat_interval
        self.out = Path(args.out)
        self.ready_file = Path(args.ready)
        self.lanes = [Lane(self.bus, f"sim-lane-{n}") for n in range(max(1, args.lanes))]
        self._lane_of = {gid: n % len(self.lanes) for n, gid in enumerate(self.ids)}
        self.version = dict.fromkeys(self.ids, args.version)
        self.reporters = {gid: self._reporter(gid) for gid in self.ids}
        self.stop = threading.Event()
        self._lock = threading.Lock()
        # gateway -> {"command": t, "DOWNLOADING": t, ...}: wall-clock seconds
        self.seen: dict[str, dict[str, float]] = {gid: {} for gid in self.ids}
        self.commands: set[str] = set()
        self.duplicates = 0
        self.prechecks = 0
        self.downloads: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self.heartbeats = 0
        self._downloads = concurrent.futures.ThreadPoolExecutor(
            max(1, len(self.sample)), thread_name_prefix="sim-download"
        )
        self._written_done = False

    def _lane(self, gid: str) -> Lane:
        return self.lanes[self._lane_of[gid]]

    def _reporter(self, gid: str) -> Reporter:
        return Reporter(self._lane(gid).publisher, gid, self.version[gid])

    # Start and stop ----------------------------------------------------------------------

    def start(self) -> None:
        for lane in self.lanes:
            lane.start(CONNECT_TIMEOUT_S)
        hellos = threading.Semaphore(0)

        def hello(gid: str) -> None:
            self._hello(gid)
            hellos.release()

        for gid in self.ids:
            self._lane(gid).submit(functools.partial(hello, gid))
        for _ in self.ids:
            if not hellos.acquire(timeout=CONNECT_TIMEOUT_S * 4):
                raise BusError("the hellos were not confirmed in time")

    def close(self) -> None:
        self._downloads.shutdown(wait=False, cancel_futures=True)
        for lane in self.lanes:
            lane.close()

    # Consuming ---------------------------------------------------------------------------

    def consume(self) -> None:
        """Declare every gateway's queue, consume them all, and serve until stopped."""
        connection = pika.BlockingConnection(parameters(self.bus))
        try:
            channel = connection.channel()
            declare_topology(channel)
            declare(channel, [topology.gateway_queue(gid) for gid in self.ids])
            channel.basic_qos(prefetch_count=1)
            for gid in self.ids:
                channel.basic_consume(
                    topology.gateway_queue(gid).name,
                    lambda ch, method, props, body, gid=gid: self._on_command(
                        ch, method.delivery_tag, gid, props.headers or {}, body
                    ),
                )
            self._write(self.ready_file, {"gateways": len(self.ids), "pid": os.getpid()})
            beats = threading.Thread(target=self._heartbeats, name="sim-heartbeats", daemon=True)
            beats.start()
            while not self.stop.is_set():
                connection.process_data_events(time_limit=0.2)
                if not self._written_done and self._all_done():
                    self._written_done = True
                    self.write_summary()
            beats.join(LANE_JOIN_S)
        finally:
            if connection.is_open:
                connection.close()

    def _on_command(
        self, channel: BlockingChannel, tag: int, gid: str, headers: dict[str, Any], body: bytes
    ) -> None:
        arrived = time.time()
        channel.basic_ack(tag)
        kind = headers.get(topology.KIND_HEADER)
        if (kind.decode() if isinstance(kind, bytes) else kind) == topology.PRECHECK:
            self._lane(gid).submit(functools.partial(self._precheck, gid, body))
            return
        try:
            command = codec.decode(bus_pb2.UpgradeCommand, body, strict=False)
        except DecodeError as exc:
            self._fail(f"{gid}: undecodable command: {exc}")
            return
        with self._lock:
            if command.command_id in self.commands:
                self.duplicates += 1
                return
            self.commands.add(command.command_id)
            self.seen[gid]["command"] = arrived
        self._lane(gid).submit(lambda: self._upgrade(gid, command))

    def _precheck(self, gid: str, body: bytes) -> None:
        """Answer a pre-check as a gateway with room and a reachable controller does."""
        try:
            request = codec.decode(bus_pb2.PreCheckRequest, body, strict=False)
        except DecodeError as exc:
            self._fail(f"{gid}: undecodable pre-check: {exc}")
            return
        needed = 2 * max(0, request.artifact_size)  # the download and the staged copy
        result = bus_pb2.PreCheckResult(
            check_id=request.check_id,
            gateway_id=gid,
            version=self.version[gid],
            free_bytes=needed + SIMULATED_FREE_BYTES,
            needed_bytes=needed,
            controller_reachable=True,
        )
        if self._safely(f"pre-check answer of {gid}", lambda: self.reporters[gid].precheck(result)):
            with self._lock:
                self.prechecks += 1

    # One gateway's upgrade ---------------------------------------------------------------

    def _upgrade(self, gid: str, command: bus_pb2.UpgradeCommand) -> None:
        self._report(gid, command, "DOWNLOADING", bytes_total=command.artifact_size)
        if gid in self.sample:
            self._downloads.submit(self._download_then_finish, gid, command)
        else:
            self._finish(gid, command)

    def _download_then_finish(self, gid: str, command: bus_pb2.UpgradeCommand) -> None:
        started = time.time()
        error = ""
        try:
            if self.identities is None or self.controller is None:
                raise RuntimeError("a sampled gateway needs --identities and --controller")
            enrolled = identity.load(self.identities / gid)
            if enrolled is None:
                raise RuntimeError(f"gateway {gid} has no identity in {self.identities / gid}")
            dest = self.out.parent / f"{gid}-download.pyz"
            download(
                enrolled.download_address(self.controller),
                command.artifact_sha256,
                command.artifact_size,
                dest,
                credentials=enrolled.channel_credentials(),
            )
            dest.unlink(missing_ok=True)
        except Exception as exc:  # counted and shown: the bench goes on
            error = f"{type(exc).__name__}: {exc}"
            self._fail(f"{gid}: download: {error}")
        with self._lock:
            self.downloads.append(
                {
                    "gateway_id": gid,
                    "started": started,
                    "seconds": round(time.time() - started, 3),
                    "bytes": command.artifact_size if not error else 0,
                    "error": error,
                }
            )
        self._finish(gid, command)

    def _finish(self, gid: str, command: bus_pb2.UpgradeCommand) -> None:
        size = command.artifact_size
        self._report(gid, command, "VERIFYING", bytes_done=size, bytes_total=size)
        self._report(gid, command, "SWAPPING")
        self._report(gid, command, "SUCCEEDED")
        with self._lock:
            self.version[gid] = command.target_version
            self.reporters[gid] = self._reporter(gid)
        self._hello(gid)

    def _hello(self, gid: str) -> None:
        """A hello as the gateway's process sends it when it starts serving (with its
        heartbeat interval, from the release whose Reporter carries it)."""
        reporter = self.reporters[gid]
        if "heartbeat_interval_s" in inspect.signature(reporter.hello).parameters:
            send = functools.partial(
                reporter.hello, [], heartbeat_interval_s=self.heartbeat_interval
            )
        else:
            send = functools.partial(reporter.hello, [])
        self._safely(f"hello of {gid}", send)

    def _report(
        self, gid: str, command: bus_pb2.UpgradeCommand, state: str, **progress: int
    ) -> None:
        def send() -> None:
            self.reporters[gid].status(
                command,
                state,
                from_version=self.version[gid],
                to_version=command.target_version,
                **progress,  # type: ignore[arg-type]
            )

        if self._safely(f"{state} report of {gid}", send):
            with self._lock:
                self.seen[gid][state] = time.time()

    # Heartbeats --------------------------------------------------------------------------

    def _heartbeats(self) -> None:
        spacing = self.heartbeat_interval / max(1, len(self.ids))
        next_at = time.monotonic()
        while not self.stop.is_set():
            for gid in self.ids:
                next_at += spacing
                if self.stop.wait(max(0.0, next_at - time.monotonic())):
                    return
                self._lane(gid).submit(functools.partial(self._heartbeat, gid))

    def _heartbeat(self, gid: str) -> None:
        if self._safely(f"heartbeat of {gid}", lambda: self.reporters[gid].heartbeat()):
            with self._lock:
                self.heartbeats += 1

    # Bookkeeping -------------------------------------------------------------------------

    def _safely(self, what: str, action: Callable[[], None]) -> bool:
        try:
            action()
        except BusError as exc:
            self._fail(f"{what}: {exc}")
            return False
        return True

    def _fail(self, failure: str) -> None:
        with self._lock:
            self.failures.append(failure)

    def _all_done(self) -> bool:
        with self._lock:
            return all("SUCCEEDED" in seen for seen in self.seen.values())

    def write_summary(self) -> None:
        with self._lock:
            summary = {
                "gateways": len(self.ids),
                "pid": os.getpid(),
                "seen": self.seen,
                "duplicate_commands": self.duplicates,
                "prechecks_answered": self.prechecks,
                "downloads": self.downloads,
                "heartbeats": self.heartbeats,
                "failures": self.failures[:50],
                "failure_count": len(self.failures),
                "written_at": time.time(),
            }
        self._write(self.out, summary)

    @staticmethod
    def _write(path: Path, data: dict[str, Any]) -> None:
        part = path.with_name(path.name + ".part")
        part.write_text(json.dumps(data))
        part.replace(path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleet_sim.py", description=__doc__.splitlines()[0])
    parser.add_argument("--amqp", required=True, help="broker URL, with the bench's vhost")
    parser.add_argument("--ids", required=True, help="the gateway ids, comma-separated")
    parser.add_argument("--version", required=True, help="the version the gateways run")
    parser.add_argument("--out", required=True, help="where the summary (JSON) goes")
    parser.add_argument("--ready", required=True, help="written once every gateway serves")
    parser.add_argument("--sample", default="", help="ids that really download, comma-sep.")
    parser.add_argument("--identities", help="directory of the sample's enrolled identities")
    parser.add_argument("--controller", help="the controller's API HOST:PORT")
    parser.add_argument("--heartbeat-interval", type=float, default=5.0, metavar="S")
    parser.add_argument("--lanes", type=int, default=8, help="report publishers (connections)")
    return parser


def main() -> int:
    args = _parser().parse_args()
    logs.configure("bench-fleet-sim", json=False, level="ERROR")
    fleet = SimulatedFleet(args)

    def stop(signum: int, frame: FrameType | None) -> None:
        fleet.stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    try:
        fleet.start()
        fleet.consume()
    except BusError as exc:
        print(f"fleet_sim: {exc}", file=sys.stderr)
        return EXIT_NO_BROKER
    finally:
        fleet.stop.set()
        fleet.write_summary()
        fleet.close()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
