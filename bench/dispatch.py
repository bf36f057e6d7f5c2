"""``make bench-dispatch``: how long the controller takes to send one upgrade command to each
of N gateways, beside the floor measured in the same run.

- reply: ``Engine.start_upgrade`` on a real SQLite database, from the call to its return:
  what StartUpgrade's caller waits for (the job and its rows written; PENDING).
- dispatch: from the same call to the job being RUNNING with every command confirmed, done
  by the engine's dispatcher thread over a publisher with the controller's lanes
  (``controller_svc.app.PUBLISH_LANES``): the gateways' queues declared (new queues, as on
  a first upgrade), the commands signed and published with confirms, PUBLISHED_BATCH at a
  time, each batch marked published (so a dispatch cut short by a broker outage is finished
  later, and one gateway the broker refuses fails alone).
- again: a second job to the same gateways in the same process, whose queues it declared
  already: the commands alone (handed to the dispatcher as a restarted controller's sweep
  would, from the database).
- floor: the same N commands published with confirms one at a time on one channel to
  queues declared beforehand: what a dispatch costs that waits for each confirm.
- floor, lanes: the same, handed over all at once to a publisher with the controller's
  lanes: the least any dispatch with that many confirms in flight costs on this broker.

Prints one table and writes bench/results/dispatch.json. Not a test: nothing here passes
or fails on timing. Needs RabbitMQ with its management plugin (a throwaway vhost).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controller_svc import db  # noqa: E402
from controller_svc.admins import Admins  # noqa: E402
from controller_svc.app import PUBLISH_LANES  # noqa: E402
from controller_svc.engine import Engine  # noqa: E402
from controller_svc.events import Announcer  # noqa: E402
from controller_svc.outbox import Outbox  # noqa: E402
from controller_svc.repository import Repository  # noqa: E402
from controller_svc.signing import Trust  # noqa: E402
from hitless import logs  # noqa: E402
from hitless.bus import topology  # noqa: E402
from hitless.bus.amqp import Publisher  # noqa: E402
from hitless.config import BusConfig  # noqa: E402
from hitless.digest import file_sha256  # noqa: E402
from hitless.trust import keys as trust_keys  # noqa: E402
from hitless.trust import release  # noqa: E402
from hitless.v1 import bus_pb2  # noqa: E402
from tests.support.rabbit import Management, amqp_url  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "dispatch.json"
FLEETS = (100, 500)
SHA = "ab" * 32


def _dispatch(bus: BusConfig, n: int, data: Path) -> tuple[float, float, float]:
    """Seconds from start_upgrade to its reply, and to a RUNNING job with every command
    confirmed; then seconds to dispatch a second job to the same gateways."""
    engine_db = db.make_engine(f"sqlite:///{data / f'dispatch-{n}.db'}")
    db.migrate(engine_db)
    repo = Repository(engine_db)
    now = datetime.now(UTC)
    for i in range(n):
        repo.record_gateway_seen(f"gw-{i}", "1.0.0", now)
    artifact = data / f"release-{n}.pyz"
    artifact.write_bytes(b"release 1.1.0\n")
    sha256, size = file_sha256(artifact)
    keys_dir = trust_keys.init(data / f"keys-{n}")
    trust = Trust(data / f"tuf-{n}", keys_dir.root_json.read_bytes(), keys_dir.online)
    trust.accept(
        release.sign_targets(None, keys_dir.dir, add={release.target_name("1.1.0"): artifact})
    )
    repo.add_release("1.1.0", sha256, size, "", now)
    publisher = Publisher(bus, name="bench-dispatch", lanes=PUBLISH_LANES).start()
    engine = Engine(
        repo,
        publisher,
        Announcer(publisher, Admins(repo.sessions), Outbox(repo.sessions)),
        trust,
        command_deadline=timedelta(minutes=10),
    )
    try:
        publisher.wait_connected(10)
        engine.start()
        started = time.perf_counter()
        job = engine.start_upgrade(version="1.1.0")
        replied = time.perf_counter() - started
        _wait_running(engine, engine_db, job.id)
        elapsed = time.perf_counter() - started
        assert all(g.published for g in repo.get_job(job.id).gateways)  # type: ignore[union-attr]
        second, _ = repo.create_job(
            "1.1.0",
            [(f"gw-{i}", "1.0.0") for i in range(n)],
            deadline=datetime.now(UTC) + timedelta(minutes=10),
            now=datetime.now(UTC),
        )
        started = time.perf_counter()
        engine.resume_pending()
        _wait_running(engine, engine_db, second.id)
        again = time.perf_counter() - started
        return replied, elapsed, again
    finally:
        engine.stop()
        publisher.close()
        engine_db.dispose()


def _wait_running(engine: Engine, engine_db: Any, job_id: str) -> None:
    while True:
        with engine_db.connect() as connection:
            state = connection.execute(
                text("SELECT state FROM jobs WHERE id = :id"), {"id": job_id}
            ).scalar_one()
        if state != "PENDING":
            break
        engine.wait_for_change(job_id, 0.01)
    assert state == "RUNNING", state


def _command(gateway_id: str) -> bus_pb2.UpgradeCommand:
    return bus_pb2.UpgradeCommand(
        command_id=str(uuid.uuid4()), job_id="floor", gateway_id=gateway_id,
        target_version="1.1.0", artifact_sha256=SHA, artifact_size=1,
    )  # fmt: skip


def _floor(bus: BusConfig, n: int, lanes: int) -> float:
    """Seconds to publish N commands with confirms to queues declared beforehand: one at a
    time with one lane, else all handed over at once."""
    ids = [f"floor-{n}-{i}" for i in range(n)]
    publisher = Publisher(bus, name="bench-floor", lanes=lanes).start()
    try:
        publisher.wait_connected(10)
        publisher.declare([topology.gateway_queue(gid) for gid in ids], timeout=600)
        commands = [_command(gid) for gid in ids]
        started = time.perf_counter()
        if lanes == 1:
            for command in commands:
                key = topology.command_key(command.gateway_id)
                publisher.publish(topology.COMMANDS, key, command)
        else:
            confirms = [
                publisher.publish_nowait(topology.COMMANDS, topology.command_key(c.gateway_id), c)
                for c in commands
            ]
            for confirm in confirms:
                confirm.wait(30)
        return time.perf_counter() - started
    finally:
        publisher.close()


def main() -> int:
    logs.configure("bench-dispatch", json=False, level="WARNING")
    rabbit = Management()
    vhost = f"hitless-bench-{uuid.uuid4().hex[:8]}"
    rabbit.create_vhost(vhost)
    rows: list[dict[str, float]] = []
    try:
        bus = BusConfig(amqp_url(vhost))
        with tempfile.TemporaryDirectory() as tmp:
            for n in FLEETS:
                floor = _floor(bus, n, 1)
                floor_lanes = _floor(bus, n, PUBLISH_LANES)
                reply, dispatch, again = _dispatch(bus, n, Path(tmp))
                rows.append(
                    {
                        "gateways": n,
                        "reply_s": reply,
                        "dispatch_s": dispatch,
                        "dispatch_again_s": again,
                        "floor_s": floor,
                        "floor_lanes_s": floor_lanes,
                        "lanes": PUBLISH_LANES,
                    }
                )
    finally:
        rabbit.delete_vhost(vhost)
    lanes = f"floor {PUBLISH_LANES} lanes s"
    print(
        f"{'gateways':>8}  {'reply s':>7}  {'dispatch s':>10}  {'again s':>7}  {'floor s':>8}  "
        f"{lanes:>16}  {'dispatch/floor':>14}  {'ms/gateway':>10}"
    )
    for row in rows:
        count = int(row["gateways"])
        r, d, f = row["reply_s"], row["dispatch_s"], row["floor_s"]
        a, fl = row["dispatch_again_s"], row["floor_lanes_s"]
        print(
            f"{count:>8}  {r:>7.3f}  {d:>10.2f}  {a:>7.2f}  {f:>8.2f}  {fl:>16.2f}  "
            f"{d / f:>14.2f}  {1000 * d / count:>10.2f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"fleets": rows}, indent=2) + "\n")
    print(f"written {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
