"""The notifier's errors, below ``hitless.errors.HitlessError``.

    NotifierError                anything the notifier fails to do
    ├── SmtpUnavailable          the SMTP server cannot take mail now: unreachable, dropped
    │   │                        the connection, refused STARTTLS or the login, or answered
    │   │                        421 (transient: retried with backoff, nothing is lost)
    │   └── SessionBroken        the session broke off (dropped, 421) while one recipient's
    │                            message was handed over: that recipient is retried after the
    │                            others until the recipient deadline, then counts as failed
    ├── LedgerError              the delivery ledger (SQLite) cannot be opened or written
    └── DeliveryInterrupted      the notifier is stopping with recipients still pending;
                                 the event stays unacked and is delivered again later

Bad flags and environment variables raise ``hitless.errors.ConfigError``. Library errors
(smtplib, sqlite3) are translated where they are caught, keeping the original as cause.
"""

from __future__ import annotations

from hitless.errors import HitlessError


class NotifierError(HitlessError):
    """Base of the notifier's errors."""


class SmtpUnavailable(NotifierError):
    """The SMTP server cannot take mail at the moment; retrying later may succeed."""


class SessionBroken(SmtpUnavailable):
    """The SMTP session broke off while one recipient's message was being handed over."""


class LedgerError(NotifierError):
    """The delivery ledger failed underneath us."""


class DeliveryInterrupted(NotifierError):
    """The notifier stopped before every recipient of an event was settled."""
