"""The release manager's signing, against what the controller publishes now.

Each step starts from the controller's newest signed targets (GetTargetsMetadata), checks
them against the key directory's root, signs the next targets version with the targets
key there, and sends it. The controller holds no targets key: it takes, or refuses, what is
signed here (``hitless.trust.repository``).

    publish  current targets + target_name(V) (length, sha256)      -> PublishRelease
    yank     current targets - target_name(V)                       -> YankRelease
    rotate   keys.rotate, then the new root (with the current       -> RotateRoot
             targets re-signed when the targets key was replaced)

Targets from the controller that the key directory's root does not verify stop every
step before anything is signed: the key directory is not the one whose root.json the
controller trusts, or the controller serves targets nobody signed with this key. So do
targets older than the ones this key directory last saw the controller take
(``DIR/targets.json``, written after each publish, yank or rotation the controller
accepted): a controller restored from a backup, or one whose online keys were stolen,
could otherwise have a yanked release listed again by the next signature (TUF's rollback
attack, against the release manager's side).

Errors of ``hitless.trust`` become this CLI's errors here, with the library's message: a key
directory that is missing, incomplete, already there, or holds other keys, an unreadable
artifact, and targets that do not verify are ``UsageError`` (exit 2); a release the signed
targets do not list is ``Rejected`` (exit 4), like the controller's own refusals.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tuf.api.metadata import Metadata, Root, Targets

from hitless import semver
from hitless.digest import file_sha256
from hitless.trust import keys, release, roles
from hitless.trust.errors import (
    MetadataRefused,
    ReleaseInputError,
    StorageError,
    TrustError,
    UnknownTarget,
)
from hitless.trust.verify import read_metadata, verify_role
from upgradectl.client import ControllerClient
from upgradectl.errors import CliError, Rejected, Unconfirmed, UsageError
from upgradectl.model import KeyDirectory, RoleKey, Rotation, TargetsChange

ONLINE_ROLES = tuple(r for r in roles.ROLES if r not in roles.OFFLINE_ROLES)


def init_keys(directory: Path) -> KeyDirectory:
    """Make a new key directory at ``directory`` (``hitless.trust.keys.init``): five
    Ed25519 keys and root version 1. Returns what was made and where.

    Raises UsageError if keys are already there (nothing is overwritten) or the files
    cannot be written.
    """
    with _translated():
        paths = keys.init(directory)
        return describe(paths)


def describe(paths: keys.KeyPaths) -> KeyDirectory:
    """The key directory at ``paths``: its newest root and each role's key id and file.

    Raises KeyFileError (a key file missing or not the key root names), MetadataRefused
    (root.json unusable).
    """
    root = paths.root()
    role_keys = []
    for role in roles.ROLES:
        signer = keys.load_role_signer(paths.key(role), role, root)
        role_keys.append(RoleKey(role, signer.public_key.keyid, paths.key(role)))
    return KeyDirectory(
        dir=paths.dir,
        root_json=paths.root_json,
        root_version=root.version,
        expires=root.expires,
        offline=paths.key("root").parent,
        online=paths.online,
        keys=tuple(role_keys),
    )


def sign_release(
    client: ControllerClient, keys_dir: Path, version: str, artifact: Path
) -> TargetsChange:
    """The controller's current targets with release ``version``'s ``artifact`` added as
    ``target_name(version)``, signed as the next version with the targets key in
    ``keys_dir``: what PublishRelease carries as ``targets_metadata``.

    Another publish or yank between this and the upload makes the controller refuse it as
    not newer (exit 4); publishing again signs on top of that one. When the current targets
    list this very artifact already (the release was published before), nothing new is
    signed: the controller takes no new targets version for a release it lists, so the
    change is the current targets themselves (``version == previous_version``), which is
    what ``taken`` then records.

    Raises ConfigError (a malformed version), UsageError (key directory or artifact
    unusable), Rejected (current targets that do not verify against the key directory's
    root), and the client's errors.
    """
    name = release.target_name(str(semver.parse(version)))
    with _translated():
        paths = keys.KeyPaths(keys_dir)
        root = _root_with_targets_key(paths)
        current = client.get_targets_metadata()
        previous = _verified(current, root, paths) if current is not None else None
        _not_rolled_back(paths, current)
        if current is not None and previous is not None and _lists(previous, name, artifact):
            return _change(current, previous, name, current)
        data = release.sign_targets(current, keys_dir, add={name: artifact})
    return _change(data, previous, name, data)


def _lists(targets: Targets, name: str, artifact: Path) -> bool:
    """Whether ``targets`` list ``name`` as exactly the file ``artifact`` (length and
    sha256). Raises UsageError when the artifact cannot be read."""
    listed = targets.targets.get(name)
    if listed is None:
        return False
    try:
        sha256, size = file_sha256(artifact)
    except OSError as exc:
        raise UsageError(f"cannot read the artifact {artifact}: {exc.strerror or exc}") from exc
    return listed.length == size and listed.hashes.get("sha256") == sha256


def sign_yank(client: ControllerClient, keys_dir: Path, version: str) -> TargetsChange:
    """The controller's current targets without release ``version``, signed as the next
    version with the targets key in ``keys_dir``: what YankRelease carries. The change's
    length and sha256 are the release's as the current targets list it.

    Raises ConfigError (a malformed version), UsageError (key directory unusable),
    Rejected (current targets that do not verify; they do not list the release, or there
    are none), and the client's errors.
    """
    name = release.target_name(str(semver.parse(version)))
    with _translated():
        paths = keys.KeyPaths(keys_dir)
        root = _root_with_targets_key(paths)
        current = client.get_targets_metadata()
        if current is None:
            raise Rejected(
                f"the controller publishes no signed targets yet: release {version} is not "
                "listed, there is nothing to yank"
            )
        previous = _verified(current, root, paths)
        _not_rolled_back(paths, current)
        if name not in previous.targets:
            raise Rejected(
                f"release {version} is not in the signed targets (version {previous.version} "
                f"lists {', '.join(sorted(previous.targets)) or 'nothing'}): nothing to yank; "
                "'upgradectl releases list' shows each release's SIGNING"
            )
        data = release.yank(current, keys_dir, [name])
    return _change(data, previous, name, current)


def rotate(
    client: ControllerClient, keys_dir: Path, roles: Sequence[str], *, resend: str
) -> Rotation:
    """Replace the keys of ``roles`` in ``keys_dir`` (``hitless.trust.keys.rotate``: the
    next root version, old keys moved to DIR/retired/) and have the controller take the
    new root (``send_root``).

    Nothing is rotated unless the controller answers and its current targets verify
    against the key directory's root. Once rotated, a failure to send says what was made
    and that ``resend`` (the command line that sends it again) finishes the job: running
    this again would rotate a second time.

    Raises UsageError (key directory unusable), Rejected (targets that do not verify),
    and the client's errors (exit codes kept, the message completed as above).
    """
    with _translated():
        paths = keys.KeyPaths(keys_dir)
        root = paths.root()
        keys.load_role_signer(paths.key("root"), "root", root)
        current = client.get_targets_metadata()
        if current is not None:
            _verified(current, root, paths)
        keys.rotate(keys_dir, list(roles))
    return send_root(client, keys_dir, resend=resend)


def send_root(client: ControllerClient, keys_dir: Path, *, resend: str) -> Rotation:
    """Send the newest root in ``keys_dir`` (version N, made by ``rotate``) to the
    controller, which must trust version N-1. When N replaced the targets key, the
    controller's current targets no longer verify: they are re-signed with the new targets
    key as the next version and sent with the root.

    Raises UsageError (only root version 1 in ``keys_dir``, files unusable, current targets
    signed under neither N nor N-1) and the client's errors, every message after the root
    was made ending with what was made and ``resend``.
    """
    with _translated():
        paths = keys.KeyPaths(keys_dir)
        new = paths.root()
        if new.version == 1:
            raise UsageError(
                f"{paths.root_json} is root version 1: no rotation to send; "
                f"rotate keys with 'upgradectl keys rotate --dir {keys_dir} --roles ROLE,...'"
            )
        previous = paths.root(new.version - 1)
    changed = _changed_roles(previous, new)
    try:
        with _translated():
            data = paths.root_json.read_bytes()
            current = client.get_targets_metadata()
            _not_rolled_back(paths, current)
            targets = _resigned(current, paths, new, previous)
        version = client.rotate_root(data, targets)
    except (CliError, OSError) as exc:
        raise _not_taken(exc, paths, new.version, changed, resend) from exc
    if targets is not None:
        taken(keys_dir, targets)
    targets_version = read_metadata(targets, Targets).signed.version if targets else None
    return Rotation(version, changed, targets_version)


def taken(keys_dir: Path, targets: bytes) -> None:
    """Remember ``targets`` as the newest the controller took from this key directory
    (``DIR/targets.json``), for ``_not_rolled_back``. Call it once the controller answered.
    A failure to write is reported as UsageError: the release went out all the same."""
    with _translated():
        keys.write_file(keys.KeyPaths(keys_dir).dir / LAST_TAKEN, targets, mode=0o644)


LAST_TAKEN = "targets.json"


def _not_rolled_back(paths: keys.KeyPaths, current: bytes | None) -> None:
    """Refuse to sign on top of ``current`` (the controller's targets) when they are older
    than, or another version of, the targets this key directory last saw taken. Raises
    Rejected saying both versions and what to check."""
    last_path = paths.dir / LAST_TAKEN
    try:
        last_bytes = last_path.read_bytes()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UsageError(f"cannot read {last_path}: {exc}") from exc
    last = read_metadata(last_bytes, Targets).signed.version
    now = read_metadata(current, Targets).signed.version if current is not None else 0
    if now > last or (now == last and current == last_bytes):
        return
    if current is None:
        raise Rejected(
            f"the controller serves no signed targets, but it took version {last} from this "
            f"key directory ({last_path}): it is another controller than the one this "
            "directory published to (a new data directory), or its repository was reset. "
            "Nothing was signed. If this is a new controller and that is intended, move "
            f"{last_path} away and publish again; otherwise check the controller's data "
            "directory"
        )
    raise Rejected(
        f"the controller serves targets version {now or 'none'}, but it took version {last} "
        f"from this key directory ({last_path}): its repository was rolled back (restored "
        "from a backup, or altered by someone holding its online keys), and signing on top "
        "of it would list again what was removed since. Nothing was signed. Check the "
        "controller's data directory; to sign on top of what it serves anyway, move "
        f"{last_path} away first"
    )


def _root_with_targets_key(paths: keys.KeyPaths) -> Root:
    """The key directory's root, once its targets key is there and the one root names:
    a wrong directory fails before the controller is asked anything."""
    root = paths.root()
    keys.load_role_signer(paths.key("targets"), "targets", root)
    return root


def _verified(current: bytes, root: Root, paths: keys.KeyPaths) -> Targets:
    """``current`` parsed, once it verifies against ``root``. Raises Rejected (exit 4: the
    controller trusts another root, so it would refuse what these keys sign) saying which
    versions disagree and what to check."""
    md = read_metadata(current, Targets)
    try:
        verify_role(root, md, "targets")
    except MetadataRefused as exc:
        raise Rejected(
            f"the controller's signed targets (version {md.signed.version}) do not verify "
            f"against root version {root.version} in {paths.dir}: {exc}. Give the key "
            "directory whose root.json the controller trusts (its --trust-root), or send it "
            f"a rotation made there first ('upgradectl keys rotate --dir {paths.dir} "
            "--resend'); if this is that directory, the controller serves targets this "
            "targets key never signed"
        ) from exc
    return md.signed


def _resigned(
    current: bytes | None, paths: keys.KeyPaths, new: Root, previous: Root
) -> bytes | None:
    """``current`` re-signed as the next version with the new targets key, when it was
    signed under ``previous`` and ``new`` no longer accepts it; else None."""
    if current is None:
        return None
    md = read_metadata(current, Targets)
    if new.get_verification_result("targets", md.signed_bytes, md.signatures).verified:
        return None
    try:
        return release.sign_targets(current, paths.dir, current_root=previous)
    except MetadataRefused as exc:
        raise UsageError(
            f"the controller's signed targets (version {md.signed.version}) verify neither "
            f"against root version {new.version} nor {previous.version} in {paths.dir}: "
            f"{exc}; the controller trusts another key directory's root"
        ) from exc


def _changed_roles(previous: Root, new: Root) -> tuple[str, ...]:
    """The roles whose keys differ between two root versions, in ``roles.ROLES`` order."""
    changed = [r for r in roles.TUF_ROLES if previous.roles[r].keyids != new.roles[r].keyids]
    if keys.command_keys(previous).keys() != keys.command_keys(new).keys():
        changed.append("command")
    return tuple(changed)


def _not_taken(
    exc: CliError | OSError,
    paths: keys.KeyPaths,
    version: int,
    changed: tuple[str, ...],
    resend: str,
) -> CliError:
    """``exc`` as the error of the same kind, completed with what was made and how to
    finish: the rotation is on disk, the controller does not (knowingly) have it."""
    kind: type[CliError] = type(exc) if isinstance(exc, CliError) else UsageError
    taken = (
        "may have taken it (no answer came; if it did, sending it again is refused as not "
        "the next version)"
        if isinstance(exc, Unconfirmed)
        else "has not taken it"
    )
    steps = []
    online = [r for r in changed if r in ONLINE_ROLES]
    if online:
        steps.append(
            f"the controller needs the new {', '.join(online)} key(s) before it takes this "
            f"root: copy {paths.online}/ to its --online-keys directory (unless it reads "
            "them there)"
        )
    steps.append(f"send it again with: {resend}")
    return kind(
        "\n".join(
            [
                str(exc),
                f"root version {version} is made and saved in {paths.dir} (replaced keys in "
                f"{paths.dir / 'retired'}/), but the controller {taken}:",
                *(f"  {step}" for step in steps),
            ]
        )
    )


def _change(data: bytes, previous: Targets | None, name: str, listing: bytes) -> TargetsChange:
    """The TargetsChange for ``data`` (signed after ``previous``), describing ``name`` as
    the targets in ``listing`` list it (the new ones for an addition, the old for a yank)."""
    signed = Metadata[Targets].from_bytes(data).signed
    target = Metadata[Targets].from_bytes(listing).signed.targets[name]
    return TargetsChange(
        data=data,
        version=signed.version,
        previous_version=previous.version if previous is not None else 0,
        name=name,
        length=target.length,
        sha256=target.hashes["sha256"],
    )


@contextmanager
def _translated() -> Iterator[None]:
    """``hitless.trust`` errors as this CLI's errors, with the library's message."""
    try:
        yield
    except (StorageError, ReleaseInputError, MetadataRefused) as exc:
        raise UsageError(str(exc)) from exc
    except UnknownTarget as exc:
        raise Rejected(str(exc)) from exc
    except TrustError as exc:
        raise CliError(str(exc)) from exc
