"""Events raised while the broker is away reach the notifier's queue once it is back."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from controller_svc.admins import Admins
from controller_svc.db import make_engine, migrate
from controller_svc.events import Announcer
from controller_svc.outbox import Outbox
from controller_svc.records import ReleaseRecord
from controller_svc.repository import Repository
from hitless.bus import topology
from hitless.bus.amqp import Publisher
from hitless.config import BusConfig
from tests.support.procs import free_port
from tests.support.rabbit import Management
from tests.support.wait import wait_for

RELEASE = ReleaseRecord("1.4.0", "a" * 64, 10, "notes", datetime.now(UTC))


def test_an_event_raised_while_the_broker_is_away_is_sent_later(
    tmp_path: Path, bus: BusConfig, rabbit: Management, vhost: str
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    migrate(engine)
    repo = Repository(engine)
    admins = Admins(repo.sessions)
    admins.add("ops@example.com", datetime.now(UTC))
    outbox = Outbox(repo.sessions, settle=timedelta(0))
    away = Publisher(BusConfig(f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F")).start()
    back = Publisher(bus, queues=[topology.NOTIFIER_EVENTS]).start()
    try:
        Announcer(away, admins, outbox).release_published(RELEASE)
        assert [e for e, _, _ in outbox.pending(datetime.now(UTC))] == ["release:1.4.0"]

        announcer = Announcer(back, admins, outbox)
        announcer.flush()
        assert outbox.pending(datetime.now(UTC)) == []
        announcer.flush()  # nothing left: nothing sent twice

        messages = wait_for(
            lambda: rabbit.get_messages(vhost, topology.NOTIFIER_EVENTS.name),
            timeout=10,
            what="the event in the notifier's queue",
        )
        assert len(messages) == 1
        event = json.loads(messages[0]["payload"])
        assert event["event_id"] == "release:1.4.0"
        assert event["admins"] == ["ops@example.com"]
        assert event["release_published"]["version"] == "1.4.0"
    finally:
        away.close()
        back.close()
        engine.dispose()
