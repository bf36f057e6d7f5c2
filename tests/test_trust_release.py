"""The release manager signs targets metadata with the offline targets key."""

from __future__ import annotations

from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, Root, Targets

from hitless.digest import file_sha256
from hitless.trust import keys, release
from hitless.trust.errors import BadSignature, ReleaseInputError, UnknownTarget
from hitless.trust.repository import Repository
from tests.support.trust import signed


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    return keys.init(tmp_path / "k").dir


def artifact(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def parse(data: bytes) -> Metadata[Targets]:
    return Metadata[Targets].from_bytes(data)


def test_first_targets_list_length_and_sha256_signed_by_the_targets_key(
    key_dir: Path, tmp_path: Path
) -> None:
    path = artifact(tmp_path, "a.tar.gz", b"x" * 1000)
    md = parse(release.sign_targets(None, key_dir, add={"hitless-1.0.0.tar.gz": path}))

    assert md.signed.version == 1
    target = md.signed.targets["hitless-1.0.0.tar.gz"]
    digest, size = file_sha256(path)
    assert (target.length, target.hashes) == (size, {"sha256": digest})
    root = Metadata[Root].from_bytes((key_dir / "root.json").read_bytes()).signed
    root.verify_delegate("targets", md.signed_bytes, md.signatures)
    assert not md.signed.is_expired()


def test_each_change_is_the_next_version_and_keeps_the_others(
    key_dir: Path, tmp_path: Path
) -> None:
    one = release.sign_targets(None, key_dir, add={"v1": artifact(tmp_path, "1", b"1")})
    two = release.sign_targets(one, key_dir, add={"v2": artifact(tmp_path, "2", b"22")})
    assert parse(two).signed.version == 2
    assert sorted(parse(two).signed.targets) == ["v1", "v2"]

    three = release.yank(two, key_dir, ["v1"])
    assert parse(three).signed.version == 3
    assert sorted(parse(three).signed.targets) == ["v2"]


def test_yanking_a_name_that_is_not_listed_is_refused(key_dir: Path, tmp_path: Path) -> None:
    one = release.sign_targets(None, key_dir, add={"v1": artifact(tmp_path, "1", b"1")})
    with pytest.raises(UnknownTarget, match=r"'v9'.*lists v1"):
        release.yank(one, key_dir, ["v9"])


@pytest.mark.parametrize("name", ["/abs", "../up", "a/../b", "a//b", "", "sp ace", "a/./b"])
def test_unusable_target_names_are_refused(key_dir: Path, tmp_path: Path, name: str) -> None:
    with pytest.raises(ReleaseInputError, match="target name"):
        release.sign_targets(None, key_dir, add={name: artifact(tmp_path, "1", b"1")})


def test_a_missing_artifact_is_refused(key_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ReleaseInputError, match="cannot read the artifact"):
        release.sign_targets(None, key_dir, add={"v1": tmp_path / "nope"})


def test_a_release_is_never_built_on_targets_the_targets_key_did_not_sign(
    key_dir: Path, tmp_path: Path
) -> None:
    one = parse(release.sign_targets(None, key_dir, add={"v1": artifact(tmp_path, "1", b"1")}))
    forged = signed(one.signed, keys.load_signer(key_dir / "online" / "snapshot.pem"))
    with pytest.raises(BadSignature) as caught:
        release.sign_targets(forged, key_dir, add={"v2": artifact(tmp_path, "2", b"2")})
    assert caught.value.role == "targets"
    assert caught.value.version == 1


def test_after_a_targets_key_rotation_current_targets_are_re_signed_against_the_old_root(
    key_dir: Path, tmp_path: Path
) -> None:
    paths = keys.KeyPaths(key_dir)
    repo = Repository(tmp_path / "repo", paths.root_json.read_bytes(), paths.online)
    one = release.sign_targets(None, key_dir, add={"v1": artifact(tmp_path, "1", b"1")})
    repo.accept_targets(one)
    new_root = keys.rotate(key_dir, ["targets"])

    # root.json is the new root now: the old key's targets no longer verify against it.
    with pytest.raises(BadSignature) as caught:
        release.sign_targets(one, key_dir)
    assert caught.value.version == 1

    two = release.sign_targets(one, key_dir, current_root=paths.root(1))
    md = parse(two)
    assert (md.signed.version, sorted(md.signed.targets)) == (2, ["v1"])
    assert md.signed.targets["v1"] == parse(one).signed.targets["v1"]
    paths.root().verify_delegate("targets", md.signed_bytes, md.signatures)
    # The controller's repository takes the new root only together with them.
    assert repo.accept_root(new_root, two) == 2
    assert repo.targets_bytes() == two


def test_the_root_current_targets_verify_against_is_checked(
    key_dir: Path, tmp_path: Path
) -> None:
    one = release.sign_targets(None, key_dir, add={"v1": artifact(tmp_path, "1", b"1")})
    other = keys.init(tmp_path / "other")
    with pytest.raises(BadSignature, match="root version 1"):
        release.sign_targets(one, key_dir, current_root=other.root())
