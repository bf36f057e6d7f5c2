"""The controller's trust material, in one place: the TUF repository it hosts for gateways
(``hitless.trust.repository``), the release rules that rest on it, and the command key it
signs UpgradeCommands with.

The controller holds the online keys only (snapshot, timestamp, command). It cannot list a
release in the signed targets: a release is taken only with targets metadata the release
manager signed that lists the artifact's name, length and sha256 (``check_release``).

Errors are the controller's own (``controller_svc.errors``), so the API, the release feed
and the job engine refuse the same input with the same sentence:

    hitless.trust errors on publish or yank   -> FailedPrecondition, naming role/version/key
    a release that is not SIGNED             -> FailedPrecondition (``require_signed``)
    key files or trust root unusable at start -> ConfigError (the controller does not start)
"""

from __future__ import annotations

import base64
import enum
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from tuf.api.metadata import Targets

from controller_svc.errors import FailedPrecondition
from controller_svc.records import ReleaseRecord
from hitless import logs
from hitless.bus import topology
from hitless.errors import ConfigError
from hitless.trust import keys as trust_keys
from hitless.trust.client import DirectorySource, TrustClient, verify_artifact
from hitless.trust.commands import SignedCommand, sign_command
from hitless.trust.errors import TrustError
from hitless.trust.release import target_name
from hitless.trust.repository import Repository
from hitless.trust.verify import check_not_expired, read_metadata, verify_role
from hitless.v1 import bus_pb2

log = logs.get(__name__)

# Timestamp and snapshot are re-signed when half their lifetime is left; checking this
# often keeps that far inside the timestamp's one day.
REFRESH_INTERVAL_S = 60.0


class Signing(enum.Enum):
    """A release's signing state (``controller.proto`` Release.signing)."""

    SIGNED = "SIGNED"
    UNSIGNED = "UNSIGNED"
    YANKED = "YANKED"


class Trust:
    """The repository in ``repo_dir`` trusting root ``anchor`` (bytes of root.json), signed
    with the keys in ``online_keys`` (``keys init``'s online/: snapshot, timestamp and
    command keys). Thread-safe.

    Raises ConfigError when the anchor is not root metadata, conflicts with the repository
    already there, or the online keys are missing or not the ones root names.
    """

    def __init__(self, repo_dir: Path, anchor: bytes, online_keys: Path) -> None:
        try:
            self.repository = Repository(repo_dir, anchor, online_keys)
            root = self.repository.root
            self._command_signer = trust_keys.load_role_signer(
                online_keys / "command.pem", "command", root
            )
        except TrustError as exc:
            raise ConfigError(f"the controller's trust material is not usable: {exc}") from exc
        self.repo_dir = repo_dir
        self._online = online_keys
        self._anchor = anchor
        self._lock = threading.Lock()
        self._refreshed_at = 0.0

    @classmethod
    def open(cls, data_dir: Path, trust_root: Path, online_keys: Path | None) -> Trust:
        """The controller's trust for ``data_dir`` (repository in ``data_dir/tuf``), from
        the trust root file ``trust_root`` and the online keys (default: ``online/``
        beside the trust root). Raises ConfigError naming the file that is wrong."""
        try:
            anchor = trust_root.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"cannot read the trust root {trust_root}: {exc}; give the root.json that "
                "`upgradectl keys init --dir DIR` made"
            ) from exc
        keys_dir = online_keys or trust_root.parent / "online"
        return cls(data_dir / "tuf", anchor, keys_dir)

    # Commands ----------------------------------------------------------------------------

    def sign_command(self, command: bus_pb2.UpgradeCommand) -> SignedCommand:
        """``command`` signed with the command key (``hitless.trust.commands``)."""
        return sign_command(command, self._command_signer)

    def command_headers(
        self,
        command: bus_pb2.UpgradeCommand,
        issued_at: datetime,
        *,
        allow_downgrade: bool,
        soak_seconds: int = 0,
    ) -> dict[str, Any]:
        """The message headers that carry ``command`` signed, with ``issued_at`` (when its
        job was created, tz-aware), ``allow_downgrade`` and ``soak_seconds`` (the soak
        after the swap, 0: none) set in the signed copy
        (``topology.SIGNED_COMMAND_HEADER`` and the key id and signature beside it); and
        the same two as plain headers for gateways of releases before signed commands,
        which read the body."""
        signed_copy = bus_pb2.UpgradeCommand()
        signed_copy.CopyFrom(command)
        signed_copy.issued_at.FromDatetime(issued_at)
        signed_copy.allow_downgrade = allow_downgrade
        signed_copy.soak_seconds = soak_seconds
        signed = self.sign_command(signed_copy)
        return {
            topology.SIGNED_COMMAND_HEADER: base64.b64encode(signed.payload).decode("ascii"),
            topology.COMMAND_KEYID_HEADER: signed.keyid,
            topology.COMMAND_SIGNATURE_HEADER: signed.signature,
            topology.ISSUED_AT_HEADER: issued_at.isoformat(),
            topology.ALLOW_DOWNGRADE_HEADER: allow_downgrade,
        }

    # Releases ----------------------------------------------------------------------------

    def signed_target(self, version: str, targets: bytes) -> tuple[str, int]:
        """The sha256 and length (bytes) that ``targets`` signs for release ``version``
        (``target_name(version)``), once the metadata verifies against the trusted root.
        What the upload is then held to, before anything is stored.

        Raises FailedPrecondition naming what is missing or wrong (no metadata, which role,
        version and key failed, or the name it does not list).
        """
        name = target_name(version)
        if not targets:
            raise FailedPrecondition(
                f"release {version} comes without signed targets metadata: sign it where it "
                "is built (upgradectl releases publish --keys DIR, or a targets file in the "
                "release feed); the controller holds no targets key and cannot sign it"
            )
        try:
            md = read_metadata(targets, Targets)
            verify_role(self.repository.root, md, "targets")
        except TrustError as exc:
            raise FailedPrecondition(f"release {version} refused: {exc}") from exc
        listed = md.signed.targets.get(name)
        if listed is None:
            raise FailedPrecondition(
                f"release {version} refused: targets version {md.signed.version} does not list "
                f"{name!r} (it lists {', '.join(sorted(md.signed.targets)) or 'nothing'}); "
                "sign the targets with this artifact added"
            )
        return str(listed.hashes.get("sha256", "")), listed.length

    def check_release(self, version: str, sha256: str, size: int, targets: bytes) -> None:
        """Refuse, before anything is stored, a release ``take_release`` would not take:
        ``targets`` that do not verify against the trusted root, do not list
        ``target_name(version)`` with exactly ``sha256`` and ``size`` bytes, or (unless the
        published targets list the release already) are expired or not newer than the
        published ones (TUF spec §5.6.4, §5.6.5). Without the last two, a release yanked
        here but offered again would be fetched before it is refused.

        Raises FailedPrecondition naming what is missing or wrong.
        """
        name = target_name(version)
        signed_sha, signed_size = self.signed_target(version, targets)
        if signed_size != size or signed_sha != sha256:
            raise FailedPrecondition(
                f"release {version} refused: the targets metadata signs {name!r} as "
                f"{signed_size} bytes with sha256 {signed_sha}, but the artifact has {size} "
                f"bytes with sha256 {sha256}: sign this artifact"
            )
        if self.listed(version, sha256, size):
            return
        signed = read_metadata(targets, Targets).signed
        try:
            check_not_expired(signed, trust_keys.utcnow())
        except TrustError as exc:
            raise FailedPrecondition(
                f"release {version} refused: {exc}, and the published targets do not list "
                f"{name!r}: sign the targets again with this release"
            ) from exc
        _, published = self.targets()
        if signed.version <= published:
            raise FailedPrecondition(
                f"release {version} refused: targets version {signed.version} is not newer "
                f"than version {published} already published, which does not list {name!r} "
                "with this sha256 and size (yanked, or signed on top of other targets): sign "
                "the next version with this release added"
            )

    def listed(self, version: str, sha256: str, size: int) -> bool:
        """Whether the newest published targets list release ``version`` with exactly
        ``sha256`` and ``size`` bytes (it is SIGNED)."""
        newest = self.repository.targets()
        listed = newest.targets.get(target_name(version)) if newest is not None else None
        return (
            listed is not None and listed.length == size and listed.hashes.get("sha256") == sha256
        )

    def take_release(self, version: str, sha256: str, size: int, targets: bytes) -> None:
        """Check ``targets`` for release ``version`` (``check_release``) and publish it,
        unless the newest published targets already list the release as signed (a feed
        whose entries each carry the targets of their day, or a retried publish): the
        newer metadata stands. Raises FailedPrecondition with the reason."""
        self.check_release(version, sha256, size, targets)
        if not self.listed(version, sha256, size):
            self.accept(targets)

    def accept(self, targets: bytes) -> int:
        """Publish ``targets`` (the release manager's next version) with a new snapshot and
        timestamp; the same bytes again are a no-op. Returns the targets version.

        Raises FailedPrecondition (unsigned, wrong key, expired, not newer: the reason
        names role, version and key)."""
        try:
            with self._lock:
                return self.repository.accept_targets(targets)
        except TrustError as exc:
            raise FailedPrecondition(f"targets metadata refused: {exc}") from exc

    def accept_root(self, root: bytes, targets: bytes | None) -> int:
        """Take the next root version (a key rotation); see ``Repository.accept_root``.
        Raises FailedPrecondition with the reason."""
        try:
            with self._lock:
                version = self.repository.accept_root(root, targets or None)
                self._command_signer = trust_keys.load_role_signer(
                    self._online / "command.pem", "command", self.repository.root
                )
                return version
        except TrustError as exc:
            raise FailedPrecondition(f"root metadata refused: {exc}") from exc

    def targets(self) -> tuple[bytes, int]:
        """The newest published targets metadata and its version; (b"", 0) before any."""
        data = self.repository.targets_bytes()
        if data is None:
            return b"", 0
        return data, read_metadata(data, Targets).signed.version

    def signing(self, release: ReleaseRecord) -> Signing:
        """Whether ``release`` is SIGNED (the newest targets list its sha256 and size),
        YANKED (an earlier targets version did) or UNSIGNED."""
        if self.listed(release.version, release.sha256, release.size):
            return Signing.SIGNED
        if self.repository.ever_listed(target_name(release.version), release.sha256):
            return Signing.YANKED
        return Signing.UNSIGNED

    def require_signed(self, release: ReleaseRecord) -> None:
        """Raise FailedPrecondition unless ``release`` is SIGNED, saying what to do."""
        state = self.signing(release)
        if state is Signing.SIGNED:
            return
        if state is Signing.YANKED:
            raise FailedPrecondition(
                f"release {release.version} was yanked (the signed targets no longer list it): "
                "gateways and the controller refuse it; choose another release"
            )
        raise FailedPrecondition(
            f"release {release.version} is not signed (no targets metadata lists it): publish "
            "it again with `upgradectl releases publish --keys DIR`"
        )

    def verify_staged(self, release: ReleaseRecord, path: Path) -> None:
        """Verify the file at ``path`` as ``release`` the way a gateway does: python-tuf's
        client workflow over this repository from the trust anchor, then the file's length
        and sha256 against the signed target (the controller's own upgrade).

        Raises FailedPrecondition naming what failed."""
        with tempfile.TemporaryDirectory(prefix="hitless-verify-") as cache:
            try:
                client = TrustClient(self._anchor, Path(cache), DirectorySource(self.repo_dir))
                verify_artifact(path, client.target(target_name(release.version)))
            except TrustError as exc:
                raise FailedPrecondition(
                    f"release {release.version} does not verify against the signed metadata: {exc}"
                ) from exc

    def refresh(self, now: datetime | None = None) -> None:
        """Re-sign timestamp (and snapshot) before they expire; at most once per
        REFRESH_INTERVAL_S unless ``now`` is given. Failures are logged, not raised: the
        next call tries again."""
        if now is None:
            if time.monotonic() - self._refreshed_at < REFRESH_INTERVAL_S:
                return
            self._refreshed_at = time.monotonic()
        try:
            with self._lock:
                resigned = self.repository.refresh(now)
        except (TrustError, OSError) as exc:
            log.error("metadata_refresh_failed", error=str(exc))
            return
        if resigned:
            log.info("metadata_refreshed", roles=resigned)
