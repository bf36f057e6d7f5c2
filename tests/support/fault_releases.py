"""Releases that fail the way other process-swap systems have seen new versions fail in
the field, for the handoff's fault tests.

Like ``releases.build(broken=...)``, each is a real release (``upgradectl``'s build) with
code appended to one module inside the zipapp; the fault lives in the artifact, so
nothing in the product can be told to misbehave, by a command or otherwise.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Final

from tests.support import releases

# What the blocking-and-hang version writes to stderr once it has done the damage.
BLOCKING_MARK: Final = "fault: every inherited socket is in blocking mode now"

FAULTS: Final[dict[str, tuple[str, str]]] = {
    # Sets every socket it adopted to blocking mode (shared with the old process: the
    # flag belongs to the open file description), then never says ready.
    "blocking-and-hang": (
        "gateway_daemon/selfcheck.py",
        "\n\ndef run(plane, inherited):\n"
        "    import socket, sys, threading\n"
        "    for sock in inherited:\n"
        "        if isinstance(sock, socket.socket):\n"
        "            sock.setblocking(True)\n"
        f"    print({BLOCKING_MARK!r}, file=sys.stderr, flush=True)\n"
        "    threading.Event().wait()\n",
    ),
    # Lowers its own descriptor limit as it starts, as `prlimit --nofile=128:128` around
    # the new version would: it cannot receive a gateway's hundreds of connections.
    "low-fd-limit": (
        "gateway_daemon/cli.py",
        "\nimport resource as _resource\n"
        "_resource.setrlimit(_resource.RLIMIT_NOFILE, (128, 128))\n",
    ),
    # Holds the sockets and checks itself until the old process is gone (its parent
    # changes from the one it had when it started: the old version started it), then
    # carries on as a good release does.
    "selfcheck-outlives-old": (
        "gateway_daemon/selfcheck.py",
        "\n\nimport os as _os\n_old = _os.getppid()\n_real_run = run\n\n\n"
        "def run(plane, inherited):\n"
        "    import time\n"
        "    deadline = time.monotonic() + 30\n"
        "    while _os.getppid() == _old and time.monotonic() < deadline:\n"
        "        time.sleep(0.01)\n"
        "    _real_run(plane, inherited)\n",
    ),
}


def build(version: str, output: Path, fault: str) -> Path:
    """Build release ``version`` at ``output`` with ``fault``, a key of FAULTS."""
    releases.build(version, output)
    module, code = FAULTS[fault]
    original = output.read_bytes()
    with zipfile.ZipFile(output) as src:
        entries = [(info, src.read(info)) for info in src.infolist()]
    if module not in {info.filename for info, _ in entries}:
        raise AssertionError(f"{output} has no {module} to put the fault {fault!r} in")
    with output.open("wb") as fh:
        fh.write(original[: original.index(b"PK\x03\x04")])  # the shebang line
        with zipfile.ZipFile(fh, "w", zipfile.ZIP_DEFLATED) as dst:
            for info, data in entries:
                if info.filename == module:
                    data += code.encode()
                dst.writestr(info, data)
    return output
