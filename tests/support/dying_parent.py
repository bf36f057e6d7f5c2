"""An old gateway process that dies at a chosen step of its handoff, for the survivor
tests: ``python -m tests.support.dying_parent TUNNELS_JSON STEP``.

It serves the tunnels of TUNNELS_JSON, prints ``serving``, waits for a line on stdin,
then hands its plane to ``tests.support.survivor_child`` and SIGKILLs itself at STEP:

- ``after-ready``: the new process said ready; killed before it pauses or sends the
  final state (the new one must start from the snapshot);
- ``after-cutover``: killed right after the final state went out, as it waits for
  STARTED (``parent._expect`` replaced for this process).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from gateway_daemon.dataplane import TUNNELS, DataPlane
from gateway_daemon.handoff import parent, wire
from gateway_daemon.plane import Passable, ReadySignal
from gateway_daemon.tunnels.config import TunnelsConfig
from gateway_daemon.tunnels.plane import TunnelPlane


class _DiesAt:
    """The gateway's data plane, killing its process at one step of the cutover."""

    def __init__(self, plane: DataPlane, step: str) -> None:
        self._plane = plane
        self._step = step

    def sockets(self) -> Sequence[Passable]:
        return self._plane.sockets()

    def describe(self) -> dict[str, Any]:
        return self._plane.describe()

    def snapshot(self) -> bytes:
        return self._plane.snapshot()

    def pause(self) -> None:
        self._plane.pause()

    def final_state(self) -> bytes:
        return self._plane.final_state()

    def resume(self) -> None:
        self._plane.resume()

    def start(self, final_state: bytes) -> None:
        self._plane.start(final_state)

    def close(self) -> None:
        self._plane.close()

    def endpoints(self) -> list[str]:
        return self._plane.endpoints()

    def cut_over_when(self, ready: ReadySignal, send: Callable[[bytes], None]) -> None:
        if self._step == "after-ready":
            ready.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        self._plane.cut_over_when(ready, send)
        raise AssertionError("not reached: the process dies awaiting STARTED")


def _dies_awaiting_started(
    channel: wire.Channel, kind: int, deadline: float, what: str, watch: Any = None
) -> None:
    """``parent._expect`` that kills this process instead of waiting for STARTED: the
    final state has gone out, on the parked loop thread."""
    if kind == wire.STARTED:
        os.kill(os.getpid(), signal.SIGKILL)
    real_expect(channel, kind, deadline, what, watch)


real_expect = parent._expect


def main() -> int:
    config, step = TunnelsConfig.load(sys.argv[1]), sys.argv[2]
    plane = DataPlane([(TUNNELS, TunnelPlane.from_config(config))])
    print("serving", flush=True)
    sys.stdin.readline()

    def argv_for(fd: int) -> list[str]:
        return [sys.executable, "-m", "tests.support.survivor_child", str(fd)]

    if step == "after-cutover":
        parent._expect = _dies_awaiting_started
    parent.hand_off(_DiesAt(plane, step), argv_for, {}, deadlines=parent.Deadlines(ready_s=30))
    return 1  # not reached: it died at its step


if __name__ == "__main__":
    sys.exit(main())
