"""The controller's side: the TUF repository it hosts, signed with online keys only.

The directory holds what gateways fetch (TUF spec §6 "consistent snapshots")::

    N.root.json  root.json      every trusted root version, and the newest
    N.targets.json              targets versions as the release manager signed them
    N.snapshot.json             snapshots, signed here with the online snapshot key
    timestamp.json              the newest timestamp, signed here with the online timestamp key

The controller holds the snapshot and timestamp keys, never the targets key: it can vouch
that metadata is fresh and consistent, not which releases exist. Artifact files stay in the
controller's content-addressed store; the targets metadata says which names, lengths and
sha256 are trusted.
"""

from __future__ import annotations

import re
import threading
from datetime import datetime
from pathlib import Path

from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    T,
    TargetFile,
    Targets,
    Timestamp,
)

from hitless.trust.errors import (
    MetadataMismatch,
    MetadataNotFound,
    RollbackRefused,
    StorageError,
    UnknownTarget,
)
from hitless.trust.keys import (
    SNAPSHOT_EXPIRY,
    TIMESTAMP_EXPIRY,
    command_keys,
    load_role_signer,
    utcnow,
    write_file,
)
from hitless.trust.verify import check_not_expired, read_metadata, verify_role

# The names a client asks for (python-tuf's Updater with consistent snapshots): nothing else
# is served, so no name can reach outside the directory.
METADATA_NAME = re.compile(r"^(?:[1-9][0-9]{0,9}\.(?:root|snapshot|targets)|root|timestamp)\.json$")


def metadata_path(directory: Path, name: str) -> Path:
    """The file in ``directory`` that holds metadata ``name`` ("root.json", "N.root.json",
    "timestamp.json", "N.snapshot.json", "N.targets.json").

    Raises MetadataNotFound for any other name.
    """
    if not METADATA_NAME.match(name):
        raise MetadataNotFound(f"{name!r} is not a metadata file name this repository serves")
    return directory / name


class Repository:
    """The repository in ``directory``, trusting root ``anchor`` (bytes of root.json) and
    signing with the snapshot and timestamp keys in ``online_keys`` (``keys init``'s online/).

    Safe to call from several threads. Raises on construction: MetadataRefused subclasses if
    ``anchor`` is not self-signed root metadata or conflicts with the roots stored here,
    KeyFileError if the online keys are missing or not the ones the newest root names.
    """

    def __init__(self, directory: Path, anchor: bytes, online_keys: Path) -> None:
        self._dir = directory
        self._online = online_keys
        self._lock = threading.Lock()
        md = read_metadata(anchor, Root)
        verify_role(md.signed, md, "root")
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        stored = self._path(f"{md.signed.version}.root.json")
        if not stored.exists() and self._newest("root") == 0:
            self._write(stored.name, anchor)
            self._write("root.json", anchor)
        elif not stored.exists() or stored.read_bytes() != anchor:
            raise MetadataMismatch(
                f"the trust root given (root version {md.signed.version}) is not the one "
                f"stored in {directory}: give the root.json this repository was made with, "
                f"or a newer one the repository accepted ({directory / 'root.json'} is the "
                "newest it accepted; a rotation not yet sent to the controller is sent with "
                "`upgradectl keys rotate --resend` once it runs)",
                "root",
                md.signed.version,
            )
        self._signers = self._load_signers(self.root)

    @property
    def root(self) -> Root:
        """The newest trusted root."""
        return read_metadata(self._read("root.json"), Root).signed

    def targets(self) -> Targets | None:
        """The newest accepted targets metadata (verified when accepted), or None."""
        version = self._newest("targets")
        if version == 0:
            return None
        return read_metadata(self._read(f"{version}.targets.json"), Targets).signed

    def targets_bytes(self) -> bytes | None:
        """The newest accepted targets metadata as signed, or None before the first."""
        version = self._newest("targets")
        return self._read(f"{version}.targets.json") if version else None

    def ever_listed(self, name: str, sha256: str) -> bool:
        """Whether any accepted targets version listed ``name`` with ``sha256`` (so a
        release the newest does not list was yanked, not never signed)."""
        for path in self._dir.glob("[0-9]*.targets.json"):
            listed = read_metadata(path.read_bytes(), Targets).signed.targets.get(name)
            if listed is not None and listed.hashes.get("sha256") == sha256:
                return True
        return False

    def target(self, name: str) -> TargetFile:
        """The signed length and hashes of target ``name``.

        Raises UnknownTarget if the newest targets metadata does not list it.
        """
        targets = self.targets()
        if targets is None or name not in targets.targets:
            version = targets.version if targets else "none yet"
            raise UnknownTarget(
                f"target {name!r} is not in the signed targets (version {version}): publish "
                "it with metadata signed by the targets key"
            )
        return targets.targets[name]

    def accept_targets(self, signed: bytes, now: datetime | None = None) -> int:
        """Take new targets metadata from the release manager and publish it: write
        N.targets.json as given, then sign the next snapshot and timestamp. Returns N.

        Refused (nothing written) unless the bytes are targets metadata signed by the
        threshold of keys the trusted root gives the targets role (spec §5.6.3), unexpired
        at ``now`` (§5.6.4), with a version above the newest accepted (§5.6.5 rollback).
        The very bytes of the newest accepted version are taken again as a no-op (a
        retried publish) and return its version.

        Raises MalformedMetadata, BadSignature, ExpiredMetadata, RollbackRefused.
        """
        now = now or utcnow()
        md = read_metadata(signed, Targets)
        with self._lock:
            verify_role(self.root, md, "targets")
            check_not_expired(md.signed, now)
            current = self._newest("targets")
            if current and md.signed.version == current and self._read(
                f"{current}.targets.json"
            ) == signed:
                return current
            if md.signed.version <= current:
                raise RollbackRefused(
                    f"targets version {md.signed.version} is not newer than version {current} "
                    "already published: sign the next version",
                    "targets",
                    md.signed.version,
                )
            self._write(f"{md.signed.version}.targets.json", signed)
            self._publish(now)
        return md.signed.version

    def accept_root(
        self, signed: bytes, targets: bytes | None = None, now: datetime | None = None
    ) -> int:
        """Take the next root version (a rotation): it must be signed by the threshold of
        the current root's root keys and of its own (spec §5.3.4), and be version N+1.
        The online keys in ``online_keys`` must be the ones it names. If it replaces the
        targets key, ``targets`` must be the next targets version signed with the new key
        (the current targets would no longer verify); both are published together.
        Returns the new root version.

        Raises MalformedMetadata, BadSignature, RollbackRefused, MetadataMismatch (version
        skipped, or current targets orphaned), KeyFileError (online keys do not match),
        and accept_targets's errors for ``targets``.
        """
        now = now or utcnow()
        md = read_metadata(signed, Root)
        with self._lock:
            current = self.root
            new = md.signed
            if new.version != current.version + 1:
                error = RollbackRefused if new.version <= current.version else MetadataMismatch
                raise error(
                    f"root version {new.version} does not follow the trusted root version "
                    f"{current.version}: give version {current.version + 1}",
                    "root",
                    new.version,
                )
            verify_role(current, md, "root")
            verify_role(new, md, "root")
            signers = self._load_signers(new)
            if command_keys(new):
                # The controller signs commands with the key in the same directory: a root
                # naming another command key is refused before anything is written.
                load_role_signer(self._online / "command.pem", "command", new)
            new_targets = read_metadata(targets, Targets) if targets is not None else None
            if new_targets is not None:
                verify_role(new, new_targets, "targets")
                check_not_expired(new_targets.signed, now)
                if new_targets.signed.version <= self._newest("targets"):
                    raise RollbackRefused(
                        f"targets version {new_targets.signed.version} is not newer than "
                        f"version {self._newest('targets')} already published",
                        "targets",
                        new_targets.signed.version,
                    )
            elif self._newest("targets"):
                old = read_metadata(self._read(f"{self._newest('targets')}.targets.json"), Targets)
                if not new.get_verification_result("targets", old.signed_bytes, old.signatures):
                    raise MetadataMismatch(
                        f"root version {new.version} replaces the targets key, so targets "
                        f"version {old.signed.version} no longer verifies: give the next "
                        "targets version signed with the new targets key together with it",
                        "root",
                        new.version,
                    )
            if new_targets is not None and targets is not None:
                self._write(f"{new_targets.signed.version}.targets.json", targets)
            self._write(f"{new.version}.root.json", signed)
            self._write("root.json", signed)
            self._signers = signers
            if self._newest("targets"):
                self._publish(now)
        return new.version

    def refresh(self, now: datetime | None = None) -> list[str]:
        """Re-sign what expires within half its lifetime at ``now``: snapshot (with a new
        timestamp) or timestamp alone (spec §6.1: online roles are re-signed before expiry).
        Returns the roles re-signed, [] if none (or nothing published yet). Call it at least
        every ``TIMESTAMP_EXPIRY / 2``.
        """
        now = now or utcnow()
        with self._lock:
            if not self._path("timestamp.json").exists():
                return []
            snapshot = self._snapshot()
            if snapshot.expires - now < SNAPSHOT_EXPIRY / 2:
                self._publish(now)
                return ["snapshot", "timestamp"]
            timestamp = read_metadata(self._read("timestamp.json"), Timestamp).signed
            if timestamp.expires - now < TIMESTAMP_EXPIRY / 2:
                self._sign_timestamp(now, snapshot.version)
                return ["timestamp"]
            return []

    def metadata(self, name: str) -> bytes:
        """The bytes of metadata file ``name`` (see ``metadata_path``), for serving.

        Raises MetadataNotFound for an unknown name or a file not published (yet).
        """
        path = metadata_path(self._dir, name)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise MetadataNotFound(f"{name} is not published in {self._dir}") from exc
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc}") from exc

    def _publish(self, now: datetime) -> None:
        """Sign the next snapshot, naming the newest targets, then the next timestamp."""
        targets_version = self._newest("targets")
        targets = self._read(f"{targets_version}.targets.json")
        version = self._newest("snapshot") + 1
        snapshot = Snapshot(
            version=version,
            expires=now + SNAPSHOT_EXPIRY,
            meta={"targets.json": MetaFile.from_data(targets_version, targets, ["sha256"])},
        )
        self._write(f"{version}.snapshot.json", self._sign(snapshot, self._signers["snapshot"]))
        self._sign_timestamp(now, version)

    def _sign_timestamp(self, now: datetime, snapshot_version: int) -> None:
        snapshot = self._read(f"{snapshot_version}.snapshot.json")
        previous = self._path("timestamp.json")
        version = 1
        if previous.exists():
            version = read_metadata(previous.read_bytes(), Timestamp).signed.version + 1
        timestamp = Timestamp(
            version=version,
            expires=now + TIMESTAMP_EXPIRY,
            snapshot_meta=MetaFile.from_data(snapshot_version, snapshot, ["sha256"]),
        )
        self._write("timestamp.json", self._sign(timestamp, self._signers["timestamp"]))

    def _snapshot(self) -> Snapshot:
        data = self._read(f"{self._newest('snapshot')}.snapshot.json")
        return read_metadata(data, Snapshot).signed

    def _load_signers(self, root: Root) -> dict[str, CryptoSigner]:
        return {
            role: load_role_signer(self._online / f"{role}.pem", role, root)
            for role in ("snapshot", "timestamp")
        }

    @staticmethod
    def _sign(signed: T, signer: CryptoSigner) -> bytes:
        md = Metadata(signed)
        md.sign(signer)
        return md.to_bytes()

    def _newest(self, role: str) -> int:
        """The highest N of the N.<role>.json files here, 0 if none."""
        versions = [int(p.name.split(".", 1)[0]) for p in self._dir.glob(f"[0-9]*.{role}.json")]
        return max(versions, default=0)

    def _path(self, name: str) -> Path:
        return metadata_path(self._dir, name)

    def _read(self, name: str) -> bytes:
        return self.metadata(name)

    def _write(self, name: str, data: bytes) -> None:
        write_file(self._path(name), data, mode=0o644)
