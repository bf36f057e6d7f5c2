"""The emails: subject, text part and HTML part for each kind of event, and the message
that carries them. Pure functions of the event; every value from the event is escaped in
the HTML part and stripped of line breaks in headers.

    release_published  "[hitless] Release 1.4.0 available — restarts the VPN service"
    job_finished       "[hitless] Upgrade to 1.4.0 partly failed: 2 of 3 gateways upgraded"
    job_rejected       "[hitless] Upgrade job rejected: unknown version 9.9.9"
    command_refused    "[hitless] Security: gateway gw-1 refused a command (bad-signature)"

A gateway's refusal (``CommandRefused``) is written by whoever could publish its report:
every field but ``at`` is shown as untrusted text, on one line, cut to a bound, with each
character that is not printable (line breaks, terminal escapes, bidirectional overrides)
written as its escape (``\\n``, ``\\x1b``, ``\\u202e``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from html import escape

from google.protobuf.timestamp_pb2 import Timestamp

from hitless.v1 import bus_pb2, common_pb2, controller_pb2
from notifier import markdown

PREFIX = "[hitless]"
VPN_WARNING = (
    "This release restarts the VPN service on every gateway it is installed on: connected "
    "VPN users will be disconnected and must reconnect. Plan the upgrade for a quiet hour "
    "and tell your users."
)
_OK = common_pb2.GATEWAY_JOB_STATE_SUCCEEDED
_STYLE_TABLE = "border-collapse:collapse;font-family:sans-serif;font-size:14px"
_STYLE_CELL = "border:1px solid #ccc;padding:4px 8px;text-align:left"
_STYLE_WARNING = (
    "border:2px solid #b00020;background:#fdecea;color:#7a0014;padding:12px;"
    "font-weight:bold;font-family:sans-serif"
)


@dataclass(frozen=True)
class Rendered:
    subject: str
    text: str
    html: str


class UnknownEvent(ValueError):
    """The event carries none of the kinds this notifier knows."""


def render(event: bus_pb2.Event) -> Rendered:
    kind = event.WhichOneof("kind")
    if kind == "release_published":
        return release_published(event.release_published)
    if kind == "job_finished":
        return job_finished(event.job_finished)
    if kind == "job_rejected":
        return job_rejected(event.job_rejected)
    if kind == "command_refused":
        return command_refused(event.command_refused)
    raise UnknownEvent(f"event {event.event_id!r} has no kind this notifier knows ({kind})")


def release_published(release: controller_pb2.Release) -> Rendered:
    version = _one_line(release.version)
    subject = f"{PREFIX} Release {version} available"
    if release.restarts_vpn_service:
        subject += " — restarts the VPN service"
    facts = [
        ("Version", release.version),
        ("Published", _when(release.published_at)),
        ("Size", f"{release.size:,} bytes"),
        ("SHA-256", release.sha256),
        ("Restarts the VPN service", "yes" if release.restarts_vpn_service else "no"),
    ]
    notes = release.notes.strip() or "(no release notes)"
    text = [f"Release {version} is available.", ""]
    if release.restarts_vpn_service:
        text += [f"WARNING: {VPN_WARNING}", ""]
    text += [f"{label}: {value}" for label, value in facts]
    text += ["", "Release notes", "-------------", "", notes, "", _howto(version)]

    html = [f"<p>Release <strong>{escape(version)}</strong> is available.</p>"]
    if release.restarts_vpn_service:
        html.append(f'<div style="{_STYLE_WARNING}">&#9888; Warning: {escape(VPN_WARNING)}</div>')
    html.append(_facts_table(facts))
    html.append("<h2>Release notes</h2>")
    html.append(markdown.to_html(notes))
    html.append(f"<p>{escape(_howto(version))}</p>")
    return Rendered(subject, "\n".join(text) + "\n", _page(subject, html))


def _howto(version: str) -> str:
    return f"To install it: upgradectl upgrade --version {version}"


def job_finished(job: controller_pb2.Job) -> Rendered:
    state = _job_state(job.state)
    target = _one_line(job.target_version)
    total = len(job.gateways)
    upgraded = sum(1 for gw in job.gateways if gw.state == _OK)
    failed = [gw for gw in job.gateways if gw.state != _OK]
    dropped = sum(gw.vpn_sessions_dropped for gw in job.gateways)
    count = f"{upgraded} of {total} gateways upgraded"
    headline = {
        "SUCCEEDED": f"succeeded: {count}",
        "PARTIAL": f"partly failed: {count}",
        "FAILED": f"failed: {count}",
        "CANCELLED": f"was cancelled: {count}",
        "ABORTED": f"was aborted: {count}",
    }.get(state, f"ended {state}: {count}")
    subject = f"{PREFIX} Upgrade to {target} {headline}"
    facts = [
        ("Job", job.job_id),
        ("State", state),
        ("Target version", job.target_version),
        ("Started", _when(job.created_at)),
        ("Finished", _when(job.updated_at)),
        ("Requested by", _requested_by(job)),
        ("VPN sessions dropped", str(dropped)),
    ]
    if job.wave_count > 1 or job.waves:
        facts.append(("Waves", f"{job.wave_count} ({job.waves or 'one'})"))
    if job.stop_reason:
        # Why it was aborted or cancelled: which wave stopped it, and the last failure.
        facts.append(("Why it stopped", _one_line(job.stop_reason, limit=500)))
    columns = ("Gateway", "Outcome", "From", "To", "VPN sessions dropped", "Reason")
    rows = [
        (
            gw.gateway_id,
            _gateway_state(gw.state),
            gw.from_version or "-",
            gw.to_version or "-",
            str(gw.vpn_sessions_dropped),
            gw.error or ("" if gw.state == _OK else "(no reason given)"),
        )
        for gw in job.gateways
    ]

    text = [f"Upgrade job {job.job_id} to {target} finished: {state} ({count}).", ""]
    text += [f"{label}: {value}" for label, value in facts]
    text += ["", "Gateways", "--------", _text_table(columns, rows)]
    if failed:
        text += ["", "What failed", "-----------"]
        text += [f"- {_one_line(gw.gateway_id)}: {_gateway_state(gw.state)}: "
                 f"{gw.error or '(no reason given)'}" for gw in failed]  # fmt: skip

    html = [
        f"<p>Upgrade job <code>{escape(job.job_id)}</code> to <strong>{escape(target)}</strong> "
        f"finished: <strong>{escape(state)}</strong> ({escape(count)}).</p>",
        _facts_table(facts),
        "<h2>Gateways</h2>",
        _html_table(columns, rows, highlight=[gw.state != _OK for gw in job.gateways]),
    ]
    if failed:
        html.append("<h2>What failed</h2><ul>")
        html += [
            f"<li><strong>{escape(gw.gateway_id)}</strong>: {escape(_gateway_state(gw.state))}: "
            f"{escape(gw.error or '(no reason given)')}</li>"
            for gw in failed
        ]
        html.append("</ul>")
    return Rendered(subject, "\n".join(text) + "\n", _page(subject, html))


def job_rejected(rejected: bus_pb2.JobRejected) -> Rendered:
    reason = rejected.reason or "(no reason given)"
    who = rejected.user_id or "unknown (the broker did not say who published it)"
    subject = f"{PREFIX} Upgrade job rejected: {_one_line(reason, limit=120)}"
    facts = [
        ("Reason", reason),
        ("Published by", who),
        ("Message id", rejected.message_id or "-"),
        ("Rejected at", _when(rejected.at)),
    ]
    text = ["A management upgrade job was rejected; nothing was changed.", ""]
    text += [f"{label}: {value}" for label, value in facts]
    text += ["", "The job as published", "--------------------", rejected.body]
    html = [
        "<p>A management upgrade job was <strong>rejected</strong>; nothing was changed.</p>",
        _facts_table(facts),
        "<h2>The job as published</h2>",
        f"<pre>{escape(rejected.body)}</pre>",
    ]
    return Rendered(subject, "\n".join(text) + "\n", _page(subject, html))


# What each kind of refusal means (``CommandRefused.kind``, set by gateway_daemon/agent.py).
_REFUSAL_MEANINGS = {
    "unsigned": "the command carried no signature, so the controller did not send it",
    "unknown-key": "the command was signed by a key the gateway's trusted root does not carry",
    "bad-signature": "the signature does not match the command: it was altered or forged",
    "misaddressed": "the signed command names another gateway",
    "replayed": "a command id the gateway had already taken came again with other content",
    "expired": (
        "a signed command arrived after its deadline: delivered late, or an old command "
        "played back"
    ),
    "unverified-release": (
        "the command names a release that the signed release metadata does not list (never "
        "signed, or yanked), lists with other content, or the metadata itself was refused"
    ),
}
# Bounds for what a refusal report carries (characters, before escaping).
_GATEWAY_ID_SHOWN = 80  # a valid id has at most 64 (hitless.names)
_KIND_SHOWN = 40
_ID_SHOWN = 128  # command and job ids
_VERSION_SHOWN = 64  # hitless.semver.MAX_LENGTH
_REASON_SHOWN = 2000  # what the controller keeps of a reason
_COMMAND_REFUSED_ADVICE = [
    "The gateway ran nothing of this command and keeps running the version above.",
    "Someone may be publishing forged or altered commands, or signing them with the "
    "controller's command key. Check who can publish on the broker's hitless.commands "
    "exchange (RabbitMQ users with write permission on it, and who can reach the "
    "management UI) and who holds the controller's command key.",
    "The command and job ids are those the refused message claimed: they may be forged and "
    "need not name a real job.",
    "The gateway logs command_refused and the controller command_refused_by_gateway with "
    "the same details.",
]


def command_refused(refused: bus_pb2.CommandRefused) -> Rendered:
    """The security email for a command a gateway refused to run.

    Every field but ``at`` comes from the network and may be forged or hostile: the subject
    takes the gateway id and kind flattened to one line (at most 64 and 40 characters), the
    body shows each field through ``_shown`` (one line, non-printable characters escaped,
    bounded), and the HTML part escapes it on top.
    """
    gateway = _one_line(refused.gateway_id, limit=64) or "(unnamed)"
    kind = _one_line(refused.kind, limit=_KIND_SHOWN) or "unknown kind"
    subject = f"{PREFIX} Security: gateway {gateway} refused a command ({kind})"
    shown_gateway = _shown(refused.gateway_id, limit=_GATEWAY_ID_SHOWN) or "(unnamed)"
    version = _shown(refused.from_version, limit=_VERSION_SHOWN) or "(not given)"
    meaning = _REFUSAL_MEANINGS.get(refused.kind, "a kind this notifier does not know")
    facts = [
        ("Gateway", shown_gateway),
        ("Kind", f"{_shown(refused.kind, limit=_KIND_SHOWN) or '-'} — {meaning}"),
        ("Reason", _shown(refused.reason, limit=_REASON_SHOWN) or "(no reason given)"),
        ("Command id (as claimed)", _shown(refused.command_id, limit=_ID_SHOWN) or "-"),
        ("Job id (as claimed)", _shown(refused.job_id, limit=_ID_SHOWN) or "-"),
        ("Version it keeps running", version),
        ("Refused at", _when(refused.at)),
        ("Report id", _shown(refused.report_id, limit=_ID_SHOWN) or "-"),
    ]
    headline = (
        f"Gateway {shown_gateway} refused a command it must not run. It ran nothing and keeps "
        f"running version {version}."
    )
    text = [f"SECURITY EVENT: {headline}", ""]
    text += [f"{label}: {value}" for label, value in facts]
    text += ["", "What to do", "----------"]
    text += [f"- {line}" for line in _COMMAND_REFUSED_ADVICE]
    html = [
        f'<div style="{_STYLE_WARNING}">&#9888; Security event: {escape(headline)}</div>',
        _facts_table(facts),
        "<h2>What to do</h2><ul>",
        *[f"<li>{escape(line)}</li>" for line in _COMMAND_REFUSED_ADVICE],
        "</ul>",
    ]
    return Rendered(subject, "\n".join(text) + "\n", _page(subject, html))


def compose(
    rendered: Rendered,
    *,
    sender: str,
    recipient: str,
    message_id: str,
    event_id: str,
    now: datetime | None = None,
) -> EmailMessage:
    """The email for one recipient, with a text and an HTML part."""
    message = EmailMessage()
    message["Subject"] = _one_line(rendered.subject, limit=200)
    message["From"] = sender
    message["To"] = recipient
    message["Date"] = format_datetime(now or datetime.now(UTC))
    message["Message-ID"] = message_id
    message["Auto-Submitted"] = "auto-generated"
    message["X-Hitless-Event"] = _one_line(event_id)
    message.set_content(rendered.text)
    message.add_alternative(rendered.html, subtype="html")
    return message


def message_id(event_id: str, address: str, sender: str) -> str:
    """A Message-ID that is the same every time (event, address) is sent, so a duplicate
    made by a crash between the server's acceptance and the ledger's commit can be
    recognised downstream."""
    digest = hashlib.sha256(f"{event_id}\x00{address}".encode()).hexdigest()[:40]
    domain = sender.rpartition("@")[2] or "hitless.invalid"
    return f"<{digest}.hitless@{domain}>"


def _page(title: str, body: list[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title></head>\n"
        '<body style="font-family:sans-serif">\n' + "\n".join(body) + "\n</body></html>\n"
    )


def _facts_table(facts: list[tuple[str, str]]) -> str:
    rows = "".join(
        f'<tr><th style="{_STYLE_CELL}">{escape(label)}</th>'
        f'<td style="{_STYLE_CELL}">{escape(value)}</td></tr>'
        for label, value in facts
    )
    return f'<table style="{_STYLE_TABLE}">{rows}</table>'


def _html_table(
    columns: tuple[str, ...], rows: Sequence[tuple[str, ...]], highlight: Sequence[bool]
) -> str:
    head = "".join(f'<th style="{_STYLE_CELL}">{escape(c)}</th>' for c in columns)
    body = "".join(
        ('<tr style="background:#fdecea">' if bad else "<tr>")
        + "".join(f'<td style="{_STYLE_CELL}">{escape(cell)}</td>' for cell in row)
        + "</tr>"
        for row, bad in zip(rows, highlight, strict=True)
    )
    return f'<table style="{_STYLE_TABLE}"><tr>{head}</tr>{body}</table>'


def _text_table(columns: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    cells = [columns, *[tuple(_one_line(c) for c in row) for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def _requested_by(job: controller_pb2.Job) -> str:
    who = job.requested_by or "-"
    return f"{who} ({job.source})" if job.source else who


def _job_state(value: int) -> str:
    name: str = common_pb2.JobState.Name(value)
    return name.removeprefix("JOB_STATE_")


def _gateway_state(value: int) -> str:
    name: str = common_pb2.GatewayJobState.Name(value)
    return name.removeprefix("GATEWAY_JOB_STATE_")


def _when(stamp: Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return "-"
    return stamp.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _one_line(value: str, *, limit: int = 80) -> str:
    flat = " ".join("".join(c if c.isprintable() else " " for c in value).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _shown(value: str, *, limit: int) -> str:
    """``value``, from an untrusted sender, safe to show on one line: each character that is
    not printable written as its Python escape (``\\r``, ``\\x1b``, ``\\u202e``), and the
    result cut to ``limit`` characters, ending in "… (N characters)" when cut (N counts
    ``value``'s characters)."""
    out: list[str] = []
    used = 0
    for char in value:
        piece = char if char.isprintable() else repr(char)[1:-1]
        if used + len(piece) > limit:
            return "".join(out) + f"… ({len(value)} characters)"
        out.append(piece)
        used += len(piece)
    return "".join(out)
