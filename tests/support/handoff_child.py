"""A new-version process for handoff tests: ``python -m tests.support.handoff_child FD MODE``.

MODE ok: adopt the listeners, say ready, start, say started, serve until SIGTERM.
MODE tunnels: the same with a tunnel plane (``tunnels.plane.adopt``).
MODE crash: exit 3 at once.  MODE hang: never answer.  MODE abort: refuse (a failed
self-check).  MODE die-after-ready: say ready, then SIGKILL itself before starting.
MODE blocking-hang: take the descriptors, set every socket to blocking mode, touch the
file named by HANDOFF_CHILD_MARK, then hang without reading the snapshot.
Every MODE that accepts the handoff writes the seconds it had left to say ready
(``Inheritance.ready_by``) to the file named by HANDOFF_CHILD_READY_IN, when set.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from gateway_daemon import listeners
from gateway_daemon.handoff import child, wire
from gateway_daemon.plane import Plane
from gateway_daemon.tunnels import plane as tunnels


def main() -> int:
    fd, mode = int(sys.argv[1]), sys.argv[2]
    if mode == "crash":
        return 3
    if mode == "hang":
        threading.Event().wait()
    if mode == "blocking-hang":
        _block_and_hang(fd)
    inheritance = child.accept(fd)
    if (ready_in := os.environ.get("HANDOFF_CHILD_READY_IN")) and inheritance.ready_by:
        Path(ready_in).write_text(str(inheritance.ready_by - time.monotonic()))
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


def _block_and_hang(fd: int) -> None:
    channel = wire.Channel(socket.socket(fileno=fd))
    deadline = time.monotonic() + 10
    _, hello = channel.receive(deadline, "the hello")
    for received in channel.receive_fds(int(json.loads(hello)["fds"]), deadline):
        os.set_blocking(received, True)
    Path(os.environ["HANDOFF_CHILD_MARK"]).touch()
    threading.Event().wait()


if __name__ == "__main__":
    sys.exit(main())
