"""Verifying a release before it is staged: python-tuf's client workflow over any transport.

A gateway (and the controller, for its own upgrade) holds the trust anchor (root.json it was
provisioned with) and a cache directory. ``TrustClient.target`` runs python-tuf's
``Updater`` (TUF spec §5 "detailed client workflow": root rotation, timestamp, snapshot,
targets, with rollback, freeze and mix-and-match checks) against a ``MetadataSource``, and
returns the signed length and sha256 of one target. ``verify_artifact`` checks a downloaded
file against them. The artifact bytes travel however the product already moves them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, TypeVar

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.api.serialization import DeserializationError
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from hitless.trust.errors import (
    ArtifactMismatch,
    BadSignature,
    ExpiredMetadata,
    FetchFailed,
    MalformedMetadata,
    MetadataMismatch,
    MetadataNotFound,
    MetadataRefused,
    RollbackRefused,
    StorageError,
    TrustError,
    UnknownTarget,
)
from hitless.trust.repository import metadata_path
from hitless.trust.verify import read_metadata, verify_role

# ngclient asks for URLs; the source is asked for names. This base never leaves the process.
_BASE = "hitless-trust:/metadata/"
_CHUNK = 64 * 1024
R = TypeVar("R")
_URL_ROLE = re.compile(r"^(?:(\d+)\.)?(root|timestamp|snapshot|targets)\.json$")


class MetadataSource(Protocol):
    """Where metadata comes from: the controller over gRPC or HTTP, or a local directory."""

    def fetch_metadata(self, name: str) -> bytes:
        """The bytes of metadata file ``name`` ("root.json", "N.root.json",
        "timestamp.json", "N.snapshot.json", "N.targets.json"). The client refuses more than
        ``UpdaterConfig``'s limits (root 512 kB, timestamp 16 kB, snapshot 2 MB, targets
        5 MB); a source should stop reading past ``MAX_METADATA_BYTES``.

        Raises MetadataNotFound if the repository has no such file, FetchFailed (or any
        other exception: treated as FetchFailed) if it cannot be reached.
        """
        ...


MAX_METADATA_BYTES = UpdaterConfig().targets_max_length


class DirectorySource:
    """Metadata read from a repository directory on this machine (the controller verifying
    its own upgrade, and tests)."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory

    def fetch_metadata(self, name: str) -> bytes:
        path = metadata_path(self._dir, name)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise MetadataNotFound(f"{name} is not in {self._dir}") from exc
        except OSError as exc:
            raise FetchFailed(f"cannot read {path}: {exc}") from exc


class TrustClient:
    """Verifies targets against root ``anchor`` (bytes of root.json: the trust anchor),
    keeping verified metadata in ``cache_dir`` (created 0700; one client per directory at a
    time) and fetching from ``source``.
    """

    def __init__(self, anchor: bytes, cache_dir: Path, source: MetadataSource) -> None:
        md = read_metadata(anchor, Root)
        verify_role(md.signed, md, "root")
        self._anchor = anchor
        self._cache = cache_dir
        self._fetcher = _SourceFetcher(source)

    def refresh(self) -> Root:
        """Update the metadata (root rotations included) and return the newest trusted
        root; for a command signed by a key only a newer root carries. Raises what
        ``target`` raises, except UnknownTarget."""
        self._updating(lambda updater: updater.refresh())
        return self.trusted_root()

    def target(self, name: str) -> TargetFile:
        """Update the metadata and return target ``name``'s signed TargetFile (``length`` in
        bytes, ``hashes["sha256"]`` lowercase hex).

        Raises UnknownTarget (not listed, or yanked), MetadataRefused subclasses naming the
        role and version that failed (BadSignature, RollbackRefused, ExpiredMetadata,
        MetadataMismatch, MalformedMetadata), MetadataNotFound / FetchFailed (nothing
        published yet / source unreachable), StorageError (cache not writable).
        """
        found = self._updating(lambda updater: updater.get_targetinfo(name))
        if found is None:
            raise UnknownTarget(
                f"target {name!r} is not in the signed targets: it was never released, or "
                "it was yanked; nothing was staged"
            )
        return found

    def _updating(self, step: Callable[[Updater], R]) -> R:
        """Run ``step`` on a fresh Updater, translating python-tuf's errors into ours."""
        updater = self._updater()
        try:
            return step(updater)
        except tuf_errors.RepositoryError as exc:
            raise self._refused(exc) from exc
        except tuf_errors.DownloadLengthMismatchError as exc:
            role, version = self._fetcher.last
            raise MetadataMismatch(
                f"{role} version {version or 'latest'} is longer than the client accepts: {exc}",
                role,
                version,
            ) from exc
        except tuf_errors.DownloadError as exc:
            cause = exc.__cause__
            if isinstance(cause, TrustError):
                raise cause from exc
            raise FetchFailed(f"cannot fetch {self._fetcher.last_name}: {exc}") from exc
        except OSError as exc:
            raise StorageError(f"cannot write the metadata cache {self._cache}: {exc}") from exc

    def trusted_root(self) -> Root:
        """The newest root verified from the anchor (the anchor before the first update);
        its command keys verify UpgradeCommands (``hitless.trust.commands``).

        Walked from the anchor through python-tuf's ``root_history/N.root.json`` (version
        N+1 must be signed by the root keys of N and of its own, TUF spec §5.3.4), stopping
        at the first that does not follow; not read from ``root.json``, which each update
        resets to the anchor, so an update that fails half way never takes trust back to an
        older root whose command key a rotation retired, and a cache left from another
        anchor is never trusted."""
        trusted = read_metadata(self._anchor, Root).signed
        history = self._cache / "root_history"
        while True:
            path = history / f"{trusted.version + 1}.root.json"
            try:
                md = read_metadata(path.read_bytes(), Root)
                verify_role(trusted, md, "root")
                verify_role(md.signed, md, "root")
            except (OSError, TrustError):
                return trusted
            if md.signed.version != trusted.version + 1:
                return trusted
            trusted = md.signed

    def _updater(self) -> Updater:
        try:
            self._cache.mkdir(mode=0o700, parents=True, exist_ok=True)
            return Updater(str(self._cache), _BASE, fetcher=self._fetcher, bootstrap=self._anchor)
        except tuf_errors.RepositoryError as exc:
            raise MalformedMetadata(f"the trust anchor is not usable: {exc}", "root") from exc
        except OSError as exc:
            raise StorageError(f"cannot use the metadata cache {self._cache}: {exc}") from exc

    def _refused(self, exc: tuf_errors.RepositoryError) -> MetadataRefused:
        """Translate python-tuf's error into ours, naming the role and version: the file
        fetched last is the one that failed, except for expiry, which names its role."""
        role, version = self._fetcher.last
        detail = f"{role} version {version or 'latest'} refused: {exc}"
        if isinstance(exc, tuf_errors.ExpiredMetadataError):
            expired = next((r for r in ("root", "timestamp", "snapshot", "targets")
                            if r in str(exc)), role)
            return ExpiredMetadata(
                f"{expired} metadata is expired ({exc}): the controller must re-sign "
                "timestamp and snapshot, or the release manager targets; nothing was staged",
                expired,
                version if expired == role else None,
            )
        if isinstance(exc, tuf_errors.UnsignedMetadataError):
            signed_by = self._fetcher.last_signers()
            root = self.trusted_root()
            expected = tuple(root.roles[role].keyids) if role in root.roles else ()
            return BadSignature(
                f"{detail}; signed by {', '.join(signed_by) or 'no key'}, root version "
                f"{root.version} expects {', '.join(expected) or 'other keys'}",
                role,
                version,
                signed_by,
                expected,
            )
        if isinstance(exc, tuf_errors.BadVersionNumberError):
            return RollbackRefused(f"{detail} (older than metadata already trusted)", role, version)
        if isinstance(exc, tuf_errors.LengthOrHashMismatchError):
            return MetadataMismatch(
                f"{detail} (does not match what its parent role signed: mix-and-match)",
                role,
                version,
            )
        if isinstance(exc, DeserializationError):
            return MalformedMetadata(detail, role, version)
        return MetadataRefused(detail, role, version)


def verify_artifact(path: Path, target: TargetFile) -> None:
    """Check that the file at ``path`` has exactly ``target``'s signed length and hashes
    (python-tuf's ``TargetFile.verify_length_and_hashes``; spec §5.7.3).

    Raises ArtifactMismatch (altered, truncated or longer than signed), StorageError if the
    file cannot be read.
    """
    try:
        with path.open("rb") as f:
            target.verify_length_and_hashes(f)
    except tuf_errors.LengthOrHashMismatchError as exc:
        raise ArtifactMismatch(
            f"{path} is not the signed target {target.path!r} ({target.length} bytes, sha256 "
            f"{target.hashes.get('sha256')}): {exc}; it must not be staged"
        ) from exc
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc}") from exc


class _SourceFetcher(FetcherInterface):
    """ngclient's fetcher over a MetadataSource; remembers the last file asked for, so an
    error can name it. A missing file is HTTP 404 to ngclient: the end of root rotation."""

    def __init__(self, source: MetadataSource) -> None:
        self._source = source
        self.last_name = ""
        self._last_data = b""

    @property
    def last(self) -> tuple[str, int | None]:
        match = _URL_ROLE.match(self.last_name)
        if match is None:
            return "unknown", None
        version = int(match.group(1)) if match.group(1) else None
        if version is None:
            try:
                version = Metadata.from_bytes(self._last_data).signed.version
            except Exception:  # the version is only for the message; the error says why
                version = None
        return match.group(2), version

    def last_signers(self) -> tuple[str, ...]:
        try:
            return tuple(Metadata.from_bytes(self._last_data).signatures)
        except Exception:  # unparseable: no signer can be named
            return ()

    def _fetch(self, url: str) -> Iterator[bytes]:
        if not url.startswith(_BASE):
            raise FetchFailed(f"unexpected metadata URL {url!r}")
        self.last_name = url[len(_BASE):]
        self._last_data = b""
        try:
            data = self._source.fetch_metadata(self.last_name)
        except MetadataNotFound as exc:
            raise tuf_errors.DownloadHTTPError(str(exc), 404) from exc
        self._last_data = data
        return (data[i : i + _CHUNK] for i in range(0, len(data), _CHUNK))
