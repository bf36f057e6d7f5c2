"""The delivery ledger: which (event, address) pairs have been mailed, in a SQLite file.

One row per pair, keyed by ``(event_id, address)``::

    SENDING ──▶ SENT        the SMTP server accepted the message
       │
       └──────▶ FAILED      refused for good (5xx, an invalid address, or 4xx past the
                            retry deadline); the reason is kept in ``detail``

SENDING is written (and committed) before the message goes to the server, so a row left
in SENDING after a crash marks the one window where the server may have accepted the mail
without the ledger knowing: that pair is sent again with the same Message-ID.
"""

from __future__ import annotations

import enum
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from notifier.errors import LedgerError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    event_id    TEXT NOT NULL,
    address     TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('SENDING', 'SENT', 'FAILED')),
    message_id  TEXT NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    detail      TEXT NOT NULL DEFAULT '',
    updated_at  TEXT NOT NULL,
    PRIMARY KEY (event_id, address)
)
"""


class State(enum.StrEnum):
    SENDING = "SENDING"
    SENT = "SENT"
    FAILED = "FAILED"


SETTLED = frozenset({State.SENT, State.FAILED})


class Ledger:
    """Thread-safe; every write is committed (fsynced) before the method returns."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise LedgerError(
                f"cannot open the delivery ledger {path}: {exc}; check the --state path and "
                "its permissions"
            ) from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def states(self, event_id: str) -> dict[str, State]:
        rows = self._run("SELECT address, state FROM deliveries WHERE event_id = ?", (event_id,))
        return {str(address): State(state) for address, state in rows}

    def detail(self, event_id: str, address: str) -> str | None:
        rows = self._run(
            "SELECT detail FROM deliveries WHERE event_id = ? AND address = ?", (event_id, address)
        )
        return str(rows[0][0]) if rows else None

    def begin(self, event_id: str, address: str, message_id: str) -> int:
        """Record that a send is about to start; return how many attempts were begun so far
        (1 for the first)."""
        rows = self._run(
            """
            INSERT INTO deliveries (event_id, address, state, message_id, attempts, updated_at)
            VALUES (?, ?, 'SENDING', ?, 1, ?)
            ON CONFLICT (event_id, address) DO UPDATE
                SET state = 'SENDING', attempts = attempts + 1, updated_at = excluded.updated_at
                WHERE state = 'SENDING'
            RETURNING attempts
            """,
            (event_id, address, message_id, _now()),
        )
        if not rows:
            raise LedgerError(f"{address} for event {event_id} is already settled")
        return int(rows[0][0])

    def sent(self, event_id: str, address: str) -> None:
        self._settle(event_id, address, State.SENT, "")

    def failed(self, event_id: str, address: str, detail: str, message_id: str = "") -> None:
        self._run(
            """
            INSERT INTO deliveries (event_id, address, state, message_id, detail, updated_at)
            VALUES (?, ?, 'FAILED', ?, ?, ?)
            ON CONFLICT (event_id, address) DO UPDATE
                SET state = 'FAILED', detail = excluded.detail, updated_at = excluded.updated_at
            """,
            (event_id, address, message_id, detail, _now()),
        )

    def _settle(self, event_id: str, address: str, state: State, detail: str) -> None:
        self._run(
            "UPDATE deliveries SET state = ?, detail = ?, updated_at = ? "
            "WHERE event_id = ? AND address = ?",
            (state.value, detail, _now(), event_id, address),
        )

    def _run(self, sql: str, params: tuple[object, ...]) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise LedgerError(f"the delivery ledger {self.path} failed: {exc}") from exc


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
