"""The RabbitMQ adapter: the only package that imports pika.

Two pieces, each owning its BlockingConnections, one per thread of its own (pika is not
thread-safe, and BlockingConnection services heartbeats only inside pika calls):

- ``Publisher``: callers on any thread hand it messages; its threads (``lanes``, one
  connection each, since a BlockingChannel waits for each confirm) publish each with
  publisher confirms and ``mandatory=True`` and wake the caller with the outcome.
- ``Consumer``: its thread receives; handlers run on a worker thread so long work never
  starves heartbeats; the ack (or dead-lettering) goes back through
  ``add_callback_threadsafe`` once the handler has committed its effect.

Both reconnect with bounded exponential backoff and jitter and declare the topology again
after every reconnect. With ``passive=True`` they only check that it exists: a broker user
without configure permission (a gateway's, the notifier's) declares nothing, since
RabbitMQ asks no permission for a passive declare.

What the broker refuses for one message (a 406 PRECONDITION_FAILED closing the channel, a
name longer than AMQP's 255-byte short string, properties that do not fit a frame) fails
that one publish or declare with ``PublishFailed``, on a fresh channel, and never takes the
connection down for everything queued behind it: only a lost connection is retried.

    channel.py     connecting, declaring, Delivery, refusals
    (DeadLetter and Requeue, what a handler raises, are ``hitless.bus.handling``'s)
    publisher.py   Publisher
    consumer.py    Consumer
"""

from hitless.bus.amqp.channel import (
    IDLE_PUMP_S,
    MAX_EXPIRATION_MS,
    MAX_PROPERTIES_BYTES,
    MAX_REASON_CHARS,
    ORIGINAL_USER_HEADER,
    Delivery,
    dead_letter_headers,
    declare,
    declare_topology,
)
from hitless.bus.amqp.consumer import Consumer, Handler
from hitless.bus.amqp.publisher import Publisher
from hitless.bus.handling import DeadLetter, Requeue

__all__ = [
    "IDLE_PUMP_S",
    "MAX_EXPIRATION_MS",
    "MAX_PROPERTIES_BYTES",
    "MAX_REASON_CHARS",
    "ORIGINAL_USER_HEADER",
    "Consumer",
    "DeadLetter",
    "Delivery",
    "Handler",
    "Publisher",
    "Requeue",
    "dead_letter_headers",
    "declare",
    "declare_topology",
]
