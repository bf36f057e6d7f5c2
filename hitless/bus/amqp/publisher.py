"""``Publisher``: callers on any thread hand it messages; its own threads publish each
with publisher confirms and ``mandatory=True`` and wake the caller with the outcome.

A request the broker refuses fails alone, on a fresh channel; a lost connection is retried
(with bounded, jittered backoff) unless the request itself keeps taking the connection down.

pika's BlockingChannel in confirm mode waits for each ``basic_publish``'s confirm before it
returns (pika 1.x ``BlockingChannel.basic_publish``; the asynchronous ack callback exists
only on the core channel of SelectConnection), so one connection carries one message per
broker round trip, fsync included. To keep several confirms in flight, a publisher runs
``lanes`` connections, one thread each, taking requests from one queue: a caller that
hands over many messages at once (``publish_nowait``, ``declare``) has up to ``lanes`` of
them on the wire together, and the broker confirms them together. Messages a caller
publishes one after another (``publish``) keep their order.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
from google.protobuf.message import Message
from pika.adapters.blocking_connection import BlockingChannel

from hitless import logs
from hitless.backoff import Backoff
from hitless.bus import codec, topology
from hitless.bus.amqp.channel import (
    CONNECT_ERRORS,
    IDLE_PUMP_S,
    MAX_EXPIRATION_MS,
    REFUSED_BY_CLIENT,
    back_off,
    check_properties,
    close_quietly,
    connect,
    cut,
    dead_letter_headers,
    declare,
    refusal,
)
from hitless.bus.topology import Exchange, Queue
from hitless.config import BusConfig
from hitless.errors import BusUnavailable, PublishFailed

log = logs.get(__name__)

# The most connections one publisher keeps side by side.
MAX_LANES = 16
# A request that took the connection down this many times (e.g. properties larger than a
# frame, which the broker answers by closing the connection) is failed, not retried.
_MAX_CONNECTION_LOSSES = 3


@dataclass
class _Request:
    action: Callable[[BlockingChannel], None]
    what: str
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    # Set by a caller that stopped waiting: the request is dropped, never sent late.
    abandoned: bool = False
    connection_losses: int = 0

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()


class Confirm:
    """The outcome of one message handed to ``Publisher.publish_nowait``."""

    def __init__(self, request: _Request, broker: str) -> None:
        self._request = request
        self._broker = broker

    def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the broker's confirm. Raises PublishFailed
        when the broker refused, nacked or could not route the message, and BusUnavailable
        when no confirm came in time (the message is then dropped, never sent late)."""
        request = self._request
        if not request.done.wait(timeout):
            request.abandoned = True
            raise BusUnavailable(
                f"cannot {request.what}: no answer from the broker at {self._broker} within "
                f"{timeout:.0f}s; check that RabbitMQ is running"
            )
        if request.error is not None:
            raise request.error


class Publisher:
    """Publishes persistent messages with confirms and mandatory routing, from any thread.

    With ``passive``, the topology and ``queues`` (and those of ``declare``) are only
    checked to exist, never declared or bound (``channel.declare``): for a broker user with
    no configure permission. A kept queue that does not exist is forgotten as one the
    broker refuses; a missing exchange fails the connection, which is retried.

    ``lanes`` (1 to MAX_LANES) connections publish side by side (see the module's
    docstring); the first one declares the kept queues again on every reconnect.
    """

    def __init__(
        self,
        bus: BusConfig,
        *,
        queues: Iterable[Queue] = (),
        name: str = "publisher",
        backoff: Backoff = Backoff(),
        passive: bool | None = None,
        lanes: int = 1,
    ) -> None:
        if not 1 <= lanes <= MAX_LANES:
            raise ValueError(f"invalid lanes {lanes} for the {name}: must be 1 to {MAX_LANES}")
        self._bus = bus
        self._passive = bus.passive if passive is None else passive
        self._queues = tuple(queues)
        # The names in _queues, for a quick "declared already?" (guarded by _queues_lock).
        self._declared = {q.name for q in self._queues}
        self._queues_lock = threading.Lock()
        self._name = name
        self._backoff = backoff
        # None: a wake-up from ``close``, so that a lane waiting for work sees the stop.
        self._requests: queue.Queue[_Request | None] = queue.Queue()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._lanes_up = 0  # lanes holding a connection (guarded by _queues_lock)
        self._threads = [
            threading.Thread(target=self._run, args=(lane,), name=f"bus-{name}-{lane}", daemon=True)
            for lane in range(lanes)
        ]

    @property
    def lanes(self) -> int:
        """How many messages this publisher can have awaiting a confirm at once."""
        return len(self._threads)

    def start(self) -> Publisher:
        for thread in self._threads:
            thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for _ in self._threads:
            self._requests.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread.ident is not None:  # started
                thread.join(max(0.0, deadline - time.monotonic()))

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        """True while the publisher holds a connection to the broker (any lane)."""
        return self._connected.is_set()

    def _lane_up(self, up: bool) -> None:
        with self._queues_lock:
            self._lanes_up += 1 if up else -1
            if self._lanes_up > 0:
                self._connected.set()
            else:
                self._connected.clear()

    def publish(
        self,
        exchange: Exchange,
        routing_key: str,
        message: Message | bytes,
        *,
        message_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
        expiration_ms: int | None = None,
        user_id: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        """Publish and wait for the broker's confirm.

        ``user_id`` (default: this connection's broker user, ``BusConfig.user``) lets the
        consumer know who published: RabbitMQ refuses a message whose user_id is not the
        publishing user's (https://www.rabbitmq.com/docs/validated-user-id). Raises
        PublishFailed when the broker refuses, nacks or cannot route the message, and
        BusUnavailable when no confirm came within ``timeout`` (the broker is away).
        """
        self.publish_nowait(
            exchange, routing_key, message, message_id=message_id, headers=headers,
            expiration_ms=expiration_ms, user_id=user_id,
        ).wait(timeout)  # fmt: skip

    def publish_nowait(
        self,
        exchange: Exchange,
        routing_key: str,
        message: Message | bytes,
        *,
        message_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
        expiration_ms: int | None = None,
        user_id: str | None = None,
    ) -> Confirm:
        """Hand a message over as ``publish`` does, without waiting: the Confirm's ``wait``
        gives the outcome. Messages handed over together are on the wire together (up to
        ``lanes`` at once), in no set order. Raises PublishFailed at once for what can
        never be sent (a TTL or properties RabbitMQ cannot take), BusUnavailable when the
        publisher is not running."""
        what = f"publish to {exchange.name} with key {cut(routing_key, 80)!r}"
        body = message if isinstance(message, bytes) else codec.encode(message)
        if expiration_ms is not None and not 0 <= expiration_ms <= MAX_EXPIRATION_MS:
            raise PublishFailed(
                f"cannot {what}: a TTL of {expiration_ms} ms is outside what RabbitMQ takes "
                f"(0 to {MAX_EXPIRATION_MS})"
            )
        properties = pika.BasicProperties(
            content_type=codec.CONTENT_TYPE,
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=message_id,
            headers=dict(headers) if headers else None,
            expiration=str(expiration_ms) if expiration_ms is not None else None,
            timestamp=int(time.time()),
            user_id=user_id or self._bus.user,
        )
        check_properties(properties, what)

        def action(channel: BlockingChannel) -> None:
            channel.basic_publish(
                exchange=exchange.name,
                routing_key=routing_key,
                body=body,
                properties=properties,
                mandatory=True,
            )

        return self._enqueue(action, what)

    def dead_letter(
        self,
        body: bytes,
        reason: str,
        *,
        source: str,
        message_id: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        """Publish ``body`` untouched to the dead-letter exchange with ``reason`` (cut to
        MAX_REASON_CHARS) and ``source`` (e.g. the queue it was meant for, or "") in headers:
        for a message this service made but could not deliver. Raises as ``publish``."""
        self.publish(
            topology.DLX,
            "",
            body,
            message_id=message_id,
            headers=dead_letter_headers({}, reason, source),
            timeout=timeout,
        )

    def declare(
        self, queues: Iterable[Queue], timeout: float = 30.0, *, again: bool = False
    ) -> None:
        """Declare more queues; once declared they are kept and declared again after every
        reconnect, and a later ``declare`` of a kept queue sends nothing (``again``: send
        it all the same, e.g. after a publish found it gone). Many queues are declared over
        all lanes at once, in up to ``lanes`` requests. Raises PublishFailed when the broker
        refuses one (none of the queues sent in the same request is kept then: declaring
        them one by one finds which), BusUnavailable when a request got no answer within
        ``timeout``."""
        with self._queues_lock:
            new = tuple(q for q in dict.fromkeys(queues) if again or q.name not in self._declared)
        if not new:
            return
        size = -(-len(new) // self.lanes)
        chunks = [new[i : i + size] for i in range(0, len(new), size)]
        confirms = [
            (chunk, self._enqueue(self._declaring(chunk), f"declare {len(chunk)} queue(s)"))
            for chunk in chunks
        ]
        deadline = time.monotonic() + timeout
        failure: BaseException | None = None
        for chunk, confirm in confirms:
            try:
                confirm.wait(max(0.0, deadline - time.monotonic()))
            except (BusUnavailable, PublishFailed) as exc:
                failure = failure or exc
                continue
            self._keep(chunk)
        if failure is not None:
            raise failure

    def _declaring(self, queues: tuple[Queue, ...]) -> Callable[[BlockingChannel], None]:
        return lambda channel: declare(channel, queues, passive=self._passive)

    def _keep(self, queues: Iterable[Queue]) -> None:
        with self._queues_lock:
            fresh = [q for q in queues if q.name not in self._declared]
            self._queues = (*self._queues, *fresh)
            self._declared.update(q.name for q in fresh)

    def _forget(self, refused: Queue, error: BaseException) -> None:
        """A kept queue the broker refuses on reconnect is declared no more."""
        log.error("queue_refused", role=self._name, queue=cut(refused.name, 80),
                  error=cut(str(error), 300) or type(error).__name__)  # fmt: skip
        with self._queues_lock:
            self._queues = tuple(q for q in self._queues if q != refused)
            self._declared = {q.name for q in self._queues}

    def _enqueue(self, action: Callable[[BlockingChannel], None], what: str) -> Confirm:
        if not any(thread.is_alive() for thread in self._threads):
            raise BusUnavailable(f"cannot {what}: the {self._name} is not running")
        request = _Request(action, what)
        self._requests.put(request)
        return Confirm(request, self._bus.safe_url)

    def _run(self, lane: int) -> None:
        attempt = 0
        pending: _Request | None = None
        while not self._stop.is_set():
            connection = None
            executing = False
            up = False
            try:
                with self._queues_lock:
                    kept = self._queues if lane == 0 else ()
                connection, channel = connect(self._bus, kept, self._forget, passive=self._passive)
                channel.confirm_delivery()
                attempt = 0
                self._lane_up(up := True)
                log.info("bus_connected", role=self._name, lane=lane, broker=self._bus.safe_url)
                while not self._stop.is_set():
                    if pending is None:
                        try:
                            pending = self._requests.get(timeout=IDLE_PUMP_S)
                        except queue.Empty:
                            connection.process_data_events(time_limit=0)
                            continue
                        if pending is None:  # woken by close()
                            continue
                    if not pending.abandoned:
                        executing = True
                        self._execute(pending, channel)
                        executing = False
                    pending = None
                    if not channel.is_open:  # the broker closed it to refuse a request
                        channel = connection.channel()
                        channel.confirm_delivery()
            except CONNECT_ERRORS as exc:
                if up:
                    self._lane_up(up := False)
                if pending is not None and executing:
                    pending = self._lost_while_executing(pending, exc)
                back_off(self._name, self._bus, self._backoff, attempt, exc, self._stop)
                attempt += 1
            except Exception as exc:  # a bug must not silently end publishing for good
                if up:
                    self._lane_up(up := False)
                log.exception("publisher_failed", role=self._name)
                if pending is not None:
                    pending.fail(BusUnavailable(f"the {self._name} failed: {exc}"))
                    pending = None
                back_off(self._name, self._bus, self._backoff, attempt, exc, self._stop)
                attempt += 1
            finally:
                if up:
                    self._lane_up(False)
                close_quietly(connection)
        if pending is not None:
            pending.fail(BusUnavailable(f"the {self._name} was closed"))
        self._fail_waiting()

    def _lost_while_executing(self, request: _Request, error: BaseException) -> _Request | None:
        """The connection went down while ``request`` ran: retried on the next connection,
        unless it has taken the connection down _MAX_CONNECTION_LOSSES times (the broker
        closes the connection, not the channel, for some messages, e.g. a frame too large)."""
        request.connection_losses += 1
        if request.connection_losses < _MAX_CONNECTION_LOSSES:
            return request
        log.error("publish_dropped", role=self._name, what=request.what,
                  error=str(error) or type(error).__name__)  # fmt: skip
        request.fail(refusal(request.what, error))
        return None

    def _execute(self, request: _Request, channel: BlockingChannel) -> None:
        """Run one request. What the broker or pika refuses for this request fails it alone
        (the caller replaces a channel the broker closed); a lost connection propagates, so
        the request is retried on the next one."""
        try:
            request.action(channel)
        except (
            pika.exceptions.UnroutableError,
            pika.exceptions.NackError,
            pika.exceptions.ChannelClosedByBroker,
            *REFUSED_BY_CLIENT,
        ) as exc:
            log.warning("publish_refused", role=self._name, what=request.what,
                        error=cut(str(exc), 300) or type(exc).__name__)  # fmt: skip
            request.fail(refusal(request.what, exc))
            return
        request.done.set()

    def _fail_waiting(self) -> None:
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return
            if request is None:
                continue
            request.error = BusUnavailable(f"the {self._name} was closed")
            request.done.set()
