"""Artifact download over the controller's real gRPC service, on a port that requires a
gateway's client certificate (mutual TLS) as the controller's gateway port does: a stream
cut in the middle resumes from its offset, and the file is whole; a server that sends more
than the length asked for (the signed length) is cut off there."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from controller_svc.server import ArtifactsService, add_artifacts
from controller_svc.store import ArtifactStore
from gateway_daemon.download import download
from gateway_daemon.errors import DownloadFailed
from gateway_daemon.identity import Identity
from hitless.config import HostPort
from hitless.pki import CertificateAuthority
from hitless.trust import keys
from hitless.trust.repository import Repository
from hitless.v1 import artifacts_pb2, artifacts_pb2_grpc
from tests.support import certificates
from tests.support.proxy import CuttingProxy

SIZE = 6 * 1024 * 1024 + 123


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return certificates.certificate_authority(tmp_path / "pki")


@pytest.fixture
def gateway(ca: CertificateAuthority) -> Identity:
    """gw-1's identity from ``ca`` (the port it names is not used: tests give addresses)."""
    return certificates.gateway_identity(ca, "gw-1", 0)


def serve(server: grpc.Server, ca: CertificateAuthority) -> int:
    """Bind ``server`` to a loopback port that requires a client certificate from ``ca``."""
    credentials = ca.server_credentials(require_client_certificate=True)
    port: int = server.add_secure_port("127.0.0.1:0", credentials)
    return port


@pytest.fixture
def artifact_server(tmp_path: Path, ca: CertificateAuthority) -> Iterator[tuple[int, str, bytes]]:
    store = ArtifactStore(tmp_path / "store")
    data = os.urandom(SIZE)
    stored = store.put([data[i : i + 65536] for i in range(0, SIZE, 65536)])
    server = grpc.server(futures.ThreadPoolExecutor(4))
    add_artifacts(ArtifactsService(store, metadata(tmp_path)), server)
    port = serve(server, ca)
    server.start()
    try:
        yield port, stored.sha256, data
    finally:
        server.stop(0).wait()


def test_cut_stream_resumes_from_its_offset(
    artifact_server: tuple[int, str, bytes], gateway: Identity, tmp_path: Path
) -> None:
    port, sha, data = artifact_server
    progress: list[int] = []
    with CuttingProxy(("127.0.0.1", port), cut_after=2 * 1024 * 1024) as proxy:
        result = download(
            HostPort("127.0.0.1", proxy.port),
            sha,
            SIZE,
            tmp_path / "a.pyz",
            credentials=gateway.channel_credentials(),
            progress=lambda done, total: progress.append(done),
        )
    assert proxy.connections >= 2
    assert result.attempts >= 2
    assert 0 < result.resumed_from[0] < SIZE
    assert progress[-1] == SIZE
    assert progress == sorted(progress), "progress went backwards: bytes were fetched twice"
    assert hashlib.sha256(result.path.read_bytes()).hexdigest() == sha
    assert result.path.read_bytes() == data
    assert not (tmp_path / "a.pyz.part").exists()


def test_unknown_artifact_fails_without_retrying_forever(
    artifact_server: tuple[int, str, bytes], gateway: Identity, tmp_path: Path
) -> None:
    port, _, _ = artifact_server
    with pytest.raises(DownloadFailed, match="NOT_FOUND"):
        download(
            HostPort("127.0.0.1", port), "ab" * 32, 10, tmp_path / "x.pyz",
            credentials=gateway.channel_credentials(),
        )  # fmt: skip


def metadata(tmp_path: Path) -> Repository:
    """An empty TUF repository for the service's metadata side (unused here)."""
    paths = keys.init(tmp_path / "keys")
    return Repository(tmp_path / "tuf", paths.root_json.read_bytes(), paths.online)


class _Endless(ArtifactsService):
    """A controller that says the artifact has the length asked for and sends more."""

    def Download(self, request: object, context: grpc.ServicerContext) -> Iterator[object]:
        for i in range(64):
            yield artifacts_pb2.Chunk(offset=i * 65536, data=b"x" * 65536, total_size=SIGNED)


SIGNED = 100_000


def test_a_stream_longer_than_the_signed_length_is_cut_off_there(
    tmp_path: Path, ca: CertificateAuthority, gateway: Identity
) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(2))
    service = _Endless(ArtifactStore(tmp_path / "store"), metadata(tmp_path))
    artifacts_pb2_grpc.add_ArtifactsServicer_to_server(service, server)
    port = serve(server, ca)
    server.start()
    dest = tmp_path / "a.pyz"
    try:
        with pytest.raises(DownloadFailed, match="more than the signed length of 100000 bytes"):
            download(
                HostPort("127.0.0.1", port), "ab" * 32, SIGNED, dest,
                credentials=gateway.channel_credentials(), max_attempts=1,
            )  # fmt: skip
    finally:
        server.stop(0).wait()
    assert not dest.exists()
    part = dest.with_name(dest.name + ".part")
    assert not part.exists() or part.stat().st_size <= SIGNED
