"""The release manager's side: signing the targets metadata with the offline targets key.

The targets role lists every release a gateway may run: its target name, length in bytes and
sha256 (TUF spec §4.5 "targets.json"). Publishing a release adds a target; yanking removes
one. Each change is the next targets version, signed where the release is built; the
controller only accepts it (``hitless.trust.repository``), it can never make one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path

from tuf.api.metadata import Metadata, Root, TargetFile, Targets

from hitless.trust.errors import ReleaseInputError, UnknownTarget
from hitless.trust.keys import TARGETS_EXPIRY, KeyPaths, load_role_signer, utcnow
from hitless.trust.verify import read_metadata, verify_role

# A target name is a relative path of plain segments (TUF spec §4.5 "TARGETPATH"): no
# leading slash, no "." or ".." segment, nothing a URL or a file system would reinterpret.
_TARGET_NAME = re.compile(r"^(?!.*(^|/)\.\.?(/|$))[A-Za-z0-9._+-]+(/[A-Za-z0-9._+-]+)*$")


def target_name(version: str) -> str:
    """The target name release ``version`` (MAJOR.MINOR.PATCH) has in the targets metadata:
    ``hitless-<version>.pyz``. Publishing, verifying and yanking all name it this way."""
    return check_target_name(f"hitless-{version}.pyz")


def check_target_name(name: str) -> str:
    """``name`` if it is a usable target name (up to 200 characters of letters, digits and
    ``._+-`` in ``/``-separated segments, none "." or ".."), else ReleaseInputError."""
    if len(name) > 200 or not _TARGET_NAME.match(name):
        raise ReleaseInputError(
            f"target name {name!r} is not a relative path of letters, digits and ._+- "
            "(no leading /, no . or .. segments, at most 200 characters)"
        )
    return name


def sign_targets(
    current: bytes | None,
    keys_dir: Path,
    add: Mapping[str, Path] | None = None,
    remove: Iterable[str] = (),
    now: datetime | None = None,
    current_root: Root | None = None,
) -> bytes:
    """The next targets metadata after ``current`` (None: the first, version 1), with each
    ``add`` name -> artifact file listed by length (bytes) and sha256, and each ``remove``
    name gone, expiring ``TARGETS_EXPIRY`` after ``now``; signed with the targets key in
    ``keys_dir`` (``keys init`` layout, checked against ``keys_dir/root.json``).

    ``current`` must itself verify against ``current_root`` (default: that same root), so
    a release is never built on metadata the targets key did not sign. After a rotation
    that replaced the targets key, ``current`` was signed with the old key: pass the root
    it was signed under (``KeyPaths.root(version)``, the version the rotation replaced) to
    re-sign it with the new key. Returns the metadata bytes (canonical JSON payload, TUF
    spec §4.2), ready for ``Repository.accept_targets`` (or ``accept_root``).

    Raises ReleaseInputError (bad name, unreadable artifact), UnknownTarget (removing a name
    ``current`` does not list), KeyFileError (missing or wrong targets key), MetadataRefused
    subclasses (``current`` unsigned, malformed or expired-and-unreadable).
    """
    paths = KeyPaths(keys_dir)
    root = paths.root()
    signer = load_role_signer(paths.key("targets"), "targets", root)
    targets = _next_targets(current, current_root or root)
    for name in remove:
        if targets.targets.pop(name, None) is None:
            raise UnknownTarget(
                f"cannot remove {name!r}: targets version {targets.version - 1} does not list "
                f"it (it lists {', '.join(sorted(targets.targets)) or 'nothing'})"
            )
    for name, artifact in (add or {}).items():
        check_target_name(name)
        try:
            targets.targets[name] = TargetFile.from_file(name, str(artifact), ["sha256"])
        except OSError as exc:
            raise ReleaseInputError(f"cannot read the artifact {artifact}: {exc}") from exc
    targets.expires = (now or utcnow()) + TARGETS_EXPIRY
    md = Metadata(targets)
    md.sign(signer)
    return md.to_bytes()


def yank(
    current: bytes, keys_dir: Path, names: Iterable[str], now: datetime | None = None
) -> bytes:
    """The next targets metadata without ``names``: every verifier refuses them from then on.
    Same arguments, result and errors as ``sign_targets``."""
    return sign_targets(current, keys_dir, remove=names, now=now)


def _next_targets(current: bytes | None, root: Root) -> Targets:
    if current is None:
        return Targets(version=1)
    md = read_metadata(current, Targets)
    verify_role(root, md, "targets")
    md.signed.version += 1
    return md.signed
