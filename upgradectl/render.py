"""What people see: tables, sizes, times, and the live progress of a job.

Pure functions from plain data (``upgradectl.model``) to lines of text, so every shape is
unit-testable; ``LiveDisplay`` is the one piece that writes, and it writes only to the
stream it is given.

Text from outside (release notes, versions, ids, reasons, addresses, rejected bodies, token
names, audit actors, details and outcomes) may carry terminal controls: ``printable`` shows
them escaped. Every writer of lines for people (``LiveDisplay`` here, the command output and
error messages in ``upgradectl.cli``) passes each line through it, so no field can clear
the screen, hide text or reorder it. ``table`` and ``first_line`` escape before they
measure, so columns stay aligned.
"""

from __future__ import annotations

import dataclasses
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TextIO

from upgradectl.credentials import ENV_TOKEN, ENV_TOKEN_FILE
from upgradectl.model import (
    AuditEvent,
    CertificateInfo,
    CreatedToken,
    EnrollmentCode,
    EnrollmentInfo,
    GatewayInfo,
    GatewayProgress,
    IssuedCertificate,
    JobEvent,
    JobView,
    KeyDirectory,
    LiveJob,
    PlannedGateway,
    PublisherInfo,
    RejectedJob,
    ReleaseInfo,
    Rotation,
    TargetsChange,
    TokenInfo,
    UpgradePlan,
    UserInfo,
    iso,
)

# Cursor to the start of the line N lines up, then clear to the end of the screen.
_UP = "\x1b[{n}F"
_CLEAR_DOWN = "\x1b[J"
NOTES_WIDTH = 48
# The most gateway rows the live display redraws on a terminal; a larger job shows the
# count in each state and the gateways that are moving or have failed.
LIVE_ROWS = 30
# How often the live display redraws a terminal at most, in seconds (the upgrade and
# status commands; events between two redraws are applied, just not drawn one by one).
LIVE_REDRAW_S = 0.2

# Unicode categories a terminal acts on instead of showing: Cc (C0 and C1 controls, ESC,
# DEL), Cf (format characters: bidi overrides and isolates such as U+202E, zero-width
# characters), Cs (surrogates), Zl and Zp (line and paragraph separators).
_ACTIVE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_SHORT_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def printable(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with every character a terminal would act on shown as an escape instead.

    ESC becomes ``\\x1b``, DEL ``\\x7f``, a C1 control such as CSI ``\\x9b``, U+202E
    (right-to-left override) ``\\u202e``; tab, newline and carriage return become ``\\t``,
    ``\\n`` and ``\\r``. ``keep_newlines`` leaves ``\\n`` as it is, for multi-line text such
    as an error message. Everything else, any script or emoji included, is kept. Backslashes
    are not doubled (notes stay readable), so the result is a display form, not a reversible
    encoding; applying it again changes nothing.
    """
    if text.isprintable():  # the common case, checked in C
        return text
    return "".join(_escaped(ch, keep_newlines) for ch in text)


def _escaped(ch: str, keep_newlines: bool) -> str:
    if (ch == "\n" and keep_newlines) or unicodedata.category(ch) not in _ACTIVE_CATEGORIES:
        return ch
    if ch in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[ch]
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns two spaces apart; no trailing spaces; cells made ``printable``."""
    widths = [len(h) for h in headers]
    rows = [[printable(cell) for cell in row] for row in rows]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *rows]:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return lines


def human_size(size: int) -> str:
    """``1536`` → ``1.5 KiB``; bytes below 1 KiB stay exact."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def ago(when: datetime | None, now: datetime) -> str:
    """How long before ``now``: ``12s ago``, ``5m ago``, ``3h ago``, ``2d ago``; ``never``."""
    if when is None:
        return "never"
    seconds = int((now - when).total_seconds())
    if seconds < 0:
        return "just now"  # a clock slightly ahead of ours
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def short_time(when: datetime | None) -> str:
    """``2024-05-01 12:00 UTC``: the date and minute, enough for a release list."""
    if when is None:
        return "-"
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def exact_time(when: datetime | None) -> str:
    """``2024-05-01 12:00:07 UTC``: to the second, as an audit log needs."""
    if when is None:
        return "-"
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def first_line(text: str, width: int = NOTES_WIDTH) -> str:
    """The first line of ``text``, made ``printable``, cut to ``width`` with an ellipsis."""
    line = printable(text.strip().splitlines()[0]) if text.strip() else ""
    return line if len(line) <= width else line[: width - 1] + "…"


def gateways_table(gateways: Sequence[GatewayInfo], now: datetime) -> list[str]:
    if not gateways:
        return ["no gateways known to the controller yet"]
    paired = any(g.ha_peer for g in gateways)
    rows = [
        [g.id, g.version, g.state, str(g.vpn_sessions), ago(g.last_seen, now)]
        + ([g.ha_peer or "-"] if paired else [])
        for g in gateways
    ]
    headers = ["ID", "VERSION", "STATE", "VPN USERS", "LAST SEEN"]
    return table(headers + (["HA PEER"] if paired else []), rows)


def releases_table(releases: Sequence[ReleaseInfo]) -> list[str]:
    if not releases:
        return ["no releases published yet (upgradectl releases publish)"]
    rows = [
        [
            r.version,
            human_size(r.size),
            short_time(r.published_at),
            r.sha256[:12],
            r.signing or "-",
            "restarts" if r.restarts_vpn_service else "-",
            r.min_from or "any",
            first_line(r.notes),
        ]
        for r in releases
    ]
    headers = ["VERSION", "SIZE", "PUBLISHED", "SHA256", "SIGNING", "VPN", "FROM", "NOTES"]
    return table(headers, rows)


def built_lines(version: str, output: str, size: int, sha256: str) -> list[str]:
    """What ``releases build`` made, and that it is not signed until it is published."""
    return [
        f"built {output}: release {version}, {human_size(size)}, sha256 {sha256}",
        "not signed yet: gateways and the controller take it only once the targets key lists "
        "it; sign and upload it with:",
        f"  upgradectl releases publish --version {version} --artifact {output} --keys DIR",
    ]


def published_lines(release: ReleaseInfo, signed: TargetsChange | None) -> list[str]:
    """What ``releases publish`` uploaded, and the targets version that signs it."""
    lines = [f"published {release.version}: {human_size(release.size)}, sha256 {release.sha256}"]
    if signed is not None and signed.version == signed.previous_version:
        lines.append(
            f"signing: {release.signing or '-'} (already: targets version {signed.version} "
            f"lists {signed.name} as this artifact; nothing new was signed)"
        )
    elif signed is not None:
        lines.append(
            f"signing: {release.signing or '-'} (targets version {signed.version} lists "
            f"{signed.name})"
        )
    return lines


def keys_init_lines(made: KeyDirectory) -> list[str]:
    """What ``keys init`` made, where, and where each part goes."""
    rows = [[k.role, k.keyid, str(k.path)] for k in made.keys]
    return [
        f"made the key directory {made.dir}: root version {made.root_version}, expires "
        f"{short_time(made.expires)}",
        "",
        *table(["ROLE", "KEY ID", "FILE"], rows),
        "",
        "where each part goes:",
        f"  {made.root_json}",
        "      the trust anchor: give it to the controller (controller-svc serve --trust-root "
        "FILE)",
        "      gateways get it from the controller when they enroll (gateway-daemon enroll, "
        "with a code from upgradectl gateways enroll)",
        f"  {made.offline}/  (root and targets keys)",
        "      stay with the release manager, never on the controller or a gateway; keep a "
        "backup offline",
        "      they sign releases and key rotations: releases publish/yank --keys "
        f"{made.dir}, keys rotate --dir {made.dir}",
        f"  {made.online}/  (snapshot, timestamp and command keys)",
        "      go to the controller: controller-svc serve --online-keys DIR (default: online/ "
        "beside its --trust-root)",
    ]


def yank_lines(version: str, change: TargetsChange) -> list[str]:
    """What yanking ``version`` does, shown before the operator is asked."""
    return [
        f"release {version}: targets version {change.previous_version} lists {change.name} "
        f"({human_size(change.length)}, sha256 {change.sha256})",
        f"yanking publishes targets version {change.version} without it: from then on the "
        "controller and every gateway refuse to install it",
    ]


def yanked_lines(release: ReleaseInfo, change: TargetsChange) -> list[str]:
    """What ``releases yank`` did."""
    return [
        f"yanked {release.version}: targets version {change.version} no longer lists "
        f"{change.name} (signing: {release.signing or '-'})"
    ]


def rotation_lines(rotation: Rotation, keys_dir: str) -> list[str]:
    """What ``keys rotate`` did: the root the controller trusts now, and what follows."""
    roles = ", ".join(rotation.roles) or "no"
    lines = [
        f"the controller trusts root version {rotation.root_version}: new {roles} key(s) "
        f"(the replaced ones are in {keys_dir}/retired/)",
    ]
    if rotation.targets_version is not None:
        lines.append(
            f"it took targets version {rotation.targets_version} with it, re-signed with the "
            "new targets key"
        )
    lines.append(
        "gateways follow the rotation the next time they verify a command or a release; a "
        f"new gateway may be given {keys_dir}/root.json or any older root.json"
    )
    return lines


def jobs_table(jobs: Sequence[JobView]) -> list[str]:
    if not jobs:
        return ["no upgrade job has run yet (upgradectl upgrade)"]
    rows = []
    for job in jobs:
        done = sum(1 for g in job.gateways if g.state == "SUCCEEDED")
        rows.append(
            [
                job.job_id,
                job.state,
                job.target_version,
                job.source or "-",
                job.requested_by or "-",
                short_time(job.created_at),
                f"{done}/{len(job.gateways)} succeeded",
            ]
        )
    headers = ["JOB", "STATE", "TARGET", "SOURCE", "REQUESTED BY", "CREATED", "GATEWAYS"]
    return table(headers, rows)


def rejected_table(rejected: Sequence[RejectedJob]) -> list[str]:
    if not rejected:
        return ["no management job has been rejected"]
    rows = [[short_time(r.at), r.message_id, r.user_id or "-", r.reason] for r in rejected]
    return table(["AT", "MESSAGE ID", "USER", "REASON"], rows)


def publishers_table(publishers: Sequence[PublisherInfo]) -> list[str]:
    """``jobs publishers`` for people: USER ALLOWED BY."""
    if not publishers:
        return ["no broker user may publish management jobs (upgradectl jobs allow-publisher USER)"]
    rows = [[p.user, short_time(p.allowed_at), p.allowed_by or "-"] for p in publishers]
    return table(["USER", "ALLOWED", "BY"], rows)


def allowed_publisher_lines(publisher: PublisherInfo) -> list[str]:
    """What ``jobs allow-publisher`` did (allowing twice keeps the first time)."""
    by = f" by {publisher.allowed_by}" if publisher.allowed_by else ""
    return [
        f"broker user {publisher.user} may publish management jobs (allowed at "
        f"{short_time(publisher.allowed_at)}{by}): the controller runs a job it publishes "
        "with user_id set to that user"
    ]


def disallowed_publisher_lines(publisher: PublisherInfo) -> list[str]:
    """What ``jobs disallow-publisher`` did."""
    return [
        f"broker user {publisher.user} may no longer publish management jobs: the "
        "controller rejects its jobs from now on"
    ]


def admins_table(admins: Sequence[str]) -> list[str]:
    if not admins:
        return ["no admins yet (upgradectl admins add EMAIL)"]
    return table(["EMAIL"], [[a] for a in admins])


def tokens_table(tokens: Sequence[TokenInfo], now: datetime) -> list[str]:
    """``tokens list`` for people: NAME ROLE CREATED EXPIRES REVOKED BY. An expiry before
    ``now`` says ``(expired)``; a token that never expires shows ``never``."""
    if not tokens:
        return ["no API tokens yet (upgradectl tokens create --role ROLE --name NAME)"]
    rows = [
        [
            t.name,
            t.role,
            short_time(t.created_at),
            _expires(t.expires_at, now),
            short_time(t.revoked_at),
            t.created_by or "-",
        ]
        for t in tokens
    ]
    return table(["NAME", "ROLE", "CREATED", "EXPIRES", "REVOKED", "BY"], rows)


def _expires(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "never"
    return short_time(when) + (" (expired)" if when <= now else "")


def created_token_lines(created: CreatedToken) -> list[str]:
    """What ``tokens create`` made: the token, its secret, then ``secret_warning``."""
    token = created.token
    expires = f"expires {short_time(token.expires_at)}" if token.expires_at else "never expires"
    return [
        f"created token {token.name}: role {token.role}, {expires}",
        "",
        f"    {created.secret}",
        "",
        *secret_warning(),
    ]


def secret_warning() -> list[str]:
    """The warning that goes with a new token's secret: it is not shown again, and how to
    give it to upgradectl without putting it on a command line."""
    return [
        "!! This secret is not shown again: the controller keeps only its sha256. Store it now,",
        "!! in a file only you can read, and use it with: upgradectl --token-file FILE ...",
        f"!! (or {ENV_TOKEN_FILE}=FILE), or from the environment as {ENV_TOKEN}.",
        "!! Never pass it as an argument: command lines are visible to every user (ps).",
    ]


def revoked_token_lines(token: TokenInfo) -> list[str]:
    """What ``tokens revoke`` did."""
    return [
        f"revoked token {token.name} (role {token.role}) at {short_time(token.revoked_at)}: "
        "the controller refuses it from now on"
    ]


def users_table(users: Sequence[UserInfo]) -> list[str]:
    """``users list`` for people: NAME ROLE CREATED BY LAST LOGIN."""
    if not users:
        return ["no web console users yet (upgradectl users add NAME --role ROLE --password-stdin)"]
    rows = [
        [
            u.name,
            u.role,
            short_time(u.created_at),
            u.created_by or "-",
            short_time(u.last_login_at) if u.last_login_at else "never",
        ]
        for u in users
    ]
    return table(["NAME", "ROLE", "CREATED", "BY", "LAST LOGIN"], rows)


def added_user_lines(user: UserInfo) -> list[str]:
    """What ``users add`` did."""
    return [f"added web console user {user.name} (role {user.role}): it may log in now"]


def removed_user_lines(user: UserInfo) -> list[str]:
    """What ``users remove`` did."""
    return [
        f"removed web console user {user.name} (role {user.role}): its sessions end with "
        "their next request"
    ]


def certificates_table(certificates: Sequence[CertificateInfo], now: datetime) -> list[str]:
    """``certs list`` for people: NAME ROLE SERIAL CREATED EXPIRES REVOKED BY. An expiry
    before ``now`` says ``(expired)``."""
    if not certificates:
        return ["no operator certificates yet (upgradectl certs issue --name NAME --role ROLE)"]
    rows = [
        [
            c.name, c.role, c.serial, short_time(c.created_at), _expires(c.expires_at, now),
            short_time(c.revoked_at), c.created_by or "-",
        ]
        for c in certificates
    ]  # fmt: skip
    return table(["NAME", "ROLE", "SERIAL", "CREATED", "EXPIRES", "REVOKED", "BY"], rows)


def issued_certificate_lines(issued: IssuedCertificate, key: str, cert: str) -> list[str]:
    """What ``certs issue`` made and wrote (``key`` and ``cert`` are the files, quoted for
    a shell), and how to use it."""
    c = issued.certificate
    return [
        f"issued certificate {c.name}: role {c.role}, expires {short_time(c.expires_at)}, "
        f"serial {c.serial}",
        f"  key:         {key} (mode 0600; it never left this machine)",
        f"  certificate: {cert}",
        f"use them on the controller's gateway port (controller-svc --gateway-listen): "
        f"upgradectl --controller HOST:PORT --client-cert {cert} --client-key {key} ...",
        "(or HITLESS_CLIENT_CERT and HITLESS_CLIENT_KEY); the audit log shows the caller as "
        f"cert:{c.name}",
    ]


def revoked_certificate_lines(certificate: CertificateInfo) -> list[str]:
    """What ``certs revoke`` did."""
    return [
        f"revoked certificate {certificate.name} (role {certificate.role}, serial "
        f"{certificate.serial}) at {short_time(certificate.revoked_at)}: the controller "
        "refuses it from now on"
    ]


def audit_table(events: Sequence[AuditEvent], since: datetime | None = None) -> list[str]:
    """``audit`` for people, newest first as the controller sends them: SEQ AT ACTOR PEER
    ACTION DETAIL OUTCOME, every cell escaped and kept on its row."""
    if not events:
        return ["no audit events" + (f" since {exact_time(since)}" if since else "")]
    rows = [
        [
            str(e.seq),
            exact_time(e.at),
            e.actor or "-",
            e.peer or "-",
            e.action,
            e.detail or "-",
            e.outcome,
        ]
        for e in events
    ]
    return table(["SEQ", "AT", "ACTOR", "PEER", "ACTION", "DETAIL", "OUTCOME"], rows)


def plan_lines(plan: UpgradePlan) -> list[str]:
    """What an upgrade will install and where: the release, its notes, each gateway's change.

    Connected VPN users are shown only for a release that restarts the VPN service, the one
    case where they lose their connection.
    """
    release = plan.release
    notes = release.notes.strip().splitlines()
    lines = [
        f"plan: install release {release.version} (published {short_time(release.published_at)})",
        "release notes:" if notes else "release notes: none",
        *(f"  {line}".rstrip() for line in notes),
    ]
    vpn = release.restarts_vpn_service
    checked = any(g.precheck is not None for g in plan.gateways)
    headers = ["GATEWAY", "FROM", "TO", "ACTION"] + (["VPN USERS"] if vpn else [])
    headers += ["FREE", "TUNNELS UP", "PRE-CHECK"] if checked else []
    rows = [
        [g.id, _from(g), _to(g, release.version), g.action]
        + ([str(g.vpn_sessions)] if vpn else [])
        + (_checked(g) if checked else [])
        for g in plan.gateways
    ]
    blocked = [f"{g.id}: {g.blocked}" for g in plan.gateways if g.blocked]
    notes = ["", "left out:", *(f"  {line}" for line in blocked)] if blocked else []
    offline = [g.id for g in plan.offline]
    if offline:
        notes += [
            "",
            f"offline now: {', '.join(offline)}: a command waits for its gateway until the "
            "job's deadline (--deadline); a gateway still away then ends UNREACHABLE",
        ]
    if plan.controller_from:
        notes += [
            "",
            f"the controller upgrades itself from {plan.controller_from} to {release.version} "
            "first, inline (it keeps serving), then the gateways",
        ]
    return [*lines, "", *table(headers, rows), *notes]


def _checked(gateway: PlannedGateway) -> list[str]:
    """The FREE, TUNNELS UP and PRE-CHECK cells of a gateway's plan row."""
    if gateway.precheck is None:
        return ["-", "-", "not asked (no change)"]
    if not gateway.precheck:
        return ["-", "-", "no answer (offline, busy, or a release without pre-checks)"]
    return [human_size(gateway.free_bytes), gateway.tunnels or "-", gateway.precheck]


def _to(gateway: PlannedGateway, target: str) -> str:
    """The TO cell: the target, "2.0.0 via 1.4.0" for a path through releases between, or
    "- (no upgrade path: left out)" for a gateway no path reaches it from."""
    if gateway.blocked:
        return "- (no upgrade path: left out)"
    if len(gateway.path) < 2:
        return target
    return f"{target} via {', '.join(gateway.path[:-1])}"


def _from(gateway: PlannedGateway) -> str:
    """The FROM cell: the version it runs, and the one an unfinished job takes it to."""
    current = gateway.from_version or "-"
    if gateway.pending_version and gateway.pending_version != gateway.from_version:
        return f"{current} ({gateway.pending_version} pending)"
    return current


def vpn_warning(plan: UpgradePlan) -> list[str]:
    """The warning shown before a release that restarts the VPN service is installed."""
    names = ", ".join(g.id for g in plan.changes)
    return [
        "",
        f"!! WARNING: release {plan.release.version} restarts the VPN service.",
        f"!! {plan.vpn_sessions_affected} VPN user(s) connected now to {names} "
        "will be disconnected.",
        "",
    ]


def progress(g: GatewayProgress) -> str:
    """Download percentage while it means something, else nothing."""
    if g.bytes_total <= 0 or g.state not in ("DOWNLOADING", "VERIFYING"):
        return ""
    return f"{min(100, g.bytes_done * 100 // g.bytes_total)}%"


def _hop(gateway: GatewayProgress) -> str:
    """The TO cell of a job's gateway: its release, and on a path through releases
    between, which hop that is ("1.4.0 (hop 1 of 2, then 2.0.0)", "2.0.0 (hop 2 of 2)")."""
    to = gateway.to_version or "-"
    if len(gateway.path) < 2:
        return to
    hop = f"hop {gateway.hop} of {len(gateway.path)}"
    if gateway.hop >= len(gateway.path):
        return f"{to} ({hop})"
    return f"{to} ({hop}, then {gateway.path[-1]})"


def job_lines(job: JobView) -> list[str]:
    """A job's header line and a table of its gateways.

    A VPN DROPPED column appears only when some gateway disconnected VPN users.
    """
    header = _job_header(job)
    dropped = any(g.vpn_sessions_dropped for g in job.gateways)
    waves = job.wave_count > 1
    rows = [
        [g.id]
        + ([str(g.wave)] if waves else [])
        + [g.state, g.from_version or "-", _hop(g), progress(g)]
        + ([str(g.vpn_sessions_dropped or "")] if dropped else [])
        + [g.error or (f"soak: {g.health}" if g.health else "")]
        for g in job.gateways
    ]
    headers = ["GATEWAY", *(["WAVE"] if waves else []), "STATE", "FROM", "TO", "PROGRESS"]
    headers += ["VPN DROPPED"] if dropped else []
    return [header, *table([*headers, "ERROR"], rows)]


def live_lines(job: JobView, max_rows: int = LIVE_ROWS) -> list[str]:
    """``job_lines`` for a job of at most ``max_rows`` gateways. A larger one: the header,
    a line counting the gateways in each state, and the table of up to ``max_rows`` that
    are neither QUEUED nor SUCCEEDED (moving, or failed), then how many are not shown."""
    if len(job.gateways) <= max_rows:
        return job_lines(job)
    lines = [_job_header(job)]
    counts = Counter(g.state for g in job.gateways)
    lines.append("  ".join(f"{state} {counts[state]}" for state in sorted(counts)))
    shown = [g for g in job.gateways if g.state not in ("QUEUED", "SUCCEEDED")][:max_rows]
    if shown:
        lines += job_lines(dataclasses.replace(job, gateways=tuple(shown)))[1:]
    hidden = len(job.gateways) - len(shown)
    lines.append(f"({hidden} more gateways not shown: queued or succeeded)")
    return lines


def _job_header(job: JobView) -> str:
    done = sum(1 for g in job.gateways if g.state == "SUCCEEDED")
    header = (
        f"job {job.job_id}  target {job.target_version}  {job.state}  "
        f"({done}/{len(job.gateways)} gateways succeeded)"
    )
    if job.wave_count > 1:
        header += (
            f"  wave {job.current_wave} of {job.wave_count}"
            if job.current_wave
            else f"  {job.wave_count} waves"
        )
    if job.ending:
        header += f"  ending {job.ending} once gateways in flight finish"
    if job.starts_at is not None and not job.finished:
        header += f"  waits: its first gateway starts at {iso(job.starts_at)}"
    if job.stop_reason:
        header += f"\n  {job.stop_reason}"
    return header


def event_line(event: JobEvent) -> str:
    """One event as one line, for logs and non-terminals."""
    when = event.at.astimezone(UTC).strftime("%H:%M:%S") if event.at else "--:--:--"
    if not event.gateway_id:
        return f"{when}  job {event.job_state}" + (f"  {event.error}" if event.error else "")
    parts = [when, event.gateway_id, event.gateway_state or "-"]
    if event.gateway_state == "DOWNLOADING" and event.bytes_total > 0:
        pct = min(100, event.bytes_done * 100 // event.bytes_total)
        parts.append(f"{pct}% of {human_size(event.bytes_total)}")
    if event.error:
        parts.append(event.error)
    if event.job_state:
        parts.append(f"(job {event.job_state})")
    return "  ".join(parts)


def job_outcome(job: JobView) -> str:
    """Why a finished job is not a success, in one sentence."""
    bad = [g for g in job.gateways if g.state != "SUCCEEDED"]
    detail = "; ".join(f"{g.id} {g.state}" + (f" ({g.error})" if g.error else "") for g in bad)
    return (
        f"job {job.job_id} ended {job.state}"
        + (f": {detail}" if detail else "")
        + f"; see upgradectl status {job.job_id}"
    )


class LiveDisplay:
    """Progress of a job as it happens.

    On a terminal the job table (``live_lines``) is redrawn in place after each event; for
    a job of more than LIVE_ROWS gateways at most once per ``redraw_every_s`` seconds of
    ``clock``. Anywhere else each event becomes one line, so a log or a CI transcript
    stays readable.
    """

    def __init__(
        self,
        out: TextIO,
        tty: bool,
        *,
        redraw_every_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._out = out
        self._tty = tty
        self._drawn = 0
        self._redraw_every_s = redraw_every_s
        self._clock = clock
        self._drawn_at: float | None = None

    def start(self, job: JobView) -> None:
        if self._tty:
            self._draw(live_lines(job))
        else:
            self._write([f"watching job {job.job_id} (target {job.target_version}, {job.state})"])

    def update(self, job: JobView | LiveJob, event: JobEvent) -> None:
        """Show ``event``; on a terminal, redraw ``job``, unless it is large and was drawn
        less than ``redraw_every_s`` ago (a LiveJob's view is built only when drawn)."""
        if not self._tty:
            self._write([event_line(event)])
            return
        large = (job.gateway_count if isinstance(job, LiveJob) else len(job.gateways)) > LIVE_ROWS
        recent = self._drawn_at is not None and (
            self._clock() - self._drawn_at < self._redraw_every_s
        )
        if large and recent:
            return
        view = job.view() if isinstance(job, LiveJob) else job
        self._draw(live_lines(view))

    def finish(self, job: JobView) -> None:
        """Show the final picture: in place on a terminal, after the events elsewhere."""
        if self._tty:
            self._draw(job_lines(job))
        else:
            self._write(job_lines(job))

    def _draw(self, lines: list[str]) -> None:
        self._drawn_at = self._clock()
        prefix = (_UP.format(n=self._drawn) if self._drawn else "") + _CLEAR_DOWN
        self._out.write(prefix)
        self._write(lines)
        self._drawn = len(lines)

    def _write(self, lines: list[str]) -> None:
        self._out.write("".join(f"{printable(line)}\n" for line in lines))
        self._out.flush()


def enrollment_code_lines(code: EnrollmentCode) -> list[str]:
    """What ``gateways enroll`` made: the code, its expiry, and how the gateway uses it."""
    return [
        f"enrollment code for gateway {code.gateway_id}, valid once until "
        f"{short_time(code.expires_at)}:",
        "",
        f"    {code.code}",
        "",
        "On the gateway (the code is not shown again; the controller keeps only its sha256):",
        f"    gateway-daemon enroll --id {code.gateway_id} --controller HOST:PORT --ca-cert "
        "ca.pem --code CODE --state-dir DIR",
        "or give it to the first `gateway-daemon run --enroll-code CODE --ca-cert ca.pem`.",
    ]


def enrollments_table(enrollments: Sequence[EnrollmentInfo]) -> list[str]:
    """``gateways enrollments`` for people: GATEWAY STATE ENROLLED CERT-EXPIRES BROKER-USER
    CODE-EXPIRES BY."""
    if not enrollments:
        return ["no gateway enrolled yet (upgradectl gateways enroll ID)"]
    rows = [
        [
            e.gateway_id, e.state, short_time(e.enrolled_at), short_time(e.certificate_expires_at),
            e.broker_user or "-", short_time(e.code_expires_at) if e.state == "PENDING" else "-",
            e.created_by or "-",
        ]
        for e in enrollments
    ]  # fmt: skip
    return table(
        ["GATEWAY", "STATE", "ENROLLED", "CERT EXPIRES", "BROKER USER", "CODE EXPIRES", "BY"], rows
    )


def revoked_gateway_lines(enrollment: EnrollmentInfo) -> list[str]:
    """What ``gateways revoke`` did."""
    user = f" and broker user {enrollment.broker_user}" if enrollment.broker_user else ""
    return [
        f"revoked gateway {enrollment.gateway_id}'s certificate{user} at "
        f"{short_time(enrollment.revoked_at)}: the controller refuses it from now on; "
        f"`upgradectl gateways enroll {enrollment.gateway_id}` makes a new code"
    ]
