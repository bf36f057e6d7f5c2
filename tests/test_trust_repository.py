"""The controller's repository: accepts targets it cannot sign, keeps snapshot and timestamp
fresh with its online keys, serves only metadata names."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Snapshot, Targets, Timestamp

from hitless.trust import keys, release
from hitless.trust.errors import (
    BadSignature,
    ExpiredMetadata,
    KeyFileError,
    MalformedMetadata,
    MetadataMismatch,
    MetadataNotFound,
    RollbackRefused,
    UnknownTarget,
)
from hitless.trust.repository import Repository
from tests.support.trust import World, make_world, signed


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path)


def targets_of(world: World) -> Metadata[Targets]:
    return Metadata[Targets].from_bytes(world.targets)


def test_accepted_targets_are_published_with_a_snapshot_and_timestamp(world: World) -> None:
    assert world.repo.metadata("1.targets.json") == world.targets
    snap = Metadata[Snapshot].from_bytes(world.repo.metadata("1.snapshot.json"))
    ts = Metadata[Timestamp].from_bytes(world.repo.metadata("timestamp.json"))
    root = world.repo.root
    root.verify_delegate("snapshot", snap.signed_bytes, snap.signatures)
    root.verify_delegate("timestamp", ts.signed_bytes, ts.signatures)
    snap.signed.meta["targets.json"].verify_length_and_hashes(world.targets)
    ts.signed.snapshot_meta.verify_length_and_hashes(world.repo.metadata("1.snapshot.json"))
    assert world.repo.target("hitless-1.0.0.tar.gz").length == 1200

    world.artifact("hitless-1.1.0.tar.gz", b"two")
    assert world.publish(add={"hitless-1.1.0.tar.gz": world.artifacts["hitless-1.1.0.tar.gz"]}) == 2
    ts = Metadata[Timestamp].from_bytes(world.repo.metadata("timestamp.json"))
    assert (ts.signed.version, ts.signed.snapshot_meta.version) == (2, 2)


def refused(world: World, data: bytes, error: type[Exception]) -> Exception:
    before = world.files()
    with pytest.raises(error) as caught:
        world.repo.accept_targets(data)
    assert world.files() == before, "a refused targets changed the repository"
    return caught.value


def test_unsigned_targets_are_refused(world: World) -> None:
    md = targets_of(world)
    md.signed.version = 2
    md.signatures.clear()
    err = refused(world, md.to_bytes(), BadSignature)
    assert isinstance(err, BadSignature)
    assert (err.role, err.version, err.signed_by) == ("targets", 2, ())
    assert err.expected == tuple(world.repo.root.roles["targets"].keyids)


def test_targets_signed_by_a_key_root_does_not_delegate_to_are_refused(world: World) -> None:
    md = targets_of(world)
    md.signed.version = 2
    attacker = CryptoSigner.generate_ed25519()
    err = refused(world, signed(md.signed, attacker), BadSignature)
    assert attacker.public_key.keyid in str(err)


def test_the_controller_cannot_sign_targets_with_its_online_keys(world: World) -> None:
    md = targets_of(world)
    md.signed.version = 2
    for role in ("snapshot", "timestamp", "command"):
        refused(world, signed(md.signed, world.signer(role)), BadSignature)


def test_targets_altered_after_signing_are_refused(world: World) -> None:
    md = targets_of(world)
    md.signed.version = 2
    data = signed(md.signed, world.signer("targets"))
    tampered = data.replace(b'"length":1200', b'"length":1201')
    assert tampered != data
    refused(world, tampered, BadSignature)


def test_replayed_or_equal_targets_versions_are_refused(world: World) -> None:
    old = world.targets
    world.artifact("v2", b"2")
    world.publish(add={"v2": world.artifacts["v2"]})
    err = refused(world, old, RollbackRefused)
    assert "version 1 is not newer than version 2" in str(err)
    other = targets_of(world)
    other.signed.targets.pop("v2")
    refused(world, signed(other.signed, world.signer("targets")), RollbackRefused)


def test_the_newest_targets_again_is_a_no_op(world: World) -> None:
    world.artifact("v2", b"2")
    world.publish(add={"v2": world.artifacts["v2"]})
    before = world.files()
    assert world.repo.accept_targets(world.targets) == 2
    assert world.files() == before


def test_expired_targets_are_refused(world: World) -> None:
    md = targets_of(world)
    md.signed.version = 2
    md.signed.expires = keys.utcnow() - timedelta(seconds=1)
    refused(world, signed(md.signed, world.signer("targets")), ExpiredMetadata)


def test_bytes_that_are_not_targets_are_refused(world: World) -> None:
    refused(world, b"{not json", MalformedMetadata)
    refused(world, world.repo.metadata("timestamp.json"), MalformedMetadata)


def test_refresh_re_signs_what_would_expire(world: World) -> None:
    now = keys.utcnow()
    assert world.repo.refresh(now) == []
    assert world.repo.refresh(now + timedelta(hours=13)) == ["timestamp"]
    ts = Metadata[Timestamp].from_bytes(world.repo.metadata("timestamp.json")).signed
    assert ts.version == 2 and ts.expires == now + timedelta(hours=13, days=1)

    assert world.repo.refresh(now + timedelta(days=4)) == ["snapshot", "timestamp"]
    snap = Metadata[Snapshot].from_bytes(world.repo.metadata("2.snapshot.json")).signed
    assert snap.meta["targets.json"].version == 1


def test_refresh_before_anything_is_published_does_nothing(tmp_path: Path) -> None:
    paths = keys.init(tmp_path / "k")
    repo = Repository(tmp_path / "repo", paths.root_json.read_bytes(), paths.online)
    assert repo.refresh() == []
    with pytest.raises(MetadataNotFound):
        repo.metadata("timestamp.json")
    with pytest.raises(UnknownTarget, match="none yet"):
        repo.target("anything")


@pytest.mark.parametrize(
    "name", ["../keys/offline/root.pem", "root.pem", "0.root.json", "x.targets.json", "1.json"]
)
def test_only_metadata_names_are_served(world: World, name: str) -> None:
    with pytest.raises(MetadataNotFound):
        world.repo.metadata(name)


def test_a_repository_refuses_an_anchor_it_was_not_made_with(world: World) -> None:
    other = keys.init(world.tmp / "other")
    with pytest.raises(MetadataMismatch, match="not the one stored"):
        Repository(world.repo_dir, other.root_json.read_bytes(), world.keys.online)


def test_online_keys_that_root_does_not_name_are_refused(world: World) -> None:
    other = keys.init(world.tmp / "other")
    with pytest.raises(KeyFileError, match="snapshot"):
        Repository(world.repo_dir, world.keys.root_json.read_bytes(), other.online)


def test_a_root_that_orphans_the_current_targets_needs_new_targets(world: World) -> None:
    new_root = keys.rotate(world.keys.dir, ["targets"])
    before = world.files()
    with pytest.raises(MetadataMismatch, match="no longer verifies"):
        world.repo.accept_root(new_root)
    assert world.files() == before

    targets = release.sign_targets(None, world.keys.dir, add=dict(world.artifacts))
    with pytest.raises(RollbackRefused):  # version 1 again: not newer than what is published
        world.repo.accept_root(new_root, targets)
    assert world.files() == before


def test_a_root_not_signed_by_the_current_root_is_refused(world: World) -> None:
    impostor = keys.init(world.tmp / "impostor")
    md = Metadata.from_bytes(impostor.root_json.read_bytes())
    md.signed.version = 2
    data = signed(md.signed, keys.load_signer(impostor.key("root")))
    before = world.files()
    with pytest.raises(BadSignature) as caught:
        world.repo.accept_root(data)
    assert (caught.value.role, caught.value.version) == ("root", 2)
    assert world.files() == before


def test_a_root_naming_a_command_key_the_controller_lacks_is_refused(world: World) -> None:
    # The controller holds a copy of the online keys; the rotation makes a new command key
    # in the release manager's directory only.
    held = world.tmp / "controller-online"
    shutil.copytree(world.keys.online, held)
    repo = Repository(world.repo_dir, world.keys.root_json.read_bytes(), held)
    new_root = keys.rotate(world.keys.dir, ["command"])
    before = world.files()
    with pytest.raises(KeyFileError, match="command"):
        repo.accept_root(new_root)
    assert world.files() == before
    assert repo.root.version == 1
    # Once the new key reaches the controller, the same root is taken.
    shutil.copy(world.keys.key("command"), held / "command.pem")
    assert repo.accept_root(new_root) == 2
