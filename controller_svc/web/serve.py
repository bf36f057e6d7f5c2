"""Serving the console: uvicorn over TLS in a thread of the controller process.

The listening socket is made here with SO_REUSEPORT, as the gRPC ports are: a new
controller version started by the inline upgrade binds the same port beside this one, and
the kernel gives new connections to both until this one closes its socket. The server
certificate is the controller's own (``<data dir>/pki/server.pem``, from the controller's
CA), so a browser checks it against the CA that upgradectl uses.
"""

from __future__ import annotations

import socket
import ssl
import sys
import threading
import time
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

from controller_svc.access import Audit
from controller_svc.admins import Admins
from controller_svc.engine import Engine
from controller_svc.rejections import Rejections
from controller_svc.users import Users
from controller_svc.web.app import build_app
from controller_svc.web.session import load_secret
from hitless import logs
from hitless.config import HostPort
from hitless.errors import ConfigError
from hitless.pki import CertificateAuthority

log = logs.get(__name__)

BACKLOG = 128
START_TIMEOUT_S = 10.0
# A kept-alive connection idle this long is closed.
KEEP_ALIVE_S = 5


def console_server(
    listen: HostPort,
    *,
    engine: Engine,
    admins: Admins,
    rejections: Rejections,
    audit: Audit,
    users: Users,
    ca: CertificateAuthority,
    data_dir: Path,
    stopping: threading.Event,
    grace_s: float,
) -> ConsoleServer:
    """The console of the controller whose services these are, to serve at ``listen``
    with the server certificate of ``ca`` (not started yet). While there is no console
    user, says on stderr how to make the first admin. Raises ConfigError when the session
    secret (``data_dir/console.secret``) is unusable."""
    app = build_app(
        engine=engine, admins=admins, rejections=rejections, audit=audit, users=users,
        secret=load_secret(data_dir), stopping=stopping,
    )  # fmt: skip
    if not users.list():
        print(
            f"controller-svc: the web console at https://{listen} has no users yet. Make the "
            "first admin with `upgradectl users add admin --role admin --password-stdin` (the "
            "password, at least 12 characters, on standard input); browsers check the "
            f"console's certificate against {ca.ca_path}.",
            file=sys.stderr,
        )
    cert, key = ca.server_cert_path, ca.server_key_path
    return ConsoleServer(app, listen, cert=cert, key=key, grace_s=grace_s)


class ConsoleServer:
    """``app`` over HTTPS at ``listen`` with the certificate chain ``cert`` and its ``key``
    (PEM files); ``grace_s`` is how long stopping waits for requests in flight."""

    def __init__(
        self, app: ASGIApp, listen: HostPort, *, cert: Path, key: Path, grace_s: float
    ) -> None:
        self._listen = listen
        self._grace_s = grace_s
        self._config = uvicorn.Config(
            app,
            ssl_certfile=str(cert),
            ssl_keyfile=str(key),
            log_config=None,
            access_log=False,
            lifespan="off",
            proxy_headers=False,
            server_header=False,
            timeout_keep_alive=KEEP_ALIVE_S,
            timeout_graceful_shutdown=int(grace_s),
        )
        self._server = uvicorn.Server(self._config)
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Listen and serve; the port bound. Raises ConfigError when the address cannot be
        listened on or the certificate is unusable."""
        try:
            self._config.load()
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"the web console cannot use its TLS certificate: {exc}") from exc
        assert self._config.ssl is not None
        self._config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
        sock = _listening_socket(self._listen)
        port: int = sock.getsockname()[1]
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="web-console", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ConfigError(f"the web console did not start on {self._listen}")
            time.sleep(0.01)
        log.info("console_serving", url=f"https://{HostPort(self._listen.host, port)}")
        return port

    def stop(self) -> None:
        """Take no new connections, give those open the grace to finish, then close them;
        returns once the server has stopped (or a second after the grace)."""
        self._server.should_exit = True
        if self._thread is None:
            return
        self._thread.join(self._grace_s + 1)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(1)


def _listening_socket(listen: HostPort) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"the web console cannot listen on {listen}: {exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"the web console cannot listen on {listen}: {exc.strerror or exc} (another "
            "program may hold the port: choose another with --http HOST:PORT, or --http off)"
        ) from exc
    return sock
