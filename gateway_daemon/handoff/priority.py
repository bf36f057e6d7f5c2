"""The new version starts at idle priority and takes normal priority back just before
it says ready.

Starting the new interpreter costs most of a second of CPU (imports, compiling the
release's modules out of the zipapp, connecting to the broker, adopting the plane). On
a gateway with two cores that second competes with the old process's data plane, which
must keep reading its shared sockets: when it falls behind, their receive buffers
overflow and packets are lost before the cutover even starts. So the old process moves
the new one to ``SCHED_IDLE`` right after starting it (it runs only on CPU time nothing
else wants), and the new one restores ``SCHED_OTHER`` on every one of its threads just
before READY, so that the cutover and everything after it run at normal priority. Its
agent, which it starts and which inherits the idle policy, it restores once the agent has
attached (or as soon as it was restored itself: ``forwarding.Forwarding.wait_attach``).

Lowering is always allowed. Raising back from ``SCHED_IDLE`` needs ``CAP_SYS_NICE``
(root) or an ``RLIMIT_NICE`` of at least 20; without either the new process would stay
idle for good, so the old process then does not lower it at all (``can_restore()``) and
the upgrade simply runs at normal priority, as it would on a kernel without
``SCHED_IDLE``. A new process that cannot restore itself anyway logs it and serves on.

On a machine whose cores are all busy (other work, not the gateway) an idle process
gets no CPU at all, so idle priority is only a head start: a new process that has not
said ready after ``Deadlines.idle_s`` is put back to normal priority by the old process
(``restore(pid)``), and starts as it would have without it.
"""

from __future__ import annotations

import os
import resource

from hitless import logs

log = logs.get(__name__)

_IDLE = getattr(os, "SCHED_IDLE", None)
_NORMAL = getattr(os, "SCHED_OTHER", 0)


def can_restore() -> bool:
    """Whether a process of this user may move itself from SCHED_IDLE back to normal."""
    if _IDLE is None:
        return False
    if os.geteuid() == 0:
        return True
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    return soft == resource.RLIM_INFINITY or soft >= 20


def is_idle() -> bool:
    """Whether this process (its calling thread) runs at SCHED_IDLE."""
    return _IDLE is not None and os.sched_getscheduler(0) == _IDLE


def lower(pid: int) -> bool:
    """Move the just-started process ``pid`` to SCHED_IDLE; False when it stays normal.

    Its threads inherit the policy; the race with its start is harmless (at worst its
    first instructions run at normal priority)."""
    if _IDLE is None or not can_restore():
        return False
    try:
        os.sched_setscheduler(pid, _IDLE, os.sched_param(0))
    except OSError as exc:
        log.warning("handoff_priority_not_lowered", pid=pid, error=str(exc))
        return False
    return True


def restore(pid: int | None = None) -> int:
    """Put every thread of process ``pid`` (this one by default) that runs at idle
    priority back to normal; return how many were moved. Failures are logged, never
    raised: the process serves either way."""
    moved = 0
    try:
        tasks = os.listdir(f"/proc/{'self' if pid is None else pid}/task")
    except OSError:
        return 0  # the process is gone
    for name in tasks:
        tid = int(name)
        try:
            if os.sched_getscheduler(tid) != _IDLE:
                continue
            os.sched_setscheduler(tid, _NORMAL, os.sched_param(0))
            moved += 1
        except ProcessLookupError:
            continue  # the thread ended meanwhile
        except OSError as exc:
            log.warning("handoff_priority_not_restored", tid=tid, error=str(exc))
    return moved

