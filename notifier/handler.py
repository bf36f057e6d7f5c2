"""The event handler: one bus message in, one email per admin out, each exactly once.

Only the controller's events are mailed: an event whose ``user_id`` property is not the
controller's broker user (``NotifierConfig.controller_user``), or that has none, is
dead-lettered with the reason and counted (``Counters.not_from_controller``) before it is
even decoded. RabbitMQ refuses a ``user_id`` that is not the publishing connection's user
("Validated User-ID", https://www.rabbitmq.com/docs/validated-user-id), so whoever else
may write to the events exchange cannot have mail sent in the controller's name.

For an event, every admin address is settled in the ledger (SENT or FAILED) before the
handler returns, and only then does the consumer ack the message. Pairs already settled are
skipped, so a redelivered event, or one delivered again after a restart, mails nobody twice.
Addresses are checked by the controller's rule (``hitless.addresses``) and keyed by their
canonical form; one that fails it is recorded as FAILED with the reason.

While the SMTP server is unreachable the handler keeps the message and retries with
bounded exponential backoff and jitter, without a time limit: raising would requeue the
message, and the consumer dead-letters a message that fails again on redelivery, so a long
outage would otherwise lose the event. A recipient refused with 5xx, or one the server
cannot take at all (a non-ASCII local part without SMTPUTF8), is recorded as FAILED and
logged, never retried, and the others are mailed; one refused with 4xx, or one whose
message made the server break off the session, is retried until the policy's recipient
deadline, after the others, and then recorded as FAILED. When the notifier stops with
recipients still pending, the handler waits until the consumer has closed its connection
(so the broker requeues the message untouched) and then gives up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from structlog.stdlib import BoundLogger

from hitless import addresses, logs, names
from hitless.addresses import Address
from hitless.bus import codec
from hitless.bus.amqp import DeadLetter, Delivery
from hitless.errors import DecodeError
from hitless.v1 import bus_pb2
from notifier import render
from notifier.config import ENV_CONTROLLER_USER, RetryPolicy
from notifier.errors import DeliveryInterrupted, SessionBroken, SmtpUnavailable
from notifier.ledger import SETTLED, Ledger, State
from notifier.mailer import Mailer, Outcome, Session

log = logs.get(__name__)

_RELEASE_WAIT_S = 30.0


@dataclass
class Counters:
    """What this handler has done since it started (for health checks and tests)."""

    sent: int = 0
    rejected: int = 0
    deferred: int = 0
    unavailable: int = 0
    skipped: int = 0
    # Events dead-lettered unread: published by someone other than the controller's user.
    not_from_controller: int = 0


class EventHandler:
    """Handles ``hitless.v1.Event`` deliveries; see the module docstring for the rules."""

    def __init__(
        self,
        ledger: Ledger,
        mailer: Mailer,
        *,
        controller_user: str,
        sender: str,
        retry: RetryPolicy,
        stopping: threading.Event,
        released: threading.Event,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ledger = ledger
        self._mailer = mailer
        self._controller_user = controller_user
        self._sender = sender
        self._retry = retry
        self._stopping = stopping
        self._released = released
        self._clock = clock
        self.counters = Counters()

    def __call__(self, delivery: Delivery) -> None:
        if delivery.user_id != self._controller_user:
            self.counters.not_from_controller += 1
            reason = self._not_from_controller(delivery.user_id)
            log.warning(
                "event_not_from_controller",
                user=delivery.user_id,
                controller_user=self._controller_user,
                routing_key=delivery.routing_key,
                message_id=delivery.message_id,
            )
            raise DeadLetter(reason)
        try:
            event = codec.decode(bus_pb2.Event, delivery.body)
        except DecodeError as exc:
            raise DeadLetter(f"not a hitless.v1.Event: {exc}") from exc
        if not event.event_id:
            raise DeadLetter("the event has no event_id, so it cannot be mailed exactly once")
        try:
            rendered = render.render(event)
        except render.UnknownEvent as exc:
            raise DeadLetter(str(exc)) from exc
        kind = event.WhichOneof("kind")
        bound = log.bind(event_id=event.event_id, kind=kind)
        recipients = self._recipients(event, bound)
        if not recipients:
            bound.warning("event_without_admins", routing_key=delivery.routing_key)
            return
        self._deliver(event.event_id, recipients, rendered, bound)

    def _not_from_controller(self, user_id: str | None) -> str:
        controller = names.shown(self._controller_user, 64)
        if not user_id:
            who = "the event has no user_id property, so nothing says who published it"
        else:
            who = f"the event was published by broker user {names.shown(user_id, 64)}"
        return (
            f"{who}: only events the controller publishes as its broker user {controller} "
            "are mailed; if the controller logs in as another user, start the notifier with "
            f"--controller-user USER (or {ENV_CONTROLLER_USER})"
        )

    def _recipients(self, event: bus_pb2.Event, bound: BoundLogger) -> list[Address]:
        """Unique addresses; invalid ones are settled as FAILED right away."""
        done = self._ledger.states(event.event_id)
        unique: list[Address] = []
        for raw in event.admins:
            try:
                address = addresses.parse(raw)
            except addresses.InvalidAddress as exc:
                key = raw.strip()[:320] or "(empty)"
                if done.get(key) not in SETTLED:
                    self._ledger.failed(event.event_id, key, str(exc))
                    self.counters.rejected += 1
                    bound.warning("email_rejected", to=key, reason=str(exc))
                continue
            if address not in unique:
                unique.append(address)
        return unique

    def _deliver(
        self,
        event_id: str,
        recipients: list[Address],
        rendered: render.Rendered,
        bound: BoundLogger,
    ) -> None:
        attempt = 0
        first_deferred: dict[str, float] = {}
        states = self._ledger.states(event_id)
        self.counters.skipped += sum(1 for a in recipients if states.get(a.text) in SETTLED)
        while True:
            states = self._ledger.states(event_id)
            pending = [a for a in recipients if states.get(a.text) not in SETTLED]
            # Addresses refused for now go last, so one that keeps breaking the session
            # cannot keep the others from being mailed.
            pending.sort(key=lambda a: a.text in first_deferred)
            if not pending:
                bound.info("event_delivered", recipients=len(recipients))
                return
            progressed = False
            try:
                with self._mailer.session() as session:
                    for recipient in pending:
                        try:
                            settled = self._send_one(
                                session, event_id, recipient, states.get(recipient.text),
                                rendered, bound, first_deferred,
                            )  # fmt: skip
                        except SessionBroken as exc:
                            if self._past_deadline(
                                event_id, recipient.text, str(exc), first_deferred, bound
                            ):
                                progressed = True
                            raise
                        progressed = progressed or settled
            except SmtpUnavailable as exc:
                self.counters.unavailable += 1
                error = str(exc)
            else:
                error = ""
            attempt = 0 if progressed else attempt + 1
            states = self._ledger.states(event_id)
            if all(states.get(a.text) in SETTLED for a in recipients):
                continue
            delay = self._retry.delay(attempt)
            if error:
                bound.warning("smtp_unavailable", error=error, retry_in_s=round(delay, 2))
            if self._stopping.wait(delay):
                self._give_up(event_id, bound)

    def _send_one(
        self,
        session: Session,
        event_id: str,
        recipient: Address,
        previous: State | None,
        rendered: render.Rendered,
        bound: BoundLogger,
        first_deferred: dict[str, float],
    ) -> bool:
        """Send to one address; return whether it is now settled."""
        address = recipient.text
        message_id = render.message_id(event_id, address, self._sender)
        message = render.compose(
            rendered, sender=self._sender, recipient=recipient.wire, message_id=message_id,
            event_id=event_id,
        )  # fmt: skip
        attempts = self._ledger.begin(event_id, address, message_id)
        if previous is State.SENDING:
            # A send began before and its outcome was never recorded (a crash, or the
            # server went away mid-message): the admin may already have it.
            bound.warning("email_resent_possible_duplicate", to=address, message_id=message_id)
        result = session.send(message, self._sender, recipient.wire)
        if result.outcome is Outcome.SENT:
            self._ledger.sent(event_id, address)
            self.counters.sent += 1
            bound.info("email_sent", to=address, message_id=message_id, attempts=attempts)
            return True
        if result.outcome is Outcome.REJECTED:
            self._ledger.failed(event_id, address, result.detail, message_id)
            self.counters.rejected += 1
            bound.warning("email_rejected", to=address, reason=result.detail)
            return True
        self.counters.deferred += 1
        if self._past_deadline(event_id, address, result.detail, first_deferred, bound):
            return True
        bound.info("email_deferred", to=address, reason=result.detail)
        return False

    def _past_deadline(
        self,
        event_id: str,
        address: str,
        reason: str,
        first_deferred: dict[str, float],
        bound: BoundLogger,
    ) -> bool:
        """An address was refused for now: record it FAILED, and return True, once it has
        been refused for longer than the policy's recipient deadline."""
        since = first_deferred.setdefault(address, self._clock())
        if self._clock() - since < self._retry.recipient_deadline_s:
            return False
        detail = f"still refused after {self._retry.recipient_deadline_s:.0f}s: {reason}"
        self._ledger.failed(event_id, address, detail)
        self.counters.rejected += 1
        bound.warning("email_rejected", to=address, reason=detail)
        return True

    def _give_up(self, event_id: str, bound: BoundLogger) -> None:
        """Stopping with recipients pending: let the consumer close first, so the message
        goes back to the queue untouched rather than being settled as a failure."""
        bound.warning("delivery_interrupted", detail="the notifier is stopping")
        self._released.wait(_RELEASE_WAIT_S)
        raise DeliveryInterrupted(
            f"stopped before every admin of event {event_id} was mailed; it is delivered again "
            "when the notifier starts"
        )
