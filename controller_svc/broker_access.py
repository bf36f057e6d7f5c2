"""Who may do what on the broker: one RabbitMQ user per gateway, made at enrollment, and a
user of its own for each service, each with the least it needs, set through the management
HTTP API (https://www.rabbitmq.com/docs/management#http-api).

    BrokerAccessError (controller_svc.errors.ControllerError)
    ├── ManagementUnavailable   the management API cannot be reached or failed (transient)
    └── ManagementRefused       credentials refused, not an administrator, no such vhost, a
                                user name someone else holds, topology that disagrees
                                (also a hitless.errors.ConfigError: fix, then retry)

A gateway's user (``<prefix>gateway-<id>``) may read only its own command queue, publish
only its own reports (topic permissions on ``hitless.reports``) and dead letters, and
configure nothing, so it connects with ``passive=True`` (``hitless.bus.amqp``) and the
controller declares its queue for it. The controller, the notifier and job publishers (people
in the management UI) get ``SERVICE_GRANTS``. ``readme_table`` renders both for the README,
so the documentation and what the controller sets are one table.

Permissions follow RabbitMQ's access control guide
(https://www.rabbitmq.com/docs/access-control, "How Permissions Work"): a passive declare
needs nothing; an active queue declare needs configure on the queue, and with a dead-letter
exchange also write on that exchange and read on the queue; a binding needs write on the
queue and read on the exchange; a publish needs write on the exchange, plus the topic
permission's write pattern on the routing key for a topic exchange ("Topic Authorisation");
a consume needs read on the queue. RabbitMQ refuses a message whose ``user_id`` is not the
publishing user (https://www.rabbitmq.com/docs/validated-user-id), which is why a consumer
may trust the ``user_id`` of a delivery and ``gateway_id_of`` maps it back to a gateway.
Users are global on a broker, not per vhost: each deployment sharing a broker takes a
prefix of its own.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import secrets
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple
from urllib.parse import quote, unquote, urlsplit

from controller_svc.errors import ControllerError
from hitless import logs, names
from hitless.bus import topology
from hitless.errors import ConfigError, InvalidName

log = logs.get(__name__)

DEFAULT_PREFIX = "hitless-"
GATEWAY_INFIX = "gateway-"
CONTROLLER = "controller"
NOTIFIER = "notifier"
JOB_PUBLISHER = "job-publisher"
# The routing key a management job is published with (README, "Upgrade jobs from the
# RabbitMQ management UI"); a job publisher's user may use no other.
JOB_ROUTING_KEY = "upgrade"
# The report kinds a gateway publishes (gateway_daemon/reporter.py). ``expired`` is not
# one: the broker dead-letters an expired command itself, and asks no permission for it.
GATEWAY_REPORT_KINDS = (
    topology.STATUS,
    topology.HELLO,
    topology.HEARTBEAT,
    topology.REFUSED,
    topology.PRECHECK,
)
MANAGEMENT_TIMEOUT_S = 10.0
PASSWORD_BYTES = 32

_PREFIX = re.compile(r"[A-Za-z0-9._-]{0,64}")
_SERVICE_USER = re.compile(r"[!-~]{1,128}")  # printable ASCII without space: fits user_id
# Any gateway's command queue (the rule of hitless.names.gateway_id).
_ANY_GATEWAY_QUEUE = rf"gateway\.[A-Za-z0-9_-]{{1,{names.GATEWAY_ID_MAX}}}"
_NOTHING = "^$"
_PLUGIN_HINT = (
    "check that RabbitMQ runs and its management plugin is enabled "
    "(rabbitmq-plugins enable rabbitmq_management)"
)


class BrokerAccessError(ControllerError):
    """The broker's users, permissions or topology could not be set."""


class ManagementUnavailable(BrokerAccessError):
    """The management API cannot be reached or failed on its side; retrying may succeed."""


class ManagementRefused(BrokerAccessError, ConfigError):
    """The management API refused the request for good: wrong credentials, a user without
    the administrator tag, a missing vhost, a name taken, topology that disagrees."""


class BrokerCredentials(NamedTuple):
    """A broker user name and its password (the password never appears in a repr)."""

    username: str
    password: str

    def __repr__(self) -> str:
        return f"BrokerCredentials(username={self.username!r}, password='***')"


@dataclass(frozen=True)
class TopicGrant:
    """A topic permission: patterns a routing key must match on one topic exchange, to
    publish (``write``) and to bind or consume (``read``)."""

    exchange: str
    write: str
    read: str


@dataclass(frozen=True)
class Grant:
    """What one broker user may do in its vhost: RabbitMQ's three permission patterns (on
    exchange and queue names), its topic permissions, its user tags, whether it must connect
    with ``passive=True`` (it may configure nothing), and why it needs each."""

    configure: str
    write: str
    read: str
    topics: tuple[TopicGrant, ...] = ()
    tags: tuple[str, ...] = ()
    passive: bool = False
    why: str = ""


def _names(*resources: str, any_gateway_queue: bool = False) -> str:
    """A pattern matching exactly these exchange and queue names (every one ``hitless.``
    something), and with ``any_gateway_queue`` any gateway's command queue."""
    parts = []
    for name in resources:
        if not name.startswith("hitless."):
            raise ValueError(f"not one of ours: {name!r}")
        parts.append(re.escape(name.removeprefix("hitless.")))
    if any_gateway_queue:
        parts.append(_ANY_GATEWAY_QUEUE)
    if not parts:
        return _NOTHING
    body = parts[0] if len(parts) == 1 else "(" + "|".join(parts) + ")"
    return rf"^hitless\.{body}$"


_EXCHANGE_NAMES = tuple(e.name for e in topology.EXCHANGES)
_CONTROLLER_QUEUES = (
    topology.DEAD_LETTERS.name,
    topology.CONTROLLER_REPORTS.name,
    topology.CONTROLLER_JOBS.name,
    topology.NOTIFIER_EVENTS.name,
)

SERVICE_GRANTS: Mapping[str, Grant] = {
    CONTROLLER: Grant(
        # Declares every exchange, its queues, the notifier's and each gateway's.
        configure=_names(*_EXCHANGE_NAMES, *_CONTROLLER_QUEUES, any_gateway_queue=True),
        # Publishes commands, events and dead letters; hitless.reports is the dead-letter
        # exchange of each gateway queue it declares; the queues are what it binds.
        write=_names(
            topology.COMMANDS.name,
            topology.REPORTS.name,
            topology.EVENTS.name,
            topology.DLX.name,
            *_CONTROLLER_QUEUES,
            any_gateway_queue=True,
        ),
        # Binds its queues to every exchange (read on the exchange); consumes reports and
        # jobs; a queue declared with a dead-letter exchange needs read on itself (the
        # notifier's, each gateway's), so it could read those too.
        read=_names(
            *_EXCHANGE_NAMES,
            topology.CONTROLLER_REPORTS.name,
            topology.CONTROLLER_JOBS.name,
            topology.NOTIFIER_EVENTS.name,
            any_gateway_queue=True,
        ),
        why=(
            "declares the whole topology and every gateway's queue, consumes reports and "
            "jobs, publishes commands, events and dead letters; it cannot publish jobs or "
            "read the dead letters"
        ),
    ),
    NOTIFIER: Grant(
        configure=_NOTHING,
        write=_names(topology.DLX.name),
        read=_names(topology.NOTIFIER_EVENTS.name),
        passive=True,
        why="consumes its events queue and dead-letters what it cannot take; declares nothing",
    ),
    JOB_PUBLISHER: Grant(
        configure=_NOTHING,
        write=_names(topology.JOBS.name),
        read=_NOTHING,
        topics=(TopicGrant(topology.JOBS.name, f"^{re.escape(JOB_ROUTING_KEY)}$", _NOTHING),),
        tags=("management",),
        passive=True,
        why=(
            f"publishes management jobs on {topology.JOBS.name} with the key "
            f"{JOB_ROUTING_KEY!r} (the management tag lets a person log in to the UI); "
            "reads nothing"
        ),
    ),
}


def gateway_grant(gateway_id: str) -> Grant:
    """The least a gateway needs (``gateway_daemon``): read its own command queue; publish
    its reports (``gateway.<id>.<kind>`` on hitless.reports, for the kinds in
    GATEWAY_REPORT_KINDS) and the commands it refuses (hitless.dlx, a fanout exchange, so no
    topic permission applies); configure nothing. Raises InvalidName for a bad id."""
    gid = re.escape(names.gateway_id(gateway_id))
    kinds = "|".join(re.escape(kind) for kind in GATEWAY_REPORT_KINDS)
    return Grant(
        configure=_NOTHING,
        write=_names(topology.REPORTS.name, topology.DLX.name),
        read=_names(topology.gateway_queue(gateway_id).name),
        topics=(TopicGrant(topology.REPORTS.name, rf"^gateway\.{gid}\.({kinds})$", _NOTHING),),
        passive=True,
        why=(
            "reads only its own command queue, publishes only its own reports and the "
            "commands it refuses (to hitless.dlx); declares nothing: the controller declares "
            "its queue at enrollment"
        ),
    )


def gateway_user(prefix: str, gateway_id: str) -> str:
    """The broker user name of a gateway: ``<prefix>gateway-<id>`` (e.g. ``hitless-`` and
    ``gw-1`` give ``hitless-gateway-gw-1``). Raises InvalidName for a bad gateway id,
    ConfigError for a bad prefix (0-64 of ``A-Z a-z 0-9 . _ -``)."""
    return f"{_prefix(prefix)}{GATEWAY_INFIX}{names.gateway_id(gateway_id)}"


def gateway_id_of(prefix: str, user_id: str | None) -> str | None:
    """The gateway whose broker user ``user_id`` is under ``prefix`` (the inverse of
    ``gateway_user``); None when it is not a gateway user of this prefix. Meant for a
    delivery's ``user_id``, which the broker has checked against the publishing user."""
    if not user_id:
        return None
    head = _prefix(prefix) + GATEWAY_INFIX
    if not user_id.startswith(head):
        return None
    rest = user_id.removeprefix(head)
    try:
        return names.gateway_id(rest)
    except InvalidName:
        return None


def vhost_of(amqp_url: str) -> str:
    """The vhost an AMQP URL names, as pika reads it: its path unquoted, ``/`` when none."""
    path = urlsplit(amqp_url).path
    return unquote(path[1:]) if path not in ("", "/") else "/"


def new_password() -> str:
    """A fresh random password (``secrets``, 32 bytes, URL-safe: fits an AMQP URL as is)."""
    return secrets.token_urlsafe(PASSWORD_BYTES)


def readme_table() -> str:
    """The README's table of broker users and permissions (Markdown), from the same data
    the controller sets. ``<id>`` stands for a gateway id, regex-escaped (``gw\\-1``)."""

    def cell(text: str) -> str:
        return f"`{text}`".replace("|", r"\|")

    def topics(grant: Grant) -> str:
        shown = [
            f"{cell(t.exchange)}: write {cell(t.write)}, read {cell(t.read)}" for t in grant.topics
        ]
        return "; ".join(shown) if shown else "none"

    sample = "GATEWAYID"  # stands for <id>: re.escape leaves it as it is
    rows = [("gateway", f"`<prefix>{GATEWAY_INFIX}<id>`, one per gateway", gateway_grant(sample))]
    rows += [(role, f"{cell(role)} service", grant) for role, grant in SERVICE_GRANTS.items()]
    lines = [
        "| user | configure | write | read | topic permissions | tags | declares |",
        "|------|-----------|-------|------|-------------------|------|----------|",
    ]
    for _, label, grant in rows:
        cells = [
            label,
            cell(grant.configure),
            cell(grant.write),
            cell(grant.read),
            topics(grant),
            ", ".join(cell(tag) for tag in grant.tags) or "none",
            "passively" if grant.passive else "yes",
        ]
        lines.append("| " + " | ".join(cells).replace(sample, "<id>") + " |")
    lines.append("")
    lines += [f"- {role}: {grant.why}." for role, _, grant in rows]
    return "\n".join(lines) + "\n"


class BrokerAccess:
    """Sets broker users and permissions through the RabbitMQ management HTTP API.

    ``management_url`` is like ``http://USER:PASS@127.0.0.1:15672`` (https works too; a
    path is the management plugin's path prefix). Its user must have the ``administrator``
    tag: only administrators may make users and set permissions. ``prefix`` starts every
    gateway user's name. Safe to use from several threads (each call is its own request).
    """

    def __init__(
        self,
        management_url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = MANAGEMENT_TIMEOUT_S,
    ) -> None:
        self.prefix = _prefix(prefix)
        self._api = _Api(management_url, timeout)
        self._checked = False

    def gateway_user(self, gateway_id: str) -> str:
        return gateway_user(self.prefix, gateway_id)

    def gateway_id_of(self, user_id: str | None) -> str | None:
        return gateway_id_of(self.prefix, user_id)

    def check(self) -> None:
        """Check that the management API answers and its user is an administrator. Raises
        ManagementUnavailable or ManagementRefused, saying what to do."""
        me = self._api.call("GET", "/whoami", what="reach the management API")
        if not isinstance(me, dict) or "name" not in me:
            raise ManagementRefused(
                f"{self._api.safe_url} did not answer as the RabbitMQ management API: check the "
                "management URL (http://USER:PASS@HOST:15672)"
            )
        if "administrator" not in _tags(me.get("tags")):
            user = self._api.user
            raise ManagementRefused(
                f"broker user {user!r} may not make users or set permissions: it lacks the "
                f"administrator tag (rabbitmqctl set_user_tags {user} administrator), or give "
                "the controller the management URL of an administrator"
            )
        self._checked = True

    def enroll_gateway(self, vhost: str, gateway_id: str) -> BrokerCredentials:
        """Make the gateway's broker user with a fresh password and its permissions
        (``gateway_grant``), after declaring what its passive connect checks: every
        exchange, hitless.dead, hitless.controller.reports and its own command queue, bound
        as ``hitless.bus.topology`` says.

        Enrolling again replaces the user: the old password stops working and the user's
        open connections are closed (RabbitMQ closes a deleted user's connections).
        Raises InvalidName for a bad id, ManagementRefused when the name is held by a user
        that is not this deployment's gateway user (another tag, or permissions in another
        vhost) or the broker refuses the topology, ManagementUnavailable when it cannot be
        reached.
        """
        grant = gateway_grant(gateway_id)
        username = self.gateway_user(gateway_id)
        self._ready(vhost)
        for exchange in topology.EXCHANGES:
            self._declare_exchange(vhost, exchange)
        needed = (*topology.BASE_QUEUES, topology.CONTROLLER_REPORTS)
        for queue in (*needed, topology.gateway_queue(gateway_id)):
            self._declare_queue(vhost, queue)
        existing = self._claimable(username, vhost, grant.tags, one_vhost=True)
        if existing:
            self._api.call(
                "DELETE", f"/users/{_q(username)}", what=f"replace user {username}", missing_ok=True
            )
        password = new_password()
        self._set(vhost, username, password, grant)
        log.info(
            "broker_gateway_enrolled",
            gateway_id=gateway_id,
            user=username,
            vhost=vhost,
            replaced=existing,
        )
        return BrokerCredentials(username, password)

    def refresh_gateway(self, vhost: str, gateway_id: str) -> bool:
        """Set an enrolled gateway's permissions to this release's ``gateway_grant`` (a
        report kind added since it enrolled, such as ``precheck``), its password and
        connections untouched; False when it has no broker user here. Raises InvalidName,
        ManagementRefused, ManagementUnavailable."""
        grant = gateway_grant(gateway_id)
        username = self.gateway_user(gateway_id)
        self._ready(vhost)
        if not self._claimable(username, vhost, grant.tags, one_vhost=True):
            return False
        self._grant(vhost, username, grant, clear=False)
        return True

    def revoke_gateway(self, vhost: str, gateway_id: str) -> None:
        """Delete the gateway's broker user; RabbitMQ closes its open connections itself
        (CONNECTION_FORCED, "user ... is deleted"). Revoking again, or a gateway that never
        had a user, is no error. Its command queue stays (enrolling again finds it).
        Raises InvalidName, ManagementRefused when the user is not this vhost's gateway
        user, ManagementUnavailable."""
        username = self.gateway_user(gateway_id)
        self._ready(vhost)
        if not self._claimable(username, vhost, (), one_vhost=True):
            return
        self._api.call(
            "DELETE", f"/users/{_q(username)}", what=f"delete user {username}", missing_ok=True
        )
        log.warning("broker_gateway_revoked", gateway_id=gateway_id, user=username, vhost=vhost)

    def ensure_service_user(self, vhost: str, role: str, username: str, password: str) -> None:
        """Create or update a service's broker user with ``password`` and exactly the
        permissions of ``SERVICE_GRANTS[role]`` (controller, notifier or job-publisher) in
        ``vhost``, its topic permissions there replaced. Raises ManagementRefused for an
        unknown role, a bad name, a name that is the management user's or a gateway
        user's, or a user holding other tags (an administrator is never demoted)."""
        grant = SERVICE_GRANTS.get(role)
        if grant is None:
            raise ManagementRefused(
                f"unknown broker role {role!r}: use one of {', '.join(SERVICE_GRANTS)}"
            )
        if not _SERVICE_USER.fullmatch(username):
            raise ManagementRefused(
                f"invalid broker user name {names.shown(username)}: use 1-128 printable ASCII "
                "characters without spaces"
            )
        if not password:
            raise ManagementRefused(f"no password given for broker user {username!r}")
        if username == self._api.user or self.gateway_id_of(username) is not None:
            raise ManagementRefused(
                f"broker user {username!r} is the management user or a gateway's: choose "
                f"another name for the {role}"
            )
        self._ready(vhost)
        self._claimable(username, vhost, grant.tags, one_vhost=False)
        self._set(vhost, username, password, grant)
        log.info("broker_service_user_set", role=role, user=username, vhost=vhost)

    def gateways(self, vhost: str) -> GatewayUsers:
        """This access bound to one vhost: what enrollment calls (``enroll_gateway`` and
        ``revoke_gateway`` by gateway id)."""
        return GatewayUsers(self, vhost)

    def migrate_queues(self, vhost: str) -> list[QueueMove]:
        """Move every classic queue of ``vhost`` that ``hitless.bus.topology`` describes as a
        quorum queue (the service queues and each ``hitless.gateway.<id>``) to a quorum queue,
        one at a time, in name order; what happened to each, as ``QueueMove``.

        RabbitMQ cannot change a queue's type, so a queue is deleted and declared again with
        its bindings. It is deleted only when it is empty and has no consumer: the management
        API's ``DELETE /api/queues/VHOST/NAME?if-empty=true&if-unused=true``, which the broker
        refuses atomically otherwise. A queue refused (messages waiting, a consumer, or the
        listing's unacknowledged count not yet zero) is kept classic and works on: stop its
        consumer (for a gateway queue, its gateway) and run this again. Until it is declared
        again, a few milliseconds, a mandatory publish to it is unroutable (the publisher's
        PublishFailed) and a consumer's declare fails and is retried.

        Run it once no process of a release before quorum queues declares these queues: such
        a process declares them without ``x-queue-type`` and is refused by a quorum queue.
        Raises ManagementRefused, ManagementUnavailable as the other calls.
        """
        self._ready(vhost)
        v = _q(vhost)
        listed = self._api.call(
            "GET",
            f"/queues/{v}?columns=name,type,messages,messages_unacknowledged,consumers",
            what=f"list the queues of vhost {vhost!r}",
        )
        moves: list[QueueMove] = []
        for row in sorted(listed or (), key=lambda r: str(r.get("name"))):
            queue = _described(str(row.get("name", "")))
            if queue is None or not queue.quorum:
                continue
            if row.get("type") == topology.QUORUM:
                moves.append(QueueMove(queue.name, QueueMove.QUORUM))
                continue
            unacked = int(row.get("messages_unacknowledged") or 0)
            if unacked:
                reason = f"{unacked} message(s) delivered and not yet acknowledged"
                moves.append(QueueMove(queue.name, QueueMove.KEPT, reason))
                continue
            try:
                self._api.call(
                    "DELETE",
                    f"/queues/{v}/{_q(queue.name)}?if-empty=true&if-unused=true",
                    what=f"delete the classic queue {queue.name}",
                )
            except ManagementRefused as exc:
                moves.append(QueueMove(queue.name, QueueMove.KEPT, _kept_reason(row, exc)))
                continue
            self._declare_queue(vhost, queue)
            log.warning("queue_migrated", queue=queue.name, vhost=vhost, type=topology.QUORUM)
            moves.append(QueueMove(queue.name, QueueMove.MOVED))
        return moves

    def _ready(self, vhost: str) -> None:
        if not self._checked:
            self.check()
        found = self._api.call(
            "GET", f"/vhosts/{_q(vhost)}", what=f"look up vhost {vhost!r}", missing_ok=True
        )
        if found is None:
            raise ManagementRefused(
                f"vhost {vhost!r} does not exist on the broker at {self._api.safe_url}: create "
                f"it (rabbitmqctl add_vhost {vhost}) or fix the vhost in the broker URL"
            )

    def _claimable(
        self, username: str, vhost: str, tags: Sequence[str], *, one_vhost: bool
    ) -> bool:
        """Whether ``username`` exists; raises ManagementRefused when it is not ours to
        change: it has tags beyond ``tags``, or (``one_vhost``) permissions elsewhere."""
        user = self._api.call(
            "GET", f"/users/{_q(username)}", what=f"look up user {username}", missing_ok=True
        )
        if user is None:
            return False
        extra = sorted(set(_tags(user.get("tags"))) - set(tags))
        if extra:
            raise ManagementRefused(
                f"broker user {username!r} exists with the tags {', '.join(extra)}: it is not "
                "one this controller made; rename or delete it, or give another user prefix"
            )
        if one_vhost:
            granted = self._api.call(
                "GET",
                f"/users/{_q(username)}/permissions",
                what=f"look up the permissions of {username}",
            )
            elsewhere = sorted({p["vhost"] for p in granted or ()} - {vhost})
            if elsewhere:
                raise ManagementRefused(
                    f"broker user {username!r} has permissions in vhost {elsewhere[0]!r}: it "
                    "belongs to another deployment on this broker; give each deployment its "
                    "own user prefix"
                )
        return True

    def _set(self, vhost: str, username: str, password: str, grant: Grant) -> None:
        user = _q(username)
        body = {"password": password, "tags": ",".join(grant.tags)}
        self._api.call("PUT", f"/users/{user}", body, what=f"set user {username}")
        self._grant(vhost, username, grant)

    def _grant(self, vhost: str, username: str, grant: Grant, *, clear: bool = True) -> None:
        """Set the user's permissions and topic permissions in ``vhost`` to ``grant``;
        ``clear`` first removes topic permissions on exchanges the grant does not name
        (for a user in use, leave it False: each PUT replaces one exchange's patterns in
        one step, where clearing first would refuse its publishes in between)."""
        user, v = _q(username), _q(vhost)
        patterns = {"configure": grant.configure, "write": grant.write, "read": grant.read}
        self._api.call(
            "PUT",
            f"/permissions/{v}/{user}",
            patterns,
            what=f"set the permissions of {username} in vhost {vhost!r}",
        )
        if clear:
            self._api.call(
                "DELETE",
                f"/topic-permissions/{v}/{user}",
                missing_ok=True,
                what=f"clear the topic permissions of {username}",
            )
        for topic in grant.topics:
            self._api.call(
                "PUT",
                f"/topic-permissions/{v}/{user}",
                {"exchange": topic.exchange, "write": topic.write, "read": topic.read},
                what=f"set the topic permissions of {username} on {topic.exchange}",
            )

    def _declare_exchange(self, vhost: str, exchange: topology.Exchange) -> None:
        body = {
            "type": exchange.kind,
            "durable": True,
            "auto_delete": False,
            "internal": False,
            "arguments": {},
        }
        self._api.call(
            "PUT",
            f"/exchanges/{_q(vhost)}/{_q(exchange.name)}",
            body,
            what=f"declare exchange {exchange.name}",
        )

    def _declare_queue(self, vhost: str, queue: topology.Queue) -> None:
        """Declare ``queue`` and its bindings; one that exists as a classic queue is kept
        classic, as ``hitless.bus.amqp.declare`` keeps it (RabbitMQ refuses to change a
        queue's type: 400, inequivalent arg)."""
        body = {"durable": True, "auto_delete": False, "arguments": dict(queue.arguments)}
        v, q = _q(vhost), _q(queue.name)
        what = f"declare queue {queue.name}"
        try:
            self._api.call("PUT", f"/queues/{v}/{q}", body, what=what)
        except ManagementRefused as exc:
            if not (queue.quorum and "inequivalent arg" in str(exc)):
                raise
            body["arguments"] = dict(topology.classic(queue).arguments)
            try:
                self._api.call("PUT", f"/queues/{v}/{q}", body, what=what)
            except ManagementRefused:
                raise exc from None  # not a classic queue of ours either: the first refusal
            log.info("queue_kept_classic", queue=queue.name, vhost=vhost)
        for binding in queue.bindings:
            self._api.call(
                "POST",
                f"/bindings/{v}/e/{_q(binding.exchange.name)}/q/{q}",
                {"routing_key": binding.routing_key, "arguments": {}},
                what=f"bind queue {queue.name} to {binding.exchange.name}",
            )


@dataclass(frozen=True)
class QueueMove:
    """What ``BrokerAccess.migrate_queues`` did with one queue: ``outcome`` is MOVED (now a
    quorum queue), QUORUM (one already) or KEPT (still classic, ``reason`` says why)."""

    MOVED: ClassVar[str] = "moved"
    QUORUM: ClassVar[str] = "quorum already"
    KEPT: ClassVar[str] = "kept classic"

    queue: str
    outcome: str
    reason: str = ""


def _described(name: str) -> topology.Queue | None:
    """The topology's description of the queue named ``name``; None for any other queue."""
    for queue in topology.SERVICE_QUEUES:
        if queue.name == name:
            return queue
    if name.startswith(topology.GATEWAY_QUEUE_PREFIX):
        try:
            return topology.gateway_queue(
                names.gateway_id(name.removeprefix(topology.GATEWAY_QUEUE_PREFIX))
            )
        except InvalidName:
            return None
    return None


def _kept_reason(row: Mapping[str, Any], exc: ManagementRefused) -> str:
    """Why the broker would not delete a queue (``if-empty``/``if-unused``), in its terms
    and the listing's counts."""
    messages, consumers = int(row.get("messages") or 0), int(row.get("consumers") or 0)
    counts = f"{messages} message(s) waiting, {consumers} consumer(s) when listed"
    return f"the broker would not delete it ({counts}): {exc}"


@dataclass(frozen=True)
class GatewayUsers:
    """``BrokerAccess`` for the gateways of one vhost (see ``BrokerAccess.gateways``)."""

    access: BrokerAccess
    vhost: str

    def enroll_gateway(self, gateway_id: str) -> BrokerCredentials:
        return self.access.enroll_gateway(self.vhost, gateway_id)

    def revoke_gateway(self, gateway_id: str) -> None:
        self.access.revoke_gateway(self.vhost, gateway_id)

    def refresh_gateway(self, gateway_id: str) -> bool:
        return self.access.refresh_gateway(self.vhost, gateway_id)


class _Api:
    """One management API, its answers and errors translated (urllib, JSON)."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"invalid management URL {_without_password(url)!r}: expected "
                "http://USER:PASS@HOST:15672"
            )
        if not parts.username or parts.password is None:
            raise ConfigError(
                f"the management URL {_without_password(url)!r} has no user and password: "
                "give http://USER:PASS@HOST:15672 (a user with the administrator tag)"
            )
        self.user = unquote(parts.username)
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        netloc = f"{host}:{parts.port}" if parts.port else host
        self.safe_url = f"{parts.scheme}://{self.user}@{netloc}{parts.path.rstrip('/')}"
        self._base = f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}/api"
        token = base64.b64encode(f"{self.user}:{unquote(parts.password)}".encode()).decode()
        self._auth = f"Basic {token}"
        self._timeout = timeout

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        what: str,
        missing_ok: bool = False,
    ) -> Any:
        """Send one request; the decoded JSON answer (None for none, or for a 404 with
        ``missing_ok``). Raises ManagementRefused or ManagementUnavailable naming ``what``."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self._base + path, data=data, method=method)
        request.add_header("Authorization", self._auth)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and missing_ok:
                return None
            raise self._refusal(what, exc) from exc
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ManagementUnavailable(
                f"cannot {what}: the management API at {self.safe_url} cannot be reached "
                f"({reason}); {_PLUGIN_HINT}"
            ) from exc
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ManagementRefused(
                f"cannot {what}: {self.safe_url} did not answer as the RabbitMQ management API "
                "(not JSON): check the management URL and its path"
            ) from exc

    def _refusal(self, what: str, exc: urllib.error.HTTPError) -> BrokerAccessError:
        reason = _reason(exc)
        where = f"the management API at {self.safe_url}"
        if exc.code == 401:
            return ManagementRefused(
                f"cannot {what}: {where} refused the credentials of user {self.user!r} "
                "(401 Unauthorized): check the user and password in the management URL"
            )
        if exc.code == 403:
            return ManagementRefused(
                f"cannot {what}: {where} forbids it to user {self.user!r} (403 Forbidden): it "
                f"needs the administrator tag (rabbitmqctl set_user_tags {self.user} "
                "administrator)"
            )
        if exc.code == 404:
            return ManagementRefused(
                f"cannot {what}: {where} answered 404 Not Found ({reason}): check that the "
                f"management URL points at RabbitMQ's management plugin; {_PLUGIN_HINT}"
            )
        if exc.code >= 500:
            return ManagementUnavailable(
                f"cannot {what}: {where} failed ({exc.code}: {reason}); try again"
            )
        return ManagementRefused(f"cannot {what}: the broker refused it ({exc.code}: {reason})")


def _reason(exc: urllib.error.HTTPError) -> str:
    """The broker's reason from an error answer (``{"error": ..., "reason": ...}``)."""
    try:
        raw = exc.read()
        answer = json.loads(raw) if raw else {}
    except (ValueError, OSError):
        return exc.reason if isinstance(exc.reason, str) else str(exc.code)
    if isinstance(answer, dict):
        return str(answer.get("reason") or answer.get("error") or exc.code)[:300]
    return str(exc.code)


def _tags(value: Any) -> list[str]:
    """A user's tags: a list (RabbitMQ 3.9 and later) or a comma-separated string."""
    if isinstance(value, str):
        return [tag for tag in value.split(",") if tag]
    return [str(tag) for tag in value or ()]


def _prefix(prefix: str) -> str:
    if not _PREFIX.fullmatch(prefix):
        raise ConfigError(
            f"invalid broker user prefix {names.shown(prefix)}: use 0-64 ASCII letters, "
            "digits, '.', '_' or '-' (e.g. hitless-)"
        )
    return prefix


def _q(name: str) -> str:
    return quote(name, safe="")


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)
