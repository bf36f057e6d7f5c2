"""What can go wrong with signed releases and signed commands.

    hitless.errors.HitlessError
    └── TrustError                  anything about keys, signed metadata or signed commands
        ├── StorageError            a key or metadata file cannot be made, read or written
        │   ├── KeysExist           ``keys init`` would overwrite keys that exist
        │   └── KeyFileError        a key file is missing, unreadable, not Ed25519, or not
        │                           the key the trusted root delegates to
        ├── ReleaseInputError       a target name or artifact file the release manager gave
        ├── MetadataRefused         signed metadata was refused (``role``, ``version`` say which)
        │   ├── MalformedMetadata   not TUF metadata of the expected role
        │   ├── BadSignature        too few valid signatures by the delegated keys (unsigned,
        │   │                       or signed by a key the delegating role does not list)
        │   ├── RollbackRefused     a version not newer than one already trusted
        │   ├── ExpiredMetadata     past its expiry (indefinite freeze)
        │   └── MetadataMismatch    length, hash or version differ from what the parent role
        │                           signed (mix-and-match), or longer than allowed
        ├── MetadataNotFound        the repository has no such metadata file (yet)
        ├── FetchFailed             the metadata source failed; retrying later may succeed
        ├── UnknownTarget           the signed targets do not list this name (or it was yanked)
        ├── ArtifactMismatch        a file's length or sha256 differ from its signed TargetFile
        └── CommandRefused          an UpgradeCommand that must not run
            ├── UnsignedCommand     no signature
            ├── UnknownCommandKey   signed by a key the trusted root does not carry
            ├── BadCommandSignature the signature does not match the bytes (tampered)
            ├── CommandMisaddressed addressed to another gateway
            └── CommandExpired      past its deadline, or without one

Library errors (python-tuf, securesystemslib, cryptography, protobuf) are translated where
they are caught; every message names the role, version or key id involved and what to do.
"""

from __future__ import annotations

from hitless.errors import HitlessError


class TrustError(HitlessError):
    """Base of every error about keys, signed release metadata or signed commands."""


class StorageError(TrustError):
    """A key or metadata file could not be created, read or written."""


class KeysExist(StorageError):
    """Key files already exist where new ones would be written; nothing was overwritten."""


class KeyFileError(StorageError):
    """A key file is missing, unreadable, not an Ed25519 private key, or not the key the
    trusted root delegates the role to."""


class ReleaseInputError(TrustError):
    """A target name, artifact file or name to remove that the release manager gave is
    unusable; no metadata was signed."""


class MetadataRefused(TrustError):
    """Signed metadata was refused. ``role`` is the TUF role ("root", "targets",
    "snapshot", "timestamp"); ``version`` its version when it could be read, else None."""

    def __init__(self, message: str, role: str, version: int | None = None) -> None:
        super().__init__(message)
        self.role = role
        self.version = version


class MalformedMetadata(MetadataRefused):
    """The bytes are not TUF metadata of the expected role."""


class BadSignature(MetadataRefused):
    """Fewer valid signatures than the delegating role's threshold. ``signed_by`` lists the
    key ids that signed the bytes; ``expected`` the key ids the delegating role lists."""

    def __init__(
        self,
        message: str,
        role: str,
        version: int | None,
        signed_by: tuple[str, ...],
        expected: tuple[str, ...],
    ) -> None:
        super().__init__(message, role, version)
        self.signed_by = signed_by
        self.expected = expected


class RollbackRefused(MetadataRefused):
    """The metadata's version is not newer than one already trusted (rollback attack)."""


class ExpiredMetadata(MetadataRefused):
    """The metadata is past its expiry (indefinite freeze attack, or an unrefreshed
    repository)."""


class MetadataMismatch(MetadataRefused):
    """The metadata's length, hash or version differ from what its parent role signed
    (mix-and-match), or it is longer than the client accepts (endless data)."""


class MetadataNotFound(TrustError):
    """The repository holds no metadata file of this name (none published yet, or a root
    version that does not exist)."""


class FetchFailed(TrustError):
    """The metadata source could not deliver a file; retrying later may succeed."""


class UnknownTarget(TrustError):
    """The trusted targets metadata does not list this target (never signed, or yanked)."""


class ArtifactMismatch(TrustError):
    """A file's length or sha256 differ from its signed TargetFile (altered, truncated or
    longer than signed)."""


class CommandRefused(TrustError):
    """An UpgradeCommand failed verification and must not run."""


class UnsignedCommand(CommandRefused):
    """The command carries no signature."""


class UnknownCommandKey(CommandRefused):
    """The command is signed by a key id the trusted root does not carry as a command key."""


class BadCommandSignature(CommandRefused):
    """The signature does not verify over the command's bytes: altered in transit, or
    forged."""


class CommandMisaddressed(CommandRefused):
    """The command names another gateway."""


class CommandExpired(CommandRefused):
    """The command is past its deadline, or carries none."""
