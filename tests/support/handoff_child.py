"""A new-version process for handoff tests: ``python -m tests.support.handoff_child FD MODE``.

MODE ok: adopt the listeners, say ready, start, say started, serve until SIGTERM.
MODE tunnels: the same with a tunnel plane (``tunnels.plane.adopt``).
MODE crash: exit 3 at once.  MODE hang: never answer.  MODE abort: refuse (a failed
self-check).  MODE die-after-ready: say ready, then SIGKILL itself before starting.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from gateway_daemon import listeners
from gateway_daemon.handoff import child
from gateway_daemon.plane import Plane
from gateway_daemon.tunnels import plane as tunnels


def main() -> int:
    fd, mode = int(sys.argv[1]), sys.argv[2]
    if mode == "crash":
        return 3
    if mode == "hang":
        threading.Event().wait()
    inheritance = child.accept(fd)
    if mode == "abort":
        inheritance.abort("self-check failed: config checksum mismatch")
        return 1
    plane: Plane
    if mode == "tunnels":
        description, sockets = inheritance.description, inheritance.sockets
        plane = tunnels.adopt(description, sockets, inheritance.snapshot)
    else:
        plane = listeners.adopt(inheritance.description, inheritance.sockets, b"child\n")
    if mode == "die-after-ready":
        inheritance.channel.send(4)  # READY, then gone before the cutover completes
        os.kill(os.getpid(), signal.SIGKILL)
    plane.start(inheritance.ready())
    inheritance.started()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    plane.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
