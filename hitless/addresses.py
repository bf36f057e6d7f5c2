"""Admin email addresses: the one rule the controller applies when an admin is added and the
notifier applies again before it mails one, so an address is either refused at
``upgradectl admins add`` with the reason or one the notifier knows how to send to.

The rule is email-validator's syntax check (RFC 5321/5322, RFC 6531 for internationalised
addresses), with its DNS deliverability check off: the controller and the notifier may run
where DNS answers differently or not at all, and the SMTP server has the last word on whether
a mailbox exists. Accepted: one bare address, at most 254 characters, whose domain has a
period and a real top-level domain. Refused: display names (``Ops <ops@example.com>``),
quoted local parts, bracketed IP addresses, and special-use domains (``.local``,
``.localhost``, ``.test``, ``.invalid``, ``.onion``, ``.arpa``).

An ``Address`` has two forms:

- ``text``, the canonical one: the local part in Unicode NFC, the domain in lower case (an
  IDNA domain in Unicode). The controller stores it and the notifier's ledger keys on it, so
  ``Ops@Example.COM`` and ``Ops@example.com``, or ``a@xn--exmple-cua.com`` and
  ``a@exämple.com``, are one admin.
- ``wire``, what goes to the SMTP server (envelope and ``To:``): ASCII whenever the address
  has an ASCII form (an internationalised domain travels as its IDNA ``xn--`` form), so any
  server takes it. Only a local part that is not ASCII (``jörg@example.com``) needs the
  server's SMTPUTF8 extension (RFC 6531); ``needs_smtputf8`` says so, and the notifier records
  such an address as failed, with the reason, when its server does not offer it.
"""

from __future__ import annotations

from dataclasses import dataclass

from email_validator import EmailNotValidError, validate_email

from hitless.errors import HitlessError

EXAMPLE = "ops@example.com"
_SHOWN = 100  # characters of a refused input quoted back in the error


class InvalidAddress(HitlessError):
    """Not an admin address under this module's rule; the message says why."""


@dataclass(frozen=True)
class Address:
    text: str
    wire: str

    @property
    def needs_smtputf8(self) -> bool:
        """True when the SMTP server must offer SMTPUTF8 to take this address."""
        return not self.wire.isascii()

    def __str__(self) -> str:
        return self.text


def parse(raw: str) -> Address:
    """The address ``raw`` (surrounding spaces ignored) in its canonical and wire forms.

    Raises InvalidAddress naming the address, why it is refused (email-validator's words)
    and what an accepted one looks like. Never touches the network.
    """
    try:
        checked = validate_email(raw.strip(), check_deliverability=False)
    except EmailNotValidError as exc:
        shown = raw if len(raw) <= _SHOWN else raw[:_SHOWN] + "…"
        raise InvalidAddress(
            f"invalid email address {shown!r}: {exc} Give one bare address such as {EXAMPLE}."
        ) from exc
    return Address(text=checked.normalized, wire=checked.ascii_email or checked.normalized)
