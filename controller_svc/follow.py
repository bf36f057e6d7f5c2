"""Following a job's events to its end: the rule the API's WatchJob stream and the web
console's event stream share. Each asks for the next batch, sends it, and waits (each in
its own way) when the batch is empty and the job goes on.

Waiting is per job (``JobWatches``): a change to one job wakes only the streams following
that job, and a stream that finds no new event reads the job's state alone, never its
gateways, so a thousand-gateway job costs its watchers little between events.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

from controller_svc.records import EventRecord
from controller_svc.repository import Repository


@dataclass(frozen=True)
class Batch:
    """Events after the ones already sent, oldest first. ``finished``: the job has ended
    and nothing follows these events (the last one, when there is one, ended it)."""

    events: list[EventRecord]
    finished: bool


def next_events(repo: Repository, job_id: str, after_seq: int) -> Batch:
    """The job's events with seq > ``after_seq``, up to the one that finishes the job.

    Reads the events, and only when there are none the job's state (one row): a watcher
    polling a job that has not changed never reads the job's gateways."""
    events = repo.events_after(job_id, after_seq)
    for i, event in enumerate(events):
        if event.job_state is not None and event.job_state.terminal:
            return Batch(events[: i + 1], True)
    if events:
        return Batch(events, False)
    state = repo.job_state(job_id)
    # Read again after the state: an event written between the two reads is not skipped.
    ended = state is not None and state.terminal and not repo.events_after(job_id, after_seq)
    return Batch([], ended)


class _Waiting:
    """The threads waiting on one job: a condition on the watches' lock, and how many."""

    def __init__(self, lock: threading.Lock) -> None:
        self.changed = threading.Condition(lock)
        self.count = 0


class JobWatches:
    """Threads waiting for a job to change, woken per job. Thread-safe; holds an entry
    only for a job someone is waiting on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, _Waiting] = {}

    def wait(self, job_id: str, timeout: float) -> None:
        """Block until ``notify`` names ``job_id`` (or names no job), or ``timeout``
        seconds pass."""
        with self._lock:
            waiting = self._jobs.get(job_id)
            if waiting is None:
                waiting = self._jobs[job_id] = _Waiting(self._lock)
            waiting.count += 1
            try:
                waiting.changed.wait(timeout)
            finally:
                waiting.count -= 1
                if waiting.count == 0:
                    del self._jobs[job_id]

    def notify(self, job_ids: Iterable[str] | None = None) -> None:
        """Wake the threads waiting on ``job_ids``; None wakes every one."""
        with self._lock:
            if job_ids is None:
                woken = list(self._jobs.values())
            else:
                woken = [w for w in map(self._jobs.get, job_ids) if w is not None]
            for waiting in woken:
                waiting.changed.notify_all()

    def waiting(self, job_id: str) -> int:
        """How many threads wait on ``job_id`` now."""
        with self._lock:
            waiting = self._jobs.get(job_id)
            return 0 if waiting is None else waiting.count
