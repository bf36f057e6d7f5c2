"""The last check before a restart runs a staged release: the file must still be the one
that was verified when it was staged.

The controller and the gateway both record the staged release they run (version, file,
sha256) and, when started from the installed package, exec that file instead. Between the
two, anyone who can write the release directory could swap the file; so it is hashed
again here and run only when it matches the digest recorded at staging.
"""

from __future__ import annotations

from pathlib import Path

from hitless import logs
from hitless.digest import file_sha256

log = logs.get(__name__)


def check(artifact: Path, sha256: str | None) -> bool:
    """True when the file at ``artifact`` has the sha256 (lowercase hex) recorded when it
    was staged. False, with an error logged (``staged_release_refused``), when no digest was
    recorded, the file cannot be read, or it differs: the caller then starts the installed
    package instead."""
    if not sha256:
        log.error(
            "staged_release_refused",
            artifact=str(artifact),
            reason="no sha256 was recorded for it; the installed package starts instead",
        )
        return False
    try:
        actual, _ = file_sha256(artifact)
    except OSError as exc:
        log.error("staged_release_refused", artifact=str(artifact), reason=str(exc))
        return False
    if actual != sha256:
        log.error(
            "staged_release_refused",
            artifact=str(artifact),
            reason=f"its sha256 is {actual}, not {sha256} as staged: it was altered on disk; "
            "the installed package starts instead",
        )
        return False
    return True
