"""``notifier``: consumes release and job events from the bus.

    notifier run [--amqp URL] [--smtp HOST:PORT]

This version records each event in its log; email delivery to the admins is built on
this consumer.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from hitless import config, logs
from hitless.bus import topology
from hitless.bus.amqp import Consumer, Delivery
from hitless.errors import ConfigError

log = logs.get(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="notifier", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the notifier")
    run.add_argument("--amqp", help=f"broker URL (env {config.ENV_AMQP_URL})")
    run.add_argument("--smtp", default="127.0.0.1:25", help="SMTP server HOST:PORT")
    return parser


def _on_event(delivery: Delivery) -> None:
    log.info("event_received", key=delivery.routing_key, message_id=delivery.message_id)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    logs.configure("notifier", json=True)
    try:
        bus = config.BusConfig(
            args.amqp or os.environ.get(config.ENV_AMQP_URL) or config.DEFAULT_AMQP_URL
        )
        config.HostPort.parse(args.smtp, what="SMTP address")
    except ConfigError as exc:
        print(f"notifier: error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    consumer = Consumer(bus, topology.NOTIFIER_EVENTS, _on_event, name="notifier-events").start()
    try:
        stop.wait()
    finally:
        consumer.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
