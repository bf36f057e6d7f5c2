"""The operator's side of ``make bench-controller-upgrade``: timed calls and a watched job.

One thread calls ListGateways and GetJob back to back, another keeps one WatchJob stream
open, both through ``upgradectl.client.ControllerClient`` (TLS, an API token) exactly as
the CLI uses it
(UNAVAILABLE retried, the watch resumed after the last sequence number). Every unary call
is recorded with its start and end on the monotonic clock and whether it failed *after*
the client's retries, which is what an operator would see.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import grpc

from hitless.config import HostPort
from upgradectl.client import ControllerClient
from upgradectl.credentials import Credentials
from upgradectl.errors import CliError
from upgradectl.model import JobEvent

CALL_TIMEOUT_S = 10.0
JOIN_S = 30.0


@dataclass(frozen=True)
class Call:
    """One unary call as the client saw it (retries included)."""

    method: str
    start: float
    end: float
    error: str | None
    status: str | None = None  # the gRPC status code behind ``error``

    @property
    def ms(self) -> float:
        return (self.end - self.start) * 1000

    def overlaps(self, start: float, end: float) -> bool:
        return self.start <= end and self.end >= start


@dataclass
class _Retries:
    """Counts the client's pauses before a retry (it sleeps once per retry)."""

    count: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.count += 1
        time.sleep(seconds)


class Callers:
    """The call loop and the watch, on threads this object owns (``start``/``stop``)."""

    def __init__(
        self, target: HostPort, job_id: str, ca_cert: bytes, credentials: Credentials
    ) -> None:
        self.job_id = job_id
        self.calls: list[Call] = []
        self.events: list[JobEvent] = []
        self.watch_error: str | None = None
        self.call_retries = _Retries()
        self.watch_resumes = _Retries()
        self._calls_client = ControllerClient(
            target, CALL_TIMEOUT_S, ca_cert=ca_cert, credentials=credentials,
            sleep=self.call_retries.sleep,
        )  # fmt: skip
        self._watch_client = ControllerClient(
            target, CALL_TIMEOUT_S, ca_cert=ca_cert, credentials=credentials,
            sleep=self.watch_resumes.sleep,
        )  # fmt: skip
        self._stop = threading.Event()
        self._loop_thread = threading.Thread(target=self._loop, name="bench-calls", daemon=True)
        self._watch_thread = threading.Thread(target=self._watch, name="bench-watch", daemon=True)

    def start(self) -> Callers:
        self._loop_thread.start()
        self._watch_thread.start()
        return self

    def stop_calls(self) -> None:
        """End the call loop; the watch runs on until the job finishes."""
        self._stop.set()
        self._loop_thread.join(JOIN_S)
        if self._loop_thread.is_alive():
            raise RuntimeError(f"the call loop did not stop within {JOIN_S:.0f}s")

    def wait_watch_done(self, timeout: float) -> bool:
        """Whether the watch ended (the job finished, or the watch failed) in time."""
        self._watch_thread.join(timeout)
        return not self._watch_thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        self._loop_thread.join(JOIN_S)
        self._calls_client.close()
        # Closing the channel ends a watch still blocked on it.
        self._watch_client.close()
        self._watch_thread.join(JOIN_S)

    def _loop(self) -> None:
        client = self._calls_client
        methods = (
            ("ListGateways", client.list_gateways),
            ("GetJob", lambda: client.get_job(self.job_id)),
        )
        while not self._stop.is_set():
            for method, call in methods:
                start = time.monotonic()
                error = status = None
                try:
                    call()
                except CliError as exc:
                    error = str(exc)
                    cause = exc.__cause__
                    status = cause.code().name if isinstance(cause, grpc.RpcError) else None
                self.calls.append(Call(method, start, time.monotonic(), error, status))

    def _watch(self) -> None:
        try:
            for event in self._watch_client.watch_job(self.job_id, 0):
                self.events.append(event)
        except CliError as exc:
            self.watch_error = str(exc)
        except ValueError as exc:  # grpc: the channel was closed under the stream
            if not self._stop.is_set():
                self.watch_error = str(exc)
