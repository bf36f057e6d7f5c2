"""The key directory: Ed25519 keys for each TUF role and the command key, and root metadata.

Layout (``init`` makes it; every private key is PKCS#8 PEM, mode 0600, directories 0700)::

    DIR/root.json               newest root metadata: the trust anchor gateways are given
    DIR/N.root.json             root version N, written by ``rotate`` for N > 1
    DIR/offline/root.pem        root key       } stay with the release manager, off any
    DIR/offline/targets.pem     targets key    } networked host
    DIR/online/snapshot.pem     snapshot key   } held by the controller
    DIR/online/timestamp.pem    timestamp key  }
    DIR/online/command.pem      command key: signs UpgradeCommands
    DIR/retired/                keys replaced by ``rotate``

Root delegates root, targets, snapshot and timestamp, one key each, threshold 1 (TUF spec
§4.3 "root.json"). The command key is not a TUF role: its public half rides in root as the
unrecognized field ``x-hitless-command-keys`` (allowed by spec §4.2 / python-tuf's
``unrecognized_fields``), so root's signature covers it and a root rotation replaces it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import Metadata, Root

from hitless.trust.errors import KeyFileError, KeysExist, MetadataMismatch, StorageError
from hitless.trust.roles import OFFLINE_ROLES, ROLES, TUF_ROLES
from hitless.trust.verify import read_metadata

ROOT_EXPIRY = timedelta(days=365)
TARGETS_EXPIRY = timedelta(days=90)
SNAPSHOT_EXPIRY = timedelta(days=7)
TIMESTAMP_EXPIRY = timedelta(days=1)

COMMAND_KEYS_FIELD = "x-hitless-command-keys"


@dataclass(frozen=True)
class KeyPaths:
    """Where ``init`` puts each file under ``dir``."""

    dir: Path

    @property
    def root_json(self) -> Path:
        return self.dir / "root.json"

    @property
    def online(self) -> Path:
        return self.dir / "online"

    def key(self, role: str) -> Path:
        """The private key file of ``role`` (one of ``ROLES``)."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
        side = "offline" if role in OFFLINE_ROLES else "online"
        return self.dir / side / f"{role}.pem"

    def root_json_of(self, version: int) -> Path:
        """DIR/N.root.json: root ``version`` as ``rotate`` keeps it (the version it replaced
        and the one it made)."""
        return self.dir / f"{version}.root.json"

    def root(self, version: int | None = None) -> Root:
        """The newest root in ``root.json``, or root ``version`` from ``N.root.json``.

        Raises KeyFileError when the file cannot be read, and the MetadataRefused
        subclasses of ``read_metadata`` when it is not root metadata (or another version).
        """
        path = self.root_json if version is None else self.root_json_of(version)
        try:
            root = read_metadata(path.read_bytes(), Root).signed
        except OSError as exc:
            raise KeyFileError(f"cannot read {path}: {exc}") from exc
        if version is not None and root.version != version:
            raise MetadataMismatch(
                f"{path} holds root version {root.version}, not {version}", "root", root.version
            )
        return root


def utcnow() -> datetime:
    """Now, in UTC, to the second (TUF expiries carry no fractions, spec §4.2)."""
    return datetime.now(UTC).replace(microsecond=0)


def init(dir: Path, now: datetime | None = None) -> KeyPaths:
    """Make a new key directory at ``dir``: five Ed25519 keys and root version 1 signed by
    the root key, expiring ``ROOT_EXPIRY`` after ``now`` (UTC; default: the clock).

    Raises KeysExist if any key file or root.json is already there (nothing is written),
    StorageError if the files cannot be written.
    """
    paths = KeyPaths(dir)
    existing = [p for p in (paths.root_json, *(paths.key(r) for r in ROLES)) if p.exists()]
    if existing:
        raise KeysExist(
            f"{', '.join(str(p) for p in existing)} already exist: keys are never overwritten; "
            "choose an empty directory, or rotate keys with a root rotation"
        )
    signers = {role: CryptoSigner.generate_ed25519() for role in ROLES}
    for role, signer in signers.items():
        write_private_key(paths.key(role), signer)
    root = Root(version=1, expires=(now or utcnow()) + ROOT_EXPIRY, consistent_snapshot=True)
    for role in TUF_ROLES:
        root.add_key(signers[role].public_key, role)
    set_command_keys(root, [signers["command"].public_key])
    md = Metadata(root)
    md.sign(signers["root"])
    write_file(paths.root_json, md.to_bytes(), mode=0o644)
    return paths


def rotate(dir: Path, roles: list[str], now: datetime | None = None) -> bytes:
    """Make new keys for ``roles`` (a subset of ``ROLES``) and the next root version, which
    gives those roles the new keys and expires ``ROOT_EXPIRY`` after ``now``. Returns the new
    root's bytes and writes them to DIR/N.root.json and DIR/root.json.

    The new root is signed by the old root key and, when "root" is rotated, by the new one
    too: a client that trusts the old root follows it (TUF spec §5.3.4). Replaced key files
    move to DIR/retired/. A rotated targets key needs targets re-signed with it (the
    controller takes both together); rotated online keys must reach the controller.

    Raises KeyFileError if a key of the current root is missing or wrong, ValueError for an
    unknown role, StorageError if files cannot be written.
    """
    unknown = set(roles) - set(ROLES)
    if unknown or not roles:
        raise ValueError(f"roles to rotate: expected some of {', '.join(ROLES)}, got {roles}")
    paths = KeyPaths(dir)
    old = paths.root()
    old_root_signer = load_role_signer(paths.key("root"), "root", old)
    new = Root.from_dict(old.to_dict())
    new.version = old.version + 1
    new.expires = (now or utcnow()) + ROOT_EXPIRY
    fresh = {role: CryptoSigner.generate_ed25519() for role in roles}
    for role, signer in fresh.items():
        if role == "command":
            set_command_keys(new, [signer.public_key])
        else:
            for keyid in list(new.roles[role].keyids):
                new.revoke_key(keyid, role)
            new.add_key(signer.public_key, role)
    md = Metadata(new)
    md.sign(old_root_signer)
    if "root" in fresh:
        md.sign(fresh["root"], append=True)
    data = md.to_bytes()
    previous = paths.root_json_of(old.version)
    if not previous.exists():
        write_file(previous, paths.root_json.read_bytes(), mode=0o644)
    for role, signer in fresh.items():
        retired = dir / "retired" / f"{role}-v{old.version}.pem"
        retired.parent.mkdir(mode=0o700, exist_ok=True)
        os.replace(paths.key(role), retired)
        write_private_key(paths.key(role), signer)
    write_file(paths.root_json_of(new.version), data, mode=0o644)
    write_file(paths.root_json, data, mode=0o644)
    return data


def load_signer(path: Path) -> CryptoSigner:
    """The signer for the Ed25519 private key in PEM file ``path``.

    Raises KeyFileError if the file is missing, unreadable or not an Ed25519 key.
    """
    try:
        private = load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(
            f"cannot load the private key {path}: {exc}; give the key directory `keys init` made"
        ) from exc
    if not isinstance(private, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(private).__name__}, not an Ed25519 key")
    return CryptoSigner(private)


def load_role_signer(path: Path, role: str, root: Root) -> CryptoSigner:
    """The signer for ``role`` from the key file ``path``, checked against the key ``root``
    delegates the role to (the command key: against root's command keys).

    Raises KeyFileError if the file cannot be loaded or holds another key.
    """
    signer = load_signer(path)
    keyid = signer.public_key.keyid
    allowed = list(command_keys(root)) if role == "command" else root.roles[role].keyids
    if keyid not in allowed:
        raise KeyFileError(
            f"{path} is key {keyid}, but root version {root.version} gives the {role} role "
            f"to {', '.join(allowed) or 'no key'}: use the key directory that matches this root"
        )
    return signer


def command_keys(root: Root) -> dict[str, SSlibKey]:
    """The command keys carried in ``root``, by key id (empty if none)."""
    field: dict[str, Any] = root.unrecognized_fields.get(COMMAND_KEYS_FIELD) or {}
    return {keyid: SSlibKey.from_dict(keyid, dict(kd)) for keyid, kd in field.items()}


def set_command_keys(root: Root, keys: list[SSlibKey]) -> None:
    """Replace the command keys carried in ``root`` (takes effect when root is signed)."""
    root.unrecognized_fields[COMMAND_KEYS_FIELD] = {k.keyid: k.to_dict() for k in keys}


def write_private_key(path: Path, signer: CryptoSigner) -> None:
    """Write ``signer``'s private key to ``path`` (PEM, 0600), creating its directory 0700.

    Raises KeysExist if ``path`` exists, KeyFileError if it cannot be written.
    """
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise KeysExist(f"{path} already exists: keys are never overwritten") from exc
    except OSError as exc:
        raise KeyFileError(f"cannot write the private key {path}: {exc}") from exc
    with os.fdopen(fd, "wb") as f:
        f.write(signer.private_bytes)


def write_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically (a reader sees the old or the new file whole).

    Raises StorageError if it cannot be written.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc}") from exc
