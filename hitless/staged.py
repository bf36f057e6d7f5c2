"""Starting a version of this software: the next one staged by an upgrade, or the one a
process runs itself, for the controller, the gateway and its VPN service alike.

- ``release_argv``: how to run one of the programs of a release file (a zipapp).
- ``own_argv``: how to run a program from the very code this process runs (its release
  file after an upgrade, else the installed package): what a gateway hands back to when
  a soak fails, and how it starts its VPN service.
- ``exec_release``: the last step of a restart. The controller and the gateway both
  record the staged release they run (version, file, sha256) and, when started from the
  installed package, exec that file instead. Between the two, anyone who can write the
  release directory could swap the file; so it is hashed again (``check``) and run only
  when it matches the digest recorded at staging.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType

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


def release_argv(artifact: Path, program: str) -> list[str]:
    """The argv that runs ``program`` ("gateway-daemon", "controller-svc") from the
    release file ``artifact``, with this interpreter; the program's own arguments follow."""
    return [sys.executable, str(artifact), program]


def own_argv(package: ModuleType, program: str) -> list[str]:
    """The argv that runs ``program`` from the code this process runs: from its release
    file when ``package`` (``gateway_daemon``, ``controller_svc``) was imported from one
    (a zipapp), else from the installed package (``python -m package``, which needs the
    package's ``__main__``)."""
    root = Path(str(package.__file__)).resolve().parent.parent
    if root.is_file():
        return release_argv(root, program)
    return [sys.executable, "-m", package.__name__]


def exec_release(
    version: str, artifact: Path, sha256: str | None, program: str, args: list[str]
) -> None:
    """Replace this process with ``program`` run from the staged release ``version`` at
    ``artifact`` with ``args``, once its file still has the ``sha256`` recorded at staging
    (``check``); return, having logged why, when it does not (the caller carries on as the
    installed package). Raises OSError when the exec itself fails."""
    if not check(artifact, sha256):
        return
    log.info("exec_staged_release", version=version, artifact=str(artifact))
    argv = release_argv(artifact, program)
    os.execv(argv[0], [*argv, *args])
