"""Room for the descriptors a new version receives, checked before it is started.

The new process must hold every descriptor passed to it at once, on top of its own: a
receiver without room gets the batch truncated (MSG_CTRUNC), and a gateway with hundreds
of TCP tunnel connections passes hundreds of descriptors. The new process inherits this
process's RLIMIT_NOFILE, so before it is started:

- what it will need is bounded by what this process holds now (everything passed is
  among it, and the new process's own descriptors, interpreter, broker and controller
  connections, are about this process's own) plus ``MARGIN`` for the handoff itself;
- a soft limit below ``need + HEADROOM`` is raised (up to the hard limit) in this
  process, before the spawn, so the new one starts with it: raising a soft limit is
  always allowed and costs nothing;
- a hard limit below the need is raised too where this process may (CAP_SYS_RESOURCE),
  never beyond ``fs.nr_open``;
- otherwise, and when the system has fewer free open files (``fs.file-max`` less
  ``fs.file-nr``) than the new process's own need, the handoff is refused with the
  numbers and what to change, before anything is started or frozen.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from gateway_daemon.errors import HandoffFailed
from hitless import logs

log = logs.get(__name__)

# Beyond what this process holds: the control socket, and what the new interpreter opens
# while it takes over.
MARGIN: Final = 64
# Room for the new version to grow (new tunnel connections) once it serves.
HEADROOM: Final = 1024
_PROC: Final = Path("/proc/sys/fs")


@dataclass(frozen=True)
class Room:
    """What was found and done: descriptors held and needed, and the limits after."""

    held: int
    needed: int
    soft: int
    hard: int
    raised: bool


def ensure(held: int | None = None, *, proc: Path = _PROC) -> Room:
    """Make sure a process started from this one now can hold every descriptor this one
    may pass it (``held``: this process's open descriptors, counted when None), raising
    this process's RLIMIT_NOFILE where needed and allowed. Raises HandoffFailed, saying
    which limit and what to change, when it cannot."""
    held = _open_descriptors() if held is None else held
    needed = held + MARGIN
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    _check_system(MARGIN, proc)
    if _at_least(soft, needed + HEADROOM):
        return Room(held, needed, soft, hard, raised=False)
    if not _at_least(hard, needed):
        hard = _raise_hard(needed, soft, hard, held, proc)
    new_soft = needed + HEADROOM if _at_least(hard, needed + HEADROOM) else hard
    if new_soft <= soft:
        return Room(held, needed, soft, hard, raised=False)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
    log.info("handoff_descriptor_limit_raised", held=held, soft=new_soft, was=soft, hard=hard)
    return Room(held, needed, new_soft, hard, raised=True)


def _raise_hard(needed: int, soft: int, hard: int, held: int, proc: Path) -> int:
    nr_open = _read_int(proc / "nr_open")
    why = (
        f"the new version must hold the {held} descriptors this process holds (its "
        f"connections among them) and about {MARGIN} of its own, {needed} in all, but "
        f"RLIMIT_NOFILE is {soft} (hard {hard})"
    )
    fix = f"raise the gateway's descriptor limit (LimitNOFILE, ulimit -n) to at least {needed}"
    if nr_open is not None and needed > nr_open:
        raise HandoffFailed(f"{why}, and fs.nr_open caps it at {nr_open}: raise that and {fix}")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, needed))
    except (ValueError, OSError) as exc:
        raise HandoffFailed(
            f"{why}, and this process may not raise its hard limit ({exc}): {fix}"
        ) from exc
    return needed


def _check_system(own: int, proc: Path) -> None:
    """The system has room for the new process's own open files (those it receives
    are open files already)."""
    numbers = (proc / "file-nr").read_text().split() if (proc / "file-nr").exists() else []
    if len(numbers) != 3:
        return
    allocated, _, maximum = (int(n) for n in numbers)
    if maximum - allocated < own:
        raise HandoffFailed(
            f"the system has {maximum - allocated} open files left (fs.file-max {maximum}, "
            f"{allocated} allocated); the new version needs about {own} of its own: raise "
            "fs.file-max or close files elsewhere"
        )


def _at_least(limit: int, value: int) -> bool:
    return limit == resource.RLIM_INFINITY or limit >= value


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd")) - 1  # less the one listing the directory


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None
