"""The controller moving itself to a release, inline, without going down.

The release's artifact (which carries the controller's code too) is verified against the
signed metadata the way a gateway verifies it (``Trust.verify_staged``), staged under the
data directory and started beside this process (``takeover``); once it serves, this
process is told to hand over: it stops taking calls, finishes those in flight and exits.
The staged release is recorded with its sha256, so a controller restarted later runs it
(after hashing it again) and not an older installed version. Secrets (database and broker
URLs) travel in the environment, not on the command line.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from controller_svc.errors import FailedPrecondition
from controller_svc.records import ReleaseRecord
from controller_svc.signing import Trust
from controller_svc.store import ArtifactStore
from controller_svc.takeover import Successor, TakeoverFailed, start_successor
from hitless import config as cfg
from hitless import logs, semver, staged, version
from hitless.private import private_dir

log = logs.get(__name__)

POINTER = "controller-release.json"

Spawn = Callable[[Sequence[str], Mapping[str, str]], Successor]


class ControllerUpgrader:
    def __init__(
        self,
        config: cfg.ControllerConfig,
        store: ArtifactStore,
        trust: Trust,
        hand_over: Callable[[], None],
        spawn: Spawn = start_successor,
        *,
        http: cfg.HostPort | None = None,
    ) -> None:
        self._config = config
        self._http = http  # the web console's address, which the next version serves too
        self._store = store
        self._trust = trust
        self._hand_over = hand_over
        self._spawn = spawn
        self._lock = threading.Lock()

    def needed(self, release: ReleaseRecord) -> bool:
        return release.version != version.current()

    def check_path(self, release: ReleaseRecord) -> None:
        """Raise FailedPrecondition when ``release`` upgrades only from a version above
        the one this controller runs (its ``min_from``): the controller moves in one step,
        so it must be moved to a release in between first (an upgrade of the fleet to
        that release moves it there)."""
        running = version.current()
        if not release.min_from or not semver.is_valid(running):
            return
        if semver.parse(running) < semver.parse(release.min_from):
            raise FailedPrecondition(
                f"the controller runs {running}, and release {release.version} upgrades only "
                f"from {release.min_from} on: upgrade to {release.min_from} (or a later "
                f"release below {release.version}) first, then to {release.version}"
            )

    def upgrade_to(self, release: ReleaseRecord) -> Successor:
        """Start ``release``'s controller; return it once it serves (then this one hands
        over). TakeoverFailed leaves this controller in charge."""
        self.check_path(release)
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
            record_release(self._config.data_dir, release.version, staged, release.sha256)
            log.info("controller_handing_over", version=successor.version, pid=successor.pid)
            self._hand_over()
            return successor
        finally:
            self._lock.release()

    def _stage(self, release: ReleaseRecord) -> Path:
        """Copy the release's artifact under data_dir/releases (0700) once it verifies
        against the signed metadata; a copy already there is verified again."""
        target = self._config.data_dir / "releases" / f"{release.version}-{release.sha256[:12]}.pyz"
        private_dir(target.parent)
        tmp = target.with_suffix(".tmp")
        shutil.copyfile(target if target.exists() else self._store.path(release.sha256), tmp)
        try:
            self._trust.verify_staged(release, tmp)
        except FailedPrecondition as exc:
            tmp.unlink()
            raise TakeoverFailed(f"the controller did not stage {release.version}: {exc}") from exc
        tmp.replace(target)
        return target

    def _argv(self, artifact: Path) -> list[str]:
        c = self._config
        argv = [
            *staged.release_argv(artifact, "controller-svc"), "serve",
            "--listen", str(c.listen),
            "--gateway-listen", str(c.gateway_address),
            "--broker-user-prefix", c.broker_user_prefix,
            "--data-dir", str(c.data_dir),
            "--command-deadline", str(c.command_deadline_s),
            "--feed-interval", str(c.feed_interval_s),
        ]  # fmt: skip
        if c.trust_root is not None:
            argv += ["--trust-root", str(c.trust_root)]
        if c.online_keys is not None:
            argv += ["--online-keys", str(c.online_keys)]
        if c.release_feed:
            argv += ["--release-feed", c.release_feed]
        if not c.self_upgrade:
            argv.append("--no-self-upgrade")
        for name in c.tls_names:
            argv += ["--tls-name", name]
        return argv

    def _secrets(self) -> dict[str, str]:
        secrets = {cfg.ENV_DB_URL: self._config.db_url, cfg.ENV_AMQP_URL: self._config.bus.url}
        if self._config.broker_api:
            secrets[cfg.ENV_BROKER_API] = self._config.broker_api
        # In the environment, not a flag: a version from before the console ignores it.
        secrets[cfg.ENV_HTTP_LISTEN] = str(self._http) if self._http is not None else "off"
        return secrets


def record_release(data_dir: Path, release_version: str, artifact: Path, sha256: str) -> None:
    """Record the staged release a restart runs: its version, file and sha256."""
    pointer = data_dir / POINTER
    tmp = pointer.with_suffix(".tmp")
    tmp.write_text(
        json.dumps({"version": release_version, "artifact": str(artifact), "sha256": sha256})
    )
    tmp.replace(pointer)


def exec_recorded_release(data_dir: Path, argv: list[str]) -> None:
    """A controller started from an older installed package runs the release its last
    self-upgrade staged instead, so a restart never silently downgrades it. The file is
    hashed first (``staged.check``): one altered on disk is not run, and this installed
    version starts instead."""
    try:
        recorded = json.loads((data_dir / POINTER).read_text())
        artifact = Path(recorded["artifact"])
        recorded_version = str(recorded["version"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if not isinstance(exc, FileNotFoundError):
            log.error("staged_release_refused", pointer=str(data_dir / POINTER), reason=str(exc))
        return
    if recorded_version == version.current() or not artifact.is_file():
        return
    staged.exec_release(recorded_version, artifact, recorded.get("sha256"), "controller-svc", argv)
