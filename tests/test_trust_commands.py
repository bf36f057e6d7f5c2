"""UpgradeCommands signed with the command key that root carries; forged, tampered,
misaddressed and expired commands are refused."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root

from hitless.trust import keys
from hitless.trust.commands import SignedCommand, sign_command, verify_command
from hitless.trust.errors import (
    BadCommandSignature,
    CommandExpired,
    CommandMisaddressed,
    UnknownCommandKey,
    UnsignedCommand,
)
from hitless.v1 import bus_pb2

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def paths(tmp_path: Path) -> keys.KeyPaths:
    return keys.init(tmp_path / "k")


def root_of(paths: keys.KeyPaths) -> Root:
    return Metadata[Root].from_bytes(paths.root_json.read_bytes()).signed


def command(**overrides: object) -> bus_pb2.UpgradeCommand:
    fields: dict[str, object] = {
        "command_id": "cmd-1",
        "job_id": "job-1",
        "gateway_id": "gw-1",
        "target_version": "1.1.0",
        "artifact_sha256": "ab" * 32,
        "artifact_size": 1200,
        "deadline": NOW + timedelta(minutes=5),
    }
    fields.update(overrides)
    return bus_pb2.UpgradeCommand(**fields)  # type: ignore[arg-type]


def sign(paths: keys.KeyPaths, cmd: bus_pb2.UpgradeCommand) -> SignedCommand:
    return sign_command(cmd, keys.load_role_signer(paths.key("command"), "command", root_of(paths)))


def test_a_signed_command_verifies_and_parses(paths: keys.KeyPaths) -> None:
    signed = sign(paths, command())
    assert verify_command(signed, root_of(paths), "gw-1", NOW) == command()
    assert signed.keyid in keys.command_keys(root_of(paths))


def test_an_unsigned_command_is_refused(paths: keys.KeyPaths) -> None:
    signed = sign(paths, command())
    with pytest.raises(UnsignedCommand):
        verify_command(dataclasses.replace(signed, signature=""), root_of(paths), "gw-1", NOW)


def test_a_command_forged_with_another_key_is_refused(paths: keys.KeyPaths) -> None:
    forged = sign_command(command(), CryptoSigner.generate_ed25519())
    with pytest.raises(UnknownCommandKey, match=forged.keyid):
        verify_command(forged, root_of(paths), "gw-1", NOW)
    # The same forgery claiming the real key id.
    real = sign(paths, command())
    with pytest.raises(BadCommandSignature):
        verify_command(dataclasses.replace(forged, keyid=real.keyid), root_of(paths), "gw-1", NOW)


def test_a_command_signed_by_another_role_key_is_refused(paths: keys.KeyPaths) -> None:
    for role in ("root", "targets", "snapshot", "timestamp"):
        signed = sign_command(command(), keys.load_signer(paths.key(role)))
        with pytest.raises(UnknownCommandKey):
            verify_command(signed, root_of(paths), "gw-1", NOW)


def test_a_tampered_command_is_refused(paths: keys.KeyPaths) -> None:
    signed = sign(paths, command())
    downgraded = command(target_version="0.9.0").SerializeToString(deterministic=True)
    for payload in (downgraded, signed.payload + b"\x00", signed.payload[:-1]):
        with pytest.raises(BadCommandSignature):
            altered = dataclasses.replace(signed, payload=payload)
            verify_command(altered, root_of(paths), "gw-1", NOW)
    garbled = dataclasses.replace(signed, signature="zz" + signed.signature[2:])
    with pytest.raises(BadCommandSignature):
        verify_command(garbled, root_of(paths), "gw-1", NOW)


def test_a_command_for_another_gateway_is_refused(paths: keys.KeyPaths) -> None:
    with pytest.raises(CommandMisaddressed, match="'gw-1', not 'gw-2'"):
        verify_command(sign(paths, command()), root_of(paths), "gw-2", NOW)


def test_a_command_replayed_after_its_deadline_is_refused(paths: keys.KeyPaths) -> None:
    signed = sign(paths, command())
    assert verify_command(signed, root_of(paths), "gw-1", NOW)
    with pytest.raises(CommandExpired, match="expired"):
        verify_command(signed, root_of(paths), "gw-1", NOW + timedelta(minutes=5))


def test_a_command_without_a_deadline_is_refused(paths: keys.KeyPaths) -> None:
    cmd = command()
    cmd.ClearField("deadline")
    with pytest.raises(CommandExpired, match="no deadline"):
        verify_command(sign(paths, cmd), root_of(paths), "gw-1", NOW)


def test_a_rotated_command_key_replaces_the_old_one(paths: keys.KeyPaths) -> None:
    old_signed = sign(paths, command())
    new_root = Metadata[Root].from_bytes(keys.rotate(paths.dir, ["command"])).signed
    with pytest.raises(UnknownCommandKey):
        verify_command(old_signed, new_root, "gw-1", NOW)
    assert verify_command(sign(paths, command()), new_root, "gw-1", NOW)
