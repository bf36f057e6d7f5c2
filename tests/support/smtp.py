"""A real SMTP server for tests: aiosmtpd on loopback, keeping what it receives."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.smtp import AuthResult, LoginPassword


@dataclass
class Sink:
    """An aiosmtpd handler that keeps every message, one entry per accepted recipient, and
    answers RCPT TO with what ``answers`` says for an address (each answer used once)."""

    answers: dict[str, list[str]] = field(default_factory=dict)
    mails: list[tuple[str, EmailMessage]] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        queued = self.answers.get(address)
        if queued:
            answer = queued.pop(0) if len(queued) > 1 else queued[0]
            if not answer.startswith("250"):
                return answer
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = message_from_bytes(envelope.content, policy=policy.default)
        assert isinstance(message, EmailMessage)
        with self.lock:
            self.mails += [(rcpt, message) for rcpt in envelope.rcpt_tos]
        return "250 Message accepted"

    def authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"bot", b"pw")
        if ok:
            self.logins.append(data.login.decode())
        return AuthResult(success=ok)

    def to(self, address: str) -> list[EmailMessage]:
        with self.lock:
            return [m for rcpt, m in self.mails if rcpt == address]

    def count(self) -> Counter[str]:
        with self.lock:
            return Counter(rcpt for rcpt, _ in self.mails)
