"""``controller-svc``: the controller's command line. Flags and environment are read here only.

controller-svc serve --trust-root FILE [--online-keys DIR] [--listen HOST:PORT] [--db URL]
                     [--amqp URL] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from controller_svc import takeover
from controller_svc.selfupgrade import exec_recorded_release
from hitless import config, logs
from hitless.errors import ConfigError, HitlessError


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
    # Internal: set by the controller version that starts this one (inline upgrade).
    serve.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    return parser


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
        db_url=args.db or os.environ.get(config.ENV_DB_URL) or config.default_db_url(data),
        bus=config.BusConfig(
            args.amqp or os.environ.get(config.ENV_AMQP_URL) or config.DEFAULT_AMQP_URL
        ),
        data_dir=data,
        command_deadline_s=args.command_deadline,
        release_feed=args.release_feed,
        feed_interval_s=args.feed_interval,
        self_upgrade=args.self_upgrade,
        trust_root=Path(trust_root).absolute(),
        online_keys=args.online_keys.absolute() if args.online_keys else None,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    logs.configure("controller-svc", json=True)
    try:
        # Imported here, so that a release whose controller cannot even load still tells
        # the controller that started it why (through the ready pipe).
        from controller_svc.app import ControllerApp

        config = _config(args)
        if args.ready_fd is None and config.self_upgrade:
            exec_recorded_release(config.data_dir, argv)
        app = ControllerApp(config, ready_fd=args.ready_fd)
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
