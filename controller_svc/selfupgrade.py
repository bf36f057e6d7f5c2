"""The controller moving itself to a release, inline, without going down.

The release's artifact (which carries the controller's code too) is staged under the data
directory and started beside this process (``takeover``); once it serves, this process
is told to hand over: it stops taking calls, finishes those in flight and exits. The
staged release is recorded, so a controller restarted later runs it and not an older
installed version. Secrets (database and broker URLs) travel in the environment, not on
the command line.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from controller_svc.errors import FailedPrecondition
from controller_svc.records import ReleaseRecord
from controller_svc.store import ArtifactStore
from controller_svc.takeover import Successor, TakeoverFailed, start_successor
from hitless import config as cfg
from hitless import logs, version
from hitless.digest import file_sha256

log = logs.get(__name__)

POINTER = "controller-release.json"

Spawn = Callable[[Sequence[str], Mapping[str, str]], Successor]


class ControllerUpgrader:
    def __init__(
        self,
        config: cfg.ControllerConfig,
        store: ArtifactStore,
        hand_over: Callable[[], None],
        spawn: Spawn = start_successor,
    ) -> None:
        self._config = config
        self._store = store
        self._hand_over = hand_over
        self._spawn = spawn
        self._lock = threading.Lock()

    def needed(self, release: ReleaseRecord) -> bool:
        return release.version != version.current()

    def upgrade_to(self, release: ReleaseRecord) -> Successor:
        """Start ``release``'s controller; return it once it serves (then this one hands
        over). TakeoverFailed leaves this controller in charge."""
        if not self._lock.acquire(blocking=False):
            raise FailedPrecondition("a controller upgrade is already in progress")
        try:
            staged = self._stage(release)
            log.info("controller_upgrade_started", version=release.version)
            successor = self._spawn(self._argv(staged), self._secrets())
            if successor.version != release.version:
                raise TakeoverFailed(
                    f"the new controller runs {successor.version}, not {release.version}"
                )
            record_release(self._config.data_dir, release.version, staged)
            log.info("controller_handing_over", version=successor.version, pid=successor.pid)
            self._hand_over()
            return successor
        finally:
            self._lock.release()

    def _stage(self, release: ReleaseRecord) -> Path:
        target = self._config.data_dir / "releases" / f"{release.version}-{release.sha256[:12]}.pyz"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp")
            shutil.copyfile(self._store.path(release.sha256), tmp)
            actual, _ = file_sha256(tmp)
            if actual != release.sha256:
                tmp.unlink()
                raise TakeoverFailed(
                    f"the stored artifact of {release.version} is corrupt (sha256 {actual}, "
                    f"expected {release.sha256}): publish the release again"
                )
            tmp.replace(target)
        return target

    def _argv(self, artifact: Path) -> list[str]:
        c = self._config
        argv = [
            sys.executable, str(artifact), "controller-svc", "serve",
            "--listen", str(c.listen),
            "--data-dir", str(c.data_dir),
            "--command-deadline", str(c.command_deadline_s),
            "--feed-interval", str(c.feed_interval_s),
        ]  # fmt: skip
        if c.release_feed:
            argv += ["--release-feed", c.release_feed]
        if not c.self_upgrade:
            argv.append("--no-self-upgrade")
        return argv

    def _secrets(self) -> dict[str, str]:
        return {cfg.ENV_DB_URL: self._config.db_url, cfg.ENV_AMQP_URL: self._config.bus.url}


def record_release(data_dir: Path, release_version: str, artifact: Path) -> None:
    pointer = data_dir / POINTER
    tmp = pointer.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": release_version, "artifact": str(artifact)}))
    tmp.replace(pointer)


def exec_recorded_release(data_dir: Path, argv: list[str]) -> None:
    """A controller started from an older installed package runs the release its last
    self-upgrade staged instead, so a restart never silently downgrades it."""
    try:
        recorded = json.loads((data_dir / POINTER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return
    artifact = Path(recorded["artifact"])
    if recorded["version"] == version.current() or not artifact.is_file():
        return
    log.info("exec_staged_release", version=recorded["version"], artifact=str(artifact))
    os.execv(sys.executable, [sys.executable, str(artifact), "controller-svc", *argv])
