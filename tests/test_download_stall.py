"""A download from a controller that is connected but silent ends within its stall timeout,
with a reason that names the stall and the bytes it got, long before the stream's deadline;
a stall is resumed like a broken stream; a stream that is slow but keeps moving is left
alone. Real gRPC servers on loopback with mutual TLS, as the controller's gateway port."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from controller_svc.server import CHUNK_SIZE, ArtifactsService, add_artifacts
from controller_svc.store import ArtifactStore
from gateway_daemon.download import download
from gateway_daemon.errors import DownloadFailed
from gateway_daemon.identity import Identity
from hitless.config import HostPort
from hitless.pki import CertificateAuthority
from hitless.trust import keys
from hitless.trust.repository import Repository
from hitless.v1 import artifacts_pb2
from tests.support import certificates
from tests.support.proxy import CuttingProxy
from tests.support.wait import wait_for

STALL_S = 1.0
CHUNK = 64 * 1024
SIZE = 10 * CHUNK + 77
SERVICE = "hitless.v1.Artifacts"
SHA = "ab" * 32  # the fake controller serves DATA under any digest
DATA = os.urandom(SIZE)
# The stream's deadline with STALL_S is over 31 s: a failure within this came from the
# stall timeout, not the deadline.
WELL_BEFORE_THE_DEADLINE_S = 10.0
# How late after the stall timeout a busy machine may let the download give up.
LATE_S = 1.0


@dataclass
class _Call:
    offset: int
    went_silent_at: float | None = None
    ended: threading.Event = field(default_factory=threading.Event)


class _Controller:
    """Serves DATA from the offset asked for, CHUNK bytes a message, ``pace_s`` apart. The
    first ``silent_calls`` calls go silent once ``silent_after`` bytes of DATA are sent:
    the call stays open, sending nothing, until the client ends it."""

    def __init__(self, *, silent_after: int = SIZE, silent_calls: int = 0, pace_s: float = 0):
        self.silent_after = silent_after
        self.silent_calls = silent_calls
        self.pace_s = pace_s
        self.calls: list[_Call] = []

    def Download(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        call = _Call(request.offset)
        self.calls.append(call)
        context.add_callback(call.ended.set)
        stop = self.silent_after if len(self.calls) <= self.silent_calls else SIZE
        for offset in range(request.offset, stop, CHUNK):
            # Pacing only: a slow controller, not a wait for anything.
            if self.pace_s and call.ended.wait(self.pace_s):
                return
            data = DATA[offset : min(offset + CHUNK, stop)]
            yield artifacts_pb2.Chunk(offset=offset, data=data, total_size=SIZE)
        if stop < SIZE:
            call.went_silent_at = time.monotonic()
            call.ended.wait(timeout=60)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return certificates.certificate_authority(tmp_path / "pki")


@pytest.fixture
def gateway(ca: CertificateAuthority) -> Identity:
    return certificates.gateway_identity(ca, "gw-1", 0)


def _serve(
    servicer: Any, ca: CertificateAuthority, *, artifacts: bool = False
) -> tuple[grpc.Server, int]:
    """A started server for ``servicer`` on a loopback port that requires a client
    certificate from ``ca``, and that port."""
    server = grpc.server(futures.ThreadPoolExecutor(4))
    if artifacts:
        add_artifacts(servicer, server)
    else:
        # Download alone, as the generated code would serve it.
        download_handler = grpc.unary_stream_rpc_method_handler(
            servicer.Download,
            request_deserializer=artifacts_pb2.DownloadRequest.FromString,
            response_serializer=artifacts_pb2.Chunk.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Download": download_handler}),)
        )
    credentials = ca.server_credentials(require_client_certificate=True)
    port: int = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port


class _Progress:
    """The progress callback: when bytes last arrived, and the largest gap between them."""

    def __init__(self) -> None:
        self.done = 0
        self.last_at = time.monotonic()
        self.largest_gap_s = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        self.largest_gap_s = max(self.largest_gap_s, now - self.last_at)
        self.done, self.last_at = done, now


def test_a_controller_that_goes_silent_mid_stream_fails_the_download_within_the_stall_timeout(
    ca: CertificateAuthority, gateway: Identity, tmp_path: Path
) -> None:
    controller = _Controller(silent_after=3 * CHUNK, silent_calls=1)
    server, port = _serve(controller, ca)
    dest = tmp_path / "a.pyz"
    progress = _Progress()
    started = time.monotonic()
    try:
        with pytest.raises(DownloadFailed) as failed:
            download(
                HostPort("127.0.0.1", port), SHA, SIZE, dest,
                credentials=gateway.channel_credentials(), progress=progress,
                stall_timeout_s=STALL_S, max_attempts=1,
            )  # fmt: skip
        failed_at = time.monotonic()
        # The gateway cancelled the call: the controller sees it end.
        wait_for(lambda: controller.calls[0].ended.is_set(), timeout=5,
                 what="the controller to see the silent call ended")  # fmt: skip
    finally:
        server.stop(0).wait()
    reason = str(failed.value)
    assert re.search(
        rf"failed after 1 attempt\(s\): no data from the controller for 1 s after "
        rf"{3 * CHUNK} of {SIZE} bytes",
        reason,
    ), reason
    assert "DEADLINE_EXCEEDED" not in reason
    assert controller.calls[0].went_silent_at is not None
    assert progress.done == 3 * CHUNK
    silent_for = failed_at - progress.last_at
    assert STALL_S <= silent_for <= STALL_S + LATE_S, (
        f"the download gave up {silent_for:.2f} s after its last bytes; "
        f"its stall timeout is {STALL_S} s"
    )
    assert failed_at - started < WELL_BEFORE_THE_DEADLINE_S
    # Nothing is left where a whole artifact would be; the part file holds exactly the
    # bytes that came, for a later download to resume from.
    assert not dest.exists()
    assert dest.with_name("a.pyz.part").read_bytes() == DATA[: 3 * CHUNK]


def test_a_stalled_stream_is_resumed_from_its_offset_on_a_new_call(
    ca: CertificateAuthority, gateway: Identity, tmp_path: Path
) -> None:
    controller = _Controller(silent_after=4 * CHUNK, silent_calls=1)
    server, port = _serve(controller, ca)
    try:
        result = download(
            HostPort("127.0.0.1", port), SHA, SIZE, tmp_path / "a.pyz",
            credentials=gateway.channel_credentials(), stall_timeout_s=STALL_S, max_attempts=3,
        )  # fmt: skip
    finally:
        server.stop(0).wait()
    assert [call.offset for call in controller.calls] == [0, 4 * CHUNK]
    assert (result.attempts, result.resumed_from) == (2, (4 * CHUNK,))
    assert result.path.read_bytes() == DATA
    assert not (tmp_path / "a.pyz.part").exists()


def test_a_slow_stream_that_keeps_moving_is_not_cut(
    ca: CertificateAuthority, gateway: Identity, tmp_path: Path
) -> None:
    controller = _Controller(pace_s=0.3)
    server, port = _serve(controller, ca)
    progress = _Progress()
    started = time.monotonic()
    try:
        result = download(
            HostPort("127.0.0.1", port), SHA, SIZE, tmp_path / "a.pyz",
            credentials=gateway.channel_credentials(), progress=progress,
            stall_timeout_s=STALL_S, max_attempts=1,
        )  # fmt: skip
    finally:
        server.stop(0).wait()
    took = time.monotonic() - started
    # Eleven chunks 0.3 s apart: the stream lasts several stall timeouts, no gap one.
    assert took > 3 * STALL_S, f"the stream took {took:.2f} s: too fast to test anything"
    assert progress.largest_gap_s < STALL_S, progress.largest_gap_s
    assert (result.attempts, len(controller.calls)) == (1, 1)
    assert result.path.read_bytes() == DATA


def test_a_link_that_stops_carrying_data_is_a_stall_too(
    ca: CertificateAuthority, gateway: Identity, tmp_path: Path
) -> None:
    """The controller's real Artifacts service behind a link that stops forwarding its
    bytes once the first chunk has come: the controller is fine, the path to it is dead."""
    paths = keys.init(tmp_path / "keys")
    store = ArtifactStore(tmp_path / "store")
    data = os.urandom(24 * CHUNK_SIZE)
    sha = store.put([data]).sha256
    service = ArtifactsService(
        store, Repository(tmp_path / "tuf", paths.root_json.read_bytes(), paths.online)
    )
    server, port = _serve(service, ca, artifacts=True)
    link = threading.Event()
    link.set()
    progress = _Progress()

    def cut_the_link(done: int, total: int) -> None:
        progress(done, total)
        link.clear()

    dest = tmp_path / "a.pyz"
    try:
        with CuttingProxy(("127.0.0.1", port), gate=link) as proxy:
            with pytest.raises(DownloadFailed) as failed:
                download(
                    HostPort("127.0.0.1", proxy.port), sha, len(data), dest,
                    credentials=gateway.channel_credentials(), progress=cut_the_link,
                    stall_timeout_s=STALL_S, max_attempts=1,
                )  # fmt: skip
            failed_at = time.monotonic()
            link.set()  # lets the proxy's threads finish
    finally:
        server.stop(0).wait()
    reason = str(failed.value)
    assert f"no data from the controller for 1 s after {progress.done} of {len(data)} bytes" in (
        reason
    ), reason
    assert 0 < progress.done < len(data)
    assert STALL_S <= failed_at - progress.last_at <= STALL_S + LATE_S
    assert not dest.exists()
    assert dest.with_name("a.pyz.part").read_bytes() == data[: progress.done]


@pytest.mark.parametrize("stall_timeout_s", [0, -1])
def test_a_stall_timeout_that_is_not_positive_is_refused(
    stall_timeout_s: float, gateway: Identity, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="stall timeout"):
        download(
            HostPort("127.0.0.1", 1), SHA, SIZE, tmp_path / "a.pyz",
            credentials=gateway.channel_credentials(), stall_timeout_s=stall_timeout_s,
        )  # fmt: skip
