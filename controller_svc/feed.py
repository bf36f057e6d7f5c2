"""The release feed: where new releases come from, checked periodically and on demand.

A feed is a directory or an HTTP(S) URL laid out as

    index.json              {"releases": ["1.4.0/manifest.json", ...]}
    1.4.0/manifest.json     {"version": "1.4.0", "artifact": "hitless-1.4.0.pyz",
                             "sha256": "<64 hex>", "size": 12345, "notes": "NOTES.md",
                             "flags": {"restarts_vpn_service": false}}
    1.4.0/hitless-1.4.0.pyz
    1.4.0/NOTES.md          the release notes, Markdown

Paths in a manifest are relative to the manifest. ``write_entry`` lays a release out this
way. Importing is idempotent: a version already known with the same digest changes
nothing; with another digest it is refused and logged (a version names one build).
"""

from __future__ import annotations

import hashlib
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from controller_svc.errors import Conflict, ControllerError, InvalidRequest
from controller_svc.events import Announcer
from controller_svc.records import ReleaseRecord
from controller_svc.repository import Repository
from controller_svc.store import ArtifactStore, check_digest
from hitless import logs, semver
from hitless.errors import ConfigError

log = logs.get(__name__)

INDEX = "index.json"
_CHUNK = 256 * 1024
_HTTP_TIMEOUT_S = 30


class FeedError(ControllerError):
    """The feed could not be read, or says something malformed."""


@dataclass(frozen=True)
class Manifest:
    version: str
    artifact: str  # location, resolved against the feed
    sha256: str
    size: int
    notes: str  # location, resolved against the feed; "" for none
    restarts_vpn_service: bool


class ReleaseFeed:
    """Reads a feed from a directory or an http(s) URL."""

    def __init__(self, source: str) -> None:
        parts = urlsplit(source)
        self._http = parts.scheme in ("http", "https")
        if not self._http and parts.scheme not in ("", "file"):
            raise ConfigError(f"invalid release feed {source!r}: use a directory or an http(s) URL")
        if self._http:
            self._root = source if source.endswith("/") else source + "/"
        else:
            path = Path(parts.path if parts.scheme == "file" else source).expanduser()
            self._root = path.resolve().as_uri() + "/"
        self.source = source

    def manifests(self) -> list[str]:
        """Locations of the feed's manifests, as its index lists them."""
        index = self._json(urljoin(self._root, INDEX))
        entries = index.get("releases") if isinstance(index, dict) else None
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise FeedError(f'{self.source}/{INDEX}: expected {{"releases": ["path", ...]}}')
        return [urljoin(self._root, entry) for entry in entries]

    def manifest(self, location: str) -> Manifest:
        data = self._json(location)
        try:
            version = str(semver.parse(str(data["version"])))
            sha256 = check_digest(str(data["sha256"]))
            size = int(data["size"])
            artifact = urljoin(location, str(data["artifact"]))
            notes = urljoin(location, str(data["notes"])) if data.get("notes") else ""
            flags = data.get("flags", {})
            vpn = flags.get("restarts_vpn_service", False)
            if not isinstance(vpn, bool):
                raise ValueError("flags.restarts_vpn_service must be true or false")
            if size < 0:
                raise ValueError(f"size {size} is negative")
        except (KeyError, TypeError, ValueError, ConfigError, InvalidRequest) as exc:
            raise FeedError(f"{location}: malformed manifest: {exc}") from exc
        return Manifest(version, artifact, sha256, size, notes, vpn)

    def read_text(self, location: str) -> str:
        return b"".join(self.chunks(location)).decode("utf-8", errors="replace")

    def chunks(self, location: str) -> Iterator[bytes]:
        try:
            with urllib.request.urlopen(location, timeout=_HTTP_TIMEOUT_S) as response:
                while block := response.read(_CHUNK):
                    yield block
        except (urllib.error.URLError, OSError) as exc:
            raise FeedError(f"cannot read {location}: {exc}") from exc

    def _json(self, location: str) -> Any:
        try:
            return json.loads(b"".join(self.chunks(location)))
        except json.JSONDecodeError as exc:
            raise FeedError(f"{location}: not JSON: {exc}") from exc


class FeedSync:
    """Imports what the feed has and the controller does not; ``run`` polls it."""

    def __init__(
        self, feed: ReleaseFeed, repo: Repository, store: ArtifactStore, announcer: Announcer
    ) -> None:
        self.feed = feed
        self._repo = repo
        self._store = store
        self._announcer = announcer
        self._lock = threading.Lock()

    def run(self, interval_s: float, stop: threading.Event) -> None:
        """Check the feed now and every ``interval_s`` until ``stop``; failures are logged
        and retried at the next check."""
        while not stop.is_set():
            try:
                self.sync()
            except (ControllerError, OSError) as exc:
                log.warning("feed_check_failed", source=self.feed.source, error=str(exc))
            stop.wait(interval_s)

    def sync(self) -> list[ReleaseRecord]:
        """Import every release the feed lists that is new here; return those."""
        with self._lock:
            return self._sync()

    def _sync(self) -> list[ReleaseRecord]:
        imported = []
        for location in self.feed.manifests():
            manifest = self.feed.manifest(location)
            known = self._repo.get_release(manifest.version)
            if known is not None:
                if known.sha256 != manifest.sha256:
                    log.error(
                        "feed_release_conflicts",
                        version=manifest.version,
                        feed_sha256=manifest.sha256,
                        known_sha256=known.sha256,
                    )
                continue
            record = self._import(manifest)
            if record is not None:
                imported.append(record)
        return imported

    def _import(self, manifest: Manifest) -> ReleaseRecord | None:
        notes = self.feed.read_text(manifest.notes) if manifest.notes else ""
        stored = self._store.put(
            self.feed.chunks(manifest.artifact),
            expected_sha256=manifest.sha256,
            expected_size=manifest.size,
        )
        try:
            record, created = self._repo.add_release(
                manifest.version,
                stored.sha256,
                stored.size,
                notes,
                datetime.now(UTC),
                restarts_vpn_service=manifest.restarts_vpn_service,
            )
        except Conflict as exc:
            log.error("feed_release_conflicts", version=manifest.version, error=str(exc))
            return None
        if created:
            log.info("release_imported", version=record.version, source=self.feed.source)
            self._announcer.release_published(record)
        return record if created else None


def write_entry(
    root: Path, version: str, artifact: Path, notes: str = "", *, restarts_vpn_service: bool = False
) -> Path:
    """Lay out ``artifact`` as release ``version`` in the feed at ``root`` and list it in
    the index; return the manifest's path."""
    version = str(semver.parse(version))
    folder = root / version
    folder.mkdir(parents=True, exist_ok=True)
    data = artifact.read_bytes()
    (folder / artifact.name).write_bytes(data)
    (folder / "NOTES.md").write_text(notes, encoding="utf-8")
    manifest = {
        "version": version,
        "artifact": artifact.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "notes": "NOTES.md",
        "flags": {"restarts_vpn_service": restarts_vpn_service},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    index_path = root / INDEX
    index = json.loads(index_path.read_text()) if index_path.exists() else {"releases": []}
    entry = f"{version}/manifest.json"
    if entry not in index["releases"]:
        index["releases"].append(entry)
    tmp = index_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(index, indent=2), encoding="utf-8")
    tmp.replace(index_path)
    return folder / "manifest.json"
