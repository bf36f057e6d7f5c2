"""The gateway's forwarding process: its data plane, and nothing else.

    gateway-daemon run               the forwarding process (this module)
    ├── DataPlane                    tunnels and listeners, on their own loop thread
    ├── gateway-daemon agent         a child: commands, downloads, verification, reports,
    │                                the VPN service's supervision (``agent_process``)
    └── <next version> run --handoff-fd N
                                     during an upgrade only: the next version's
                                     forwarding process, taking the data plane over

This process loads no gRPC, no pika and no TUF, and downloads nothing: what can abort,
leak, block on a lock or fill memory runs in the agent. The two talk over a control socket
(``control``). When the agent exits, crashes or is killed, this process starts it again
(after a backoff: ``AGENT_RESTART``) and forwards on; only the first agent of a fresh
start failing before it attached (a configuration error, say) ends the process, with the
agent's exit code.

An upgrade: the agent downloads and verifies the release, then asks this process to hand
the data plane to it (``hand_off``). This process runs the handoff (``handoff.parent``)
on a thread of its own, answers, and once the new version serves waits for its agent to
exit and exits itself. The new version's forwarding process (``take_over``) adopts the
sockets and state, starts its own agent and waits until that agent reaches the broker
(the part of the self-check that needs the network), checks itself (``selfcheck``), says
READY, takes the cutover on its data plane's loop thread, and then tells its agent what
the handoff brought: the agent records and reports the outcome. A new version whose
agent cannot start or reach the broker by ``AGENT_READY_MARGIN_S`` before the old
process's ready deadline is not ready: it says why, and the old one serves on
(ROLLED_BACK).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import gateway_daemon
from gateway_daemon import control, dataplane, selfcheck
from gateway_daemon.dataplane import DataPlane
from gateway_daemon.errors import HandoffFailed, HandoffTimeout
from gateway_daemon.handoff import child, parent, priority
from gateway_daemon.handoff.parent import Deadlines, ResumeFailed
from gateway_daemon.state import AgentState
from gateway_daemon.tunnels.config import TunnelsConfig
from hitless import logs, staged, version
from hitless.backoff import Backoff
from hitless.config import HostPort

log = logs.get(__name__)

# The program a release runs to be a gateway (``hitless.staged``).
PROGRAM: Final = "gateway-daemon"
# After the data plane was handed over, or when the gateway stops: how long the agent
# has to exit on its own (SIGTERM or ``control.RETIRE_SIGNAL``) before it is killed, seconds.
AGENT_EXIT_S: Final = 10.0
# Between starts of an agent that keeps exiting; reset once one has run this long.
AGENT_RESTART: Final = Backoff(initial_s=0.5, max_s=30.0)
AGENT_STABLE_S: Final = 60.0
# After a handoff, the new agent must start and reach the broker this long before the
# old process's ready deadline (--handoff-timeout from the spawn), or this version is
# not ready: the rest is for the self-check and for telling the old process why, before
# its own deadline cuts the handoff with a bare timeout. At most a tenth of a short
# deadline.
AGENT_READY_MARGIN_S: Final = 3.0
# How much sooner than its forwarding process the agent gives up, so that its reason
# arrives before the forwarding process stops waiting for it.
AGENT_REASON_MARGIN_S: Final = 0.5
# The same when the old process does not say when its deadline is (an older release).
AGENT_READY_S: Final = 20.0
# READY to CUTOVER: the old process only parks its loop and encodes the final state.
CUTOVER_TIMEOUT_S: Final = 10.0
# While a new version waits for its agent to attach, how often it looks whether the old
# process has restored its priority (then it restores its agent's too). A wake-up costs
# CPU that the versions starting beside it need: at 50 ms a waiting process spent about
# 2.6 ms of CPU a second on them, at 250 ms 0.5 ms. An agent restored up to this late
# only runs that much longer at idle priority.
ATTACH_POLL_S: Final = 0.25
# Beyond that deadline, for the data plane to apply the final state and serve.
PAUSE_MARGIN_S: Final = 2.0


def greeting(gateway_id: str) -> bytes:
    """What the plain ``--listen`` listeners say to each connection."""
    return f"hitless-gateway {gateway_id} {version.current()}\n".encode()


def agent_deadline(
    ready_by: float | None, ready_s: float | None = None, now: float | None = None
) -> float:
    """When the new agent must have reached the broker after a handoff (time.monotonic):
    ``AGENT_READY_MARGIN_S`` (at most a tenth of ``ready_s``, the old process's whole
    deadline in seconds) before ``ready_by``, the old process's ready deadline; from
    ``now`` plus ``AGENT_READY_S`` when the old process did not say (None). Raises
    HandoffTimeout when that time has passed already: the new version's own start took
    what the deadline left."""
    now = time.monotonic() if now is None else now
    if ready_by is None:
        return now + AGENT_READY_S
    margin = AGENT_READY_MARGIN_S if ready_s is None else min(AGENT_READY_MARGIN_S, ready_s / 10)
    if ready_by - margin <= now:
        raise HandoffTimeout(
            "the new version took so long to start that no time was left for its agent "
            f"before the old process's deadline ({ready_s or 0:g} s from the spawn)"
        )
    return ready_by - margin


def deadlines_from_context(context: dict[str, Any]) -> Deadlines:
    """The handoff deadlines the gateway was started with, kept across upgrades."""
    ready_s = context.get("handoff_ready_s")
    return Deadlines(ready_s=float(ready_s)) if ready_s else Deadlines()


@dataclass
class _Agent:
    """The running agent: its process, this end of its control socket, a pidfd on it."""

    proc: subprocess.Popen[bytes]
    sock: socket.socket
    pidfd: int
    started: float
    attached: bool = False
    closed: bool = False  # its end of the control socket is closed

    def close(self) -> None:
        self.sock.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


class Forwarding:
    """One forwarding process: ``plane`` and the agent it starts and restarts.

    ``start`` is the agent's start message (``control``): the ``run`` arguments of a
    fresh start, or the context a handoff brought. ``handover`` is that context too,
    given to the agent (with the ``predecessor`` pid that handed over) until it says it
    recorded it."""

    def __init__(
        self,
        plane: DataPlane,
        *,
        gateway_id: str,
        state_dir: Path,
        deadlines: Deadlines,
        start: dict[str, Any],
        handover: dict[str, Any] | None = None,
        predecessor: int | None = None,
    ) -> None:
        self._plane = plane
        self._gateway_id = gateway_id
        self._state_dir = state_dir
        self._deadlines = deadlines
        self._start = {"op": "start", "run_args": None, "context": None, **start}
        self._handover = handover
        self._predecessor = predecessor
        self._agent: _Agent | None = None
        self._agents_started = 0
        self._failures = 0
        self._restart_at: float | None = None
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._handed_over = threading.Event()
        self._handoff: threading.Thread | None = None
        # A failed hand_off whose agent died before the answer: the next agent records it.
        self._unanswered: dict[str, Any] | None = None
        self._serving = False
        self._pending_attach: int | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # The agent ---------------------------------------------------------------------

    def start_agent(self, ready_by: float | None = None) -> None:
        """Start the agent (this version's ``gateway-daemon agent``) and send it its start
        message; before this process serves (a takeover), with ``ready_by``
        (time.monotonic, default ``AGENT_READY_S`` from now), when the agent must have
        reached the broker. Raises OSError when it cannot be started."""
        ours, theirs = control.pair()
        try:
            argv = [
                *staged.own_argv(gateway_daemon, PROGRAM), "agent",
                "--control-fd", str(theirs.fileno()),
            ]  # fmt: skip
            proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        try:
            pidfd = os.pidfd_open(proc.pid)
        except OSError:
            proc.kill()
            proc.wait()
            ours.close()
            raise
        self._agent = _Agent(proc, ours, pidfd, time.monotonic())
        self._agents_started += 1
        self._restart_at = None
        log.info("agent_started", agent_pid=proc.pid, starts=self._agents_started)
        # Before this process serves (a takeover), the agent must reach the broker first:
        # a version that cannot is not ready. A restarted agent attaches at once.
        # When it must have: CLOCK_MONOTONIC, the host's, less a margin for its reason to
        # arrive while this process still waits for it.
        agent_by = None
        if not self._serving:
            ready_by = time.monotonic() + AGENT_READY_S if ready_by is None else ready_by
            agent_by = ready_by - AGENT_REASON_MARGIN_S
        control.send(
            ours, {**self._start, "ready_check": not self._serving, "ready_by": agent_by}
        )

    def stop_agent(self, *, farewell: bool = False) -> int | None:
        """Stop the agent (SIGTERM when ``farewell``: the gateway stops and the agent
        tells the controller; else ``control.RETIRE_SIGNAL``: the data plane was handed
        over), then SIGKILL after AGENT_EXIT_S; its exit code."""
        agent, self._agent = self._agent, None
        if agent is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            agent.proc.send_signal(signal.SIGTERM if farewell else control.RETIRE_SIGNAL)
        try:
            code = agent.proc.wait(AGENT_EXIT_S)
        except subprocess.TimeoutExpired:
            log.warning("agent_killed", agent_pid=agent.proc.pid, waited_s=AGENT_EXIT_S)
            agent.proc.kill()
            code = agent.proc.wait()
        agent.close()
        return code

    def _reply(self, request: int, to: _Agent | None = None, **fields: Any) -> bool:
        """Answer request ``request`` of agent ``to`` (default: the current one); False
        when that agent is gone or no longer the current one."""
        agent = self._agent
        if agent is None or (to is not None and to is not agent):
            return False
        try:
            with self._send_lock:
                control.send(agent.sock, {"id": request, **fields})
        except (OSError, ValueError) as exc:
            log.warning("agent_unreachable", error=str(exc))
            return False
        return True

    def wait_attach(self, deadline: float, predecessor: int = -1) -> None:
        """After a handoff: wait for the new agent's ``attach`` (it is configured and
        reached the broker), answered later by ``serve()``. Raises HandoffFailed with
        the reason when it exits first, HandoffTimeout at ``deadline`` (monotonic).
        Returns at once, without it, when the old process dies (``predecessor``, a pidfd
        on it): this one must serve alone now, and the agent attaches when it can."""
        agent = self._agent
        assert agent is not None
        said = ""
        restored = False
        poller = select.poll()
        poller.register(agent.sock, select.POLLIN)
        poller.register(agent.pidfd, select.POLLIN)
        if predecessor >= 0:
            poller.register(predecessor, select.POLLIN)
        while True:
            if not restored and not priority.is_idle():
                # The old process restored this one (or it never was idle): so is its agent.
                restored = True
                self.restore_agent_priority()
            left = deadline - time.monotonic()
            if left <= 0:
                waited_s = time.monotonic() - agent.started
                raise HandoffTimeout(
                    f"the new version's agent did not reach the broker within "
                    f"{waited_s:.0f} s{': ' + said if said else ''}"
                )
            for fd, _ in poller.poll(min(left, ATTACH_POLL_S) * 1000):
                if fd == predecessor:
                    log.warning("takeover_without_agent", reason="the old process is gone")
                    self.restore_agent_priority()  # nothing is left to yield the CPU to
                    return
                if fd == agent.pidfd:
                    code = agent.proc.wait()
                    raise HandoffFailed(
                        f"the new version's agent exited with {code} before it was ready"
                        + (f": {said}" if said else "")
                    )
                try:
                    message = control.receive(agent.sock)
                except (OSError, ValueError) as exc:
                    raise HandoffFailed(f"the new version's agent: {exc}") from exc
                if message is None:
                    poller.unregister(agent.sock)
                elif message.get("op") == "failed":
                    said = str(message.get("reason", ""))
                elif message.get("op") == "attach":
                    self._pending_attach = int(message["id"])
                    # It waits idle from here: back at normal priority now, not in the
                    # cutover, where the syscalls would hold the GIL the loop needs.
                    self.restore_agent_priority()
                    agent.attached = True
                    return

    def restore_agent_priority(self) -> None:
        """Put the agent back to normal priority with this process (``priority``): it
        started at this process's idle priority."""
        if self._agent is not None:
            priority.restore(self._agent.proc.pid)

    def kill_agent(self) -> None:
        """Kill the agent at once (a takeover that failed)."""
        agent, self._agent = self._agent, None
        if agent is not None:
            agent.proc.kill()
            agent.proc.wait()
            agent.close()

    # Serving ---------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def serve(self) -> int:
        """Serve until stopped (``stop()``, SIGTERM, SIGINT) or handed over; then stop the
        agent, close the data plane and return the exit code (0; the agent's own when the
        first agent of a fresh start failed before it attached)."""
        self._serving = True
        log.info("gateway_serving", endpoints=self._plane.endpoints(), pid=os.getpid())
        if self._pending_attach is not None:
            self._answer_attach(self._pending_attach)
        if self._agent is None:
            self.start_agent()
        code = 0
        try:
            while not self._stop.is_set() and not self._handed_over.is_set():
                failed = self._step()
                if failed is not None:
                    code = failed
                    break
        finally:
            if self._handoff is not None:
                self._handoff.join()  # bounded by the handoff's own deadlines
            self.stop_agent(farewell=self._stop.is_set() and not self._handed_over.is_set())
            self._plane.close()
            # The wake pipe stays open: a signal handler may still write to it.
        log.info("gateway_exiting", handed_over=self._handed_over.is_set())
        return code

    def _step(self) -> int | None:
        """Wait for the next event and handle it; an exit code when the process must end."""
        agent = self._agent
        poller = select.poll()  # not select(): a gateway may hold descriptors past 1024
        poller.register(self._wake_r, select.POLLIN)
        if agent is not None:
            if not agent.closed:
                poller.register(agent.sock, select.POLLIN)
            poller.register(agent.pidfd, select.POLLIN)
        timeout_s = 1.0
        # No agent starts while a handoff runs (its answer decides what the next agent is
        # told; the handoff's end wakes this loop) or once the plane is handed over.
        may_restart = not self._handed_over.is_set() and not (
            self._handoff is not None and self._handoff.is_alive()
        )
        if self._restart_at is not None and may_restart:
            timeout_s = max(0.0, min(timeout_s, self._restart_at - time.monotonic()))
        for fd, _ in poller.poll(timeout_s * 1000):
            if fd == self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 512)
            elif agent is not None and fd == agent.pidfd:
                return self._agent_exited(agent)
            elif agent is not None and fd == agent.sock.fileno():
                self._on_message(agent)
        if (
            self._agent is None
            and self._restart_at is not None
            and time.monotonic() >= self._restart_at
            and not self._stop.is_set()
            and not self._handed_over.is_set()
            and not (self._handoff is not None and self._handoff.is_alive())
        ):
            try:
                self.start_agent()
            except OSError as exc:
                log.error("agent_start_failed", error=str(exc))
                self._schedule_restart()
        return None

    def _agent_exited(self, agent: _Agent) -> int | None:
        code = agent.proc.wait()
        agent.close()
        self._agent = None
        if self._handed_over.is_set() or self._stop.is_set():
            return None
        if not agent.attached and self._agents_started == 1 and self._start["run_args"]:
            # The first agent of a fresh start could not configure itself: it said why.
            log.error("agent_failed_to_start", exit_code=code)
            return code or 1
        log.error("agent_exited", agent_pid=agent.proc.pid, exit_code=code)
        if time.monotonic() - agent.started >= AGENT_STABLE_S:
            self._failures = 0
        self._schedule_restart()
        return None

    def _schedule_restart(self) -> None:
        delay = AGENT_RESTART.delay(self._failures)
        self._failures += 1
        self._restart_at = time.monotonic() + delay
        log.info("agent_restart_scheduled", in_s=round(delay, 2))

    def _on_message(self, agent: _Agent) -> None:
        try:
            message = control.receive(agent.sock)
        except (OSError, ValueError) as exc:
            log.error("agent_message_refused", error=str(exc))
            return
        if message is None:
            agent.closed = True  # it exits: its pidfd says so
            return
        op, request = message.get("op"), message.get("id")
        if op == "failed":
            log.error("agent_gave_up", reason=str(message.get("reason", "")))
            return
        if not isinstance(request, int):
            log.error("agent_message_refused", error=f"no request id: {str(message)[:200]}")
            return
        if op == "attach":
            agent.attached = True
            self._answer_attach(request)
        elif op == "recorded":
            self._handover = None
            self._predecessor = None
            self._reply(request, ok=True)
        elif op == "health":
            self._reply(request, ok=True, health=self._plane.health().to_json())
        elif op == "hand_off":
            self._start_hand_off(agent, request, message)
        else:
            self._reply(request, ok=False, kind=control.FAILED, error=f"unknown request {op!r}")

    def _answer_attach(self, request: int) -> None:
        self._pending_attach = None
        if self._reply(
            request, ok=True, pid=os.getpid(), endpoints=self._plane.endpoints(),
            handover=self._handover, predecessor=self._predecessor,
            unanswered=self._unanswered,
        ):  # fmt: skip
            self._unanswered = None

    # Handing off -------------------------------------------------------------------------

    def _start_hand_off(self, agent: _Agent, request: int, message: dict[str, Any]) -> None:
        if self._handoff is not None and self._handoff.is_alive():
            self._reply(request, ok=False, kind=control.FAILED, error="a handoff is running")
            return
        program, context = message.get("program"), message.get("context")
        command_id = str(message.get("command_id", ""))
        target = str(message.get("target_version", ""))
        if not isinstance(program, list) or not isinstance(context, dict):
            self._reply(request, ok=False, kind=control.FAILED, error="a malformed hand_off")
            return
        self._handoff = threading.Thread(
            target=self._hand_off,
            args=(agent, request, (command_id, target), [str(a) for a in program], context),
            name="handoff", daemon=True,
        )  # fmt: skip
        self._handoff.start()

    def _hand_off(
        self,
        agent: _Agent,
        request: int,
        command: tuple[str, str],
        program: list[str],
        context: dict[str, Any],
    ) -> None:
        """Hand the data plane to ``program`` (the argv up to its ``run`` subcommand) as
        this gateway with ``context``, and answer ``agent``: ok once the new version
        serves, else why (``control``), with this data plane serving again. An agent
        that died meanwhile is not replaced until this ends (``_step``); a failure it
        could not hear is given to the next one (``unanswered``), which records it for
        ``command`` (id, target version) so that the redelivered command is not run
        twice."""

        def argv_for(control_fd: int) -> list[str]:
            return [
                *program, "run",
                "--id", self._gateway_id,
                "--state-dir", str(self._state_dir),
                "--handoff-fd", str(control_fd),
            ]  # fmt: skip

        failure: dict[str, Any] | None = None
        try:
            parent.hand_off(self._plane, argv_for, context, deadlines=self._deadlines)
        except ResumeFailed as exc:
            failure = {"kind": control.RESUME_FAILED, "error": str(exc)}
        except HandoffFailed as exc:
            failure = {"kind": control.ROLLED_BACK, "error": str(exc)}
        except Exception as exc:  # the agent's request must be answered whatever failed
            log.exception("handoff_failed_in_this_process")
            failure = {"kind": control.FAILED, "error": f"{type(exc).__name__}: {exc}"}
        try:
            if failure is None:
                self._handed_over.set()
                self._reply(request, agent, ok=True)
            elif not self._reply(request, agent, ok=False, **failure):
                command_id, target = command
                log.warning("handoff_answer_kept", command_id=command_id, **failure)
                self._unanswered = {"command_id": command_id, "target_version": target, **failure}
        finally:
            self._wake()


def run_fresh(
    *,
    gateway_id: str,
    state_dir: Path,
    listen: tuple[HostPort, ...],
    tunnels: TunnelsConfig | None,
    deadlines: Deadlines,
    run_args: list[str],
) -> int:
    """Bind and serve a gateway's data plane, with an agent started from ``run_args``
    (the ``run`` command line, which the agent reads); the exit code."""
    logs.bind_process(gateway_id=gateway_id)
    log.info("gateway_starting", gateway_id=gateway_id, version=version.current())
    plane = DataPlane.serve(listen, tunnels, greeting(gateway_id))
    forwarding = Forwarding(
        plane, gateway_id=gateway_id, state_dir=state_dir, deadlines=deadlines,
        start={"run_args": run_args},
    )  # fmt: skip
    _stop_on_signals(forwarding)
    return forwarding.serve()


def take_over(inheritance: child.Inheritance, gateway_id: str, state_dir: Path) -> int:
    """Take the data plane over from the old process (this one's parent); on any failure
    before serving, leave it to it (ABORT with the reason) and return 1."""
    logs.bind_process(gateway_id=gateway_id)
    log.info("gateway_starting", gateway_id=gateway_id, version=version.current())
    predecessor = os.getppid()  # the old version started this process
    context = inheritance.context
    forwarding: Forwarding | None = None
    # Until it serves, SIGTERM (as SIGINT) abandons the takeover cleanly: the old
    # process is told, the agent killed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        _check_version(context)
        plane = dataplane.adopt(
            inheritance.description, inheritance.sockets, inheritance.snapshot,
            greeting(gateway_id),
        )  # fmt: skip
        forwarding = Forwarding(
            plane, gateway_id=gateway_id, state_dir=state_dir,
            deadlines=deadlines_from_context(context), start={"context": context},
            handover=context, predecessor=predecessor,
        )  # fmt: skip
        attach_by = agent_deadline(inheritance.ready_by, inheritance.ready_s)
        forwarding.start_agent(attach_by)
        forwarding.wait_attach(attach_by, inheritance.predecessor)
        selfcheck.run(plane, inheritance.sockets)
        inheritance.say_ready()
        if plane.tunnels is not None:
            plane.tunnels.add_marks(inheritance.marks)
        # The data plane's own loop thread waits for CUTOVER and serves at once.
        deadline = time.monotonic() + CUTOVER_TIMEOUT_S
        plane.start_from(lambda: inheritance.cutover(deadline), CUTOVER_TIMEOUT_S + PAUSE_MARGIN_S)
        _stop_on_signals(forwarding)  # serving: SIGTERM and SIGINT stop it from here
    except BaseException as exc:
        reason = str(exc) or type(exc).__name__
        log.error("takeover_failed", error=reason)
        inheritance.abort(f"the new version could not take over: {reason}")
        if forwarding is not None:
            forwarding.kill_agent()
        for sock in inheritance.sockets:
            sock.close()
        return 1
    inheritance.started()
    return forwarding.serve()


def _check_version(context: dict[str, Any]) -> None:
    """Raise HandoffFailed unless this process runs the version the handoff is for: the
    command's target, or on a hand-back the version that ran before."""
    from hitless.bus import codec  # protobuf only: no broker client
    from hitless.v1 import bus_pb2

    rollback: dict[str, Any] | None = context.get("rollback")
    if rollback:
        expected = str(rollback["version"])
    else:
        command = codec.decode(bus_pb2.UpgradeCommand, context["command"].encode(), strict=False)
        expected = command.target_version
    if version.current() != expected:
        raise HandoffFailed(
            f"this process runs {version.current()}, not {expected}: the artifact is not "
            "the release " + ("to hand back to" if rollback else "the command names")
        )


def _stop_on_signals(forwarding: Forwarding) -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: forwarding.stop())


def exec_current_release(state: AgentState, argv: list[str]) -> None:
    """A gateway started from the installed package runs the release staged by its last
    upgrade instead, so a restart does not silently downgrade it. The file is hashed
    first (``hitless.staged.check``): one altered on disk since it was verified is not
    run, and the installed package starts instead."""
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
