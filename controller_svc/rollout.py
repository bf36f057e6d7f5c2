"""How a job rolls out: its waves, how many gateways may be in flight at once, and how many
may fail before the job is ABORTED. Pure domain logic: parsing what an operator says, and
choosing which gateways start next from the job's rows.

    --waves 1,10%,50%,100%   each step is how far the rollout has gone once that wave is
                             done, as a count of gateways or a percentage of the job's;
                             a wave starts when every gateway of the one before is final
    --max-parallel N         at most N gateways in flight (sent a command, not yet final)
    --max-failures N | P%    the job is ABORTED once more than this many gateways
                             FAILED or ROLLED_BACK (P% of the job's gateways, rounded down)
    --not-before T / --not-after T   no gateway starts before / after T (RFC 3339)
    --window "Sat 02:00-04:00 UTC"   no gateway starts outside this weekly window
                             (days: Mon..Sun, a range Mon-Fri, a list Sat,Sun, or daily;
                             a window may cross midnight; any IANA time zone)

The defaults (no waves, no cap, no limit) are one wave of every gateway at once, as an
upgrade has always been. The rules follow the staged rollouts of AWS IoT Jobs (abort
config thresholds), Eclipse hawkBit (groups with an error threshold) and Kubernetes
(``maxUnavailable`` accepts a count or a percentage, rounded down).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from controller_svc.errors import InvalidRequest
from controller_svc.records import GatewayJobRecord, JobRecord
from controller_svc.states import GatewayState

# Longest wave list kept (the column holds 200 characters); more waves than this are
# more than an operator can follow.
MAX_WAVES = 20
MAX_SPEC_CHARS = 200
_STEP = re.compile(r"^(\d{1,7})(%?)$")
# The states that count against ``--max-failures``.
FAILURES = frozenset({GatewayState.FAILED, GatewayState.ROLLED_BACK})


@dataclass(frozen=True)
class Rollout:
    """What an operator asked for; empty strings, 0 and None are the defaults."""

    waves: str = ""
    max_parallel: int = 0
    max_failures: str = ""
    not_before: datetime | None = None
    not_after: datetime | None = None
    window: str = ""
    # Each gateway's soak after its swap, seconds (0: none): a wave is promoted once its
    # gateways have passed theirs.
    soak_s: int = 0


# The longest soak: an hour of watching per gateway and wave.
MAX_SOAK_S = 3600

# Today's behaviour: one wave of every gateway, no cap, no failure limit.
ONE_WAVE = Rollout()


def wave_sizes(spec: str, total: int) -> list[int]:
    """The number of gateways in each wave, for a job of ``total`` gateways; empty waves
    (two steps that round to the same count) are dropped, so every wave has a gateway.

    ``spec`` is a comma-separated list of cumulative steps, each a count ("1") or a
    percentage of ``total`` ("10%", rounded up so a step never stalls below it) that
    never goes down, the last reaching every gateway ("100%", or a count ≥ ``total``).
    An empty spec is one wave. Raises InvalidRequest saying what is wrong with the spec.
    """
    if total <= 0:
        raise InvalidRequest("a job needs at least one gateway")
    if not spec.strip():
        return [total]
    if len(spec) > MAX_SPEC_CHARS:
        raise InvalidRequest(f"--waves is {len(spec)} characters, more than {MAX_SPEC_CHARS}")
    steps = [part.strip() for part in spec.split(",")]
    if len(steps) > MAX_WAVES:
        raise InvalidRequest(f"--waves has {len(steps)} steps, more than {MAX_WAVES}")
    reached: list[int] = []
    for step in steps:
        match = _STEP.match(step)
        if match is None:
            raise InvalidRequest(
                f"--waves step {step!r} is neither a count nor a percentage: write each "
                'step as "N" or "P%", e.g. --waves 1,10%,50%,100%'
            )
        number, percent = int(match.group(1)), bool(match.group(2))
        if percent and not 0 < number <= 100:
            raise InvalidRequest(f"--waves step {step!r} is not a percentage from 1% to 100%")
        if not percent and number == 0:
            raise InvalidRequest(f"--waves step {step!r} starts no gateway: steps are ≥ 1")
        count = math.ceil(total * number / 100) if percent else min(number, total)
        if reached and count < reached[-1]:
            raise InvalidRequest(
                f"--waves steps must not go down: {step!r} reaches {count} gateways of "
                f"{total}, after a step that reached {reached[-1]} (each step counts all "
                "the gateways done so far, e.g. 1,10%,50%,100%)"
            )
        reached.append(count)
    if reached[-1] < total:
        raise InvalidRequest(
            f"--waves ends at {reached[-1]} of the job's {total} gateways: end with 100% "
            "so every gateway has a wave"
        )
    sizes: list[int] = []
    done = 0
    for count in reached:
        if count > done:
            sizes.append(count - done)
            done = count
    return sizes


def failure_limit(spec: str, total: int) -> int | None:
    """How many gateways may fail or roll back before the job is ABORTED (it aborts at
    one more), for a job of ``total`` gateways; None for no limit (an empty spec).

    ``spec`` is a count ("0", "3") or a percentage of ``total`` ("10%", rounded down, as
    Kubernetes rounds ``maxUnavailable``). Raises InvalidRequest for anything else."""
    spec = spec.strip()
    if not spec:
        return None
    match = _STEP.match(spec)
    if match is None:
        raise InvalidRequest(
            f"--max-failures {spec!r} is neither a count nor a percentage: give N "
            "(gateways) or P% (of the job's gateways), e.g. --max-failures 0 or 10%"
        )
    number, percent = int(match.group(1)), bool(match.group(2))
    if percent and number > 100:
        raise InvalidRequest(f"--max-failures {spec!r} is more than 100%")
    return total * number // 100 if percent else number


def check(rollout: Rollout, total: int, now: datetime | None = None) -> None:
    """Raise InvalidRequest unless ``rollout`` is valid for a job of ``total`` gateways
    started at ``now`` (see ``wave_sizes``, ``failure_limit`` and ``Window.parse``;
    ``max_parallel`` is 0 or more; the times are tz-aware, ``not_after`` after
    ``not_before`` and, given ``now``, not past)."""
    wave_sizes(rollout.waves, total)
    failure_limit(rollout.max_failures, total)
    if rollout.max_parallel < 0:
        raise InvalidRequest(
            f"--max-parallel {rollout.max_parallel} is negative: give 0 (no cap) or more"
        )
    for name, value in (("--not-before", rollout.not_before), ("--not-after", rollout.not_after)):
        if value is not None and value.utcoffset() is None:
            raise InvalidRequest(f"{name} {value.isoformat()} has no time zone: add Z or +HH:MM")
    if rollout.not_before and rollout.not_after and rollout.not_after <= rollout.not_before:
        raise InvalidRequest(
            f"--not-after {rollout.not_after.isoformat()} is not after --not-before "
            f"{rollout.not_before.isoformat()}: no gateway could ever start"
        )
    if now is not None and rollout.not_after is not None and rollout.not_after <= now:
        raise InvalidRequest(
            f"--not-after {rollout.not_after.isoformat()} has passed: no gateway could start"
        )
    if rollout.window:
        Window.parse(rollout.window)
    if not 0 <= rollout.soak_s <= MAX_SOAK_S:
        raise InvalidRequest(
            f"--soak {rollout.soak_s}s is out of range: give 0 (no soak) to {MAX_SOAK_S}s"
        )


_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW = re.compile(
    r"^\s*(?P<days>[A-Za-z,\-*]+)\s+(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})"
    r"\s+(?P<zone>[A-Za-z0-9_+\-/]+)\s*$"
)
MAX_WINDOW_CHARS = 64


@dataclass(frozen=True)
class Window:
    """A weekly window: on each of ``days`` (0 Monday .. 6 Sunday), from ``start`` to
    ``end`` local time in ``zone``; ``end`` before ``start`` crosses midnight (the window
    belongs to the day it opens)."""

    days: frozenset[int]
    start: time
    end: time
    zone: ZoneInfo

    @classmethod
    def parse(cls, spec: str) -> Window:
        """``"Sat 02:00-04:00 UTC"``, ``"Mon-Fri 22:00-02:00 Europe/Paris"``, ``"Sat,Sun
        ..."``, ``"daily ..."``. Raises InvalidRequest saying what is wrong."""
        example = 'e.g. --window "Sat 02:00-04:00 UTC" or "Mon-Fri 22:00-02:00 Europe/Paris"'
        if len(spec) > MAX_WINDOW_CHARS:
            raise InvalidRequest(f"--window is longer than {MAX_WINDOW_CHARS} characters")
        match = _WINDOW.match(spec)
        if match is None:
            raise InvalidRequest(f"--window {spec!r} is not DAYS HH:MM-HH:MM ZONE: {example}")
        days = _days(match.group("days"), example)
        start, end = (_clock(match.group(k), example) for k in ("start", "end"))
        if start == end:
            raise InvalidRequest(f"--window {spec!r} opens and closes at the same time")
        try:
            zone = ZoneInfo(match.group("zone"))
        except (ZoneInfoNotFoundError, ValueError):
            raise InvalidRequest(
                f"--window time zone {match.group('zone')!r} is not known: use UTC or an "
                "IANA name such as Europe/Paris"
            ) from None
        return cls(days, start, end, zone)

    def _spans(self, around: datetime) -> list[tuple[datetime, datetime]]:
        """The openings that start from the day before ``around`` to a week after it."""
        local = around.astimezone(self.zone)
        spans = []
        for offset in range(-1, 8):
            day = (local + timedelta(days=offset)).date()
            if day.weekday() not in self.days:
                continue
            opens = datetime.combine(day, self.start, self.zone)
            closes = datetime.combine(day, self.end, self.zone)
            if closes <= opens:
                closes += timedelta(days=1)
            spans.append((opens, closes))
        return spans

    def next_open(self, now: datetime) -> datetime:
        """``now`` when the window is open then, else when it next opens (tz-aware)."""
        for opens, closes in self._spans(now):
            if opens <= now < closes:
                return now
            if opens > now:
                return opens
        raise AssertionError("a weekly window opens within a week")  # days is never empty


_DAY_NAMES = {
    **{name: n for n, name in enumerate(_DAYS)},
    **{name: n for n, name in enumerate(
        ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
    )},
}  # fmt: skip


def _days(text: str, example: str) -> frozenset[int]:
    """ "daily", "Sat", "Sat,Sun", "Mon-Fri" (a range may wrap: "Fri-Mon")."""
    text = text.lower()
    if text in ("daily", "*"):
        return frozenset(range(7))
    days: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        if first not in _DAY_NAMES or (last and last not in _DAY_NAMES):
            raise InvalidRequest(f"--window day {part!r} is not a day (Mon..Sun): {example}")
        a = _DAY_NAMES[first]
        b = _DAY_NAMES[last] if last else a
        days.update((a + i) % 7 for i in range((b - a) % 7 + 1))
    return frozenset(days)


def _clock(text: str, example: str) -> time:
    hours, minutes = (int(n) for n in text.split(":"))
    if not (0 <= hours <= 23 and 0 <= minutes <= 59):
        raise InvalidRequest(f"--window time {text} is not a time of day: {example}")
    return time(hours, minutes)


def starts_at(rollout: Rollout, now: datetime) -> datetime | None:
    """When gateways of a job with ``rollout`` may start, from ``now``: ``now`` when they
    may now, a later time when the job must wait for it, None when they never may again
    (past ``not_after``)."""
    when = max(now, rollout.not_before) if rollout.not_before else now
    if rollout.window:
        when = Window.parse(rollout.window).next_open(when)
    if rollout.not_after is not None and when > rollout.not_after:
        return None
    return when


def assign_waves(
    spec: str, gateway_ids: Sequence[str], peers: Mapping[str, str] | None = None
) -> list[int]:
    """The wave (0 first) of each gateway, in the order given: the first ones form the
    first wave, and so on (``wave_sizes``). Two gateways of a high-availability pair
    (``peers``: gateway id -> its peer's) never share a wave: the later one moves to the
    next wave (one more wave when it was in the last), so as a wave starts only once the
    one before has ended, the two are never in flight together."""
    waves: list[int] = []
    for index, size in enumerate(wave_sizes(spec, len(gateway_ids))):
        waves.extend([index] * size)
    where = {gid: n for n, gid in enumerate(gateway_ids)}
    for n, gid in enumerate(gateway_ids):
        peer = (peers or {}).get(gid)
        if peer in where and where[peer] < n and waves[where[peer]] == waves[n]:
            waves[n] += 1
    return waves


def rollout_of(job: JobRecord) -> Rollout:
    """The rollout the job was started with."""
    return Rollout(
        job.waves, job.max_parallel, job.max_failures, job.not_before, job.not_after, job.window,
        job.soak_s,
    )  # fmt: skip


def to_start(job: JobRecord, now: datetime) -> list[GatewayJobRecord]:
    """The gateways whose commands may be sent at ``now``, in order: none while the job
    is paused, stopping, final or outside its times (``starts_at``); else those of the
    current wave still QUEUED and never sent, up to ``max_parallel`` in flight (sent and
    not final) when there is a cap. Gateways midway on a path through intermediate
    releases (their next hop queued) come first: they are already on their way."""
    if job.state.terminal or job.ending is not None or not job.state.dispatches:
        return []
    if starts_at(rollout_of(job), now) != now:
        return []
    wave = job.current_wave
    if wave is None:
        return []
    waiting = [
        g for g in job.gateways
        if g.wave == wave and g.state is GatewayState.QUEUED and not g.published
    ]  # fmt: skip
    waiting.sort(key=lambda g: g.hop == 0)
    if job.max_parallel <= 0:
        return waiting
    in_flight = sum(1 for g in job.gateways if g.published and not g.state.terminal)
    return waiting[: max(0, job.max_parallel - in_flight)]


def past_limit(max_failures: str, failed: int, total: int) -> str | None:
    """Why a job of ``total`` gateways, ``failed`` of them FAILED or ROLLED_BACK, must be
    ABORTED under ``--max-failures max_failures``, or None while it is within it."""
    limit = failure_limit(max_failures, total)
    if limit is None or failed <= limit:
        return None
    return (
        f"{failed} gateway(s) failed or rolled back, more than --max-failures "
        f"{max_failures} allows ({limit})"
    )
