"""Fetching an artifact from the controller over gRPC streaming, resumable by offset.

With ``gateway_daemon.trust`` (metadata), the only modules of the gateway that import
grpc. Bytes go to ``<dest>.part``, never past the length asked for (the signed length); a
broken stream is resumed from the part file's size, with bounded backoff, and the part file
is renamed to ``dest`` once every byte is there. Verification is the caller's job.

A controller serving as many downloads as it allows (``controller_svc.limits``) answers
RESOURCE_EXHAUSTED: the download then waits, with a longer backoff, for up to
``BUSY_TIMEOUT_S`` in a row, without counting the refusals as failed attempts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from gateway_daemon.errors import DownloadFailed
from hitless import logs
from hitless.backoff import Backoff
from hitless.config import HostPort
from hitless.v1 import artifacts_pb2, artifacts_pb2_grpc

log = logs.get(__name__)

Progress = Callable[[int, int], None]  # bytes done, bytes total

_BACKOFF = Backoff()
# A fleet downloading at once is turned away in turns; jitter spreads the retries.
_BUSY_BACKOFF = Backoff(initial_s=0.5, max_s=15.0)
BUSY_TIMEOUT_S = 600.0
_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.INTERNAL,  # e.g. "stream removed" when a connection breaks mid-stream
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    size: int
    attempts: int
    resumed_from: tuple[int, ...]  # the offset each retry started at


def download(
    controller: HostPort,
    sha256: str,
    size: int,
    dest: Path,
    *,
    credentials: grpc.ChannelCredentials,
    progress: Progress | None = None,
    max_attempts: int = 8,
    stall_timeout_s: float = 30.0,
    busy_timeout_s: float = BUSY_TIMEOUT_S,
    busy_backoff: Backoff = _BUSY_BACKOFF,
) -> DownloadResult:
    """Download the artifact ``sha256`` of ``size`` bytes to ``dest`` from the controller's
    gateway port ``controller``, over TLS with ``credentials`` (the gateway's certificate).

    Streams that break are resumed, up to ``max_attempts`` attempts that fail; refusals
    because the controller is busy (RESOURCE_EXHAUSTED) are retried with ``busy_backoff``
    for up to ``busy_timeout_s`` seconds in a row. Raises DownloadFailed when either runs
    out, or at once on an error retrying cannot fix (e.g. NOT_FOUND).
    """
    part = dest.with_name(dest.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    resumed: list[int] = []
    attempt = failures = 0
    busy_since: float | None = None
    busy_refusals = 0
    while True:
        attempt += 1
        offset = part.stat().st_size if part.exists() else 0
        if offset > size:
            part.unlink()
            offset = 0
        if attempt > 1:
            resumed.append(offset)
        try:
            # A fresh channel per attempt: the connection that broke (or that a stopping
            # controller sent away) is not reused.
            with grpc.secure_channel(str(controller), credentials) as channel:
                stub = artifacts_pb2_grpc.ArtifactsStub(channel)
                _stream_into(stub, sha256, offset, size, part, progress, stall_timeout_s)
            break
        except grpc.RpcError as exc:
            code = exc.code()
            error = f"{code.name}: {exc.details()}"
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                now = time.monotonic()
                busy_since = now if busy_since is None else busy_since
                busy_refusals += 1
                if now - busy_since >= busy_timeout_s:
                    raise DownloadFailed(
                        f"download of {sha256[:12]} from {controller} failed: the controller "
                        f"stayed busy for {now - busy_since:.0f} s ({error}); "
                        "retry when fewer gateways download"
                    ) from exc
                delay = busy_backoff.delay(busy_refusals)
            else:
                busy_since, busy_refusals = None, 0
                failures += 1
                if code not in _RETRYABLE or failures >= max_attempts:
                    raise DownloadFailed(
                        f"download of {sha256[:12]} from {controller} failed after {attempt} "
                        f"attempt(s): {error}"
                    ) from exc
                delay = _BACKOFF.delay(failures)
            log.warning(
                "download_interrupted",
                sha256=sha256[:12],
                offset=part.stat().st_size if part.exists() else 0,
                error=error,
                retry_in_s=round(delay, 2),
            )
            time.sleep(delay)  # backoff between attempts, not synchronisation
    part.replace(dest)
    return DownloadResult(dest, size, attempt, tuple(resumed))


def _stream_into(
    stub: artifacts_pb2_grpc.ArtifactsStub,
    sha256: str,
    offset: int,
    size: int,
    part: Path,
    progress: Progress | None,
    stall_timeout_s: float,
) -> None:
    if offset == size:
        return
    # The deadline bounds the whole stream: a generous rate floor of 1 MiB/s plus slack.
    timeout = stall_timeout_s + (size - offset) / (1 << 20)
    request = artifacts_pb2.DownloadRequest(sha256=sha256, offset=offset)
    with part.open("ab") as out:
        for chunk in stub.Download(request, timeout=timeout):
            if chunk.offset != offset:
                raise DownloadFailed(
                    f"the controller sent bytes at offset {chunk.offset}, expected {offset}"
                )
            if chunk.total_size != size:
                raise DownloadFailed(
                    f"the controller says the artifact has {chunk.total_size} bytes; "
                    f"its signed length is {size}"
                )
            if offset + len(chunk.data) > size:
                # Endless data (TUF's threat model): never write past the signed length.
                raise DownloadFailed(
                    f"the controller sent more than the signed length of {size} bytes "
                    f"(a chunk at {offset} of {len(chunk.data)} bytes); the download stopped"
                )
            out.write(chunk.data)
            offset += len(chunk.data)
            if progress is not None:
                progress(offset, size)
        out.flush()
    if offset != size:
        raise DownloadFailed(f"the stream ended at byte {offset} of {size}")
