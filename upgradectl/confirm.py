"""Agreeing to an upgrade plan before anything starts, and to other changes that cannot be
taken back.

The controller refuses a downgrade without ``allow_downgrade`` and a VPN-restarting release
without ``accept_vpn_disruption``. The CLI applies the same rules to the plan first, so the
operator hears about them before a job exists, and is asked the one question only a
person should answer: may the connected VPN users be disconnected? ``--yes`` answers it
in advance; with neither a terminal nor ``--yes`` nobody has agreed, and nothing starts.
Yanking a release (``confirm``) follows the same rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TextIO

from upgradectl.errors import Declined, NeedsConfirmation, Rejected
from upgradectl.model import UpgradePlan

QUESTION = "Proceed? [y/N] "
_YES = frozenset({"y", "yes"})


@dataclass(frozen=True)
class Consent:
    """What the operator agreed to, as StartUpgrade's flags."""

    allow_downgrade: bool
    accept_vpn_disruption: bool


class Terminal:
    """Where a question is asked: it is written to ``prompt_to`` and read from ``stdin``."""

    def __init__(self, stdin: TextIO, prompt_to: TextIO) -> None:
        self._stdin = stdin
        self._prompt_to = prompt_to

    @property
    def interactive(self) -> bool:
        """True when a person can answer: standard input is a terminal."""
        try:
            return self._stdin.isatty()
        except (AttributeError, ValueError):  # closed or not a real stream
            return False

    def ask(self, question: str) -> bool:
        """Ask a yes/no question; anything but y or yes (including end of input) is no."""
        self._prompt_to.write(question)
        self._prompt_to.flush()
        return self._stdin.readline().strip().lower() in _YES


def agree(plan: UpgradePlan, *, allow_downgrade: bool, yes: bool, terminal: Terminal) -> Consent:
    """The operator's consent to ``plan``, asking on ``terminal`` when a person must decide.

    Raises ``Rejected`` for a downgrade without ``allow_downgrade``, ``NeedsConfirmation``
    when the release disconnects VPN users and there is neither ``yes`` nor a terminal, and
    ``Declined`` when the person asked does not say yes. A plan with nothing to change is
    the caller's to handle first.
    """
    release = plan.release.version
    if plan.downgrades and not allow_downgrade:
        names = ", ".join(f"{g.id} from {g.running}" for g in plan.downgrades)
        raise Rejected(
            f"release {release} would downgrade {names}; nothing was started: "
            "add --allow-downgrade to downgrade on purpose"
        )
    if not plan.release.restarts_vpn_service:
        return Consent(allow_downgrade=allow_downgrade, accept_vpn_disruption=False)
    if not yes:
        if not terminal.interactive:
            raise NeedsConfirmation(
                f"release {release} restarts the VPN service and would disconnect "
                f"{plan.vpn_sessions_affected} connected VPN user(s); standard input is not "
                "a terminal to ask on, so nothing was started: add --yes to accept that"
            )
        if not terminal.ask(QUESTION):
            raise Declined(f"the upgrade to {release} was not confirmed: nothing was started")
    return Consent(allow_downgrade=allow_downgrade, accept_vpn_disruption=True)


def confirm(action: str, *, yes: bool, terminal: Terminal) -> None:
    """Go on with ``action`` (a noun phrase: "yanking release 1.2.0") only with the
    operator's yes: ``yes`` (``--yes``) given in advance, or y/yes answered on ``terminal``.
    The caller shows what the action does first.

    Raises ``NeedsConfirmation`` when there is neither ``yes`` nor a terminal, and
    ``Declined`` when the person asked does not say yes.
    """
    if yes:
        return
    if not terminal.interactive:
        raise NeedsConfirmation(
            f"{action} needs confirmation, and standard input is not a terminal to ask on, "
            "so nothing was done: add --yes to confirm"
        )
    if not terminal.ask(QUESTION):
        raise Declined(f"{action} was not confirmed: nothing was done")
