"""Durations and points in time as an operator types them: ``tokens create --expires`` and
``audit --since``.

A duration is a whole number and one unit: ``3600s``, ``30m``, ``12h``, ``90d``; from one
second to ``MAX_DURATION``. A point in time is ISO 8601 (``2025-03-01T12:00:00Z``,
``2025-03-01T14:00+02:00``, ``2025-03-01``), UTC unless it names an offset; the tables'
own form (``2025-03-01 12:00:07 UTC``) is accepted too, so a time can be copied from them.
Both raise ``ValueError`` with a message for the operator that quotes the input, cut short.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from hitless.names import shown

# Ten years: longer is a typo more often than a plan, and it keeps every computed time
# (now plus or minus it) well inside what datetimes and database columns hold.
MAX_DURATION = timedelta(days=3650)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d{1,12})([smhd])")
DURATION_FORM = "a whole number and a unit, s, m, h or d (e.g. 90d, 12h, 30m, 3600s)"


def duration(text: str) -> timedelta:
    """``90d`` → 90 days. Raises ``ValueError`` unless ``text`` is a duration of one second
    to ``MAX_DURATION``."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise ValueError(f"expected a duration: {DURATION_FORM}, not {shown(text)}")
    value = timedelta(seconds=int(match[1]) * _UNITS[match[2]])
    if value <= timedelta(0):
        raise ValueError(f"expected a duration of at least 1s, not {shown(text)}")
    if value > MAX_DURATION:
        raise ValueError(
            f"expected a duration of at most {MAX_DURATION.days}d, not {shown(text)}"
        )
    return value


def since(text: str, now: datetime) -> datetime:
    """The point in time ``text`` names: an ISO 8601 time (UTC unless it names an offset),
    or a duration back from ``now`` (``2h``: two hours before ``now``). An aware datetime.

    Raises ``ValueError`` when ``text`` is neither, or a duration out of range.
    """
    text = text.strip()
    if _DURATION.fullmatch(text):
        return now - duration(text)
    try:
        when = datetime.fromisoformat(text.removesuffix(" UTC"))
    except ValueError:
        raise ValueError(
            "expected a time, ISO 8601 (e.g. 2025-03-01T12:00:00Z; UTC unless it names an "
            f"offset), or a duration back from now, {DURATION_FORM}, not {shown(text)}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when
