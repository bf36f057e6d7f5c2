"""``upgradectl``: the operator's command line over the controller's gRPC API.

    upgradectl [--controller HOST:PORT] [--ca-cert FILE] [--token-file FILE] gateways list
    upgradectl --controller HOST:GATEWAY_PORT --client-cert FILE --client-key FILE ...
    upgradectl gateways enroll ID [--expires D] [--json]
    upgradectl gateways enrollments [--json]
    upgradectl gateways revoke ID
    upgradectl keys init --dir DIR
    upgradectl keys rotate --dir DIR (--roles ROLE,... | --resend)
    upgradectl releases list [--json]
    upgradectl releases build --version V -o FILE
    upgradectl releases publish --version V --artifact FILE [--notes FILE]
                                [--restarts-vpn-service] [--min-from V] [--keys DIR]
    upgradectl releases yank V --keys DIR [--yes]
    upgradectl releases sync [--json]
    upgradectl upgrade (--latest | --version V) [--gateways ID,...] [--allow-downgrade]
                       [--deadline SECONDS] [--request-id ID] [--wait] [--yes] [--json]
    upgradectl status [JOB] [--watch] [--json]
    upgradectl jobs list [--json]
    upgradectl jobs rejected [--json]
    upgradectl jobs (allow-publisher USER | disallow-publisher USER | publishers [--json])
    upgradectl admins (add EMAIL | remove EMAIL | list [--json])
    upgradectl tokens create --role viewer|operator|admin --name NAME [--expires D] [--json]
    upgradectl tokens list [--json]
    upgradectl tokens revoke NAME
    upgradectl users add NAME --role viewer|operator|admin --password-stdin
    upgradectl users list [--json]
    upgradectl users remove NAME
    upgradectl certs issue --name NAME --role viewer|operator|admin [--expires D] --out DIR
                           [--json]
    upgradectl certs list [--json]
    upgradectl certs revoke NAME
    upgradectl audit [--since T] [--json]

The controller is ``--controller``, else ``$HITLESS_CONTROLLER``, else 127.0.0.1:50051;
this module is the only place that reads flags and the environment. Expected failures print
``upgradectl: error: <message>`` and exit with a code named in ``upgradectl.errors.ExitCode``.

Every call goes over TLS to a controller whose certificate chains to ``--ca-cert`` (else
``$HITLESS_CA_CERT``), its ``<data dir>/pki/ca.pem``, and carries the operator's API
token: ``$HITLESS_TOKEN``, else the file named by ``--token-file`` or
``$HITLESS_TOKEN_FILE`` (``upgradectl.credentials``; never a flag holding the secret, which
``ps`` would show). The file is read when a command first needs the
controller, so commands that work offline (``keys init``, ``releases build``) never read
it. The controller's refusal of the token (UNAUTHENTICATED) or of its role
(PERMISSION_DENIED) exits 4 with its words after "the controller refused the credentials".

Instead of a token, an operator may present a client certificate that ``certs issue`` made
(``--client-cert`` and ``--client-key``, else ``$HITLESS_CLIENT_CERT`` and
``$HITLESS_CLIENT_KEY``) to the controller's gateway port, the one that asks for client
certificates; no token is read or sent then. The key file must be readable by its owner
only (exit 2 otherwise); a certificate that is expired, not the key's, or not from the CA
of ``--ca-cert`` is refused here (exit 4) rather than by a handshake that would only close
the connection.

``upgrade`` shows the controller's plan (release, notes, each gateway's change) before it
starts anything, and gets the operator's consent through ``upgradectl.confirm``; so does
``releases yank``. ``keys``, ``releases publish --keys`` and ``releases yank`` sign with the
key directory through ``upgradectl.signing``. Output for
people goes to stdout; with ``--json`` stdout carries only the JSON document, and the plan
and any question go to stderr. Every line for people, error messages included, goes through
``render.printable``: text from the controller reaches a terminal with its controls escaped.
JSON is left as ``json.dumps`` writes it, which escapes every control character already.

``upgrade`` sends StartUpgrade with a request id (``--request-id``, else a fresh one), and the
controller answers a request id it has seen with the job it started then. When the answer
is lost (the controller was too slow, or the connection broke) the job may exist anyway, so
the error (``Unconfirmed``, exit 8) gives the request id and the exact command that retries
without starting a second job.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import os
import re
import shlex
import sys
import unicodedata
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, TextIO

from hitless import heap, names, semver
from hitless.config import DEFAULT_CONTROLLER, ENV_CONTROLLER, HostPort
from hitless.errors import ConfigError, HitlessError, InvalidName
from hitless.trust.roles import ROLES

# Every call pays for what upgradectl imports at start-up: what only some commands need
# (``signing``: python-tuf; ``build``; ``pki``'s key and request writers) is imported in
# those commands' handlers. tests/test_upgradectl_cli.py checks that it stays there.
from upgradectl import credentials, durations, render
from upgradectl.client import ControllerClient, RetryPolicy
from upgradectl.confirm import Terminal, agree, confirm
from upgradectl.credentials import (
    ENV_CA_CERT,
    ENV_CLIENT_CERT,
    ENV_CLIENT_KEY,
    ENV_TOKEN,
    ENV_TOKEN_FILE,
)
from upgradectl.errors import (
    ControllerFailed,
    CredentialsRefused,
    ExitCode,
    JobNotSucceeded,
    Rejected,
    Unconfirmed,
    Unreachable,
    UsageError,
    exit_code_for,
)
from upgradectl.model import JobView, LiveJob, UpgradePlan

PROG = "upgradectl"
CALL_TIMEOUT_S = 10.0
MAX_DEADLINE_S = int(names.MAX_DEADLINE.total_seconds())
# The controller stores a request id in a String(128) column. Letters, digits, '.', '_' and
# '-' only: ids of management jobs are "management:<message id>", so a typed id never
# collides with one, and a printed id is safe to paste into a shell.
REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# The controller's rule for token names (proto CreateTokenRequest.name), checked here too so
# a typo is a usage error before anything is sent.
TOKEN_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
TOKEN_ROLES = ("viewer", "operator", "admin")
# What ``certs issue --out DIR`` writes.
KEY_FILE, CERT_FILE = "key.pem", "cert.pem"
# The controller's rule for a job publisher's broker user (a message's user_id is an AMQP
# short string), checked here too.
BROKER_USER_MAX_BYTES = 255


class _ArgumentError(Exception):
    """argparse's complaint, raised instead of exiting so ``main`` stays in control."""

    def __init__(self, usage: str, message: str) -> None:
        super().__init__(message)
        self.usage = usage
        self.message = message


class _Parser(argparse.ArgumentParser):
    """Raises its errors (``run`` prints them and exits USAGE). argparse checks required
    options before it reports unknown ones, so ``upgrade --lastest`` would only say that
    --latest or --version is required: a mistyped option is named first, with the option
    it is closest to."""

    _given: tuple[str, ...] = ()
    # The options of upgradectl itself, which its commands do not take (set on commands).
    _top_level: frozenset[str] = frozenset()

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._given = tuple(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def add_subparsers(self, **kwargs: Any) -> Any:
        top_level = self._top_level or frozenset(self._option_string_actions)
        kwargs.setdefault("parser_class", functools.partial(_CommandParser, top_level=top_level))
        return super().add_subparsers(**kwargs)

    def error(self, message: str) -> NoReturn:
        if "required" in message:
            message = self._unknown_option() or message
        raise _ArgumentError(self.format_usage(), message)

    def _unknown_option(self) -> str | None:
        """'unrecognized argument X' for the first option given to this parser that it
        has not (nor abbreviates), or None."""
        known = list(self._option_string_actions)
        for arg in self._given:
            if arg == "--":
                return None
            name = arg.split("=", 1)[0]
            if not name.startswith("--") or any(option.startswith(name) for option in known):
                continue
            if name in self._top_level:
                return (
                    f"{name} is an option of upgradectl itself: give it before the command "
                    f"(upgradectl {name} ... COMMAND ...)"
                )
            close = difflib.get_close_matches(name, known, n=1)
            return f"unrecognized argument {name}" + (
                f" (did you mean {close[0]}?)" if close else ""
            )
        return None


class _CommandParser(_Parser):
    """A command's parser. Whatever it is given and does not know is an error of its own,
    shown with its usage: argparse would hand it back to the top-level parser, which
    would show the usage of upgradectl as a whole."""

    def __init__(self, *args: Any, top_level: frozenset[str] = frozenset(), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._top_level = top_level

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(self._unknown_option() or f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


@dataclass
class _Context:
    """What a command needs from outside: where to write and how to reach the controller."""

    args: argparse.Namespace
    out: TextIO
    err: TextIO
    stdin: TextIO
    connect: Callable[[], ControllerClient]

    @property
    def people(self) -> TextIO:
        """Where words for people go: stdout, except beside ``--json`` output."""
        return self.err if getattr(self.args, "json", False) else self.out

    def emit_json(self, data: Any) -> None:
        self.out.write(json.dumps(data, indent=2) + "\n")

    def emit_lines(self, lines: Sequence[str]) -> None:
        self.out.write("".join(f"{render.printable(line)}\n" for line in lines))

    def tell(self, lines: Sequence[str]) -> None:
        """Lines for people, kept out of the way of JSON output."""
        self.people.write("".join(f"{render.printable(line)}\n" for line in lines))
        self.people.flush()


def main(argv: list[str] | None = None) -> int:
    """Run ``upgradectl`` with ``argv`` (default: the process's arguments); the exit code."""
    heap.freeze_at_exit()
    return run(argv)


def run(
    argv: Sequence[str] | None,
    *,
    env: Mapping[str, str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    retry: RetryPolicy | None = None,
    stdin: TextIO | None = None,
    call_timeout: float = CALL_TIMEOUT_S,
) -> int:
    """``main`` with its surroundings passed in, for tests and embedding.

    ``stdin`` is where a question is answered; it is asked only when it is a terminal.
    ``call_timeout`` is how long each call waits for the controller's answer, in seconds.
    """
    env = os.environ if env is None else env
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    stdin = sys.stdin if stdin is None else stdin
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except _ArgumentError as exc:
        err.write(exc.usage)
        err.write(f"{PROG}: error: {exc.message}\n")
        return ExitCode.USAGE
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else ExitCode.USAGE

    try:
        controller = HostPort.parse(
            args.controller or env.get(ENV_CONTROLLER) or DEFAULT_CONTROLLER,
            what="controller address",
        )

        def connect() -> ControllerClient:
            cert_file = args.client_cert or env.get(ENV_CLIENT_CERT)
            key_file = args.client_key or env.get(ENV_CLIENT_KEY)
            with_certificate = bool(cert_file or key_file)
            caller = (
                None
                if with_certificate
                else credentials.load(
                    token=env.get(ENV_TOKEN),
                    token_file=args.token_file,
                    env_token_file=env.get(ENV_TOKEN_FILE),
                )
            )
            ca_cert = credentials.load_ca(ca_cert=args.ca_cert, env_ca_cert=env.get(ENV_CA_CERT))
            certificate = (
                credentials.load_client_certificate(cert_file, key_file, ca_cert)
                if with_certificate
                else None
            )
            return ControllerClient(
                controller,
                call_timeout,
                ca_cert=ca_cert,
                credentials=caller,
                client_certificate=certificate,
                retry=retry,
            )

        handler: Callable[[_Context], ExitCode] = args.handler
        return int(handler(_Context(args, out, err, stdin, connect)))
    except HitlessError as exc:
        out.flush()
        # Messages quote the controller's words (refusals, reasons): escape what they carry.
        err.write(f"{PROG}: error: {render.printable(str(exc), keep_newlines=True)}\n")
        return exit_code_for(exc)
    except KeyboardInterrupt:
        # Jobs run in the controller: stopping the watch stops nothing else.
        err.write(f"\n{PROG}: interrupted; jobs already started go on in the controller\n")
        return ExitCode.INTERRUPTED


def _build_parser() -> _Parser:
    parser = _Parser(prog=PROG, description="Hitless software upgrades for a gateway fleet.")
    parser.add_argument(
        "--controller",
        metavar="HOST:PORT",
        help=f"the controller's gRPC address (default: ${ENV_CONTROLLER}, "
        f"else {DEFAULT_CONTROLLER})",
    )
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        help=f"a file holding the API token to send, as 'tokens create' printed it "
        f"(default: ${ENV_TOKEN_FILE}); ${ENV_TOKEN}, when set, is sent instead. The secret "
        "itself is never a flag: command lines are visible to every user (ps)",
    )
    parser.add_argument(
        "--ca-cert",
        metavar="FILE",
        help=f"the CA certificate that the controller's TLS certificate must chain to, its "
        f"<data dir>/pki/ca.pem (default: ${ENV_CA_CERT})",
    )
    parser.add_argument(
        "--client-cert",
        metavar="FILE",
        help="an operator's client certificate ('certs issue' wrote it) to present instead of "
        "an API token; the controller asks for it on its gateway port (controller-svc "
        f"--gateway-listen), so point --controller there (default: ${ENV_CLIENT_CERT})",
    )
    parser.add_argument(
        "--client-key",
        metavar="FILE",
        help=f"the key of --client-cert, readable by its owner only (default: ${ENV_CLIENT_KEY})",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gateways = commands.add_parser("gateways", help="the gateways the controller knows")
    gateways_sub = gateways.add_subparsers(dest="action", required=True, metavar="ACTION")
    gw_list = gateways_sub.add_parser("list", help="list gateways, their versions and state")
    gw_list.add_argument("--json", action="store_true", help="print JSON for machines")
    gw_list.set_defaults(handler=_gateways_list)
    gw_enroll = gateways_sub.add_parser(
        "enroll",
        help="make a one-time code with which a gateway gets its certificate and broker "
        "credentials (gateway-daemon enroll); needs the admin role",
    )
    gw_enroll.add_argument("gateway_id", type=_gateway_id, metavar="ID", help="e.g. gw-1")
    gw_enroll.add_argument(
        "--expires",
        type=_duration,
        metavar="D",
        help="the code stops working this long from now, e.g. 1h, 7d (default: 24h; at most 30d)",
    )
    gw_enroll.add_argument(
        "--json", action="store_true", help='print {"gateway_id", "code", "expires_at"}'
    )
    gw_enroll.set_defaults(handler=_gateways_enroll)
    gw_enrollments = gateways_sub.add_parser(
        "enrollments", help="every gateway enrollment: pending codes, certificates, revocations"
    )
    gw_enrollments.add_argument("--json", action="store_true", help="print JSON for machines")
    gw_enrollments.set_defaults(handler=_gateways_enrollments)
    gw_revoke = gateways_sub.add_parser(
        "revoke",
        help="revoke a gateway's certificate and delete its broker user: it can download and "
        "report nothing more until it enrolls again",
    )
    gw_revoke.add_argument(
        "gateway_id", type=_gateway_id, metavar="ID", help="the gateway's id, e.g. gw-1"
    )
    gw_revoke.set_defaults(handler=_gateways_revoke)

    keys = commands.add_parser(
        "keys", help="the signing keys: the release manager's key directory and rotations"
    )
    keys_sub = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    keys_init = keys_sub.add_parser(
        "init",
        help="make a key directory: the trust anchor root.json, offline root and targets "
        "keys, and online/ keys for the controller",
    )
    keys_init.add_argument(
        "--dir",
        required=True,
        type=Path,
        metavar="DIR",
        help="where to make it; refused if keys are already there (nothing is overwritten)",
    )
    keys_init.set_defaults(handler=_keys_init)
    keys_rotate = keys_sub.add_parser(
        "rotate",
        help="replace keys: sign the next root version and have the controller take it",
    )
    keys_rotate.add_argument(
        "--dir",
        required=True,
        type=Path,
        metavar="DIR",
        help="the key directory 'keys init' made (its root key signs the rotation)",
    )
    rotation = keys_rotate.add_mutually_exclusive_group(required=True)
    rotation.add_argument(
        "--roles",
        type=_roles,
        metavar="ROLE,...",
        help=f"the roles to give new keys, some of {','.join(ROLES)}; replacing targets "
        "also re-signs the controller's current targets with the new key",
    )
    rotation.add_argument(
        "--resend",
        action="store_true",
        help="send the newest root in DIR again, made by a rotation the controller did not "
        "take (rotates nothing)",
    )
    keys_rotate.set_defaults(handler=_keys_rotate)

    releases = commands.add_parser("releases", help="release artifacts")
    releases_sub = releases.add_subparsers(dest="action", required=True, metavar="ACTION")
    rel_list = releases_sub.add_parser("list", help="list published releases, newest first")
    rel_list.add_argument("--json", action="store_true", help="print JSON for machines")
    rel_list.set_defaults(handler=_releases_list)
    rel_build = releases_sub.add_parser(
        "build", help="build a release artifact from the running code"
    )
    rel_build.add_argument("--version", required=True, help="the release version, e.g. 1.4.0")
    rel_build.add_argument(
        "-o",
        "--output",
        required=True,
        type=Path,
        metavar="FILE",
        help="where to write the artifact (replaced whole if it exists)",
    )
    rel_build.set_defaults(handler=_releases_build)
    rel_pub = releases_sub.add_parser("publish", help="upload a release artifact")
    rel_pub.add_argument("--version", required=True, help="the release version, e.g. 1.4.0")
    rel_pub.add_argument(
        "--artifact",
        required=True,
        type=Path,
        metavar="FILE",
        help="the artifact 'releases build' made for this version",
    )
    rel_pub.add_argument("--notes", type=Path, metavar="FILE", help="release notes, as text")
    rel_pub.add_argument(
        "--restarts-vpn-service",
        action="store_true",
        help="installing it restarts the VPN service, disconnecting VPN users "
        "(upgrade then asks for confirmation)",
    )
    rel_pub.add_argument(
        "--min-from",
        default="",
        metavar="V",
        help="the lowest version this release upgrades from: gateways older than V go "
        "through the releases in between, one swap each",
    )
    rel_pub.add_argument(
        "--keys",
        type=Path,
        metavar="DIR",
        help="the key directory 'keys init' made: its targets key signs the release into "
        "the controller's targets (without it the controller refuses the upload)",
    )
    rel_pub.set_defaults(handler=_releases_publish)
    rel_yank = releases_sub.add_parser(
        "yank",
        help="withdraw a release: sign targets without it, so the controller and every "
        "gateway refuse to install it",
    )
    rel_yank.add_argument(
        "version", metavar="V", type=_release_version, help="the release version, e.g. 1.4.0"
    )
    rel_yank.add_argument(
        "--keys",
        required=True,
        type=Path,
        metavar="DIR",
        help="the key directory 'keys init' made: its targets key signs the targets",
    )
    rel_yank.add_argument(
        "--yes",
        action="store_true",
        help="answer yes in advance: yank without asking (needed when standard input is not "
        "a terminal)",
    )
    rel_yank.set_defaults(handler=_releases_yank)
    rel_sync = releases_sub.add_parser(
        "sync", help="have the controller check its release feed for new releases now"
    )
    rel_sync.add_argument("--json", action="store_true", help="print JSON for machines")
    rel_sync.set_defaults(handler=_releases_sync)

    upgrade = commands.add_parser("upgrade", help="start upgrading gateways to a release")
    target = upgrade.add_mutually_exclusive_group(required=True)
    target.add_argument("--latest", action="store_true", help="the newest published release")
    target.add_argument(
        "--version", type=_release_version, help="a named published release, e.g. 1.4.0"
    )
    upgrade.add_argument(
        "--gateways", metavar="ID,...", help="only these gateways (default: every gateway)"
    )
    upgrade.add_argument(
        "--allow-downgrade",
        action="store_true",
        help="let gateways on a newer version go back to this one (refused otherwise)",
    )
    upgrade.add_argument(
        "--deadline",
        type=_seconds,
        metavar="SECONDS",
        help="a gateway that has not taken its command by then is UNREACHABLE "
        "(default: the controller's --command-deadline)",
    )
    upgrade.add_argument(
        "--request-id",
        type=_request_id,
        metavar="ID",
        help="the request id of an upgrade whose answer was lost: if the controller started a "
        "job for it, that job is the answer and no other starts (default: a fresh id)",
    )
    upgrade.add_argument(
        "--waves",
        metavar="STEP,...",
        default="",
        help="roll out in waves: each step is how many gateways are done once that wave "
        "is, a count or a percentage, ending at 100%% (e.g. 1,10%%,50%%,100%%: a canary, "
        "then 10%%, 50%%, all); a wave starts when the one before has ended "
        "(default: one wave of every gateway)",
    )
    upgrade.add_argument(
        "--max-parallel",
        type=_count,
        metavar="N",
        default=0,
        help="at most N gateways upgrading at once (default: no cap)",
    )
    upgrade.add_argument(
        "--max-failures",
        metavar="N|P%",
        default="",
        help="abort the job (no further gateway starts) once more than N gateways, or P%% "
        "of them, have failed or rolled back; 0 aborts at the first (default: no limit)",
    )
    upgrade.add_argument(
        "--soak",
        type=_soak,
        metavar="DURATION",
        default=0,
        help="after its swap, each gateway watches its data plane's health this long "
        "(e.g. 30s, 5m) and hands back, hitlessly, to the version it ran before if a tunnel "
        "goes down or drops rise; a wave starts once the one before passed (default: none)",
    )
    upgrade.add_argument(
        "--not-before",
        type=_instant,
        metavar="TIME",
        help="start no gateway before TIME, RFC 3339 (e.g. 2026-12-05T02:00:00Z); the job "
        "waits PENDING until then, and its deadline runs from then",
    )
    upgrade.add_argument(
        "--not-after", type=_instant, metavar="TIME", help="start no gateway after TIME"
    )
    upgrade.add_argument(
        "--window",
        default="",
        metavar="SPEC",
        help='start gateways only in this weekly window, e.g. "Sat 02:00-04:00 UTC" or '
        '"Mon-Fri 22:00-02:00 Europe/Paris"',
    )
    upgrade.add_argument(
        "--dry-run",
        action="store_true",
        help="show the plan with each gateway's pre-check (free space, the controller's "
        "download service, tunnels, VPN users) and start nothing",
    )
    checks = upgrade.add_mutually_exclusive_group()
    checks.add_argument(
        "--force",
        action="store_true",
        help="start gateways whose pre-check found a problem too (default: they are left out, "
        "SKIPPED with the problem)",
    )
    checks.add_argument(
        "--no-precheck", action="store_true", help="ask the gateways nothing before starting"
    )
    upgrade.add_argument("--wait", action="store_true", help="follow the job until it ends")
    upgrade.add_argument(
        "--yes",
        action="store_true",
        help="answer yes in advance: accept that a release restarting the VPN service "
        "disconnects VPN users (needed when standard input is not a terminal)",
    )
    upgrade.add_argument("--json", action="store_true", help="print JSON for machines")
    upgrade.set_defaults(handler=_upgrade)

    status = commands.add_parser("status", help="show a job (default: the most recent)")
    status.add_argument(
        "job", nargs="?", default="", metavar="JOB", help="the job's id (default: the most recent)"
    )
    status.add_argument("--watch", action="store_true", help="follow the job until it ends")
    status.add_argument("--json", action="store_true", help="print JSON for machines")
    status.set_defaults(handler=_status)

    jobs = commands.add_parser("jobs", help="upgrade jobs, from upgradectl and management")
    jobs_sub = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    jobs_list = jobs_sub.add_parser("list", help="recent jobs, newest first")
    jobs_list.add_argument("--json", action="store_true", help="print JSON for machines")
    jobs_list.set_defaults(handler=_jobs_list)
    for action, text in (
        ("pause", "start no further gateway of a job until it is resumed (those upgrading "
         "finish)"),
        ("resume", "start a paused job's next gateways again"),
        ("cancel", "withdraw a job's commands not yet taken and end it CANCELLED once the "
         "gateways upgrading have finished"),
    ):  # fmt: skip
        steer = jobs_sub.add_parser(action, help=f"{text} (needs the operator role)")
        steer.add_argument("job", metavar="JOB", help="the job's id, as 'jobs list' shows")
        if action == "cancel":
            steer.add_argument("--reason", default="", help="why, kept with the job and mailed")
        steer.add_argument("--json", action="store_true", help="print JSON for machines")
        steer.set_defaults(handler=_jobs_steer, steer=action)
    jobs_rejected = jobs_sub.add_parser(
        "rejected", help="management jobs the controller refused, and why"
    )
    jobs_rejected.add_argument("--json", action="store_true", help="print JSON for machines")
    jobs_rejected.set_defaults(handler=_jobs_rejected)
    allow_pub = jobs_sub.add_parser(
        "allow-publisher",
        help="let a broker user publish management jobs: the controller runs a job only "
        "when its user_id property names an allowed user (needs the admin role)",
    )
    allow_pub.add_argument(
        "user", type=_broker_user, metavar="USER", help="the RabbitMQ user, e.g. ops-alice"
    )
    allow_pub.set_defaults(handler=_jobs_allow_publisher)
    disallow_pub = jobs_sub.add_parser(
        "disallow-publisher",
        help="stop running management jobs a broker user publishes (needs the admin role)",
    )
    disallow_pub.add_argument(
        "user", type=_broker_user, metavar="USER", help="the user, as 'jobs publishers' shows"
    )
    disallow_pub.set_defaults(handler=_jobs_disallow_publisher)
    publishers = jobs_sub.add_parser(
        "publishers",
        help="the broker users allowed to publish management jobs (needs the admin role)",
    )
    publishers.add_argument("--json", action="store_true", help="print JSON for machines")
    publishers.set_defaults(handler=_jobs_publishers)

    admins = commands.add_parser("admins", help="who the notifier emails")
    admins_sub = admins.add_subparsers(dest="action", required=True, metavar="ACTION")
    admin_add = admins_sub.add_parser("add", help="email this address too")
    admin_add.add_argument("email", metavar="EMAIL", help="the address, e.g. ops@example.com")
    admin_add.set_defaults(handler=_admins_add)
    admin_remove = admins_sub.add_parser("remove", help="stop emailing this address")
    admin_remove.add_argument("email", metavar="EMAIL", help="the address, as 'admins list' shows")
    admin_remove.set_defaults(handler=_admins_remove)
    admin_list = admins_sub.add_parser("list", help="list the admins")
    admin_list.add_argument("--json", action="store_true", help="print JSON for machines")
    admin_list.set_defaults(handler=_admins_list)

    tokens = commands.add_parser(
        "tokens", help="operators' API tokens and their roles (needs the admin role)"
    )
    tokens_sub = tokens.add_subparsers(dest="action", required=True, metavar="ACTION")
    tok_create = tokens_sub.add_parser(
        "create", help="create a token; its secret is printed this once and never again"
    )
    tok_create.add_argument(
        "--role",
        required=True,
        choices=TOKEN_ROLES,
        help="viewer: read only; operator: also plan, start and watch upgrades; "
        "admin: everything, tokens and the audit log included",
    )
    tok_create.add_argument(
        "--name",
        required=True,
        type=_token_name,
        metavar="NAME",
        help="the token's name, e.g. ci-deploy: 1 to 64 letters, digits, '.', '_' or '-'; "
        "the audit log shows it as the actor (token:NAME)",
    )
    tok_create.add_argument(
        "--expires",
        type=_duration,
        metavar="D",
        help="the token stops working this long from now: a whole number and a unit, s, m, "
        f"h or d, e.g. 90d, 12h, 30m, 3600s; at most {durations.MAX_DURATION.days}d "
        "(default: it never expires)",
    )
    tok_create.add_argument(
        "--json",
        action="store_true",
        help="print JSON for machines, the secret included (the warning goes to stderr)",
    )
    tok_create.set_defaults(handler=_tokens_create)
    tok_list = tokens_sub.add_parser(
        "list", help="every token, revoked and expired ones included (never their secrets)"
    )
    tok_list.add_argument("--json", action="store_true", help="print JSON for machines")
    tok_list.set_defaults(handler=_tokens_list)
    tok_revoke = tokens_sub.add_parser(
        "revoke", help="revoke a token: the controller refuses it from now on"
    )
    tok_revoke.add_argument(
        "name", type=_token_name, metavar="NAME", help="the token's name, as 'tokens list' shows"
    )
    tok_revoke.set_defaults(handler=_tokens_revoke)

    users = commands.add_parser(
        "users", help="who may log in to the web console, and their roles (needs the admin role)"
    )
    users_sub = users.add_subparsers(dest="action", required=True, metavar="ACTION")
    user_add = users_sub.add_parser(
        "add", help="add a web console user; the controller keeps only a slow hash of the password"
    )
    user_add.add_argument(
        "name",
        type=_user_name,
        metavar="NAME",
        help="the user's name, e.g. alice: 1 to 64 letters, digits, '.', '_' or '-'; the audit "
        "log shows it as the actor (user:NAME)",
    )
    user_add.add_argument(
        "--role",
        required=True,
        choices=TOKEN_ROLES,
        help="viewer: read only; operator: also plan, start and watch upgrades; admin: "
        "everything the console offers",
    )
    user_add.add_argument(
        "--password-stdin",
        action="store_true",
        required=True,
        help="read the password (at least 12 characters) from the first line of standard "
        "input: never a flag, which every user could see (ps)",
    )
    user_add.set_defaults(handler=_users_add)
    user_list = users_sub.add_parser("list", help="every web console user (never a password)")
    user_list.add_argument("--json", action="store_true", help="print JSON for machines")
    user_list.set_defaults(handler=_users_list)
    user_remove = users_sub.add_parser(
        "remove", help="remove a web console user: its sessions end with their next request"
    )
    user_remove.add_argument(
        "name", type=_user_name, metavar="NAME", help="the user's name, as 'users list' shows"
    )
    user_remove.set_defaults(handler=_users_remove)

    certs = commands.add_parser(
        "certs", help="operators' client certificates and their roles (needs the admin role)"
    )
    certs_sub = certs.add_subparsers(dest="action", required=True, metavar="ACTION")
    cert_issue = certs_sub.add_parser(
        "issue",
        help="make a key here and have the controller's CA certify it for an operator; only "
        "the certificate request is sent",
    )
    cert_issue.add_argument(
        "--name",
        required=True,
        type=_certificate_name,
        metavar="NAME",
        help="whom it is for, e.g. alice: 1 to 64 letters, digits, '.', '_' or '-'; never "
        "reused; the audit log shows it as the actor (cert:NAME)",
    )
    cert_issue.add_argument(
        "--role",
        required=True,
        choices=TOKEN_ROLES,
        help="viewer: read only; operator: also plan, start and watch upgrades; admin: everything",
    )
    cert_issue.add_argument(
        "--expires",
        type=_duration,
        metavar="D",
        help="the certificate stops working this long from now, e.g. 90d, 12h "
        f"(default: 365d; at most {durations.MAX_DURATION.days}d)",
    )
    cert_issue.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help=f"where to write {KEY_FILE} (mode 0600) and {CERT_FILE}; made when missing, "
        "refused when either file is there already (nothing is overwritten)",
    )
    cert_issue.add_argument("--json", action="store_true", help="print JSON for machines")
    cert_issue.set_defaults(handler=_certs_issue)
    cert_list = certs_sub.add_parser(
        "list", help="every operator certificate, revoked and expired ones included"
    )
    cert_list.add_argument("--json", action="store_true", help="print JSON for machines")
    cert_list.set_defaults(handler=_certs_list)
    cert_revoke = certs_sub.add_parser(
        "revoke", help="revoke a certificate: the controller refuses it from now on"
    )
    cert_revoke.add_argument(
        "name",
        type=_certificate_name,
        metavar="NAME",
        help="the certificate's name, as 'certs list' shows",
    )
    cert_revoke.set_defaults(handler=_certs_revoke)

    audit = commands.add_parser(
        "audit", help="who changed what, newest first (needs the admin role)"
    )
    audit.add_argument(
        "--since",
        type=_since,
        metavar="T",
        help="only events from then on: an ISO 8601 time (e.g. 2025-03-01T12:00:00Z; UTC "
        "unless it names an offset) or a duration back from now (e.g. 2h, 7d) "
        "(default: as far back as the controller answers)",
    )
    audit.add_argument("--json", action="store_true", help="print JSON for machines")
    audit.set_defaults(handler=_audit)
    return parser


def _seconds(text: str) -> int:
    """A ``--deadline``: whole seconds, at least one."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected whole seconds, e.g. 600, not {text!r}"
        ) from None
    if not 0 < value <= MAX_DEADLINE_S:
        raise argparse.ArgumentTypeError(f"expected 1 to {MAX_DEADLINE_S} seconds, not {value}")
    return value


def _instant(text: str) -> datetime:
    """A ``--not-before`` or ``--not-after``: an RFC 3339 time with its offset."""
    try:
        value = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an RFC 3339 time such as 2026-12-05T02:00:00Z, not {text!r}"
        ) from None
    if value.utcoffset() is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no time zone: add Z (UTC) or an offset such as +01:00"
        )
    return value


def _soak(text: str) -> int:
    """A ``--soak``: a duration (``upgradectl.durations``: "30s", "5m", "1h"), whole
    seconds, at most an hour."""
    try:
        value = durations.duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    seconds = int(value.total_seconds())
    if seconds != value.total_seconds() or not 0 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(
            f"expected whole seconds from 0 to 1h (3600s), not {text!r}"
        )
    return seconds


def _count(text: str) -> int:
    """A ``--max-parallel``: a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, e.g. 5, not {text!r}") from None
    if not 0 <= value <= 1_000_000:
        raise argparse.ArgumentTypeError(f"expected 0 to 1000000, not {value}")
    return value


def _roles(text: str) -> list[str]:
    """A ``--roles`` list: role names separated by commas, each once."""
    roles = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [role for role in roles if role not in ROLES]
    if unknown or not roles:
        raise argparse.ArgumentTypeError(
            f"expected some of {','.join(ROLES)} separated by commas, not {text!r}"
        )
    return roles


def _request_id(text: str) -> str:
    """A ``--request-id``: what a failed ``upgrade`` printed, or any id of that shape."""
    if not REQUEST_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"expected 1 to 128 letters, digits, '.', '_' or '-' (the request id a failed "
            f"upgrade printed), not {text!r}"
        )
    return text


def _token_name(text: str) -> str:
    """A token's name: ``--name`` of ``tokens create``, NAME of ``tokens revoke``."""
    if not TOKEN_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"expected a token name of 1 to 64 letters, digits, '.', '_' or '-', "
            f"not {names.shown(text)}"
        )
    return text


def _user_name(text: str) -> str:
    """A web console user's name: NAME of ``users add`` and ``users remove`` (the
    controller's rule, the same as a token name's)."""
    if not TOKEN_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"expected a user name of 1 to 64 letters, digits, '.', '_' or '-', "
            f"not {names.shown(text)}"
        )
    return text


def _certificate_name(text: str) -> str:
    """An operator certificate's name: ``--name`` of ``certs issue``, NAME of ``certs
    revoke`` (the controller's rule, the same as a token name's)."""
    if not TOKEN_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"expected a certificate name of 1 to 64 letters, digits, '.', '_' or '-', "
            f"not {names.shown(text)}"
        )
    return text


def _broker_user(text: str) -> str:
    """A job publisher's broker user, by the controller's rule
    (``controller_svc.publishers.broker_user``)."""
    size = len(text.encode("utf-8", errors="replace"))
    invisible = any(unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in text)
    if not 0 < size <= BROKER_USER_MAX_BYTES or invisible or text != text.strip():
        raise argparse.ArgumentTypeError(
            f"expected a RabbitMQ user name of 1 to {BROKER_USER_MAX_BYTES} bytes, without "
            f"control characters or spaces at either end, not {names.shown(text)}"
        )
    return text


def _gateway_id(text: str) -> str:
    """A gateway id argument (``hitless.names.gateway_id``)."""
    try:
        return names.gateway_id(text)
    except InvalidName as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _release_version(text: str) -> str:
    """A release version argument: MAJOR.MINOR.PATCH (``hitless.semver``), as every
    release is published."""
    try:
        return str(semver.parse(text))
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _duration(text: str) -> timedelta:
    """An ``--expires``: a duration such as 90d (``upgradectl.durations``)."""
    try:
        return durations.duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _since(text: str) -> datetime:
    """An ``audit --since``: a time, or a duration back from now."""
    try:
        return durations.since(text, datetime.now(UTC))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _listing(ctx: _Context, json_items: list[Any], lines: Callable[[], list[str]]) -> ExitCode:
    """Print a list command's result: JSON for machines, or the table for people."""
    if ctx.args.json:
        ctx.emit_json(json_items)
    else:
        ctx.emit_lines(lines())
    return ExitCode.OK


def _gateways_list(ctx: _Context) -> ExitCode:
    with ctx.connect() as client:
        gateways = client.list_gateways()
    return _listing(
        ctx,
        [g.to_json() for g in gateways],
        lambda: render.gateways_table(gateways, datetime.now(UTC)),
    )


def _releases_list(ctx: _Context) -> ExitCode:
    with ctx.connect() as client:
        releases = client.list_releases()
    return _listing(ctx, [r.to_json() for r in releases], lambda: render.releases_table(releases))


def _releases_build(ctx: _Context) -> ExitCode:
    from upgradectl.build import build_release

    output: Path = ctx.args.output
    built = build_release(ctx.args.version, output)
    ctx.emit_lines(
        render.built_lines(ctx.args.version, shlex.quote(str(output)), built.size, built.sha256)
    )
    return ExitCode.OK


def _releases_publish(ctx: _Context) -> ExitCode:
    from upgradectl import signing

    artifact: Path = ctx.args.artifact
    if not artifact.is_file():
        raise UsageError(f"no artifact at {artifact}: build one with 'upgradectl releases build'")
    notes = ""
    if ctx.args.notes is not None:
        try:
            notes = ctx.args.notes.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read the release notes {ctx.args.notes}: {exc}") from exc
    with ctx.connect() as client:
        signed = None
        if ctx.args.keys is not None:
            signed = signing.sign_release(client, ctx.args.keys, ctx.args.version, artifact)
        release = client.publish_release(
            ctx.args.version,
            artifact,
            notes,
            restarts_vpn_service=ctx.args.restarts_vpn_service,
            targets_metadata=signed.data if signed else b"",
            min_from=ctx.args.min_from,
        )
    if signed is not None:
        signing.taken(ctx.args.keys, signed.data)
    ctx.emit_lines(render.published_lines(release, signed))
    return ExitCode.OK


def _releases_yank(ctx: _Context) -> ExitCode:
    from upgradectl import signing

    version: str = ctx.args.version
    with ctx.connect() as client:
        change = signing.sign_yank(client, ctx.args.keys, version)
        ctx.tell(render.yank_lines(version, change))
        confirm(
            f"yanking release {version}",
            yes=ctx.args.yes,
            terminal=Terminal(ctx.stdin, ctx.people),
        )
        release = client.yank_release(version, change.data)
    signing.taken(ctx.args.keys, change.data)
    ctx.emit_lines(render.yanked_lines(release, change))
    return ExitCode.OK


def _keys_init(ctx: _Context) -> ExitCode:
    from upgradectl import signing

    ctx.emit_lines(render.keys_init_lines(signing.init_keys(ctx.args.dir)))
    return ExitCode.OK


def _keys_rotate(ctx: _Context) -> ExitCode:
    from upgradectl import signing

    directory: Path = ctx.args.dir
    resend = shlex.join([*_prog_argv(ctx), "keys", "rotate", "--dir", str(directory), "--resend"])
    with ctx.connect() as client:
        if ctx.args.resend:
            rotation = signing.send_root(client, directory, resend=resend)
        else:
            rotation = signing.rotate(client, directory, ctx.args.roles, resend=resend)
    ctx.emit_lines(render.rotation_lines(rotation, str(directory)))
    return ExitCode.OK


def _releases_sync(ctx: _Context) -> ExitCode:
    with ctx.connect() as client:
        imported = client.sync_releases()
    if ctx.args.json:
        ctx.emit_json([r.to_json() for r in imported])
    elif not imported:
        ctx.emit_lines(["no new releases in the feed"])
    else:
        ctx.emit_lines(
            [
                f"imported {len(imported)} release(s) from the feed:",
                *render.releases_table(imported),
            ]
        )
    return ExitCode.OK


def _upgrade(ctx: _Context) -> ExitCode:
    gateway_ids = _gateway_ids(ctx.args.gateways)
    # One id per invocation: the client's retries of this call then start one job, not two.
    # An operator retrying an upgrade whose answer was lost passes the id it printed.
    request_id = ctx.args.request_id or str(uuid.uuid4())
    with ctx.connect() as client:
        plan = client.plan_upgrade(
            latest=ctx.args.latest,
            version=ctx.args.version or "",
            gateway_ids=gateway_ids,
            dry_run=ctx.args.dry_run,
        )
        version = plan.release.version
        if ctx.args.dry_run:
            if ctx.args.json:
                ctx.emit_json(plan_json(plan))
            else:
                ctx.emit_lines([*render.plan_lines(plan), "", "dry run: nothing was started"])
            return ExitCode.OK
        ctx.tell([*render.plan_lines(plan), ""])
        if not plan.changes:
            done = [f"nothing to do: every chosen gateway already runs {version}"]
            if ctx.args.request_id:
                done.append(
                    f"(a job started earlier with request id {request_id}, if any, is in "
                    f"'{PROG} jobs list')"
                )
            ctx.tell(done)
            if ctx.args.json:
                ctx.emit_json(
                    {
                        "job_id": None,
                        "target_version": version,
                        "state": "NOTHING_TO_DO",
                        "gateways": [],
                    }
                )
            return ExitCode.OK
        if plan.release.restarts_vpn_service:
            ctx.tell(render.vpn_warning(plan))
        consent = agree(
            plan,
            allow_downgrade=ctx.args.allow_downgrade,
            yes=ctx.args.yes,
            terminal=Terminal(ctx.stdin, ctx.people),
        )
        # Start exactly what was shown and agreed to: the planned release (not whatever is
        # latest a moment later) on the planned gateways (not one that registered since).
        try:
            job = client.start_upgrade(
                version=version,
                gateway_ids=[g.id for g in plan.gateways],
                request_id=request_id,
                allow_downgrade=consent.allow_downgrade,
                accept_vpn_disruption=consent.accept_vpn_disruption,
                deadline_seconds=ctx.args.deadline or 0,
                waves=ctx.args.waves,
                max_parallel=ctx.args.max_parallel,
                max_failures=ctx.args.max_failures,
                soak_seconds=ctx.args.soak,
                not_before=ctx.args.not_before,
                not_after=ctx.args.not_after,
                window=ctx.args.window,
                force=ctx.args.force,
                skip_prechecks=ctx.args.no_precheck,
            )
        except Unconfirmed as exc:
            raise Unconfirmed(_unconfirmed(ctx, exc, version, gateway_ids, request_id)) from exc
        if job.target_version != version:
            # The id was used before, for another upgrade: that job is all the answer says.
            raise Rejected(
                f"request id {request_id} belongs to job {job.job_id}, an upgrade to "
                f"{job.target_version}, not {version}: nothing was started; see "
                f"'{PROG} status {job.job_id}', or leave out --request-id to start a new upgrade"
            )
        if not ctx.args.wait:
            if ctx.args.json:
                ctx.emit_json(job.to_json())
            else:
                ctx.emit_lines(
                    [
                        *render.job_lines(job),
                        "",
                        f"follow it with: {PROG} status {job.job_id} --watch",
                    ]
                )
            return ExitCode.OK
        try:
            job, shown = _follow(ctx, client, job)
        except (Unreachable, ControllerFailed, CredentialsRefused) as exc:
            raise type(exc)(
                f"job {job.job_id} was started and goes on in the controller, but following "
                f"it failed: {exc}\nfollow it again with: {PROG} status {job.job_id} --watch"
            ) from exc
    return _finish(ctx, job, upgrade_shape=True, shown=shown)


def _unconfirmed(
    ctx: _Context, exc: Unconfirmed, version: str, gateway_ids: list[str], request_id: str
) -> str:
    """What to tell an operator whose StartUpgrade went unanswered: how to look, and the
    command that retries it without risking a second job (same request id, same choices)."""
    argv = _prog_argv(ctx)
    # The version the plan showed, not --latest: a release published since must not slip in.
    argv += ["upgrade", "--version", version]
    if gateway_ids:
        argv += ["--gateways", ",".join(gateway_ids)]
    if ctx.args.allow_downgrade:
        argv.append("--allow-downgrade")
    if ctx.args.deadline:
        argv += ["--deadline", str(ctx.args.deadline)]
    if ctx.args.waves:
        argv += ["--waves", ctx.args.waves]
    if ctx.args.max_parallel:
        argv += ["--max-parallel", str(ctx.args.max_parallel)]
    if ctx.args.max_failures:
        argv += ["--max-failures", ctx.args.max_failures]
    if ctx.args.soak:
        argv += ["--soak", f"{ctx.args.soak}s"]
    for flag in ("not_before", "not_after"):
        if getattr(ctx.args, flag):
            argv += [f"--{flag.replace('_', '-')}", getattr(ctx.args, flag).isoformat()]
    if ctx.args.window:
        argv += ["--window", ctx.args.window]
    argv += [
        flag
        for flag in ("--force", "--no-precheck")
        if getattr(ctx.args, flag[2:].replace("-", "_"))
    ]
    argv += ["--request-id", request_id]
    argv += [flag for flag in ("--wait", "--yes", "--json") if getattr(ctx.args, flag[2:])]
    return "\n".join(
        [
            f"{exc}; the upgrade to {version} may have started anyway (request id {request_id})",
            f"  to look: '{PROG} jobs list' (a job to {version} created just now) or "
            f"'{PROG} status' (the most recent job)",
            "  to retry safely (if that request started a job, the answer is that job and "
            "no second one starts):",
            f"    {shlex.join(argv)}",
        ]
    )


def _status(ctx: _Context) -> ExitCode:
    with ctx.connect() as client:
        job = client.get_job(ctx.args.job)
        if not ctx.args.watch:
            _show(ctx, job, upgrade_shape=False)
            return ExitCode.OK
        job, shown = _follow(ctx, client, job)
    return _finish(ctx, job, upgrade_shape=False, shown=shown)


def _follow(ctx: _Context, client: ControllerClient, job: JobView) -> tuple[JobView, bool]:
    """Watch ``job`` to its end, showing progress to people.

    Returns the controller's final picture of the job, and whether it is already on screen.
    """
    if job.finished:
        return job, False
    display = (
        None
        if ctx.args.json
        else render.LiveDisplay(ctx.out, _isatty(ctx.out), redraw_every_s=render.LIVE_REDRAW_S)
    )
    if display:
        display.start(job)
    # Each event changes the job already held (one gateway, or the job's state): no job
    # of 1,000 gateways is read again per event.
    live = LiveJob(job)
    for event in client.watch_job(job.job_id):
        live.apply(event)
        if display:
            display.update(live, event)
    # Events carry changes only; the job itself is the authoritative final picture, read
    # once at the end.
    job = client.get_job(job.job_id)
    if display:
        display.finish(job)
    return job, display is not None


def _finish(ctx: _Context, job: JobView, *, upgrade_shape: bool, shown: bool) -> ExitCode:
    if not shown:
        _show(ctx, job, upgrade_shape=upgrade_shape)
    if not job.succeeded:
        raise JobNotSucceeded(render.job_outcome(job))
    return ExitCode.OK


def _show(ctx: _Context, job: JobView, *, upgrade_shape: bool) -> None:
    if not ctx.args.json:
        ctx.emit_lines(render.job_lines(job))
        return
    data = job.to_json()
    if not upgrade_shape:
        # status lists state before target_version; keep the documented key order.
        data = {k: data[k] for k in ("job_id", "state", "target_version", "gateways")}
        data |= job.rollout_json()
    ctx.emit_json(data)


def _jobs_list(ctx: _Context) -> ExitCode:
    with ctx.connect() as client:
        jobs = client.list_jobs()
    return _listing(ctx, [j.to_listing_json() for j in jobs], lambda: render.jobs_table(jobs))


def plan_json(plan: UpgradePlan) -> dict[str, Any]:
    """``upgrade --dry-run --json``: the release, the version the controller upgrades
    itself from first (null: it does not, or a controller of an earlier release did not
    say), and each gateway's state when planned (ONLINE, OFFLINE, UPGRADING; null: not
    said), change, path through releases between (null: straight there) and pre-check
    (``precheck`` null: not asked; "": no answer; "ok" or its problems)."""
    return {
        "target_version": plan.release.version,
        "controller_from": plan.controller_from or None,
        "gateways": [
            {
                "id": g.id,
                "from_version": g.from_version,
                "state": g.state or None,
                "action": g.action,
                "path": list(g.path) or None,
                "blocked": g.blocked or None,
                "precheck": g.precheck,
                "free_bytes": g.free_bytes,
                "tunnels_up": g.tunnels or None,
            }
            for g in plan.gateways
        ],
    }


def _jobs_steer(ctx: _Context) -> ExitCode:
    """``jobs pause|resume|cancel JOB``: the job as it is after the action."""
    with ctx.connect() as client:
        job = client.steer_job(ctx.args.steer, ctx.args.job, getattr(ctx.args, "reason", ""))
    if ctx.args.json:
        ctx.emit_json(job.to_json())
    else:
        ctx.emit_lines(render.job_lines(job))
    return ExitCode.OK


def _jobs_rejected(ctx: _Context) -> ExitCode:
    with ctx.connect() as client:
        rejected = client.list_rejected_jobs()
    return _listing(ctx, [r.to_json() for r in rejected], lambda: render.rejected_table(rejected))


def _jobs_allow_publisher(ctx: _Context) -> ExitCode:
    with ctx.connect() as client:
        publisher = client.allow_publisher(ctx.args.user)
    ctx.emit_lines(render.allowed_publisher_lines(publisher))
    return ExitCode.OK


def _jobs_disallow_publisher(ctx: _Context) -> ExitCode:
    with ctx.connect() as client:
        publisher = client.disallow_publisher(ctx.args.user)
    ctx.emit_lines(render.disallowed_publisher_lines(publisher))
    return ExitCode.OK


def _jobs_publishers(ctx: _Context) -> ExitCode:
    with ctx.connect() as client:
        publishers = client.list_publishers()
    return _listing(
        ctx, [p.to_json() for p in publishers], lambda: render.publishers_table(publishers)
    )


def _admins_add(ctx: _Context) -> ExitCode:
    with ctx.connect() as client:
        email = client.add_admin(ctx.args.email)
    ctx.emit_lines([f"{email} is an admin: the notifier emails it"])
    return ExitCode.OK


def _admins_remove(ctx: _Context) -> ExitCode:
    with ctx.connect() as client:
        email = client.remove_admin(ctx.args.email)
    ctx.emit_lines([f"{email} is no longer an admin"])
    return ExitCode.OK


def _admins_list(ctx: _Context) -> ExitCode:
    with ctx.connect() as client:
        admins = client.list_admins()
    return _listing(ctx, [{"email": a} for a in admins], lambda: render.admins_table(admins))


def _gateways_enroll(ctx: _Context) -> ExitCode:
    expires: timedelta | None = ctx.args.expires
    with ctx.connect() as client:
        code = client.create_enrollment(
            ctx.args.gateway_id, int(expires.total_seconds()) if expires else 0
        )
    if ctx.args.json:
        ctx.emit_json(code.to_json())
    else:
        ctx.emit_lines(render.enrollment_code_lines(code))
    return ExitCode.OK


def _gateways_enrollments(ctx: _Context) -> ExitCode:
    with ctx.connect() as client:
        enrollments = client.list_enrollments()
    return _listing(
        ctx, [e.to_json() for e in enrollments], lambda: render.enrollments_table(enrollments)
    )


def _gateways_revoke(ctx: _Context) -> ExitCode:
    with ctx.connect() as client:
        enrollment = client.revoke_gateway(ctx.args.gateway_id)
    ctx.emit_lines(render.revoked_gateway_lines(enrollment))
    return ExitCode.OK


def _tokens_create(ctx: _Context) -> ExitCode:
    name: str = ctx.args.name
    expires: timedelta | None = ctx.args.expires
    with ctx.connect() as client:
        try:
            created = client.create_token(
                name, ctx.args.role, int(expires.total_seconds()) if expires else 0
            )
        except Unconfirmed as exc:
            raise Unconfirmed(
                f"{exc}; the token {name} may have been created, its secret lost with the "
                f"answer\n  to look: '{PROG} tokens list'\n  if it is listed: "
                f"'{PROG} tokens revoke {name}', then create a token under another name"
            ) from exc
    if ctx.args.json:
        ctx.emit_json(created.to_json())
        ctx.tell(render.secret_warning())
    else:
        ctx.emit_lines(render.created_token_lines(created))
    return ExitCode.OK


def _tokens_list(ctx: _Context) -> ExitCode:
    with ctx.connect() as client:
        tokens = client.list_tokens()
    return _listing(
        ctx,
        [t.to_json() for t in tokens],
        lambda: render.tokens_table(tokens, datetime.now(UTC)),
    )


def _tokens_revoke(ctx: _Context) -> ExitCode:
    with ctx.connect() as client:
        token = client.revoke_token(ctx.args.name)
    ctx.emit_lines(render.revoked_token_lines(token))
    return ExitCode.OK


def _users_add(ctx: _Context) -> ExitCode:
    name: str = ctx.args.name
    # One line, as `docker login --password-stdin` reads it; only its line ending is not
    # part of the password.
    password = ctx.stdin.readline().rstrip("\r\n")
    if not password:
        raise UsageError(
            "no password on standard input: give it on the first line, e.g. "
            f"'{PROG} users add {name} --role ROLE --password-stdin < FILE'"
        )
    with ctx.connect() as client:
        try:
            user = client.add_user(name, ctx.args.role, password)
        except Unconfirmed as exc:
            raise Unconfirmed(
                f"{exc}; the user {name} may have been added\n  to look: '{PROG} users list'"
            ) from exc
    ctx.emit_lines(render.added_user_lines(user))
    return ExitCode.OK


def _users_list(ctx: _Context) -> ExitCode:
    with ctx.connect() as client:
        users = client.list_users()
    return _listing(ctx, [u.to_json() for u in users], lambda: render.users_table(users))


def _users_remove(ctx: _Context) -> ExitCode:
    with ctx.connect() as client:
        user = client.remove_user(ctx.args.name)
    ctx.emit_lines(render.removed_user_lines(user))
    return ExitCode.OK


def _certs_issue(ctx: _Context) -> ExitCode:
    from hitless import pki

    name: str = ctx.args.name
    out: Path = ctx.args.out
    expires: timedelta | None = ctx.args.expires
    key_path, cert_path = out / KEY_FILE, out / CERT_FILE
    for path in (key_path, cert_path):
        if path.exists():
            raise UsageError(
                f"{path} exists already: choose another --out (nothing is overwritten)"
            )
    key = pki.new_key()
    # The key is on disk before the request leaves, so a directory that cannot take it
    # never costs a name (names are never reused).
    _write_new(key_path, pki.key_pem(key), 0o600, make_parent=True)
    try:
        with ctx.connect() as client:
            issued = client.issue_certificate(
                name,
                ctx.args.role,
                pki.certificate_request(key, name),
                int(expires.total_seconds()) if expires else 0,
            )
    except Unconfirmed as exc:
        key_path.unlink()
        raise Unconfirmed(
            f"{exc}; the certificate {name} may have been issued, lost with the answer\n"
            f"  to look: '{PROG} certs list'\n  if it is listed: '{PROG} certs revoke "
            f"{name}', then issue one under another name"
        ) from exc
    except BaseException:
        key_path.unlink()
        raise
    _write_new(cert_path, issued.certificate_pem, 0o644)
    if ctx.args.json:
        ctx.emit_json(
            {
                **issued.certificate.to_json(),
                "key_file": str(key_path),
                "certificate_file": str(cert_path),
            }
        )
    else:
        ctx.emit_lines(
            render.issued_certificate_lines(
                issued, shlex.quote(str(key_path)), shlex.quote(str(cert_path))
            )
        )
    return ExitCode.OK


def _certs_list(ctx: _Context) -> ExitCode:
    with ctx.connect() as client:
        certificates = client.list_certificates()
    return _listing(
        ctx,
        [c.to_json() for c in certificates],
        lambda: render.certificates_table(certificates, datetime.now(UTC)),
    )


def _certs_revoke(ctx: _Context) -> ExitCode:
    with ctx.connect() as client:
        certificate = client.revoke_certificate(ctx.args.name)
    ctx.emit_lines(render.revoked_certificate_lines(certificate))
    return ExitCode.OK


def _write_new(path: Path, data: bytes, mode: int, *, make_parent: bool = False) -> None:
    """Write ``data`` to the new file ``path`` with ``mode`` (its directory made 0700 when
    ``make_parent``). UsageError naming the file when it exists or cannot be written."""
    try:
        if make_parent:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _audit(ctx: _Context) -> ExitCode:
    since: datetime | None = ctx.args.since
    with ctx.connect() as client:
        events = client.list_audit(since)
    return _listing(ctx, [e.to_json() for e in events], lambda: render.audit_table(events, since))


def _prog_argv(ctx: _Context) -> list[str]:
    """``upgradectl`` with the global flags this run was given, to start a command that
    reaches the same controller with the same token file (the file, never the secret)."""
    argv = [PROG]
    if ctx.args.controller:
        argv += ["--controller", ctx.args.controller]
    if ctx.args.token_file:
        argv += ["--token-file", ctx.args.token_file]
    if ctx.args.ca_cert:
        argv += ["--ca-cert", ctx.args.ca_cert]
    if ctx.args.client_cert:
        argv += ["--client-cert", ctx.args.client_cert]
    if ctx.args.client_key:
        argv += ["--client-key", ctx.args.client_key]
    return argv


def _gateway_ids(text: str | None) -> list[str]:
    if text is None:
        return []
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if not ids:
        raise UsageError("--gateways needs at least one gateway id, e.g. --gateways gw-1,gw-2")
    try:
        return [names.gateway_id(gateway_id) for gateway_id in ids]
    except InvalidName as exc:
        raise UsageError(f"--gateways: {exc}") from exc


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
