"""A batch of reports from the reports queue, grouped into as few transactions as each
gateway's order allows (``Engine.on_reports``).

Two kinds of message write to the controller's tables from the reports queue: status
reports (a gateway's progress in a job) and announcements (its hellos and heartbeats).
Status reports are applied together in a transaction (``Repository.apply_reports``),
announcements in another (``Repository.record_gateways_seen``). Their order matters in
one case only: a status report that ends a gateway's command (SUCCEEDED writes the
gateway's version, as an announcement does) must be applied after the announcements that
gateway sent before it, and before those it sent after; every report that ends a command
is kept in that order, whatever its state. A progress report writes only the job's rows,
which no announcement touches, so it may move past them.

So a batch is split into rounds, each a transaction of status reports followed by one of
announcements. A message joins the latest round of its gateways (see ``ReportRounds``),
except a status report that ends a command after an announcement of that round: it goes
to the next round, and what its gateways send after it goes there or later. The number
of transactions depends on how often one gateway alternates within the batch, not on how
many gateways the batch holds: a fleet's batch of a thousand gateways, each with
heartbeats, progress, SUCCEEDED and the new version's hello, takes two rounds.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from controller_svc.records import ReportIn
from controller_svc.repository import GatewaySeen


@dataclass
class Round:
    """One round: its status reports, applied first, then its announcements, each in
    the order they came."""

    statuses: list[ReportIn] = field(default_factory=list)
    announcements: list[GatewaySeen] = field(default_factory=list)


class ReportRounds:
    """Status reports and announcements added in the order they came, given back in
    rounds (module docstring). A message's gateways (``senders``) are those its order is
    kept within: the one its routing key names and the one its body names."""

    def __init__(self) -> None:
        self._rounds: list[Round] = [Round()]
        # Gateway id -> the round of its latest message, and of its latest announcement.
        self._round: dict[str, int] = {}
        self._announced: dict[str, int] = {}

    def add_status(self, report: ReportIn, senders: Iterable[str]) -> None:
        """Add a status report after what ``senders`` (one or two gateway ids) sent before
        it: to their latest round, or the one after when it ends a command
        (``GatewayState.terminal``) and they have an announcement in that round."""
        senders = tuple(senders)
        index = self._latest(senders)
        if report.state.terminal and any(self._announced.get(s) == index for s in senders):
            index += 1
        self._at(index, senders).statuses.append(report)

    def add_announcement(self, seen: GatewaySeen, senders: Iterable[str]) -> None:
        """Add a hello or heartbeat after what ``senders`` (one or two gateway ids) sent
        before it: to their latest round, after that round's status reports."""
        senders = tuple(senders)
        index = self._latest(senders)
        self._at(index, senders).announcements.append(seen)
        for sender in senders:
            self._announced[sender] = index

    def __iter__(self) -> Iterator[Round]:
        """The rounds in the order they must be applied; empty ones left out."""
        return (r for r in self._rounds if r.statuses or r.announcements)

    def _latest(self, senders: tuple[str, ...]) -> int:
        return max((self._round.get(s, 0) for s in senders), default=0)

    def _at(self, index: int, senders: tuple[str, ...]) -> Round:
        while len(self._rounds) <= index:
            self._rounds.append(Round())
        for sender in senders:
            self._round[sender] = index
        return self._rounds[index]
