"""Releases arriving from a feed (a directory, and the same over HTTP): imported once,
announced to every admin once by email, through a real controller, notifier and SMTP."""

from __future__ import annotations

import functools
import http.server
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from controller_svc.feed import write_entry
from tests.support.fleet import Fleet
from tests.support.procs import Procs, command, free_port
from tests.support.rabbit import amqp_url
from tests.support.smtp import Sink
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
            restarts_vpn_service=True,
        )  # fmt: skip
        synced = fleet.cli_json("releases", "sync")
        assert [r["version"] for r in synced] == ["1.4.0"]
        assert fleet.cli_json("releases", "sync") == [], "importing twice must change nothing"
        (release,) = fleet.cli_json("releases", "list")
        assert release["restarts_vpn_service"] is True
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
    manifest = write_entry(feed, "1.4.0", _artifact(fleet, "1.4.0"), "notes")
    artifact = next(p for p in manifest.parent.iterdir() if p.suffix == ".pyz")
    artifact.write_bytes(artifact.read_bytes() + b"tampered")
    fleet.procs.stop(fleet.controller)  # type: ignore[arg-type]
    fleet.start_controller(None, "--release-feed", str(feed))
    result = fleet.cli("releases", "sync", check=False)
    assert result.returncode == 4
    assert "expected" in result.stderr
    assert fleet.cli_json("releases", "list") == []
