"""Upgrading a real gateway process the way the controller does, without the controller:
the product's artifact service (``ArtifactsService`` over an ``ArtifactStore``) serves the
releases over gRPC, upgrade commands go straight onto the gateway's queue, and the
gateway's status reports are read from the controller's report queue.

The gateway side is entirely real: its agent takes the command, downloads, verifies,
stages, and hands its data plane to the new version (``daemon._swap`` → ``hand_off``).
Also used by ``bench/hitless.py``.
"""

from __future__ import annotations

import threading
import uuid
from concurrent import futures
from datetime import UTC, datetime
from pathlib import Path

import grpc

from controller_svc.server import ArtifactsService
from controller_svc.store import ArtifactStore
from hitless.bus import codec, topology
from hitless.bus.amqp import Consumer, Delivery, Publisher
from hitless.config import BusConfig
from hitless.v1 import artifacts_pb2_grpc, bus_pb2, common_pb2

FINAL_STATES = frozenset({"SUCCEEDED", "ROLLED_BACK", "FAILED", "UNREACHABLE"})
CHUNK = 256 * 1024


class GatewayUpgrades:
    """Serves releases and sends upgrade commands to gateways on one broker vhost."""

    def __init__(self, amqp_url: str, store_dir: Path) -> None:
        self.bus = BusConfig(amqp_url)
        self._store = ArtifactStore(store_dir)
        self._server = grpc.server(futures.ThreadPoolExecutor(4))
        service = ArtifactsService(self._store)
        artifacts_pb2_grpc.add_ArtifactsServicer_to_server(service, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self._reports: list[bus_pb2.StatusReport] = []
        self._changed = threading.Condition()
        self._publisher = Publisher(
            self.bus, queues=[topology.CONTROLLER_REPORTS], name="test-commands"
        ).start()
        self._consumer = Consumer(
            self.bus, topology.CONTROLLER_REPORTS, self._on_report, name="test-reports"
        ).start()
        if not self._consumer.wait_consuming(20):
            self.close()
            raise AssertionError(f"cannot consume reports on {self.bus.safe_url}")

    @property
    def controller(self) -> str:
        """What to pass a gateway as ``--controller`` (downloads come from here)."""
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._consumer.stop()
        self._publisher.close()
        self._server.stop(0).wait()

    def upgrade(
        self, gateway_id: str, version: str, artifact: Path, timeout: float = 30.0
    ) -> bus_pb2.StatusReport:
        """Command ``gateway_id`` to run ``artifact`` (stamped ``version``); return its final
        status report (SUCCEEDED, ROLLED_BACK, FAILED, UNREACHABLE)."""
        data = artifact.read_bytes()
        stored = self._store.put(data[i : i + CHUNK] for i in range(0, len(data), CHUNK))
        command = bus_pb2.UpgradeCommand(
            command_id=str(uuid.uuid4()),
            job_id=str(uuid.uuid4()),
            gateway_id=gateway_id,
            target_version=version,
            artifact_sha256=stored.sha256,
            artifact_size=stored.size,
        )
        self._publisher.declare([topology.gateway_queue(gateway_id)])
        # As a controller sends it: issued now, going back to an older version allowed
        # (the tests swap A -> B -> A).
        self._publisher.publish(
            topology.COMMANDS,
            topology.command_key(gateway_id),
            command,
            message_id=command.command_id,
            headers={
                topology.ISSUED_AT_HEADER: datetime.now(UTC).isoformat(),
                topology.ALLOW_DOWNGRADE_HEADER: True,
            },
        )
        with self._changed:
            if not self._changed.wait_for(lambda: self._final(command.command_id), timeout):
                seen = [state_name(r) for r in self._reports if r.command_id == command.command_id]
                raise AssertionError(
                    f"no final report from {gateway_id} for the upgrade to {version} within "
                    f"{timeout}s; reports so far: {seen}"
                )
            final = self._final(command.command_id)
        assert final is not None
        return final

    def _final(self, command_id: str) -> bus_pb2.StatusReport | None:
        return next(
            (
                r
                for r in self._reports
                if r.command_id == command_id and state_name(r) in FINAL_STATES
            ),
            None,
        )

    def _on_report(self, delivery: Delivery) -> None:
        if not delivery.routing_key.endswith(f".{topology.STATUS}"):
            return
        report = codec.decode(bus_pb2.StatusReport, delivery.body)
        with self._changed:
            self._reports.append(report)
            self._changed.notify_all()


def state_name(report: bus_pb2.StatusReport) -> str:
    return common_pb2.GatewayJobState.Name(report.state).removeprefix("GATEWAY_JOB_STATE_")
