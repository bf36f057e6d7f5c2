"""Artifact download over the controller's real gRPC server: a stream cut in the middle
resumes from its offset, and the file is whole."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from controller_svc.server import ArtifactsService
from controller_svc.store import ArtifactStore
from gateway_daemon.download import download
from gateway_daemon.errors import DownloadFailed
from gateway_daemon.verify import verify
from hitless.config import HostPort
from hitless.v1 import artifacts_pb2_grpc
from tests.support.proxy import CuttingProxy

SIZE = 6 * 1024 * 1024 + 123


@pytest.fixture
def artifact_server(tmp_path: Path) -> Iterator[tuple[int, str, bytes]]:
    store = ArtifactStore(tmp_path / "store")
    data = os.urandom(SIZE)
    stored = store.put([data[i : i + 65536] for i in range(0, SIZE, 65536)])
    server = grpc.server(futures.ThreadPoolExecutor(4))
    artifacts_pb2_grpc.add_ArtifactsServicer_to_server(ArtifactsService(store), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, stored.sha256, data
    finally:
        server.stop(0).wait()


def test_cut_stream_resumes_from_its_offset(
    artifact_server: tuple[int, str, bytes], tmp_path: Path
) -> None:
    port, sha, data = artifact_server
    progress: list[int] = []
    with CuttingProxy(("127.0.0.1", port), cut_after=2 * 1024 * 1024) as proxy:
        result = download(
            HostPort("127.0.0.1", proxy.port),
            sha,
            SIZE,
            tmp_path / "a.pyz",
            progress=lambda done, total: progress.append(done),
        )
    assert proxy.connections >= 2
    assert result.attempts >= 2
    assert 0 < result.resumed_from[0] < SIZE
    assert progress[-1] == SIZE
    assert progress == sorted(progress), "progress went backwards: bytes were fetched twice"
    verify(result.path, sha256=sha, size=SIZE)
    assert result.path.read_bytes() == data
    assert not (tmp_path / "a.pyz.part").exists()


def test_unknown_artifact_fails_without_retrying_forever(
    artifact_server: tuple[int, str, bytes], tmp_path: Path
) -> None:
    port, _, _ = artifact_server
    with pytest.raises(DownloadFailed, match="NOT_FOUND"):
        download(HostPort("127.0.0.1", port), "ab" * 32, 10, tmp_path / "x.pyz")
