"""What the gateway trusts: its trust anchor (root metadata it was provisioned with), the
TUF metadata it keeps up to date from the controller, and the command keys root carries.

On disk, in the state directory (created 0700)::

    trust/root.json        the trust anchor, as provisioned (``--trust-root FILE``)
    trust/metadata/        metadata python-tuf's client verified last (its cache)

The anchor is given once; later starts (and the next version, after a handoff) read it
from the state directory. Root rotations reach the gateway through the metadata, so the
anchor never needs replacing. Metadata comes from the controller over the Artifacts
service's ``FetchMetadata`` (``ControllerSource``); it is verified here, so a controller
that lies can withhold a release but never make one run.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import grpc
from tuf.api.metadata import Root, TargetFile

from gateway_daemon.download import ControllerChannel
from hitless import logs
from hitless.backoff import Backoff
from hitless.config import HostPort
from hitless.errors import ConfigError
from hitless.private import private_dir
from hitless.trust.client import TrustClient
from hitless.trust.errors import FetchFailed, MetadataNotFound, TrustError
from hitless.trust.release import target_name
from hitless.trust.verify import read_metadata, verify_role
from hitless.v1 import artifacts_pb2, artifacts_pb2_grpc

log = logs.get(__name__)

FETCH_TIMEOUT_S = 30.0
FETCH_ATTEMPTS = 8
_BACKOFF = Backoff()


def anchor_path(state_dir: Path) -> Path:
    """Where the gateway keeps its trust anchor."""
    return state_dir / "trust" / "root.json"


def provision(state_dir: Path, given: Path | None) -> Path:
    """Keep the trust root file ``given`` as the gateway's anchor (replacing one kept
    before), or use the one kept before when ``given`` is None. Returns its path.

    Raises ConfigError when ``given`` cannot be read or is not self-signed root metadata,
    or when there is neither.
    """
    path = anchor_path(state_dir)
    if given is None:
        if path.is_file():
            return path
        raise ConfigError(
            "this gateway has no trust root: enroll it (gateway-daemon enroll, which brings "
            "the controller's), or give --trust-root FILE (the root.json that `upgradectl "
            "keys init` made) once; it is kept in the state directory"
        )
    try:
        data = given.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the trust root {given}: {exc}") from exc
    return provision_bytes(state_dir, data, str(given))


def provision_bytes(state_dir: Path, data: bytes, source: str) -> Path:
    """Keep root metadata ``data`` (from ``source``, for messages) as the gateway's anchor,
    replacing one kept before. Raises ConfigError when it is not self-signed root
    metadata."""
    path = anchor_path(state_dir)
    try:
        md = read_metadata(data, Root)
        verify_role(md.signed, md, "root")
    except TrustError as exc:
        raise ConfigError(f"the trust root from {source} is not usable: {exc}") from exc
    private_dir(path.parent)
    if not path.is_file() or path.read_bytes() != data:
        # Metadata verified from another anchor is not trusted from this one.
        shutil.rmtree(path.parent / "metadata", ignore_errors=True)
        tmp = path.with_name(".root.json.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    return path


class ControllerSource:
    """Metadata files from the controller's Artifacts service (``FetchMetadata``), over
    ``channel`` when given (shared with the download), else over one of its own to
    ``controller`` with ``credentials``, opened at the first fetch and kept."""

    def __init__(
        self,
        controller: HostPort,
        credentials: grpc.ChannelCredentials,
        channel: ControllerChannel | None = None,
    ) -> None:
        self._controller = controller
        self.channel = channel or ControllerChannel(controller, credentials)

    def fetch_metadata(self, name: str) -> bytes:
        """The bytes of metadata file ``name``; MetadataNotFound when the controller has
        none by that name, FetchFailed when it cannot be asked (unless the controller only
        said it is busy, the channel is then closed, and the next fetch opens a new one)."""
        try:
            stub = artifacts_pb2_grpc.ArtifactsStub(self.channel.get())
            reply = stub.FetchMetadata(
                artifacts_pb2.MetadataRequest(name=name), timeout=FETCH_TIMEOUT_S
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise MetadataNotFound(f"{name}: {exc.details()}") from exc
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:  # a busy controller answered
                self.channel.reset()
            raise FetchFailed(
                f"cannot fetch {name} from the controller at {self._controller}: "
                f"{exc.code().name}: {exc.details()}"
            ) from exc
        data: bytes = reply.data
        return data


class GatewayTrust:
    """The gateway's verifier: python-tuf's client from the anchor in ``state_dir``, over
    the controller's gateway port ``controller`` (TLS with ``credentials``, the gateway's
    client certificate). One per gateway process. Its ``channel`` is the one its metadata
    fetches use: the download of the release verified goes over it too.

    Raises ConfigError when the anchor is missing or unusable."""

    def __init__(
        self, state_dir: Path, controller: HostPort, credentials: grpc.ChannelCredentials
    ) -> None:
        anchor = provision(state_dir, None)
        source = ControllerSource(controller, credentials)
        self.channel = source.channel
        try:
            self._client = TrustClient(
                anchor.read_bytes(),
                state_dir / "trust" / "metadata",
                source,
            )
        except TrustError as exc:
            raise ConfigError(f"the trust root {anchor} is not usable: {exc}") from exc

    def release(self, version: str) -> TargetFile:
        """The signed length and sha256 of release ``version``, after updating the
        metadata. A controller that cannot be reached (FetchFailed) is asked again, with
        backoff, up to FETCH_ATTEMPTS times in all, as a download is. Raises the
        TrustError subclasses of ``TrustClient.target``."""
        for attempt in range(1, FETCH_ATTEMPTS + 1):
            try:
                return self._client.target(target_name(version))
            except FetchFailed as exc:
                if attempt == FETCH_ATTEMPTS:
                    raise
                delay = _BACKOFF.delay(attempt)
                log.warning("metadata_fetch_failed", error=str(exc), retry_in_s=round(delay, 2))
                time.sleep(delay)  # backoff between attempts, not synchronisation
        raise AssertionError("unreachable")

    def root(self) -> Root:
        """The newest root this gateway verified: its command keys verify commands."""
        return self._client.trusted_root()

    def refresh(self) -> Root:
        """Update the metadata now and return the newest trusted root (after a rotation
        of the command key). Raises the TrustError subclasses of ``TrustClient.refresh``."""
        return self._client.refresh()
