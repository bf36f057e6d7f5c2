"""One gateway process: its data plane, its upgrade agent, and its place on the bus.

A process starts either fresh (binding its tunnels and listeners: ``dataplane``) or from
a handoff (adopting the sockets and state of the version before it, checking itself with
``selfcheck``). It serves until it is told to stop or has handed everything to the next
version, and then exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import signal
import threading
import time
from pathlib import Path
from typing import Any

import grpc

import gateway_daemon
from gateway_daemon import dataplane, identity, precheck, selfcheck, soak
from gateway_daemon.agent import Agent
from gateway_daemon.dataplane import DataPlane
from gateway_daemon.errors import HandoffFailed
from gateway_daemon.handoff import child, parent
from gateway_daemon.reporter import Reporter
from gateway_daemon.state import AgentState, CommandState, Outcome, transition
from gateway_daemon.trust import GatewayTrust
from gateway_daemon.tunnels.config import TunnelsConfig
from gateway_daemon.vpn.config import VpnConfig
from gateway_daemon.vpn.supervisor import VpnSupervisor
from hitless import logs, staged, version
from hitless.bus import codec, topology
from hitless.bus.amqp import Consumer, Publisher
from hitless.config import BusConfig, GatewayConfig, HostPort
from hitless.errors import BusError, ConfigError
from hitless.v1 import bus_pb2

log = logs.get(__name__)

# The program a release runs to be a gateway (``hitless.staged``).
PROGRAM = "gateway-daemon"

BUS_READY_TIMEOUT_S = 20.0
# How long a new version waits for the old process to exit before it reports and consumes.
PREDECESSOR_EXIT_TIMEOUT_S = 10.0
# READY to CUTOVER: the old process only parks its loop and encodes the final state.
CUTOVER_TIMEOUT_S = 10.0
# Beyond that deadline, for the data plane to apply the final state and serve.
PAUSE_MARGIN_S = 2.0


DEFAULT_DEADLINES = parent.Deadlines()


def config_to_context(
    config: GatewayConfig,
    deadlines: parent.Deadlines = DEFAULT_DEADLINES,
    vpn: VpnConfig | None = None,
) -> dict[str, Any]:
    return {
        "vpn_listen": str(vpn.listen) if vpn else None,
        "vpn_keepalive_timeout_s": vpn.keepalive_timeout_s if vpn else None,
        "gateway_id": config.gateway_id,
        "controller": str(config.controller),
        "amqp_url": config.bus.url,
        "amqp_passive": config.bus.passive,
        "amqp_ca_cert": str(config.bus.ca_cert) if config.bus.ca_cert else None,
        "state_dir": str(config.state_dir),
        "listen": [str(a) for a in config.listen],
        "heartbeat_interval_s": config.heartbeat_interval_s,
        "ha_peer": config.ha_peer,
        "handoff_ready_s": deadlines.ready_s,
    }


def config_from_context(context: dict[str, Any]) -> GatewayConfig:
    return GatewayConfig(
        gateway_id=context["gateway_id"],
        controller=HostPort.parse(context["controller"]),
        bus=BusConfig(
            context["amqp_url"],
            passive=bool(context.get("amqp_passive", False)),
            ca_cert=Path(context["amqp_ca_cert"]) if context.get("amqp_ca_cert") else None,
        ),
        state_dir=Path(context["state_dir"]),
        listen=tuple(HostPort.parse(a) for a in context["listen"]),
        heartbeat_interval_s=float(context["heartbeat_interval_s"]),
        ha_peer=str(context.get("ha_peer") or ""),
    )


def vpn_from_context(context: dict[str, Any]) -> VpnConfig | None:
    """The VPN service the gateway was started with, kept across upgrades."""
    if not context.get("vpn_listen"):
        return None
    return VpnConfig(
        listen=HostPort.parse(context["vpn_listen"]),
        state_dir=Path(context["state_dir"]),
        keepalive_timeout_s=float(context["vpn_keepalive_timeout_s"]),
    )


def deadlines_from_context(context: dict[str, Any]) -> parent.Deadlines:
    """The handoff deadlines the gateway was started with, kept across upgrades."""
    ready_s = context.get("handoff_ready_s")
    return parent.Deadlines(ready_s=float(ready_s)) if ready_s else DEFAULT_DEADLINES


class GatewayDaemon:
    def __init__(
        self,
        config: GatewayConfig,
        tunnels: TunnelsConfig | None = None,
        deadlines: parent.Deadlines = DEFAULT_DEADLINES,
        vpn: VpnConfig | None = None,
    ) -> None:
        self.config = config
        self._vpn_config = vpn
        self.version = version.current()
        self.state = AgentState(config.state_dir)
        self._tunnels = tunnels
        self._deadlines = deadlines
        self._stop = threading.Event()
        self._swapped = False
        self._plane: DataPlane | None = None
        logs.bind_process(gateway_id=config.gateway_id)
        log.info("gateway_starting", gateway_id=config.gateway_id, version=self.version)

    def stop(self) -> None:
        self._stop.set()

    def _greeting(self) -> bytes:
        return f"hitless-gateway {self.config.gateway_id} {self.version}\n".encode()

    def run_fresh(self) -> int:
        plane = DataPlane.serve(self.config.listen, self._tunnels, self._greeting())
        return self._serve(plane, handed_over=None)

    def run_inherited(self, inheritance: child.Inheritance) -> int:
        """Take over from the old process; on any failure before serving, leave it to it."""
        predecessor = os.getppid()  # the old version started this process
        publisher = self._publisher()
        context = inheritance.context
        try:
            command = codec.decode(bus_pb2.UpgradeCommand, context["command"].encode(),
                                   strict=False)  # fmt: skip
            # A hand-back after a failed soak starts the version the gateway ran before.
            rollback: dict[str, Any] | None = context.get("rollback")
            expected = rollback["version"] if rollback else command.target_version
            if self.version != expected:
                raise HandoffFailed(
                    f"this process runs {self.version}, not {expected}: the artifact is not "
                    "the release " + ("to hand back to" if rollback else "the command names")
                )
            plane = dataplane.adopt(
                inheritance.description,
                inheritance.sockets,
                inheritance.snapshot,
                self._greeting(),
            )
            if not publisher.wait_connected(BUS_READY_TIMEOUT_S):
                raise HandoffFailed(f"cannot reach the broker at {self.config.bus.safe_url}")
            selfcheck.run(plane, inheritance.sockets)
            inheritance.say_ready()
            if plane.tunnels is not None:
                plane.tunnels.add_marks(inheritance.marks)
            # The data plane's own loop thread waits for CUTOVER and serves at once.
            deadline = time.monotonic() + CUTOVER_TIMEOUT_S
            plane.start_from(
                lambda: inheritance.cutover(deadline), CUTOVER_TIMEOUT_S + PAUSE_MARGIN_S
            )
        except Exception as exc:
            log.error("takeover_failed", error=str(exc))
            inheritance.abort(f"the new version could not take over: {exc}")
            for sock in inheritance.sockets:
                sock.close()
            publisher.close()
            return 1
        inheritance.started()
        if rollback:
            # The soaking version handed back: this one ends the command, ROLLED_BACK.
            outcome = Outcome(
                transition(CommandState.SOAKING, CommandState.ROLLED_BACK),
                context["from_version"], self.version, rollback["reason"],
            )  # fmt: skip
            self.state.record_outcome(command.command_id, outcome)
            self._restore_release(rollback.get("release"))
            return self._serve(
                plane, handed_over=(command, outcome), publisher=publisher,
                predecessor=predecessor,
            )  # fmt: skip
        if command.soak_seconds > 0:
            # Promoted only once its soak passes (``_soak``): until then a restart runs
            # the release before, and a redelivered command hears SOAKING.
            state = transition(CommandState.SWAPPING, CommandState.SOAKING)
            outcome = Outcome(state, self.version, context["from_version"])
            self.state.record_outcome(command.command_id, outcome)
            return self._serve(
                plane, handed_over=(command, outcome), publisher=publisher,
                predecessor=predecessor, soaking=context,
            )  # fmt: skip
        # The process that handed over reported SWAPPING; this one ends the command.
        state = transition(CommandState.SWAPPING, CommandState.SUCCEEDED)
        outcome = Outcome(state, self.version, context["from_version"])
        self.state.record_outcome(command.command_id, outcome)
        self.state.set_current_release(
            self.version, Path(context["artifact"]), command.artifact_sha256
        )
        return self._serve(
            plane, handed_over=(command, outcome), publisher=publisher, predecessor=predecessor
        )

    def _credentials(self) -> grpc.ChannelCredentials:
        """The gateway's client certificate for the controller's gateway port."""
        found = identity.load(self.config.state_dir)
        if found is None:
            raise ConfigError(
                f"gateway {self.config.gateway_id} is not enrolled: run `gateway-daemon "
                "enroll` (or `run --enroll-code CODE --ca-cert FILE`) with a code from "
                "`upgradectl gateways enroll`"
            )
        return found.channel_credentials()

    def _publisher(self) -> Publisher:
        queues = [topology.gateway_queue(self.config.gateway_id), topology.CONTROLLER_REPORTS]
        return Publisher(self.config.bus, queues=queues, name="gateway-publisher").start()

    def _serve(
        self,
        plane: DataPlane,
        handed_over: tuple[bus_pb2.UpgradeCommand, Outcome] | None,
        publisher: Publisher | None = None,
        predecessor: int | None = None,
        soaking: dict[str, Any] | None = None,
    ) -> int:
        self._plane = plane
        publisher = publisher or self._publisher()
        reporter = Reporter(publisher, self.config.gateway_id, self.version)
        vpn: VpnSupervisor | None = None
        agent = Agent(
            self.config, self.version, self.state, reporter, self._swap,
            GatewayTrust(self.config.state_dir, self.config.controller, self._credentials()),
            vpn_sessions=lambda: (vpn.sessions() or 0) if vpn else 0,
            tunnels=lambda: precheck.tunnel_counts(plane),
        )  # fmt: skip
        consumer = Consumer(
            self.config.bus,
            topology.gateway_queue(self.config.gateway_id),
            agent.handle,
            queues=[topology.CONTROLLER_REPORTS],
            name="gateway-commands",
        )
        log.info("gateway_serving", endpoints=plane.endpoints(), pid=os.getpid())
        try:
            if predecessor is not None:
                # Until the old process is gone it may still hold a consumer on this
                # gateway's queue: the next command (sent once this one reports SUCCEEDED)
                # must reach this version, not the one that handed over. It also watches
                # the VPN service until it exits: only one process may restart it.
                _wait_exited(predecessor, PREDECESSOR_EXIT_TIMEOUT_S)
            vpn = self._start_vpn()
            if handed_over is not None:
                command, outcome = handed_over
                if command.restarts_vpn_service:
                    outcome = self._restart_vpn(vpn, command, outcome)
                reporter.outcome(command, outcome)
                if soaking is not None and outcome.state is CommandState.SOAKING:
                    threading.Thread(
                        target=self._soak, args=(plane, reporter, command, outcome, soaking),
                        name="soak", daemon=True,
                    ).start()  # fmt: skip
            self._announce(reporter, plane)
            consumer.start()
            while not self._stop.wait(self.config.heartbeat_interval_s):
                try:
                    reporter.heartbeat(vpn_sessions=(vpn.sessions() or 0) if vpn else 0)
                except BusError as exc:
                    log.warning("heartbeat_failed", error=str(exc))
        finally:
            consumer.stop()
            if vpn is not None:
                vpn.close()  # the service itself runs on, for the next process to attach to
            plane.close()
            publisher.close()
        log.info("gateway_exiting", handed_over=self._swapped)
        return 0

    def _start_vpn(self) -> VpnSupervisor | None:
        if self._vpn_config is None:
            return None
        vpn = VpnSupervisor(self._vpn_config, self.config.gateway_id)
        vpn.start()
        return vpn

    def _restart_vpn(
        self, vpn: VpnSupervisor | None, command: bus_pb2.UpgradeCommand, outcome: Outcome
    ) -> Outcome:
        """The release restarts the VPN service: this version's replaces the running one
        now that this version serves, and the count of dropped sessions is kept with the
        outcome (a redelivered command reports it again)."""
        if vpn is None:
            log.info("vpn_restart_skipped", reason="this gateway runs no VPN service")
            return outcome
        dropped = vpn.restart()
        outcome = dataclasses.replace(outcome, vpn_sessions_dropped=dropped)
        self.state.record_outcome(command.command_id, outcome)
        return outcome

    def _announce(self, reporter: Reporter, plane: DataPlane) -> None:
        try:
            reporter.hello(
                plane.endpoints(), self.config.heartbeat_interval_s, ha_peer=self.config.ha_peer
            )
        except BusError as exc:
            log.warning("hello_failed", error=str(exc))

    def _soak(
        self,
        plane: DataPlane,
        reporter: Reporter,
        command: bus_pb2.UpgradeCommand,
        soaking: Outcome,
        context: dict[str, Any],
    ) -> None:
        """Watch the data plane for the command's soak (``soak.watch``), then end the
        command: SUCCEEDED (and this release recorded as the one to run), or, when its
        health fell, hand back to the version before (``_hand_back``)."""
        before = context.get("health_before") or {}
        share = soak.drop_share(int(before.get("received", 0)), int(before.get("dropped", 0)))

        def progress(health: str) -> None:
            reporter.status(
                command, CommandState.SOAKING, from_version=soaking.from_version,
                to_version=self.version, health=health, required=False,
            )  # fmt: skip

        try:
            verdict = soak.watch(plane, command.soak_seconds, share, progress, self._stop)
            if verdict is None:
                return  # stopping: the next process answers a redelivered command
            if verdict.passed:
                log.info("soak_passed", health=verdict.health)
                outcome = dataclasses.replace(
                    soaking, state=transition(CommandState.SOAKING, CommandState.SUCCEEDED)
                )
                self.state.record_outcome(command.command_id, outcome)
                self.state.set_current_release(
                    self.version, Path(context["artifact"]), command.artifact_sha256
                )
                reporter.outcome(command, outcome, health=verdict.health)
                return
            log.warning("soak_failed", reason=verdict.reason, health=verdict.health)
            self._hand_back(reporter, command, soaking, context, verdict)
        except Exception as exc:  # a soak that cannot finish must still end the command
            log.exception("soak_error", error=str(exc))
            failed = dataclasses.replace(
                soaking, state=CommandState.FAILED, error=f"the soak could not finish: {exc}"
            )
            self.state.record_outcome(command.command_id, failed)
            with contextlib.suppress(BusError):
                reporter.outcome(command, failed)

    def _hand_back(
        self,
        reporter: Reporter,
        command: bus_pb2.UpgradeCommand,
        soaking: Outcome,
        context: dict[str, Any],
        verdict: soak.Verdict,
    ) -> None:
        """Hand the data plane back, hitlessly, to the version that ran before (run as it
        ran itself: ``restart_argv``, from ``staged.own_argv``); that process reports
        ROLLED_BACK with what fell. When it cannot take over, this version goes on serving
        and reports FAILED with both reasons."""
        reason = f"soak: {verdict.reason} ({verdict.health})"
        restart: list[str] | None = context.get("restart_argv")
        try:
            if not restart:
                raise HandoffFailed("the version before did not say how to start it again")
            back = {
                **config_to_context(self.config, self._deadlines, self._vpn_config),
                "command": codec.encode(command).decode(),
                "from_version": self.version,
                "artifact": "",
                "rollback": {
                    "version": soaking.from_version,
                    "reason": reason,
                    "release": context.get("release"),
                },
            }

            self._hand_off(restart, back)
        except HandoffFailed as exc:
            log.error("hand_back_failed", reason=reason, error=str(exc))
            failed = dataclasses.replace(
                soaking,
                state=transition(CommandState.SOAKING, CommandState.FAILED),
                error=f"{reason}; handing back to {soaking.from_version} failed: {exc}; "
                f"this gateway runs {self.version}",
            )
            self.state.record_outcome(command.command_id, failed)
            self.state.set_current_release(
                self.version, Path(context["artifact"]), command.artifact_sha256
            )
            reporter.outcome(command, failed, health=verdict.health)
            return
        log.info("handed_back", version=soaking.from_version, reason=reason)
        self._swapped = True
        self._stop.set()

    def _hand_off(self, program: list[str], context: dict[str, Any]) -> None:
        """Hand the data plane to ``program`` (the argv up to its ``run`` subcommand)
        started as this gateway with ``context``; return once it serves. Raises
        HandoffFailed (``parent.hand_off``) with this process still serving."""
        assert self._plane is not None

        def argv_for(control_fd: int) -> list[str]:
            return [
                *program, "run",
                "--id", self.config.gateway_id,
                "--state-dir", str(self.config.state_dir),
                "--handoff-fd", str(control_fd),
            ]  # fmt: skip

        parent.hand_off(self._plane, argv_for, context, deadlines=self._deadlines)

    def _restore_release(self, release: dict[str, Any] | None) -> None:
        """After a hand-back: record the release this process runs as the one to run
        again (None: the installed package)."""
        if release:
            self.state.set_current_release(
                release["version"], Path(release["artifact"]), release["sha256"]
            )
        else:
            self.state.clear_current_release()

    def _swap(self, command: bus_pb2.UpgradeCommand, artifact: Path) -> None:
        """Hand the data plane to ``artifact``'s version; return once it serves."""
        assert self._plane is not None
        context = {
            **config_to_context(self.config, self._deadlines, self._vpn_config),
            "command": codec.encode(command).decode(),
            "from_version": self.version,
            "artifact": str(artifact),
            # What a soak that fails hands back to: how to run this version again (its
            # release file, or the installed package), the release it records, and its
            # counters.
            "restart_argv": staged.own_argv(gateway_daemon, PROGRAM),
            "release": _release_of(self.state),
            "health_before": soak.sample(self._plane).to_context(),
        }

        self._hand_off(staged.release_argv(artifact, PROGRAM), context)
        self._swapped = True
        self._stop.set()


def _release_of(state: AgentState) -> dict[str, str | None] | None:
    """The staged release this process runs (version, file, sha256), for a hand-back to
    record as current again; None when it runs the installed package."""
    try:
        current = state.current_release()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if current is None or current[0] != version.current():
        return None
    name, artifact, sha256 = current
    return {"version": name, "artifact": str(artifact), "sha256": sha256}


def _wait_exited(pid: int, timeout_s: float) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if not select.select([fd], [], [], timeout_s)[0]:
            log.warning("predecessor_still_running", pid=pid, waited_s=timeout_s)
    finally:
        os.close(fd)


def exec_current_release(state: AgentState, argv: list[str]) -> None:
    """A daemon started from the installed package runs the release staged by its last
    upgrade instead, so a restart does not silently downgrade the gateway. The file is
    hashed first (``hitless.staged.check``): one altered on disk since it was verified is
    not run, and the installed package starts instead."""
    try:
        current = state.current_release()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.error("staged_release_refused", state=str(state.path), reason=str(exc))
        return
    if current is None:
        return
    staged_version, artifact, sha256 = current
    if staged_version == version.current() or not artifact.is_file():
        return
    staged.exec_release(staged_version, artifact, sha256, PROGRAM, argv)


def install_signal_handlers(daemon: GatewayDaemon) -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: daemon.stop())
