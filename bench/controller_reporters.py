"""Gateways that exist only as messages, for counting reports exactly.

A real gateway reports progress only while it downloads, and heartbeats every 5 s; these
say hello like a gateway, take their upgrade command from their own queue, and then report
DOWNLOADING with growing ``bytes_done`` at a steady rate for as long as they are told.
Every report has its own ``report_id`` (also its ``message_id``) and is counted as
published only once the broker confirmed it, so "reports published - reports recorded"
is exactly what the controller lost.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from hitless.bus import codec, topology
from hitless.bus.amqp import Publisher
from hitless.config import BusConfig
from hitless.errors import BusError
from hitless.v1 import bus_pb2, common_pb2
from tests.support.rabbit import Management
from tests.support.wait import wait_for

CHUNK = 64 * 1024
TOTAL = 1 << 40  # never reached: the job stays in DOWNLOADING until it is finished
JOIN_S = 30.0


@dataclass(frozen=True)
class Sent:
    """One confirmed report: which gateway, the progress it carried, the phase it was in."""

    gateway_id: str
    bytes_done: int
    phase: str


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


class FakeGateways:
    """Reporting gateways on one publisher; the reporting thread is owned here."""

    def __init__(self, bus: BusConfig, ids: Iterable[str], version: str, rate_per_s: float) -> None:
        self.ids = tuple(ids)
        self.version = version
        self.phase = "warmup"
        self.sent: list[Sent] = []
        self.publish_failures: list[str] = []
        self._interval = 1.0 / (rate_per_s * len(self.ids))
        self._commands: dict[str, bus_pb2.UpgradeCommand] = {}
        self._publisher = Publisher(
            bus, queues=(topology.CONTROLLER_REPORTS,), name="bench-fake-gateways"
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._report, name="bench-reports", daemon=True)

    def open(self, timeout: float) -> None:
        self._publisher.start()
        if not self._publisher.wait_connected(timeout):
            raise RuntimeError(f"the fake gateways could not reach the broker in {timeout:.0f}s")

    def close(self) -> None:
        self.stop()
        self._publisher.close()

    def hello(self) -> None:
        """Announce every fake gateway at ``version`` (as a starting gateway does)."""
        for gid in self.ids:
            hello = bus_pb2.GatewayHello(gateway_id=gid, version=self.version, at=_now())
            self._publisher.publish(
                topology.REPORTS, topology.report_key(gid, topology.HELLO), hello
            )

    def take_commands(self, mgmt: Management, vhost: str, job_id: str, timeout: float) -> None:
        """Read each gateway's upgrade command of ``job_id`` from its queue (left there)."""

        def command(gid: str) -> bus_pb2.UpgradeCommand | None:
            queue = topology.gateway_queue(gid).name
            for message in mgmt.get_messages(vhost, queue, count=10):
                cmd = codec.decode(bus_pb2.UpgradeCommand, str(message["payload"]).encode())
                if cmd.job_id == job_id:
                    return cmd
            return None

        for gid in self.ids:
            self._commands[gid] = wait_for(
                functools.partial(command, gid),
                timeout=timeout,
                what=f"the upgrade command of job {job_id} in {gid}'s queue",
                interval=0.1,
            )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(JOIN_S)
            if self._thread.is_alive():
                raise RuntimeError(f"the fake gateways did not stop reporting in {JOIN_S:.0f}s")

    def finish(self) -> None:
        """Report SUCCEEDED for every fake gateway, which ends the job."""
        for gid, cmd in self._commands.items():
            self._publish(gid, cmd, common_pb2.GATEWAY_JOB_STATE_SUCCEEDED, TOTAL, f"{gid}-done")

    def _report(self) -> None:
        done = dict.fromkeys(self.ids, 0)
        next_at = time.monotonic()
        n = 0
        while not self._stop.is_set():
            gid = self.ids[n % len(self.ids)]
            n += 1
            done[gid] += CHUNK
            phase = self.phase
            try:
                self._publish(
                    gid,
                    self._commands[gid],
                    common_pb2.GATEWAY_JOB_STATE_DOWNLOADING,
                    done[gid],
                    f"{gid}-{done[gid]}",
                )
            except BusError as exc:
                self.publish_failures.append(f"{gid} bytes_done={done[gid]}: {exc}")
            else:
                self.sent.append(Sent(gid, done[gid], phase))
            # A fixed schedule, so a slow confirm is made up for instead of lowering the rate.
            next_at += self._interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _publish(
        self,
        gid: str,
        cmd: bus_pb2.UpgradeCommand,
        state: common_pb2.GatewayJobState,
        bytes_done: int,
        report_id: str,
    ) -> None:
        report = bus_pb2.StatusReport(
            report_id=report_id,
            command_id=cmd.command_id,
            job_id=cmd.job_id,
            gateway_id=gid,
            state=state,
            from_version=self.version,
            to_version=cmd.target_version,
            bytes_done=bytes_done,
            bytes_total=TOTAL,
            at=_now(),
        )
        self._publisher.publish(
            topology.REPORTS,
            topology.report_key(gid, topology.STATUS),
            report,
            message_id=report_id,
            timeout=10,
        )
