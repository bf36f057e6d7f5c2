"""A controller and gateway daemons as real processes on a test's own vhost, driven
through the real ``upgradectl``."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import grpc

from controller_svc.broker_access import BrokerAccess, vhost_of
from hitless.bus.amqp import Publisher
from hitless.config import BusConfig
from hitless.trust import keys, release
from hitless.v1 import controller_pb2, controller_pb2_grpc
from tests.support.procs import Proc, Procs, command, free_port
from tests.support.wait import wait_for
from upgradectl.client import Authorization
from upgradectl.credentials import Credentials

CLI_TIMEOUT_S = 120
MANAGEMENT_URL = "http://guest:guest@127.0.0.1:15672"


class Fleet:
    def __init__(self, procs: Procs, root: Path, amqp_url: str) -> None:
        self.procs = procs
        self.root = root
        self.amqp_url = amqp_url
        self.controller_port = free_port()
        self.gateway_port = free_port()  # the controller's port for gateways (mutual TLS)
        self.http_port = free_port()  # the controller's web console (HTTPS)
        self.controller: Proc | None = None
        self.gateway_ports: dict[str, int] = {}
        self._channel: grpc.Channel | None = None
        self._raw_channel: grpc.Channel | None = None
        self._keys: keys.KeyPaths | None = None
        self.token = ""  # the controller's first admin token, once it has started

    @property
    def keys(self) -> keys.KeyPaths:
        """The release manager's key directory (``upgradectl keys init``), made on first use:
        its root.json is every process's trust root, its online/ the controller's keys."""
        if self._keys is None:
            self._keys = keys.init(self.root / "keys")
        return self._keys

    @property
    def controller_address(self) -> str:
        return f"127.0.0.1:{self.controller_port}"

    @property
    def console_url(self) -> str:
        """The web console, unless the controller was started with an --http of its own."""
        return f"https://127.0.0.1:{self.http_port}"

    @property
    def env(self) -> dict[str, str]:
        env = {
            "HITLESS_CONTROLLER": self.controller_address,
            "HITLESS_AMQP_URL": self.amqp_url,
            "HITLESS_CA_CERT": str(self.ca_cert),
        }
        if self.token:
            env["HITLESS_TOKEN"] = self.token
        return env

    @property
    def data_dir(self) -> Path:
        return self.root / "controller"

    @property
    def ca_cert(self) -> Path:
        """The controller's CA certificate, made on its first start."""
        return self.data_dir / "pki" / "ca.pem"

    def channel(self, address: str | None = None) -> grpc.Channel:
        """A TLS channel to the controller's API port (or ``address``), trusting its CA."""
        return grpc.secure_channel(
            address or self.controller_address,
            grpc.ssl_channel_credentials(self.ca_cert.read_bytes()),
        )

    def enrollment_code(self, gateway_id: str) -> str:
        """A one-time enrollment code for ``gateway_id`` (``upgradectl gateways enroll``)."""
        request = controller_pb2.CreateEnrollmentRequest(gateway_id=gateway_id)
        return str(self.stub().CreateEnrollment(request, timeout=30).code)

    def start_controller(
        self, db_url: str | None = None, *extra: str, trust_root_in_env: bool = False
    ) -> Proc:
        """Start the controller (``extra`` added to its arguments) and wait until it
        answers. Its trust root is this fleet's, given with --trust-root, or with
        HITLESS_TRUST_ROOT when ``trust_root_in_env``."""
        trust = [] if trust_root_in_env else ["--trust-root", str(self.keys.root_json)]
        argv = [
            command("controller-svc"), "serve",
            "--listen", self.controller_address,
            "--gateway-listen", f"127.0.0.1:{self.gateway_port}",
            "--data-dir", str(self.data_dir),
            "--amqp", self.amqp_url,
            *trust,
            *extra,
        ]  # fmt: skip
        if db_url:
            argv += ["--db", db_url]
        if "--http" not in extra:
            argv += ["--http", f"127.0.0.1:{self.http_port}"]
        # A broker user per gateway, made at enrollment, named after this test's vhost (the
        # vhost fixture deletes them).
        argv += ["--broker-user-prefix", f"{vhost_of(self.amqp_url)}-"]
        env = {"HITLESS_BROKER_API": MANAGEMENT_URL}
        if trust_root_in_env:
            env["HITLESS_TRUST_ROOT"] = str(self.keys.root_json)
        self.controller = self.procs.start("controller", argv, env)
        if not self.token:
            token_file = self.data_dir / "admin.token"
            wait_for(
                lambda: token_file.exists() and token_file.read_text().strip(),
                timeout=30,
                what="the controller's first admin token",
                interval=0.1,
                describe=self.procs.dump_logs,
            )
            self.token = token_file.read_text().strip()
        wait_for(
            self._answers,
            timeout=30,
            what="the controller to answer",
            interval=0.2,
            describe=self.procs.dump_logs,
        )
        return self.controller

    def _answers(self) -> bool:
        try:
            self.stub().ListReleases(controller_pb2.ListReleasesRequest(), timeout=2)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                self._newest_token()
            return False
        return True

    def _newest_token(self) -> None:
        """A controller started on another database makes an admin token of its own, in
        a file beside the first (``admin.token.<name>``): use the newest."""
        files = sorted(self.data_dir.glob("admin.token*"), key=lambda p: p.stat().st_mtime)
        token = files[-1].read_text().strip() if files else ""
        if token and token != self.token:
            self.token = token
            self.close()
            self._channel = None

    def start_gateway(self, gateway_id: str, controller: str | None = None, *extra: str) -> Proc:
        """A gateway daemon, enrolled with a fresh code on its first start (which brings
        its certificate and trust root); ``controller`` overrides the address it downloads
        from (``--download-from``); ``extra`` are more ``gateway-daemon run`` flags (e.g.
        ``--vpn-listen``)."""
        port = self.gateway_ports.setdefault(gateway_id, free_port())
        state_dir = self.root / gateway_id
        argv = [
            command("gateway-daemon"), "run",
            "--id", gateway_id,
            "--controller", self.controller_address,
            "--amqp", self.amqp_url,
            "--state-dir", str(state_dir),
            "--listen", f"127.0.0.1:{port}",
            *extra,
        ]  # fmt: skip
        if controller:
            argv += ["--download-from", controller]
        if not (state_dir / "identity").exists():
            argv += [
                "--enroll-code", self.enrollment_code(gateway_id),
                "--ca-cert", str(self.ca_cert),
            ]  # fmt: skip
        return self.procs.start(gateway_id, argv)

    def cli(
        self, *args: str, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``upgradectl ARGS`` as the fleet's admin; ``input`` is its standard input
        (e.g. a password for ``users add --password-stdin``)."""
        result = subprocess.run(
            [command("upgradectl"), *args],
            env={**os.environ, **self.env},
            input=input,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"upgradectl {' '.join(args)} exited {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}\n{self.procs.dump_logs()}"
            )
        return result

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def gateways(self) -> dict[str, dict[str, Any]]:
        return {g["id"]: g for g in self.cli_json("gateways", "list")}

    def wait_gateways(self, versions: dict[str, str], timeout: float = 30) -> None:
        """Wait until every named gateway is known, online and on the given version."""

        def ready() -> bool:
            seen = self.gateways()
            return all(
                gid in seen and seen[gid]["version"] == version and seen[gid]["state"] == "ONLINE"
                for gid, version in versions.items()
            )

        wait_for(
            ready,
            timeout=timeout,
            what=f"gateways {versions}",
            interval=0.2,
            describe=lambda: f"{self.gateways()}\n{self.procs.dump_logs()}",
        )

    def release(
        self, version: str, *, restarts_vpn_service: bool = False, min_from: str = ""
    ) -> Path:
        """Build, sign and publish a release of the code under test stamped ``version``
        (upgrading only from ``min_from`` on, when given)."""
        artifact = self.root / f"release-{version}.pyz"
        self.cli("releases", "build", "--version", version, "-o", str(artifact))
        flags = ["--restarts-vpn-service"] if restarts_vpn_service else []
        flags += ["--min-from", min_from] if min_from else []
        self.cli(
            "releases", "publish", "--version", version, "--artifact", str(artifact),
            "--keys", str(self.keys.dir), *flags,
        )  # fmt: skip
        return artifact

    def signed_targets(self, version: str, artifact: Path) -> bytes:
        """The controller's next targets metadata with ``artifact`` listed as release
        ``version``, signed with this fleet's targets key (what ``releases publish --keys``
        sends)."""
        current = (
            self.stub()
            .GetTargetsMetadata(controller_pb2.GetTargetsMetadataRequest(), timeout=30)
            .data
        )
        return release.sign_targets(
            current or None, self.keys.dir, add={release.target_name(version): artifact}
        )

    def stub(self) -> controller_pb2_grpc.ControllerStub:
        """A gRPC stub on the controller, for what the CLI does not show. Like upgradectl,
        it retries unary calls that a controller handing over turned away."""
        if self._channel is None:
            self._raw_channel = self.channel()
            self._channel = grpc.intercept_channel(
                self._raw_channel, _RetryTurnedAway(), bearer(self.token)
            )
        return controller_pb2_grpc.ControllerStub(self._channel)

    def close(self) -> None:
        if self._raw_channel is not None:
            self._raw_channel.close()

    @contextlib.contextmanager
    def as_gateway(self, gateway_id: str) -> Iterator[Publisher]:
        """A publisher logged in as ``gateway_id``'s own broker user, made here the way the
        controller makes it at enrollment (its permissions included): what a gateway, or
        someone holding its broker password, can publish."""
        vhost = vhost_of(self.amqp_url)
        access = BrokerAccess(MANAGEMENT_URL, prefix=f"{vhost}-")
        user, password = access.enroll_gateway(vhost, gateway_id)
        parts = urlsplit(self.amqp_url)
        login = f"{quote(user, safe='')}:{quote(password, safe='')}"
        url = f"amqp://{login}@{parts.netloc.rpartition('@')[2]}{parts.path}"
        publisher = Publisher(BusConfig(url, passive=True), name=f"as-{gateway_id}").start()
        try:
            assert publisher.wait_connected(30), f"cannot connect as {user}"
            yield publisher
        finally:
            publisher.close()

    def greeting(self, gateway_id: str) -> str:
        """What the gateway's listener says: 'hitless-gateway ID VERSION'."""
        port = self.gateway_ports[gateway_id]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(256)
                if not chunk:
                    break
                data += chunk
        return data.decode().strip()


class _RetryTurnedAway(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Retries a unary call ended UNAVAILABLE or CANCELLED (a controller handing over
    turns calls away before they run), for up to about ten seconds."""

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        deadline = time.monotonic() + 10
        while True:
            outcome = continuation(details, request)
            code = outcome.code()
            turned_away = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
            if not turned_away or time.monotonic() > deadline:
                return outcome
            time.sleep(0.1)  # backoff before the retry


def bearer(token: str) -> Authorization:
    """The interceptor upgradectl uses, sending ``token`` with every call."""
    return Authorization(Credentials(token, "the test's token"))
