"""Checking a downloaded artifact before anything else touches it."""

from __future__ import annotations

import hashlib
from pathlib import Path

from gateway_daemon.errors import VerificationFailed

_BLOCK = 1 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, *, sha256: str, size: int) -> None:
    """Raise VerificationFailed unless ``path`` has exactly ``size`` bytes and ``sha256``."""
    actual_size = path.stat().st_size
    if actual_size != size:
        raise VerificationFailed(
            f"verification failed: artifact has {actual_size} bytes, expected {size}"
        )
    actual = sha256_of(path)
    if actual != sha256:
        raise VerificationFailed(
            f"verification failed: sha256 is {actual}, expected {sha256}"
        )
