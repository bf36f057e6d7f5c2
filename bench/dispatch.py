"""``make bench-dispatch``: how long the controller takes to send one upgrade command to each
of N gateways, beside the floor measured in the same run.

- dispatch: ``Engine.start_upgrade`` on a real SQLite database and the real broker, from the
  call to the job being RUNNING: the job and its rows written, then per gateway its queue
  declared, its command published with a confirm, and the row marked published (so a
  dispatch cut short by a broker outage is finished later, and one gateway the broker
  refuses fails alone).
- floor: the same N commands published with confirms on one channel to queues declared
  beforehand: what any dispatch costs on this broker.

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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controller_svc import db  # noqa: E402
from controller_svc.admins import Admins  # noqa: E402
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


def _dispatch(bus: BusConfig, n: int, data: Path) -> float:
    """Seconds from start_upgrade to a RUNNING job with every command confirmed."""
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
    publisher = Publisher(bus, name="bench-dispatch").start()
    try:
        publisher.wait_connected(10)
        engine = Engine(
            repo,
            publisher,
            Announcer(publisher, Admins(repo.sessions), Outbox(repo.sessions)),
            trust,
            command_deadline=timedelta(minutes=10),
        )
        started = time.perf_counter()
        job = engine.start_upgrade(version="1.1.0")
        elapsed = time.perf_counter() - started
        assert job.state.value == "RUNNING", job.state
        assert all(g.published for g in repo.get_job(job.id).gateways)  # type: ignore[union-attr]
        return elapsed
    finally:
        publisher.close()
        engine_db.dispose()


def _floor(bus: BusConfig, n: int) -> float:
    """Seconds to publish N commands with confirms to queues declared beforehand."""
    ids = [f"floor-{n}-{i}" for i in range(n)]
    publisher = Publisher(bus, name="bench-floor").start()
    try:
        publisher.wait_connected(10)
        publisher.declare([topology.gateway_queue(gid) for gid in ids])
        started = time.perf_counter()
        for gid in ids:
            command = bus_pb2.UpgradeCommand(
                command_id=str(uuid.uuid4()), job_id="floor", gateway_id=gid,
                target_version="1.1.0", artifact_sha256=SHA, artifact_size=1,
            )  # fmt: skip
            publisher.publish(topology.COMMANDS, topology.command_key(gid), command)
        return time.perf_counter() - started
    finally:
        publisher.close()


def main() -> int:
    logs.configure("bench-dispatch", json=False, level="WARNING")
    rabbit = Management()
    vhost = f"hitless-bench-{uuid.uuid4().hex[:8]}"
    rabbit.create_vhost(vhost)
    rows = []
    try:
        bus = BusConfig(amqp_url(vhost))
        with tempfile.TemporaryDirectory() as tmp:
            for n in FLEETS:
                floor = _floor(bus, n)
                dispatch = _dispatch(bus, n, Path(tmp))
                rows.append({"gateways": n, "dispatch_s": dispatch, "floor_s": floor})
    finally:
        rabbit.delete_vhost(vhost)
    print(f"{'gateways':>8}  {'dispatch s':>10}  {'floor s':>8}  {'ratio':>6}  {'ms/gateway':>10}")
    for row in rows:
        n, d, f = row["gateways"], row["dispatch_s"], row["floor_s"]
        print(f"{n:>8}  {d:>10.2f}  {f:>8.2f}  {d / f:>6.1f}  {1000 * d / n:>10.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"fleets": rows}, indent=2) + "\n")
    print(f"written {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
