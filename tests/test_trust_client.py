"""Gateways verify a release with python-tuf's client before staging it: each attack of TUF's
threat model that applies here is tried, and nothing is accepted."""

from __future__ import annotations

import http.server
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import timedelta
from functools import partial
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata

from hitless.trust import keys, release
from hitless.trust.client import DirectorySource, TrustClient, verify_artifact
from hitless.trust.errors import (
    ArtifactMismatch,
    BadSignature,
    ExpiredMetadata,
    FetchFailed,
    MetadataMismatch,
    MetadataNotFound,
    RollbackRefused,
    UnknownTarget,
)
from hitless.trust.repository import Repository
from tests.support.trust import World, forge_publish, make_world, sha256, signed, targets_listing

NAME = "hitless-1.0.0.tar.gz"


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path)


class Served:
    """A source that serves the repository, except the names it is told to fake."""

    def __init__(self, directory: Path) -> None:
        self.inner = DirectorySource(directory)
        self.fakes: dict[str, Callable[[], bytes]] = {}
        self.asked: list[str] = []

    def fetch_metadata(self, name: str) -> bytes:
        self.asked.append(name)
        fake = self.fakes.get(name)
        return fake() if fake else self.inner.fetch_metadata(name)


def test_a_listed_target_is_returned_with_its_signed_length_and_sha256(world: World) -> None:
    target = world.client().target(NAME)
    content = world.artifacts[NAME].read_bytes()
    assert (target.length, target.hashes) == (len(content), {"sha256": sha256(content)})
    verify_artifact(world.artifacts[NAME], target)


def test_an_artifact_not_in_targets_is_refused(world: World) -> None:
    with pytest.raises(UnknownTarget, match="never released, or it was yanked"):
        world.client().target("hitless-6.6.6.tar.gz")


def test_a_yanked_release_is_refused_from_then_on(world: World) -> None:
    client = world.client()
    assert client.target(NAME)
    world.publish(remove=(NAME,))
    with pytest.raises(UnknownTarget):
        client.target(NAME)
    with pytest.raises(UnknownTarget):
        world.client("fresh-cache").target(NAME)


def test_nothing_published_yet_is_named(tmp_path: Path) -> None:
    paths = keys.init(tmp_path / "k")
    Repository(tmp_path / "repo", paths.root_json.read_bytes(), paths.online)
    source = DirectorySource(tmp_path / "repo")
    client = TrustClient(paths.root_json.read_bytes(), tmp_path / "c", source)
    with pytest.raises(MetadataNotFound, match=r"timestamp\.json"):
        client.target(NAME)


def test_unsigned_targets_from_a_compromised_controller_are_refused(world: World) -> None:
    now = keys.utcnow()
    evil = world.artifact("evil.tar.gz", b"evil")
    listing = targets_listing("evil.tar.gz", evil.read_bytes(), 2, now)
    forge_publish(world, Metadata(listing).to_bytes(), 2, 2, 2, now)
    with pytest.raises(BadSignature) as caught:
        world.client().target("evil.tar.gz")
    assert (caught.value.role, caught.value.version, caught.value.signed_by) == ("targets", 2, ())


def test_targets_signed_by_a_key_root_does_not_delegate_to_are_refused(world: World) -> None:
    now = keys.utcnow()
    attacker = CryptoSigner.generate_ed25519()
    listing = targets_listing("evil.tar.gz", b"evil", 2, now)
    forge_publish(world, signed(listing, attacker, world.signer("snapshot")), 2, 2, 2, now)
    with pytest.raises(BadSignature) as caught:
        world.client().target("evil.tar.gz")
    err = caught.value
    assert attacker.public_key.keyid in err.signed_by
    assert err.expected == tuple(world.repo.root.roles["targets"].keyids)
    assert "targets version 2" in str(err)


def test_replayed_older_timestamp_is_refused(world: World) -> None:
    old_timestamp = world.repo.metadata("timestamp.json")
    world.artifact("v2", b"two")
    world.publish(add={"v2": world.artifacts["v2"]})
    source = Served(world.repo_dir)
    client = world.client(source=source)
    assert client.target("v2")

    source.fakes["timestamp.json"] = lambda: old_timestamp
    with pytest.raises(RollbackRefused) as caught:
        client.target(NAME)
    assert (caught.value.role, caught.value.version) == ("timestamp", 1)


def test_a_snapshot_rolled_back_by_a_compromised_controller_is_refused(world: World) -> None:
    world.artifact("v2", b"two")
    world.publish(add={"v2": world.artifacts["v2"]})
    client = world.client()
    assert client.target("v2")
    # New timestamp and snapshot, validly signed with the online keys, naming targets v1.
    forge_publish(world, world.repo.metadata("1.targets.json"), 1, 3, 3, keys.utcnow())
    with pytest.raises(RollbackRefused) as caught:
        client.target("v2")
    assert caught.value.role == "snapshot"


def test_an_expired_timestamp_is_refused(world: World) -> None:
    world.repo.accept_targets(
        release.sign_targets(world.targets, world.keys.dir, remove=()),
        now=keys.utcnow() - timedelta(days=2),
    )
    with pytest.raises(ExpiredMetadata) as caught:
        world.client().target(NAME)
    assert caught.value.role == "timestamp"
    world.repo.refresh()
    assert world.client().target(NAME)


def test_an_artifact_longer_than_signed_is_refused(world: World) -> None:
    target = world.client().target(NAME)
    path = world.artifacts[NAME]
    with path.open("ab") as f:
        f.write(b"\0" * 10_000_000)
    with pytest.raises(ArtifactMismatch, match="must not be staged"):
        verify_artifact(path, target)


def test_an_altered_artifact_is_refused(world: World) -> None:
    target = world.client().target(NAME)
    path = world.artifacts[NAME]
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactMismatch):
        verify_artifact(path, target)


def test_endless_metadata_stops_at_the_clients_limit(world: World) -> None:
    source = Served(world.repo_dir)
    source.fakes["timestamp.json"] = lambda: b" " * 1_000_000
    with pytest.raises(MetadataMismatch, match="longer than the client accepts") as caught:
        world.client(source=source).target(NAME)
    assert caught.value.role == "timestamp"


def test_a_snapshot_of_another_version_is_refused(world: World) -> None:
    world.artifact("v2", b"two")
    world.publish(add={"v2": world.artifacts["v2"]})
    source = Served(world.repo_dir)
    source.fakes["2.snapshot.json"] = lambda: world.repo.metadata("1.snapshot.json")
    with pytest.raises(MetadataMismatch, match="mix-and-match") as caught:
        world.client(source=source).target("v2")
    assert (caught.value.role, caught.value.version) == ("snapshot", 2)


def test_targets_of_another_version_are_refused(world: World) -> None:
    world.artifact("v2", b"two")
    world.publish(add={"v2": world.artifacts["v2"]})
    source = Served(world.repo_dir)
    source.fakes["2.targets.json"] = lambda: world.repo.metadata("1.targets.json")
    with pytest.raises(MetadataMismatch) as caught:
        world.client(source=source).target(NAME)
    assert (caught.value.role, caught.value.version) == ("targets", 2)


def test_a_client_with_the_old_root_follows_a_root_rotation(world: World) -> None:
    anchor = world.keys.root_json.read_bytes()
    client = world.client()
    assert client.target(NAME)
    old_targets_key = world.signer("targets")

    new_root = keys.rotate(world.keys.dir, ["root", "targets"])
    world.targets = release.sign_targets(None, world.keys.dir, add=dict(world.artifacts))
    world.targets = release.sign_targets(world.targets, world.keys.dir)  # version 2
    assert world.repo.accept_root(new_root, world.targets) == 2

    assert client.target(NAME)
    assert client.trusted_root().version == 2
    fresh = TrustClient(anchor, world.tmp / "fresh", DirectorySource(world.repo_dir))
    assert fresh.target(NAME).length == world.artifacts[NAME].stat().st_size

    # The retired targets key no longer signs anything a client accepts.
    listing = targets_listing("evil.tar.gz", b"evil", 3, keys.utcnow())
    with pytest.raises(BadSignature):
        world.repo.accept_targets(signed(listing, old_targets_key))
    forge_publish(world, signed(listing, old_targets_key), 3, 9, 9, keys.utcnow())
    with pytest.raises(BadSignature):
        client.target("evil.tar.gz")


def test_an_update_that_fails_keeps_the_newest_root_verified(world: World) -> None:
    source = Served(world.repo_dir)
    client = world.client(source=source)
    new_root = keys.rotate(world.keys.dir, ["command"])
    assert world.repo.accept_root(new_root) == 2
    assert client.refresh().version == 2
    new_command_key = set(keys.command_keys(client.trusted_root()))

    def unreachable() -> bytes:
        raise FetchFailed("the controller does not answer")

    source.fakes["timestamp.json"] = unreachable
    with pytest.raises(FetchFailed):
        client.refresh()
    # Trust does not fall back to the anchor, whose command key was retired.
    assert client.trusted_root().version == 2
    assert set(keys.command_keys(client.trusted_root())) == new_command_key


def test_a_cache_verified_from_another_anchor_is_not_trusted(world: World) -> None:
    client = world.client()
    assert world.repo.accept_root(keys.rotate(world.keys.dir, ["command"])) == 2
    assert client.refresh().version == 2
    other = keys.init(world.tmp / "other")
    stranger = TrustClient(
        other.root_json.read_bytes(), world.tmp / "cache", DirectorySource(world.repo_dir)
    )
    # The cache holds version 2 of the first root's lineage: not trusted from this anchor.
    assert stranger.trusted_root().version == 1
    assert set(keys.command_keys(stranger.trusted_root())) == {
        keys.load_signer(other.key("command")).public_key.keyid
    }


def test_a_rotated_root_not_signed_by_the_old_root_key_is_refused(world: World) -> None:
    impostor = keys.init(world.tmp / "impostor")
    md = Metadata.from_bytes(impostor.root_json.read_bytes())
    md.signed.version = 2
    (world.repo_dir / "2.root.json").write_bytes(
        signed(md.signed, keys.load_signer(impostor.key("root")))
    )
    client = world.client()
    with pytest.raises(BadSignature) as caught:
        client.target(NAME)
    assert (caught.value.role, caught.value.version) == ("root", 2)
    assert client.trusted_root().version == 1


def test_a_source_that_fails_is_a_fetch_failure(world: World) -> None:
    source = Served(world.repo_dir)

    def broken() -> bytes:
        raise ConnectionResetError("peer went away")

    source.fakes["timestamp.json"] = broken
    with pytest.raises(FetchFailed, match=r"timestamp\.json"):
        world.client(source=source).target(NAME)


class HttpSource:
    def __init__(self, base: str) -> None:
        self.base = base

    def fetch_metadata(self, name: str) -> bytes:
        try:
            with urllib.request.urlopen(self.base + name, timeout=5) as resp:
                data: bytes = resp.read(5_000_001)
                return data
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise MetadataNotFound(f"{name}: HTTP 404") from exc
            raise FetchFailed(f"{name}: HTTP {exc.code}") from exc


@pytest.fixture
def http_base(world: World) -> Iterator[str]:
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(world.repo_dir))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined,method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_verification_over_a_loopback_http_server(world: World, http_base: str) -> None:
    client = world.client(source=HttpSource(http_base))
    assert client.target(NAME).length == world.artifacts[NAME].stat().st_size
    world.publish(remove=(NAME,))
    with pytest.raises(UnknownTarget):
        client.target(NAME)
