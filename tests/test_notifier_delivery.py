"""The notifier against a real RabbitMQ and a real SMTP server (aiosmtpd on loopback):
one email per (event, admin), through redeliveries, restarts, outages and bad addresses;
only events the controller's broker user published are mailed.

Events are published through the broker's management API with ``user_id`` set, as the
controller publishes them; RabbitMQ checks it against the login that publishes."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from hitless.bus import codec, topology
from hitless.bus.amqp import ORIGINAL_USER_HEADER, Publisher
from hitless.config import BusConfig, HostPort
from hitless.v1 import bus_pb2, common_pb2, controller_pb2
from notifier.config import NotifierConfig, RetryPolicy, SmtpConfig
from notifier.ledger import Ledger, State
from notifier.render import message_id
from notifier.service import Notifier
from tests.support.procs import Procs, command, free_port
from tests.support.rabbit import Management
from tests.support.smtp import Sink
from tests.support.wait import wait_for

SENDER = "hitless@example.com"
ADMINS = ["alice@example.com", "bob@example.com", "carol@example.com"]
FAST = RetryPolicy(initial_s=0.05, max_s=0.3, recipient_deadline_s=30)
# The controller's broker user in these tests: the login of tests.support.rabbit, as on one
# machine where every service shares it.
CONTROLLER_USER = "guest"


@pytest.fixture
def smtp_port() -> int:
    return free_port()


@dataclass
class RcptSink(Sink):
    """The sink, also keeping every RCPT TO the notifier tried, accepted or not."""

    tried: list[str] = field(default_factory=list)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        with self.lock:
            self.tried.append(address)
        return await super().handle_RCPT(server, session, envelope, address, options)

    def tries(self) -> Counter[str]:
        with self.lock:
            return Counter(self.tried)


@pytest.fixture
def sink() -> RcptSink:
    return RcptSink()


@pytest.fixture
def start_smtp(smtp_port: int, sink: Sink) -> Iterator[Callable[..., Controller]]:
    """Starts the SMTP server on ``smtp_port`` when the test says so; stops it at the end."""
    started: list[Controller] = []

    def start(**kwargs: Any) -> Controller:
        controller = Controller(sink, hostname="127.0.0.1", port=smtp_port, **kwargs)
        controller.start()
        started.append(controller)
        return controller

    yield start
    for controller in started:
        controller.stop()


@dataclass
class Events:
    """Publishes events to ``hitless.events`` on ``vhost`` as the broker user ``as_``
    logs in (the controller's user unless a test says otherwise)."""

    rabbit: Management
    vhost: str

    def publish(
        self,
        event: bus_pb2.Event,
        key: str,
        *,
        user_id: str | None = CONTROLLER_USER,
        as_: Management | None = None,
    ) -> None:
        properties: dict[str, Any] = {"message_id": event.event_id}
        if user_id is not None:
            properties["user_id"] = user_id
        routed = (as_ or self.rabbit).publish(
            self.vhost, topology.EVENTS.name, key, codec.encode(event).decode(), **properties
        )
        assert routed, f"event {event.event_id} was not routed to the notifier's queue"


@pytest.fixture
def publisher(bus: BusConfig, rabbit: Management, vhost: str) -> Events:
    """Publishes events; the notifier's queue is declared first, so events wait there
    while no notifier runs."""
    pub = Publisher(bus, queues=(topology.NOTIFIER_EVENTS,), name="test-events").start()
    try:
        assert pub.wait_connected(10), "the test publisher could not reach RabbitMQ"
    finally:
        pub.close()
    return Events(rabbit, vhost)


@pytest.fixture
def other_user(rabbit: Management, vhost: str) -> Iterator[Management]:
    """A second broker user, allowed to write to this test's vhost (someone who may
    publish to the events exchange but is not the controller), removed afterwards."""
    name, password = f"notif-test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    rabbit.request("PUT", f"/users/{name}", {"password": password, "tags": "management"})
    rabbit.request(
        "PUT", f"/permissions/{vhost}/{name}", {"configure": ".*", "write": ".*", "read": ".*"}
    )
    try:
        yield Management(user=name, password=password)
    finally:
        rabbit.request("DELETE", f"/users/{name}")


@pytest.fixture
def make_notifier(
    bus: BusConfig, smtp_port: int, tmp_path: Path
) -> Iterator[Callable[..., Notifier]]:
    running: list[Notifier] = []

    def make(smtp: SmtpConfig | None = None, retry: RetryPolicy = FAST) -> Notifier:
        config = NotifierConfig(
            bus=bus,
            smtp=smtp or SmtpConfig(HostPort("127.0.0.1", smtp_port), timeout_s=5),
            state_path=tmp_path / "notifier.db",
            controller_user=CONTROLLER_USER,
            sender=SENDER,
            retry=retry,
        )
        notifier = Notifier(config).start()
        running.append(notifier)
        assert notifier.wait_consuming(10), "the notifier did not start consuming"
        return notifier

    yield make
    for notifier in running:
        stop(notifier)


def stop(notifier: Notifier) -> None:
    notifier.stop()


def release_event(event_id: str | None = None, *, vpn: bool = True) -> bus_pb2.Event:
    return bus_pb2.Event(
        event_id=event_id or f"ev-{uuid.uuid4().hex[:8]}",
        admins=ADMINS,
        release_published=controller_pb2.Release(
            version="1.4.0",
            sha256="cd" * 32,
            size=2048,
            notes="## Changes\n\n- VPN service rebuilt on a **new** TLS stack",
            restarts_vpn_service=vpn,
        ),
    )


def publish(publisher: Events, event: bus_pb2.Event, key: str) -> None:
    """Publish ``event`` as the controller does."""
    publisher.publish(event, key)


def assert_queue_settled(rabbit: Management, vhost: str) -> None:
    """After the notifier stopped: nothing left unacked (it would be back in the queue) and
    nothing dead-lettered."""
    left = rabbit.get_messages(vhost, topology.NOTIFIER_EVENTS.name)
    assert left == [], f"expected the events queue empty, found {len(left)} message(s)"
    dead = rabbit.get_messages(vhost, topology.DEAD_LETTERS.name)
    assert dead == [], f"expected no dead letters, found {dead}"


def body_text(message: EmailMessage) -> str:
    part = message.get_body(("plain",))
    assert part is not None, "expected a text part"
    return str(part.get_content())


def test_release_event_mails_each_admin_once_with_notes_and_vpn_warning(
    make_notifier: Callable[..., Notifier],
    start_smtp: Callable[..., Controller],
    sink: Sink,
    publisher: Events,
    rabbit: Management,
    vhost: str,
) -> None:
    start_smtp()
    notifier = make_notifier()
    event = release_event(vpn=True)
    publish(publisher, event, topology.RELEASE_PUBLISHED)

    wait_for(lambda: len(sink.mails) >= 3, timeout=10, what="3 emails", describe=sink.count)
    stop(notifier)
    assert sink.count() == Counter(ADMINS)
    for admin in ADMINS:
        (mail,) = sink.to(admin)
        assert mail["Subject"] == "[hitless] Release 1.4.0 available — restarts the VPN service"
        assert mail["Message-ID"] == message_id(event.event_id, admin, SENDER)
        text = body_text(mail)
        assert "VPN service rebuilt on a **new** TLS stack" in text
        assert "must reconnect" in text
        html = mail.get_body(("html",))
        assert html is not None and "<strong>new</strong>" in html.get_content()
    assert_queue_settled(rabbit, vhost)


def test_the_same_event_delivered_twice_mails_once(
    make_notifier: Callable[..., Notifier],
    start_smtp: Callable[..., Controller],
    sink: Sink,
    publisher: Events,
    rabbit: Management,
    vhost: str,
) -> None:
    start_smtp()
    notifier = make_notifier()
    event = release_event(vpn=False)
    publish(publisher, event, topology.RELEASE_PUBLISHED)
    publish(publisher, event, topology.RELEASE_PUBLISHED)

    wait_for(
        lambda: notifier.counters.skipped >= 3,
        timeout=10,
        what="the second delivery to skip all three admins",
        describe=lambda: f"{notifier.counters}, mails {sink.count()}",
    )
    stop(notifier)
    assert sink.count() == Counter(ADMINS)
    assert_queue_settled(rabbit, vhost)


def test_smtp_down_then_back_delivers_every_email_once(
    make_notifier: Callable[..., Notifier],
    start_smtp: Callable[..., Controller],
    sink: Sink,
    publisher: Events,
    rabbit: Management,
    vhost: str,
) -> None:
    notifier = make_notifier()  # nothing listens on the SMTP port yet
    first, second = release_event(), release_event(vpn=False)
    publish(publisher, first, topology.RELEASE_PUBLISHED)
    publish(publisher, second, topology.RELEASE_PUBLISHED)
    wait_for(
        lambda: notifier.counters.unavailable >= 4,
        timeout=10,
        what="the notifier to retry the unreachable SMTP server a few times",
        describe=lambda: str(notifier.counters),
    )
    assert sink.mails == []

    start_smtp()
    wait_for(lambda: len(sink.mails) >= 6, timeout=10, what="6 emails", describe=sink.count)
    stop(notifier)
    assert sink.count() == Counter({admin: 2 for admin in ADMINS})
    ids = {mail["X-Hitless-Event"] for _, mail in sink.mails}
    assert ids == {first.event_id, second.event_id}
    assert_queue_settled(rabbit, vhost)


def test_a_rejected_address_does_not_block_the_others(
    make_notifier: Callable[..., Notifier],
    start_smtp: Callable[..., Controller],
    sink: Sink,
    publisher: Events,
    rabbit: Management,
    vhost: str,
    tmp_path: Path,
) -> None:
    sink.answers["bob@example.com"] = ["550 5.1.1 <bob@example.com>: no such mailbox"]
    start_smtp()
    notifier = make_notifier()
    job = controller_pb2.Job(
        job_id="job-1",
        state=common_pb2.JOB_STATE_PARTIAL,
        target_version="1.4.0",
        gateways=[
            controller_pb2.GatewayJob(
                gateway_id="gw-1", state=common_pb2.GATEWAY_JOB_STATE_SUCCEEDED,
                from_version="1.3.0", to_version="1.4.0", vpn_sessions_dropped=3,
            ),
            controller_pb2.GatewayJob(
                gateway_id="gw-2", state=common_pb2.GATEWAY_JOB_STATE_FAILED,
                from_version="1.3.0", error="sha256 mismatch after download",
            ),
        ],
    )  # fmt: skip
    event = bus_pb2.Event(event_id="ev-job-1", admins=ADMINS, job_finished=job)
    publish(publisher, event, topology.JOB_FINISHED)

    wait_for(
        lambda: notifier.counters.sent + notifier.counters.rejected >= 3,
        timeout=10,
        what="every admin settled",
        describe=lambda: str(notifier.counters),
    )
    stop(notifier)
    assert sink.count() == Counter({"alice@example.com": 1, "carol@example.com": 1})
    (mail,) = sink.to("alice@example.com")
    assert mail["Subject"] == "[hitless] Upgrade to 1.4.0 partly failed: 1 of 2 gateways upgraded"
    text = body_text(mail)
    assert "- gw-2: FAILED: sha256 mismatch after download" in text
    assert "VPN sessions dropped: 3" in text
    assert_queue_settled(rabbit, vhost)

    ledger = Ledger(tmp_path / "notifier.db")
    try:
        assert ledger.states("ev-job-1")["bob@example.com"] is State.FAILED
        assert "550 5.1.1" in (ledger.detail("ev-job-1", "bob@example.com") or "")
    finally:
        ledger.close()


def test_temporary_refusals_are_retried_until_the_recipient_deadline(
    make_notifier: Callable[..., Notifier],
    start_smtp: Callable[..., Controller],
    sink: Sink,
    publisher: Events,
    rabbit: Management,
    vhost: str,
) -> None:
    # alice is greylisted twice, then accepted; carol's mailbox stays full.
    sink.answers["alice@example.com"] = ["451 4.7.1 greylisted", "451 4.7.1 greylisted", "250"]
    sink.answers["carol@example.com"] = ["452 4.2.2 mailbox full"]
    start_smtp()
    notifier = make_notifier(retry=RetryPolicy(0.05, 0.2, recipient_deadline_s=1.0))
    rejected = bus_pb2.JobRejected(
        message_id="m-9", reason="unknown version 9.9.9", body='{"version": "9.9.9"}', user_id="eve"
    )
    event = bus_pb2.Event(event_id="ev-rej", admins=ADMINS, job_rejected=rejected)
    publish(publisher, event, topology.JOB_REJECTED)

    wait_for(
        lambda: notifier.counters.sent >= 2 and notifier.counters.rejected >= 1,
        timeout=10,
        what="alice and bob mailed, carol given up on",
        describe=lambda: f"{notifier.counters}, mails {sink.count()}",
    )
    stop(notifier)
    assert sink.count() == Counter({"alice@example.com": 1, "bob@example.com": 1})
    (mail,) = sink.to("bob@example.com")
    assert mail["Subject"] == "[hitless] Upgrade job rejected: unknown version 9.9.9"
    assert "Published by: eve" in body_text(mail) and '{"version": "9.9.9"}' in body_text(mail)
    assert_queue_settled(rabbit, vhost)


def test_a_send_interrupted_before_the_ledger_commit_is_sent_again_with_the_same_message_id(
    make_notifier: Callable[..., Notifier],
    start_smtp: Callable[..., Controller],
    sink: Sink,
    publisher: Events,
    tmp_path: Path,
) -> None:
    event = release_event()
    ledger = Ledger(tmp_path / "notifier.db")
    for admin in ADMINS[:2]:
        ledger.begin(event.event_id, admin, message_id(event.event_id, admin, SENDER))
    ledger.sent(event.event_id, ADMINS[0])  # alice settled; bob left SENDING, as after a crash
    ledger.close()

    start_smtp()
    notifier = make_notifier()
    publish(publisher, event, topology.RELEASE_PUBLISHED)
    wait_for(lambda: len(sink.mails) >= 2, timeout=10, what="2 emails", describe=sink.count)
    stop(notifier)
    assert sink.count() == Counter({"bob@example.com": 1, "carol@example.com": 1})
    (mail,) = sink.to("bob@example.com")
    assert mail["Message-ID"] == message_id(event.event_id, "bob@example.com", SENDER)


def test_login_on_loopback(
    make_notifier: Callable[..., Notifier],
    start_smtp: Callable[..., Controller],
    sink: Sink,
    publisher: Events,
    smtp_port: int,
) -> None:
    start_smtp(authenticator=sink.authenticate, auth_require_tls=False)
    smtp = SmtpConfig(HostPort("127.0.0.1", smtp_port), user="bot", password="pw", timeout_s=5)
    notifier = make_notifier(smtp=smtp)
    publish(publisher, release_event(), topology.RELEASE_PUBLISHED)
    wait_for(lambda: len(sink.mails) >= 3, timeout=10, what="3 emails", describe=sink.count)
    stop(notifier)
    assert sink.logins and set(sink.logins) == {"bot"}


def test_notifier_process_restart_between_deliveries_mails_once(
    procs: Procs,
    bus: BusConfig,
    start_smtp: Callable[..., Controller],
    sink: Sink,
    publisher: Events,
    smtp_port: int,
    tmp_path: Path,
    rabbit: Management,
    vhost: str,
) -> None:
    start_smtp()
    argv = [
        command("notifier"), "run", "--amqp", bus.url, "--smtp", f"127.0.0.1:{smtp_port}",
        "--from", SENDER, "--state", str(tmp_path / "ledger.db"),
    ]  # fmt: skip
    event = release_event()

    first = procs.start("notifier-1", argv)
    publish(publisher, event, topology.RELEASE_PUBLISHED)
    wait_for(
        lambda: len(sink.mails) >= 3, timeout=15, what="3 emails",
        describe=lambda: f"{sink.count()}\n{procs.dump_logs()}",
    )  # fmt: skip
    procs.stop(first)
    assert first.popen.returncode == 0, first.log()

    publish(publisher, event, topology.RELEASE_PUBLISHED)  # waits in the queue meanwhile
    second = procs.start("notifier-2", argv)
    wait_for(
        lambda: "event_delivered" in second.log(), timeout=15,
        what="the restarted notifier to settle the redelivered event",
        describe=procs.dump_logs,
    )  # fmt: skip
    procs.stop(second)
    assert sink.count() == Counter(ADMINS)
    assert_queue_settled(rabbit, vhost)


def failed_detail(path: Path, event_id: str, address: str) -> str:
    """The reason the ledger keeps for a FAILED pair (fails when the pair is not FAILED)."""
    ledger = Ledger(path)
    try:
        state = ledger.states(event_id).get(address)
        assert state is State.FAILED, f"expected {address} FAILED for {event_id}, found {state}"
        return ledger.detail(event_id, address) or ""
    finally:
        ledger.close()


def test_an_address_the_server_cannot_take_fails_once_and_later_events_go_on(
    make_notifier: Callable[..., Notifier],
    start_smtp: Callable[..., Controller],
    sink: RcptSink,
    publisher: Events,
    rabbit: Management,
    vhost: str,
    tmp_path: Path,
) -> None:
    start_smtp(enable_SMTPUTF8=False)
    notifier = make_notifier()
    jorg, idn = "jörg@exämple.com", "a@exämple.com"
    first = release_event("ev-intl-1")
    first.ClearField("admins")
    # jörg needs SMTPUTF8; a@exämple.com goes as IDNA; old@corp.local was stored by an
    # earlier, looser rule and fails the one rule the notifier shares with the controller.
    first.admins.extend(["alice@example.com", jorg, idn, "old@corp.local", "bob@example.com"])
    second = release_event("ev-intl-2", vpn=False)
    second.ClearField("admins")
    second.admins.extend([jorg, "carol@example.com"])
    publish(publisher, first, topology.RELEASE_PUBLISHED)
    publish(publisher, second, topology.RELEASE_PUBLISHED)

    expected = Counter(
        {"alice@example.com": 1, "a@xn--exmple-cua.com": 1, "bob@example.com": 1,
         "carol@example.com": 1}
    )  # fmt: skip
    wait_for(
        lambda: sink.count() == expected and notifier.counters.rejected >= 3,
        timeout=10,
        what="both events settled: 4 emails sent, 3 addresses failed",
        describe=lambda: f"{notifier.counters}, mails {sink.count()}",
    )
    (mail,) = sink.to("a@xn--exmple-cua.com")
    assert mail["To"] == "a@xn--exmple-cua.com"
    assert mail["Message-ID"] == message_id(first.event_id, idn, SENDER)

    # Delivered again (a redelivery, a restart): nothing is retried, nobody mailed twice.
    publish(publisher, first, topology.RELEASE_PUBLISHED)
    wait_for(
        lambda: notifier.counters.skipped >= 4,
        timeout=10,
        what="the repeated event to skip every address it had settled",
        describe=lambda: str(notifier.counters),
    )
    stop(notifier)
    assert notifier.counters.rejected == 3, notifier.counters
    assert notifier.counters.unavailable == 0, "a recipient is never the server's problem"
    assert sink.count() == expected
    assert jorg not in sink.tries(), "an address the server cannot take is never put to it"
    assert_queue_settled(rabbit, vhost)

    ledger = tmp_path / "notifier.db"
    for event in (first, second):
        detail = failed_detail(ledger, event.event_id, jorg)
        assert "does not offer SMTPUTF8, which jörg@exämple.com needs" in detail, detail
    assert "special-use or reserved name" in failed_detail(ledger, first.event_id, "old@corp.local")


def test_an_internationalised_address_is_sent_with_smtputf8_when_offered(
    make_notifier: Callable[..., Notifier],
    start_smtp: Callable[..., Controller],
    sink: RcptSink,
    publisher: Events,
    rabbit: Management,
    vhost: str,
) -> None:
    start_smtp(enable_SMTPUTF8=True)
    notifier = make_notifier()
    event = release_event()
    event.ClearField("admins")
    event.admins.extend(["Jörg@EXÄMPLE.com", "alice@example.com"])
    publish(publisher, event, topology.RELEASE_PUBLISHED)

    wait_for(lambda: len(sink.mails) >= 2, timeout=10, what="2 emails", describe=sink.count)
    stop(notifier)
    assert sink.count() == Counter({"Jörg@exämple.com": 1, "alice@example.com": 1})
    (mail,) = sink.to("Jörg@exämple.com")
    assert mail["To"] == "Jörg@exämple.com"
    assert mail["Message-ID"] == message_id(event.event_id, "Jörg@exämple.com", SENDER)
    assert "VPN service rebuilt" in body_text(mail)
    assert_queue_settled(rabbit, vhost)


def test_a_recipient_refused_for_good_is_tried_once_per_event_and_holds_no_later_event(
    make_notifier: Callable[..., Notifier],
    start_smtp: Callable[..., Controller],
    sink: RcptSink,
    publisher: Events,
    rabbit: Management,
    vhost: str,
    tmp_path: Path,
) -> None:
    sink.answers["bob@example.com"] = ["550 5.1.1 <bob@example.com>: no such mailbox"]
    start_smtp()
    notifier = make_notifier()
    first = release_event("ev-550-1")
    second = release_event("ev-550-2", vpn=False)
    second.ClearField("admins")
    second.admins.extend(["bob@example.com", "carol@example.com"])
    publish(publisher, first, topology.RELEASE_PUBLISHED)
    publish(publisher, second, topology.RELEASE_PUBLISHED)

    expected = Counter({"alice@example.com": 1, "carol@example.com": 2})
    wait_for(
        lambda: sink.count() == expected and notifier.counters.rejected >= 2,
        timeout=10,
        what="both events settled, bob refused in each",
        describe=lambda: f"{notifier.counters}, mails {sink.count()}, tried {sink.tries()}",
    )
    publish(publisher, first, topology.RELEASE_PUBLISHED)
    publish(publisher, second, topology.RELEASE_PUBLISHED)
    wait_for(
        lambda: notifier.counters.skipped >= 5,
        timeout=10,
        what="the repeated events to skip every settled address",
        describe=lambda: str(notifier.counters),
    )
    stop(notifier)
    assert sink.tries()["bob@example.com"] == 2, f"bob tried once per event: {sink.tries()}"
    assert sink.count() == expected
    assert_queue_settled(rabbit, vhost)
    for event in (first, second):
        detail = failed_detail(tmp_path / "notifier.db", event.event_id, "bob@example.com")
        assert "550 5.1.1" in detail, detail


def test_a_recipient_that_breaks_the_session_goes_last_and_fails_at_its_deadline(
    make_notifier: Callable[..., Notifier],
    start_smtp: Callable[..., Controller],
    sink: RcptSink,
    publisher: Events,
    rabbit: Management,
    vhost: str,
    tmp_path: Path,
) -> None:
    # 421 closes the session (RFC 5321 4.2.2): here it answers one recipient, every time.
    sink.answers["crash@example.com"] = ["421 4.3.0 closing the connection"]
    start_smtp()
    notifier = make_notifier(retry=RetryPolicy(0.05, 0.2, recipient_deadline_s=1.0))
    first = release_event("ev-421-1")
    first.ClearField("admins")
    first.admins.extend(["crash@example.com", "alice@example.com", "bob@example.com"])
    second = release_event("ev-421-2", vpn=False)
    second.ClearField("admins")
    second.admins.extend(["carol@example.com"])
    publish(publisher, first, topology.RELEASE_PUBLISHED)
    publish(publisher, second, topology.RELEASE_PUBLISHED)

    wait_for(
        lambda: len(sink.mails) >= 3 and notifier.counters.rejected >= 1,
        timeout=15,
        what="alice, bob and carol mailed, crash given up on",
        describe=lambda: f"{notifier.counters}, mails {sink.count()}, tried {sink.tries()}",
    )
    stop(notifier)
    assert sink.count() == Counter(
        {"alice@example.com": 1, "bob@example.com": 1, "carol@example.com": 1}
    )
    tried = sink.tried
    assert tried[:3] == ["crash@example.com", "alice@example.com", "bob@example.com"], (
        f"after crash broke the session the others go first; tried {tried}"
    )
    assert tried.count("crash@example.com") >= 2, f"crash is retried until its deadline: {tried}"
    detail = failed_detail(tmp_path / "notifier.db", first.event_id, "crash@example.com")
    assert detail.startswith("still refused after 1s:") and "421" in detail, detail
    assert_queue_settled(rabbit, vhost)


def test_a_refused_command_mails_each_admin_a_security_email_once_when_delivered_twice(
    make_notifier: Callable[..., Notifier],
    start_smtp: Callable[..., Controller],
    sink: Sink,
    publisher: Events,
    rabbit: Management,
    vhost: str,
) -> None:
    start_smtp()
    notifier = make_notifier()
    refused = bus_pb2.CommandRefused(
        report_id="r-7",
        gateway_id="gw-1",
        command_id="forged-1",
        job_id="forged-job",
        kind="unknown-key",
        reason="signed by key 9f3c, which the trusted root does not carry\r\nBcc: x@example.com",
        from_version="1.3.0",
    )
    event = bus_pb2.Event(event_id="refused:r-7", admins=ADMINS, command_refused=refused)
    publish(publisher, event, topology.COMMAND_REFUSED)
    publish(publisher, event, topology.COMMAND_REFUSED)

    wait_for(
        lambda: notifier.counters.skipped >= 3,
        timeout=10,
        what="the second delivery to skip all three admins",
        describe=lambda: f"{notifier.counters}, mails {sink.count()}",
    )
    stop(notifier)
    assert sink.count() == Counter(ADMINS)
    for admin in ADMINS:
        (mail,) = sink.to(admin)
        assert mail["Subject"] == (
            "[hitless] Security: gateway gw-1 refused a command (unknown-key)"
        )
        assert mail["X-Hitless-Event"] == "refused:r-7" and "Bcc" not in mail
        assert mail["Message-ID"] == message_id(event.event_id, admin, SENDER)
        text = body_text(mail)
        assert "Reason: signed by key 9f3c, which the trusted root does not carry\\r\\nBcc:" in text
        assert "Command id (as claimed): forged-1" in text
        assert "Version it keeps running: 1.3.0" in text
        assert "hitless.commands exchange" in text
    assert_queue_settled(rabbit, vhost)


def test_only_events_from_the_controllers_user_are_mailed(
    make_notifier: Callable[..., Notifier],
    start_smtp: Callable[..., Controller],
    sink: Sink,
    publisher: Events,
    other_user: Management,
    rabbit: Management,
    vhost: str,
) -> None:
    """An event another broker user published, or one without user_id, is dead-lettered
    with the reason and counted, never mailed; the controller's next event is mailed."""
    start_smtp()
    notifier = make_notifier()
    other = other_user.request("GET", "/whoami")["name"]
    forged, anonymous, genuine = (release_event(f"ev-{n}") for n in ("forged", "anon", "real"))
    publisher.publish(forged, topology.RELEASE_PUBLISHED, user_id=other, as_=other_user)
    publisher.publish(anonymous, topology.RELEASE_PUBLISHED, user_id=None)
    publisher.publish(genuine, topology.RELEASE_PUBLISHED)

    wait_for(lambda: len(sink.mails) >= 3, timeout=10, what="3 emails", describe=sink.count)
    stop(notifier)
    assert {mail["X-Hitless-Event"] for _, mail in sink.mails} == {"ev-real"}
    assert sink.count() == Counter(ADMINS)
    assert notifier.counters.not_from_controller == 2, notifier.counters
    dead = {
        m["properties"]["message_id"]: m
        for m in rabbit.get_messages(vhost, topology.DEAD_LETTERS.name)
    }
    assert sorted(dead) == ["ev-anon", "ev-forged"], f"dead-lettered: {sorted(dead)}"
    forged_dead = dead["ev-forged"]["properties"]
    reason = forged_dead["headers"][topology.REASON_HEADER]
    assert f"published by broker user {other!r}" in reason, reason
    assert "'guest'" in reason and "--controller-user" in reason, reason
    # Dead-lettered by the notifier's own user: the original user_id travels as a header.
    assert "user_id" not in forged_dead
    assert forged_dead["headers"][ORIGINAL_USER_HEADER] == other
    reason = dead["ev-anon"]["properties"]["headers"][topology.REASON_HEADER]
    assert "no user_id property" in reason, reason
    assert dead["ev-forged"]["payload"] == codec.encode(forged).decode(), "body untouched"
    left = rabbit.get_messages(vhost, topology.NOTIFIER_EVENTS.name)
    assert left == [], "the events queue keeps flowing"
    ledger = Ledger(notifier.config.state_path)
    try:
        assert ledger.states("ev-forged") == {} and ledger.states("ev-anon") == {}
    finally:
        ledger.close()


def test_the_notifier_process_mails_only_what_its_controller_user_published(
    procs: Procs,
    bus: BusConfig,
    start_smtp: Callable[..., Controller],
    sink: Sink,
    publisher: Events,
    other_user: Management,
    smtp_port: int,
    tmp_path: Path,
    rabbit: Management,
) -> None:
    """With a broker user per service: ``--controller-user`` names the controller's, and
    events from the notifier's own login (guest here) are not mailed."""
    start_smtp()
    controller = other_user.request("GET", "/whoami")["name"]
    notifier = procs.start(
        "notifier",
        [command("notifier"), "run", "--amqp", bus.url, "--smtp", f"127.0.0.1:{smtp_port}",
         "--from", SENDER, "--state", str(tmp_path / "ledger.db"),
         "--controller-user", controller],
    )  # fmt: skip
    publisher.publish(release_event("ev-guest"), topology.RELEASE_PUBLISHED)
    publisher.publish(
        release_event("ev-controller"), topology.RELEASE_PUBLISHED, user_id=controller,
        as_=other_user,
    )  # fmt: skip
    wait_for(
        lambda: "event_delivered" in notifier.log(), timeout=15,
        what="the controller's event mailed", describe=procs.dump_logs,
    )  # fmt: skip
    procs.stop(notifier)
    assert {mail["X-Hitless-Event"] for _, mail in sink.mails} == {"ev-controller"}
    assert sink.count() == Counter(ADMINS)
    assert "event_not_from_controller" in notifier.log()
    dead = rabbit.get_messages(publisher.vhost, topology.DEAD_LETTERS.name)
    assert [m["properties"]["message_id"] for m in dead] == ["ev-guest"]
