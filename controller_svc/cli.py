"""``controller-svc``: the controller's command line. Flags and environment are read here only.

controller-svc serve --trust-root FILE [--online-keys DIR] [--listen HOST:PORT] [--db URL]
                     [--gateway-listen HOST:PORT] [--tls-name NAME ...] [--broker-api URL]
                     [--amqp URL] [--data-dir DIR] [--http HOST:PORT|off]
controller-svc pki init [--data-dir DIR] [--listen HOST:PORT] [--tls-name NAME ...]
controller-svc broker user --role controller|notifier|job-publisher --name USER [--vhost V]
                           [--password-stdin]
controller-svc broker migrate-queues [--vhost V]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path

from controller_svc import broker_access, takeover
from controller_svc.selfupgrade import exec_recorded_release
from hitless import config, heap, logs, pki
from hitless.errors import ConfigError, HitlessError

# Where the web console listens (HTTPS), unless --http says otherwise; "off": no console.
ENV_HTTP_LISTEN = config.ENV_HTTP_LISTEN
DEFAULT_HTTP_LISTEN = config.DEFAULT_HTTP_LISTEN
HTTP_OFF = "off"
# `broker migrate-queues`: some queue is still classic (each is listed with the reason).
EXIT_QUEUES_KEPT = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="controller-svc", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the controller")
    serve.add_argument("--listen", help=f"gRPC HOST:PORT (default {config.DEFAULT_CONTROLLER})")
    serve.add_argument("--db", help=f"database URL (env {config.ENV_DB_URL})")
    serve.add_argument("--amqp", help=f"broker URL (env {config.ENV_AMQP_URL})")
    serve.add_argument("--data-dir", help=f"artifacts and SQLite file (env {config.ENV_DATA_DIR})")
    serve.add_argument(
        "--trust-root", type=Path, metavar="FILE",
        help="root.json made by `upgradectl keys init`: the trust anchor of the releases "
        f"this controller publishes and runs (env {config.ENV_TRUST_ROOT}); required",
    )  # fmt: skip
    serve.add_argument(
        "--online-keys", type=Path, metavar="DIR",
        help="the snapshot, timestamp and command keys (default: online/ beside the trust "
        "root); never the root or targets keys",
    )  # fmt: skip
    serve.add_argument(
        "--command-deadline", type=int, default=config.DEFAULT_COMMAND_DEADLINE_S, metavar="S",
        help="seconds a gateway has to take an upgrade command",
    )  # fmt: skip
    serve.add_argument(
        "--release-feed", metavar="DIR|URL",
        help="where new releases appear: a directory or an http(s) URL (see README)",
    )  # fmt: skip
    serve.add_argument(
        "--feed-interval", type=float, default=config.DEFAULT_FEED_INTERVAL_S, metavar="S",
        help="seconds between checks of the release feed",
    )  # fmt: skip
    serve.add_argument(
        "--no-self-upgrade", dest="self_upgrade", action="store_false",
        help="upgrade only the fleet; never move this controller to the release first",
    )  # fmt: skip
    _tls_arguments(serve)
    serve.add_argument(
        "--gateway-listen", metavar="HOST:PORT",
        help="where gateways download, with their client certificates (env "
        f"{config.ENV_GATEWAY_LISTEN}; default: the --listen host, port "
        f"{config.DEFAULT_GATEWAY_PORT})",
    )  # fmt: skip
    serve.add_argument(
        "--broker-api", metavar="URL",
        help="RabbitMQ's management API, http://USER:PASS@HOST:15672, for a broker user per "
        f"gateway made at enrollment (env {config.ENV_BROKER_API}; prefer the variable: "
        "flags show in ps)",
    )  # fmt: skip
    serve.add_argument(
        "--broker-user-prefix", default=config.DEFAULT_BROKER_USER_PREFIX, metavar="TEXT",
        help="prefix of the broker users made for gateways",
    )  # fmt: skip
    serve.add_argument(
        "--http", metavar="HOST:PORT|off",
        help="where the web console listens, over HTTPS with the controller's server "
        f"certificate (env {ENV_HTTP_LISTEN}; default {DEFAULT_HTTP_LISTEN}); off: no console",
    )  # fmt: skip
    # Internal: set by the controller version that starts this one (inline upgrade).
    serve.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    pki = commands.add_parser("pki", help="the controller's certificate authority")
    pki_commands = pki.add_subparsers(dest="pki_command", required=True)
    init = pki_commands.add_parser(
        "init",
        help="make the CA and the server certificate in <data dir>/pki (serve does it too, on "
        "its first start)",
    )
    init.add_argument(
        "--data-dir", help=f"the controller's data directory (env {config.ENV_DATA_DIR})"
    )
    init.add_argument("--listen", help="the API address the certificate must cover")
    _tls_arguments(init)
    broker = commands.add_parser("broker", help="the services' own broker users")
    broker_commands = broker.add_subparsers(dest="broker_command", required=True)
    user = broker_commands.add_parser(
        "user",
        help="make (or update) a service's broker user with the least it needs, through the "
        f"management API in {config.ENV_BROKER_API} (README: Broker users and permissions)",
    )
    user.add_argument(
        "--role", required=True, choices=sorted(broker_access.SERVICE_GRANTS),
        help="which service the user is for",
    )  # fmt: skip
    user.add_argument("--name", required=True, metavar="USER", help="the broker user name")
    user.add_argument("--vhost", default="/", help="the vhost its permissions are for (default /)")
    user.add_argument(
        "--password-stdin", action="store_true",
        help="read the password from stdin (default: make a random one and print it once)",
    )  # fmt: skip
    user.add_argument("--broker-api", metavar="URL", help=argparse.SUPPRESS)
    migrate = broker_commands.add_parser(
        "migrate-queues",
        help="move the command, report, job and event queues that are still classic queues "
        "to quorum queues, each once it is empty and unused, through the management API in "
        f"{config.ENV_BROKER_API} (README: Troubleshooting)",
    )
    migrate.add_argument("--vhost", default="/", help="the deployment's vhost (default /)")
    migrate.add_argument("--broker-api", metavar="URL", help=argparse.SUPPRESS)
    return parser


def _management_url(args: argparse.Namespace) -> str:
    url: str | None = args.broker_api or config.env_secret(config.ENV_BROKER_API)
    if not url:
        raise ConfigError(
            f"set {config.ENV_BROKER_API} (or {config.ENV_BROKER_API}_FILE) to the management "
            "API of a RabbitMQ administrator, http://USER:PASS@HOST:15672"
        )
    return url


def _broker(args: argparse.Namespace) -> int:
    if args.broker_command == "migrate-queues":
        return _migrate_queues(args)
    return _broker_user(args)


def _migrate_queues(args: argparse.Namespace) -> int:
    """One line per queue; EXIT_QUEUES_KEPT when any stays classic (run it again later)."""
    access = broker_access.BrokerAccess(_management_url(args))
    moves = access.migrate_queues(args.vhost)
    for move in moves:
        print(f"{move.queue}: {move.outcome}" + (f": {move.reason}" if move.reason else ""))
    kept = [m for m in moves if m.outcome == broker_access.QueueMove.KEPT]
    if kept:
        print(
            f"{len(kept)} queue(s) kept classic; they work as they are. Stop their consumers "
            "(a gateway queue: its gateway) or let them drain, then run this again.",
            file=sys.stderr,
        )
        return EXIT_QUEUES_KEPT
    print(f"every queue of vhost {args.vhost} that should be a quorum queue is one")
    return 0


def _broker_user(args: argparse.Namespace) -> int:
    url = _management_url(args)
    if args.password_stdin:
        password = sys.stdin.readline().strip()
        shown = False
    else:
        password, shown = broker_access.new_password(), True
    access = broker_access.BrokerAccess(url)
    access.check()
    access.ensure_service_user(args.vhost, args.role, args.name, password)
    grant = broker_access.SERVICE_GRANTS[args.role]
    print(f"broker user {args.name} ({args.role}) in vhost {args.vhost}: {grant.why}")
    if shown:
        print(f"its password, shown once:\n\n    {password}\n")
    return 0


def _tls_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tls-name", action="append", default=[], metavar="NAME",
        help="a DNS name or IP address the server certificate covers, besides the listen "
        "host, localhost, the loopback addresses and this host's name (repeatable)",
    )  # fmt: skip


def _pki_init(args: argparse.Namespace) -> int:
    data = config.data_dir(args.data_dir)
    listen = config.HostPort.parse(args.listen or config.DEFAULT_CONTROLLER, what="listen address")
    ca = pki.CertificateAuthority(data / "pki")
    written = ca.init([*pki.default_names(listen.host), *args.tls_name], datetime.now(UTC))
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"{ca.directory} is complete already; nothing written")
    print(
        f"Give {ca.ca_path} to operators (upgradectl --ca-cert, or {config.ENV_CA_CERT}) and "
        "to gateways at enrollment (gateway-daemon --ca-cert); ca.key never leaves this host."
    )
    return 0


def _config(args: argparse.Namespace) -> config.ControllerConfig:
    data = config.data_dir(args.data_dir)
    trust_root = args.trust_root or os.environ.get(config.ENV_TRUST_ROOT)
    if not trust_root:
        raise ConfigError(
            "the controller needs a trust root: give --trust-root FILE (the root.json that "
            f"`upgradectl keys init --dir DIR` made) or set {config.ENV_TRUST_ROOT}"
        )
    return config.ControllerConfig(
        listen=config.HostPort.parse(
            args.listen or config.DEFAULT_CONTROLLER, what="listen address"
        ),
        db_url=args.db or config.env_secret(config.ENV_DB_URL) or config.default_db_url(data),
        bus=config.BusConfig.from_env(
            args.amqp or config.env_secret(config.ENV_AMQP_URL) or config.DEFAULT_AMQP_URL
        ),
        data_dir=data,
        command_deadline_s=args.command_deadline,
        release_feed=args.release_feed,
        feed_interval_s=args.feed_interval,
        self_upgrade=args.self_upgrade,
        trust_root=Path(trust_root).absolute(),
        online_keys=args.online_keys.absolute() if args.online_keys else None,
        gateway_listen=(
            config.HostPort.parse(gateway_listen, what="gateway listen address")
            if (gateway_listen := args.gateway_listen or os.environ.get(config.ENV_GATEWAY_LISTEN))
            else None
        ),
        tls_names=tuple(args.tls_name),
        broker_api=args.broker_api or config.env_secret(config.ENV_BROKER_API) or None,
        broker_user_prefix=args.broker_user_prefix,
    )


def _http(args: argparse.Namespace) -> config.HostPort | None:
    """Where the web console listens: --http, else $HITLESS_HTTP_LISTEN, else the
    default; None for "off"."""
    text = args.http or os.environ.get(ENV_HTTP_LISTEN) or DEFAULT_HTTP_LISTEN
    if text.strip().lower() == HTTP_OFF:
        return None
    return config.HostPort.parse(text, what="web console address (--http)")


def main(argv: list[str] | None = None) -> int:
    heap.freeze_at_exit()
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    logs.configure("controller-svc", json=True)
    if args.command in ("pki", "broker"):
        try:
            return _pki_init(args) if args.command == "pki" else _broker(args)
        except (ConfigError, OSError) as exc:
            print(f"controller-svc: error: {exc}", file=sys.stderr)
            return 2
        except HitlessError as exc:
            print(f"controller-svc: error: {exc}", file=sys.stderr)
            return 1
    try:
        # Imported here, so that a release whose controller cannot even load still tells
        # the controller that started it why (through the ready pipe).
        from controller_svc.app import ControllerApp

        config = _config(args)
        if args.ready_fd is None and config.self_upgrade:
            exec_recorded_release(config.data_dir, argv)
        app = ControllerApp(config, ready_fd=args.ready_fd, http=_http(args))
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: app.stop())
        return app.run()
    except ConfigError as exc:
        takeover.report_failure(args.ready_fd, exc)
        print(f"controller-svc: error: {exc}", file=sys.stderr)
        return 2
    except (HitlessError, OSError) as exc:
        takeover.report_failure(args.ready_fd, exc)
        print(f"controller-svc: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        takeover.report_failure(args.ready_fd, exc)
        raise


if __name__ == "__main__":
    sys.exit(main())
