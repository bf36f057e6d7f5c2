"""The key directory: ``keys init`` and ``rotate`` with real Ed25519 keys and files."""

from __future__ import annotations

import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, Root

from hitless.errors import HitlessError
from hitless.trust import keys, roles
from hitless.trust.errors import KeyFileError, KeysExist, MetadataMismatch, TrustError

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_makes_each_key_private_and_a_root_signed_by_the_root_key(tmp_path: Path) -> None:
    paths = keys.init(tmp_path / "k", now=NOW)

    for role in roles.ROLES:
        assert mode(paths.key(role)) == 0o600, role
        assert keys.load_signer(paths.key(role)).public_key.keytype == "ed25519"
    assert paths.key("root").parent.name == "offline"
    assert paths.key("targets").parent.name == "offline"
    assert {paths.key(r).parent.name for r in ("snapshot", "timestamp", "command")} == {"online"}
    assert mode(paths.dir / "offline") == 0o700
    assert mode(paths.online) == 0o700

    md = Metadata[Root].from_bytes(paths.root_json.read_bytes())
    root = md.signed
    assert root.version == 1
    assert root.consistent_snapshot is True
    assert root.expires == NOW + keys.ROOT_EXPIRY
    root.verify_delegate("root", md.signed_bytes, md.signatures)
    for role in roles.TUF_ROLES:
        signer = keys.load_signer(paths.key(role))
        assert root.roles[role].keyids == [signer.public_key.keyid], role
        assert root.roles[role].threshold == 1
    command = keys.load_signer(paths.key("command")).public_key
    assert keys.command_keys(root) == {command.keyid: command}


def test_expiries_are_the_documented_lifetimes() -> None:
    assert (keys.ROOT_EXPIRY.days, keys.TARGETS_EXPIRY.days) == (365, 90)
    assert (keys.SNAPSHOT_EXPIRY.days, keys.TIMESTAMP_EXPIRY.days) == (7, 1)


def test_the_command_keys_are_covered_by_roots_signature(tmp_path: Path) -> None:
    paths = keys.init(tmp_path / "k")
    md = Metadata[Root].from_bytes(paths.root_json.read_bytes())
    md.signed.unrecognized_fields[keys.COMMAND_KEYS_FIELD] = {}
    result = md.signed.get_verification_result("root", md.signed_bytes, md.signatures)
    assert not result.verified


def test_init_never_overwrites_keys(tmp_path: Path) -> None:
    paths = keys.init(tmp_path / "k")
    before = {p: p.read_bytes() for p in paths.dir.rglob("*") if p.is_file()}

    with pytest.raises(KeysExist, match="never overwritten") as caught:
        keys.init(tmp_path / "k")

    assert isinstance(caught.value, TrustError) and isinstance(caught.value, HitlessError)
    assert {p: p.read_bytes() for p in paths.dir.rglob("*") if p.is_file()} == before


def test_init_refuses_when_one_key_is_left_over(tmp_path: Path) -> None:
    leftover = keys.KeyPaths(tmp_path / "k").key("timestamp")
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"old")
    with pytest.raises(KeysExist, match=r"timestamp\.pem"):
        keys.init(tmp_path / "k")
    assert leftover.read_bytes() == b"old"
    assert not (tmp_path / "k" / "root.json").exists()


def test_a_key_file_that_is_not_an_ed25519_key_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    with pytest.raises(KeyFileError, match=r"bad\.pem"):
        keys.load_signer(bad)
    with pytest.raises(KeyFileError, match=r"missing\.pem"):
        keys.load_signer(tmp_path / "missing.pem")


def test_a_key_of_another_role_is_refused_for_a_role(tmp_path: Path) -> None:
    paths = keys.init(tmp_path / "k")
    root = Metadata[Root].from_bytes(paths.root_json.read_bytes()).signed
    with pytest.raises(KeyFileError, match="gives the targets role to"):
        keys.load_role_signer(paths.key("snapshot"), "targets", root)
    with pytest.raises(KeyFileError, match="command role"):
        keys.load_role_signer(paths.key("root"), "command", root)
    assert keys.load_role_signer(paths.key("command"), "command", root)


def test_rotate_signs_the_next_root_with_old_and_new_root_keys(tmp_path: Path) -> None:
    paths = keys.init(tmp_path / "k")
    v1 = Metadata[Root].from_bytes(paths.root_json.read_bytes())
    old_root_key = keys.load_signer(paths.key("root")).public_key
    old_targets = keys.load_signer(paths.key("targets")).public_key
    old_snapshot = paths.key("snapshot").read_bytes()

    data = keys.rotate(paths.dir, ["root", "targets"], now=NOW)

    v2 = Metadata[Root].from_bytes(data)
    assert v2.signed.version == 2
    assert v2.signed.expires == NOW + keys.ROOT_EXPIRY
    v1.signed.verify_delegate("root", v2.signed_bytes, v2.signatures)  # the old root's key
    v2.signed.verify_delegate("root", v2.signed_bytes, v2.signatures)  # and its own
    new_targets = keys.load_signer(paths.key("targets")).public_key
    assert new_targets.keyid != old_targets.keyid
    assert v2.signed.roles["targets"].keyids == [new_targets.keyid]
    assert old_root_key.keyid not in v2.signed.roles["root"].keyids
    assert paths.key("snapshot").read_bytes() == old_snapshot
    assert (paths.dir / "1.root.json").read_bytes() == v1.to_bytes()
    assert (paths.dir / "2.root.json").read_bytes() == data == paths.root_json.read_bytes()
    retired = keys.load_signer(paths.dir / "retired" / "targets-v1.pem").public_key
    assert retired.keyid == old_targets.keyid
    assert mode(paths.dir / "retired" / "targets-v1.pem") == 0o600


def test_rotate_replaces_the_command_key_in_root(tmp_path: Path) -> None:
    paths = keys.init(tmp_path / "k")
    old = keys.load_signer(paths.key("command")).public_key.keyid
    root = Metadata[Root].from_bytes(keys.rotate(paths.dir, ["command"])).signed
    new = keys.load_signer(paths.key("command")).public_key.keyid
    assert list(keys.command_keys(root)) == [new] != [old]


def test_rotate_refuses_unknown_roles_without_touching_anything(tmp_path: Path) -> None:
    paths = keys.init(tmp_path / "k")
    before = paths.root_json.read_bytes()
    with pytest.raises(ValueError, match="roles to rotate"):
        keys.rotate(paths.dir, ["admin"])
    assert paths.root_json.read_bytes() == before
    assert not (paths.dir / "retired").exists()


def test_each_root_version_stays_readable_after_a_rotation(tmp_path: Path) -> None:
    paths = keys.init(tmp_path / "k")
    keys.rotate(paths.dir, ["targets"], now=NOW)

    assert paths.root().version == 2
    assert paths.root(2).version == 2
    v1 = paths.root(1)
    assert v1.version == 1
    assert v1.roles["targets"].keyids != paths.root().roles["targets"].keyids
    assert paths.root_json_of(1) == paths.dir / "1.root.json"
    with pytest.raises(KeyFileError, match=r"3\.root\.json"):
        paths.root(3)


def test_a_root_file_holding_another_version_is_refused(tmp_path: Path) -> None:
    paths = keys.init(tmp_path / "k")
    paths.root_json_of(2).write_bytes(paths.root_json.read_bytes())
    with pytest.raises(MetadataMismatch, match=r"2\.root\.json holds root version 1, not 2"):
        paths.root(2)
