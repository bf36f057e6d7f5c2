"""Fetching an artifact from the controller over gRPC streaming, resumable by offset.

With ``gateway_daemon.trust`` (metadata), the only modules of the gateway that import
grpc. Both call the controller's gateway port over one ``ControllerChannel``: one
connection, so one TLS handshake, for the metadata update and the download of an upgrade.
A call that fails on the connection closes it, and the next call opens a new one.

Bytes go to ``<dest>.part``, never past the length asked for (the signed length); a
broken stream is resumed from the part file's size, with bounded backoff, and the part file
is renamed to ``dest`` once every byte is there. Verification is the caller's job.

Chunks are read from their wire encoding (``decode_chunk``): the data of a chunk is written
to the file from a view of the message grpc hands over, without the two copies a protobuf
message and its ``data`` attribute would make.

A controller serving as many downloads as it allows (``controller_svc.limits``) answers
RESOURCE_EXHAUSTED: the download then waits, with a longer backoff, for up to
``BUSY_TIMEOUT_S`` in a row, without counting the refusals as failed attempts.

A stream on which no bytes arrive for ``STALL_TIMEOUT_S`` (a controller alive but silent,
or a link that stopped carrying data) is cancelled and counts as a failed attempt, like a
broken one: resumed on a new connection, and reported with the bytes it got when the
attempts run out (``download`` says how this relates to the stream's deadline).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

import grpc

from gateway_daemon.errors import DownloadFailed
from hitless import logs
from hitless.backoff import Backoff
from hitless.config import HostPort
from hitless.trust.client import MAX_METADATA_BYTES
from hitless.v1 import artifacts_pb2

log = logs.get(__name__)

Progress = Callable[[int, int], None]  # bytes done, bytes total

DOWNLOAD_METHOD = "/hitless.v1.Artifacts/Download"
# The largest chunk a controller sends (its CHUNK_SIZE is smaller): grpc's default limit
# on a received message, which gateways of earlier releases keep.
MAX_CHUNK_BYTES = 4 * 1024 * 1024
# A chunk or a metadata file, with room for the message around it.
MAX_MESSAGE_BYTES = max(MAX_CHUNK_BYTES, MAX_METADATA_BYTES) + 64 * 1024

_BACKOFF = Backoff()
# A fleet downloading at once is turned away in turns; jitter spreads the retries.
_BUSY_BACKOFF = Backoff(initial_s=0.5, max_s=15.0)
BUSY_TIMEOUT_S = 600.0
# Seconds a stream may wait for its next bytes before it counts as stalled.
STALL_TIMEOUT_S = 30.0
# The deadline of a whole stream: a rate floor for the bytes still to come, plus slack (for
# connecting and the first chunk) on top of the stall timeout, so that a silent stream is
# always ended by the stall timeout first.
_DEADLINE_FLOOR_BYTES_PER_S = 1 << 20
_DEADLINE_SLACK_S = 30.0
_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.INTERNAL,  # e.g. "stream removed" when a connection breaks mid-stream
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}


class ControllerChannel:
    """One gRPC channel to the controller's gateway port ``controller``, over TLS with
    ``credentials`` (the gateway's client certificate): opened on first use and reused by
    every call after, until ``reset`` or ``close``. Thread-safe; a ``reset`` while another
    thread is in a call on the channel cancels that call.

    Usable as a context manager, which closes it."""

    def __init__(self, controller: HostPort, credentials: grpc.ChannelCredentials) -> None:
        self.controller = controller
        self._credentials = credentials
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None

    def get(self) -> grpc.Channel:
        """The channel, opened now when there is none (grpc connects on the first call)."""
        with self._lock:
            if self._channel is None:
                self._channel = grpc.secure_channel(
                    str(self.controller),
                    self._credentials,
                    options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)],
                )
            return self._channel

    def reset(self) -> None:
        """Close the channel after a call failed on it: the connection that broke (or that
        a stopping controller sent away) is not reused; the next call opens a new one."""
        with self._lock:
            channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    def close(self) -> None:
        self.reset()

    def __enter__(self) -> ControllerChannel:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class WireChunk(NamedTuple):
    """A ``hitless.v1.Chunk`` as it came: ``data`` is a view of the received message."""

    offset: int
    data: memoryview
    total_size: int


def decode_chunk(message: bytes) -> WireChunk:
    """Decode ``message``, the wire encoding of a ``hitless.v1.Chunk`` (proto/hitless/v1/
    artifacts.proto), as protobuf's parser would: fields in any order, a field given twice
    keeps the last value, absent fields are 0 or empty, unknown fields are skipped (the
    protobuf encoding: https://protobuf.dev/programming-guides/encoding/). Raises
    DownloadFailed when it is not a well-formed message."""
    view = memoryview(message)
    offset = total = 0
    data = view[:0]
    pos, end = 0, len(view)
    try:
        while pos < end:
            tag, pos = _varint(view, pos)
            field, wire_type = tag >> 3, tag & 7
            if wire_type == 0:
                value, pos = _varint(view, pos)
                if field == 1:
                    offset = _int64(value)
                elif field == 3:
                    total = _int64(value)
            elif wire_type == 2:
                length, pos = _varint(view, pos)
                if pos + length > end:
                    raise ValueError(f"a field of {length} bytes at {pos} runs past the end")
                if field == 2:
                    data = view[pos : pos + length]
                pos += length
            elif wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
            else:
                raise ValueError(f"wire type {wire_type} of field {field} is not protobuf's")
        if pos != end:
            raise ValueError("the last field runs past the end")
    except (ValueError, IndexError) as exc:
        raise DownloadFailed(
            f"the controller sent a chunk that is not a hitless.v1.Chunk ({exc}); the "
            "download stopped"
        ) from exc
    return WireChunk(offset, data, total)


def _varint(view: memoryview, pos: int) -> tuple[int, int]:
    """The base-128 varint at ``pos`` and the position after it."""
    value = shift = 0
    while shift < 70:
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise ValueError(f"a varint longer than 10 bytes ends at {pos}")


def _int64(value: int) -> int:
    """An int64 field's value from its varint (negative numbers take ten bytes)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


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
    credentials: grpc.ChannelCredentials | None = None,
    channel: ControllerChannel | None = None,
    progress: Progress | None = None,
    max_attempts: int = 8,
    stall_timeout_s: float = STALL_TIMEOUT_S,
    busy_timeout_s: float = BUSY_TIMEOUT_S,
    busy_backoff: Backoff = _BUSY_BACKOFF,
    command_id: str = "",
) -> DownloadResult:
    """Download the artifact ``sha256`` of ``size`` bytes to ``dest`` from the controller's
    gateway port ``controller``: over ``channel`` when given (the one the metadata update
    used), else over a channel of its own, TLS with ``credentials`` (the gateway's
    certificate), closed on return.

    Streams that break are resumed, up to ``max_attempts`` attempts that fail; refusals
    because the controller is busy (RESOURCE_EXHAUSTED) are retried with ``busy_backoff``
    for up to ``busy_timeout_s`` seconds in a row. Raises DownloadFailed when either runs
    out, or at once on an error retrying cannot fix (e.g. NOT_FOUND, or the file cannot be
    written: its part is removed then); ValueError when
    neither ``channel`` nor ``credentials`` is given, or ``stall_timeout_s`` is not above 0.
    ``command_id`` names the command the download is for: the controller refuses it
    (FAILED_PRECONDITION, never retried) once that command was withdrawn, its job
    cancelled or aborted before the gateway took it.

    Two clocks end a stream. The stall timeout: when the gateway has waited
    ``stall_timeout_s`` seconds for bytes (from the start of the call, or since the last
    chunk that carried data; its own writing and ``progress`` do not count), it cancels
    the call (grpc's ``Call.cancel``), and the attempt fails with "no data from the
    controller for N s after B of T bytes", resumed on a new connection like a broken
    stream. The deadline: the whole stream gets ``stall_timeout_s`` + 30 s + 1 s per MiB
    still to come (grpc's call ``timeout``), which ends a stream that moves but slower than
    1 MiB/s. A silent stream is always caught by the stall timeout first, and much sooner
    on a large artifact (30 s against about 7.5 min for 400 MiB). A download that only
    stalls fails after at most ``max_attempts`` x ``stall_timeout_s`` plus the backoff
    between attempts (about 4.5 min with the defaults).

    grpc's blocking response iterator has no per-message timeout (its ``__next__`` takes
    no argument, grpc/grpc#20562), so a watcher thread, owned and stopped by each attempt,
    keeps the time and cancels. HTTP/2 keepalive pings are not used: the controller's
    transport acknowledges them while its handler sends nothing, so they cannot see a
    stall; a dead peer or link stops the bytes and is caught by the same stall timeout; and
    the controller keeps grpc's server defaults (a ping more often than every 5 min without
    data is a strike, the second strike closes the connection with GOAWAY "too_many_pings",
    grpc's doc/keepalive.md), which any keepalive short enough to matter would break.
    """
    if stall_timeout_s <= 0:
        raise ValueError(
            f"a stall timeout of {stall_timeout_s:g} s would end every download: give more "
            f"than 0 s (default {STALL_TIMEOUT_S:g} s)"
        )
    if channel is None:
        if credentials is None:
            raise ValueError("download needs a channel or the credentials to open one")
        with ControllerChannel(controller, credentials) as own:
            return _download(controller, sha256, size, dest, own, progress, max_attempts,
                             stall_timeout_s, busy_timeout_s, busy_backoff,
                             command_id)  # fmt: skip
    return _download(controller, sha256, size, dest, channel, progress, max_attempts,
                     stall_timeout_s, busy_timeout_s, busy_backoff, command_id)  # fmt: skip


def _download(
    controller: HostPort,
    sha256: str,
    size: int,
    dest: Path,
    channel: ControllerChannel,
    progress: Progress | None,
    max_attempts: int,
    stall_timeout_s: float,
    busy_timeout_s: float,
    busy_backoff: Backoff,
    command_id: str,
) -> DownloadResult:
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
            _stream_into(
                channel.get(), sha256, offset, size, part, progress, stall_timeout_s, command_id
            )
            break
        except OSError as exc:
            # The gateway's disk, not the link (ENOSPC, EACCES...): no retry fixes it, and
            # the part kept would hold the space the gateway needs to run.
            part.unlink(missing_ok=True)
            raise DownloadFailed(
                f"cannot write the download of {sha256[:12]} to {part.parent}: "
                f"{exc.strerror or exc}; free space there (or move the gateway's "
                "--state-dir) and start the job again"
            ) from exc
        except (grpc.RpcError, _Stalled) as exc:
            code, error = _described(exc)
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
                channel.reset()
                if (code is not None and code not in _RETRYABLE) or failures >= max_attempts:
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


class _Stalled(Exception):
    """No bytes came on a stream for the stall timeout, and the call was cancelled."""


def _described(exc: Exception) -> tuple[grpc.StatusCode | None, str]:
    """The status code of a failed attempt (None for a stall) and what to say about it."""
    if isinstance(exc, grpc.RpcError):
        return exc.code(), f"{exc.code().name}: {exc.details()}"
    return None, str(exc)


class _StallWatch:
    """Cancels ``call`` once the gateway has waited ``timeout_s`` seconds for bytes on it:
    ``waiting`` before each read starts the clock (a clock already running goes on),
    ``arrived`` after data stops it. A context manager that starts the watcher thread and
    stops it on exit; ``fired`` says whether it cancelled."""

    def __init__(self, call: grpc.Call, timeout_s: float) -> None:
        self._call = call
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._waiting_since: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="download-stall", daemon=True)
        self.fired = False

    def __enter__(self) -> _StallWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def waiting(self) -> None:
        with self._lock:
            if self._waiting_since is None:
                self._waiting_since = time.monotonic()

    def arrived(self) -> None:
        with self._lock:
            self._waiting_since = None

    def _watch(self) -> None:
        # Not woken on every chunk: it sleeps until the earliest moment a wait could be
        # over, then looks again.
        pause = self._timeout_s
        while not self._stop.wait(pause):
            with self._lock:
                since = self._waiting_since
                left = (
                    self._timeout_s if since is None else since + self._timeout_s - time.monotonic()
                )
                if left <= 0:
                    self.fired = True
            if self.fired:
                self._call.cancel()
                return
            pause = left


def _stream_into(
    channel: grpc.Channel,
    sha256: str,
    offset: int,
    size: int,
    part: Path,
    progress: Progress | None,
    stall_timeout_s: float,
    command_id: str,
) -> None:
    # With a command id, even a download already whole asks once: the controller's
    # answer is where a withdrawn command is refused.
    if offset == size and not command_id:
        return
    deadline = stall_timeout_s + _DEADLINE_SLACK_S + (size - offset) / _DEADLINE_FLOOR_BYTES_PER_S
    request = artifacts_pb2.DownloadRequest(sha256=sha256, offset=offset, command_id=command_id)
    # No deserializer: each message arrives as its bytes, decoded by decode_chunk.
    stream = channel.unary_stream(
        DOWNLOAD_METHOD,
        request_serializer=artifacts_pb2.DownloadRequest.SerializeToString,
        response_deserializer=None,
    )
    call = stream(request, timeout=deadline)
    with _StallWatch(call, stall_timeout_s) as watch, part.open("ab") as out:
        try:
            while True:
                watch.waiting()
                message = next(call, None)
                if message is None:
                    break
                chunk = decode_chunk(message)
                if chunk.data:
                    watch.arrived()
                _check(chunk, offset, size)
                out.write(chunk.data)
                offset += len(chunk.data)
                if progress is not None:
                    progress(offset, size)
        except grpc.RpcError as exc:
            if watch.fired and exc.code() == grpc.StatusCode.CANCELLED:
                raise _Stalled(
                    f"no data from the controller for {stall_timeout_s:g} s after {offset} "
                    f"of {size} bytes: the connection is open but nothing comes (a stalled "
                    "controller or link); see the controller's log and disk, then start the "
                    "job again"
                ) from exc
            raise
        finally:
            # Ends the call on the controller too when the gateway stopped reading early.
            call.cancel()
        out.flush()
    if offset != size:
        raise DownloadFailed(f"the stream ended at byte {offset} of {size}")


def _check(chunk: WireChunk, offset: int, size: int) -> None:
    """Raise DownloadFailed unless ``chunk`` continues a download at ``offset`` of an
    artifact of ``size`` bytes (its signed length) without going past its end."""
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
