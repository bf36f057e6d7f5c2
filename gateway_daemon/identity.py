"""A gateway's identity: its key and client certificate, the controller's CA, the port it
downloads from and its own broker login, obtained once by enrollment and kept in
``<state dir>/identity`` (0700; key and credentials 0600).

Enrollment (``enroll``): the gateway makes its key (ECDSA P-256, never sent), asks the
controller's ``Enrollment.Enroll`` over TLS (checked against the CA file the operator
gave) with the one-time code and a certificate request, and keeps what comes back. The
trust root that comes with it becomes the gateway's TUF anchor (``trust.provision``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import grpc

from gateway_daemon import trust as gateway_trust
from hitless import logs, names, pki
from hitless.config import HostPort
from hitless.errors import ConfigError, HitlessError
from hitless.private import private_dir
from hitless.v1 import enrollment_pb2, enrollment_pb2_grpc

log = logs.get(__name__)

ENROLL_TIMEOUT_S = 30.0
_FILE = "identity.json"


class EnrollmentFailed(HitlessError):
    """The controller refused the enrollment, or could not be reached."""


@dataclass(frozen=True)
class Identity:
    """What enrollment gave this gateway (PEM bytes; ``broker_user`` "" when the controller
    made no broker user, and the ``--amqp`` login is used as given)."""

    gateway_id: str
    key_pem: bytes = field(repr=False)
    cert_pem: bytes
    ca_pem: bytes
    gateway_port: int
    broker_user: str = ""
    broker_password: str = field(default="", repr=False)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """TLS to the controller's gateway port, with this gateway's client certificate."""
        return pki.channel_credentials(self.ca_pem, self.key_pem, self.cert_pem)

    def download_address(self, controller: HostPort) -> HostPort:
        """The controller's gateway port on the host the gateway was told to reach."""
        return HostPort(controller.host, self.gateway_port)

    def amqp_url(self, url: str) -> str:
        """``url`` with this gateway's own broker login in place of the one it carries."""
        if not self.broker_user:
            return url
        parts = urlsplit(url)
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        netloc = f"{quote(self.broker_user, safe='')}:{quote(self.broker_password, safe='')}@{host}"
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc))


def directory(state_dir: Path) -> Path:
    return state_dir / "identity"


def load(state_dir: Path) -> Identity | None:
    """The identity kept in ``state_dir``, None when the gateway never enrolled. Raises
    ConfigError when it is there but damaged or readable by others."""
    where = directory(state_dir)
    if not (where / _FILE).exists():
        return None
    try:
        meta = json.loads(pki.read_private(where / _FILE))
        return Identity(
            gateway_id=str(meta["gateway_id"]),
            key_pem=pki.read_private(where / "key.pem"),
            cert_pem=pki.read_certificate(where / "cert.pem", "gateway certificate"),
            ca_pem=pki.read_certificate(where / "ca.pem", "controller CA"),
            gateway_port=int(meta["gateway_port"]),
            broker_user=str(meta.get("broker_user", "")),
            broker_password=str(meta.get("broker_password", "")),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"the gateway identity in {where} is damaged ({exc}): enroll again "
            "(gateway-daemon enroll, with a new code from upgradectl gateways enroll)"
        ) from exc


def save(state_dir: Path, identity: Identity) -> Path:
    """Keep ``identity`` in ``state_dir`` (replacing one kept before, all files at once by
    renaming a complete directory into place). Returns the directory."""
    where = directory(state_dir)
    # The state directory is private (as AgentState makes it): enrolling may make it first.
    private_dir(state_dir)
    tmp = where.with_name(".identity.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    meta = {
        "gateway_id": identity.gateway_id,
        "gateway_port": identity.gateway_port,
        "broker_user": identity.broker_user,
        "broker_password": identity.broker_password,
    }
    for name, data in (
        ("key.pem", identity.key_pem),
        (_FILE, json.dumps(meta).encode()),
        ("cert.pem", identity.cert_pem),
        ("ca.pem", identity.ca_pem),
    ):
        fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    old = where.with_name(".identity.old")
    shutil.rmtree(old, ignore_errors=True)
    if where.exists():
        where.rename(old)
    tmp.rename(where)
    shutil.rmtree(old, ignore_errors=True)
    return where


def enroll(
    state_dir: Path, gateway_id: str, controller: HostPort, ca_pem: bytes, code: str
) -> Identity:
    """Enroll at the controller's API port ``controller`` (TLS checked against ``ca_pem``)
    with the one-time ``code``; keep and return the identity, and keep the trust root that
    came with it as the gateway's anchor. Raises EnrollmentFailed with the controller's
    words (a used or expired code, another gateway's code) or why it could not be asked."""
    names.gateway_id(gateway_id)
    key = pki.new_key()
    request = enrollment_pb2.EnrollRequest(
        gateway_id=gateway_id,
        code=code.strip(),
        csr_pem=pki.certificate_request(key, gateway_id),
    )
    credentials = pki.channel_credentials(ca_pem)
    try:
        with grpc.secure_channel(str(controller), credentials) as channel:
            reply = enrollment_pb2_grpc.EnrollmentStub(channel).Enroll(
                request, timeout=ENROLL_TIMEOUT_S
            )
    except grpc.RpcError as exc:
        code_name = exc.code().name
        raise EnrollmentFailed(
            f"enrollment at {controller} failed: {code_name}: {exc.details()}"
            + (
                "; check that --ca-cert is the controller's <data dir>/pki/ca.pem"
                if exc.code() == grpc.StatusCode.UNAVAILABLE
                else ""
            )
        ) from exc
    identity = Identity(
        gateway_id=gateway_id,
        key_pem=pki.key_pem(key),
        cert_pem=reply.certificate_pem,
        ca_pem=reply.ca_pem,
        gateway_port=reply.gateway_port,
        broker_user=reply.broker_user,
        broker_password=reply.broker_password,
    )
    if reply.root_metadata:
        gateway_trust.provision_bytes(state_dir, reply.root_metadata, "the enrollment")
    where = save(state_dir, identity)
    log.info(
        "gateway_enrolled",
        gateway=gateway_id,
        identity=str(where),
        broker_user=identity.broker_user,
    )
    return identity
