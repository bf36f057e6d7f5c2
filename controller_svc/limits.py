"""How many calls of each kind the controller's gRPC server runs at once, and how long a
client may keep a stream waiting: so that a few slow clients never lock everyone out.

grpcio's synchronous server runs every call on one thread of a fixed pool, for as long as
the call lasts; when every thread is taken, new calls wait in a queue, unanswered (grpcio's
own ``maximum_concurrent_rpcs`` only turns away calls beyond a total). A stream whose client
stops reading holds its thread too: the handler blocks inside grpc once the HTTP/2 flow
control window is full (measured: after about 20 MB with grpcio's default client window,
after one 512 KiB chunk without BDP probing), until the call ends.

The controller runs one such server per port (``controller_svc.server.build_server``),
each with a pool and a completion queue of its own: the gateways' downloads on the gateway
port never hold the threads, or delay the events, of calls on the API port.

So each kind of call has a budget of its own, counted over both ports, and the budgets
together fit each pool with threads to spare for answering refusals (``Limits.workers``):

| kind     | calls                                         | total | per client host |
|----------|-----------------------------------------------|-------|-----------------|
| watch    | WatchJob and other long-lived streams         | 16    | 4               |
| download | Artifacts.Download (gateways fetching)        | 64    | -               |
| upload   | PublishRelease                                | 2     | -               |
| unary    | everything else (ListGateways, GetJob, ...)   | 16    | -               |

A call over its budget is refused at once with RESOURCE_EXHAUSTED (``Refused``), saying
which budget is full, its size, and to retry later. Downloads have their own budget, so
watches and uploads never take the slots gateways download with.

How long a stream may take (``Admission`` ends a stream by cancelling it):

- a stream blocked on its client (a send the client does not read, a request it does not
  send) for ``stall_s`` (30 s) is cancelled, within ``check_interval_s`` (1 s) more;
- a watch or upload still running ``lifetime_s`` + ``LIFETIME_GRACE_S`` after it began is
  cancelled; WatchJob ends itself at ``lifetime_s`` (300 s) with UNAVAILABLE and the
  sequence number to resume after;
- a download ends itself (DEADLINE_EXCEEDED, with the offset to resume from) once it has
  taken ``download_slack_s`` (60 s) plus one second per ``download_floor_bytes_per_s``
  (64 KiB) of what it had to send.

The client host is the address part of grpc's peer string (``ipv4:10.0.0.7:53122`` →
``10.0.0.7``): clients are not authenticated yet, so one host is one client.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import unquote

from controller_svc.errors import ControllerError
from hitless import logs

log = logs.get(__name__)

Clock = Callable[[], float]

# A watch or upload runs this much past its lifetime before it is cancelled: WatchJob ends
# itself at its lifetime, and the watchdog only catches one that could not.
LIFETIME_GRACE_S = 10.0


class Kind(enum.StrEnum):
    WATCH = "watch"
    DOWNLOAD = "download"
    UPLOAD = "upload"
    UNARY = "unary"


# Methods whose kind is not what their shape says; the rest are watches when streaming
# (WatchJob, Health/Watch, reflection) and unary otherwise.
_KINDS = {
    "/hitless.v1.Artifacts/Download": Kind.DOWNLOAD,
    "/hitless.v1.Controller/PublishRelease": Kind.UPLOAD,
}
# What a refusal calls the calls of each kind.
_NOUNS = {
    Kind.WATCH: "watch streams (WatchJob and other long-lived streams)",
    Kind.DOWNLOAD: "artifact downloads",
    Kind.UPLOAD: "release uploads (PublishRelease)",
    Kind.UNARY: "short calls",
}


class Refused(ControllerError):
    """A budget is full: the call was turned away without running; retry it later."""


@dataclass(frozen=True)
class Budget:
    """Concurrent calls of one kind: ``total`` in all, ``per_peer`` from one client host
    (None: no cap per host); ``stall_s`` seconds a stream may stay blocked on its client
    and ``lifetime_s`` seconds it may run (None: unbounded). Raises ValueError when the
    numbers make no sense."""

    total: int
    per_peer: int | None = None
    stall_s: float | None = None
    lifetime_s: float | None = None

    def __post_init__(self) -> None:
        if self.total < 1:
            raise ValueError(f"a budget needs at least one call, not {self.total}")
        if self.per_peer is not None and not 1 <= self.per_peer <= self.total:
            raise ValueError(
                f"per_peer must be between 1 and the total {self.total}, not {self.per_peer}"
            )
        for name in ("stall_s", "lifetime_s"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, not {value}")


@dataclass(frozen=True)
class Limits:
    """Every limit of the controller's gRPC server, in one place (see the module's
    docstring for what each one means to a client)."""

    watch: Budget = Budget(16, per_peer=4, stall_s=30.0, lifetime_s=300.0)
    # No cap per host: gateways behind one NAT address (or on one machine) share it. Room
    # for a whole fleet of moderate size at once: gateways of releases before this budget
    # existed treat RESOURCE_EXHAUSTED as a failed download, not as "try again".
    download: Budget = Budget(64, stall_s=30.0)
    upload: Budget = Budget(2, stall_s=30.0, lifetime_s=900.0)
    unary: Budget = Budget(16)
    # Threads beyond the budgets: they answer refusals while every budget is in use.
    spare_workers: int = 4
    # Calls that may wait for a thread; beyond them grpcio itself answers
    # RESOURCE_EXHAUSTED ("Concurrent RPC limit exceeded!").
    backlog: int = 64
    download_floor_bytes_per_s: int = 64 * 1024
    download_slack_s: float = 60.0
    check_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if self.spare_workers < 1:
            raise ValueError("spare_workers must be at least 1: refusals need a thread")
        if self.backlog < 0 or self.download_floor_bytes_per_s < 1:
            raise ValueError("backlog and download_floor_bytes_per_s must not be negative")
        if self.download_slack_s <= 0 or self.check_interval_s <= 0:
            raise ValueError("download_slack_s and check_interval_s must be positive")

    def budget(self, kind: Kind) -> Budget:
        return {
            Kind.WATCH: self.watch,
            Kind.DOWNLOAD: self.download,
            Kind.UPLOAD: self.upload,
            Kind.UNARY: self.unary,
        }[kind]

    @property
    def workers(self) -> int:
        """Threads of each port's pool: every budget full still leaves spare ones."""
        return sum(self.budget(k).total for k in Kind) + self.spare_workers

    @property
    def max_concurrent_rpcs(self) -> int:
        """grpcio's own cap, per port, on calls running or waiting for a thread."""
        return self.workers + self.backlog

    def download_time_s(self, nbytes: int) -> float:
        """Seconds a download of ``nbytes`` may take before the controller ends it."""
        return self.download_slack_s + nbytes / self.download_floor_bytes_per_s


DEFAULT_LIMITS = Limits()


def kind_of(method: str, *, streaming: bool) -> Kind:
    """The budget a call of ``method`` (``/package.Service/Method``) counts against."""
    named = _KINDS.get(method)
    if named is not None:
        return named
    return Kind.WATCH if streaming else Kind.UNARY


def peer_host(peer: str) -> str:
    """The client host in grpc's peer string: ``ipv4:10.0.0.7:53122`` → ``10.0.0.7``,
    ``ipv6:[::1]:53122`` (brackets maybe %-encoded) → ``::1``, an IPv4 client of a
    dual-stack listener → its IPv4 address; anything else (``unix:...``) as it is."""
    scheme, _, address = unquote(peer).partition(":")
    if scheme == "ipv4":
        return address.rpartition(":")[0] or address
    if scheme == "ipv6":
        host = address.rpartition(":")[0] if address.startswith("[") else address
        host = host.strip("[]")
        return host.removeprefix("::ffff:")
    return peer


@dataclass(eq=False)
class Slot:
    """One admitted call: counted against its budget until ``release``."""

    kind: Kind
    peer: str
    method: str
    started: float
    _cancel: Callable[[], None]
    _admission: Admission
    _blocked_since: float | None = None
    cancelled: str | None = field(default=None)  # why the watchdog ended it

    def blocked(self) -> None:
        """The call now waits on its client (a send it must read, a message it must send)."""
        self._blocked_since = self._admission.clock()

    def unblocked(self) -> None:
        self._blocked_since = None

    def release(self) -> None:
        """Give the slot back; calling it again does nothing."""
        self._admission._release(self)

    def overdue(self, now: float, budget: Budget) -> str | None:
        """Why this call must end now, or None."""
        blocked_since = self._blocked_since
        if (
            budget.stall_s is not None
            and blocked_since is not None
            and now - blocked_since >= budget.stall_s
        ):
            return f"its client neither read nor sent anything for {budget.stall_s:g} s"
        if budget.lifetime_s is not None and now - self.started >= (
            budget.lifetime_s + LIFETIME_GRACE_S
        ):
            return f"it ran past its lifetime of {budget.lifetime_s:g} s"
        return None


class Admission:
    """The budgets in use, and the watchdog that ends streams stalled or past their time.

    Thread-safe. ``start`` runs the watchdog on a thread of its own; ``stop`` ends it.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS, clock: Clock = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self._lock = threading.Lock()
        self._slots: set[Slot] = set()
        self._in_use: Counter[Kind] = Counter()
        self._by_peer: Counter[tuple[Kind, str]] = Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def admit(self, kind: Kind, peer: str, method: str, cancel: Callable[[], None]) -> Slot:
        """A slot for a call of ``kind`` from client host ``peer``; ``cancel`` ends the call
        (used by the watchdog). Raises Refused when the kind's budget, or this host's share
        of it, is full."""
        budget = self.limits.budget(kind)
        with self._lock:
            if self._in_use[kind] >= budget.total:
                raise Refused(
                    f"the controller is busy: it already serves its limit of {budget.total} "
                    f"{_NOUNS[kind]} at once, so {method} was not started; retry later"
                )
            if budget.per_peer is not None and self._by_peer[kind, peer] >= budget.per_peer:
                raise Refused(
                    f"{peer} already has {budget.per_peer} {_NOUNS[kind]} open, the most one "
                    f"client host may have, so {method} was not started; close one or retry "
                    "later"
                )
            slot = Slot(kind, peer, method, self.clock(), cancel, self)
            self._slots.add(slot)
            self._in_use[kind] += 1
            self._by_peer[kind, peer] += 1
            return slot

    def in_use(self, kind: Kind, peer: str | None = None) -> int:
        """Calls of ``kind`` running now (from ``peer`` only, when given)."""
        with self._lock:
            return self._in_use[kind] if peer is None else self._by_peer[kind, peer]

    def _release(self, slot: Slot) -> None:
        with self._lock:
            if slot not in self._slots:
                return
            self._slots.remove(slot)
            self._in_use[slot.kind] -= 1
            self._by_peer[slot.kind, slot.peer] -= 1
            if not self._by_peer[slot.kind, slot.peer]:
                del self._by_peer[slot.kind, slot.peer]

    def sweep(self) -> int:
        """Cancel every call stalled on its client or past its lifetime; how many."""
        now = self.clock()
        with self._lock:
            due = []
            for slot in self._slots:
                if slot.cancelled is None:
                    reason = slot.overdue(now, self.limits.budget(slot.kind))
                    if reason is not None:
                        slot.cancelled = reason
                        due.append(slot)
        for slot in due:
            log.warning(
                "call_cancelled",
                method=slot.method,
                peer=slot.peer,
                kind=str(slot.kind),
                reason=slot.cancelled,
                ran_s=round(now - slot.started, 1),
            )
            slot._cancel()
        return len(due)

    def start(self) -> None:
        """Run the watchdog: ``sweep`` every ``limits.check_interval_s`` until ``stop``."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="grpc-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _watch(self) -> None:
        while not self._stop.wait(self.limits.check_interval_s):
            self.sweep()
