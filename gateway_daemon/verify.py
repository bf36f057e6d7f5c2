"""Checking a downloaded artifact before anything else touches it."""

from __future__ import annotations

from pathlib import Path

from gateway_daemon.errors import VerificationFailed
from hitless.digest import file_sha256


def verify(path: Path, *, sha256: str, size: int) -> None:
    """Raise VerificationFailed unless ``path`` has exactly ``size`` bytes and ``sha256``."""
    actual_size = path.stat().st_size
    if actual_size != size:
        raise VerificationFailed(
            f"verification failed: artifact has {actual_size} bytes, expected {size}"
        )
    actual, _ = file_sha256(path)
    if actual != sha256:
        raise VerificationFailed(
            f"verification failed: sha256 is {actual}, expected {sha256}"
        )
