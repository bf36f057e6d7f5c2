"""The notifier service: the events consumer, the handler, the ledger and the mailer,
started and stopped together."""

from __future__ import annotations

import threading

from hitless import logs
from hitless.bus import topology
from hitless.bus.amqp import Consumer
from notifier.config import NotifierConfig
from notifier.handler import Counters, EventHandler
from notifier.ledger import Ledger
from notifier.mailer import Mailer, SmtpMailer

log = logs.get(__name__)

# Consumer.stop drains handlers in flight for up to 10 s before closing the connection.
_STOP_TIMEOUT_S = 15.0


class Notifier:
    """Consumes ``hitless.notifier.events`` and mails the admins of each event once."""

    def __init__(self, config: NotifierConfig, *, mailer: Mailer | None = None) -> None:
        self.config = config
        self.ledger = Ledger(config.state_path)
        self._stopping = threading.Event()
        self._released = threading.Event()
        self._handler = EventHandler(
            self.ledger,
            mailer or SmtpMailer(config.smtp),
            controller_user=config.controller_user,
            sender=config.sender,
            retry=config.retry,
            stopping=self._stopping,
            released=self._released,
        )
        self._consumer = Consumer(
            config.bus, topology.NOTIFIER_EVENTS, self._handler, name="notifier-events"
        )

    @property
    def counters(self) -> Counters:
        return self._handler.counters

    def start(self) -> Notifier:
        log.info(
            "notifier_starting",
            smtp=str(self.config.smtp.server),
            starttls=self.config.smtp.starttls,
            login=bool(self.config.smtp.user),
            sender=self.config.sender,
            ledger=str(self.ledger.path),
            controller_user=self.config.controller_user,
        )
        self._consumer.start()
        return self

    def wait_consuming(self, timeout: float) -> bool:
        return self._consumer.wait_consuming(timeout)

    def stop(self) -> None:
        """Stop consuming; an event still waiting for the SMTP server goes back to the queue
        unacked, and is delivered (to whoever has not had it yet) at the next start.
        Stopping twice is harmless."""
        if self._released.is_set():
            return
        self._stopping.set()
        self._consumer.stop(timeout=_STOP_TIMEOUT_S)
        self._released.set()
        self.ledger.close()
        log.info("notifier_stopped")
