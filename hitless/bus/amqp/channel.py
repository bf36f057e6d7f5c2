"""What the publisher and the consumer share: connecting and declaring, the messages a
handler sees, and how a refusal by the broker is told from a lost connection.

What the broker refuses for one message (a 406 PRECONDITION_FAILED closing the channel, a
name longer than AMQP's 255-byte short string, properties that do not fit a frame) is that
message's own error (``refusal``); only ``CONNECT_ERRORS`` mean the connection is gone.
"""

from __future__ import annotations

import contextlib
import ssl
import struct
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from hitless import logs
from hitless.backoff import Backoff
from hitless.bus import topology
from hitless.bus.topology import Queue
from hitless.config import BusConfig
from hitless.errors import ConfigError, PublishFailed

log = logs.get(__name__)

CONNECT_ERRORS = (pika.exceptions.AMQPError, OSError)
# Raised by pika before anything is sent, or by the broker for this one request: the
# request fails, the connection carries on.
REFUSED_BY_CLIENT = (
    pika.exceptions.ShortStringTooLong,
    pika.exceptions.DuplicateGetOkCallback,
    ValueError,
    TypeError,
    OverflowError,
    struct.error,
)
# How long a consumer's I/O thread waits for the broker before it looks whether it must
# stop (a stop wakes it at once, a delivery or a settled batch too), unless the consumer
# is given another (``Consumer(pump_s=...)``).
PUMP_S = 0.2
# How long a publisher's idle lane waits for a request before it services its connection
# (heartbeats; a close from the broker is seen then, or when the next request runs on
# it); a request or ``Publisher.close`` wakes it at once. Each of
# these wake-ups costs an idle gateway CPU: measured here, an idle publisher took about
# 1.7 ms of CPU a second at 0.2 s and 0.36 ms at 1 s, which a hundred gateways
# upgrading on one machine's two cores (``bench/fleet.py``) pay a hundredfold. A
# gateway's command consumer, idle but for a command every few weeks, pumps this often
# too. (The controller's consumers keep ``PUMP_S``: pumping every 1 s looked slower on
# its report path, ``bench/controller_reporters.py``: 4,259-5,040 reports/s against
# 5,040-5,630 in three alternating runs each, then slower in three of four pairs with
# overlapping ranges; why is not known.)
IDLE_PUMP_S = 1.0
# Message properties (headers included) must fit one frame with room to spare; RabbitMQ's
# default frame_max is 131072 bytes.
MAX_PROPERTIES_BYTES = 64 * 1024
# Reasons are cut to this many characters before they become a header.
MAX_REASON_CHARS = 1000
# RabbitMQ's upper bound for a per-message TTL (the expiration property), in ms.
MAX_EXPIRATION_MS = 2**32 - 1
# Beside the reason: who published a dead-lettered message (its broker-validated user_id,
# which cannot travel as user_id once another user republishes it).
ORIGINAL_USER_HEADER = "x-hitless-original-user-id"


def dead_letter_headers(headers: Mapping[str, Any], reason: str, source: str) -> dict[str, Any]:
    """``headers`` plus the dead-letter reason (cut to MAX_REASON_CHARS) and source queue."""
    return {
        **headers,
        topology.REASON_HEADER: cut(reason, MAX_REASON_CHARS),
        topology.SOURCE_QUEUE_HEADER: source,
    }


@dataclass(frozen=True)
class Delivery:
    """One received message, as a handler sees it."""

    body: bytes
    routing_key: str
    exchange: str
    message_id: str | None
    headers: Mapping[str, Any]
    redelivered: bool
    user_id: str | None = None


def connect(
    bus: BusConfig,
    queues: Iterable[Queue],
    on_refused: Callable[[Queue, BaseException], None] | None = None,
    *,
    passive: bool = False,
) -> tuple[pika.BlockingConnection, BlockingChannel]:
    """Connect, declare the topology and ``queues``, and return a channel.

    With ``on_refused``, a queue the broker refuses (e.g. one redeclared by hand with other
    arguments: 406 PRECONDITION_FAILED) is handed to it and skipped, so that one queue never
    keeps the connection from coming up; without, the refusal propagates.

    With ``passive``, every exchange and queue is only checked to exist (see ``declare``):
    for a broker user without configure permission, such as a gateway's.
    """
    params = parameters(bus)
    if "heartbeat=" not in bus.url:
        params.heartbeat = 30
    params.blocked_connection_timeout = 30
    params.connection_attempts = 1
    params.socket_timeout = 5
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        declare_topology(channel, passive=passive)
        for q in queues:
            try:
                declare(channel, [q], passive=passive)
            except (pika.exceptions.ChannelClosedByBroker, *REFUSED_BY_CLIENT) as exc:
                if on_refused is None:
                    raise
                on_refused(q, exc)
            if not channel.is_open:  # refused, or closed to refuse a queue type (declare)
                channel = connection.channel()
    except BaseException:
        connection.close()
        raise
    return connection, channel


def parameters(bus: BusConfig) -> pika.URLParameters:
    """pika's connection parameters for ``bus``. For ``amqps://``, TLS that checks the
    broker's certificate against ``bus.ca_cert`` (else the system's CAs) and its name
    against the URL's host (``ssl.create_default_context``: CERT_REQUIRED, hostname
    checked); pika's own amqps default names no server, so it could not check the name.
    Raises ConfigError when the CA file cannot be read."""
    params = pika.URLParameters(bus.url)
    if urlsplit(bus.url).scheme == "amqps":
        try:
            context = ssl.create_default_context(cafile=str(bus.ca_cert) if bus.ca_cert else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot use the broker's CA certificate {bus.ca_cert}: {exc}"
            ) from exc
        params.ssl_options = pika.SSLOptions(context, server_hostname=params.host)
    return params


def declare_topology(channel: BlockingChannel, *, passive: bool = False) -> None:
    """Declare every exchange and the base queues: what every service needs (with
    ``passive``, check that they exist, as ``declare``)."""
    for exchange in topology.EXCHANGES:
        channel.exchange_declare(
            exchange=exchange.name, exchange_type=exchange.kind, durable=True, passive=passive
        )
    declare(channel, topology.BASE_QUEUES, passive=passive)


def declare(channel: BlockingChannel, queues: Iterable[Queue], *, passive: bool = False) -> None:
    """Declare ``queues`` with their bindings (their exchanges must exist already).

    With ``passive``, only check that each queue exists and bind nothing: RabbitMQ asks no
    permission for a passive declare (access control guide, "How Permissions Work":
    ``exchange.declare`` and ``queue.declare`` with ``passive=true``), while an active one
    needs configure on the queue and, for its dead-letter exchange, write on that exchange
    and read on the queue, and a binding needs write on the queue and read on the exchange.
    A missing exchange or queue is a 404 NOT_FOUND that closes the channel
    (``pika.exceptions.ChannelClosedByBroker``): whoever owns the topology has not
    declared it yet.

    A quorum queue that exists as a classic queue (from a release before quorum queues) is
    kept as it is: RabbitMQ refuses to change a queue's type (406 PRECONDITION_FAILED,
    inequivalent arg, which closes ``channel``), so it is declared again as
    ``topology.classic(q)`` on a channel of this call's own, with one ``queue_kept_classic``
    log line; ``controller-svc broker migrate-queues`` moves it. ``channel`` is then left
    closed: callers open another, as after any refusal. When the classic form is refused
    too, the first refusal propagates, as does any other.
    """
    work = channel
    try:
        for q in queues:
            if passive:
                work.queue_declare(queue=q.name, passive=True)
                continue
            try:
                work.queue_declare(queue=q.name, durable=True, arguments=dict(q.arguments) or None)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if not (q.quorum and _inequivalent(exc)):
                    raise
                work = channel.connection.channel()
                kept = topology.classic(q)
                try:
                    work.queue_declare(queue=q.name, durable=True, arguments=dict(kept.arguments))
                except pika.exceptions.ChannelClosedByBroker:
                    raise exc from None  # not a classic queue of ours either: the first refusal
                log.info(
                    "queue_kept_classic",
                    queue=cut(q.name, 80),
                    hint="it existed as a classic queue; controller-svc broker migrate-queues "
                    "moves it to a quorum queue once it is empty and unused",
                )
            for binding in q.bindings:
                work.queue_bind(
                    queue=q.name, exchange=binding.exchange.name, routing_key=binding.routing_key
                )
    finally:
        if work is not channel and work.is_open:
            with contextlib.suppress(*CONNECT_ERRORS):
                work.close()


def _inequivalent(exc: pika.exceptions.ChannelClosedByBroker) -> bool:
    """Whether the broker refused a declaration because the queue exists with other
    arguments ("inequivalent arg ..."). Which argument it names depends on the broker's order
    of checks (3.10 names x-overflow before x-queue-type), so the type is told by declaring
    the classic form next."""
    return exc.reply_code == 406 and "inequivalent arg" in str(exc.reply_text)


def back_off(
    role: str,
    bus: BusConfig,
    backoff: Backoff,
    attempt: int,
    error: BaseException,
    stop: threading.Event,
) -> None:
    """Say the broker is unreachable and wait before the next attempt (or until stop)."""
    delay = backoff.delay(attempt)
    log.warning(
        "bus_unreachable",
        role=role,
        broker=bus.safe_url,
        error=str(error) or type(error).__name__,
        retry_in_s=round(delay, 2),
    )
    stop.wait(delay)


def close_quietly(connection: pika.BlockingConnection | None) -> None:
    if connection is None or connection.is_closed:
        return
    with contextlib.suppress(*CONNECT_ERRORS):
        connection.close()


def refusal(what: str, exc: BaseException) -> PublishFailed:
    """The PublishFailed for a request the broker (or pika, before sending) refused."""
    if isinstance(exc, pika.exceptions.UnroutableError):
        text = (
            "the broker could not route the message to any queue (mandatory publish): "
            "declare the destination queue first"
        )
    elif isinstance(exc, pika.exceptions.NackError):
        text = "the broker refused the message (negative confirm)"
    elif isinstance(exc, pika.exceptions.ChannelClosedByBroker):
        text = f"the broker refused it: {exc.reply_code} {exc.reply_text}"
    else:
        text = f"it cannot be sent over AMQP: {type(exc).__name__}: {cut(str(exc), 200)}"
    error = PublishFailed(f"cannot {what}: {text}")
    error.__cause__ = exc
    return error


def cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def properties_size(properties: pika.BasicProperties) -> int:
    return sum(len(part) for part in properties.encode())


def check_properties(properties: pika.BasicProperties, what: str) -> None:
    """Refuse, before the broker does by closing the connection, properties too big for a
    frame (frame_max, AMQP 0-9-1 section 4.2.3)."""
    try:
        size = properties_size(properties)
    except REFUSED_BY_CLIENT as exc:
        raise refusal(what, exc) from exc
    if size > MAX_PROPERTIES_BYTES:
        raise PublishFailed(
            f"cannot {what}: its properties and headers take {size} bytes, more than the "
            f"{MAX_PROPERTIES_BYTES} a message may carry here"
        )
