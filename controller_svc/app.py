"""One controller process: database, artifact store, bus, job engine and gRPC server,
started in order and stopped in reverse."""

from __future__ import annotations

import sys
import threading
from datetime import timedelta

from controller_svc import db, takeover
from controller_svc.access import Audit, Tokens
from controller_svc.admins import Admins
from controller_svc.engine import Engine, utc_now
from controller_svc.events import Announcer
from controller_svc.feed import FeedSync, ReleaseFeed
from controller_svc.jobs import ManagementJobs
from controller_svc.limits import DEFAULT_LIMITS, Limits
from controller_svc.outbox import Outbox
from controller_svc.rejections import Rejections
from controller_svc.repository import Repository
from controller_svc.selfupgrade import ControllerUpgrader
from controller_svc.server import ArtifactsService, ControllerService, build_server
from controller_svc.signing import Trust
from controller_svc.store import ArtifactStore
from hitless import logs, version
from hitless.bus import topology
from hitless.bus.amqp import Consumer, Publisher
from hitless.config import ControllerConfig
from hitless.errors import ConfigError

log = logs.get(__name__)

SWEEP_INTERVAL_S = 1.0
STOP_GRACE_S = 5.0
BUS_WAIT_S = 30.0

# Queues the controller publishes into: declared so that mandatory publishing succeeds
# and messages wait there while their consumer is away.
PUBLISHED_QUEUES = (topology.CONTROLLER_REPORTS, topology.NOTIFIER_EVENTS, topology.CONTROLLER_JOBS)


class ControllerApp:
    def __init__(
        self,
        config: ControllerConfig,
        ready_fd: int | None = None,
        *,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.config = config
        self._ready_fd = ready_fd
        self._limits = limits
        self._stop = threading.Event()
        self.port: int | None = None

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        config = self.config
        if config.trust_root is None:
            raise ConfigError(
                "the controller needs a trust root (root.json from `upgradectl keys init`)"
            )
        config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        trust = Trust.open(config.data_dir, config.trust_root, config.online_keys)
        engine_db = db.make_engine(config.db_url)
        migrated = db.migrate(engine_db)
        log.info("database_ready", migrated=migrated)
        store = ArtifactStore(config.artifact_dir)
        publisher = Publisher(config.bus, queues=PUBLISHED_QUEUES, name="controller-publisher")
        publisher.start()
        repo = Repository(engine_db)
        admins = Admins(repo.sessions)
        upgrader = (
            ControllerUpgrader(config, store, trust, hand_over=self._stop.set)
            if config.self_upgrade
            else None
        )
        engine = Engine(
            repo,
            publisher,
            Announcer(publisher, admins, Outbox(repo.sessions)),
            trust,
            command_deadline=timedelta(seconds=config.command_deadline_s),
            upgrader=upgrader,
        )
        rejections = Rejections(repo.sessions)
        tokens, audit = Tokens(repo.sessions), Audit(repo.sessions)
        jobs = Consumer(
            config.bus,
            topology.CONTROLLER_JOBS,
            ManagementJobs(engine, rejections, utc_now, audit).handle,
            queues=PUBLISHED_QUEUES,
            name="controller-jobs",
        )
        consumer = Consumer(
            config.bus,
            topology.CONTROLLER_REPORTS,
            engine.on_report,
            queues=PUBLISHED_QUEUES,
            prefetch=32,
            workers=4,
            name="controller-reports",
            # A gateway's reports are applied in the order it sent them.
            lane=lambda delivery: topology.reporting_gateway(delivery.routing_key),
        )
        feed = (
            FeedSync(ReleaseFeed(config.release_feed), repo, store, engine.announcer, trust)
            if config.release_feed
            else None
        )
        bootstrap = tokens.bootstrap(config.data_dir, utc_now())
        if bootstrap is not None:
            log.warning("admin_token_created", file=str(bootstrap))
            print(
                f"controller-svc: made the first admin API token; its secret is in {bootstrap} "
                "(mode 0600). Use it with `upgradectl --token-file FILE` (or HITLESS_TOKEN), "
                "make tokens for each operator (`upgradectl tokens create`), then keep or "
                "delete the file.",
                file=sys.stderr,
            )
        server, self.port = build_server(
            config.listen,
            ControllerService(
                engine,
                store,
                admins,
                rejections,
                self._stop,
                feed,
                upgrader,
                tokens=tokens,
                audit=audit,
                limits=self._limits,
            ),
            ArtifactsService(store, trust.repository, limits=self._limits),
            tokens=tokens,
            audit=audit,
            limits=self._limits,
        )
        poller = (
            threading.Thread(
                target=feed.run, args=(config.feed_interval_s, self._stop), name="feed", daemon=True
            )
            if feed
            else None
        )
        try:
            consumer.start()
            jobs.start()
            server.start()
            if poller is not None:
                poller.start()
            log.info(
                "controller_serving",
                listen=f"{config.listen.host}:{self.port}",
                version=version.current(),
            )
            publisher.wait_connected(BUS_WAIT_S)
            engine.resume_pending()
            consumer.wait_consuming(BUS_WAIT_S)
            takeover.announce_ready(self._ready_fd, version.current())
            while not self._stop.wait(SWEEP_INTERVAL_S):
                engine.sweep()
                trust.refresh()
        finally:
            log.info("controller_stopping")
            server.stop(STOP_GRACE_S)
            if poller is not None:
                poller.join(timeout=STOP_GRACE_S)
            jobs.stop()
            consumer.stop()
            publisher.close()
            engine_db.dispose()
        return 0
