"""A release feed is untrusted input. Each attack and each malformed entry here is refused
alone, with its field named, and nothing is taken from it (no release row, no stored
artifact, no event for the notifier, no published targets metadata), while the good entry
listed after it imports.

Real directory feeds, the same served over HTTP on loopback, a real SQLite database,
artifact store, TUF repository (the controller's ``Trust``, trusting a real key
directory's root) and broker (the announcer's events go through the outbox to RabbitMQ).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner
from sqlalchemy import select
from structlog.testing import capture_logs
from tuf.api.metadata import Metadata, TargetFile, Targets

from controller_svc.admins import Admins
from controller_svc.db import OutboxEvent, make_engine, migrate
from controller_svc.events import Announcer
from controller_svc.feed import (
    MAX_ARTIFACT_BYTES,
    MAX_INDEX_BYTES,
    MAX_INDEX_ENTRIES,
    MAX_MANIFEST_BYTES,
    MAX_NOTES_BYTES,
    MAX_TARGETS_BYTES,
    MAX_VERSION_CHARS,
    CheckResult,
    EntriesRefused,
    FeedError,
    FeedSync,
    ReleaseFeed,
    write_entry,
)
from controller_svc.outbox import Outbox
from controller_svc.repository import Repository
from controller_svc.signing import Signing, Trust
from controller_svc.store import ArtifactStore
from hitless.bus import topology
from hitless.bus.amqp import Publisher
from hitless.config import BusConfig
from hitless.errors import ConfigError
from hitless.trust import keys as trust_keys
from hitless.trust.release import sign_targets, target_name, yank
from hitless.trust.verify import read_metadata
from tests.support.stamped import stamped

GOOD = "1.4.0"
GOOD_BYTES = stamped(GOOD)
BAD = "2.0.0"
BAD_ENTRY = f"{BAD}/manifest.json"
BAD_BYTES = stamped(BAD)  # a release that would import, were its entry not broken
SECRET = b"BROKER_PASSWORD=hunter2\n"
# Longest a check may take here; a read that is not bounded runs into it.
CHECK_TIMEOUT_S = 30


# --- an HTTP server on loopback ---------------------------------------------------------


Responder = Callable[["_Handler"], None]


class _Handler(http.server.SimpleHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        responder = self.server.routes.get(self.path)
        if responder is None:
            super().do_GET()
            return
        # OSError: the controller hung up, as a bounded read does.
        with contextlib.suppress(OSError):
            responder(self)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    routes: dict[str, Responder]


class Site:
    """``root`` served over HTTP at ``url``; ``routes`` answer chosen paths instead."""

    def __init__(self, root: Path) -> None:
        self.root = root
        handler = functools.partial(_Handler, directory=str(root))
        self._server = _Server(("127.0.0.1", 0), handler)
        self._server.routes = {}
        self.routes = self._server.routes
        self.netloc = f"127.0.0.1:{self._server.server_address[1]}"
        self.url = f"http://{self.netloc}/"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def endless(length: int | None = None) -> Responder:
    """A body that never ends, announced with ``length`` (or no length at all)."""

    def respond(handler: _Handler) -> None:
        handler.send_response(200)
        if length is not None:
            handler.send_header("Content-Length", str(length))
        handler.send_header("Connection", "close")
        handler.end_headers()
        block = b"x" * 65536
        while True:
            handler.wfile.write(block)

    return respond


def trickle(length: int | None = None) -> Responder:
    """A body sent one byte every tenth of a second: ``length`` bytes (announced), or
    without end (unannounced)."""

    def respond(handler: _Handler) -> None:
        handler.send_response(200)
        if length is not None:
            handler.send_header("Content-Length", str(length))
        handler.send_header("Connection", "close")
        handler.end_headers()
        sent = 0
        while length is None or sent < length:
            handler.wfile.write(b" ")
            handler.wfile.flush()
            sent += 1
            time.sleep(0.1)  # the slow server under test, not a wait for a condition

    return respond


def redirect(location: str) -> Responder:
    def respond(handler: _Handler) -> None:
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return respond


# --- the feed and the controller's side of it ---------------------------------------------


@dataclass
class Feed:
    root: Path  # the feed's directory (also what the HTTP feed serves)
    source: str  # what --release-feed says
    site: Site | None  # the HTTP server, for an HTTP feed
    outside: Path  # a folder beside the feed holding a secret and a complete release
    outside_site: Site  # ``outside`` served by another HTTP server (another origin)
    keys: trust_keys.KeyPaths  # the release manager's, whose root the controller trusts

    @property
    def secret(self) -> Path:
        return self.outside / "secret.bin"

    def add_good(self, notes: str = "# 1.4.0\n\nGood.\n") -> None:
        self.add_release(GOOD, GOOD_BYTES, notes)

    def add_release(
        self, version: str, data: bytes, notes: str = "", *, min_from: str | None = None
    ) -> None:
        """``data`` as release ``version``, as the release manager adds it (signed)."""
        artifact = self.root.parent / "build" / f"hitless-{version}.pyz"
        artifact.parent.mkdir(exist_ok=True)
        artifact.write_bytes(data)
        write_entry(self.root, version, artifact, notes, keys_dir=self.keys.dir, min_from=min_from)

    def add(
        self,
        version: str,
        manifest: dict[str, Any] | bytes,
        files: dict[str, bytes] | None = None,
        entry: str | None = None,
    ) -> None:
        """Write ``version/manifest.json`` and ``files`` beside it, and list the entry
        first in the index (before the good one). Unless ``files`` has a targets.json,
        one is signed that lists the manifest's sha256 and size for ``version``, as the
        next version after the feed's targets.json (never published by the good entry),
        so that only what the test breaks is wrong with the entry."""
        folder = self.root / version
        folder.mkdir(parents=True, exist_ok=True)
        files = dict(files or {})
        if isinstance(manifest, dict) and "targets.json" not in files:
            sha256, size = manifest.get("sha256"), manifest.get("size")
            if isinstance(sha256, str) and type(size) is int and size > 0:
                files["targets.json"] = self.sign({target_name(version): (sha256, size)})
        for name, data in files.items():
            (folder / name).write_bytes(data)
        raw = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
        (folder / "manifest.json").write_bytes(raw)
        self.list_first(entry or f"{version}/manifest.json")

    def list_first(self, *entries: object) -> None:
        index_path = self.root / "index.json"
        index = json.loads(index_path.read_text()) if index_path.exists() else {"releases": []}
        index["releases"][:0] = list(entries)
        index_path.write_text(json.dumps(index))

    def sign(
        self,
        listing: dict[str, tuple[str, int]],
        *,
        expires: datetime | None = None,
        signer: CryptoSigner | None = None,
        unsigned: bool = False,
    ) -> bytes:
        """Targets metadata: the feed's targets.json (if any) plus ``listing`` (target
        name -> sha256, size), as its next version, signed by ``signer`` (default: the
        targets key), or not at all."""
        current = self.root / "targets.json"
        if current.exists():
            targets = read_metadata(current.read_bytes(), Targets).signed
            targets.version += 1
        else:
            targets = Targets(version=1)
        for name, (sha256, size) in listing.items():
            targets.targets[name] = TargetFile(size, {"sha256": sha256}, name)
        targets.expires = expires or trust_keys.utcnow() + trust_keys.TARGETS_EXPIRY
        md = Metadata(targets)
        if not unsigned:
            md.sign(signer or trust_keys.load_signer(self.keys.key("targets")))
        return md.to_bytes()


def _listing(data: bytes) -> tuple[str, int]:
    return hashlib.sha256(data).hexdigest(), len(data)


def manifest_for(
    version: str, artifact: str, data: bytes, notes: str = "", **more: Any
) -> dict[str, Any]:
    """A manifest whose sha256 and size are those of ``data``."""
    manifest: dict[str, Any] = {
        "version": version,
        "artifact": artifact,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "targets": "targets.json",
    }
    if notes:
        manifest["notes"] = notes
    return {**manifest, **more}


@pytest.fixture
def keys(tmp_path: Path) -> trust_keys.KeyPaths:
    """The release manager's key directory; the controller trusts its root."""
    return trust_keys.init(tmp_path / "keys")


@contextlib.contextmanager
def _feed(tmp_path: Path, over_http: bool, keys: trust_keys.KeyPaths) -> Iterator[Feed]:
    root, outside = tmp_path / "feed", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.bin").write_bytes(SECRET)
    outside_site = Site(outside)
    site = Site(root) if over_http else None
    try:
        feed = Feed(root, site.url if site else str(root), site, outside, outside_site, keys)
        # A complete release outside the feed, signed: what an entry that leaves the feed
        # reaches.
        (outside / "manifest.json").write_text(
            json.dumps(manifest_for(BAD, "secret.bin", SECRET, notes="secret.bin"))
        )
        (outside / "targets.json").write_bytes(feed.sign({target_name(BAD): _listing(SECRET)}))
        yield feed
    finally:
        outside_site.close()
        if site:
            site.close()


@pytest.fixture(params=[False, True], ids=["directory", "http"])
def feed(
    request: pytest.FixtureRequest, tmp_path: Path, keys: trust_keys.KeyPaths
) -> Iterator[Feed]:
    with _feed(tmp_path, request.param, keys) as feed:
        yield feed


@pytest.fixture
def dir_feed(tmp_path: Path, keys: trust_keys.KeyPaths) -> Iterator[Feed]:
    with _feed(tmp_path, False, keys) as feed:
        yield feed


@pytest.fixture
def http_feed(tmp_path: Path, keys: trust_keys.KeyPaths) -> Iterator[Feed]:
    with _feed(tmp_path, True, keys) as feed:
        yield feed


class Controller:
    """The controller's side: its database, artifact store, announcer and trust."""

    def __init__(self, tmp_path: Path, bus: BusConfig, keys: trust_keys.KeyPaths) -> None:
        self._engine = make_engine(f"sqlite:///{tmp_path / 'controller.db'}")
        migrate(self._engine)
        self.repo = Repository(self._engine)
        admins = Admins(self.repo.sessions)
        admins.add("ops@example.com", datetime.now(UTC))
        self._publisher = Publisher(bus, queues=[topology.NOTIFIER_EVENTS]).start()
        self.announcer = Announcer(self._publisher, admins, Outbox(self.repo.sessions))
        self.store = ArtifactStore(tmp_path / "artifacts")
        self.trust = Trust(tmp_path / "tuf", keys.root_json.read_bytes(), keys.online)

    def sync(self, feed: Feed, **options: float) -> FeedSync:
        return FeedSync(
            ReleaseFeed(feed.source, **options), self.repo, self.store, self.announcer, self.trust
        )

    def published(self) -> tuple[int, set[str]]:
        """The published targets metadata's version and the target names it lists."""
        data, version = self.trust.targets()
        names = set(read_metadata(data, Targets).signed.targets) if data else set()
        return version, names

    def versions(self) -> list[str]:
        return sorted(r.version for r in self.repo.list_releases())

    def stored(self) -> set[str]:
        """Digests in the artifact store; nothing may be left half-written either."""
        assert list((self.store.root / ".incoming").iterdir()) == []
        return {p.name for p in self.store.root.glob("??/*")}

    def events(self) -> set[str]:
        with self.repo.sessions.read() as session:
            return set(session.scalars(select(OutboxEvent.event_id)))

    def close(self) -> None:
        self._publisher.close()
        self._engine.dispose()


@pytest.fixture
def controller(tmp_path: Path, bus: BusConfig, keys: trust_keys.KeyPaths) -> Iterator[Controller]:
    side = Controller(tmp_path, bus, keys)
    try:
        yield side
    finally:
        side.close()


def check(sync: FeedSync) -> CheckResult:
    """``sync.check()`` within CHECK_TIMEOUT_S: an unbounded read fails the test, not hangs."""
    outcome: list[CheckResult | BaseException] = []

    def run() -> None:
        try:
            outcome.append(sync.check())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(CHECK_TIMEOUT_S)
    assert outcome, f"the feed check did not finish within {CHECK_TIMEOUT_S}s"
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def assert_only_the_good_one(controller: Controller, result: CheckResult) -> None:
    assert [r.version for r in result.imported] == [GOOD], result
    assert controller.versions() == [GOOD]
    assert controller.stored() == {hashlib.sha256(GOOD_BYTES).hexdigest()}
    assert controller.events() == {f"release:{GOOD}"}
    assert controller.published() == (1, {target_name(GOOD)})


def refused(result: CheckResult) -> list[tuple[str, str]]:
    return [(r.entry, r.field) for r in result.refused]


# --- locations that leave the feed ----------------------------------------------------------

# How a location may try to reach ``name`` in the folder beside the feed, from a folder
# ``up`` levels below the feed's parent.
Spelling = Callable[[Feed, int, str], str]
SPELLINGS: dict[str, Spelling] = {
    "dotdot": lambda f, up, name: "../" * up + f"outside/{name}",
    "dotdot-percent-encoded": lambda f, up, name: "%2e%2E/" * up + f"outside/{name}",
    "slash-percent-encoded": lambda f, up, name: "..%2f" * up + f"outside%2F{name}",
    "backslash": lambda f, up, name: "..\\" * up + f"outside\\{name}",
    "absolute-path": lambda f, up, name: str(f.outside / name),
    "file-url": lambda f, up, name: (f.outside / name).as_uri(),
    "other-origin": lambda f, up, name: f.outside_site.url + name,
    "scheme-relative": lambda f, up, name: f"//{f.outside_site.netloc}/{name}",
    "nul": lambda f, up, name: f"{name}\x00.md",
}
# What the refusal says for each spelling: the rule it breaks.
BROKEN_RULE = {
    "dotdot": "'..' segment",
    "dotdot-percent-encoded": "'..' segment",
    "slash-percent-encoded": "percent-encodes '/'",
    "backslash": "backslash",
    "absolute-path": "leaves the feed",
    "file-url": "leaves the feed",
    "other-origin": "leaves the feed",
    "scheme-relative": "leaves the feed",
    "nul": "control character",
}


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_an_artifact_outside_the_feed_is_refused(
    spelling: str, feed: Feed, controller: Controller
) -> None:
    feed.add_good()
    artifact = SPELLINGS[spelling](feed, 2, "secret.bin")
    feed.add(BAD, manifest_for(BAD, artifact, SECRET))
    result = check(controller.sync(feed))
    assert refused(result) == [(BAD_ENTRY, "artifact")]
    assert BROKEN_RULE[spelling] in result.refused[0].reason
    assert_only_the_good_one(controller, result)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_notes_outside_the_feed_are_refused(
    spelling: str, feed: Feed, controller: Controller
) -> None:
    feed.add_good()
    notes = SPELLINGS[spelling](feed, 2, "secret.bin")
    feed.add(BAD, manifest_for(BAD, "a.pyz", b"bad", notes=notes), {"a.pyz": b"bad"})
    result = check(controller.sync(feed))
    assert refused(result) == [(BAD_ENTRY, "notes")]
    assert BROKEN_RULE[spelling] in result.refused[0].reason
    assert_only_the_good_one(controller, result)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_targets_outside_the_feed_are_refused(
    spelling: str, feed: Feed, controller: Controller
) -> None:
    feed.add_good()
    # Valid targets for the entry, outside the feed: only the location rules refuse them.
    (feed.outside / "signed.json").write_bytes(feed.sign({target_name(BAD): _listing(BAD_BYTES)}))
    targets = SPELLINGS[spelling](feed, 2, "signed.json")
    manifest = manifest_for(BAD, "a.pyz", BAD_BYTES, targets=targets)
    feed.add(BAD, manifest, {"a.pyz": BAD_BYTES})
    result = check(controller.sync(feed))
    assert refused(result) == [(BAD_ENTRY, "targets")]
    assert BROKEN_RULE[spelling] in result.refused[0].reason
    assert_only_the_good_one(controller, result)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_an_index_entry_outside_the_feed_is_refused(
    spelling: str, feed: Feed, controller: Controller
) -> None:
    feed.add_good()
    entry = SPELLINGS[spelling](feed, 1, "manifest.json")
    feed.list_first(entry)
    result = check(controller.sync(feed))
    assert [r.field for r in result.refused] == ["index entry"]
    assert result.refused[0].entry in (entry, repr(entry))
    assert BROKEN_RULE[spelling] in result.refused[0].reason
    assert_only_the_good_one(controller, result)


def test_the_controllers_environment_never_becomes_release_notes(
    feed: Feed, controller: Controller, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HITLESS_TEST_SECRET", "hunter2-in-the-environment")
    feed.add_good()
    manifest = manifest_for(BAD, "a.pyz", b"bad", notes="file:///proc/self/environ")
    feed.add(BAD, manifest, {"a.pyz": b"bad"})
    result = check(controller.sync(feed))
    assert refused(result) == [(BAD_ENTRY, "notes")]
    assert_only_the_good_one(controller, result)
    assert all("hunter2" not in r.notes for r in controller.repo.list_releases())


def test_a_symlink_out_of_a_directory_feed_is_refused(
    dir_feed: Feed, controller: Controller
) -> None:
    dir_feed.add_good()
    (dir_feed.root / BAD).mkdir()
    (dir_feed.root / BAD / "a.pyz").symlink_to(dir_feed.secret)
    dir_feed.add(BAD, manifest_for(BAD, "a.pyz", SECRET))
    (dir_feed.root / "2.1.0").mkdir()
    (dir_feed.root / "2.1.0" / "NOTES.md").symlink_to("/proc/self/environ")
    dir_feed.add("2.1.0", manifest_for("2.1.0", "a.pyz", b"b", notes="NOTES.md"), {"a.pyz": b"b"})
    (dir_feed.root / "2.2.0").symlink_to(dir_feed.outside, target_is_directory=True)
    dir_feed.list_first("2.2.0/manifest.json")
    result = check(controller.sync(dir_feed))
    assert refused(result) == [
        ("2.2.0/manifest.json", "manifest"),
        ("2.1.0/manifest.json", "notes"),
        (BAD_ENTRY, "artifact"),
    ]
    assert all("outside the feed" in r.reason for r in result.refused), result.refused
    assert_only_the_good_one(controller, result)


def test_a_symlink_that_stays_inside_a_directory_feed_is_followed(
    dir_feed: Feed, controller: Controller
) -> None:
    dir_feed.add_good()
    shared = dir_feed.root / "shared"
    shared.mkdir()
    (shared / "NOTES.md").write_text("Shared notes.\n")
    notes = dir_feed.root / GOOD / "NOTES.md"
    notes.unlink()
    notes.symlink_to("../shared/NOTES.md")
    result = check(controller.sync(dir_feed))
    assert refused(result) == []
    assert_only_the_good_one(controller, result)
    assert controller.repo.list_releases()[0].notes == "Shared notes.\n"


def test_a_fifo_in_a_directory_feed_is_refused_without_waiting_on_it(
    dir_feed: Feed, controller: Controller
) -> None:
    dir_feed.add_good()
    (dir_feed.root / BAD).mkdir()
    os.mkfifo(dir_feed.root / BAD / "NOTES.md")
    dir_feed.add(BAD, manifest_for(BAD, "a.pyz", b"b", notes="NOTES.md"), {"a.pyz": b"b"})
    result = check(controller.sync(dir_feed))
    assert refused(result) == [(BAD_ENTRY, "notes")]
    assert "not a regular file" in result.refused[0].reason
    assert_only_the_good_one(controller, result)


# --- redirects ------------------------------------------------------------------------------


# What each kind of document is called in an entry, and on the other origin.
PATHS = {"manifest": "manifest.json", "targets": "targets.json", "artifact": "a.pyz",
         "notes": "NOTES.md"}  # fmt: skip
OUTSIDE = {"manifest": "manifest.json", "targets": "targets.json", "artifact": "secret.bin",
           "notes": "secret.bin"}  # fmt: skip


@pytest.mark.parametrize("what", PATHS)
def test_a_redirect_to_another_origin_is_refused(
    what: str, http_feed: Feed, controller: Controller
) -> None:
    assert http_feed.site is not None
    http_feed.add_good()
    manifest = manifest_for(BAD, "a.pyz", SECRET, notes="NOTES.md")
    http_feed.add(BAD, manifest, {"a.pyz": SECRET, "NOTES.md": b"notes"})
    target, path = OUTSIDE[what], PATHS[what]
    http_feed.site.routes[f"/{BAD}/{path}"] = redirect(http_feed.outside_site.url + target)
    result = check(controller.sync(http_feed))
    assert refused(result) == [(BAD_ENTRY, what)]
    assert "outside the feed" in result.refused[0].reason
    assert_only_the_good_one(controller, result)


def test_a_redirect_out_of_the_feeds_path_on_the_same_server_is_refused(
    tmp_path: Path, keys: trust_keys.KeyPaths, controller: Controller
) -> None:
    with _feed(tmp_path, False, keys) as feed:
        site = Site(tmp_path)  # the feed is at /feed/ on it, the secret at /outside/
        try:
            feed.source = site.url + "feed"
            feed.add_good()
            feed.add(BAD, manifest_for(BAD, "a.pyz", SECRET), {"a.pyz": SECRET})
            site.routes[f"/feed/{BAD}/a.pyz"] = redirect("/outside/secret.bin")
            result = check(controller.sync(feed))
            assert refused(result) == [(BAD_ENTRY, "artifact")]
            assert "outside the feed" in result.refused[0].reason
            assert_only_the_good_one(controller, result)
        finally:
            site.close()


def test_a_redirect_inside_the_feed_is_followed(http_feed: Feed, controller: Controller) -> None:
    assert http_feed.site is not None
    http_feed.add_good()
    (http_feed.root / GOOD / "manifest.json").rename(http_feed.root / GOOD / "moved.json")
    http_feed.site.routes[f"/{GOOD}/manifest.json"] = redirect(f"/{GOOD}/moved.json")
    result = check(controller.sync(http_feed))
    assert refused(result) == []
    assert_only_the_good_one(controller, result)


# --- bounded reads --------------------------------------------------------------------------


def test_an_artifact_longer_than_its_manifest_says_is_refused(
    feed: Feed, controller: Controller
) -> None:
    feed.add_good()
    declared = b"x" * 10
    feed.add(BAD, manifest_for(BAD, "a.pyz", declared), {"a.pyz": declared * 100_000})
    result = check(controller.sync(feed))
    assert refused(result) == [(BAD_ENTRY, "artifact")]
    assert "the manifest's size, 10 bytes" in result.refused[0].reason
    assert_only_the_good_one(controller, result)


def test_an_artifact_shorter_than_its_manifest_says_is_refused(
    feed: Feed, controller: Controller
) -> None:
    feed.add_good()
    manifest = manifest_for(BAD, "a.pyz", b"x" * 10)
    feed.add(BAD, manifest, {"a.pyz": b"x" * 9})
    result = check(controller.sync(feed))
    assert refused(result) == [(BAD_ENTRY, "artifact")]
    assert "short of the manifest's size" in result.refused[0].reason
    assert_only_the_good_one(controller, result)


def test_an_artifact_with_another_digest_is_refused(feed: Feed, controller: Controller) -> None:
    feed.add_good()
    feed.add(BAD, manifest_for(BAD, "a.pyz", b"x" * 10), {"a.pyz": b"y" * 10})
    result = check(controller.sync(feed))
    assert refused(result) == [(BAD_ENTRY, "artifact")]
    assert "digest mismatch" in result.refused[0].reason
    assert_only_the_good_one(controller, result)


@pytest.mark.parametrize("length", [None, 10**12], ids=["unannounced", "announced"])
@pytest.mark.parametrize("what", PATHS)
def test_an_endless_http_document_is_refused_at_its_limit(
    what: str, length: int | None, http_feed: Feed, controller: Controller
) -> None:
    assert http_feed.site is not None
    http_feed.add_good()
    manifest = manifest_for(BAD, "a.pyz", b"x" * 1000, notes="NOTES.md")
    http_feed.add(BAD, manifest, {"a.pyz": b"x" * 1000, "NOTES.md": b"notes"})
    http_feed.site.routes[f"/{BAD}/{PATHS[what]}"] = endless(length)
    result = check(controller.sync(http_feed))
    assert refused(result) == [(BAD_ENTRY, what)]
    if length is not None:  # refused on the announcement, before reading the body
        assert str(length) in result.refused[0].reason
    assert_only_the_good_one(controller, result)


@pytest.mark.parametrize("what", PATHS)
def test_an_http_document_trickling_past_its_deadline_is_refused(
    what: str, http_feed: Feed, controller: Controller
) -> None:
    assert http_feed.site is not None
    http_feed.add_good()
    artifact = b"x" * 1000
    manifest = manifest_for(BAD, "a.pyz", artifact, notes="NOTES.md")
    http_feed.add(BAD, manifest, {"a.pyz": artifact, "NOTES.md": b"notes"})
    path = PATHS[what]
    # The artifact trickles all its bytes in 100 s, the others never end: without a
    # deadline each outlasts CHECK_TIMEOUT_S.
    http_feed.site.routes[f"/{BAD}/{path}"] = trickle(len(artifact) if what == "artifact" else None)
    result = check(controller.sync(http_feed, fetch_slack_s=1.0))
    assert refused(result) == [(BAD_ENTRY, what)]
    assert "too slow" in result.refused[0].reason
    assert_only_the_good_one(controller, result)


def test_notes_up_to_the_limit_import_and_one_byte_more_is_refused(
    feed: Feed, controller: Controller
) -> None:
    feed.add_good(notes="n" * MAX_NOTES_BYTES)
    big = b"n" * (MAX_NOTES_BYTES + 1)
    feed.add(
        BAD, manifest_for(BAD, "a.pyz", b"b", notes="NOTES.md"), {"a.pyz": b"b", "NOTES.md": big}
    )
    result = check(controller.sync(feed))
    assert refused(result) == [(BAD_ENTRY, "notes")]
    assert str(MAX_NOTES_BYTES) in result.refused[0].reason
    assert_only_the_good_one(controller, result)


def test_a_manifest_over_its_limit_is_refused(feed: Feed, controller: Controller) -> None:
    feed.add_good()
    manifest = json.dumps(manifest_for(BAD, "a.pyz", b"b")).encode()
    feed.add(BAD, manifest + b" " * MAX_MANIFEST_BYTES, {"a.pyz": b"b"})
    result = check(controller.sync(feed))
    assert refused(result) == [(BAD_ENTRY, "manifest")]
    assert_only_the_good_one(controller, result)


def test_an_index_over_its_limit_stops_the_check_and_imports_nothing(
    feed: Feed, controller: Controller
) -> None:
    feed.add_good()
    index = feed.root / "index.json"
    index.write_bytes(index.read_bytes() + b" " * MAX_INDEX_BYTES)
    with pytest.raises(FeedError, match=f"limit of {MAX_INDEX_BYTES} bytes"):
        check(controller.sync(feed))
    assert (controller.versions(), controller.stored(), controller.events()) == ([], set(), set())


def test_an_endless_http_index_stops_the_check_at_its_limit(
    http_feed: Feed, controller: Controller
) -> None:
    assert http_feed.site is not None
    http_feed.add_good()
    http_feed.site.routes["/index.json"] = endless()
    with pytest.raises(FeedError, match=f"limit of {MAX_INDEX_BYTES} bytes"):
        check(controller.sync(http_feed))
    assert controller.versions() == []


def test_an_index_with_too_many_entries_stops_the_check(
    dir_feed: Feed, controller: Controller
) -> None:
    dir_feed.add_good()
    dir_feed.list_first(*(f"{n}/manifest.json" for n in range(MAX_INDEX_ENTRIES)))
    with pytest.raises(FeedError, match=f"more than the {MAX_INDEX_ENTRIES}"):
        check(controller.sync(dir_feed))
    assert controller.versions() == []


# --- version stamps -------------------------------------------------------------------------


def test_an_artifact_stamped_with_another_version_or_none_is_refused(
    feed: Feed, controller: Controller
) -> None:
    feed.add_good()
    other = stamped("1.3.0")
    feed.add("7.4.0", manifest_for("7.4.0", "a.pyz", other), {"a.pyz": other})
    plain = b"plain bytes, no stamp"
    feed.add("7.5.0", manifest_for("7.5.0", "a.pyz", plain), {"a.pyz": plain})
    result = check(controller.sync(feed))
    assert refused(result) == [
        ("7.5.0/manifest.json", "artifact"),
        ("7.4.0/manifest.json", "artifact"),
    ]
    no_stamp, wrong_stamp = (r.reason for r in result.refused)
    assert "release 7.5.0 carries no version stamp" in no_stamp
    assert "release 7.4.0 carries the version stamp '1.3.0'" in wrong_stamp
    assert_only_the_good_one(controller, result)


# --- signed targets -------------------------------------------------------------------------

# A broken entry: its manifest, its targets.json (None: no such file) and what the refusal
# must say.
Broken = tuple[dict[str, Any], bytes | None, list[str]]
BadTargets = Callable[[Feed, Path], Broken]


def _without_targets(feed: Feed, tmp: Path) -> Broken:
    manifest = manifest_for(BAD, "a.pyz", BAD_BYTES)
    del manifest["targets"]
    return manifest, feed.sign({target_name(BAD): _listing(BAD_BYTES)}), ["missing"]


def _signed_by_another_key(feed: Feed, tmp: Path) -> Broken:
    other = trust_keys.load_signer(trust_keys.init(tmp / "other-keys").key("targets"))
    ours = trust_keys.load_signer(feed.keys.key("targets"))
    targets = feed.sign({target_name(BAD): _listing(BAD_BYTES)}, signer=other)
    expected = ["targets version 2 has 0 valid signature", other.public_key.keyid,
                ours.public_key.keyid]  # fmt: skip
    return manifest_for(BAD, "a.pyz", BAD_BYTES), targets, expected


def _bad(
    targets: Callable[[Feed], bytes | None], *says: str, location: str = "targets.json"
) -> BadTargets:
    def make(feed: Feed, tmp: Path) -> Broken:
        manifest = manifest_for(BAD, "a.pyz", BAD_BYTES, targets=location)
        return manifest, targets(feed), list(says)

    return make


_NAME = target_name(BAD)
BAD_TARGETS: dict[str, BadTargets] = {
    "missing-field": _without_targets,
    "file-missing": _bad(lambda f: None, f"{BAD}/nowhere.json", location="nowhere.json"),
    "malformed-json": _bad(lambda f: b'{"signed": {', "not targets metadata"),
    "not-targets-metadata": _bad(
        lambda f: f.keys.root_json.read_bytes(), "expected targets metadata, got root version 1"
    ),
    "unsigned": _bad(
        lambda f: f.sign({_NAME: _listing(BAD_BYTES)}, unsigned=True),
        "targets version 2 has 0 valid signature",
    ),
    "signed-by-another-key": _signed_by_another_key,
    "expired": _bad(
        lambda f: f.sign({_NAME: _listing(BAD_BYTES)}, expires=datetime.now(UTC) - timedelta(1)),
        "targets version 2 expired at",
        f"do not list {_NAME!r}",
    ),
    "does-not-list-it": _bad(
        lambda f: f.sign({target_name("2.0.1"): _listing(BAD_BYTES)}),
        f"targets version 2 does not list {_NAME!r}",
    ),
    "lists-another-sha256": _bad(
        lambda f: f.sign({_NAME: _listing(b"another build")}),
        f"signs {_NAME!r} as 13 bytes with sha256 {hashlib.sha256(b'another build').hexdigest()}",
    ),
    "over-the-limit": _bad(
        lambda f: f.sign({_NAME: _listing(BAD_BYTES)}) + b" " * MAX_TARGETS_BYTES,
        f"limit of {MAX_TARGETS_BYTES} bytes",
    ),
}


def counted(data: bytes, hits: list[str]) -> Responder:
    """``data``, noting each request for it in ``hits``."""

    def respond(handler: _Handler) -> None:
        hits.append(handler.path)
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    return respond


@pytest.mark.parametrize("case", BAD_TARGETS)
def test_an_entry_without_valid_targets_is_refused_alone_before_its_artifact_is_read(
    case: str, feed: Feed, controller: Controller, tmp_path: Path
) -> None:
    feed.add_good()
    manifest, targets, says = BAD_TARGETS[case](feed, tmp_path)
    files = {"a.pyz": BAD_BYTES} | ({"targets.json": targets} if targets is not None else {})
    feed.add(BAD, manifest, files)
    artifact_reads: list[str] = []
    if feed.site is not None:
        feed.site.routes[f"/{BAD}/a.pyz"] = counted(BAD_BYTES, artifact_reads)
    result = check(controller.sync(feed))
    assert refused(result) == [(BAD_ENTRY, "targets")], result.refused
    for words in says:
        assert words in result.refused[0].reason, result.refused[0].reason
    assert_only_the_good_one(controller, result)
    assert artifact_reads == []


def test_entries_whose_targets_are_older_than_the_published_import_when_those_list_them(
    dir_feed: Feed, controller: Controller
) -> None:
    dir_feed.add_good()  # its targets: version 1
    dir_feed.add_release("1.5.0", stamped("1.5.0"))  # version 2, listing both
    index = dir_feed.root / "index.json"
    index.write_text(json.dumps({"releases": ["1.5.0/manifest.json"]}))
    sync = controller.sync(dir_feed)
    assert [r.version for r in check(sync).imported] == ["1.5.0"]
    both = {target_name(GOOD), target_name("1.5.0")}
    assert controller.published() == (2, both)

    dir_feed.list_first(f"{GOOD}/manifest.json")
    result = check(sync)
    assert (refused(result), [r.version for r in result.imported]) == ([], [GOOD])
    assert controller.published() == (2, both)
    assert controller.events() == {f"release:{GOOD}", "release:1.5.0"}


def test_an_entry_with_expired_targets_imports_when_a_later_entry_publishes_targets_listing_it(
    dir_feed: Feed, controller: Controller
) -> None:
    dir_feed.add_good()
    expired = sign_targets(
        None,
        dir_feed.keys.dir,
        add={target_name(GOOD): dir_feed.root / GOOD / f"hitless-{GOOD}.pyz"},
        now=datetime.now(UTC) - trust_keys.TARGETS_EXPIRY - timedelta(days=1),
    )
    for path in (dir_feed.root / "targets.json", dir_feed.root / GOOD / "targets.json"):
        path.write_bytes(expired)
    dir_feed.add_release("1.5.0", stamped("1.5.0"))  # listed after the good one
    result = check(controller.sync(dir_feed))
    assert refused(result) == []
    assert sorted(r.version for r in result.imported) == [GOOD, "1.5.0"]
    assert controller.published() == (2, {target_name(GOOD), target_name("1.5.0")})


def test_a_release_yanked_before_its_entry_is_imported_is_refused_without_being_fetched(
    dir_feed: Feed, controller: Controller
) -> None:
    dir_feed.add_good()
    dir_feed.add_release("1.5.0", stamped("1.5.0"))
    listing_both = (dir_feed.root / "targets.json").read_bytes()
    controller.trust.accept(yank(listing_both, dir_feed.keys.dir, [target_name("1.5.0")]))
    result = check(controller.sync(dir_feed))
    assert refused(result) == [("1.5.0/manifest.json", "targets")]
    reason = result.refused[0].reason
    assert "targets version 2 is not newer than version 3 already published" in reason
    assert repr(target_name("1.5.0")) in reason
    assert [r.version for r in result.imported] == [GOOD]
    assert controller.versions() == [GOOD]
    assert controller.stored() == {hashlib.sha256(GOOD_BYTES).hexdigest()}
    assert controller.published() == (3, {target_name(GOOD)})


def test_a_release_imported_before_it_was_signed_is_signed_by_its_entry(
    dir_feed: Feed, controller: Controller
) -> None:
    record, _ = controller.repo.add_release(
        GOOD, hashlib.sha256(GOOD_BYTES).hexdigest(), len(GOOD_BYTES), "", datetime.now(UTC)
    )
    assert controller.trust.signing(record) is Signing.UNSIGNED
    dir_feed.add_good()
    result = check(controller.sync(dir_feed))
    assert (result.imported, result.refused) == ([], [])
    assert controller.trust.signing(record) is Signing.SIGNED
    assert controller.published() == (1, {target_name(GOOD)})
    assert controller.events() == set(), "a release known already is not announced again"


# --- malformed manifests, notes and index entries ---------------------------------------------

_OK = manifest_for(BAD, "a.pyz", b"bad")
MALFORMED: dict[str, tuple[dict[str, Any] | bytes, str]] = {
    "not-json": (b'{"version": "2.0.0",', "manifest"),
    "not-an-object": (b"[]", "manifest"),
    "nan": (json.dumps(_OK).replace('"size": 3', '"size": NaN').encode(), "manifest"),
    "deeply-nested": (b"[" * 50_000, "manifest"),
    "unknown-field": ({**_OK, "script": "rm -rf /"}, "script"),
    "missing-version": ({k: v for k, v in _OK.items() if k != "version"}, "version"),
    "version-not-semver": ({**_OK, "version": "2.0"}, "version"),
    "version-prerelease": ({**_OK, "version": "2.0.0-rc1"}, "version"),
    "version-padded": ({**_OK, "version": " 2.0.0"}, "version"),
    "version-other-digits": ({**_OK, "version": "\u0662.\u0660.\u0660"}, "version"),
    "version-a-number": ({**_OK, "version": 2}, "version"),
    "version-too-long": ({**_OK, "version": "2.0." + "1" * MAX_VERSION_CHARS}, "version"),
    "sha256-uppercase": ({**_OK, "sha256": _OK["sha256"].upper()}, "sha256"),
    "sha256-short": ({**_OK, "sha256": "ab" * 16}, "sha256"),
    "sha256-a-number": ({**_OK, "sha256": 1}, "sha256"),
    "size-zero": ({**_OK, "size": 0}, "size"),
    "size-negative": ({**_OK, "size": -3}, "size"),
    "size-a-string": ({**_OK, "size": "3"}, "size"),
    "size-a-fraction": ({**_OK, "size": 3.0}, "size"),
    "size-a-boolean": ({**_OK, "size": True}, "size"),
    "size-over-the-limit": ({**_OK, "size": MAX_ARTIFACT_BYTES + 1}, "size"),
    "missing-artifact": ({k: v for k, v in _OK.items() if k != "artifact"}, "artifact"),
    "missing-targets": ({k: v for k, v in _OK.items() if k != "targets"}, "targets"),
    "targets-not-a-string": ({**_OK, "targets": {"version": 1}}, "targets"),
    "artifact-not-a-string": ({**_OK, "artifact": ["a.pyz"]}, "artifact"),
    "artifact-missing-file": ({**_OK, "artifact": "nowhere.pyz"}, "artifact"),
    "notes-not-a-string": ({**_OK, "notes": 5}, "notes"),
    "flags-not-an-object": ({**_OK, "flags": ["restarts_vpn_service"]}, "flags"),
    "flag-unknown": ({**_OK, "flags": {"reboot": True}}, "flags.reboot"),
    "flag-not-a-boolean": (
        {**_OK, "flags": {"restarts_vpn_service": "no"}},
        "flags.restarts_vpn_service",
    ),
    "min-from-not-semver": ({**_OK, "min_from": "1.x"}, "min_from"),
    "min-from-a-number": ({**_OK, "min_from": 1}, "min_from"),
    "min-from-padded": ({**_OK, "min_from": "1.0.0 "}, "min_from"),
    "min-from-not-below": ({**_OK, "min_from": BAD}, "min_from"),
}


def test_a_release_that_upgrades_only_from_a_version_on_says_so(
    dir_feed: Feed, controller: Controller
) -> None:
    dir_feed.add_release(BAD, BAD_BYTES, min_from=GOOD)
    manifest = json.loads((dir_feed.root / BAD / "manifest.json").read_text())
    assert manifest["min_from"] == GOOD
    check(controller.sync(dir_feed))
    release = controller.repo.get_release(BAD)
    assert release is not None and release.min_from == GOOD


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_manifest_is_refused_alone(
    case: str, dir_feed: Feed, controller: Controller
) -> None:
    manifest, field = MALFORMED[case]
    dir_feed.add_good()
    dir_feed.add(BAD, manifest, {"a.pyz": b"bad"})
    result = check(controller.sync(dir_feed))
    assert refused(result) == [(BAD_ENTRY, field)], result.refused
    assert_only_the_good_one(controller, result)


@pytest.mark.parametrize(
    "notes",
    [b"\xff\xfenot utf-8", b"clear the screen \x1b[2J", b"a\x00b", b"c1 \xc2\x9b control"],
    ids=["not-utf-8", "escape", "nul", "c1-control"],
)
def test_notes_that_are_not_text_are_refused(
    notes: bytes, feed: Feed, controller: Controller
) -> None:
    feed.add_good()
    manifest = manifest_for(BAD, "a.pyz", b"b", notes="NOTES.md")
    feed.add(BAD, manifest, {"a.pyz": b"b", "NOTES.md": notes})
    result = check(controller.sync(feed))
    assert refused(result) == [(BAD_ENTRY, "notes")]
    assert_only_the_good_one(controller, result)


def test_index_entries_that_are_not_paths_or_not_there_are_refused_alone(
    feed: Feed, controller: Controller
) -> None:
    feed.add_good()
    feed.list_first(42, {"path": "x"}, None, "", "3.0.0/manifest.json", "1.4.0/manifest.json")
    result = check(controller.sync(feed))
    assert refused(result) == [
        ("42", "index entry"),
        ("{'path': 'x'}", "index entry"),
        ("None", "index entry"),
        ("''", "index entry"),
        ("3.0.0/manifest.json", "manifest"),
    ]
    assert_only_the_good_one(controller, result)


@pytest.mark.parametrize(
    "index",
    [b"not json", b'["1.4.0/manifest.json"]', b'{"releases": "1.4.0/manifest.json"}',
     b'{"releases": [], "extra": 1}'],
    ids=["not-json", "a-list", "releases-not-a-list", "unknown-field"],
)  # fmt: skip
def test_a_malformed_index_stops_the_check_saying_so(
    index: bytes, dir_feed: Feed, controller: Controller
) -> None:
    dir_feed.add_good()
    (dir_feed.root / "index.json").write_bytes(index)
    with pytest.raises(FeedError, match="index"):
        check(controller.sync(dir_feed))
    assert controller.versions() == []


# --- reporting ------------------------------------------------------------------------------


def test_a_version_that_reappears_with_another_digest_is_refused(
    dir_feed: Feed, controller: Controller
) -> None:
    dir_feed.add_good()
    sync = controller.sync(dir_feed)
    assert [r.version for r in check(sync).imported] == [GOOD]
    (dir_feed.root / GOOD / f"hitless-{GOOD}.pyz").write_bytes(b"rebuilt")
    manifest = manifest_for(GOOD, f"hitless-{GOOD}.pyz", b"rebuilt")
    (dir_feed.root / GOOD / "manifest.json").write_text(json.dumps(manifest))
    result = check(sync)
    assert refused(result) == [(f"{GOOD}/manifest.json", "sha256")]
    assert result.imported == []
    assert controller.stored() == {hashlib.sha256(GOOD_BYTES).hexdigest()}
    assert controller.events() == {f"release:{GOOD}"}


def test_each_refusal_is_logged_once_while_it_lasts(dir_feed: Feed, controller: Controller) -> None:
    dir_feed.add_good()
    dir_feed.add(BAD, manifest_for(BAD, "../../outside/secret.bin", SECRET))
    sync = controller.sync(dir_feed)
    with capture_logs() as logs:
        check(sync)
        check(sync)
    refusals = [e for e in logs if e["event"] == "feed_entry_refused"]
    assert [(e["entry"], e["field"]) for e in refusals] == [(BAD_ENTRY, "artifact")]

    manifest = {**manifest_for(BAD, "a.pyz", b"x"), "version": "2"}
    (dir_feed.root / BAD / "manifest.json").write_text(json.dumps(manifest))
    with capture_logs() as logs:
        check(sync)
        check(sync)
    refusals = [e for e in logs if e["event"] == "feed_entry_refused"]
    assert [(e["entry"], e["field"]) for e in refusals] == [(BAD_ENTRY, "version")]

    fixed = stamped(BAD)
    dir_feed.add(BAD, manifest_for(BAD, "a.pyz", fixed), {"a.pyz": fixed})
    with capture_logs() as logs:
        result = check(sync)
    assert [e["event"] for e in logs] == ["release_imported"]
    assert [r.version for r in result.imported] == [BAD]


def test_sync_imports_the_good_entries_then_names_the_refused_ones(
    feed: Feed, controller: Controller
) -> None:
    feed.add_good()
    feed.add(BAD, manifest_for(BAD, "../../outside/secret.bin", SECRET))
    sync = controller.sync(feed)
    with pytest.raises(EntriesRefused) as refusal:
        sync.sync()
    message = str(refusal.value)
    assert f"refused 1 entry ({BAD_ENTRY}: artifact: " in message
    assert f"imported {GOOD}." in message
    assert controller.versions() == [GOOD]
    with pytest.raises(EntriesRefused, match="imported nothing new"):
        sync.sync()
    fixed = stamped(BAD)
    feed.add(BAD, manifest_for(BAD, "a.pyz", fixed), {"a.pyz": fixed})
    assert [r.version for r in sync.sync()] == [BAD]
    assert sync.sync() == []


def test_a_sync_refusing_many_entries_lists_a_few_and_counts_the_rest(
    dir_feed: Feed, controller: Controller
) -> None:
    dir_feed.add_good()
    dir_feed.list_first(*(f"../{n}/manifest.json" for n in range(40)))
    with pytest.raises(EntriesRefused) as refusal:
        controller.sync(dir_feed).sync()
    message = str(refusal.value)
    assert "refused 40 entries" in message and "and 30 more" in message
    assert len(message) < 6000
    assert controller.versions() == [GOOD]


@pytest.mark.parametrize(
    "source", ["ftp://example.com/feed", "http:///feed", "http://example.com/feed?x=1"]
)
def test_a_feed_source_that_is_not_a_directory_or_an_http_url_is_a_config_error(
    source: str,
) -> None:
    with pytest.raises(ConfigError, match="invalid release feed"):
        ReleaseFeed(source)
