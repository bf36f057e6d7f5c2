"""Every exchange, queue and binding of the bus, declared in this one module.

    hitless.commands (topic)  gateway.<id>                 -> hitless.gateway.<id> (each)
                              (expired commands -> hitless.reports, gateway.<id>.expired)
    hitless.reports  (topic)  gateway.<id>.<kind>          -> hitless.controller.reports
    hitless.events   (topic)  release.published | job.*   -> hitless.notifier.events
    hitless.jobs     (topic)  any key                      -> hitless.controller.jobs
    hitless.dlx      (fanout)                              -> hitless.dead

Every queue dead-letters into hitless.dlx. A message a consumer cannot take is published
there with its body untouched and the reason in the ``x-hitless-reason`` header.
This module only describes; ``hitless.bus.amqp`` declares it on the broker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

REASON_HEADER = "x-hitless-reason"
SOURCE_QUEUE_HEADER = "x-hitless-source-queue"
# On an UpgradeCommand: when its job was created (ISO 8601, UTC), and whether the job
# allows a downgrade (a boolean). Headers, not fields, so that gateways of earlier releases,
# which decode commands strictly, still take the command.
ISSUED_AT_HEADER = "x-hitless-issued-at"
ALLOW_DOWNGRADE_HEADER = "x-hitless-allow-downgrade"
# On an UpgradeCommand: the command as signed (its deterministic protobuf bytes, base64,
# with issued_at and allow_downgrade set), the command key's id and the Ed25519 signature
# (hex), see ``hitless.trust.commands``. A gateway runs the signed copy, never the body.
SIGNED_COMMAND_HEADER = "x-hitless-signed-command"
COMMAND_KEYID_HEADER = "x-hitless-command-keyid"
COMMAND_SIGNATURE_HEADER = "x-hitless-command-signature"


@dataclass(frozen=True)
class Exchange:
    name: str
    kind: str  # topic | fanout | direct


@dataclass(frozen=True)
class Binding:
    exchange: Exchange
    routing_key: str


@dataclass(frozen=True)
class Queue:
    name: str
    bindings: tuple[Binding, ...] = ()
    arguments: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


COMMANDS = Exchange("hitless.commands", "topic")
REPORTS = Exchange("hitless.reports", "topic")
EVENTS = Exchange("hitless.events", "topic")
JOBS = Exchange("hitless.jobs", "topic")
DLX = Exchange("hitless.dlx", "fanout")

EXCHANGES = (COMMANDS, REPORTS, EVENTS, JOBS, DLX)

_DEAD_LETTERED = {"x-dead-letter-exchange": DLX.name}

DEAD_LETTERS = Queue("hitless.dead", (Binding(DLX, ""),))
CONTROLLER_REPORTS = Queue("hitless.controller.reports", (Binding(REPORTS, "#"),), _DEAD_LETTERED)
CONTROLLER_JOBS = Queue("hitless.controller.jobs", (Binding(JOBS, "#"),), _DEAD_LETTERED)
NOTIFIER_EVENTS = Queue("hitless.notifier.events", (Binding(EVENTS, "#"),), _DEAD_LETTERED)

# Report kinds, the last part of a report's routing key.
STATUS = "status"
HELLO = "hello"
HEARTBEAT = "heartbeat"
EXPIRED = "expired"  # a command whose TTL ran out in its gateway's queue
REFUSED = "refused"  # a command the gateway refused to run (bus_pb2.CommandRefused)

# Event routing keys.
RELEASE_PUBLISHED = "release.published"
JOB_FINISHED = "job.finished"
JOB_REJECTED = "job.rejected"
COMMAND_REFUSED = "security.command_refused"


def command_key(gateway_id: str) -> str:
    return f"gateway.{gateway_id}"


def report_key(gateway_id: str, kind: str) -> str:
    return f"gateway.{gateway_id}.{kind}"


def reporting_gateway(routing_key: str) -> str:
    """The gateway a report's routing key names ("" when it names none)."""
    prefix, _, rest = routing_key.partition(".")
    gateway_id, _, _kind = rest.rpartition(".")
    return gateway_id if prefix == "gateway" else ""


def gateway_queue(gateway_id: str) -> Queue:
    """The durable command queue of one gateway; it exists before the gateway first runs
    once the controller knows of it, so commands wait there while the gateway is away.

    A command carries a TTL up to its job's deadline; one that expires in the queue is
    dead-lettered by the broker back to the controller as an ``expired`` report, and the
    gateway is marked UNREACHABLE. (Messages a gateway refuses go to hitless.dlx.)
    """
    return Queue(
        f"hitless.gateway.{gateway_id}",
        (Binding(COMMANDS, command_key(gateway_id)),),
        {
            "x-dead-letter-exchange": REPORTS.name,
            "x-dead-letter-routing-key": report_key(gateway_id, EXPIRED),
        },
    )


BASE_QUEUES = (DEAD_LETTERS,)
