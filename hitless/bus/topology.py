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

Queue types (RabbitMQ's quorum queue guide, https://www.rabbitmq.com/docs/quorum-queues):
the command, report, job and event queues are quorum queues, replicated Raft logs that
survive the loss of a node in a cluster (a single node runs them too). Each dead-letters
at-least-once (``x-dead-letter-strategy``, which RabbitMQ honours only with ``x-overflow``
``reject-publish``; no length limit is set, so nothing is ever refused for it): a
dead-lettered message leaves its queue only once the queues it is routed to have
confirmed it. hitless.dead stays a classic queue: a sink read by people.

A queue that already exists as a classic queue (made by a release before quorum queues)
cannot change type by being declared again (406 PRECONDITION_FAILED, inequivalent arg
'x-queue-type'): it is kept classic, declared with the arguments of ``classic(queue)``, until
``controller-svc broker migrate-queues`` moves it.
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

    @property
    def quorum(self) -> bool:
        """Whether this description makes a quorum queue (``x-queue-type``)."""
        return self.arguments.get(QUEUE_TYPE) == QUORUM


COMMANDS = Exchange("hitless.commands", "topic")
REPORTS = Exchange("hitless.reports", "topic")
EVENTS = Exchange("hitless.events", "topic")
JOBS = Exchange("hitless.jobs", "topic")
DLX = Exchange("hitless.dlx", "fanout")

EXCHANGES = (COMMANDS, REPORTS, EVENTS, JOBS, DLX)

QUEUE_TYPE = "x-queue-type"
QUORUM = "quorum"
# How often a message of a service queue may go back to it (a consumer's nack, a channel
# or connection closed while it was unacked, a process that died holding it) before the
# broker dead-letters it to hitless.dlx with x-first-death-reason "delivery_limit": the
# end of a message that takes its consumer down every time, which no consumer lives to
# count. On RabbitMQ 3.x every return counts, a ``Requeue`` and a management-UI "get" with
# requeue included (the quorum queue guide, "Poison Message Handling"), so it is far above
# the consumer's own rule (dead-letter a message whose handler fails twice, with the reason).
# Gateway queues have none: a gateway handing over requeues the commands it is sent, and
# their dead-letter route is the ``expired`` report.
DELIVERY_LIMIT = 100
# Arguments only a quorum queue takes (or that only mean something for one here): what
# ``classic`` leaves out.
_QUORUM_ONLY = (QUEUE_TYPE, "x-delivery-limit", "x-dead-letter-strategy", "x-overflow")
_QUORUM = {
    QUEUE_TYPE: QUORUM,
    "x-dead-letter-strategy": "at-least-once",
    "x-overflow": "reject-publish",
}
_DEAD_LETTERED = {**_QUORUM, "x-dead-letter-exchange": DLX.name, "x-delivery-limit": DELIVERY_LIMIT}

DEAD_LETTERS = Queue("hitless.dead", (Binding(DLX, ""),))
CONTROLLER_REPORTS = Queue("hitless.controller.reports", (Binding(REPORTS, "#"),), _DEAD_LETTERED)
CONTROLLER_JOBS = Queue("hitless.controller.jobs", (Binding(JOBS, "#"),), _DEAD_LETTERED)
NOTIFIER_EVENTS = Queue("hitless.notifier.events", (Binding(EVENTS, "#"),), _DEAD_LETTERED)
SERVICE_QUEUES = (CONTROLLER_REPORTS, CONTROLLER_JOBS, NOTIFIER_EVENTS)

# Report kinds, the last part of a report's routing key.
STATUS = "status"
HELLO = "hello"
HEARTBEAT = "heartbeat"
EXPIRED = "expired"  # a command whose TTL ran out in its gateway's queue
REFUSED = "refused"  # a command the gateway refused to run (bus_pb2.CommandRefused)
PRECHECK = "precheck"  # a gateway's answer to a pre-check (bus_pb2.PreCheckResult)

# On a gateway's command queue, this header says what a message is when it is not an
# UpgradeCommand: PRECHECK for a bus_pb2.PreCheckRequest.
KIND_HEADER = "x-hitless-kind"

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
    gateway is marked UNREACHABLE. (Messages a gateway refuses go to hitless.dlx.) A quorum
    queue, which since RabbitMQ 3.10 expires and dead-letters per-message TTLs as a classic
    one does; with at-least-once dead-lettering an expired command stays in it until
    hitless.controller.reports has taken the ``expired`` report.
    """
    return Queue(
        f"hitless.gateway.{gateway_id}",
        (Binding(COMMANDS, command_key(gateway_id)),),
        {
            **_QUORUM,
            "x-dead-letter-exchange": REPORTS.name,
            "x-dead-letter-routing-key": report_key(gateway_id, EXPIRED),
        },
    )


GATEWAY_QUEUE_PREFIX = "hitless.gateway."


def classic(queue: Queue) -> Queue:
    """``queue`` as releases before quorum queues declared it: a classic queue with the same
    name, bindings and dead-letter route, and none of the quorum-only arguments. What an
    existing classic queue is declared with again, so its other arguments are still checked
    (RabbitMQ refuses a declaration whose arguments differ: 406 PRECONDITION_FAILED)."""
    kept = {k: v for k, v in queue.arguments.items() if k not in _QUORUM_ONLY}
    return Queue(queue.name, queue.bindings, kept)


BASE_QUEUES = (DEAD_LETTERS,)
