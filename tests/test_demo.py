"""`make demo` end to end (scripts/demo.py as a process, as a new user runs it): the fleet
is upgraded in two waves, gw-1 first, while traffic flows through every gateway's tunnels,
and the traffic's summary says nothing was lost; the demo then leaves nothing running and
removes its vhost."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from tests.support.rabbit import Management

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "scripts" / "demo.py"
# The demo takes about 40 s on a two-core machine; generous for a loaded one.
DEADLINE_S = 240
GATEWAYS = ("gw-1", "gw-2", "gw-3")
# GATEWAY  UDP SENT  RECEIVED  LOST  TCP BYTES SENT  RECEIVED  RESETS
TRAFFIC_ROW = re.compile(r"^(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$", re.MULTILINE)


def run_demo() -> tuple[int, int, str]:
    """Run the demo to its end: (its pid, exit code, output). Past the deadline it is
    interrupted (Ctrl-C: it still stops what it started) and the test fails."""
    proc = subprocess.Popen(
        [sys.executable, str(DEMO)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        raise AssertionError(
            f"the demo did not finish within {DEADLINE_S}s; its output:\n{out[-6000:]}"
        ) from None
    return proc.pid, proc.returncode, out


def running_in(directory: str) -> list[str]:
    """Command lines of processes that name ``directory`` (the demo's processes do)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if directory in argv:
            found.append(argv)
    return found


def test_the_demo_upgrades_in_two_waves_and_its_traffic_loses_nothing(
    rabbit: Management,
) -> None:
    pid, code, out = run_demo()
    demo_dir = re.search(r"^logs: (\S+)$", out, re.MULTILINE)
    try:
        assert code == 0, f"the demo exited {code}; its output:\n{out[-6000:]}"

        # Traffic starts before the upgrade, which runs in two waves, gw-1 the canary.
        traffic = out.index("== starting traffic through every tunnel")
        upgrade = out.index("then the gateways in two waves: gw-1 first (a canary)")
        summary = out.index("== traffic through the tunnels, from before the upgrade")
        assert traffic < upgrade < summary, out[-6000:]
        for gid, wave in zip(GATEWAYS, (1, 2, 2), strict=True):
            assert re.search(
                rf"^{gid}\s+{wave}\s+SUCCEEDED\s+1\.0\.0\s+1\.2\.0", out, re.MULTILINE
            ), f"{gid} should have succeeded in wave {wave}; the output:\n{out[-4000:]}"

        # Each gateway's traffic, and the total: all of it arrived, no TCP reset.
        rows = {m[1]: [int(n) for n in m.groups()[1:]] for m in TRAFFIC_ROW.finditer(out)}
        assert set(rows) == {*GATEWAYS, "total"}, f"traffic rows seen: {rows}\n{out[-3000:]}"
        for name, (sent, received, lost, tcp_sent, tcp_received, resets) in rows.items():
            assert sent > 0 and tcp_sent > 0, f"{name}: no traffic was sent: {rows[name]}"
            assert (received, lost) == (sent, 0), f"{name}: UDP lost packets: {rows[name]}"
            assert (tcp_received, resets) == (tcp_sent, 0), f"{name}: TCP broke: {rows[name]}"
        assert rows["total"][0] == sum(rows[g][0] for g in GATEWAYS)
        assert re.search(r"^hitless: 0 lost$", out, re.MULTILINE), out[-1500:]

        # Nothing of the demo's is left: no process, no vhost.
        assert demo_dir, f"the demo did not say where its directory is:\n{out[-1500:]}"
        assert running_in(demo_dir[1]) == []
        assert f"hitless-demo-{pid}" not in {v["name"] for v in rabbit.request("GET", "/vhosts")}
    finally:
        rabbit.delete_vhost(f"hitless-demo-{pid}")
        if demo_dir:
            shutil.rmtree(demo_dir[1], ignore_errors=True)
