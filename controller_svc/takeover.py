"""Starting the next controller version beside this one, and knowing when it serves.

    old controller                         new controller (exec of the release artifact)
    --------------                         ---------------------------------------------
    spawn with a pipe (--ready-fd N)  -->  migrate (expand-only), bind the same gRPC port
                                           (SO_REUSEPORT), consume, dispatch PENDING jobs
                                     <--   "READY <pid> <version>\\n"  (and sd_notify)
    stop taking calls, finish those in
    flight, stop consuming, exit

EOF on the pipe or the deadline before READY means the new version failed: it is killed
and the old one stays in charge. Under systemd (``NotifyAccess=all``) the new process
also tells the service manager it is the main process now.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from controller_svc.errors import ControllerError
from hitless import logs

log = logs.get(__name__)

READY_DEADLINE_S = 60.0


class TakeoverFailed(ControllerError):
    """The new controller version did not come up; this one stays in charge."""


@dataclass(frozen=True)
class Successor:
    pid: int
    version: str


def start_successor(
    argv: Sequence[str], env: Mapping[str, str], *, deadline_s: float = READY_DEADLINE_S
) -> Successor:
    """Start ``argv + ["--ready-fd", N]`` with ``env`` added to this process's environment,
    and wait until it says READY."""
    read_fd, write_fd = os.pipe()
    try:
        process = subprocess.Popen(
            [*argv, "--ready-fd", str(write_fd)],
            pass_fds=(write_fd,),
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env},
        )
    except OSError as exc:
        os.close(read_fd)
        raise TakeoverFailed(f"could not start the new controller: {exc}") from exc
    finally:
        os.close(write_fd)
    try:
        line = _read_line(read_fd, time.monotonic() + deadline_s)
    except TakeoverFailed as exc:
        _kill(process)
        code = process.returncode
        detail = f" (it exited with {code})" if code not in (None, -9) else ""
        raise TakeoverFailed(f"{exc}{detail}") from None
    finally:
        os.close(read_fd)
    if line.startswith("FAILED "):
        _kill(process)
        raise TakeoverFailed(f"the new controller failed to start: {line[len('FAILED ') :]}")
    parts = line.split()
    if len(parts) != 3 or parts[0] != "READY":
        _kill(process)
        raise TakeoverFailed(f"the new controller said {line!r} instead of READY")
    return Successor(pid=int(parts[1]), version=parts[2])


def announce_ready(ready_fd: int | None, version: str) -> None:
    """New side: tell the old controller (and systemd, if it manages us) we serve."""
    if ready_fd is not None:
        with os.fdopen(ready_fd, "w") as pipe:
            pipe.write(f"READY {os.getpid()} {version}\n")
    sd_notify(f"READY=1\nMAINPID={os.getpid()}")


def report_failure(ready_fd: int | None, exc: BaseException) -> None:
    """New side: tell the old controller why this one cannot take over."""
    if ready_fd is None:
        return
    reason = " ".join(f"{type(exc).__name__}: {exc}".split())
    with contextlib.suppress(OSError), os.fdopen(ready_fd, "w") as pipe:
        pipe.write(f"FAILED {reason}\n")


def sd_notify(message: str) -> None:
    """Send ``message`` to systemd's notify socket, when there is one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError as exc:
            log.warning("sd_notify_failed", error=str(exc))


def _read_line(fd: int, deadline: float) -> str:
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TakeoverFailed("the new controller did not say ready in time")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 256)
        if not chunk:
            raise TakeoverFailed("the new controller exited before it was ready")
        data += chunk
    return data.decode(errors="replace").strip()


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        log.error("successor_unkillable", pid=process.pid)
