"""Who may speak for a gateway on the bus: a report, hello, heartbeat or refusal counts only
when the broker-validated ``user_id`` of its message is that gateway's own broker user.

RabbitMQ refuses a message whose ``user_id`` property is not the publishing connection's
user (https://www.rabbitmq.com/docs/validated-user-id), and each gateway has a user of its
own (``controller_svc.broker_access``), so ``user_id`` says which gateway sent a message
whatever its routing key or body claim. Both must name that same gateway. An ``expired``
report is the controller's own command, dead-lettered by the broker when its TTL ran out:
it keeps the controller's ``user_id``.

Anything else is dead-lettered with the reason (``DeadLetter``) and counted; the controller
goes on serving every other gateway.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable, Sequence

from controller_svc.broker_access import gateway_id_of
from hitless import logs
from hitless.bus import topology
from hitless.bus.amqp import DeadLetter, Delivery
from hitless.bus.amqp.consumer import BatchHandler
from hitless.v1 import bus_pb2

log = logs.get(__name__)

Handler = Callable[[Delivery], None]

# The message each report kind carries; each names its gateway in ``gateway_id``.
_BODIES: dict[str, type[bus_pb2.StatusReport | bus_pb2.GatewayHello | bus_pb2.GatewayHeartbeat
                       | bus_pb2.CommandRefused | bus_pb2.UpgradeCommand]] = {
    topology.STATUS: bus_pb2.StatusReport,
    topology.HELLO: bus_pb2.GatewayHello,
    topology.HEARTBEAT: bus_pb2.GatewayHeartbeat,
    topology.REFUSED: bus_pb2.CommandRefused,
    topology.EXPIRED: bus_pb2.UpgradeCommand,
}  # fmt: skip


class ReportSenders:
    """Checks each delivery on the controller's reports queue against its sender. Thread-
    safe (the reports consumer runs several workers)."""

    def __init__(self, prefix: str, controller_user: str) -> None:
        self._prefix = prefix
        self._controller_user = controller_user
        self._lock = threading.Lock()
        self.refused: Counter[str] = Counter()  # by reason kind, for logs and tests

    def checked(self, handler: Handler) -> Handler:
        """``handler``, called only for deliveries whose sender may send them."""

        def check_then_handle(delivery: Delivery) -> None:
            self.check(delivery)
            handler(delivery)

        return check_then_handle

    def checked_batch(self, handler: BatchHandler) -> BatchHandler:
        """``handler`` (a batch handler), given only the deliveries whose sender may send
        them; each of the others has its own DeadLetter as its outcome, and is never
        handed on."""

        def check_then_handle(deliveries: Sequence[Delivery]) -> list[BaseException | None]:
            outcomes: list[BaseException | None] = [None] * len(deliveries)
            passed: list[int] = []
            for index, delivery in enumerate(deliveries):
                try:
                    self.check(delivery)
                except DeadLetter as exc:
                    outcomes[index] = exc
                else:
                    passed.append(index)
            if passed:
                handled = handler([deliveries[i] for i in passed])
                for index, outcome in zip(passed, handled, strict=True):
                    outcomes[index] = outcome
            return outcomes

        return check_then_handle

    def check(self, delivery: Delivery) -> None:
        """Raise DeadLetter saying why when ``delivery`` was not sent by the gateway it
        names (or, for ``expired``, by this controller)."""
        named = topology.reporting_gateway(delivery.routing_key)
        kind = delivery.routing_key.rsplit(".", 1)[-1]
        sender = delivery.user_id or ""
        if kind == topology.EXPIRED:
            if sender != self._controller_user:
                self._refuse(
                    "expired-sender",
                    f"an expired command must be this controller's ({self._controller_user}), "
                    f"but broker user {sender or '(none)'} published it",
                )
            return
        gateway = gateway_id_of(self._prefix, sender)
        if gateway is None:
            self._refuse(
                "not-a-gateway",
                f"report {delivery.routing_key[:120]!r} was published by broker user "
                f"{sender[:120] or '(no user_id)'}, which is no gateway's user: a gateway "
                "publishes as the broker user it got at enrollment",
            )
        if named != gateway:
            self._refuse(
                "other-gateway",
                f"gateway {gateway}'s broker user published a report as gateway "
                f"{named[:64] or '(none)'} ({delivery.routing_key[:120]!r})",
            )
        if kind not in _BODIES:
            return  # the handler refuses an unknown kind with its own reason
        claimed = _claimed_gateway(delivery.body)
        if claimed and claimed != gateway:
            self._refuse(
                "other-gateway",
                f"gateway {gateway}'s broker user sent a {kind} naming gateway "
                f"{claimed[:64]!r} in its body",
            )

    def _refuse(self, kind: str, reason: str) -> None:
        with self._lock:
            self.refused[kind] += 1
            count = self.refused[kind]
        log.warning("report_sender_refused", kind=kind, reason=reason, count=count)
        raise DeadLetter(f"refused report: {reason}")


def _claimed_gateway(body: bytes) -> str | None:
    """The ``gateway_id`` a report's JSON body names, read as ``json_format`` reads it (by
    field name or JSON name), without decoding the whole message (``codec.decode`` costs
    about thirty times as much, and the handler decodes it anyway). None when the body is
    no JSON object naming one string there: the handler refuses such a body with its own
    reason."""
    try:
        data = json.loads(body)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError both are
        return None
    if not isinstance(data, dict):
        return None
    named = [data[key] for key in ("gateway_id", "gatewayId") if key in data]
    if len(named) != 1 or not isinstance(named[0], str):
        return None  # json_format refuses two spellings of one field, and a non-string
    return named[0]
