"""The artifact store: release files kept by their sha256, written atomically.

Layout: ``root/ab/abcdef...`` (the first two hex digits fan the files out), and
``root/.incoming/`` for uploads in progress. A file under its digest's name is complete
and verified, because it only gets that name by an atomic rename after its hash checked
out; so readers never see a half-written artifact and a crash leaves only temp files.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from controller_svc.errors import InvalidRequest, NotFound, StorageError
from hitless import version

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_INCOMING = ".incoming"


@dataclass(frozen=True)
class StoredArtifact:
    sha256: str
    size: int


def check_digest(sha256: str) -> str:
    """Return ``sha256`` if it is 64 lowercase hex digits, else raise InvalidRequest.

    Digests become file names, so this is also what keeps ``../`` out of the store.
    """
    if not _DIGEST.match(sha256):
        raise InvalidRequest(
            f"invalid sha256 digest {sha256[:80]!r}: expected 64 lowercase hex digits"
        )
    return sha256


def stamped_as(version_text: str) -> Callable[[Path], None]:
    """A ``put`` check that refuses an artifact whose stamped version
    (``hitless.version.stamped``) is not ``version_text``: what a gateway runs after the
    swap reports its stamp, so a release must be the build of its own version."""

    def check(path: Path) -> None:
        stamp = version.stamped(path)
        if stamp != version_text:
            found = "no version stamp" if stamp is None else f"the version stamp {stamp!r}"
            raise InvalidRequest(
                f"the artifact for release {version_text} carries {found}: publish the "
                f"artifact built for it (upgradectl releases build --version {version_text})"
            )

    return check


class ArtifactStore:
    """Content-addressed files under ``root``; safe for concurrent writers and readers."""

    def __init__(self, root: Path) -> None:
        self.root = root
        with _translating("create the artifact store", root):
            (root / _INCOMING).mkdir(parents=True, exist_ok=True)

    def _final(self, sha256: str) -> Path:
        check_digest(sha256)
        return self.root / sha256[:2] / sha256

    def put(
        self,
        chunks: Iterable[bytes],
        *,
        expected_sha256: str | None = None,
        expected_size: int | None = None,
        check: Callable[[Path], None] | None = None,
    ) -> StoredArtifact:
        """Store the concatenated ``chunks``; return their digest and size.

        When expectations are given and not met, or ``check`` (called with the complete
        file before it is stored) raises, nothing is stored and the error says what was
        expected and what arrived. Storing content already present is a no-op.
        """
        if expected_sha256 is not None:
            check_digest(expected_sha256)
        hasher = hashlib.sha256()
        size = 0
        incoming = self.root / _INCOMING
        with _translating("create a temporary file", incoming):
            fd, temp_name = tempfile.mkstemp(dir=incoming, prefix="upload-")
        temp = Path(temp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                # Errors raised by ``chunks`` itself (a client gone away) are the caller's
                # and pass through untranslated; only our own file errors become StorageError.
                for chunk in chunks:
                    with _translating("write an artifact", temp):
                        out.write(chunk)
                    hasher.update(chunk)
                    size += len(chunk)
                with _translating("write an artifact", temp):
                    out.flush()
                    # Durable before it gets its final name: the name promises the content.
                    os.fsync(out.fileno())
            sha256 = hasher.hexdigest()
            self._check_expectations(sha256, size, expected_sha256, expected_size)
            if check is not None:
                check(temp)
            final = self._final(sha256)
            with _translating("store an artifact", final):
                if final.exists():
                    temp.unlink()
                else:
                    final.parent.mkdir(exist_ok=True)
                    os.replace(temp, final)
                    _fsync_dir(final.parent)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return StoredArtifact(sha256=sha256, size=size)

    @staticmethod
    def _check_expectations(
        sha256: str, size: int, expected_sha256: str | None, expected_size: int | None
    ) -> None:
        if expected_size is not None and size != expected_size:
            raise InvalidRequest(
                f"artifact size mismatch: expected {expected_size} bytes, got {size}; "
                "the upload was cut short or the size given is wrong"
            )
        if expected_sha256 is not None and sha256 != expected_sha256:
            raise InvalidRequest(
                f"artifact digest mismatch: expected sha256 {expected_sha256}, got {sha256}; "
                "the file was corrupted in transit or the digest given is wrong"
            )

    def exists(self, sha256: str) -> bool:
        """Whether an artifact with this digest is stored."""
        return self._final(sha256).is_file()

    def path(self, sha256: str) -> Path:
        """The stored file of ``sha256``; NotFound when there is none."""
        final = self._final(sha256)
        if not final.is_file():
            raise NotFound(f"no artifact with sha256 {sha256} in {self.root}: upload it first")
        return final

    def size(self, sha256: str) -> int:
        """The size in bytes of the stored artifact ``sha256``."""
        return self.path(sha256).stat().st_size

    def open_at(self, sha256: str, offset: int) -> BinaryIO:
        """Open the artifact for reading from ``offset``; the caller closes it.

        An offset equal to the size is allowed (a resumed download that already has it
        all reads nothing); beyond that, or negative, is InvalidRequest.
        """
        final = self.path(sha256)
        with _translating("open an artifact", final):
            handle = final.open("rb")
        size = os.fstat(handle.fileno()).st_size
        if not 0 <= offset <= size:
            handle.close()
            raise InvalidRequest(
                f"offset {offset} is outside artifact {sha256} of {size} bytes: "
                f"resume from an offset between 0 and {size}"
            )
        handle.seek(offset)
        return handle


@contextmanager
def _translating(doing: str, where: Path) -> Iterator[None]:
    """Turn an OSError from the file system into a StorageError that says what to check."""
    try:
        yield
    except OSError as exc:
        raise StorageError(
            f"could not {doing} at {where}: {exc.strerror or exc}; "
            "check free space and permissions of the artifact directory"
        ) from exc


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable: the new directory entry is only safe once the dir is synced."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
