"""The release feed: what its documents say, and importing the releases it lists,
checked periodically and on demand (``FeedSync``). Reading the documents, inside the feed
and bounded, is ``controller_svc.feed_source``.

A feed is a directory or an HTTP(S) URL laid out as

    index.json              {"releases": ["1.4.0/manifest.json", ...]}
    targets.json            the newest signed targets metadata, listing every release
    1.4.0/manifest.json     {"version": "1.4.0", "artifact": "hitless-1.4.0.pyz",
                             "sha256": "<64 hex>", "size": 12345,
                             "targets": "targets.json", "notes": "NOTES.md",
                             "flags": {"restarts_vpn_service": false},
                             "min_from": "1.2.0"}
    1.4.0/hitless-1.4.0.pyz
    1.4.0/targets.json      the signed targets metadata of the day 1.4.0 was added
    1.4.0/NOTES.md          the release notes, Markdown

``write_entry`` lays a release out this way, where it is built: it signs the next targets
version on top of the feed's ``targets.json`` with the release manager's targets key
(``hitless.trust.release.sign_targets``), keeps it there and gives the entry its own copy.
Importing is idempotent: a version already known with the same digest changes nothing;
with another digest it is refused (a version names one build).

Whatever a feed holds is untrusted input, taken under these rules (README "The release
feed" states them for operators), beside those on locations and reads in
``controller_svc.feed_source``:

- Reads are bounded: the index by MAX_INDEX_BYTES, a manifest by MAX_MANIFEST_BYTES,
  targets metadata by MAX_TARGETS_BYTES, notes by MAX_NOTES_BYTES, an artifact by the
  size its manifest declares (at most MAX_ARTIFACT_BYTES).
- A manifest is a JSON object with only the fields shown (``notes``, ``flags`` and
  ``min_from`` optional): ``version`` MAJOR.MINOR.PATCH written plainly, at most MAX_VERSION_CHARS;
  ``sha256`` 64 lowercase hex digits; ``size`` a whole number of bytes, 1 to
  MAX_ARTIFACT_BYTES; ``targets`` the location of TUF targets metadata; ``flags`` only
  ``restarts_vpn_service`` (true or false); ``min_from`` the lowest version the release
  upgrades from, MAJOR.MINOR.PATCH below ``version``. Notes are UTF-8 text without control
  characters other than tab and line breaks.
- The targets metadata verifies against the controller's trusted root (signed by the
  targets key it names) and lists ``hitless.trust.release.target_name(version)`` with the
  manifest's sha256 and size (``controller_svc.signing.Trust.check_release``). It is
  checked before the artifact is fetched, as is what publishing it needs: unexpired, and
  newer than the targets the controller published, unless those list the release already
  (an older entry keeps the targets of its day). The controller holds no targets key: it
  never lists a release no targets metadata lists.
- The artifact matches the manifest's sha256 and size, and carries the manifest's version
  as its stamp (``controller_svc.store.stamped_as``, the rule ``releases publish`` follows).
- An entry that breaks a rule is refused alone (``EntryRefused``, naming the field) and
  the others are imported; refusals are logged once per distinct (entry, field, reason).
  An entry refused for its targets is tried once more in the same check when the check
  published newer targets, which may list it. Only an unreadable or malformed index
  stops a check.
- A known release the published targets do not list (imported before releases were
  signed, or yanked since) is signed by its entry's targets under the same rules, without
  fetching it again: a yanked one is refused while its entry carries the older targets.

Import order, so that nothing of a refused entry is published: the targets are checked,
the artifact stored (``controller_svc.store``), the targets published
(``Trust.take_release``), then the release recorded and announced.

Errors (below ``controller_svc.errors.ControllerError``; the first two are defined in
``controller_svc.feed_source``):

    FeedError               the feed could not be read, or its index is malformed
    ├── EntryRefused        one entry broke a rule (``field`` names what)
    └── EntriesRefused      a sync refused some entries and imported the others
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tuf.api.metadata import Targets

from controller_svc.errors import Conflict, FailedPrecondition, InvalidRequest
from controller_svc.events import Announcer
from controller_svc.feed_source import (
    FETCH_SLACK_S,
    EntryRefused,
    FeedError,
    FeedSource,
    Location,
    parse_location,
    show,
    shown,
)
from controller_svc.records import ReleaseRecord
from controller_svc.repository import Repository
from controller_svc.signing import Trust
from controller_svc.store import ArtifactStore, stamped_as
from hitless import logs, semver
from hitless.errors import ConfigError, HitlessError
from hitless.trust.keys import write_file
from hitless.trust.release import sign_targets, target_name

__all__ = [
    "INDEX",
    "MAX_ARTIFACT_BYTES",
    "MAX_INDEX_BYTES",
    "MAX_INDEX_ENTRIES",
    "MAX_MANIFEST_BYTES",
    "MAX_NOTES_BYTES",
    "MAX_TARGETS_BYTES",
    "MAX_VERSION_CHARS",
    "TARGETS",
    "CheckResult",
    "EntriesRefused",
    "EntryRefused",
    "FeedError",
    "FeedSync",
    "Manifest",
    "Refusal",
    "ReleaseFeed",
    "write_entry",
]

log = logs.get(__name__)

INDEX = "index.json"
TARGETS = "targets.json"  # the feed's newest targets, and each entry's own copy
# Limits on what a feed may make the controller read (README "The release feed").
MAX_INDEX_BYTES = 1024 * 1024
MAX_INDEX_ENTRIES = 1000  # a release every six weeks: over a century of them
MAX_MANIFEST_BYTES = 64 * 1024
MAX_NOTES_BYTES = 64 * 1024  # notes go into every admin's email
# Targets metadata lists every release, about 200 bytes each as python-tuf writes it: the
# MAX_INDEX_ENTRIES releases a feed may hold take about 200 KB. python-tuf's client takes up
# to 5 MB (UpdaterConfig.targets_max_length), but every entry carries its own copy and a
# refused entry is read again at every check: 1 MiB keeps a check's reads bounded.
MAX_TARGETS_BYTES = 1024 * 1024
MAX_ARTIFACT_BYTES = 1024 * 1024 * 1024
MAX_VERSION_CHARS = semver.MAX_LENGTH

_MANIFEST_FIELDS = (
    "version", "artifact", "sha256", "size", "targets", "notes", "flags", "min_from",
)  # fmt: skip
_REQUIRED_FIELDS = ("version", "artifact", "sha256", "size", "targets")
_MISSING = {
    "targets": "missing: give the location of the signed targets metadata that lists this "
    "release (write_entry signs it with the release manager's targets key)",
}
_FLAGS = ("restarts_vpn_service",)
_DIGEST = re.compile(r"[0-9a-f]{64}")
_CONTROL_IN_NOTES = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SHOWN_CHARS = 200  # of a name from the feed, as it is, in a refusal
_REASON_CHARS = 600
_REPORTED_REFUSALS = 10


@dataclass(frozen=True)
class Refusal:
    """An index entry (as the index lists it, shortened) refused for ``reason``."""

    entry: str
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.entry}: {self.field}: {self.reason}"


@dataclass(frozen=True)
class CheckResult:
    imported: list[ReleaseRecord]  # new releases only
    refused: list[Refusal]


class EntriesRefused(FeedError):
    """A sync refused some entries of the feed; the others were imported (``result``)."""

    def __init__(self, source: str, result: CheckResult) -> None:
        refused = result.refused
        listed = "; ".join(str(r) for r in refused[:_REPORTED_REFUSALS])
        if len(refused) > _REPORTED_REFUSALS:
            listed += f"; and {len(refused) - _REPORTED_REFUSALS} more"
        versions = ", ".join(r.version for r in result.imported)
        imported = f"imported {versions}" if versions else "imported nothing new"
        super().__init__(
            f"release feed {source}: refused {len(refused)} entr"
            f"{'y' if len(refused) == 1 else 'ies'} ({listed}); {imported}. Fix the refused "
            "entries in the feed; each is tried again at every check, and the controller "
            "logs each refusal once (feed_entry_refused)"
        )
        self.result = result


@dataclass(frozen=True)
class Manifest:
    version: str
    artifact: Location
    sha256: str
    size: int
    targets: Location
    notes: Location | None
    restarts_vpn_service: bool
    min_from: str | None = None


class ReleaseFeed:
    """The documents of a feed in a directory or at an http(s) URL, checked as they are
    read; ``fetch_slack_s`` as in ``FeedSource``. ConfigError for any other ``source``."""

    def __init__(self, source: str, *, fetch_slack_s: float = FETCH_SLACK_S) -> None:
        self.source = source
        self._source = FeedSource(source, fetch_slack_s=fetch_slack_s)

    def entries(self) -> list[object]:
        """The index's entries, duplicates dropped, each as the index gives it (checked
        one by one with ``parse_location``). FeedError when the index is unreadable or
        not ``{"releases": [...]}`` with at most MAX_INDEX_ENTRIES entries."""
        try:
            index = self._json((INDEX,), "index", MAX_INDEX_BYTES)
        except EntryRefused as exc:
            raise FeedError(f"release feed {self.source}: {exc}") from exc
        entries = index.get("releases") if isinstance(index, dict) else None
        if not isinstance(entries, list) or set(index) != {"releases"}:
            raise FeedError(
                f'release feed {self.source}: {INDEX} must be {{"releases": ["path", ...]}}'
            )
        if len(entries) > MAX_INDEX_ENTRIES:
            raise FeedError(
                f"release feed {self.source}: {INDEX} lists {len(entries)} releases, more than "
                f"the {MAX_INDEX_ENTRIES} a feed may list; remove old entries"
            )
        unique: list[object] = []
        for entry in entries:
            if entry not in unique:
                unique.append(entry)
        return unique

    def manifest(self, location: Location) -> Manifest:
        """The manifest at ``location``, checked field by field; EntryRefused naming the
        first field that breaks a rule."""
        data = self._json(location, "manifest", MAX_MANIFEST_BYTES)
        if not isinstance(data, dict):
            raise EntryRefused("manifest", f"{shown(location)} is not a JSON object")
        for name in data:
            if name not in _MANIFEST_FIELDS:
                raise EntryRefused(
                    _name(name), f"unknown field; a manifest has {', '.join(_MANIFEST_FIELDS)}"
                )
        for name in _REQUIRED_FIELDS:
            if name not in data:
                raise EntryRefused(name, _MISSING.get(name, "missing"))
        folder = location[:-1]
        notes = data.get("notes", "")
        return Manifest(
            version=_version(data["version"]),
            artifact=folder + parse_location(data["artifact"], "artifact"),
            sha256=_digest(data["sha256"]),
            size=_size(data["size"]),
            targets=folder + parse_location(data["targets"], "targets"),
            notes=None if notes == "" else folder + parse_location(notes, "notes"),
            restarts_vpn_service=_flags(data.get("flags", {})),
            min_from=_min_from(data.get("min_from"), data["version"]),
        )

    def read_targets(self, location: Location) -> bytes:
        """The targets metadata at ``location``, as signed: at most MAX_TARGETS_BYTES
        (EntryRefused otherwise). Whether it verifies is ``Trust``'s to say."""
        return self._source.read(location, "targets", MAX_TARGETS_BYTES)

    def read_notes(self, location: Location) -> str:
        """The release notes at ``location``: UTF-8 text of at most MAX_NOTES_BYTES without
        control characters but tab and line breaks (they reach terminals and emails)."""
        raw = self._source.read(location, "notes", MAX_NOTES_BYTES)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EntryRefused(
                "notes", f"{shown(location)} is not UTF-8 text (byte {exc.start})"
            ) from exc
        if match := _CONTROL_IN_NOTES.search(text):
            raise EntryRefused(
                "notes",
                f"{shown(location)} holds control character U+{ord(match.group()):04X} at "
                f"offset {match.start()}; notes are text",
            )
        return text

    def artifact_chunks(self, manifest: Manifest) -> Iterator[bytes]:
        """The artifact's bytes; EntryRefused as soon as it is known to be longer or
        shorter than the manifest's ``size`` (never more than size + 1 bytes are read)."""
        total = 0
        for block in self._source.chunks(manifest.artifact, "artifact", manifest.size, exact=True):
            total += len(block)
            yield block
        if total < manifest.size:
            raise EntryRefused(
                "artifact",
                f"{shown(manifest.artifact)} has {total} bytes, short of the manifest's "
                f"size, {manifest.size} bytes",
            )

    def _json(self, location: Location, field: str, limit: int) -> Any:
        raw = self._source.read(location, field, limit)
        try:
            return json.loads(raw, parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:
            raise EntryRefused(field, f"{shown(location)} is not valid JSON: {exc}") from exc


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def _version(value: object) -> str:
    if not isinstance(value, str) or len(value) > MAX_VERSION_CHARS:
        raise EntryRefused(
            "version", f"expected MAJOR.MINOR.PATCH of at most {MAX_VERSION_CHARS} characters"
        )
    try:
        version = str(semver.parse(value))
    except ConfigError as exc:
        raise EntryRefused("version", str(exc)) from exc
    if version != value:
        raise EntryRefused("version", f"{show(value)}: write it plainly, as {version!r}")
    return version


def _digest(value: object) -> str:
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        raise EntryRefused("sha256", f"{show(value)}: expected 64 lowercase hex digits")
    return value


def _size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise EntryRefused("size", f"{show(value)}: expected a whole number of bytes")
    if not 0 < value <= MAX_ARTIFACT_BYTES:
        raise EntryRefused("size", f"{value}: an artifact has 1 to {MAX_ARTIFACT_BYTES} bytes")
    return value


def _min_from(value: object, version: object) -> str | None:
    """The manifest's ``min_from``: None when absent, else a plain MAJOR.MINOR.PATCH below
    the release's own version (``version``, already checked)."""
    if value is None:
        return None
    try:
        lowest = _version(value)
    except EntryRefused as exc:
        raise EntryRefused("min_from", exc.reason) from exc
    if semver.parse(lowest) >= semver.parse(str(version)):
        raise EntryRefused("min_from", f"{lowest} is not below the release's own version {version}")
    return lowest


def _flags(value: object) -> bool:
    if not isinstance(value, dict):
        raise EntryRefused(
            "flags", f'expected {{"restarts_vpn_service": true|false}}, got {show(value)}'
        )
    for name, flag in value.items():
        if name not in _FLAGS:
            raise EntryRefused(f"flags.{_name(name)}", f"unknown flag; known: {', '.join(_FLAGS)}")
        if not isinstance(flag, bool):
            raise EntryRefused(f"flags.{name}", f"{show(flag)}: expected true or false")
    return bool(value.get("restarts_vpn_service", False))


class FeedSync:
    """Imports what the feed has and the controller does not, each release only with
    targets metadata ``trust`` verifies (the controller's ``controller_svc.signing.Trust``);
    ``run`` polls it."""

    def __init__(
        self,
        feed: ReleaseFeed,
        repo: Repository,
        store: ArtifactStore,
        announcer: Announcer,
        trust: Trust,
    ) -> None:
        self.feed = feed
        self._repo = repo
        self._store = store
        self._announcer = announcer
        self._trust = trust
        self._lock = threading.Lock()
        self._logged: set[Refusal] = set()
        self._newest: Targets | None = None  # the published targets, as of this check

    def run(self, interval_s: float, stop: threading.Event) -> None:
        """Check the feed now and every ``interval_s`` until ``stop``; failures are logged
        and retried at the next check."""
        while not stop.is_set():
            try:
                self.check()
            except (HitlessError, OSError) as exc:
                log.warning("feed_check_failed", source=self.feed.source, error=str(exc))
            stop.wait(interval_s)

    def sync(self) -> list[ReleaseRecord]:
        """Import every release the feed lists that is new here; return those.

        When some entries were refused, the others are imported all the same and
        EntriesRefused says which were refused and why, and what was imported.
        FeedError when the index itself cannot be read."""
        result = self.check()
        if result.refused:
            raise EntriesRefused(self.feed.source, result)
        return result.imported

    def check(self) -> CheckResult:
        """Import what is new; the releases imported and the entries refused, in the
        index's order."""
        with self._lock:
            entries = self.feed.entries()
            self._newest = self._trust.repository.targets()
            published = self._published_version()
            outcomes = [self._outcome(entry) for entry in entries]
            # Each entry carries the targets of its day: an older entry's may have expired,
            # or be older than those this check published, which may list it all the same.
            if self._published_version() != published:
                for i, (entry, outcome) in enumerate(zip(entries, outcomes, strict=True)):
                    if isinstance(outcome, Refusal) and outcome.field == "targets":
                        outcomes[i] = self._outcome(entry)
            refused = [o for o in outcomes if isinstance(o, Refusal)]
            self._log_new(refused)
            return CheckResult([o for o in outcomes if isinstance(o, ReleaseRecord)], refused)

    def _outcome(self, entry: object) -> ReleaseRecord | Refusal | None:
        """The release ``entry`` imported, its refusal, or None when nothing was new."""
        try:
            return self._take(entry)
        except EntryRefused as exc:
            return Refusal(_name(entry), exc.field, _cut(exc.reason))

    def _published_version(self) -> int:
        return self._newest.version if self._newest is not None else 0

    def _listed(self, manifest: Manifest) -> bool:
        """Whether the published targets list the manifest's artifact (name, sha256, size)."""
        return self._trust.listed(manifest.version, manifest.sha256, manifest.size)

    def _log_new(self, refused: list[Refusal]) -> None:
        """Log each refusal once while it lasts: a feed checked every few minutes must not
        repeat the same line forever, and a change (or a return) is news."""
        for refusal in refused:
            if refusal not in self._logged:
                log.warning(
                    "feed_entry_refused",
                    source=self.feed.source,
                    entry=refusal.entry,
                    field=refusal.field,
                    reason=refusal.reason,
                )
        self._logged = set(refused)

    def _take(self, entry: object) -> ReleaseRecord | None:
        manifest = self.feed.manifest(parse_location(entry, "index entry"))
        known = self._repo.get_release(manifest.version)
        if known is None:
            return self._import(manifest)
        if known.sha256 != manifest.sha256:
            raise EntryRefused(
                "sha256",
                f"version {manifest.version} is already known with sha256 {known.sha256}; "
                "a version names one build: give this build a new version",
            )
        if not self._listed(manifest):
            # Imported before releases were signed, or yanked since: the entry's targets
            # sign the bytes the controller holds, if they are still to be published.
            self._publish(manifest, self._targets(manifest))
            log.info("release_signed", version=known.version, source=self.feed.source)
        return None

    def _import(self, manifest: Manifest) -> ReleaseRecord | None:
        targets = self._targets(manifest)
        notes = self.feed.read_notes(manifest.notes) if manifest.notes else ""
        try:
            stored = self._store.put(
                self.feed.artifact_chunks(manifest),
                expected_sha256=manifest.sha256,
                expected_size=manifest.size,
                check=stamped_as(manifest.version),
            )
        except InvalidRequest as exc:
            raise EntryRefused("artifact", f"{shown(manifest.artifact)}: {exc}") from exc
        self._publish(manifest, targets)
        try:
            record, created = self._repo.add_release(
                manifest.version,
                stored.sha256,
                stored.size,
                notes,
                datetime.now(UTC),
                restarts_vpn_service=manifest.restarts_vpn_service,
                min_from=manifest.min_from,
            )
        except Conflict as exc:
            raise EntryRefused("version", str(exc)) from exc
        if created:
            log.info("release_imported", version=record.version, source=self.feed.source)
            self._announcer.release_published(record)
        return record if created else None

    def _targets(self, manifest: Manifest) -> bytes:
        """The entry's targets metadata, once it verifies, lists the manifest's artifact
        and can be published; EntryRefused naming "targets" and the reason otherwise."""
        targets = self.feed.read_targets(manifest.targets)
        try:
            self._trust.check_release(manifest.version, manifest.sha256, manifest.size, targets)
        except FailedPrecondition as exc:
            raise EntryRefused("targets", f"{shown(manifest.targets)}: {exc}") from exc
        return targets

    def _publish(self, manifest: Manifest, targets: bytes) -> None:
        try:
            self._trust.take_release(manifest.version, manifest.sha256, manifest.size, targets)
        except FailedPrecondition as exc:
            raise EntryRefused("targets", f"{shown(manifest.targets)}: {exc}") from exc
        finally:
            self._newest = self._trust.repository.targets()


def _name(value: object) -> str:
    """A name from the feed as it is when short and printable, else quoted and cut short."""
    plain = isinstance(value, str) and 0 < len(value) <= _SHOWN_CHARS and value.isprintable()
    return value if plain and isinstance(value, str) else show(value)


def _cut(reason: str) -> str:
    return reason if len(reason) <= _REASON_CHARS else reason[: _REASON_CHARS - 3] + "..."


def write_entry(
    root: Path,
    version: str,
    artifact: Path,
    notes: str = "",
    *,
    restarts_vpn_service: bool = False,
    min_from: str | None = None,
    keys_dir: Path,
) -> Path:
    """Lay out ``artifact`` as release ``version`` in the feed at ``root``, signed, and list
    it in the index; return the manifest's path.

    Signs the next targets version on top of the feed's ``targets.json`` (the first: version
    1) with ``target_name(version)`` added, with the targets key in ``keys_dir`` (``keys
    init`` layout); keeps it as the feed's ``targets.json`` and as the entry's own
    ``VERSION/targets.json``, which the manifest names. A release is signed where it is
    built: the controller holds no targets key.

    Raises ConfigError (``version`` not MAJOR.MINOR.PATCH), the errors of
    ``hitless.trust.release.sign_targets`` (ReleaseInputError, KeyFileError; MetadataRefused
    when the feed's ``targets.json`` was not signed by this targets key, e.g. after a
    rotation: re-sign it first) with nothing written, and OSError or StorageError when the
    feed cannot be written.
    """
    version = str(semver.parse(version))
    feed_targets = root / TARGETS
    current = feed_targets.read_bytes() if feed_targets.exists() else None
    targets = sign_targets(current, keys_dir, add={target_name(version): artifact})
    folder = root / version
    folder.mkdir(parents=True, exist_ok=True)
    data = artifact.read_bytes()
    (folder / artifact.name).write_bytes(data)
    (folder / "NOTES.md").write_text(notes, encoding="utf-8")
    write_file(folder / TARGETS, targets, mode=0o644)
    manifest = {
        "version": version,
        "artifact": artifact.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "targets": TARGETS,
        "notes": "NOTES.md",
        "flags": {"restarts_vpn_service": restarts_vpn_service},
    }
    if min_from:
        manifest["min_from"] = str(semver.parse(min_from))
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    write_file(feed_targets, targets, mode=0o644)
    index_path = root / INDEX
    index = json.loads(index_path.read_text()) if index_path.exists() else {"releases": []}
    entry = f"{version}/manifest.json"
    if entry not in index["releases"]:
        index["releases"].append(entry)
    tmp = index_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(index, indent=2), encoding="utf-8")
    tmp.replace(index_path)
    return folder / "manifest.json"
