"""The emails: subject, text part and HTML part for each kind of event, and the message
that carries them. Pure functions of the event; every value from the event is escaped in
the HTML part and stripped of line breaks in headers.

    release_published  "[hitless] Release 1.4.0 available — restarts the VPN service"
    job_finished       "[hitless] Upgrade to 1.4.0 partly failed: 2 of 3 gateways upgraded"
    job_rejected       "[hitless] Upgrade job rejected: unknown version 9.9.9"
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
