"""What a message handler may raise to tell the consumer how a message ends, other than
by returning (ack): its own module, free of pika, so that code which only raises them (a
gateway's errors, read by its forwarding process too) does not load the broker client."""

from __future__ import annotations

from hitless.errors import HitlessError


class DeadLetter(HitlessError):
    """Raised by a handler for a message that can never be processed: the consumer moves it
    to the dead-letter queue, body untouched, with ``reason`` in a header."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Requeue(HitlessError):
    """Raised by a handler that is not the one to take this message (e.g. a process that
    is handing over): the message goes back to its queue for another consumer, and this
    does not count as a failure toward dead-lettering."""
