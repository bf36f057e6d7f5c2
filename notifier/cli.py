"""``notifier``: emails the admins about releases and upgrade jobs, once per event and admin.

    notifier run [--amqp URL] [--smtp HOST:PORT] [--smtp-starttls] [--smtp-user USER]
                 [--from ADDRESS] [--state FILE] [--controller-user USER]

The SMTP password comes from the environment (HITLESS_SMTP_PASSWORD), never from a flag.
Exit codes: 0 stopped by a signal; 2 bad configuration; 3 the delivery ledger cannot be
opened.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from hitless import config, heap, logs
from hitless.errors import ConfigError
from notifier import config as notifier_config
from notifier.errors import LedgerError
from notifier.service import Notifier

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_LEDGER = 3

_TRUE = {"1", "true", "yes", "on"}


ENV_AMQP_PASSIVE = "HITLESS_AMQP_PASSIVE"


def _parser() -> argparse.ArgumentParser:
    env = notifier_config
    parser = argparse.ArgumentParser(prog="notifier", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the notifier")
    run.add_argument("--amqp", help=f"broker URL (env {config.ENV_AMQP_URL})")
    run.add_argument(
        "--smtp", help=f"SMTP server HOST:PORT (env {env.ENV_SMTP}; default {env.DEFAULT_SMTP})"
    )
    run.add_argument(
        "--smtp-starttls",
        action="store_true",
        default=None,
        help=f"upgrade the SMTP connection with STARTTLS (env {env.ENV_SMTP_STARTTLS}=1)",
    )
    run.add_argument(
        "--smtp-user",
        help=f"log in as USER; the password is read from {env.ENV_SMTP_PASSWORD} "
        f"(env {env.ENV_SMTP_USER})",
    )
    run.add_argument(
        "--from",
        dest="sender",
        help=f"sender address (env {env.ENV_SMTP_FROM}; default {env.DEFAULT_SENDER})",
    )
    run.add_argument(
        "--state",
        help=f"the delivery ledger, a SQLite file (env {env.ENV_STATE}; default "
        f"<data dir>/{env.STATE_FILE})",
    )
    run.add_argument(
        "--passive",
        action="store_true",
        default=None,
        help="declare nothing, only check that the events queue exists (the controller "
        "declares it): for a broker user made with `controller-svc broker user --role "
        f"notifier`, which may not (env {ENV_AMQP_PASSIVE}=1)",
    )
    run.add_argument(
        "--controller-user",
        metavar="USER",
        help="the broker user the controller publishes events as: events any other user "
        f"published are dead-lettered, never mailed (env {env.ENV_CONTROLLER_USER}; default "
        "the user of the --amqp URL, as when every service shares one login)",
    )
    return parser


def build_config(
    args: argparse.Namespace, environ: dict[str, str]
) -> notifier_config.NotifierConfig:
    """Flags first, then the environment, then the defaults; raises ConfigError."""
    env = notifier_config
    passive = (
        args.passive
        if args.passive is not None
        else environ.get(ENV_AMQP_PASSIVE, "").strip().lower() in _TRUE
    )
    ca_cert = environ.get(config.ENV_AMQP_CA_CERT)
    bus = config.BusConfig(
        args.amqp or config.env_secret(config.ENV_AMQP_URL, environ) or config.DEFAULT_AMQP_URL,
        passive=passive,
        ca_cert=Path(ca_cert) if ca_cert else None,
    )
    server = config.HostPort.parse(
        args.smtp or environ.get(env.ENV_SMTP) or env.DEFAULT_SMTP, what="SMTP address"
    )
    starttls = (
        args.smtp_starttls
        if args.smtp_starttls is not None
        else environ.get(env.ENV_SMTP_STARTTLS, "").strip().lower() in _TRUE
    )
    smtp = env.SmtpConfig(
        server=server,
        starttls=starttls,
        user=args.smtp_user or environ.get(env.ENV_SMTP_USER) or None,
        password=environ.get(env.ENV_SMTP_PASSWORD) or None,
    )
    state = args.state or environ.get(env.ENV_STATE)
    return env.NotifierConfig(
        bus=bus,
        smtp=smtp,
        state_path=Path(state).expanduser() if state else config.data_dir() / env.STATE_FILE,
        controller_user=(args.controller_user or environ.get(env.ENV_CONTROLLER_USER) or bus.user),
        sender=args.sender or environ.get(env.ENV_SMTP_FROM) or env.DEFAULT_SENDER,
    )


def main(argv: list[str] | None = None) -> int:
    heap.freeze_at_exit()
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = build_config(args, dict(os.environ))
    except ConfigError as exc:
        print(f"notifier: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure("notifier", json=True)
    try:
        notifier = Notifier(settings)
    except LedgerError as exc:
        print(f"notifier: error: {exc}", file=sys.stderr)
        return EXIT_LEDGER
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    notifier.start()
    try:
        stop.wait()
    finally:
        notifier.stop()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
