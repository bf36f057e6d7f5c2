"""The VPN service process: TLS sessions for users, a control socket for the daemon.

    gateway-daemon vpn-service --state-dir DIR --listen HOST:PORT [--keepalive-timeout S]
                               [--id GATEWAY]

Started by the gateway daemon (``supervisor.py``) in a session of its own; it can also run
by hand. It binds the TLS listener first, then the control socket, then writes its pid
file: once ``STATUS`` answers, users can connect. SIGTERM, SIGINT and ``STOP`` end it the
same way: every session gets ``BYE service restarting`` and is closed, the files it owns
are removed, and it exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import ssl
from pathlib import Path

from gateway_daemon.vpn import certs, protocol
from gateway_daemon.vpn.config import DEFAULT_KEEPALIVE_TIMEOUT_S, VpnConfig
from hitless import logs, version
from hitless.config import HostPort

log = logs.get(__name__)

HELLO_TIMEOUT_S = 10.0
TLS_HANDSHAKE_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 2.0


class VpnService:
    def __init__(self, config: VpnConfig, gateway_id: str) -> None:
        self.config = config
        self.gateway_id = gateway_id
        self.version = version.current()
        self._sessions: dict[str, asyncio.StreamWriter] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._accepting = True
        self._dropped = 0

    async def run(self) -> None:
        certs.ensure(self.config, f"hitless-vpn {self.gateway_id}")
        listen = self.config.listen
        server = await asyncio.start_server(
            self._session,
            listen.host,
            listen.port,
            ssl=certs.server_context(self.config),
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S,
            limit=protocol.MAX_LINE * 4,
        )
        self.config.control_socket.unlink(missing_ok=True)
        control = await asyncio.start_unix_server(self._control, path=self.config.control_socket)
        _write_pid(self.config.pid_file)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stopping.set)
        log.info("vpn_service_started", listen=str(listen), pid=os.getpid(), version=self.version)
        try:
            await self._stopping.wait()
            server.close()
            await self._drop_all()
        finally:
            control.close()
            self._remove_files()
        log.info("vpn_service_stopped", dropped=self._dropped)

    async def _drop_all(self) -> None:
        """Say BYE to every session and close it; remember how many there were."""
        self._dropped += len(self._sessions)
        for writer in list(self._sessions.values()):
            with contextlib.suppress(ConnectionError, RuntimeError):
                writer.write(f"{protocol.BYE_RESTART}\n".encode())
            writer.close()
        self._sessions.clear()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=CLOSE_TIMEOUT_S)

    def _remove_files(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            if int(self.config.pid_file.read_text()) == os.getpid():
                self.config.pid_file.unlink()
                self.config.control_socket.unlink(missing_ok=True)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        session_id = ""
        peer = writer.get_extra_info("peername")
        try:
            if not self._accepting or self._stopping.is_set():
                return
            line = await asyncio.wait_for(reader.readline(), HELLO_TIMEOUT_S)
            word, _, user = line.decode(errors="replace").strip().partition(" ")
            if word != protocol.HELLO or not protocol.valid_user(user):
                writer.write(f"{protocol.ERROR} expected: HELLO <user>\n".encode())
                return
            session_id = secrets.token_hex(8)
            self._sessions[session_id] = writer
            writer.write(f"{protocol.WELCOME} {session_id}\n".encode())
            await writer.drain()
            log.info("vpn_session_opened", session=session_id, user=user, peer=str(peer))
            await self._keepalives(reader, writer, session_id)
        except TimeoutError:
            if session_id:
                log.info("vpn_session_expired", session=session_id)
        except (ConnectionError, ssl.SSLError, ValueError, OSError) as exc:
            log.info("vpn_session_broken", session=session_id or None, error=str(exc))
        finally:
            if self._sessions.pop(session_id, None) is not None:
                log.info("vpn_session_closed", session=session_id)
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError, OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT_S)
            self._tasks.discard(task)

    async def _keepalives(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session_id: str
    ) -> None:
        timeout = self.config.keepalive_timeout_s
        while session_id in self._sessions:
            line = (await asyncio.wait_for(reader.readline(), timeout)).decode(errors="replace")
            if not line:
                return
            word = line.strip()
            if word == protocol.PING:
                writer.write(f"{protocol.PONG}\n".encode())
                await writer.drain()
            elif word == protocol.BYE:
                return
            else:
                writer.write(f"{protocol.ERROR} unknown message\n".encode())
                return

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = (await asyncio.wait_for(reader.readline(), HELLO_TIMEOUT_S)).decode()
            command = request.strip()
            if command == protocol.STATUS:
                reply = {
                    "pid": os.getpid(),
                    "version": self.version,
                    "sessions": len(self._sessions),
                    "listen": str(self.config.listen),
                }
            elif command == protocol.STOP:
                log.info("vpn_service_stop_requested", sessions=len(self._sessions))
                self._accepting = False
                await self._drop_all()
                reply = {"dropped": self._dropped}
            else:
                reply = {"error": f"unknown control command {command!r}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
            if command == protocol.STOP:
                self._stopping.set()  # only now: the loop ends once this is set
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()


def _write_pid(path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{os.getpid()}\n")
    tmp.replace(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", required=True, type=Path, help="the gateway's state dir")
    parser.add_argument("--listen", required=True, metavar="HOST:PORT", help="the TLS address")
    parser.add_argument(
        "--keepalive-timeout", type=float, default=DEFAULT_KEEPALIVE_TIMEOUT_S, metavar="S",
        help="drop a session silent this long "
        f"(default {DEFAULT_KEEPALIVE_TIMEOUT_S:g})",
    )  # fmt: skip
    parser.add_argument("--id", default="gateway", help="the gateway's id, for logs")


def main(args: argparse.Namespace) -> int:
    logs.configure("gateway-vpn", json=True)
    logs.bind_process(gateway_id=args.id)
    config = VpnConfig(
        listen=HostPort.parse(args.listen, what="VPN listen address"),
        state_dir=args.state_dir.resolve(),
        keepalive_timeout_s=args.keepalive_timeout,
    )
    asyncio.run(VpnService(config, args.id).run())
    return 0
