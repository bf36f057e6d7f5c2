"""What the traffic tool measured: per-stream arrival bookkeeping and the reports.

A stream's packets carry sequence numbers from 0. An arrival is a duplicate when its
number was seen before, reordered when a higher number arrived earlier. The gap is the
time between two consecutive arrivals of one stream: during a handoff the longest gap
is how long the stream stood still.
"""

from __future__ import annotations

from array import array
from dataclasses import asdict, dataclass


class GapStats:
    """Arrivals of one stream."""

    __slots__ = (
        "_gaps",
        "_last",
        "_longest",
        "_seen",
        "duplicated",
        "highest",
        "longest_ended",
        "received",
        "reordered",
    )

    def __init__(self) -> None:
        self.received = 0
        self.duplicated = 0
        self.reordered = 0
        self.highest = -1
        self._seen = bytearray()
        self._last = -1.0
        self._gaps = array("d")
        # The longest gap so far, and when it ended (the clock of ``arrive``/``tick``).
        self._longest = 0.0
        self.longest_ended = 0.0

    def arrive(self, seq: int, now: float) -> None:
        """Packet ``seq`` arrived at ``now`` (seconds)."""
        seen = self._seen
        if seq < len(seen):
            if seen[seq]:
                self.duplicated += 1
                return
        else:
            seen.extend(bytes(seq + 1 - len(seen) + 1024))
        seen[seq] = 1
        self.received += 1
        if seq < self.highest:
            self.reordered += 1
        else:
            self.highest = seq
        self.tick(now)

    def tick(self, now: float) -> None:
        """Something arrived at ``now``: only the gap is recorded."""
        if self._last >= 0:
            gap = now - self._last
            if gap > self._longest:
                self._longest = gap
                self.longest_ended = now
            self._gaps.append(gap)
        self._last = now

    def gaps(self) -> array[float]:
        return self._gaps

    def max_gap_ms(self) -> float:
        return self._longest * 1000


def percentile_ms(gaps: list[float], fraction: float) -> float:
    """The ``fraction`` quantile (nearest rank) of gaps in seconds, in milliseconds."""
    if not gaps:
        return 0.0
    ordered = sorted(gaps)
    rank = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[rank] * 1000


@dataclass
class UdpReport:
    streams: int
    sent: int
    received: int
    lost: int
    duplicated: int
    reordered: int
    rejected: int
    max_gap_ms: float
    p99_gap_ms: float
    # Datagrams the kernel dropped because the tool's own sockets' buffers were full:
    # the instrument, not the gateway, lost them.
    rcvbuf_drops: int = 0
    # When the longest gap ended (time.monotonic, machine-wide), to place it in a run.
    max_gap_ended: float = 0.0
    # The tool's longest pause between two sends while sending (its own stalls).
    max_send_gap_ms: float = 0.0

    @classmethod
    def of(cls, stats: list[GapStats], sent: list[int]) -> UdpReport:
        gaps = [g for s in stats for g in s.gaps()]
        received = sum(s.received for s in stats)
        longest = max(stats, key=lambda s: s.max_gap_ms(), default=None)
        return cls(
            streams=len(stats),
            sent=sum(sent),
            received=received,
            lost=sum(sent) - received,
            duplicated=sum(s.duplicated for s in stats),
            reordered=sum(s.reordered for s in stats),
            rejected=0,
            max_gap_ms=longest.max_gap_ms() if longest else 0.0,
            p99_gap_ms=percentile_ms(gaps, 0.99),
            max_gap_ended=longest.longest_ended if longest else 0.0,
        )


@dataclass
class TcpReport:
    connections: int
    bytes_sent: int
    bytes_received: int
    byte_exact: bool
    resets: int
    max_gap_ms: float


@dataclass
class TrafficReport:
    duration_s: float
    rate_pps: float
    udp: UdpReport
    tcp: TcpReport

    @property
    def achieved_pps(self) -> float:
        return self.udp.sent / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def clean(self) -> bool:
        """Nothing lost, duplicated, corrupted or reset."""
        return (
            self.udp.lost == 0
            and self.udp.duplicated == 0
            and self.udp.rejected == 0
            and self.tcp.byte_exact
            and self.tcp.resets == 0
        )

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["achieved_pps"] = round(self.achieved_pps, 1)
        out["clean"] = self.clean
        return out

    def table(self) -> str:
        u, t = self.udp, self.tcp
        return "\n".join(
            [
                f"duration {self.duration_s:.2f}s  target {self.rate_pps:.0f} pps  "
                f"achieved {self.achieved_pps:.0f} pps",
                f"{'':4} {'sent':>10} {'received':>10} {'lost':>7} {'dup':>6} {'reord':>6} "
                f"{'max gap ms':>11} {'p99 gap ms':>11}",
                f"{'udp':4} {u.sent:>10} {u.received:>10} {u.lost:>7} {u.duplicated:>6} "
                f"{u.reordered:>6} {u.max_gap_ms:>11.2f} {u.p99_gap_ms:>11.2f}",
                f"tcp  {t.connections} connections  sent {t.bytes_sent} B  received "
                f"{t.bytes_received} B  exact {'yes' if t.byte_exact else 'NO'}  "
                f"resets {t.resets}  max gap {t.max_gap_ms:.2f} ms",
                "clean" if self.clean else "PROBLEMS SEEN",
            ]
        )
