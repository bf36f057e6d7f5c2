"""Artifact streaming: chunks encoded and decoded on the wire without protobuf messages in
between (checked against the generated code), a download resumed from an offset in the
controller's chunks, one connection for a gateway's metadata fetches and its download,
and a controller whose download slots are all held still answering short calls on both
ports."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent import futures
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import pytest

from controller_svc.limits import Budget, Limits
from controller_svc.server import CHUNK_SIZE, ArtifactsService, add_artifacts, chunk_bytes
from controller_svc.store import ArtifactStore
from gateway_daemon.download import ControllerChannel, decode_chunk, download
from gateway_daemon.errors import DownloadFailed
from gateway_daemon.identity import Identity
from gateway_daemon.trust import ControllerSource
from hitless.config import BusConfig, HostPort
from hitless.pki import CertificateAuthority
from hitless.trust import keys
from hitless.trust.repository import Repository
from hitless.v1 import artifacts_pb2, artifacts_pb2_grpc, controller_pb2, controller_pb2_grpc
from tests.support import certificates
from tests.support.proxy import CuttingProxy
from tests.test_controller_limits import (
    QUICK_S,
    pending_job,
    running_controller,
    stalled_downloads,
    timed,
)

SIZE = 3 * CHUNK_SIZE + 12345

# -- the wire encoding, without a server --------------------------------------------


@pytest.mark.parametrize(
    ("offset", "data", "total"),
    [(0, b"", 0), (0, b"abc", 3), (5, b"x", 6), (1 << 40, bytes(range(256)) * 9, (1 << 41) + 7)],
)
def test_chunk_bytes_are_what_protobuf_serializes_and_decode_back(
    offset: int, data: bytes, total: int
) -> None:
    generated = artifacts_pb2.Chunk(offset=offset, data=data, total_size=total)
    assert chunk_bytes(offset, data, total) == generated.SerializeToString()
    decoded = decode_chunk(generated.SerializeToString())
    assert (decoded.offset, bytes(decoded.data), decoded.total_size) == (offset, data, total)


def test_decoding_takes_any_field_order_and_skips_unknown_fields() -> None:
    # total_size, an unknown varint (field 9), an unknown fixed32 (field 10), data, offset.
    message = b"\x18\x80\x08" + b"\x48\x07" + b"\x55\x01\x02\x03\x04" + b"\x12\x02hi" + b"\x08\x7e"
    parsed = artifacts_pb2.Chunk.FromString(message)
    assert (parsed.offset, parsed.data, parsed.total_size) == (126, b"hi", 1024)
    decoded = decode_chunk(message)
    assert (decoded.offset, bytes(decoded.data), decoded.total_size) == (126, b"hi", 1024)


@pytest.mark.parametrize(
    "message",
    [b"\x12\x05abc", b"\x08", b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x0b"],
    ids=["data-past-the-end", "cut-varint", "varint-too-long", "group-wire-type"],
)
def test_a_malformed_chunk_stops_the_download(message: bytes) -> None:
    with pytest.raises(DownloadFailed, match=r"not a hitless\.v1\.Chunk"):
        decode_chunk(message)


# -- a real Artifacts service -------------------------------------------------------


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return certificates.certificate_authority(tmp_path / "pki")


@pytest.fixture
def gateway(ca: CertificateAuthority) -> Identity:
    return certificates.gateway_identity(ca, "gw-1", 0)


class _Recording(ArtifactsService):
    """The Artifacts service, keeping the peer (client address and port, so one per
    connection) of each call in ``peers``."""

    def __init__(self, store: ArtifactStore, metadata: Repository) -> None:
        super().__init__(store, metadata)
        self.store = store
        self.peers: list[str] = []

    def FetchMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.peers.append(context.peer())
        return super().FetchMetadata(request, context)

    def Download(self, request: Any, context: grpc.ServicerContext) -> Iterator[bytes]:
        self.peers.append(context.peer())
        yield from super().Download(request, context)


@pytest.fixture
def service(tmp_path: Path) -> _Recording:
    paths = keys.init(tmp_path / "keys")
    repository = Repository(tmp_path / "tuf", paths.root_json.read_bytes(), paths.online)
    return _Recording(ArtifactStore(tmp_path / "store"), repository)


@pytest.fixture
def artifacts(service: _Recording, ca: CertificateAuthority) -> Iterator[tuple[int, str, bytes]]:
    """The controller's Artifacts service (as ``build_server`` serves it) on a loopback
    port that requires a client certificate from ``ca``: its port, the sha256 of a stored
    artifact of SIZE random bytes, and those bytes."""
    data = os.urandom(SIZE)
    stored = service.store.put([data])
    server = grpc.server(futures.ThreadPoolExecutor(4))
    add_artifacts(service, server)
    credentials = ca.server_credentials(require_client_certificate=True)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield port, stored.sha256, data
    finally:
        server.stop(0).wait()


def test_a_download_resumes_from_its_offset_in_whole_chunks(
    artifacts: tuple[int, str, bytes], gateway: Identity, tmp_path: Path
) -> None:
    port, sha, data = artifacts
    dest = tmp_path / "a.pyz"
    # What an earlier attempt left: a part file ending inside the second chunk.
    had = CHUNK_SIZE + 4321
    dest.with_name("a.pyz.part").write_bytes(data[:had])
    progress: list[int] = []
    result = download(
        HostPort("127.0.0.1", port), sha, SIZE, dest,
        credentials=gateway.channel_credentials(),
        progress=lambda done, total: progress.append(done),
    )  # fmt: skip
    # The controller sends CHUNK_SIZE bytes at a time from the offset asked for.
    assert progress == [had + CHUNK_SIZE, had + 2 * CHUNK_SIZE, SIZE]
    assert result.attempts == 1
    assert dest.read_bytes() == data
    assert not dest.with_name("a.pyz.part").exists()


def test_metadata_fetches_and_the_download_share_one_connection(
    artifacts: tuple[int, str, bytes], service: _Recording, gateway: Identity, tmp_path: Path
) -> None:
    port, sha, data = artifacts
    address = HostPort("127.0.0.1", port)
    with ControllerChannel(address, gateway.channel_credentials()) as channel:
        source = ControllerSource(address, gateway.channel_credentials(), channel)
        root = source.fetch_metadata("1.root.json")
        assert source.fetch_metadata("1.root.json") == root
        result = download(address, sha, SIZE, tmp_path / "a.pyz", channel=channel)
    assert result.path.read_bytes() == data
    assert len(service.peers) == 3
    assert len(set(service.peers)) == 1, f"calls came over several connections: {service.peers}"


def test_a_broken_connection_is_left_and_the_next_call_opens_another(
    artifacts: tuple[int, str, bytes], gateway: Identity, tmp_path: Path
) -> None:
    port, sha, data = artifacts
    with CuttingProxy(("127.0.0.1", port), cut_after=2 * CHUNK_SIZE + 100) as proxy:
        address = HostPort("127.0.0.1", proxy.port)
        with ControllerChannel(address, gateway.channel_credentials()) as channel:
            result = download(address, sha, SIZE, tmp_path / "a.pyz", channel=channel)
            assert result.attempts == 2
            assert 0 < result.resumed_from[0] < SIZE
            ControllerSource(address, gateway.channel_credentials(), channel).fetch_metadata(
                "1.root.json"
            )
        assert result.path.read_bytes() == data
        assert proxy.connections == 2


# -- a real controller --------------------------------------------------------------


def test_short_calls_answer_on_both_ports_while_every_download_slot_is_held(
    tmp_path: Path, bus: BusConfig
) -> None:
    slots = 4
    limits = Limits(download=Budget(slots, stall_s=60.0))
    with running_controller(tmp_path, bus, limits) as ctl, ExitStack() as stack:
        job_id, sha = pending_job(ctl.repo, ctl.store)
        held = stalled_downloads(stack, ctl, sha, slots)
        with pytest.raises(grpc.RpcError) as refused, ctl.gateway_channel() as channel:
            next(
                artifacts_pb2_grpc.ArtifactsStub(channel).Download(
                    artifacts_pb2.DownloadRequest(sha256=sha), timeout=QUICK_S
                )
            )
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with ctl.channel() as channel:
            stub = controller_pb2_grpc.ControllerStub(channel)
            listed = timed(
                lambda: stub.ListGateways(controller_pb2.ListGatewaysRequest(), timeout=QUICK_S)
            )
            got = timed(
                lambda: stub.GetJob(controller_pb2.GetJobRequest(job_id=job_id), timeout=QUICK_S)
            )
        with ctl.gateway_channel() as channel:
            fetched = timed(
                lambda: artifacts_pb2_grpc.ArtifactsStub(channel).FetchMetadata(
                    artifacts_pb2.MetadataRequest(name="1.root.json"), timeout=QUICK_S
                )
            )
        assert max(listed, got, fetched) < QUICK_S, (listed, got, fetched)
        assert all(call.is_active() for call in held), "a held download was ended"
