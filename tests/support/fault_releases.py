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


def mark(fault: str) -> str:
    """What a release with one of the faults that say so writes to stderr as the fault
    strikes (the earlier faults say nothing, or BLOCKING_MARK)."""
    return f"fault: {fault}"


def _after_receive_fds(fault: str, then: str) -> str:
    """Code for wire.py: receive the descriptors as usual, say ``fault``, run ``then``."""
    return (
        "\n\n_real_receive_fds = Channel.receive_fds\n\n\n"
        "def _receive_fds_faulty(self, count, deadline):\n"
        "    import os, signal, sys, threading\n"
        "    fds = _real_receive_fds(self, count, deadline)\n"
        f"    print({mark(fault)!r}, file=sys.stderr, flush=True)\n"
        f"    {then}\n"
        "    return fds\n\n\n"
        "Channel.receive_fds = _receive_fds_faulty\n"
    )


def _cut_over_dies(fault: str) -> str:
    """Code for dataplane.py: the plane's cut_over_when kills its process once READY has
    arrived, before it pauses."""
    return (
        "\n\n_real_cut_over_when = DataPlane.cut_over_when\n\n\n"
        "def _cut_over_dies(self, ready, send):\n"
        "    import os, signal, sys\n"
        "    ready.wait()\n"
        f"    print({mark(fault)!r}, file=sys.stderr, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n\n\n"
        "DataPlane.cut_over_when = _cut_over_dies\n"
    )


def _dies_awaiting_started(fault: str) -> str:
    """Code for handoff/parent.py: the old process kills itself once the final state
    has gone out, as it starts to wait for STARTED (on its parked loop thread)."""
    return (
        "\n\n_real_expect = _expect\n\n\n"
        "def _expect(channel, kind, deadline, what, watch=None):\n"
        "    import os, signal, sys\n"
        "    if kind == wire.STARTED:\n"
        f"        print({mark(fault)!r}, file=sys.stderr, flush=True)\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return _real_expect(channel, kind, deadline, what, watch)\n"
    )


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
    # The faults below say so on stderr (``mark``) as they strike, so that a run can
    # tell the fault happened at its step. The new process dies (SIGKILL) or hangs once
    # the descriptors have arrived, before it reads the snapshot.
    "dies-receiving-descriptors": (
        "gateway_daemon/handoff/wire.py",
        _after_receive_fds("dies-receiving-descriptors", "os.kill(os.getpid(), signal.SIGKILL)"),
    ),
    "hangs-receiving-descriptors": (
        "gateway_daemon/handoff/wire.py",
        _after_receive_fds("hangs-receiving-descriptors", "threading.Event().wait()"),
    ),
    # Dies (SIGKILL) in its self-check, holding every socket and the snapshot.
    "dies-in-selfcheck": (
        "gateway_daemon/selfcheck.py",
        "\n\ndef run(plane, inherited):\n"
        "    import os, signal, sys\n"
        f"    print({mark('dies-in-selfcheck')!r}, file=sys.stderr, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n",
    ),
    # Says ready, then never takes the final state: the old process has paused and
    # waits for STARTED.
    "hangs-at-cutover": (
        "gateway_daemon/handoff/child.py",
        "\n\ndef _hang_at_cutover(self, deadline):\n"
        "    import sys, threading\n"
        f"    print({mark('hangs-at-cutover')!r}, file=sys.stderr, flush=True)\n"
        "    threading.Event().wait()\n\n\n"
        "Inheritance.cutover = _hang_at_cutover\n",
    ),
    # Faults of the old side: a gateway running this release dies (SIGKILL) when its
    # next version has said ready, as it is asked to cut over (still forwarding), or
    # right after it has paused and sent the final state (before STARTED).
    "old-dies-at-cutover": (
        "gateway_daemon/dataplane.py",
        _cut_over_dies("old-dies-at-cutover"),
    ),
    "old-dies-after-cutover": (
        "gateway_daemon/handoff/parent.py",
        _dies_awaiting_started("old-dies-after-cutover"),
    ),
    # Its agent cannot start: the agent's module exits as it is imported (as a release
    # with a broken dependency of the agent would), so the new version never gets ready.
    "agent-exits-at-start": (
        "gateway_daemon/agent_process.py",
        "\n\nimport sys as _sys\n"
        f"print({mark('agent-exits-at-start')!r}, file=_sys.stderr, flush=True)\n"
        "_sys.exit(3)\n",
    ),
    # Serves as a good release does, but from its soak's third reading on sees one of its
    # UDP tunnels down (the lowest id): a version whose tunnel falls over after the swap.
    "tunnel-down-in-soak": (
        "gateway_daemon/soak.py",
        "\n\n_real_sample = sample\n_readings = [0]\n\n\n"
        "def sample(plane):\n"
        "    import dataclasses, sys\n"
        "    health = _real_sample(plane)\n"
        "    _readings[0] += 1\n"
        "    if _readings[0] < 3 or not health.up:\n"
        "        return health\n"
        "    if _readings[0] == 3:\n"
        "        print('fault: a tunnel is down', file=sys.stderr, flush=True)\n"
        "    return dataclasses.replace(health, up=health.up - {min(health.up)})\n",
    ),
    # From its soak's third reading on, counts half of 1000 more datagrams as dropped: a
    # version whose drops rise after the swap (it needs no tunnels configured to show).
    "drops-in-soak": (
        "gateway_daemon/soak.py",
        "\n\n_real_sample = sample\n_readings = [0]\n\n\n"
        "def sample(plane):\n"
        "    import dataclasses\n"
        "    health = _real_sample(plane)\n"
        "    _readings[0] += 1\n"
        "    if _readings[0] < 3:\n"
        "        return health\n"
        "    return dataclasses.replace(\n"
        "        health, received=health.received + 1000, dropped=health.dropped + 500\n"
        "    )\n",
    ),
}


def build(version: str, output: Path, fault: str) -> Path:
    """Build release ``version`` at ``output`` with ``fault``, a key of FAULTS."""
    releases.build(version, output)
    module, code = FAULTS[fault]
    with zipfile.ZipFile(output) as built:
        if module not in built.namelist():
            raise AssertionError(f"{output} has no {module} to put the fault {fault!r} in")
    releases.append(output, {module: code})
    return output
