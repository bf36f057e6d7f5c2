"""The soak after a swap: the new version watches its data plane's own counters for the
job's soak period, and the upgrade is promoted only if they hold. What "hold" means:

- every UDP tunnel that was established when the soak began stays established (a tunnel
  is established once its site's handshake gave it a session and an endpoint, as the
  pre-check counts them; TCP tunnels carry connections only while a site has traffic, so
  one with none is idle, not down);
- datagrams dropped or rejected (replayed, forged, malformed) stay at the rate the old
  version had: the health falls when, over the soak, at least MIN_DROPS were dropped and
  their share of what arrived is above twice the old version's share (and above
  MIN_DROP_SHARE, so a version that never dropped anything does not make one drop a fall).

A fall is reported with what fell ("tunnel 2 went down during the soak", "dropped 120 of 3000
datagrams (4.0%), the version before 0.0%"), and the gateway hands back to the version it
ran before (``agent_process``). The agent reads the counters from the forwarding process
(``health``), which reads them off its data plane without locking: plain attribute reads,
at worst one datagram behind.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway_daemon.health import Counted, Health

# How often the counters are read during a soak, seconds.
SAMPLE_S = 1.0
# How often the health is reported while soaking, seconds (and once at the end).
REPORT_S = 5.0
MIN_DROPS = 10
MIN_DROP_SHARE = 0.01


def sample(plane: Counted) -> Health:
    """The plane's counters now (no tunnels configured: all zero)."""
    return plane.health()


def drop_share(received: int, dropped: int) -> float:
    """The share of ``received`` datagrams that were dropped (0 when none arrived)."""
    return dropped / received if received > 0 else 0.0


def fell(start: Health, now: Health, share_before: float) -> str | None:
    """What fell between ``start`` and ``now`` (the module's rules), or None while the
    health holds. ``share_before`` is the old version's drop share (``drop_share``)."""
    down = sorted(start.up - now.up)
    if down:
        return f"tunnel {', '.join(down)} went down during the soak"
    received = now.received - start.received
    dropped = now.dropped - start.dropped
    share = drop_share(received, dropped)
    if dropped >= MIN_DROPS and share > max(2 * share_before, MIN_DROP_SHARE):
        return (
            f"dropped {dropped} of {received} datagrams during the soak ({share:.1%}), "
            f"the version before {share_before:.1%}"
        )
    return None


def describe(start: Health, now: Health, elapsed_s: float, soak_s: int) -> str:
    """The health as the soak reports it: "3/3 tunnels up, 0 dropped of 1200, 20 s of
    30 s"."""
    dropped = now.dropped - start.dropped
    received = now.received - start.received
    return (
        f"{len(now.up)}/{now.configured} tunnels up, {dropped} dropped of {received}, "
        f"{min(int(elapsed_s), soak_s)} s of {soak_s} s"
    )


@dataclass(frozen=True)
class Verdict:
    passed: bool
    health: str  # the last health described
    reason: str = ""  # what fell, when it did


def watch(
    plane: Counted,
    soak_s: int,
    share_before: float,
    report: Callable[[str], None],
    stop: threading.Event,
) -> Verdict | None:
    """Watch ``plane`` for ``soak_s`` seconds from now, calling ``report`` with the health
    every REPORT_S seconds; the verdict at the first fall or at the end, None when
    ``stop`` is set first (the process is stopping: no verdict)."""
    start = sample(plane)
    began = time.monotonic()
    reported = began
    now = start
    while (elapsed := time.monotonic() - began) < soak_s:
        if stop.wait(min(SAMPLE_S, soak_s - elapsed)):
            return None
        now = sample(plane)
        elapsed = time.monotonic() - began
        why = fell(start, now, share_before)
        if why is not None:
            return Verdict(False, describe(start, now, elapsed, soak_s), why)
        if time.monotonic() - reported >= REPORT_S:
            reported = time.monotonic()
            report(describe(start, now, elapsed, soak_s))
    return Verdict(True, describe(start, now, soak_s, soak_s))
