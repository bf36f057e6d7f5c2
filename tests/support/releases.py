"""Release artifacts for tests, good and honestly broken.

``build`` makes a real release with ``upgradectl.build.build_release``; with ``broken``
it then rewrites one module inside the zipapp, so the new version fails the way real
releases fail: at start, by hanging, or in its own self-check
(``gateway_daemon.selfcheck``).
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from upgradectl.build import build_release

# module inside the zipapp -> code appended to it (a later ``def run`` replaces the real one)
BROKEN: Final[dict[str, tuple[str, str]]] = {
    "crash": (
        "gateway_daemon/cli.py",
        'raise RuntimeError("this release is broken: it crashes at start")\n',
    ),
    "hang": (
        "gateway_daemon/cli.py",
        "import threading as _threading\n_threading.Event().wait()\n",
    ),
    "unhealthy": (
        "gateway_daemon/selfcheck.py",
        "\n\ndef run(plane, inherited):\n"
        '    raise SelfCheckFailed("self-check failed: this release\'s health check fails")\n',
    ),
    # Adopts the sockets and then never says ready: for killing it in mid-handoff.
    "stuck-in-selfcheck": (
        "gateway_daemon/selfcheck.py",
        "\n\ndef run(plane, inherited):\n    import threading\n    threading.Event().wait()\n",
    ),
}


def build(version: str, output: Path, broken: str | None = None) -> Path:
    """Build release ``version`` at ``output``; ``broken`` names a way from BROKEN."""
    build_release(version, output)
    if broken is not None:
        module, code = BROKEN[broken]
        append(output, {module: code})
    return output


def append(output: Path, additions: Mapping[str, str]) -> None:
    """Append to files of the built release at ``output``: archive path -> text (a file it
    does not have is created). A changed module's bytecode is left out, so the changed
    source is what runs (``upgradectl.build``: the bytecode is never checked against it)."""
    original = output.read_bytes()
    with zipfile.ZipFile(output) as src:
        entries = [(info, src.read(info)) for info in src.infolist()]
    left = dict(additions)
    with output.open("wb") as fh:
        fh.write(original[: original.index(b"PK\x03\x04")])  # the shebang line
        with zipfile.ZipFile(fh, "w", zipfile.ZIP_DEFLATED) as dst:
            for info, data in entries:
                if info.filename.endswith(".pyc") and info.filename[:-1] in additions:
                    continue
                dst.writestr(info, data + left.pop(info.filename, "").encode())
            for name, text in left.items():
                dst.writestr(name, text)
