"""Directories only their owner may read or enter: where a gateway and the controller keep
state, staged releases, downloads and keys."""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_MODE = 0o700


def private_dir(path: Path) -> Path:
    """Create ``path`` with mode 0700, and set 0700 on it when it already exists with
    another mode: a directory an earlier release made with the default mode (0755 under
    umask 022) is tightened rather than kept. Missing parents are made with the default
    mode, as ``mkdir -p`` makes them (``pathlib.Path.mkdir``); existing ones are left as
    they are. Returns ``path``. Raises OSError when it cannot be made or changed (not
    the owner, a read-only filesystem)."""
    path.mkdir(mode=PRIVATE_MODE, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o777 != PRIVATE_MODE:
        os.chmod(path, PRIVATE_MODE)
    return path
