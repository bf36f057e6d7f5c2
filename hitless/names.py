"""What may become a name on the bus or a key in the database, checked where it enters.

A gateway id becomes a queue name (``hitless.gateway.<id>``), a routing key
(``gateway.<id>.<kind>``) and a database key; a request id and a message id become keys
and message properties; a deadline becomes a message TTL. AMQP 0-9-1 carries queue names,
routing keys, message ids and user ids as *short strings*: at most 255 bytes (the spec's
``shortstr``), and RabbitMQ refuses a per-message TTL outside 0 to 2^32-1 milliseconds. A
value that breaks those rules must be refused where it arrives (API, bus, CLI), with the
rule in the message, never discovered by the broker when the controller publishes.

Limits (characters and bytes are the same here: every allowed character is ASCII):

| what          | rule                                                    |
|---------------|---------------------------------------------------------|
| gateway id    | 1-64 of ``A-Z a-z 0-9 - _``                             |
| request id    | 1-128 printable ASCII characters, no spaces             |
| message id    | 1-100 printable ASCII characters, no spaces (management) |
| deadline      | 1 second to 30 days                                     |
"""

from __future__ import annotations

import re
from datetime import timedelta

from hitless.errors import InvalidName

GATEWAY_ID_MAX = 64
REQUEST_ID_MAX = 128
# A management job's message_id becomes the request id "management:<message_id>".
MESSAGE_ID_MAX = 100
MAX_DEADLINE = timedelta(days=30)

_GATEWAY_ID = re.compile(rf"[A-Za-z0-9_-]{{1,{GATEWAY_ID_MAX}}}")
_TOKEN = re.compile(r"[!-~]+")  # printable ASCII without space


def shown(text: str, limit: int = 40) -> str:
    """``text`` quoted for an error message, cut to ``limit`` characters."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def gateway_id(text: str) -> str:
    """Return ``text`` if it is a valid gateway id, else raise InvalidName.

    A gateway id is 1-64 ASCII letters, digits, ``-`` or ``_`` (e.g. ``gw-1``): it has to
    fit a queue name and a routing key (AMQP shortstr, 255 bytes) and the database's key
    column (64 characters), and it must not carry ``.``, ``*`` or ``#``, which mean
    something in a topic routing key.
    """
    if not _GATEWAY_ID.fullmatch(text):
        raise InvalidName(
            f"invalid gateway id {shown(text)}: use 1-{GATEWAY_ID_MAX} ASCII letters, digits, "
            "'-' or '_' (e.g. gw-1)"
        )
    return text


def request_id(text: str) -> str:
    """Return ``text`` if it can be a request id (idempotency key), else raise InvalidName.

    1-128 printable ASCII characters without spaces (the database column holds 128).
    """
    return _token(text, REQUEST_ID_MAX, "request id")


def message_id(text: str) -> str:
    """Return ``text`` if it can be a management job's message_id, else raise InvalidName.

    1-100 printable ASCII characters without spaces: the controller keys the job by
    ``management:<message_id>``, which must fit a request id.
    """
    return _token(text, MESSAGE_ID_MAX, "message_id")


def _token(text: str, most: int, what: str) -> str:
    if len(text) > most or not _TOKEN.fullmatch(text):
        raise InvalidName(
            f"invalid {what} {shown(text)}: use 1-{most} printable ASCII characters without "
            "spaces (e.g. a UUID)"
        )
    return text


def deadline(value: timedelta) -> timedelta:
    """Return ``value`` if it is a usable command deadline, else raise InvalidName.

    From one second to 30 days: a command carries its deadline as a message TTL in
    milliseconds, which RabbitMQ takes only up to 2^32-1 ms (about 49.7 days).
    """
    if not timedelta(seconds=1) <= value <= MAX_DEADLINE:
        raise InvalidName(
            f"invalid deadline of {value.total_seconds():.0f}s: give from 1 second to "
            f"{int(MAX_DEADLINE.total_seconds())} seconds (30 days)"
        )
    return value
