"""The SMTP adapter: the only module that imports smtplib.

A ``Mailer`` opens a session (connect, EHLO, STARTTLS and login when configured); a session
sends one message to one recipient at a time and says how that recipient fared:

- SENT: the server accepted the message for the recipient;
- REJECTED: refused for good (5xx for the recipient or its message), or not sendable
  through this server at all: an address whose local part is not ASCII needs SMTPUTF8
  (RFC 6531), and a server that does not offer it never will for this message;
- DEFERRED: refused for now (4xx for the recipient or its message).

A recipient is given in its wire form (``hitless.addresses.Address.wire``): ASCII unless
its local part is not, in which case the message goes with SMTPUTF8.

Everything that is the server's problem rather than the recipient's (unreachable, a dropped
connection, 421, STARTTLS or login refused, the sender refused) raises SmtpUnavailable;
SessionBroken when the session broke off (a dropped connection, 421) while one recipient's
message was being handed over, so the caller can tell a recipient that keeps breaking it.
"""

from __future__ import annotations

import enum
import smtplib
import ssl
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Protocol

from notifier.config import SmtpConfig
from notifier.errors import SessionBroken, SmtpUnavailable


class Outcome(enum.Enum):
    SENT = "sent"
    REJECTED = "rejected"
    DEFERRED = "deferred"


@dataclass(frozen=True)
class Result:
    """How one recipient fared: the outcome, the server's reply code (0 when the notifier
    decided without asking the server) and its words."""

    outcome: Outcome
    code: int = 250
    detail: str = ""


class Session(Protocol):
    def send(self, message: EmailMessage, sender: str, recipient: str) -> Result: ...


class Mailer(Protocol):
    def session(self) -> AbstractContextManager[Session]: ...


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw


def _classify(code: int, message: bytes | str) -> Result:
    detail = f"{code} {_text(message)}".strip()
    if 500 <= code < 600:
        return Result(Outcome.REJECTED, code, detail)
    if 400 <= code < 500 and code != 421:
        return Result(Outcome.DEFERRED, code, detail)
    raise SessionBroken(f"the SMTP server answered {detail}")


class _SmtpSession:
    def __init__(self, smtp: smtplib.SMTP, server: str) -> None:
        self._smtp = smtp
        self._server = server

    def send(self, message: EmailMessage, sender: str, recipient: str) -> Result:
        if not recipient.isascii() and not self._smtp.has_extn("smtputf8"):
            # smtplib would raise SMTPNotSupportedError, which is no reason to wait for
            # the server: without the extension this address can never be sent to.
            return Result(
                Outcome.REJECTED,
                0,
                f"{self._server} does not offer SMTPUTF8, which {recipient} needs (the part "
                "before the @ is not ASCII): enable SMTPUTF8 on the mail server, or give this "
                "admin an ASCII address (upgradectl admins add)",
            )
        try:
            refused = self._smtp.send_message(message, from_addr=sender, to_addrs=[recipient])
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = exc.recipients.get(recipient, (550, b"refused"))
            result = _classify(code, text)  # before the reset, so a 421 keeps its words
            self._reset()
            return result
        except smtplib.SMTPDataError as exc:
            result = _classify(exc.smtp_code, exc.smtp_error)
            self._reset()
            return result
        except smtplib.SMTPSenderRefused as exc:
            raise SmtpUnavailable(
                f"{self._server} refused the sender {sender!r}: {exc.smtp_code} "
                f"{_text(exc.smtp_error)}; check --from"
            ) from exc
        except (smtplib.SMTPException, OSError) as exc:
            raise SessionBroken(f"sending through {self._server} failed: {exc}") from exc
        if recipient in refused:
            return _classify(*refused[recipient])
        return Result(Outcome.SENT)

    def _reset(self) -> None:
        try:
            self._smtp.rset()
        except (smtplib.SMTPException, OSError) as exc:
            raise SessionBroken(f"{self._server} dropped the session: {exc}") from exc


class SmtpMailer:
    """Sends through one SMTP server, as configured."""

    def __init__(self, config: SmtpConfig, tls: ssl.SSLContext | None = None) -> None:
        self._config = config
        self._tls = tls

    @contextmanager
    def session(self) -> Iterator[Session]:
        server = str(self._config.server)
        try:
            smtp = smtplib.SMTP(
                self._config.server.host, self._config.server.port, timeout=self._config.timeout_s
            )
        except (smtplib.SMTPException, OSError) as exc:
            raise SmtpUnavailable(f"cannot connect to the SMTP server {server}: {exc}") from exc
        try:
            self._open(smtp, server)
            yield _SmtpSession(smtp, server)
        finally:
            try:
                smtp.quit()
            except (smtplib.SMTPException, OSError):
                smtp.close()

    def _open(self, smtp: smtplib.SMTP, server: str) -> None:
        try:
            smtp.ehlo()
            if self._config.starttls:
                smtp.starttls(context=self._tls or ssl.create_default_context())
                smtp.ehlo()
            if self._config.user:
                smtp.login(self._config.user, self._config.password or "")
        except smtplib.SMTPNotSupportedError as exc:
            raise SmtpUnavailable(
                f"{server} does not offer {'STARTTLS' if self._config.starttls else 'AUTH'}: "
                f"{exc}; check --smtp-starttls and --smtp-user"
            ) from exc
        except smtplib.SMTPAuthenticationError as exc:
            raise SmtpUnavailable(
                f"{server} refused the login of {self._config.user!r}: {exc.smtp_code} "
                f"{_text(exc.smtp_error)}; check --smtp-user and HITLESS_SMTP_PASSWORD"
            ) from exc
        except (smtplib.SMTPException, OSError, ssl.SSLError) as exc:
            raise SmtpUnavailable(f"cannot open an SMTP session with {server}: {exc}") from exc
