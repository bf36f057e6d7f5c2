"""Gateways that exist only as messages, for counting reports exactly; run as a script,
the controller's report ingestion rate.

A real gateway reports progress only while it downloads, and heartbeats every 5 s; these
say hello like a gateway, take their upgrade command from their own queue, and then report
DOWNLOADING with growing ``bytes_done`` at a steady rate for as long as they are told.
Every report has its own ``report_id`` (also its ``message_id``) and is counted as
published only once the broker confirmed it, so "reports published - reports recorded"
is exactly what the controller lost.

``python bench/controller_reporters.py [--db sqlite|postgresql] [--gateways N]
[--reports M] [--heartbeats H]``: M status reports of one job over N gateways (DOWNLOADING
progress, then SUCCEEDED from each, which finishes the job) wait in the controller's
reports queue; the controller's own reports consumer and job engine
(``controller_svc.app.reports_consumer``) are started on them, and the rate is M over the
time from its start to the last report recorded and the job finished. ``--heartbeats H``
(default 0: none) spreads H heartbeats evenly among the reports, round robin over the
gateways, in the order a fleet sends them; the run then also waits until every gateway
shows the ``vpn_sessions`` of its last heartbeat and the version it reported last, so the
order each gateway's messages were applied in is checked too, and heartbeats per second
(H over the same time) are printed beside reports per second. Prints one line per
database and writes bench/results/reporters.json. Needs RabbitMQ with its management
plugin (a throwaway vhost) and, for PostgreSQL, a server at ``--pg-admin`` (a throwaway
database). Not a test: nothing passes or fails on timing.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before bench/, whose hitless.py would shadow the package

import pika  # noqa: E402
from google.protobuf.timestamp_pb2 import Timestamp  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from hitless import logs  # noqa: E402
from hitless.bus import codec, topology  # noqa: E402
from hitless.bus.amqp import Publisher  # noqa: E402
from hitless.config import BusConfig  # noqa: E402
from hitless.errors import BusError  # noqa: E402
from hitless.v1 import bus_pb2, common_pb2  # noqa: E402
from tests.support.rabbit import Management, amqp_url  # noqa: E402
from tests.support.wait import wait_for  # noqa: E402

CHUNK = 64 * 1024
TOTAL = 1 << 40  # never reached: the job stays in DOWNLOADING until it is finished
JOIN_S = 30.0


@dataclass(frozen=True)
class Sent:
    """One confirmed report: which gateway, the progress it carried, the phase it was in."""

    gateway_id: str
    bytes_done: int
    phase: str


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


class FakeGateways:
    """Reporting gateways on one publisher; the reporting thread is owned here."""

    def __init__(self, bus: BusConfig, ids: Iterable[str], version: str, rate_per_s: float) -> None:
        self.ids = tuple(ids)
        self.version = version
        self.phase = "warmup"
        self.sent: list[Sent] = []
        self.publish_failures: list[str] = []
        self._interval = 1.0 / (rate_per_s * len(self.ids))
        self._commands: dict[str, bus_pb2.UpgradeCommand] = {}
        self._publisher = Publisher(
            bus, queues=(topology.CONTROLLER_REPORTS,), name="bench-fake-gateways"
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._report, name="bench-reports", daemon=True)

    def open(self, timeout: float) -> None:
        self._publisher.start()
        if not self._publisher.wait_connected(timeout):
            raise RuntimeError(f"the fake gateways could not reach the broker in {timeout:.0f}s")

    def close(self) -> None:
        self.stop()
        self._publisher.close()

    def hello(self) -> None:
        """Announce every fake gateway at ``version`` (as a starting gateway does)."""
        for gid in self.ids:
            hello = bus_pb2.GatewayHello(gateway_id=gid, version=self.version, at=_now())
            self._publisher.publish(
                topology.REPORTS, topology.report_key(gid, topology.HELLO), hello
            )

    def take_commands(self, mgmt: Management, vhost: str, job_id: str, timeout: float) -> None:
        """Read each gateway's upgrade command of ``job_id`` from its queue (left there)."""

        def command(gid: str) -> bus_pb2.UpgradeCommand | None:
            queue = topology.gateway_queue(gid).name
            for message in mgmt.get_messages(vhost, queue, count=10):
                cmd = codec.decode(bus_pb2.UpgradeCommand, str(message["payload"]).encode())
                if cmd.job_id == job_id:
                    return cmd
            return None

        for gid in self.ids:
            self._commands[gid] = wait_for(
                functools.partial(command, gid),
                timeout=timeout,
                what=f"the upgrade command of job {job_id} in {gid}'s queue",
                interval=0.1,
            )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(JOIN_S)
            if self._thread.is_alive():
                raise RuntimeError(f"the fake gateways did not stop reporting in {JOIN_S:.0f}s")

    def finish(self) -> None:
        """Report SUCCEEDED for every fake gateway, which ends the job."""
        for gid, cmd in self._commands.items():
            self._publish(gid, cmd, common_pb2.GATEWAY_JOB_STATE_SUCCEEDED, TOTAL, f"{gid}-done")

    def _report(self) -> None:
        done = dict.fromkeys(self.ids, 0)
        next_at = time.monotonic()
        n = 0
        while not self._stop.is_set():
            gid = self.ids[n % len(self.ids)]
            n += 1
            done[gid] += CHUNK
            phase = self.phase
            try:
                self._publish(
                    gid,
                    self._commands[gid],
                    common_pb2.GATEWAY_JOB_STATE_DOWNLOADING,
                    done[gid],
                    f"{gid}-{done[gid]}",
                )
            except BusError as exc:
                self.publish_failures.append(f"{gid} bytes_done={done[gid]}: {exc}")
            else:
                self.sent.append(Sent(gid, done[gid], phase))
            # A fixed schedule, so a slow confirm is made up for instead of lowering the rate.
            next_at += self._interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _publish(
        self,
        gid: str,
        cmd: bus_pb2.UpgradeCommand,
        state: common_pb2.GatewayJobState,
        bytes_done: int,
        report_id: str,
    ) -> None:
        report = bus_pb2.StatusReport(
            report_id=report_id,
            command_id=cmd.command_id,
            job_id=cmd.job_id,
            gateway_id=gid,
            state=state,
            from_version=self.version,
            to_version=cmd.target_version,
            bytes_done=bytes_done,
            bytes_total=TOTAL,
            at=_now(),
        )
        self._publisher.publish(
            topology.REPORTS,
            topology.report_key(gid, topology.STATUS),
            report,
            message_id=report_id,
            timeout=10,
        )


RESULTS = ROOT / "bench" / "results" / "reporters.json"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
BENCH_VERSION, BENCH_TARGET = "1.0.0", "1.1.0"
QUEUED_S = 120.0  # for the broker to hold every report published
DRAIN_S = 600.0  # for the controller to record them all
VHOST_S = 300.0  # for the management API to create or delete the bench's vhost


@contextmanager
def _database(kind: str, work: Path, pg_admin: str) -> Iterator[str]:
    """A fresh database of ``kind``, removed afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{work / 'reporters.db'}"
        return
    import psycopg

    name = f"hitless_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _reports(
    job_id: str, commands: dict[str, str], count: int, heartbeats: int = 0
) -> Iterator[tuple[str, bytes, str]]:
    """(routing key, body, message id) of ``count`` reports: progress, then SUCCEEDED from
    each gateway last; with ``heartbeats`` heartbeats spread evenly among them.

    Heartbeat ``b`` follows report ``n`` for the first ``n`` with (b + 1) * count <=
    (n + 1) * heartbeats (integers: the last one follows the last report), and comes from
    the gateway ``b`` names round robin over the sorted ids (``_last_heartbeats``). A
    gateway's k-th heartbeat says k VPN sessions, so which of its heartbeats was applied
    last shows; it says BENCH_VERSION before that gateway's SUCCEEDED and BENCH_TARGET
    after it, as a gateway that upgraded would.
    """
    ids = sorted(commands)
    progress = count - len(ids)
    succeeded: set[str] = set()
    beat = 0
    for n in range(count):
        gid = ids[n % len(ids)]
        final = n >= progress
        report = bus_pb2.StatusReport(
            report_id=f"{gid}-{n}",
            command_id=commands[gid],
            job_id=job_id,
            gateway_id=gid,
            state=(
                common_pb2.GATEWAY_JOB_STATE_SUCCEEDED
                if final
                else common_pb2.GATEWAY_JOB_STATE_DOWNLOADING
            ),
            from_version=BENCH_VERSION,
            to_version=BENCH_TARGET,
            bytes_done=(n + 1) * CHUNK,
            bytes_total=TOTAL,
            at=_now(),
        )
        yield topology.report_key(gid, topology.STATUS), codec.encode(report), f"{gid}-{n}"
        if final:
            succeeded.add(gid)
        while beat < heartbeats and (beat + 1) * count <= (n + 1) * heartbeats:
            beater = ids[beat % len(ids)]
            heartbeat = bus_pb2.GatewayHeartbeat(
                gateway_id=beater,
                version=BENCH_TARGET if beater in succeeded else BENCH_VERSION,
                at=_now(),
                vpn_sessions=beat // len(ids) + 1,
            )
            key = topology.report_key(beater, topology.HEARTBEAT)
            yield key, codec.encode(heartbeat), f"{beater}-heartbeat-{beat}"
            beat += 1


def _last_heartbeats(ids: Sequence[str], heartbeats: int) -> dict[str, int]:
    """Gateway id -> the VPN sessions its last heartbeat of ``_reports`` says (0: it sent
    none), which is how many it sent: ``heartbeats`` go round robin over the sorted ids."""
    ordered = sorted(ids)
    rounds, rest = divmod(heartbeats, len(ordered))
    return {gid: rounds + (1 if i < rest else 0) for i, gid in enumerate(ordered)}


def _fill(url: str, reports: Iterable[tuple[str, bytes, str]], count: int) -> None:
    """Publish the reports (persistent, unconfirmed) and wait until the queue holds them."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        for key, body, message_id in reports:
            channel.basic_publish(
                topology.REPORTS.name,
                key,
                body,
                pika.BasicProperties(
                    content_type=codec.CONTENT_TYPE,
                    delivery_mode=pika.DeliveryMode.Persistent,
                    message_id=message_id,
                ),
            )
        queue = topology.CONTROLLER_REPORTS.name
        wait_for(
            lambda: channel.queue_declare(queue, passive=True).method.message_count >= count,
            timeout=QUEUED_S,
            what=f"{count} reports in {queue}",
            interval=0.1,
        )
    finally:
        connection.close()


def _broker_call(call: Callable[[], None], what: str) -> None:
    """``call`` to the management API, again while it times out (creating and deleting
    a vhost is idempotent, and slow on a broker holding many quorum queues)."""
    deadline = time.monotonic() + VHOST_S
    while True:
        try:
            call()
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the broker did not {what} in {VHOST_S:.0f}s") from None


def ingest(
    kind: str, gateways: int, count: int, pg_admin: str, heartbeats: int = 0
) -> dict[str, object]:
    """Seconds for one controller to record ``count`` queued reports of one job and, with
    ``heartbeats``, that many heartbeats among them (``_reports``): done when every report
    is recorded, the job SUCCEEDED and, with heartbeats, every gateway shows the
    ``vpn_sessions`` of its last heartbeat and BENCH_TARGET (its SUCCEEDED, or a heartbeat
    sent after it, was applied last). The row gets ``heartbeats`` and ``heartbeats_per_s``
    when ``heartbeats`` is not 0."""
    from controller_svc import db
    from controller_svc.admins import Admins
    from controller_svc.app import PUBLISHED_QUEUES, reports_consumer
    from controller_svc.db import Gateway, Job, SeenMessage
    from controller_svc.engine import Engine
    from controller_svc.events import Announcer
    from controller_svc.outbox import Outbox
    from controller_svc.repository import Repository
    from controller_svc.signing import Trust
    from hitless.trust import keys as trust_keys

    rabbit = Management()
    vhost = f"hitless-bench-reporters-{uuid.uuid4().hex[:8]}"
    _broker_call(lambda: rabbit.create_vhost(vhost), f"create vhost {vhost}")
    try:
        bus = BusConfig(amqp_url(vhost))
        with tempfile.TemporaryDirectory() as tmp, _database(kind, Path(tmp), pg_admin) as url:
            engine_db = db.make_engine(url)
            db.migrate(engine_db)
            repo = Repository(engine_db)
            now = datetime.now(UTC)
            ids = [f"gw-{i:05d}" for i in range(gateways)]
            for gid in ids:
                repo.record_gateway_seen(gid, BENCH_VERSION, now)
            repo.add_release(BENCH_TARGET, "ab" * 32, 1, "", now)
            job, _ = repo.create_job(
                BENCH_TARGET,
                [(gid, BENCH_VERSION) for gid in ids],
                deadline=now + timedelta(hours=1),
                now=now,
            )
            repo.mark_running(job.id, now)
            commands = {g.gateway_id: g.command_id for g in job.gateways}
            keys_dir = trust_keys.init(Path(tmp) / "keys")
            trust = Trust(Path(tmp) / "tuf", keys_dir.root_json.read_bytes(), keys_dir.online)
            publisher = Publisher(bus, queues=PUBLISHED_QUEUES, name="bench-controller").start()
            publisher.wait_connected(10)
            engine = Engine(
                repo,
                publisher,
                Announcer(publisher, Admins(repo.sessions), Outbox(repo.sessions)),
                trust,
                command_deadline=timedelta(hours=1),
            )
            _fill(bus.url, _reports(job.id, commands, count, heartbeats), count + heartbeats)
            last_heartbeats = _last_heartbeats(ids, heartbeats)

            def recorded() -> int:
                with repo.sessions.read() as session:
                    return int(session.scalar(select(func.count()).select_from(SeenMessage)) or 0)

            def settled() -> int:
                """Gateways showing their last heartbeat's VPN sessions and the target."""
                with repo.sessions.read() as session:
                    rows = session.execute(
                        select(Gateway.id, Gateway.vpn_sessions, Gateway.version)
                    ).all()
                return sum(
                    1
                    for gid, vpn_sessions, version in rows
                    if last_heartbeats.get(gid) == vpn_sessions and version == BENCH_TARGET
                )

            def finished() -> bool:
                with repo.sessions.read() as session:
                    state = session.scalar(select(Job.state).where(Job.id == job.id))
                done = recorded() >= count and state == "SUCCEEDED"
                return done and (not heartbeats or settled() == gateways)

            def progress() -> str:
                shown = f"{recorded()} recorded"
                return f"{shown}, {settled()} gateways settled" if heartbeats else shown

            awaited = f"{count} reports recorded and the job SUCCEEDED"
            if heartbeats:
                awaited += f", and each gateway's last of {heartbeats} heartbeats shown"
            consumer = reports_consumer(bus, engine.on_reports)
            started = time.perf_counter()
            consumer.start()
            try:
                wait_for(
                    finished,
                    timeout=DRAIN_S,
                    what=awaited,
                    interval=0.02,
                    describe=progress,
                )
                elapsed = time.perf_counter() - started
            finally:
                consumer.stop()
                publisher.close()
                engine_db.dispose()
    finally:
        _broker_call(lambda: rabbit.delete_vhost(vhost), f"delete vhost {vhost}")
    row: dict[str, object] = {
        "db": kind,
        "gateways": gateways,
        "reports": count,
        "seconds": round(elapsed, 3),
        "reports_per_s": round(count / elapsed, 1),
    }
    if heartbeats:
        row["heartbeats"] = heartbeats
        row["heartbeats_per_s"] = round(heartbeats / elapsed, 1)
    return row


def apply_only(
    kind: str, gateways: int, count: int, batch: int, pg_admin: str
) -> dict[str, object]:
    """Reports per second ``Repository.apply_reports`` records ``batch`` at a time (1: one
    ``apply_report`` each), with no broker: the database's share of ingestion."""
    from controller_svc import db
    from controller_svc.records import ReportIn
    from controller_svc.repository import Repository
    from controller_svc.states import GatewayState

    with tempfile.TemporaryDirectory() as tmp, _database(kind, Path(tmp), pg_admin) as url:
        engine_db = db.make_engine(url)
        try:
            db.migrate(engine_db)
            repo = Repository(engine_db)
            now = datetime.now(UTC)
            ids = [f"gw-{i:05d}" for i in range(gateways)]
            repo.add_release(BENCH_TARGET, "ab" * 32, 1, "", now)
            for gid in ids:
                repo.record_gateway_seen(gid, BENCH_VERSION, now)
            job, _ = repo.create_job(
                BENCH_TARGET,
                [(gid, BENCH_VERSION) for gid in ids],
                deadline=now + timedelta(hours=1),
                now=now,
            )
            rows = {g.gateway_id: g.command_id for g in job.gateways}
            final = count - gateways  # from here on, each gateway's SUCCEEDED
            reports = [
                ReportIn(
                    report_id=f"r-{n}",
                    job_id=job.id,
                    command_id=rows[ids[n % gateways]],
                    gateway_id=ids[n % gateways],
                    state=GatewayState.SUCCEEDED if n >= final else GatewayState.DOWNLOADING,
                    from_version=BENCH_VERSION,
                    to_version=BENCH_TARGET,
                    error="",
                    bytes_done=(n + 1) * CHUNK,
                    bytes_total=TOTAL,
                    at=now,
                )
                for n in range(count)
            ]
            started = time.perf_counter()
            if batch == 1:
                for report in reports:
                    repo.apply_report(report)
            else:
                for i in range(0, count, batch):
                    repo.apply_reports(reports[i : i + batch])
            elapsed = time.perf_counter() - started
            finished = repo.get_job(job.id)
            assert finished is not None and finished.state.value == "SUCCEEDED", finished
        finally:
            engine_db.dispose()
    return {
        "db": kind,
        "mode": f"repository, batch {batch}",
        "gateways": gateways,
        "reports": count,
        "seconds": round(elapsed, 3),
        "reports_per_s": round(count / elapsed, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--gateways", type=int, default=100)
    parser.add_argument("--reports", type=int, default=20_000)
    parser.add_argument("--pg-admin", default=PG_ADMIN)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--repository-only",
        action="store_true",
        help="no broker: time Repository.apply_reports alone, one by one and in batches",
    )
    parser.add_argument("--batch", type=int, default=200, help="with --repository-only")
    parser.add_argument(
        "--heartbeats",
        type=int,
        default=0,
        help="heartbeats spread evenly among the reports; also wait for each gateway's last",
    )
    args = parser.parse_args()
    if args.heartbeats < 0:
        parser.error(f"--heartbeats {args.heartbeats} is negative: give 0 or more")
    if args.heartbeats and args.repository_only:
        parser.error("--heartbeats goes through the broker: leave out --repository-only")
    logs.configure("bench-reporters", json=False, level="WARNING")
    kinds = ("sqlite", "postgresql") if args.db == "both" else (args.db,)
    if args.repository_only:
        rows = [
            apply_only(kind, args.gateways, args.reports, batch, args.pg_admin)
            for kind in kinds
            for batch in (1, args.batch)
        ]
    else:
        rows = [
            ingest(kind, args.gateways, args.reports, args.pg_admin, args.heartbeats)
            for kind in kinds
        ]
        for row in rows:
            row["mode"] = "reports queue -> controller consumer"
    # The heartbeat columns only when there were heartbeats: the table is otherwise as ever.
    beats = f"  {'heartbeats':>10}  {'heartbeats/s':>12}" if args.heartbeats else ""
    print(
        f"{'db':>10}  {'mode':<36}  {'gateways':>8}  {'reports':>8}  {'seconds':>8}  "
        f"{'reports/s':>9}{beats}"
    )
    for row in rows:
        beats = (
            f"  {row['heartbeats']:>10}  {row['heartbeats_per_s']:>12}" if args.heartbeats else ""
        )
        print(
            f"{row['db']:>10}  {row['mode']!s:<36}  {row['gateways']:>8}  {row['reports']:>8}  "
            f"{row['seconds']:>8}  {row['reports_per_s']:>9}{beats}"
        )
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"runs": rows}, indent=2) + "\n")
    print(f"written {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
