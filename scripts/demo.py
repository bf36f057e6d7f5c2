"""`make demo`: one controller and three gateways on this machine, upgraded live.

Starts a controller (SQLite) and three gateway daemons as processes, builds and publishes
two releases, upgrades the fleet to the latest with live progress, prints the outcome, and
stops everything it started. Uses the broker at HITLESS_AMQP_URL (default: the local one),
in a vhost of its own when the management API answers; with no broker reachable, it starts
a private RabbitMQ node when `rabbitmq-server` is installed.

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
from urllib.parse import quote, urlsplit

BIN = Path(sys.executable).parent
DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672/%2F"
GATEWAYS = ("gw-1", "gw-2", "gw-3")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
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
            print(f"broker: {host}:{port}, vhost {url.path or '/'}")

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

    def start(self, name: str, *argv: str, env: dict[str, str] | None = None) -> None:
        log = (self.root / f"{name}.log").open("ab")
        self.procs.append(
            subprocess.Popen(
                argv,
                stdout=log,
                stderr=log,
                start_new_session=True,
                env={**os.environ, "HITLESS_AMQP_URL": self.amqp, **(env or {})},
            )
        )

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
        self.say(f"enrolling {len(GATEWAYS)} gateways: a one-time code each")
        for gid in GATEWAYS:
            code = self.enrollment_code(gid)
            print(f"{gid}: {code}")
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

        self.say("upgrading the fleet to the latest release")
        outcome = self.ctl("upgrade", "--latest", "--wait", "--yes")
        self.say("the fleet now")
        self.ctl("gateways", "list")
        print(f"\nlogs: {self.root}")
        return outcome.returncode

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
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
