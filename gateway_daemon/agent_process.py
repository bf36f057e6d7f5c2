"""The gateway's agent process: its upgrade agent and its place on the bus.

The forwarding process (``forwarding``) starts it, and starts it again whenever it exits
or dies: commands, downloads, verification, reports, heartbeats and the VPN service's
supervision run here, never beside the data plane. It reaches the data plane only
through the control socket (``control.PlaneClient``): its counters, and "hand the data
plane to this release". Once the data plane is handed over this process exits, and the
new version's forwarding process starts the new version's agent, which records and
reports how the command ended. When the forwarding process goes (the control socket
closes), this process stops too: a command it was running is not acked, so the broker
delivers it again to whichever agent consumes next.

The command handler's thread runs at nice COMMAND_NICE: downloads and verification are
background work beside the data plane, and yield the CPU to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError

import gateway_daemon
from gateway_daemon import control, identity, precheck, soak
from gateway_daemon.agent import Agent
from gateway_daemon.control import Attached, PlaneClient, PlaneGone
from gateway_daemon.errors import GatewayError, HandoffFailed
from gateway_daemon.forwarding import PROGRAM
from gateway_daemon.handoff import parent
from gateway_daemon.reporter import Reporter
from gateway_daemon.state import AgentState, CommandState, Outcome, transition
from gateway_daemon.trust import GatewayTrust
from gateway_daemon.vpn.config import VpnConfig
from gateway_daemon.vpn.supervisor import VpnSupervisor
from hitless import logs, staged, version
from hitless.bus import codec, topology
from hitless.bus.amqp import IDLE_PUMP_S, Consumer, Delivery, Publisher
from hitless.config import BusConfig, GatewayConfig, HostPort
from hitless.errors import BusError, ConfigError
from hitless.v1 import bus_pb2

log = logs.get(__name__)

# After a handoff, how long the agent may take to reach the broker when its forwarding
# process does not say by when (it says, from its own deadline for the agent).
BUS_READY_TIMEOUT_S = 20.0
# How long a new version waits for the old forwarding process to exit (it waits for its
# agent first, ``forwarding.AGENT_EXIT_S``) before it reports and consumes.
PREDECESSOR_EXIT_TIMEOUT_S = 15.0
# The nice value of the thread that runs commands (downloads, verification). Raising
# nice needs no privilege; the VPN service and the agent's other threads keep theirs.
COMMAND_NICE = 10
# How long a stopping agent waits for the broker to confirm its last heartbeat (marked
# stopping); the gateway stops either way.
FAREWELL_TIMEOUT_S = 2.0
# How often a wait that a stop must cut short looks at the stop, seconds.
STOP_POLL_S = 0.1


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


class AgentProcess:
    """The agent of one gateway, beside the forwarding process ``plane`` reaches.
    ``takeover``: it starts after a handoff, and must reach the broker by ``ready_by``
    (time.monotonic; None: ``BUS_READY_TIMEOUT_S`` from its start) before the new
    version may say ready."""

    def __init__(
        self,
        config: GatewayConfig,
        plane: PlaneClient,
        *,
        deadlines: parent.Deadlines = DEFAULT_DEADLINES,
        vpn: VpnConfig | None = None,
        takeover: bool = False,
        ready_by: float | None = None,
    ) -> None:
        self.config = config
        self._plane = plane
        self._vpn_config = vpn
        self._takeover = takeover
        self._ready_by = time.monotonic() + BUS_READY_TIMEOUT_S if ready_by is None else ready_by
        self.version = version.current()
        self.state = AgentState(config.state_dir)
        self._deadlines = deadlines
        self._stop = threading.Event()
        self._farewell = False
        self._swapped = False
        logs.bind_process(gateway_id=config.gateway_id, process="agent")

    def stop(self, *, farewell: bool = False) -> None:
        """Stop serving; ``farewell``: the gateway itself stops (not a handover), so the
        agent tells the controller before it goes."""
        self._farewell = self._farewell or farewell
        self._stop.set()

    def run(self) -> int:
        """Attach to the forwarding process and serve until stopped, handed over, or the
        forwarding process is gone; the exit code."""
        self._plane.start(on_gone=self.stop)
        publisher = self._publisher()
        tried_from = time.monotonic()
        if self._takeover and not publisher.wait_connected(max(0.0, self._ready_by - tried_from)):
            reason = (
                f"cannot reach the broker at {self.config.bus.safe_url} in "
                f"{time.monotonic() - tried_from:.0f} s, the time its forwarding process gave it"
            )
            log.error("agent_not_ready", reason=reason)
            self._plane.fail(reason)
            publisher.close()
            return 1
        try:
            attached = self._plane.attach()
        except PlaneGone:
            publisher.close()
            return 0
        if attached.unanswered:
            self._record_unanswered(attached.unanswered)
        handed_over, soaking = None, None
        if attached.handover is not None:
            try:
                handed_over, soaking = self._record_handover(attached.handover)
            except (KeyError, TypeError, ValueError, DecodeError) as exc:
                # Nothing can be done with it; a restarted agent must not retry forever.
                log.error("handover_unreadable", error=str(exc))
                self._said_recorded()
        return self._serve(attached, handed_over, publisher, soaking)

    def _said_recorded(self) -> None:
        """Tell the forwarding process the handover is dealt with (reported, or its soak
        ended): an agent started after this gets none."""
        try:
            self._plane.recorded()
        except (GatewayError, TimeoutError) as exc:
            log.warning("handover_not_cleared", error=str(exc))

    def _record_unanswered(self, unanswered: dict[str, Any]) -> None:
        """A handoff the agent before this one asked for failed after it died: record how
        the command ended, so that its redelivery is answered from the record and the
        upgrade is not run a second time."""
        command_id = str(unanswered.get("command_id", ""))
        if not command_id or self.state.outcome(command_id) is not None:
            return
        target = str(unanswered.get("target_version", ""))
        state = (
            CommandState.ROLLED_BACK
            if unanswered.get("kind") == control.ROLLED_BACK
            else CommandState.FAILED
        )
        error = f"handoff to {target} failed: {unanswered.get('error', 'no reason given')}"
        self.state.record_outcome(command_id, Outcome(state, target, self.version, error))
        log.warning("handoff_outcome_recorded_late", command_id=command_id, state=state)

    def _record_handover(
        self, context: dict[str, Any]
    ) -> tuple[tuple[bus_pb2.UpgradeCommand, Outcome], dict[str, Any] | None]:
        """Record how the command that brought this version ended: ROLLED_BACK after a
        hand-back, SOAKING when its job has a soak, else SUCCEEDED (and this release as
        the one to run). The command and outcome, and the context to soak with, if any.
        An agent restarted before the handover was cleared finds the outcome recorded
        and reports that (a soak starts over)."""
        command = codec.decode(bus_pb2.UpgradeCommand, context["command"].encode(),
                               strict=False)  # fmt: skip
        rollback: dict[str, Any] | None = context.get("rollback")
        recorded = self.state.outcome(command.command_id)
        if recorded is not None and recorded.state is not CommandState.SOAKING:
            return (command, recorded), None
        if recorded is not None and not rollback:
            return (command, recorded), context  # SOAKING: the soak starts over
        if rollback:
            # The soaking version handed back: this one ends the command, ROLLED_BACK.
            outcome = Outcome(
                transition(CommandState.SOAKING, CommandState.ROLLED_BACK),
                context["from_version"], self.version, rollback["reason"],
            )  # fmt: skip
            self.state.record_outcome(command.command_id, outcome)
            self._restore_release(rollback.get("release"))
            return (command, outcome), None
        if command.soak_seconds > 0:
            # Promoted only once its soak passes (``_soak``): until then a restart runs
            # the release before, and a redelivered command hears SOAKING.
            state = transition(CommandState.SWAPPING, CommandState.SOAKING)
            outcome = Outcome(state, self.version, context["from_version"])
            self.state.record_outcome(command.command_id, outcome)
            return (command, outcome), context
        # The process that handed over reported SWAPPING; this one ends the command.
        state = transition(CommandState.SWAPPING, CommandState.SUCCEEDED)
        outcome = Outcome(state, self.version, context["from_version"])
        self.state.record_outcome(command.command_id, outcome)
        self.state.set_current_release(
            self.version, Path(context["artifact"]), command.artifact_sha256
        )
        return (command, outcome), None

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
        attached: Attached,
        handed_over: tuple[bus_pb2.UpgradeCommand, Outcome] | None,
        publisher: Publisher,
        soaking: dict[str, Any] | None = None,
    ) -> int:
        plane = self._plane
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
            lambda delivery: _in_background(agent.handle, delivery),
            queues=[topology.CONTROLLER_REPORTS],
            name="gateway-commands",
            # Idle but for a command now and then: a delivery wakes it at once anyway.
            pump_s=IDLE_PUMP_S,
        )
        log.info("agent_serving", pid=attached.pid, agent_pid=os.getpid())
        try:
            if attached.predecessor is not None:
                # Until the old process is gone it may still hold a consumer on this
                # gateway's queue: the next command (sent once this one reports SUCCEEDED)
                # must reach this version, not the one that handed over. It also watches
                # the VPN service until it exits: only one process may restart it.
                _wait_exited(attached.predecessor, PREDECESSOR_EXIT_TIMEOUT_S, self._stop)
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
                else:
                    self._said_recorded()
            self._announce(reporter, attached)
            consumer.start()
            while not self._stop.wait(self.config.heartbeat_interval_s):
                try:
                    reporter.heartbeat(vpn_sessions=(vpn.sessions() or 0) if vpn else 0)
                except BusError as exc:
                    log.warning("heartbeat_failed", error=str(exc))
            if self._farewell and not self._swapped:
                try:
                    reporter.heartbeat(stopping=True, timeout=FAREWELL_TIMEOUT_S)
                except BusError as exc:
                    log.warning("farewell_failed", error=str(exc))
        finally:
            consumer.stop()
            if vpn is not None:
                vpn.close()  # the service itself runs on, for the next process to attach to
            publisher.close()
        log.info("agent_exiting", handed_over=self._swapped)
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

    def _announce(self, reporter: Reporter, attached: Attached) -> None:
        try:
            reporter.hello(
                attached.endpoints, self.config.heartbeat_interval_s,
                ha_peer=self.config.ha_peer, pid=attached.pid,
            )  # fmt: skip
        except BusError as exc:
            log.warning("hello_failed", error=str(exc))

    def _soak(
        self,
        plane: PlaneClient,
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

        ended = True
        try:
            verdict = soak.watch(plane, command.soak_seconds, share, progress, self._stop)
            if verdict is None:
                # Stopping: the handover stays with the forwarding process, and an agent
                # started next finds the command SOAKING and soaks again.
                ended = False
                return
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
        except PlaneGone:
            # The forwarding process died: whoever serves now (the previous version, if
            # it took over) reports; a soak of this version cannot end.
            ended = False
            log.warning("soak_abandoned", reason="the forwarding process is gone")
        except Exception as exc:  # a soak that cannot finish must still end the command
            log.exception("soak_error", error=str(exc))
            failed = dataclasses.replace(
                soaking, state=CommandState.FAILED, error=f"the soak could not finish: {exc}"
            )
            self.state.record_outcome(command.command_id, failed)
            with contextlib.suppress(BusError):
                reporter.outcome(command, failed)
        finally:
            if ended and not self._swapped:
                self._said_recorded()

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

            self._plane.hand_off(restart, back, command_id="", target_version="")
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
        """Hand the data plane to ``artifact``'s version; return once it serves. Raises
        HandoffFailed (this version serves on), ResumeFailed, or GatewayError
        (``PlaneClient.hand_off``)."""
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

        self._plane.hand_off(
            staged.release_argv(artifact, PROGRAM), context,
            command_id=command.command_id, target_version=command.target_version,
        )  # fmt: skip
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


def _wait_exited(pid: int, timeout_s: float, stop: threading.Event) -> None:
    """Until process ``pid`` has exited, ``timeout_s`` seconds have passed, or ``stop``
    is set (the agent is stopping: it must still have time to say so)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    try:
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("predecessor_still_running", pid=pid, waited_s=timeout_s)
                return
            if select.select([fd], [], [], min(left, STOP_POLL_S))[0]:
                return
    finally:
        os.close(fd)


def install_signal_handlers(daemon: AgentProcess) -> None:
    """SIGTERM and SIGINT: the gateway stops (the forwarding process stopping, or a
    person), so the agent says so to the controller; ``control.RETIRE_SIGNAL``: the
    gateway goes on without this agent (its data plane was handed over), and it says
    nothing."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: daemon.stop(farewell=True))
    signal.signal(control.RETIRE_SIGNAL, lambda *_: daemon.stop())


_background = threading.local()


def _in_background(handle: Callable[[Delivery], None], delivery: Delivery) -> None:
    """``handle(delivery)`` on a thread at nice COMMAND_NICE (set once per thread)."""
    if not getattr(_background, "set", False):
        _background.set = True
        try:
            tid = threading.get_native_id()
            if os.getpriority(os.PRIO_PROCESS, tid) < COMMAND_NICE:
                os.setpriority(os.PRIO_PROCESS, tid, COMMAND_NICE)
        except OSError as exc:
            log.warning("command_thread_priority_unchanged", error=str(exc))
    handle(delivery)
