"""Upgrading a real gateway process the way the controller does, without the controller:
the product's artifact service (``ArtifactsService`` over an ``ArtifactStore`` and the
controller's TUF repository, ``controller_svc.signing.Trust``) serves the releases and
their signed metadata over gRPC, upgrade commands signed with the command key go straight
onto the gateway's queue, and the gateway's status reports (and refusals) are read from
the controller's report queue. The release manager's keys are ``keys``; gateways take
``trust_root`` as their ``--trust-root``.

Like the controller's gateway port, the artifact service speaks mutual TLS with a CA of its
own (``hitless.pki``): each gateway is given the identity enrollment would give it (its
key, a certificate from that CA, the CA and this port) before it starts
(``provision``).

The gateway side is entirely real: its agent takes the command, downloads, verifies,
stages, and hands its data plane to the new version (``daemon._swap`` → ``hand_off``).
Also used by ``bench/hitless.py``.
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc

from controller_svc.server import ArtifactsService, add_artifacts
from controller_svc.signing import Trust
from controller_svc.store import ArtifactStore
from gateway_daemon import identity
from hitless.bus import codec, topology
from hitless.bus.amqp import Consumer, Delivery, Publisher
from hitless.config import BusConfig
from hitless.trust import keys, release
from hitless.v1 import bus_pb2, common_pb2
from tests.support import certificates

FINAL_STATES = frozenset({"SUCCEEDED", "ROLLED_BACK", "FAILED", "UNREACHABLE"})
CHUNK = 256 * 1024


class GatewayUpgrades:
    """Serves releases and sends upgrade commands to gateways on one broker vhost."""

    def __init__(self, amqp_url: str, store_dir: Path) -> None:
        self.bus = BusConfig(amqp_url)
        self._store = ArtifactStore(store_dir)
        self.keys = keys.init(store_dir.with_name(store_dir.name + "-keys"))
        self.trust = Trust(
            store_dir.with_name(store_dir.name + "-tuf"),
            self.keys.root_json.read_bytes(),
            self.keys.online,
        )
        self.ca = certificates.certificate_authority(store_dir.with_name(store_dir.name + "-pki"))
        self._server = grpc.server(futures.ThreadPoolExecutor(4))
        add_artifacts(ArtifactsService(self._store, self.trust.repository), self._server)
        self.port = self._server.add_secure_port(
            "127.0.0.1:0", self.ca.server_credentials(require_client_certificate=True)
        )
        self._server.start()
        self._reports: list[bus_pb2.StatusReport] = []
        self.refusals: list[bus_pb2.CommandRefused] = []
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
    def trust_root(self) -> Path:
        """What to pass a gateway as ``--trust-root``."""
        return self.keys.root_json

    @property
    def controller(self) -> str:
        """What to pass a gateway as ``--controller`` (downloads come from here)."""
        return f"127.0.0.1:{self.port}"

    def provision(self, gateway_id: str, state_dir: Path) -> list[str]:
        """Give gateway ``gateway_id`` (state directory ``state_dir``) the identity that
        enrollment would: a fresh key, a client certificate for it from this server's CA,
        the CA and this port (``gateway_daemon.identity``). Returns the ``gateway-daemon
        run`` flags that make it download from here and trust ``trust_root``."""
        identity.save(state_dir, certificates.gateway_identity(self.ca, gateway_id, self.port))
        return ["--controller", self.controller, "--trust-root", str(self.trust_root)]

    def close(self) -> None:
        self._consumer.stop()
        self._publisher.close()
        self._server.stop(0).wait()

    def upgrade(
        self, gateway_id: str, version: str, artifact: Path, timeout: float = 30.0
    ) -> bus_pb2.StatusReport:
        """Sign ``artifact`` (stamped ``version``) as that release, and command
        ``gateway_id`` to run it; return its final status report (SUCCEEDED, ROLLED_BACK,
        FAILED, UNREACHABLE)."""
        self.sign(version, artifact)
        command = self.command(gateway_id, version, artifact)
        self.send(command, self.signed_headers(command))
        return self.wait_final(command.command_id, gateway_id, timeout)

    def sign(self, version: str, artifact: Path) -> None:
        """Store ``artifact`` and publish targets metadata, signed with the targets key,
        that lists it as release ``version`` (unless the newest already does)."""
        self.store(artifact)
        current, _ = self.trust.targets()
        name = release.target_name(version)
        newest = self.trust.repository.targets()
        listed = newest.targets.get(name) if newest is not None else None
        digest = hashlib.sha256(artifact.read_bytes()).hexdigest()
        if listed is not None and listed.hashes.get("sha256") == digest:
            return
        signed = release.sign_targets(current or None, self.keys.dir, add={name: artifact})
        self.trust.accept(signed)

    def yank(self, version: str) -> None:
        """Publish targets metadata without release ``version`` (upgradectl releases yank)."""
        current, _ = self.trust.targets()
        self.trust.accept(release.yank(current, self.keys.dir, [release.target_name(version)]))

    def store(self, artifact: Path) -> tuple[str, int]:
        """Put ``artifact`` in the artifact store; its sha256 and size."""
        data = artifact.read_bytes()
        stored = self._store.put(data[i : i + CHUNK] for i in range(0, len(data), CHUNK))
        return stored.sha256, stored.size

    def command(
        self, gateway_id: str, version: str, artifact: Path, *, deadline_s: float = 600
    ) -> bus_pb2.UpgradeCommand:
        """An UpgradeCommand for ``gateway_id`` to run ``artifact`` as ``version``."""
        sha256, size = self.store(artifact)
        command = bus_pb2.UpgradeCommand(
            command_id=str(uuid.uuid4()),
            job_id=str(uuid.uuid4()),
            gateway_id=gateway_id,
            target_version=version,
            artifact_sha256=sha256,
            artifact_size=size,
        )
        command.deadline.FromDatetime(datetime.now(UTC) + timedelta(seconds=deadline_s))
        return command

    def signed_headers(
        self,
        command: bus_pb2.UpgradeCommand,
        *,
        allow_downgrade: bool = True,
        soak_seconds: int = 0,
    ) -> dict[str, Any]:
        """The headers a controller sends ``command`` with: signed, issued now, going
        back to an older version allowed by default (the tests swap A -> B -> A), with
        ``soak_seconds`` of soak after the swap."""
        return self.trust.command_headers(
            command, datetime.now(UTC), allow_downgrade=allow_downgrade,
            soak_seconds=soak_seconds,
        )  # fmt: skip

    def send(self, command: bus_pb2.UpgradeCommand, headers: dict[str, Any], to: str = "") -> None:
        """Publish ``command`` with ``headers``, as given, on the queue of gateway ``to``
        (default: the gateway the command names)."""
        gateway_id = to or command.gateway_id
        self._publisher.declare([topology.gateway_queue(gateway_id)])
        self._publisher.publish(
            topology.COMMANDS,
            topology.command_key(gateway_id),
            command,
            message_id=command.command_id,
            headers=headers,
        )

    def wait_final(
        self, command_id: str, gateway_id: str = "", timeout: float = 30.0
    ) -> bus_pb2.StatusReport:
        """The final status report for ``command_id``, waiting up to ``timeout`` s."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._final(command_id), timeout):
                seen = [state_name(r) for r in self._reports if r.command_id == command_id]
                raise AssertionError(
                    f"no final report from {gateway_id or 'the gateway'} for command "
                    f"{command_id} within {timeout}s; reports so far: {seen}"
                )
            final = self._final(command_id)
        assert final is not None
        return final

    def wait_refusal(self, count: int, timeout: float = 30.0) -> list[bus_pb2.CommandRefused]:
        """Once ``count`` refusals have been reported (within ``timeout`` s), all of them."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.refusals) >= count, timeout):
                raise AssertionError(
                    f"{len(self.refusals)} refusals reported within {timeout}s, "
                    f"expected {count}: {[r.kind for r in self.refusals]}"
                )
            return list(self.refusals)

    def statuses(self, command_id: str) -> list[str]:
        """Every state reported for ``command_id`` so far."""
        with self._changed:
            return [state_name(r) for r in self._reports if r.command_id == command_id]

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
        if delivery.routing_key.endswith(f".{topology.REFUSED}"):
            refused = codec.decode(bus_pb2.CommandRefused, delivery.body)
            with self._changed:
                self.refusals.append(refused)
                self._changed.notify_all()
            return
        if not delivery.routing_key.endswith(f".{topology.STATUS}"):
            return
        report = codec.decode(bus_pb2.StatusReport, delivery.body)
        with self._changed:
            self._reports.append(report)
            self._changed.notify_all()


def state_name(report: bus_pb2.StatusReport) -> str:
    return common_pb2.GatewayJobState.Name(report.state).removeprefix("GATEWAY_JOB_STATE_")
