"""Waiting on conditions with a deadline: the only way tests synchronise."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# Without an explicit interval, probes start 50 ms apart and back off to this: a probe
# that starts a process (the CLI) costs a tenth of a second of CPU, which a long wait
# would otherwise take from the processes under test on a two-core machine.
MAX_INTERVAL_S = 0.25
BACKOFF = 1.5


def wait_for(
    probe: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float | None = None,
    describe: Callable[[], str] | None = None,
) -> T:
    """Call ``probe`` until it returns something truthy, and return that.

    Probes are ``interval`` seconds apart when given; otherwise 50 ms apart at first,
    backing off to MAX_INTERVAL_S. Fails after ``timeout`` seconds saying what was
    awaited and, when given, what ``describe`` reports about the current state.
    """
    deadline = time.monotonic() + timeout
    pause = interval if interval is not None else 0.05
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(pause)
        if interval is None:
            pause = min(pause * BACKOFF, MAX_INTERVAL_S)
    seen = describe() if describe else repr(last)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last seen: {seen}")
