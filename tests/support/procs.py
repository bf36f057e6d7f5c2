"""Real processes for tests: each in its own process group, so a gateway's successors
(started by the gateway itself during a handoff) are stopped with it at teardown."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent


# Ports handed out come from below the kernel's ephemeral range (32768-60999 by default),
# so no outgoing connection can take one between the test picking it and a process
# binding it; each pytest-xdist worker has a band of its own.
_BAND = 5000
_BASE = 20000
_next: list[int] = []


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, from this worker's band."""
    if not _next:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
        start = _BASE + (int(worker) if worker.isdigit() else 0) % 2 * _BAND
        _next.append(start + random.randrange(_BAND))
    for _ in range(_BAND):
        band = _BASE + (_next[0] - _BASE) // _BAND * _BAND
        port = band + (_next[0] - band + 1) % _BAND
        _next[0] = port
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port left in {_BAND} tried")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pgid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def group_alive(self) -> bool:
        """Whether any process of this group still runs (zombies do not count: PID 1
        of a container may never reap the orphans a handoff leaves behind)."""
        self.popen.poll()
        return bool(group_members(self.pgid))


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name, which is in parentheses and may hold spaces.
        fields = stat[stat.rindex(")") + 2 :].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            members.append(int(entry.name))
    return members


class Procs:
    """Starts processes and stops every one of them (and their descendants) at the end."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._procs: list[Proc] = []

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Proc:
        log_path = self._log_dir / f"{name}.log"
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        proc = Proc(name, popen, log_path)
        self._procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 10.0) -> None:
        if proc.group_alive():
            os.killpg(proc.pgid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while proc.group_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            if proc.group_alive():
                os.killpg(proc.pgid, signal.SIGKILL)
        proc.popen.wait(timeout=5)

    def started(self) -> list[Proc]:
        return list(self._procs)

    def stop_all(self) -> None:
        for proc in reversed(self._procs):
            self.stop(proc)

    def dump_logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log()[-4000:]}" for p in self._procs)


def command(name: str) -> str:
    """The path of one of the project's console scripts in this interpreter's venv."""
    return str(BIN / name)
