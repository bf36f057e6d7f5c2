"""A signed-release world for the trust tests: a key directory, artifacts, the controller's
repository with one release published, and helpers an attacker would use."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, MetaFile, Snapshot, T, TargetFile, Targets, Timestamp

from hitless.trust import keys, release
from hitless.trust.client import DirectorySource, TrustClient
from hitless.trust.repository import Repository


@dataclass
class World:
    keys: keys.KeyPaths
    repo_dir: Path
    repo: Repository
    artifacts: dict[str, Path]
    targets: bytes  # the targets metadata published last
    tmp: Path

    def client(self, cache: str = "cache", source: object | None = None) -> TrustClient:
        return TrustClient(
            self.keys.root_json.read_bytes(),
            self.tmp / cache,
            source or DirectorySource(self.repo_dir),  # type: ignore[arg-type]
        )

    def publish(self, add: dict[str, Path] | None = None, remove: tuple[str, ...] = ()) -> int:
        self.targets = release.sign_targets(self.targets, self.keys.dir, add=add, remove=remove)
        return self.repo.accept_targets(self.targets)

    def artifact(self, name: str, content: bytes) -> Path:
        path = self.tmp / "artifacts" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
        self.artifacts[name] = path
        return path

    def signer(self, role: str) -> CryptoSigner:
        return keys.load_signer(self.keys.key(role))

    def files(self) -> dict[str, bytes]:
        """Every file of the repository, to show that a refusal changed nothing."""
        return {p.name: p.read_bytes() for p in sorted(self.repo_dir.iterdir())}


def make_world(tmp: Path) -> World:
    paths = keys.init(tmp / "keys")
    repo_dir = tmp / "repo"
    repo = Repository(repo_dir, paths.root_json.read_bytes(), paths.online)
    world = World(paths, repo_dir, repo, {}, b"", tmp)
    world.artifact("hitless-1.0.0.tar.gz", b"release one\n" * 100)
    world.targets = release.sign_targets(None, paths.dir, add=dict(world.artifacts))
    repo.accept_targets(world.targets)
    return world


def signed(payload: T, *signers: CryptoSigner) -> bytes:
    md = Metadata(payload)
    for s in signers:
        md.sign(s, append=True)
    return md.to_bytes()


def forge_publish(
    world: World,
    targets: bytes,
    targets_version: int,
    snapshot_version: int,
    timestamp_version: int,
    now: datetime,
) -> None:
    """What a controller whose online keys were stolen can do: write any targets bytes and
    sign a snapshot and timestamp naming them, bypassing Repository's checks."""
    (world.repo_dir / f"{targets_version}.targets.json").write_bytes(targets)
    snap = Snapshot(
        version=snapshot_version,
        expires=now + timedelta(days=7),
        meta={"targets.json": MetaFile.from_data(targets_version, targets, ["sha256"])},
    )
    snap_bytes = signed(snap, world.signer("snapshot"))
    (world.repo_dir / f"{snapshot_version}.snapshot.json").write_bytes(snap_bytes)
    ts = Timestamp(
        version=timestamp_version,
        expires=now + timedelta(days=1),
        snapshot_meta=MetaFile.from_data(snapshot_version, snap_bytes, ["sha256"]),
    )
    (world.repo_dir / "timestamp.json").write_bytes(signed(ts, world.signer("timestamp")))


def targets_listing(name: str, content: bytes, version: int, now: datetime) -> Targets:
    t = Targets(version=version, expires=now + timedelta(days=30))
    t.targets[name] = TargetFile(len(content), {"sha256": sha256(content)}, name)
    return t


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
