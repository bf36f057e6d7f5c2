"""One controller process: database, artifact store, bus, job engine, gRPC server and web
console, started in order and stopped in reverse."""

from __future__ import annotations

import sys
import threading
from datetime import UTC, datetime, timedelta

import sqlalchemy

from controller_svc import db, takeover
from controller_svc.access import Audit, Tokens
from controller_svc.admins import Admins
from controller_svc.broker_access import BrokerAccess, BrokerAccessError, GatewayUsers, vhost_of
from controller_svc.engine import Engine, utc_now
from controller_svc.enrollment import Enrollments
from controller_svc.events import Announcer
from controller_svc.feed import FeedSync, ReleaseFeed
from controller_svc.jobs import ManagementJobs
from controller_svc.limits import DEFAULT_LIMITS, Limits
from controller_svc.operator_certs import OperatorCertificates
from controller_svc.outbox import Outbox
from controller_svc.rejections import Rejections
from controller_svc.repository import Repository
from controller_svc.selfupgrade import ControllerUpgrader
from controller_svc.senders import ReportSenders
from controller_svc.server import ArtifactsService, ControllerService, build_server
from controller_svc.signing import Trust
from controller_svc.store import ArtifactStore
from controller_svc.users import Users
from hitless import logs, pki, version
from hitless.bus import topology
from hitless.bus.amqp import Consumer, Publisher
from hitless.bus.amqp.consumer import Batched, BatchHandler
from hitless.config import BusConfig, ControllerConfig, HostPort
from hitless.errors import ConfigError, InvalidName
from hitless.pki import CertificateAuthority
from hitless.private import private_dir

log = logs.get(__name__)

SWEEP_INTERVAL_S = 1.0
STOP_GRACE_S = 5.0
BUS_WAIT_S = 30.0
# Connections the controller publishes on side by side: confirms in flight while a job's
# commands are dispatched (hitless.bus.amqp.publisher).
PUBLISH_LANES = 4

# Queues the controller publishes into: declared so that mandatory publishing succeeds
# and messages wait there while their consumer is away.
PUBLISHED_QUEUES = (topology.CONTROLLER_REPORTS, topology.NOTIFIER_EVENTS, topology.CONTROLLER_JOBS)
# Reports applied in one transaction at most, and the lanes applying them (a gateway's
# reports always take the same lane, so they are applied in the order it sent them).
# Most of a report's cost is per report (decoding it, its share of each statement), but
# each batch costs a job lock, a few round trips and a commit: a fleet's reports keep the
# batches large. The lanes of one job wait for each other on its lock ("How reports are
# ingested" in README.md has the numbers).
REPORT_BATCH = 2000
REPORT_LANES = 2


def reports_consumer(bus: BusConfig, on_reports: BatchHandler) -> Consumer:
    """The consumer of the controller's reports queue, as a controller process runs it:
    up to REPORT_BATCH reports at hand go to ``on_reports`` (``Engine.on_reports``)
    together, and are applied in one transaction."""
    return Consumer(
        bus,
        topology.CONTROLLER_REPORTS,
        Batched(on_reports, REPORT_BATCH),
        queues=PUBLISHED_QUEUES,
        prefetch=REPORT_BATCH * REPORT_LANES,
        workers=REPORT_LANES,
        name="controller-reports",
        # A gateway's reports are applied in the order it sent them.
        lane=lambda delivery: topology.reporting_gateway(delivery.routing_key),
    )


class ControllerApp:
    def __init__(
        self,
        config: ControllerConfig,
        ready_fd: int | None = None,
        *,
        limits: Limits = DEFAULT_LIMITS,
        http: HostPort | None = None,
    ) -> None:
        self.config = config
        self._ready_fd = ready_fd
        self._limits = limits
        self._http = http  # where the web console listens; None: no console
        self._stop = threading.Event()
        self.port: int | None = None
        self.gateway_port: int | None = None
        self.http_port: int | None = None

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        config = self.config
        if config.trust_root is None:
            raise ConfigError(
                "the controller needs a trust root (root.json from `upgradectl keys init`)"
            )
        private_dir(config.data_dir)
        trust = Trust.open(config.data_dir, config.trust_root, config.online_keys)
        ca = CertificateAuthority(config.pki_dir)
        server_names = [*pki.default_names(config.listen.host), *config.tls_names]
        if self._http is not None:
            server_names += pki.default_names(self._http.host)
        server_names = list(dict.fromkeys(server_names))
        for path in ca.init(server_names, utc_now()):
            log.warning("tls_material_created", file=str(path))
            if path == ca.ca_path:
                print(
                    f"controller-svc: made a certificate authority in {ca.directory}. Give "
                    f"{ca.ca_path} to operators (upgradectl --ca-cert FILE, or "
                    "HITLESS_CA_CERT) and to gateways (gateway-daemon --ca-cert FILE); "
                    "ca.key never leaves this host.",
                    file=sys.stderr,
                )
        engine_db = db.make_engine(config.db_url)
        try:
            return self._serve(engine_db, trust, ca)
        finally:
            # Here, whatever failed: a process exits without collecting its objects
            # (hitless.heap), so a pooled connection is closed only by this.
            engine_db.dispose()

    def _serve(self, engine_db: sqlalchemy.Engine, trust: Trust, ca: CertificateAuthority) -> int:
        """Migrate the database on ``engine_db``, start every part and serve until stopped;
        the exit code."""
        config = self.config
        migrated = db.migrate(engine_db)
        log.info("database_ready", migrated=migrated)
        store = ArtifactStore(config.artifact_dir)
        publisher = Publisher(
            config.bus, queues=PUBLISHED_QUEUES, name="controller-publisher", lanes=PUBLISH_LANES
        )
        publisher.start()
        repo = Repository(engine_db)
        admins = Admins(repo.sessions)
        upgrader = (
            ControllerUpgrader(config, store, trust, hand_over=self._stop.set, http=self._http)
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
        users = Users(repo.sessions)
        jobs = Consumer(
            config.bus,
            topology.CONTROLLER_JOBS,
            ManagementJobs(engine, rejections, utc_now, audit).handle,
            queues=PUBLISHED_QUEUES,
            name="controller-jobs",
        )
        if config.broker_api:
            on_report = ReportSenders(config.broker_user_prefix, config.bus.user).checked_batch(
                engine.on_reports
            )
        else:
            on_report = engine.on_reports
            log.warning(
                "reports_not_tied_to_gateways",
                hint="without --broker-api every gateway shares one broker login, so a "
                "report's sender is not checked; give the management API to make a broker "
                "user per gateway",
            )
        consumer = reports_consumer(config.bus, on_report)
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
        broker = (
            BrokerAccess(config.broker_api, prefix=config.broker_user_prefix)
            if config.broker_api
            else None
        )
        if broker is not None:
            broker.check()
        enrollments = Enrollments(
            repo.sessions, ca, broker.gateways(vhost_of(config.bus.url)) if broker else None
        )
        if broker is not None:
            gateway_users = broker.gateways(vhost_of(config.bus.url))
            threading.Thread(
                target=_refresh_gateway_grants,
                args=(enrollments, gateway_users),
                name="gateway-grants",
                daemon=True,
            ).start()
        operator_certificates = OperatorCertificates(repo.sessions, ca)
        server, self.port, self.gateway_port = build_server(
            config.listen,
            config.gateway_address,
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
                enrollments=enrollments,
                operator_certificates=operator_certificates,
                users=users,
                limits=self._limits,
            ),
            ArtifactsService(
                store, trust.repository, limits=self._limits, withdrawn=engine.withdrawn
            ),
            ca=ca,
            tokens=tokens,
            audit=audit,
            enrollments=enrollments,
            operator_certificates=operator_certificates,
            root_metadata=lambda: trust.repository.metadata("root.json"),
            limits=self._limits,
        )
        poller = (
            threading.Thread(
                target=feed.run, args=(config.feed_interval_s, self._stop), name="feed", daemon=True
            )
            if feed
            else None
        )
        console = None
        if self._http is not None:
            # Imported here: a controller without the console never loads the web stack.
            from controller_svc.web.serve import console_server

            console = console_server(
                self._http, engine=engine, admins=admins, rejections=rejections, audit=audit,
                users=users, ca=ca, data_dir=config.data_dir, stopping=self._stop,
                grace_s=STOP_GRACE_S,
            )  # fmt: skip
        try:
            engine.start()
            consumer.start()
            jobs.start()
            server.start()
            if console is not None:
                self.http_port = console.start()
            if poller is not None:
                poller.start()
            log.info(
                "controller_serving",
                listen=f"{config.listen.host}:{self.port}",
                gateway_listen=f"{config.gateway_address.host}:{self.gateway_port}",
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
            if console is not None:
                console.stop()
            server.stop(STOP_GRACE_S)
            if poller is not None:
                poller.join(timeout=STOP_GRACE_S)
            jobs.stop()
            consumer.stop()
            engine.stop()
            publisher.close()
        return 0


def _refresh_gateway_grants(enrollments: Enrollments, users: GatewayUsers) -> None:
    """Give every enrolled gateway's broker user this release's grant (a report kind added
    since it enrolled), once, in the background as the controller starts; a gateway that
    cannot be updated is logged and left as it was."""
    updated = 0
    for record in enrollments.list(datetime.now(UTC)):
        if record.state != "ENROLLED" or not record.broker_user:
            continue
        try:
            updated += users.refresh_gateway(record.gateway_id)
        except (BrokerAccessError, InvalidName) as exc:
            log.warning("gateway_grant_not_refreshed", gateway_id=record.gateway_id, error=str(exc))
    log.info("gateway_grants_refreshed", gateways=updated)
