"""`make demo`: one controller and three gateways on this machine, upgraded live.

Starts a controller (SQLite) and three gateway daemons as processes, builds and publishes
two releases, upgrades the fleet to the latest in two waves with live progress (gw-1 first,
a canary; the others once it has succeeded), prints the outcome, and stops everything it
started.

Each gateway carries encrypted tunnels (2 UDP, 1 TCP) from a lab of its own
(`gateway-daemon traffic --write-lab`: the gateway's tunnels config and the matching remote
sites). The traffic tool (`gateway-daemon traffic --sites`, one process per gateway) plays
the remote sites and the plain services behind the gateway from before the upgrade until
after it, and the demo ends with what it counted: sent, received, lost. Hitless means 0 lost
and no TCP connection reset while every gateway was replaced by its new version.

Uses the broker at HITLESS_AMQP_URL (default: the local one), in a vhost of its own when the
management API answers; with no broker reachable, it starts a private RabbitMQ node when
`rabbitmq-server` is installed.

Every gRPC port is TLS: the controller makes its CA and first admin token on its first
start; the demo makes a one-time enrollment code for each gateway (`upgradectl gateways
enroll`), which the gateway trades for its client certificate when it starts. The demo
prints where each of them is.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from gateway_daemon.tunnels.lab import write_lab

BIN = Path(sys.executable).parent
DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672/%2F"
GATEWAYS = ("gw-1", "gw-2", "gw-3")
# The first wave is one gateway (a canary), the second the rest of the fleet.
WAVES = "1,100%"
UDP_TUNNELS, TCP_TUNNELS = 2, 1  # per gateway
# Light traffic: the demo shares this machine's CPUs with a broker, a controller, three
# gateways and their traffic tools (each TCP record costs both ends CPU, so TCP trickles).
TRAFFIC_PPS = 400  # UDP packets/s per gateway, all its UDP tunnels and both directions
TCP_RATE = 500  # bytes/s per TCP tunnel and direction
UNREACHABLE = 3  # upgradectl's exit code when it lost the controller


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM, port: int = 0) -> int:
    """A loopback port free a moment ago: any (``port`` 0) or ``port`` itself; 0 if taken."""
    with socket.socket(socket.AF_INET, kind) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return 0
        free: int = sock.getsockname()[1]
        return free


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def group_alive(proc: subprocess.Popen[bytes]) -> bool:
    """Whether a process of ``proc``'s group (``proc`` leads it) is still running."""
    proc.poll()  # the leader, once reaped, no longer counts
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # The fields after the command name (in parentheses, which may hold spaces).
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == proc.pid and fields[0] != "Z":
                return True
    return False


def wait(check, what: str, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise SystemExit(f"demo: gave up waiting for {what} after {timeout:.0f}s")


class Demo:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="hitless-demo-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.cleanups: list[tuple[str, object]] = []
        self.amqp = os.environ.get("HITLESS_AMQP_URL", DEFAULT_AMQP)
        self.controller = f"127.0.0.1:{free_port()}"
        self.gateway_port = f"127.0.0.1:{free_port()}"
        self.console = f"127.0.0.1:{free_port()}"
        self.given_ports: set[int] = set()

    def say(self, text: str) -> None:
        print(f"\n== {text}", flush=True)

    # The broker ------------------------------------------------------------------------

    def prepare_broker(self) -> None:
        url = urlsplit(self.amqp)
        host, port = url.hostname or "127.0.0.1", url.port or 5672
        if not reachable(host, port):
            if not shutil.which("rabbitmq-server"):
                raise SystemExit(
                    f"demo: no RabbitMQ at {host}:{port}; install one (apt-get install "
                    "rabbitmq-server) or point HITLESS_AMQP_URL at a broker"
                )
            self.start_private_broker()
            return
        vhost = f"hitless-demo-{os.getpid()}"
        if self.management("PUT", f"/vhosts/{vhost}") and self.management(
            "PUT",
            f"/permissions/{vhost}/{url.username or 'guest'}",
            {"configure": ".*", "write": ".*", "read": ".*"},
        ):
            self.cleanups.append(("vhost", vhost))
            self.amqp = f"{url.scheme}://{url.netloc}/{quote(vhost, safe='')}"
            print(f"broker: {host}:{port}, vhost {vhost} (removed at the end)")
        else:
            # The URI's path, less its leading slash, is the vhost; none means "/"
            # (RabbitMQ's URI spec).
            print(f"broker: {host}:{port}, vhost {unquote(url.path[1:]) or '/'}")

    def management(self, method: str, path: str, body: object = None) -> bool:
        url = urlsplit(self.amqp)
        token = base64.b64encode(f"{url.username or 'guest'}:{url.password or 'guest'}".encode())
        request = urllib.request.Request(
            f"http://{url.hostname}:15672/api{path}",
            data=json.dumps(body or {}).encode() if method == "PUT" else None,
            method=method,
            headers={
                "Authorization": f"Basic {token.decode()}",
                "content-type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=5):
                return True
        except (urllib.error.URLError, OSError):
            return False

    def start_private_broker(self) -> None:
        port = free_port()
        node = f"hitless-demo-{os.getpid()}@localhost"
        base = Path(tempfile.mkdtemp(prefix="hitless-demo-rabbitmq-"))
        (base / "plugins").write_text("[].\n")
        # Its own config file: the system's may pin the listener to the default port.
        (base / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{port}\n")
        (base / "mnesia").mkdir()
        (base / "log").mkdir()
        if os.geteuid() == 0:
            # rabbitmq-server started by root drops to the rabbitmq user.
            base.chmod(0o755)
            for path in (base, *base.iterdir()):
                shutil.chown(path, "rabbitmq", "rabbitmq")
        env = {
            **os.environ,
            "RABBITMQ_NODENAME": node,
            "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "plugins"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
        }
        print(f"broker: none reachable; starting a private RabbitMQ node on port {port}")
        subprocess.run(["rabbitmq-server", "-detached"], env=env, check=True)
        self.cleanups.append(("node", node))
        self.cleanups.append(("dir", base))
        self.amqp = f"amqp://guest:guest@127.0.0.1:{port}/%2F"
        wait(
            lambda: reachable("127.0.0.1", port),
            f"the private RabbitMQ node (logs in {base})",
            timeout=90,
        )

    # Processes -------------------------------------------------------------------------

    def start(
        self, name: str, *argv: str, env: dict[str, str] | None = None, stdout: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a process logging to ``<name>.log`` (its standard output to ``stdout``
        when given); ``stop()`` ends it."""
        log = (self.root / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            argv,
            stdout=stdout.open("wb") if stdout else log,
            stderr=log,
            start_new_session=True,
            env={**os.environ, "HITLESS_AMQP_URL": self.amqp, **(env or {})},
        )
        self.procs.append(proc)
        return proc

    def ctl(
        self, *args: str, show: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "upgradectl"), "--controller", self.controller, *args],
            text=True,
            input=stdin,
            capture_output=not show,
            env={
                **os.environ,
                "HITLESS_AMQP_URL": self.amqp,
                "HITLESS_CA_CERT": str(self.ca_cert),
                "HITLESS_TOKEN_FILE": str(self.token_file),
            },
        )

    @property
    def token_file(self) -> Path:
        """The admin API token the controller makes at its first start."""
        return self.root / "controller" / "admin.token"

    @property
    def ca_cert(self) -> Path:
        """The controller's CA certificate, made at its first start."""
        return self.root / "controller" / "pki" / "ca.pem"

    def enrollment_code(self, gateway_id: str) -> Path:
        """A one-time enrollment code for ``gateway_id`` from the controller, in a file
        only this user may read (a gateway reads it through HITLESS_ENROLL_CODE_FILE, so
        it never shows on a command line)."""
        result = self.ctl("gateways", "enroll", gateway_id, "--json", show=False)
        if result.returncode != 0:
            raise SystemExit(f"demo: upgradectl gateways enroll {gateway_id}: {result.stderr}")
        codes = self.root / "enrollment"
        codes.mkdir(mode=0o700, exist_ok=True)
        path = codes / f"{gateway_id}.code"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(json.loads(result.stdout)["code"] + "\n")
        return path

    def logged(self, gateway_id: str, event: str) -> int:
        """How many times the processes of ``gateway_id`` logged ``event`` (JSON lines)."""
        count = 0
        for line in (self.root / f"{gateway_id}.log").read_text().splitlines():
            if f'"{event}"' in line:
                with contextlib.suppress(json.JSONDecodeError):
                    count += json.loads(line).get("event") == event
        return count

    # Tunnels and traffic ----------------------------------------------------------------

    def write_lab(self, gateway_id: str) -> Path:
        """Write ``<demo dir>/<id>-lab/tunnels.json`` (for the gateway) and ``sites.json``
        (for the traffic tool, which plays the remote sites); return the directory. From a
        shell: ``gateway-daemon traffic --write-lab DIR --udp-tunnels 2 --tcp-tunnels 1``."""
        lab = self.root / f"{gateway_id}-lab"
        write_lab(lab, UDP_TUNNELS, TCP_TUNNELS, port_base=self.tunnel_ports())
        return lab

    def tunnel_ports(self) -> int:
        """A free loopback port base for a gateway's tunnels: base (UDP, to the sites),
        base+1 (UDP, to the plain services) and base+2 (TCP), none given out before."""
        for _ in range(100):
            base = free_port(socket.SOCK_DGRAM)
            ports = {base, base + 1, base + 2}
            if (
                not ports & self.given_ports
                and free_port(socket.SOCK_DGRAM, base + 1)
                and free_port(socket.SOCK_STREAM, base + 2)
            ):
                self.given_ports |= ports
                return base
        raise SystemExit("demo: found no three free loopback ports in a row for the tunnels")

    def start_traffic(self) -> dict[str, subprocess.Popen[bytes]]:
        """One traffic tool per gateway, each sending until stopped; returns once every
        tunnel is up (the gateways log each one)."""

        def tunnels_up(gid: str) -> int:
            return self.logged(gid, "udp_tunnel_up") + self.logged(gid, "tcp_tunnel_up")

        before = {gid: tunnels_up(gid) for gid in GATEWAYS}
        tools = {}
        for gid in GATEWAYS:
            tools[gid] = self.start(
                f"traffic-{gid}",
                str(BIN / "gateway-daemon"), "traffic",
                "--sites", str(self.root / f"{gid}-lab" / "sites.json"),
                "--rate", str(TRAFFIC_PPS), "--tcp-rate", str(TCP_RATE),
                "--duration", "3600", "--json",
                stdout=self.root / f"traffic-{gid}.json",
            )  # fmt: skip
        for gid, tool in tools.items():
            wait(
                lambda gid=gid, tool=tool: (
                    tool.poll() is not None
                    or tunnels_up(gid) >= before[gid] + UDP_TUNNELS + TCP_TUNNELS
                ),
                f"the tunnels of {gid} to come up",
            )
            if tool.poll() is not None:
                raise SystemExit(
                    f"demo: the traffic tool for {gid} stopped: see {self.root}/traffic-{gid}.log"
                )
        return tools

    def stop_traffic(self, tools: dict[str, subprocess.Popen[bytes]]) -> dict[str, Any]:
        """Stop sending (SIGINT); each tool waits for stragglers, then reports (JSON)."""
        for proc in tools.values():
            proc.send_signal(signal.SIGINT)
        reports = {}
        for gid, proc in tools.items():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                raise SystemExit(
                    f"demo: the traffic tool for {gid} did not report within 30s of being "
                    f"stopped: see {self.root}/traffic-{gid}.log"
                ) from None
            try:
                reports[gid] = json.loads((self.root / f"traffic-{gid}.json").read_text())
            except json.JSONDecodeError:
                raise SystemExit(
                    f"demo: the traffic tool for {gid} wrote no report: see "
                    f"{self.root}/traffic-{gid}.log"
                ) from None
        return reports

    def print_traffic(self, reports: dict[str, Any]) -> bool:
        """A table of what each traffic tool counted, a total, and the verdict; whether it
        was hitless (nothing lost, duplicated, rejected or reset, every TCP byte exact)."""
        row = "{:8} {:>9} {:>9} {:>5}   {:>14} {:>9} {:>7}"
        print(
            row.format(
                "GATEWAY", "UDP SENT", "RECEIVED", "LOST", "TCP BYTES SENT", "RECEIVED", "RESETS"
            )
        )
        total = [0] * 6
        for gid, report in reports.items():
            udp, tcp = report["udp"], report["tcp"]
            numbers = [
                udp["sent"], udp["received"], udp["lost"],
                tcp["bytes_sent"], tcp["bytes_received"], tcp["resets"],
            ]  # fmt: skip
            total = [t + n for t, n in zip(total, numbers, strict=True)]
            print(row.format(gid, *numbers))
        print(row.format("total", *total))
        if all(report["clean"] for report in reports.values()):
            print("hitless: 0 lost")
            return True
        dup = sum(r["udp"]["duplicated"] for r in reports.values())
        rejected = sum(r["udp"]["rejected"] for r in reports.values())
        exact = all(r["tcp"]["byte_exact"] for r in reports.values())
        print(
            f"NOT hitless: {total[2]} UDP packets lost, {dup} duplicated, {rejected} rejected; "
            f"{total[5]} TCP resets, TCP bytes {'exact' if exact else 'NOT exact'}"
        )
        return False

    def gateways_on(self, version: str) -> bool:
        result = self.ctl("gateways", "list", "--json", show=False)
        if result.returncode != 0:
            return False
        seen = {g["id"]: g for g in json.loads(result.stdout)}
        return all(seen.get(g, {}).get("version") == version for g in GATEWAYS)

    def run(self) -> int:
        self.prepare_broker()
        keys = self.root / "keys"
        self.say(f"making throwaway release keys in {keys} (a real fleet's come from a ceremony)")
        self.ctl("keys", "init", "--dir", str(keys))
        trust_root = str(keys / "root.json")
        self.say(f"starting a controller on {self.controller} and {len(GATEWAYS)} gateways")
        self.start(
            "controller",
            str(BIN / "controller-svc"),
            "serve",
            "--listen",
            self.controller,
            "--gateway-listen",
            self.gateway_port,
            "--http",
            self.console,
            "--data-dir",
            str(self.root / "controller"),
            "--trust-root",
            trust_root,
        )
        wait(
            lambda: self.token_file.exists() and bool(self.token_file.read_text().strip()),
            "the controller's first admin API token",
        )
        wait(lambda: self.ctl("tokens", "list", show=False).returncode == 0, "the controller")
        self.say("the controller made its CA and its first admin API token (TLS on every port)")
        print(f"CA certificate:  {self.ca_cert}  (upgradectl --ca-cert, gateway-daemon --ca-cert)")
        print(f"admin API token: {self.token_file}  (upgradectl --token-file)")
        print(f"API port {self.controller}, gateway port {self.gateway_port} (mutual TLS)")
        password = secrets.token_urlsafe(12)
        made = self.ctl(
            "users", "add", "admin", "--role", "admin", "--password-stdin",
            show=False, stdin=password + "\n",
        )  # fmt: skip
        if made.returncode != 0:
            raise SystemExit(f"demo: upgradectl users add: {made.stderr}")
        print(
            f"web console: https://{self.console}/  user admin, password {password} (a throwaway"
            f" for this demo; the browser will ask you to trust {self.ca_cert})"
        )
        self.say(
            f"enrolling {len(GATEWAYS)} gateways: a one-time code each; each carries "
            f"{UDP_TUNNELS} UDP and {TCP_TUNNELS} TCP encrypted tunnels"
        )
        for gid in GATEWAYS:
            code = self.enrollment_code(gid)
            lab = self.write_lab(gid)
            print(f"{gid}: {code}, tunnels {lab}/tunnels.json")
            self.start(
                gid,
                str(BIN / "gateway-daemon"),
                "run",
                "--id",
                gid,
                "--controller",
                self.controller,
                "--state-dir",
                str(self.root / gid),
                "--listen",
                f"127.0.0.1:{free_port()}",
                "--ca-cert",
                str(self.ca_cert),
                "--tunnels",
                str(lab / "tunnels.json"),
                env={"HITLESS_ENROLL_CODE_FILE": str(code)},
            )
        wait(lambda: self.gateways_on("1.0.0"), "the gateways to register")
        self.ctl("gateways", "list")
        print(f"each gateway's key and certificate: {self.root}/<id>/identity/ (codes used up)")

        self.say("building and publishing releases 1.1.0 and 1.2.0")
        for version in ("1.1.0", "1.2.0"):
            artifact = self.root / f"hitless-{version}.pyz"
            notes = self.root / f"notes-{version}.md"
            notes.write_text(f"# hitless {version}\n\nGateway software {version}.\n")
            self.ctl("releases", "build", "--version", version, "-o", str(artifact))
            self.ctl(
                "releases",
                "publish",
                "--version",
                version,
                "--artifact",
                str(artifact),
                "--notes",
                str(notes),
                "--keys",
                str(keys),
            )
        self.ctl("releases", "list")

        self.say(
            "starting traffic through every tunnel: the traffic tool plays the remote sites "
            "and the services behind each gateway"
        )
        tools = self.start_traffic()
        print(
            f"through each gateway: {TRAFFIC_PPS} UDP packets/s and {TCP_RATE} bytes/s each way "
            f"over TCP, until after the upgrade"
        )

        self.say(
            "upgrading to the latest release: the controller moves itself first, then the "
            f"gateways in two waves: {GATEWAYS[0]} first (a canary), then "
            f"{', '.join(GATEWAYS[1:])} once it has succeeded"
        )
        outcome = self.ctl("upgrade", "--latest", "--waves", WAVES, "--wait", "--yes")
        if outcome.returncode == UNREACHABLE:
            # The controller moving itself can outlast upgradectl's retries; the job lives
            # in the controller's database and goes on: only the watch ended.
            self.say("following the job again, from the controller's new version")
            outcome = self.ctl("status", "--watch")
        self.say("the fleet now")
        self.ctl("gateways", "list")

        self.say("traffic through the tunnels, from before the upgrade until after it")
        hitless = self.print_traffic(self.stop_traffic(tools))
        print(f"\nlogs: {self.root}")
        return outcome.returncode or (0 if hitless else 1)

    def stop(self) -> None:
        """End every process started (each a process group: a gateway's new version runs
        in its group too), then remove the vhost, node and directories made."""
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs:
            while group_alive(proc) and time.monotonic() < deadline:
                time.sleep(0.1)
            if group_alive(proc):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for kind, what in self.cleanups:
            if kind == "vhost":
                self.management("DELETE", f"/vhosts/{what}")
            elif kind == "node":
                subprocess.run(["rabbitmqctl", "-n", str(what), "stop"], capture_output=True)
            else:
                shutil.rmtree(str(what), ignore_errors=True)


def main() -> int:
    demo = Demo()
    try:
        return demo.run()
    except KeyboardInterrupt:
        return 130
    finally:
        demo.stop()


if __name__ == "__main__":
    sys.exit(main())
