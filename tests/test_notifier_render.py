"""The emails' content: subjects that say what happened, both parts, HTML escaped."""

from __future__ import annotations

from email import message_from_bytes, policy
from email.message import EmailMessage

from google.protobuf.timestamp_pb2 import Timestamp

from hitless.v1 import bus_pb2, common_pb2, controller_pb2
from notifier import markdown, render

NOTES = """# What's new

- Faster **handoff** of `UDP` sockets
- Fixes <script>alert(1)</script> & friends

See [the docs](https://example.com/docs?a=1&b=2) or [evil](javascript:alert(1)).
"""


def release(*, vpn: bool, notes: str = NOTES, version: str = "1.4.0") -> bus_pb2.Event:
    return bus_pb2.Event(
        event_id="ev-1",
        at=Timestamp(seconds=1_700_000_000),
        admins=["ops@example.com"],
        release_published=controller_pb2.Release(
            version=version,
            sha256="ab" * 32,
            size=123456,
            published_at=Timestamp(seconds=1_700_000_000),
            notes=notes,
            restarts_vpn_service=vpn,
        ),
    )


def finished_job() -> controller_pb2.Job:
    return controller_pb2.Job(
        job_id="job-7",
        state=common_pb2.JOB_STATE_PARTIAL,
        target_version="1.4.0",
        source="management",
        requested_by="alice",
        gateways=[
            controller_pb2.GatewayJob(
                gateway_id="gw-1", state=common_pb2.GATEWAY_JOB_STATE_SUCCEEDED,
                from_version="1.3.0", to_version="1.4.0", vpn_sessions_dropped=4,
            ),
            controller_pb2.GatewayJob(
                gateway_id="gw-2", state=common_pb2.GATEWAY_JOB_STATE_ROLLED_BACK,
                from_version="1.3.0", error="new version missed its <ready> deadline (10s)",
            ),
            controller_pb2.GatewayJob(
                gateway_id="gw-3", state=common_pb2.GATEWAY_JOB_STATE_UNREACHABLE,
                from_version="1.2.0", error="command expired before the gateway took it",
            ),
        ],
    )  # fmt: skip


def parts(message: EmailMessage) -> tuple[str, str]:
    parsed = message_from_bytes(bytes(message), policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    text = parsed.get_body(("plain",))
    html = parsed.get_body(("html",))
    assert text is not None and html is not None, "expected a text and an HTML part"
    return text.get_content(), html.get_content()


def composed(event: bus_pb2.Event) -> EmailMessage:
    return render.compose(
        render.render(event),
        sender="hitless@example.com",
        recipient="ops@example.com",
        message_id=render.message_id(event.event_id, "ops@example.com", "hitless@example.com"),
        event_id=event.event_id,
    )


def test_release_subject_and_vpn_warning_in_both_parts() -> None:
    message = composed(release(vpn=True))
    assert message["Subject"] == "[hitless] Release 1.4.0 available — restarts the VPN service"
    text, html = parts(message)
    assert "WARNING:" in text and "VPN users will be disconnected and must reconnect" in text
    assert "Warning:" in html and "must reconnect" in html
    assert "Faster **handoff** of `UDP` sockets" in text, "the text part keeps the Markdown"
    assert "<strong>handoff</strong>" in html and "<code>UDP</code>" in html


def test_release_without_vpn_restart_has_no_warning() -> None:
    message = composed(release(vpn=False))
    assert message["Subject"] == "[hitless] Release 1.4.0 available"
    text, html = parts(message)
    assert "WARNING" not in text and "Warning" not in html
    assert "Restarts the VPN service: no" in text


def test_html_escapes_everything_from_the_event() -> None:
    event = release(vpn=False, version="1.4.0<b>")
    html = render.render(event).html
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; friends" in html
    assert "1.4.0&lt;b&gt;" in html and "1.4.0<b>" not in html
    assert '<a href="https://example.com/docs?a=1&amp;b=2">the docs</a>' in html
    assert 'href="javascript' not in html, "only http(s) and mailto links become links"


def test_headers_never_carry_line_breaks_from_the_event() -> None:
    message = composed(release(vpn=False, version="1.4.0\r\nBcc: victim@example.com"))
    assert "Bcc" not in message
    assert "\n" not in message["Subject"] and "Bcc: victim" in message["Subject"]


def test_markdown_blocks() -> None:
    source = "## Title\n\npara one\nline two\n\n1. first\n2. second\n\n```\n<x>\n```"
    html = markdown.to_html(source)
    assert "<h4>Title</h4>" in html
    assert "<p>para one<br>\nline two</p>" in html
    assert "<ol><li>first</li><li>second</li></ol>" in html
    assert "<pre><code>&lt;x&gt;</code></pre>" in html


def test_job_finished_lists_each_gateway_and_what_failed() -> None:
    event = bus_pb2.Event(event_id="ev-2", admins=["a@example.com"], job_finished=finished_job())
    message = composed(event)
    assert message["Subject"] == (
        "[hitless] Upgrade to 1.4.0 partly failed: 1 of 3 gateways upgraded"
    )
    text, html = parts(message)
    assert "What failed" in text
    assert "- gw-2: ROLLED_BACK: new version missed its <ready> deadline (10s)" in text
    assert "- gw-3: UNREACHABLE: command expired before the gateway took it" in text
    assert "VPN sessions dropped: 4" in text
    assert "Requested by: alice (management)" in text
    assert "missed its &lt;ready&gt; deadline" in html and "<ready>" not in html
    for gateway in ("gw-1", "gw-2", "gw-3"):
        assert f">{gateway}</td>" in html


def test_job_finished_subject_when_everything_succeeded() -> None:
    job = finished_job()
    job.state = common_pb2.JOB_STATE_SUCCEEDED
    del job.gateways[1:]
    rendered = render.job_finished(job)
    assert rendered.subject == "[hitless] Upgrade to 1.4.0 succeeded: 1 of 1 gateways upgraded"
    assert "What failed" not in rendered.text


def test_an_aborted_rollout_mail_says_which_wave_stopped_it_and_why() -> None:
    job = finished_job()
    job.state = common_pb2.JOB_STATE_ABORTED
    job.waves, job.wave_count = "1,100%", 2
    job.stop_reason = (
        "1 gateway(s) failed or rolled back, more than --max-failures 0 allows (0): stopped "
        "in wave 1 of 2; last gw-2: new version missed its <ready> deadline (10s)"
    )
    rendered = render.job_finished(job)
    assert rendered.subject == "[hitless] Upgrade to 1.4.0 was aborted: 1 of 3 gateways upgraded"
    assert "Waves: 2 (1,100%)" in rendered.text
    assert "Why it stopped: 1 gateway(s) failed" in rendered.text
    assert "stopped in wave 1 of 2" in rendered.text
    assert "missed its &lt;ready&gt; deadline" in rendered.html


def test_job_rejected_shows_reason_body_and_publisher() -> None:
    rejected = bus_pb2.JobRejected(
        message_id="m-1",
        reason="unknown version 9.9.9; available: 1.3.0, 1.4.0",
        body='{"action": "upgrade", "version": "9.9.9", "x": "<img src=x>"}',
        user_id="bob",
    )
    message = composed(bus_pb2.Event(event_id="ev-3", admins=["a@x.org"], job_rejected=rejected))
    assert message["Subject"] == (
        "[hitless] Upgrade job rejected: unknown version 9.9.9; available: 1.3.0, 1.4.0"
    )
    text, html = parts(message)
    assert "Published by: bob" in text and rejected.body in text
    assert "&lt;img src=x&gt;" in html and "<img" not in html


def test_message_id_is_stable_per_event_and_address() -> None:
    first = render.message_id("ev-1", "a@example.com", "hitless@example.com")
    assert first == render.message_id("ev-1", "a@example.com", "hitless@example.com")
    assert first != render.message_id("ev-1", "b@example.com", "hitless@example.com")
    assert first != render.message_id("ev-2", "a@example.com", "hitless@example.com")
    assert first.startswith("<") and first.endswith("@example.com>")


def refused(**fields: str) -> bus_pb2.Event:
    values = {
        "report_id": "r-1",
        "gateway_id": "gw-1",
        "command_id": "forged-1",
        "job_id": "forged-job",
        "kind": "bad-signature",
        "reason": "the signature by key ab12 does not match the command",
        "from_version": "1.3.0",
    } | fields
    return bus_pb2.Event(
        event_id="refused:r-1",
        admins=["ops@example.com"],
        command_refused=bus_pb2.CommandRefused(at=Timestamp(seconds=1_700_000_000), **values),
    )


def test_command_refused_is_a_security_email_with_what_to_do() -> None:
    message = composed(refused())
    assert message["Subject"] == (
        "[hitless] Security: gateway gw-1 refused a command (bad-signature)"
    )
    text, html = parts(message)
    assert text.startswith("SECURITY EVENT: Gateway gw-1 refused a command it must not run.")
    for line in (
        "Gateway: gw-1",
        "Kind: bad-signature — the signature does not match the command",
        "Reason: the signature by key ab12 does not match the command",
        "Command id (as claimed): forged-1",
        "Job id (as claimed): forged-job",
        "Version it keeps running: 1.3.0",
        "Refused at: 2023-11-14 22:13:20 UTC",
    ):
        assert f"\n{line}" in text, f"expected the line {line!r} in:\n{text}"
    assert "ran nothing" in text
    assert "hitless.commands exchange" in text and "command key" in text
    assert "Security event:" in html and ">forged-job</td>" in html
    assert "hitless.commands exchange" in html


def test_command_refused_of_an_unknown_kind_is_still_mailed() -> None:
    rendered = render.render(refused(kind="from-the-future", reason=""))
    assert rendered.subject.endswith("refused a command (from-the-future)")
    assert "Kind: from-the-future — a kind this notifier does not know" in rendered.text
    assert "Reason: (no reason given)" in rendered.text


def test_command_refused_shows_hostile_fields_safely() -> None:
    hostile_gateway = "gw-1\r\nBcc: victim@example.com\r\n\r\n<b>" + "x" * 5000
    hostile_reason = "bad\r\nGateway: gw-ok\x1b[2J\u202eevil\x00<script>" + "y" * 10_000
    message = composed(
        refused(gateway_id=hostile_gateway, reason=hostile_reason, kind="unsigned\nBcc: a@b.c")
    )
    assert "Bcc" not in message, "no header comes from the event"
    subject = message["Subject"]
    assert "\r" not in subject and "\n" not in subject and len(subject) <= 200
    assert subject.startswith("[hitless] Security: gateway gw-1 Bcc: victim@example.com <b>x")
    text, html = parts(message)
    lines = text.splitlines()
    assert "Gateway: gw-ok" not in lines, "a line break in a field cannot make a line of its own"
    assert not any(line.startswith("Bcc:") for line in lines)
    (gateway,) = [line for line in lines if line.startswith("Gateway: ")]
    assert gateway.startswith("Gateway: gw-1\\r\\nBcc: victim@example.com\\r\\n\\r\\n<b>xx")
    assert gateway.endswith(f"… ({len(hostile_gateway)} characters)") and len(gateway) < 120
    (reason,) = [line for line in lines if line.startswith("Reason: ")]
    assert reason.startswith("Reason: bad\\r\\nGateway: gw-ok\\x1b[2J\\u202eevil\\x00<script>y")
    assert reason.endswith(f"… ({len(hostile_reason)} characters)") and len(reason) < 2100
    assert not any(c in text for c in "\x1b\u202e\x00"), "control characters shown as escapes"
    assert "<script>" not in html and "&lt;script&gt;" in html and "<b>" not in html
    assert not any(c in html for c in "\x1b\u202e\x00")
