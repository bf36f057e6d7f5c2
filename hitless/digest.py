"""The sha256 of a file: how artifacts are named and checked everywhere."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path) -> tuple[str, int]:
    """The sha256 (lowercase hex) of the file at ``path`` and its size in bytes, read in
    blocks (artifacts are not held in memory whole)."""
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256")
        return digest.hexdigest(), f.tell()
