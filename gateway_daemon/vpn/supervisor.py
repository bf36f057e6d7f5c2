"""The daemon's side of the VPN service: attach to it or start it, watch it, restart it.

    start()    attach to the service this state dir's pid file and control socket name
               (left running by the previous daemon process), or start one; then watch it
    sessions() how many users are connected now (for heartbeats)
    restart()  for a release that restarts the VPN service: STOP the running one (it drops
               its sessions and says how many), start this version's, wait until it answers
    close()    stop watching; the service runs on (the next daemon process attaches to it)

The service is started by exec (``gateway-daemon vpn-service`` of the code this daemon
runs) in a session of its own, with every inherited descriptor closed, so neither a
handoff nor this process's exit touches it. A service that dies is started again after a
delay that doubles from 0.5 s up to 30 s, and goes back to 0.5 s once one has run for a
minute. Only one daemon process watches at a time: a new version attaches once the old
process has exited.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gateway_daemon
from gateway_daemon.errors import VpnServiceError
from gateway_daemon.vpn import control
from gateway_daemon.vpn.config import VpnConfig
from hitless import logs, staged

log = logs.get(__name__)

READY_TIMEOUT_S = 20.0
EXIT_TIMEOUT_S = 10.0
READY_POLL_S = 0.05


@dataclass(frozen=True)
class Backoff:
    initial_s: float = 0.5
    max_s: float = 30.0
    stable_s: float = 60.0  # a service that ran this long resets the delay


def own_command() -> list[str]:
    """How to run ``gateway-daemon`` from the very code this process runs: its release
    artifact (a zipapp) after an upgrade, else the installed package."""
    return staged.own_argv(gateway_daemon, "gateway-daemon")


def spawn_detached(argv: Sequence[str]) -> int:
    """Start ``argv`` by exec in a session of its own, stdin from /dev/null, and without
    any descriptor this process could pass on (the data plane's sockets, a handoff's
    control socket): the service must hold nothing of the daemon's. Returns its pid."""
    actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)
    ]
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        with contextlib.suppress(OSError):
            if fd > 2 and os.get_inheritable(fd):
                actions.append((os.POSIX_SPAWN_CLOSE, fd))
    return os.posix_spawn(argv[0], list(argv), os.environ, file_actions=actions, setsid=True)


@dataclass
class _Service:
    """One running service process; ``child`` when this process started it (to reap it)."""

    pid: int
    pidfd: int
    child: bool = False
    since: float = field(default_factory=time.monotonic)

    def reap(self) -> int | None:
        """The exit code, once it has exited, when it is this process's child."""
        if not self.child:
            return None
        with contextlib.suppress(ChildProcessError):
            return os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return None


class VpnSupervisor:
    def __init__(
        self,
        config: VpnConfig,
        gateway_id: str,
        *,
        command: Sequence[str] | None = None,
        backoff: Backoff = Backoff(),
        ready_timeout_s: float = READY_TIMEOUT_S,
        spawn: Callable[[Sequence[str]], int] = spawn_detached,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._gateway_id = gateway_id
        self._command = list(command) if command is not None else own_command()
        self._backoff = backoff
        self._ready_timeout_s = ready_timeout_s
        self._spawn = spawn
        self._clock = clock
        self._lock = threading.Lock()
        self._current: _Service | None = None
        self._retired: list[_Service] = []
        self._closing = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._watch, name="vpn-supervisor", daemon=True)

    @property
    def pid(self) -> int | None:
        current = self._current
        return current.pid if current else None

    def start(self) -> None:
        """Attach to the running service or start one, then watch it. A service that cannot
        start now is logged and retried by the watcher."""
        with self._lock:
            self._current = self._attach()
            if self._current is None:
                try:
                    self._current = self._launch()
                except VpnServiceError as exc:
                    log.error("vpn_service_start_failed", error=str(exc))
        self._thread.start()

    def sessions(self) -> int | None:
        """Users connected now, or None when the service does not answer."""
        try:
            return control.status(self.config.control_socket).sessions
        except VpnServiceError:
            return None

    def restart(self) -> int:
        """Stop the running service and start this version's. Returns the sessions dropped."""
        with self._lock:
            dropped = 0
            old = self._current
            if old is not None:
                dropped = self._stop(old)
                self._current = None
                self._retired.append(old)
            try:
                self._current = self._launch()
            except VpnServiceError as exc:
                log.error("vpn_service_start_failed", error=str(exc))
        os.write(self._wake_w, b"x")
        log.info("vpn_service_restarted", dropped=dropped, pid=self.pid)
        return dropped

    def close(self) -> None:
        """Stop watching. The service itself runs on."""
        self._closing.set()
        os.write(self._wake_w, b"x")
        if self._thread.is_alive():
            self._thread.join(EXIT_TIMEOUT_S)
        with self._lock:
            for service in [*self._retired, *([self._current] if self._current else [])]:
                with contextlib.suppress(OSError):
                    os.close(service.pidfd)
            self._retired.clear()
            self._current = None
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _watch(self) -> None:
        delay = self._backoff.initial_s
        while not self._closing.is_set():
            current = self._current
            if current is None:
                if self._closing.wait(delay):
                    return
                delay = min(delay * 2, self._backoff.max_s)
                with self._lock:
                    if self._current is None and not self._closing.is_set():
                        try:
                            self._current = self._launch()
                        except VpnServiceError as exc:
                            log.error("vpn_service_start_failed", error=str(exc), retry_in_s=delay)
                continue
            readable, _, _ = select.select([current.pidfd, self._wake_r], [], [])
            with self._lock:
                if self._wake_r in readable:
                    os.read(self._wake_r, 64)
                for service in self._retired:
                    os.close(service.pidfd)
                self._retired.clear()
                if current.pidfd not in readable or self._current is not current:
                    continue
                self._current = None
                os.close(current.pidfd)
                code = current.reap()
            if self._clock() - current.since >= self._backoff.stable_s:
                delay = self._backoff.initial_s
            log.error("vpn_service_died", pid=current.pid, exit_code=code, restart_in_s=delay)

    def _attach(self) -> _Service | None:
        """The service a previous daemon process left running, if it answers."""
        try:
            status = control.status(self.config.control_socket)
        except VpnServiceError:
            status = None
        if status is not None and is_running(status.pid):
            with contextlib.suppress(ProcessLookupError):
                service = _Service(status.pid, os.pidfd_open(status.pid))
                log.info("vpn_service_attached", pid=status.pid, version=status.version,
                         sessions=status.sessions)  # fmt: skip
                return service
        pid = _read_pid(self.config.pid_file)
        if pid is not None and is_running(pid) and b"vpn-service" in _cmdline(pid):
            # Alive but not answering: hung. Replace it rather than run beside it.
            log.warning("vpn_service_unresponsive", pid=pid)
            stale = _Service(pid, os.pidfd_open(pid))
            _terminate(stale)
            os.close(stale.pidfd)
        return None

    def _launch(self) -> _Service:
        """Start the service and wait until its control socket answers as that process."""
        argv = [
            *self._command, "vpn-service",
            "--state-dir", str(self.config.state_dir),
            "--listen", str(self.config.listen),
            "--keepalive-timeout", f"{self.config.keepalive_timeout_s:g}",
            "--id", self._gateway_id,
        ]  # fmt: skip
        pid = self._spawn(argv)
        service = _Service(pid, os.pidfd_open(pid), child=True)
        deadline = self._clock() + self._ready_timeout_s
        while self._clock() < deadline:
            with contextlib.suppress(VpnServiceError):
                if control.status(self.config.control_socket).pid == pid:
                    log.info("vpn_service_started", pid=pid, listen=str(self.config.listen))
                    return service
            if select.select([service.pidfd], [], [], READY_POLL_S)[0]:
                code = service.reap()
                os.close(service.pidfd)
                raise VpnServiceError(
                    f"the VPN service exited with code {code} before answering on "
                    f"{self.config.control_socket} (see its log lines above)"
                )
        _terminate(service)
        os.close(service.pidfd)
        raise VpnServiceError(
            f"the VPN service (pid {pid}) did not answer within "
            f"{self._ready_timeout_s:g}s; it was killed"
        )

    def _stop(self, service: _Service) -> int:
        try:
            dropped = control.stop(self.config.control_socket)
        except VpnServiceError as exc:
            log.warning("vpn_service_stop_refused", error=str(exc))
            dropped = 0
        _terminate(service, wait_first_s=EXIT_TIMEOUT_S)
        return dropped


def _terminate(service: _Service, wait_first_s: float = 0.0) -> None:
    """Make sure ``service`` is gone: wait ``wait_first_s`` for it to exit by itself, then
    SIGTERM, then SIGKILL, each with a deadline; reap it when it is this process's child."""
    for signum in (None, signal.SIGTERM, signal.SIGKILL):
        if signum is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(service.pidfd, signum)
        timeout = wait_first_s if signum is None else EXIT_TIMEOUT_S
        if select.select([service.pidfd], [], [], timeout)[0]:
            break
    service.reap()


def is_running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not: nobody may ever reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] != "Z"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None
