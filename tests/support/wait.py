"""Waiting on conditions with a deadline: the only way tests synchronise."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    probe: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.05,
    describe: Callable[[], str] | None = None,
) -> T:
    """Call ``probe`` until it returns something truthy, and return that.

    Fails after ``timeout`` seconds saying what was awaited and, when given, what
    ``describe`` reports about the current state.
    """
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    seen = describe() if describe else repr(last)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last seen: {seen}")
