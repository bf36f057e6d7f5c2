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
    stall_timeout_s: float = 30.0,
    busy_timeout_s: float = BUSY_TIMEOUT_S,
    busy_backoff: Backoff = _BUSY_BACKOFF,
) -> DownloadResult:
    """Download the artifact ``sha256`` of ``size`` bytes to ``dest`` from the controller's
    gateway port ``controller``: over ``channel`` when given (the one the metadata update
    used), else over a channel of its own, TLS with ``credentials`` (the gateway's
    certificate), closed on return.

    Streams that break are resumed, up to ``max_attempts`` attempts that fail; refusals
    because the controller is busy (RESOURCE_EXHAUSTED) are retried with ``busy_backoff``
    for up to ``busy_timeout_s`` seconds in a row. Raises DownloadFailed when either runs
    out, or at once on an error retrying cannot fix (e.g. NOT_FOUND); ValueError when
    neither ``channel`` nor ``credentials`` is given.
    """
    if channel is None:
        if credentials is None:
            raise ValueError("download needs a channel or the credentials to open one")
        with ControllerChannel(controller, credentials) as own:
            return _download(controller, sha256, size, dest, own, progress, max_attempts,
                             stall_timeout_s, busy_timeout_s, busy_backoff)  # fmt: skip
    return _download(controller, sha256, size, dest, channel, progress, max_attempts,
                     stall_timeout_s, busy_timeout_s, busy_backoff)  # fmt: skip


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
            _stream_into(channel.get(), sha256, offset, size, part, progress, stall_timeout_s)
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
                channel.reset()
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
    channel: grpc.Channel,
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
    # No deserializer: each message arrives as its bytes, decoded by decode_chunk.
    stream = channel.unary_stream(
        DOWNLOAD_METHOD,
        request_serializer=artifacts_pb2.DownloadRequest.SerializeToString,
        response_deserializer=None,
    )
    with part.open("ab") as out:
        for message in stream(request, timeout=timeout):
            chunk = decode_chunk(message)
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
