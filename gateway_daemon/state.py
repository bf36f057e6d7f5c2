"""The gateway's state on disk, so an upgrade is resumable across processes and crashes.

``agent.json`` in the state directory records the release this gateway runs and its
sha256 (so a restarted daemon starts the staged artifact, after hashing it again, not the
installed package), the outcome of the latest commands (so a redelivered command is
answered, never run twice), the digest of each signed command taken (so the same command
id with other content is refused as a replay) and when the newest command it took was
issued (so one issued earlier, delivered late, is refused). Writes are atomic: temp file,
fsync, rename. The state directory and those below it are created 0700.

The states a gateway reports for a command are one enum, ``CommandState`` (the names of
the protocol's ``GatewayJobState``), and move only along ``TRANSITIONS``:

    QUEUED -> DOWNLOADING -> VERIFYING -> SWAPPING [-> SOAKING] -> SUCCEEDED | ROLLED_BACK
           -> SUCCEEDED (already on the target)
           -> UNREACHABLE (expired before it was taken)
    any state before the end -> FAILED;   DOWNLOADING -> DOWNLOADING carries progress

``CommandStates`` holds each command's state in this process and refuses any other move.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from gateway_daemon.errors import TransitionRefused
from hitless.private import private_dir

KEEP_OUTCOMES = 200


class CommandState(StrEnum):
    """What the gateway reports about a command it took: ``hitless.v1.GatewayJobState``
    without its prefix. QUEUED is where a command starts; it is never reported."""

    QUEUED = "QUEUED"
    DOWNLOADING = "DOWNLOADING"
    VERIFYING = "VERIFYING"
    SWAPPING = "SWAPPING"
    SOAKING = "SOAKING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    ROLLED_BACK = "ROLLED_BACK"
    UNREACHABLE = "UNREACHABLE"

    @property
    def terminal(self) -> bool:
        """Whether the command has ended: no move leads out of it."""
        return not TRANSITIONS[self]


# Each state and the states it may move to; an ended command moves nowhere.
TRANSITIONS: Mapping[CommandState, frozenset[CommandState]] = {
    CommandState.QUEUED: frozenset(
        {
            CommandState.DOWNLOADING,
            CommandState.SUCCEEDED,
            CommandState.FAILED,
            CommandState.UNREACHABLE,
        }
    ),
    CommandState.DOWNLOADING: frozenset(
        {CommandState.DOWNLOADING, CommandState.VERIFYING, CommandState.FAILED}
    ),
    CommandState.VERIFYING: frozenset({CommandState.SWAPPING, CommandState.FAILED}),
    CommandState.SWAPPING: frozenset(
        {
            CommandState.SOAKING,
            CommandState.SUCCEEDED,
            CommandState.ROLLED_BACK,
            CommandState.FAILED,
        }
    ),
    CommandState.SOAKING: frozenset(
        {CommandState.SUCCEEDED, CommandState.ROLLED_BACK, CommandState.FAILED}
    ),
    CommandState.SUCCEEDED: frozenset(),
    CommandState.FAILED: frozenset(),
    CommandState.ROLLED_BACK: frozenset(),
    CommandState.UNREACHABLE: frozenset(),
}


def transition(current: CommandState, new: CommandState) -> CommandState:
    """``new``, when TRANSITIONS lets a command in ``current`` move there; else raises
    TransitionRefused naming both."""
    if new not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(TRANSITIONS[current])) or "nothing: it has ended"
        raise TransitionRefused(
            f"a command cannot move from {current} to {new} (from {current}: {allowed})"
        )
    return new


class CommandStates:
    """The state of each command this process has taken, moved only by ``move``.

    Thread-safe. Keeps the newest KEEP_OUTCOMES commands; one not kept starts at QUEUED.
    """

    def __init__(self) -> None:
        self._states: dict[str, CommandState] = {}
        self._lock = threading.Lock()

    def get(self, command_id: str) -> CommandState:
        """The command's state in this process (QUEUED before its first move)."""
        with self._lock:
            return self._states.get(command_id, CommandState.QUEUED)

    def move(self, command_id: str, new: CommandState) -> CommandState:
        """Move the command to ``new``; raises TransitionRefused (and changes nothing)
        when TRANSITIONS does not lead there from its state."""
        with self._lock:
            transition(self._states.get(command_id, CommandState.QUEUED), new)
            self._states.pop(command_id, None)  # re-inserted last: the newest
            self._states[command_id] = new
            for old in list(self._states)[: max(0, len(self._states) - KEEP_OUTCOMES)]:
                del self._states[old]
            return new


@dataclass(frozen=True)
class Outcome:
    state: CommandState
    to_version: str
    from_version: str
    error: str = ""
    vpn_sessions_dropped: int = 0


@dataclass(frozen=True)
class Taken:
    """A command the gateway acted on: when its job was issued (tz-aware) and which."""

    issued_at: datetime
    job_id: str


class AgentState:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.path = state_dir / "agent.json"
        self._lock = threading.Lock()
        # 0700, also where an earlier release made them 0755.
        for private in (state_dir, self.releases_dir, self.downloads_dir):
            private_dir(private)

    @property
    def releases_dir(self) -> Path:
        return self.dir / "releases"

    @property
    def downloads_dir(self) -> Path:
        return self.dir / "downloads"

    def _load(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"current": None, "outcomes": {}}
        return data

    def _save(self, data: dict[str, Any]) -> None:
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)

    def current_release(self) -> tuple[str, Path, str | None] | None:
        """(version, artifact, sha256) of the release this gateway runs, if it runs a
        staged one; sha256 is None when an earlier release recorded none."""
        current = self._load().get("current")
        if not current:
            return None
        return current["version"], Path(current["artifact"]), current.get("sha256")

    def set_current_release(self, version: str, artifact: Path, sha256: str) -> None:
        """Record the staged release this gateway runs, with the sha256 it was verified as."""
        with self._lock:
            data = self._load()
            data["current"] = {"version": version, "artifact": str(artifact), "sha256": sha256}
            self._save(data)

    def clear_current_release(self) -> None:
        """Record that this gateway runs the installed package (no staged release)."""
        with self._lock:
            data = self._load()
            data["current"] = None
            self._save(data)

    def command_digest(self, command_id: str) -> str | None:
        """The sha256 of the signed command taken under ``command_id``, if one was."""
        found: str | None = self._load().get("commands", {}).get(command_id)
        return found

    def record_command(self, command_id: str, digest: str) -> None:
        """Remember that the signed command with sha256 ``digest`` was taken under
        ``command_id`` (the newest KEEP_OUTCOMES are kept: an older one has expired)."""
        with self._lock:
            data = self._load()
            commands: dict[str, str] = data.setdefault("commands", {})
            commands.pop(command_id, None)
            commands[command_id] = digest  # dicts keep insertion order: oldest first
            for old in list(commands)[: max(0, len(commands) - KEEP_OUTCOMES)]:
                del commands[old]
            self._save(data)

    def newest_taken(self) -> Taken | None:
        """The newest command (by when its job was issued) this gateway has taken."""
        found = self._load().get("newest_taken")
        if not found:
            return None
        return Taken(datetime.fromisoformat(found["issued_at"]), found["job_id"])

    def record_taken(self, taken: Taken) -> None:
        """Remember ``taken`` if it was issued after the newest command taken so far."""
        with self._lock:
            data = self._load()
            newest = data.get("newest_taken")
            if newest and datetime.fromisoformat(newest["issued_at"]) >= taken.issued_at:
                return
            data["newest_taken"] = {
                "issued_at": taken.issued_at.isoformat(),
                "job_id": taken.job_id,
            }
            self._save(data)

    def outcome(self, command_id: str) -> Outcome | None:
        found = self._load()["outcomes"].get(command_id)
        if not found:
            return None
        dropped = found.get("vpn_sessions_dropped", 0)
        fields = dict(found["outcome"])
        fields["state"] = CommandState(fields["state"])
        return Outcome(**fields, vpn_sessions_dropped=dropped)

    def record_outcome(self, command_id: str, outcome: Outcome) -> None:
        with self._lock:
            data = self._load()
            outcomes = data["outcomes"]
            serial = max((o["serial"] for o in outcomes.values()), default=0) + 1
            fields = dict(outcome.__dict__)
            # Beside "outcome", not in it: an older release reading this file (after a
            # downgrade) builds its Outcome from "outcome" and knows no such field.
            dropped = fields.pop("vpn_sessions_dropped")
            outcomes[command_id] = {"serial": serial, "outcome": fields}
            if dropped:
                outcomes[command_id]["vpn_sessions_dropped"] = dropped
            if len(outcomes) > KEEP_OUTCOMES:
                oldest = sorted(outcomes, key=lambda k: outcomes[k]["serial"])
                for key in oldest[: len(outcomes) - KEEP_OUTCOMES]:
                    del outcomes[key]
            self._save(data)
