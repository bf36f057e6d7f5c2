"""Releases arriving from a feed (a directory, and the same over HTTP): imported once,
signed by the release manager's targets key, announced to every admin once by email,
through a real controller, notifier and SMTP."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from controller_svc.feed import write_entry
from hitless.trust import keys
from tests.support.fleet import Fleet
from tests.support.procs import Procs, command, free_port
from tests.support.rabbit import amqp_url
from tests.support.smtp import Sink
from tests.support.stamped import stamped
from tests.support.wait import wait_for

ADMINS = ["alice@example.com", "bob@example.com"]


@pytest.fixture
def sink() -> Iterator[tuple[Sink, int]]:
    handler, port = Sink(), free_port()
    server = Controller(handler, hostname="127.0.0.1", port=port)
    server.start()
    try:
        yield handler, port
    finally:
        server.stop()


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory served over HTTP on loopback."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def _artifact(fleet: Fleet, version: str) -> Path:
    path = fleet.root / f"build-{version}.pyz"
    fleet.cli("releases", "build", "--version", version, "-o", str(path))
    return path


@pytest.mark.parametrize("over_http", [False, True], ids=["directory", "http"])
def test_a_new_release_in_the_feed_mails_each_admin_once(
    over_http: bool,
    vhost: str,
    tmp_path: Path,
    procs: Procs,
    sink: tuple[Sink, int],
    http_root: tuple[Path, str],
) -> None:
    mails, smtp_port = sink
    feed_dir, source = (http_root[0], http_root[1]) if over_http else (tmp_path / "feed", "")
    feed_dir.mkdir(exist_ok=True)
    fleet = Fleet(procs, tmp_path, amqp_url(vhost))
    try:
        fleet.start_controller(None, "--release-feed", source or str(feed_dir))
        for admin in ADMINS:
            fleet.cli("admins", "add", admin)
        procs.start(
            "notifier",
            [command("notifier"), "run", "--amqp", fleet.amqp_url,
             "--smtp", f"127.0.0.1:{smtp_port}", "--from", "hitless@example.com",
             "--state", str(tmp_path / "notifier.db")],
        )  # fmt: skip

        write_entry(
            feed_dir, "1.4.0", _artifact(fleet, "1.4.0"), "# 1.4.0\n\nFaster tunnels.\n",
            restarts_vpn_service=True, keys_dir=fleet.keys.dir,
        )  # fmt: skip
        synced = fleet.cli_json("releases", "sync")
        assert [r["version"] for r in synced] == ["1.4.0"]
        assert fleet.cli_json("releases", "sync") == [], "importing twice must change nothing"
        (release,) = fleet.cli_json("releases", "list")
        assert release["restarts_vpn_service"] is True
        assert release["signing"] == "SIGNED"
        assert "Faster tunnels." in release["notes"]

        wait_for(
            lambda: mails.count() == Counter(ADMINS),
            timeout=30,
            what="one email per admin",
            describe=lambda: f"{mails.count()}\n{procs.dump_logs()}",
        )
        for admin in ADMINS:
            (mail,) = mails.to(admin)
            assert "1.4.0" in mail["Subject"]
            text = mail.get_body(("plain",)).get_content()  # type: ignore[union-attr]
            assert "Faster tunnels." in text
            assert "WARNING: This release restarts the VPN service" in text
            assert "must reconnect" in text
    finally:
        fleet.close()


def test_a_release_whose_artifact_does_not_match_its_manifest_is_not_imported(
    fleet: Fleet, tmp_path: Path
) -> None:
    feed = tmp_path / "feed"
    manifest = write_entry(
        feed, "1.4.0", _artifact(fleet, "1.4.0"), "notes", keys_dir=fleet.keys.dir
    )
    artifact = next(p for p in manifest.parent.iterdir() if p.suffix == ".pyz")
    artifact.write_bytes(artifact.read_bytes() + b"tampered")
    fleet.procs.stop(fleet.controller)  # type: ignore[arg-type]
    fleet.start_controller(None, "--release-feed", str(feed))
    result = fleet.cli("releases", "sync", check=False)
    assert result.returncode == 4
    assert "refused 1 entry (1.4.0/manifest.json: artifact: " in result.stderr
    assert "over the manifest's size" in result.stderr
    assert fleet.cli_json("releases", "list") == []


def test_a_release_in_the_feed_signed_by_another_targets_key_is_not_imported(
    fleet: Fleet, tmp_path: Path
) -> None:
    feed = tmp_path / "feed"
    other = keys.init(tmp_path / "other-keys")
    write_entry(feed, "1.4.0", _artifact(fleet, "1.4.0"), "notes", keys_dir=other.dir)
    (feed / "targets.json").unlink()  # the feed's targets start over, with the right key
    write_entry(feed, "1.5.0", _artifact(fleet, "1.5.0"), "notes", keys_dir=fleet.keys.dir)
    fleet.procs.stop(fleet.controller)  # type: ignore[arg-type]
    fleet.start_controller(None, "--release-feed", str(feed))
    result = fleet.cli("releases", "sync", check=False)
    assert result.returncode == 4, result
    assert "refused 1 entry (1.4.0/manifest.json: targets: " in result.stderr
    assert "targets version 1 has 0 valid signature" in result.stderr
    # Imported by this sync, or by the check the controller makes as it starts.
    (release,) = fleet.cli_json("releases", "list")
    assert (release["version"], release["signing"]) == ("1.5.0", "SIGNED")


@pytest.mark.parametrize("over_http", [False, True], ids=["directory", "http"])
def test_entries_reaching_outside_the_feed_are_refused_and_only_the_good_one_is_mailed(
    over_http: bool,
    vhost: str,
    tmp_path: Path,
    procs: Procs,
    sink: tuple[Sink, int],
    http_root: tuple[Path, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mails, smtp_port = sink
    feed_dir, source = (http_root[0], http_root[1]) if over_http else (tmp_path / "feed", "")
    feed_dir.mkdir(exist_ok=True)
    secret = tmp_path / "outside" / "secret.bin"
    secret.parent.mkdir()
    secret.write_bytes(b"BROKER_PASSWORD=hunter2-on-disk\n")
    # The controller inherits this: what /proc/self/environ would hand out.
    monkeypatch.setenv("HITLESS_TEST_SECRET", "hunter2-in-the-environment")
    fleet = Fleet(procs, tmp_path, amqp_url(vhost))
    try:
        fleet.start_controller(None, "--release-feed", source or str(feed_dir))
        for admin in ADMINS:
            fleet.cli("admins", "add", admin)
        procs.start(
            "notifier",
            [command("notifier"), "run", "--amqp", fleet.amqp_url,
             "--smtp", f"127.0.0.1:{smtp_port}", "--from", "hitless@example.com",
             "--state", str(tmp_path / "notifier.db")],
        )  # fmt: skip
        good = tmp_path / "hitless-1.4.0.pyz"
        good.write_bytes(stamped("1.4.0"))
        write_entry(feed_dir, "1.4.0", good, "Good notes.\n", keys_dir=fleet.keys.dir)
        data = secret.read_bytes()
        _add_entry(feed_dir, "2.0.0", {
            "version": "2.0.0", "artifact": "../../outside/secret.bin",
            "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
            "targets": "targets.json",
        })  # fmt: skip
        (feed_dir / "2.1.0").mkdir()
        (feed_dir / "2.1.0" / "a.pyz").write_bytes(b"a")
        _add_entry(feed_dir, "2.1.0", {
            "version": "2.1.0", "artifact": "a.pyz", "notes": "file:///proc/self/environ",
            "sha256": hashlib.sha256(b"a").hexdigest(), "size": 1,
            "targets": "targets.json",
        })  # fmt: skip

        result = fleet.cli("releases", "sync", check=False)
        assert result.returncode == 4, result
        assert "2.1.0/manifest.json: notes: " in result.stderr
        assert "2.0.0/manifest.json: artifact: " in result.stderr
        assert "imported 1.4.0." in result.stderr
        assert [r["version"] for r in fleet.cli_json("releases", "list")] == ["1.4.0"]
        again = fleet.cli("releases", "sync", check=False)
        assert again.returncode == 4 and "imported nothing new" in again.stderr

        # The refused entries come first in the index: had they been announced, their
        # mails would have come before the good one's.
        wait_for(
            lambda: mails.count() == Counter(ADMINS),
            timeout=30,
            what="one email per admin, for 1.4.0 alone",
            describe=lambda: f"{mails.count()}\n{procs.dump_logs()}",
        )
        for admin in ADMINS:
            (mail,) = mails.to(admin)
            assert "1.4.0" in mail["Subject"]
            assert "hunter2" not in mail.as_string()
        assert fleet.cli("releases", "list").stdout.count("hunter2") == 0
        assert fleet.controller is not None
        log = fleet.controller.log()
        assert log.count("feed_entry_refused") == 2, "each refusal is logged once"
    finally:
        fleet.close()


def _add_entry(feed: Path, version: str, manifest: dict[str, object]) -> None:
    """Write ``version/manifest.json`` and list it first in the feed's index."""
    (feed / version).mkdir(exist_ok=True)
    (feed / version / "manifest.json").write_text(json.dumps(manifest))
    index = json.loads((feed / "index.json").read_text())
    index["releases"].insert(0, f"{version}/manifest.json")
    (feed / "index.json").write_text(json.dumps(index))
