"""The content-addressed artifact store: atomic puts, expectations, offsets, bad digests."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller_svc.errors import InvalidRequest, NotFound
from controller_svc.store import ArtifactStore, StoredArtifact

DATA = b"release payload " * 1000
DIGEST = hashlib.sha256(DATA).hexdigest()


def _chunks(data: bytes, size: int = 4096) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


def _leftovers(store: ArtifactStore) -> list[Path]:
    return list((store.root / ".incoming").iterdir())


def test_put_stores_by_digest_and_reads_back(store: ArtifactStore) -> None:
    stored = store.put(_chunks(DATA), expected_sha256=DIGEST, expected_size=len(DATA))
    assert stored == StoredArtifact(DIGEST, len(DATA))
    assert store.exists(DIGEST)
    assert store.size(DIGEST) == len(DATA)
    assert store.path(DIGEST) == store.root / DIGEST[:2] / DIGEST
    with store.open_at(DIGEST, 0) as handle:
        assert handle.read() == DATA
    assert _leftovers(store) == []


def test_put_without_expectations_and_again_is_idempotent(store: ArtifactStore) -> None:
    first = store.put([DATA])
    second = store.put(_chunks(DATA, 7))
    assert first == second == StoredArtifact(DIGEST, len(DATA))
    assert _leftovers(store) == []


def test_empty_artifact(store: ArtifactStore) -> None:
    stored = store.put([])
    assert stored.size == 0
    assert stored.sha256 == hashlib.sha256(b"").hexdigest()
    with store.open_at(stored.sha256, 0) as handle:
        assert handle.read() == b""


@pytest.mark.parametrize("offset", [1, 4096, len(DATA) - 1, len(DATA)])
def test_open_at_resumes_from_offset(store: ArtifactStore, offset: int) -> None:
    store.put([DATA])
    with store.open_at(DIGEST, offset) as handle:
        assert handle.read() == DATA[offset:]


@pytest.mark.parametrize("offset", [-1, len(DATA) + 1])
def test_open_at_refuses_offsets_outside_the_file(store: ArtifactStore, offset: int) -> None:
    store.put([DATA])
    with pytest.raises(InvalidRequest, match=f"offset {offset} is outside"):
        store.open_at(DIGEST, offset)


def test_digest_mismatch_stores_nothing(store: ArtifactStore) -> None:
    wrong = "0" * 64
    with pytest.raises(InvalidRequest) as info:
        store.put(_chunks(DATA), expected_sha256=wrong)
    assert wrong in str(info.value)
    assert DIGEST in str(info.value)
    assert not store.exists(DIGEST)
    assert _leftovers(store) == []


def test_size_mismatch_stores_nothing(store: ArtifactStore) -> None:
    with pytest.raises(InvalidRequest, match=f"expected 10 bytes, got {len(DATA)}"):
        store.put(_chunks(DATA), expected_size=10)
    assert not store.exists(DIGEST)
    assert _leftovers(store) == []


def test_failing_upload_leaves_no_temp_file(store: ArtifactStore) -> None:
    def broken() -> Iterator[bytes]:
        yield b"partial"
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        store.put(broken())
    assert _leftovers(store) == []


def test_unknown_digest_is_not_found(store: ArtifactStore) -> None:
    assert not store.exists(DIGEST)
    with pytest.raises(NotFound, match=DIGEST):
        store.open_at(DIGEST, 0)
    with pytest.raises(NotFound):
        store.size(DIGEST)
    with pytest.raises(NotFound):
        store.path(DIGEST)


@pytest.mark.parametrize(
    "digest",
    ["", "abc", DIGEST.upper(), DIGEST + "0", "../" + DIGEST[3:], "g" * 64, DIGEST[:63] + "/"],
)
def test_malformed_digests_are_refused(store: ArtifactStore, digest: str) -> None:
    with pytest.raises(InvalidRequest, match="64 lowercase hex"):
        store.exists(digest)
    with pytest.raises(InvalidRequest, match="64 lowercase hex"):
        store.open_at(digest, 0)
    with pytest.raises(InvalidRequest, match="64 lowercase hex"):
        store.put([DATA], expected_sha256=digest)
