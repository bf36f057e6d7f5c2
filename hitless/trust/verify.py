"""Reading and verifying one piece of signed metadata outside the client workflow.

The client (``hitless.trust.client``) leaves the whole TUF workflow to python-tuf's
``Updater``. The release manager's tools and the controller's repository need single steps
of it: parse metadata of an expected role, and check a delegator's threshold of signatures
over it (TUF spec §5.3-§5.6, "verify ... signed by a threshold of keys"). These helpers call
python-tuf for both and translate its errors into ones that name the role, version and keys.
"""

from __future__ import annotations

from datetime import datetime

from tuf.api.metadata import Metadata, Root, Signed, T

from hitless.trust.errors import BadSignature, ExpiredMetadata, MalformedMetadata


def read_metadata(data: bytes, role: type[T]) -> Metadata[T]:
    """Parse ``data`` as metadata whose signed part is a ``role`` (Root, Targets, Snapshot
    or Timestamp). Signatures are not checked here.

    Raises MalformedMetadata naming the expected role.
    """
    try:
        md = Metadata[T].from_bytes(data)
    except Exception as exc:  # python-tuf raises DeserializationError, ValueError, KeyError
        raise MalformedMetadata(f"not {role.type} metadata: {exc}", role.type) from exc
    if not isinstance(md.signed, role):
        raise MalformedMetadata(
            f"expected {role.type} metadata, got {md.signed.type} version {md.signed.version}",
            role.type,
            md.signed.version,
        )
    return md


def verify_role(delegator: Root, md: Metadata[T], role: str) -> None:
    """Check that ``md`` carries at least the threshold of valid signatures by the keys
    ``delegator`` (a trusted root) gives ``role``.

    Raises BadSignature listing the key ids that signed and the ones the role expects.
    """
    result = delegator.get_verification_result(role, md.signed_bytes, md.signatures)
    if result.verified:
        return
    expected = tuple(delegator.roles[role].keyids)
    present = tuple(md.signatures)
    raise BadSignature(
        f"{role} version {md.signed.version} has {len(result.signed)} valid signature(s) of "
        f"the {result.threshold} root version {delegator.version} requires: signed by "
        f"{', '.join(present) or 'no key'}, expected {', '.join(expected)}; sign it with the "
        f"{role} key of this root",
        role,
        md.signed.version,
        present,
        expected,
    )


def check_not_expired(signed: Signed, now: datetime) -> None:
    """Raise ExpiredMetadata if ``signed`` expired at or before ``now`` (UTC)."""
    if signed.is_expired(now):
        raise ExpiredMetadata(
            f"{signed.type} version {signed.version} expired at {signed.expires.isoformat()}",
            signed.type,
            signed.version,
        )
