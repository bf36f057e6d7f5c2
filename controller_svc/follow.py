"""Following a job's events to its end: the rule the API's WatchJob stream and the web
console's event stream share. Each asks for the next batch, sends it, and waits (each in
its own way) when the batch is empty and the job goes on."""

from __future__ import annotations

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
    """The job's events with seq > ``after_seq``, up to the one that finishes the job."""
    events = repo.events_after(job_id, after_seq)
    for i, event in enumerate(events):
        if event.job_state is not None and event.job_state.terminal:
            return Batch(events[: i + 1], True)
    if events:
        return Batch(events, False)
    job = repo.get_job(job_id)
    # Read again after the job: an event written between the two reads is not skipped.
    ended = job is not None and job.state.terminal and not repo.events_after(job_id, after_seq)
    return Batch([], ended)
