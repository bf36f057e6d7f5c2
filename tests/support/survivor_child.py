"""The new process of ``tests.support.dying_parent``'s handoff:
``python -m tests.support.survivor_child FD``.

It takes over the way the gateway daemon does (``dataplane.adopt``, say ready, the data
plane's loop waits for the final state and serves), prints ``serving <pid> alone=<bool>``
once it serves, and serves until SIGTERM.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from gateway_daemon import dataplane
from gateway_daemon.handoff import child


def main() -> int:
    inheritance = child.accept(int(sys.argv[1]))
    plane = dataplane.adopt(inheritance.description, inheritance.sockets, inheritance.snapshot, b"")
    inheritance.say_ready()
    deadline = time.monotonic() + 10
    plane.start_from(lambda: inheritance.cutover(deadline), 12)
    inheritance.started()
    print(f"serving {os.getpid()} alone={inheritance.alone}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    plane.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
