"""A real gateway process refuses what the release key and the command key did not sign,
following TUF's threat model, and changes nothing when it does.

The gateway runs from the installed package (1.0.0) on a test's own vhost; the product's
artifact service serves the artifacts and the TUF repository the controller would host
(``tests.support.gateway_upgrades``). Each attack is tried as an attacker who can publish
on the broker, or who stole the controller's online keys, would try it. After each, the
gateway still serves from the same process, nothing is staged, its recorded release is
the same, and a refusal is reported where the issue says so.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import Metadata, MetaFile, Snapshot, TargetFile, Targets, Timestamp

from controller_svc.signing import Trust
from gateway_daemon.state import AgentState
from hitless.bus import topology
from hitless.digest import file_sha256
from hitless.trust import keys, release
from hitless.v1 import bus_pb2
from tests.support import releases
from tests.support.gateway_upgrades import GatewayUpgrades, state_name
from tests.support.procs import Procs, command, free_port
from tests.support.rabbit import amqp_url
from tests.support.stamped import stamped
from tests.support.trust import signed
from tests.support.tunnel_gateway import GATEWAY_ID, TunnelGateway, start_gateway
from tests.support.wait import wait_for

INSTALLED = "1.0.0"


@dataclass
class Gateway:
    proc: TunnelGateway
    state_dir: Path

    def snapshot(self) -> dict[str, Any]:
        """What an accepted upgrade would change: the serving process, the staged and
        downloaded files, and the release the gateway records as the one it runs."""
        recorded = (
            json.loads((self.state_dir / "agent.json").read_text())
            if (self.state_dir / "agent.json").exists()
            else {}
        )
        return {
            "pid": self.proc.serving_pid(),
            "serving": len(self.proc.events("gateway_serving")),
            "releases": sorted(p.name for p in (self.state_dir / "releases").iterdir()),
            "downloads": sorted(
                p.name for p in (self.state_dir / "downloads").iterdir() if p.stat().st_size
            ),
            "current": recorded.get("current"),
        }


@pytest.fixture
def gateway(vhost: str, tmp_path: Path, procs: Procs, upgrades: GatewayUpgrades) -> Gateway:
    proc = start_gateway(
        procs, tmp_path, amqp_url=amqp_url(vhost), upgrades=upgrades,
        udp_tunnels=1, tcp_tunnels=0,
    )  # fmt: skip
    return Gateway(proc, tmp_path / "state")


def artifact(tmp_path: Path, version: str, stamp: str | None = None) -> Path:
    """An artifact stamped ``stamp`` (default ``version``): enough for every check before
    a swap."""
    path = tmp_path / f"artifact-{version}-{stamp or version}.pyz"
    path.write_bytes(stamped(stamp or version))
    return path


def signed_release(upgrades: GatewayUpgrades, tmp_path: Path) -> Path:
    """Release 1.2.0's artifact, listed in the signed targets."""
    art = artifact(tmp_path, "1.2.0")
    upgrades.sign("1.2.0", art)
    return art


def refused(upgrades: GatewayUpgrades, count: int = 1) -> bus_pb2.CommandRefused:
    return upgrades.wait_refusal(count)[count - 1]


def release_refused(
    upgrades: GatewayUpgrades,
    gateway: Gateway,
    before: dict[str, Any],
    cmd: bus_pb2.UpgradeCommand,
    *because: str,
    security_event: bool = True,
) -> None:
    """Send ``cmd`` signed; the gateway must end it FAILED with each of ``because`` in the
    reason, report a security event when ``security_event``, and change nothing."""
    upgrades.send(cmd, upgrades.signed_headers(cmd))
    final = upgrades.wait_final(cmd.command_id)
    assert state_name(final) == "FAILED", final
    for part in because:
        assert part in final.error, final.error
    if security_event:
        refusal = refused(upgrades)
        assert (refusal.kind, refusal.command_id) == ("unverified-release", cmd.command_id)
    assert gateway.snapshot() == before


# Commands --------------------------------------------------------------------------------


def test_a_command_without_a_signature_is_refused(
    upgrades: GatewayUpgrades, gateway: Gateway, tmp_path: Path
) -> None:
    before = gateway.snapshot()
    art = signed_release(upgrades, tmp_path)
    cmd = upgrades.command(GATEWAY_ID, "1.2.0", art)
    # What an old controller, or anyone who can publish on hitless.commands, sends.
    upgrades.send(cmd, {topology.ISSUED_AT_HEADER: datetime.now().astimezone().isoformat()})
    refusal = refused(upgrades)
    assert (refusal.kind, refusal.command_id, refusal.gateway_id) == (
        "unsigned",
        cmd.command_id,
        GATEWAY_ID,
    )
    assert refusal.from_version == INSTALLED
    assert "carries no signature" in refusal.reason
    assert upgrades.statuses(cmd.command_id) == []
    assert gateway.snapshot() == before


def test_a_command_signed_by_another_key_is_refused(
    upgrades: GatewayUpgrades, gateway: Gateway, tmp_path: Path
) -> None:
    before = gateway.snapshot()
    art = signed_release(upgrades, tmp_path)
    other = keys.init(tmp_path / "attacker-keys")
    forger = Trust(tmp_path / "attacker-tuf", other.root_json.read_bytes(), other.online)
    cmd = upgrades.command(GATEWAY_ID, "1.2.0", art)
    upgrades.send(cmd, forger.command_headers(cmd, datetime.now().astimezone(),
                                              allow_downgrade=False))  # fmt: skip
    refusal = refused(upgrades)
    assert refusal.kind == "unknown-key"
    forged_keyid = keys.load_signer(other.key("command")).public_key.keyid
    assert forged_keyid in refusal.reason
    assert upgrades.statuses(cmd.command_id) == []
    assert gateway.snapshot() == before


def test_a_command_signed_by_a_retired_command_key_is_refused(
    upgrades: GatewayUpgrades, gateway: Gateway, tmp_path: Path
) -> None:
    art = signed_release(upgrades, tmp_path)
    cmd = upgrades.command(GATEWAY_ID, "1.2.0", art)
    stolen = upgrades.signed_headers(cmd)  # signed before the key is rotated out
    before = gateway.snapshot()
    upgrades.trust.accept_root(keys.rotate(upgrades.keys.dir, ["command"]), None)
    # The gateway still knows only the old root: it learns of the rotation while it
    # verifies the release, and refuses the command then.
    upgrades.send(cmd, stolen)
    final = upgrades.wait_final(cmd.command_id)
    assert state_name(final) == "FAILED"
    assert "which the newest trusted root (version 2) no longer carries" in final.error
    assert refused(upgrades).kind == "unknown-key"
    assert gateway.snapshot() == before


def test_a_command_altered_after_signing_is_refused(
    upgrades: GatewayUpgrades, gateway: Gateway, tmp_path: Path
) -> None:
    before = gateway.snapshot()
    art = signed_release(upgrades, tmp_path)
    cmd = upgrades.command(GATEWAY_ID, "1.2.0", art)
    headers = upgrades.signed_headers(cmd)
    payload = bus_pb2.UpgradeCommand.FromString(
        base64.b64decode(headers[topology.SIGNED_COMMAND_HEADER])
    )
    payload.allow_downgrade = not payload.allow_downgrade
    headers[topology.SIGNED_COMMAND_HEADER] = base64.b64encode(
        payload.SerializeToString(deterministic=True)
    ).decode()
    upgrades.send(cmd, headers)
    refusal = refused(upgrades)
    assert refusal.kind == "bad-signature"
    assert "does not match its bytes" in refusal.reason
    assert gateway.snapshot() == before


def test_a_command_signed_for_another_gateway_is_refused(
    upgrades: GatewayUpgrades, gateway: Gateway, tmp_path: Path
) -> None:
    before = gateway.snapshot()
    art = signed_release(upgrades, tmp_path)
    cmd = upgrades.command("gw-other", "1.2.0", art)
    upgrades.send(cmd, upgrades.signed_headers(cmd), to=GATEWAY_ID)
    refusal = refused(upgrades)
    assert refusal.kind == "misaddressed"
    assert "addressed to gateway 'gw-other'" in refusal.reason
    assert gateway.snapshot() == before


def test_a_command_id_replayed_with_other_content_is_refused(
    upgrades: GatewayUpgrades, gateway: Gateway, tmp_path: Path
) -> None:
    # A command the gateway runs: to the version it already runs.
    first = upgrades.command(GATEWAY_ID, INSTALLED, artifact(tmp_path, INSTALLED))
    upgrades.sign(INSTALLED, artifact(tmp_path, INSTALLED))
    upgrades.send(first, upgrades.signed_headers(first))
    assert state_name(upgrades.wait_final(first.command_id)) == "SUCCEEDED"
    before = gateway.snapshot()

    # The same id, other content, signed all the same (a controller's key misused).
    art = signed_release(upgrades, tmp_path)
    replay = upgrades.command(GATEWAY_ID, "1.2.0", art)
    replay.command_id, replay.job_id = first.command_id, first.job_id
    upgrades.send(replay, upgrades.signed_headers(replay))
    refusal = refused(upgrades)
    assert (refusal.kind, refusal.command_id) == ("replayed", first.command_id)
    assert "taken before with other content" in refusal.reason
    assert gateway.snapshot() == before
    assert upgrades.statuses(first.command_id) == ["SUCCEEDED"]


def test_a_signed_command_past_its_deadline_is_not_run(
    upgrades: GatewayUpgrades, gateway: Gateway, tmp_path: Path
) -> None:
    before = gateway.snapshot()
    art = signed_release(upgrades, tmp_path)
    # An old command played back, signed all the same.
    cmd = upgrades.command(GATEWAY_ID, "1.2.0", art, deadline_s=-60)
    upgrades.send(cmd, upgrades.signed_headers(cmd))
    assert state_name(upgrades.wait_final(cmd.command_id)) == "UNREACHABLE"
    refusal = refused(upgrades)
    assert (refusal.kind, refusal.command_id) == ("expired", cmd.command_id)
    assert gateway.snapshot() == before


def test_the_gateways_state_and_keys_are_private(gateway: Gateway) -> None:
    for private in ("", "releases", "downloads", "trust"):
        mode = (gateway.state_dir / private).stat().st_mode & 0o777
        assert mode == 0o700, f"{gateway.state_dir / private} is {mode:o}"
    assert (gateway.state_dir / "trust" / "root.json").stat().st_mode & 0o777 == 0o600


def test_a_downgrade_needs_a_signed_command_that_allows_it(
    upgrades: GatewayUpgrades, gateway: Gateway, tmp_path: Path
) -> None:
    before = gateway.snapshot()
    art = artifact(tmp_path, "0.9.0")
    upgrades.sign("0.9.0", art)
    cmd = upgrades.command(GATEWAY_ID, "0.9.0", art)
    headers = upgrades.signed_headers(cmd, allow_downgrade=False)
    # The plain header says yes; only the signed copy counts.
    headers[topology.ALLOW_DOWNGRADE_HEADER] = True
    upgrades.send(cmd, headers)
    final = upgrades.wait_final(cmd.command_id)
    assert state_name(final) == "FAILED"
    assert "did not allow a downgrade" in final.error
    assert gateway.snapshot() == before


# Releases --------------------------------------------------------------------------------


def test_a_release_no_signed_targets_list_is_refused(
    upgrades: GatewayUpgrades, gateway: Gateway, tmp_path: Path
) -> None:
    before = gateway.snapshot()
    upgrades.sign("1.1.0", artifact(tmp_path, "1.1.0"))  # metadata exists, without 1.2.0
    cmd = upgrades.command(GATEWAY_ID, "1.2.0", artifact(tmp_path, "1.2.0"))
    release_refused(
        upgrades, gateway, before, cmd, "'hitless-1.2.0.pyz' is not in the signed targets"
    )


def test_a_yanked_release_is_refused(
    upgrades: GatewayUpgrades, gateway: Gateway, tmp_path: Path
) -> None:
    before = gateway.snapshot()
    art = signed_release(upgrades, tmp_path)
    upgrades.yank("1.2.0")
    cmd = upgrades.command(GATEWAY_ID, "1.2.0", art)
    release_refused(upgrades, gateway, before, cmd, "it was yanked")


def test_an_artifact_larger_than_its_signed_length_is_not_taken(
    upgrades: GatewayUpgrades, gateway: Gateway, tmp_path: Path
) -> None:
    before = gateway.snapshot()
    art = signed_release(upgrades, tmp_path)
    sha, size = file_sha256(art)
    # Endless data: the file the controller serves under that digest grows.
    stored = tmp_path / "store" / sha[:2] / sha
    stored.write_bytes(stored.read_bytes() + b"\0" * 1_000_000)
    cmd = upgrades.command(GATEWAY_ID, "1.2.0", art)
    cmd.artifact_size = size + 1_000_000  # the command may say anything
    release_refused(
        upgrades, gateway, before, cmd, f"its signed length is {size}", security_event=False
    )
    part = gateway.state_dir / "downloads" / f"{sha}.pyz.part"
    assert not part.exists() or part.stat().st_size <= size


# Metadata an attacker with the controller's online keys (or its disk) serves ------------


def _files(repo: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in repo.iterdir() if p.is_file()}


def _newest(repo: Path, role: str) -> int:
    return max(int(p.name.split(".")[0]) for p in repo.glob(f"[0-9]*.{role}.json"))


def _timestamp_version(repo: Path) -> int:
    return Metadata[Timestamp].from_bytes((repo / "timestamp.json").read_bytes()).signed.version


def _publish_forged(
    upgrades: GatewayUpgrades,
    targets: bytes,
    *,
    expires: datetime | None = None,
    snapshot_hash_of: bytes | None = None,
) -> None:
    """Write ``targets`` as the next version with a snapshot and timestamp signed by the
    (stolen) online keys; ``expires`` for the timestamp, ``snapshot_hash_of`` to make the
    timestamp name other bytes than the snapshot it points at."""
    repo = upgrades.trust.repo_dir
    now = keys.utcnow()
    targets_version = Metadata[Targets].from_bytes(targets).signed.version
    (repo / f"{targets_version}.targets.json").write_bytes(targets)
    snapshot_version = _newest(repo, "snapshot") + 1
    snap = signed(
        Snapshot(
            version=snapshot_version,
            expires=now + timedelta(days=7),
            meta={"targets.json": MetaFile.from_data(targets_version, targets, ["sha256"])},
        ),
        keys.load_signer(upgrades.keys.key("snapshot")),
    )
    (repo / f"{snapshot_version}.snapshot.json").write_bytes(snap)
    ts = Timestamp(
        version=_timestamp_version(repo) + 1,
        expires=expires or now + timedelta(days=1),
        snapshot_meta=MetaFile.from_data(snapshot_version, snapshot_hash_of or snap, ["sha256"]),
    )
    timestamp = signed(ts, keys.load_signer(upgrades.keys.key("timestamp")))
    (repo / "timestamp.json").write_bytes(timestamp)


def _command(tmp_path: Path, upgrades: GatewayUpgrades, version: str) -> bus_pb2.UpgradeCommand:
    return upgrades.command(GATEWAY_ID, version, artifact(tmp_path, version))


def test_targets_signed_by_a_key_root_does_not_delegate_to_are_refused(
    upgrades: GatewayUpgrades, gateway: Gateway, tmp_path: Path
) -> None:
    upgrades.sign("1.1.0", artifact(tmp_path, "1.1.0"))
    before = gateway.snapshot()
    other = keys.init(tmp_path / "attacker-keys")
    current, _ = upgrades.trust.targets()
    forged = Metadata[Targets].from_bytes(current).signed
    forged.version += 1
    art = artifact(tmp_path, "1.2.0")
    forged.targets[release.target_name("1.2.0")] = TargetFile.from_file(
        release.target_name("1.2.0"), str(art), ["sha256"]
    )
    upgrades.store(art)
    _publish_forged(upgrades, signed(forged, keys.load_signer(other.key("targets"))))
    release_refused(
        upgrades, gateway, before, _command(tmp_path, upgrades, "1.2.0"),
        "targets version 2 refused", keys.load_signer(other.key("targets")).public_key.keyid,
    )  # fmt: skip


def test_older_metadata_replayed_is_refused(
    upgrades: GatewayUpgrades, gateway: Gateway, tmp_path: Path
) -> None:
    repo = upgrades.trust.repo_dir
    upgrades.sign("1.1.0", artifact(tmp_path, "1.1.0"))
    old = _files(repo)
    upgrades.sign("1.2.0", artifact(tmp_path, "1.2.0", stamp="1.2.1"))
    # The gateway trusts the newer metadata (the artifact's stamp then refuses it).
    before = gateway.snapshot()
    first = upgrades.command(GATEWAY_ID, "1.2.0", artifact(tmp_path, "1.2.0", stamp="1.2.1"))
    release_refused(
        upgrades, gateway, before, first, "carries the stamp '1.2.1'", security_event=False
    )
    (repo / "timestamp.json").write_bytes(old["timestamp.json"])  # rollback attack
    release_refused(
        upgrades, gateway, before, _command(tmp_path, upgrades, "1.1.0"),
        "timestamp version", "older than metadata already trusted",
    )  # fmt: skip


def test_an_expired_timestamp_is_refused(
    upgrades: GatewayUpgrades, gateway: Gateway, tmp_path: Path
) -> None:
    upgrades.sign("1.2.0", artifact(tmp_path, "1.2.0"))
    before = gateway.snapshot()
    current, _ = upgrades.trust.targets()
    # Indefinite freeze: the attacker keeps serving what expired.
    expired = Metadata[Targets].from_bytes(current).signed
    expired.version += 1
    _publish_forged(
        upgrades,
        signed(expired, keys.load_signer(upgrades.keys.key("targets"))),
        expires=keys.utcnow() - timedelta(hours=1),
    )
    release_refused(
        upgrades, gateway, before, _command(tmp_path, upgrades, "1.2.0"),
        "timestamp metadata is expired",
    )  # fmt: skip


def test_metadata_from_different_snapshots_is_refused(
    upgrades: GatewayUpgrades, gateway: Gateway, tmp_path: Path
) -> None:
    upgrades.sign("1.2.0", artifact(tmp_path, "1.2.0"))
    before = gateway.snapshot()
    repo = upgrades.trust.repo_dir
    older_snapshot = (repo / f"{_newest(repo, 'snapshot')}.snapshot.json").read_bytes()
    current, _ = upgrades.trust.targets()
    nxt = Metadata[Targets].from_bytes(current).signed
    nxt.version += 1
    # Mix-and-match: the timestamp vouches for other snapshot bytes than those served.
    _publish_forged(
        upgrades,
        signed(nxt, keys.load_signer(upgrades.keys.key("targets"))),
        snapshot_hash_of=older_snapshot,
    )
    release_refused(
        upgrades, gateway, before, _command(tmp_path, upgrades, "1.2.0"), "mix-and-match"
    )


# On the gateway's disk -------------------------------------------------------------------


def _greeting(port: int) -> str:
    def read() -> str | None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                return sock.recv(256).decode().strip()
        except OSError:
            return None

    return wait_for(read, timeout=20, what=f"a gateway greeting on port {port}")


def test_a_staged_release_altered_on_disk_is_not_run(
    vhost: str, tmp_path: Path, procs: Procs, upgrades: GatewayUpgrades
) -> None:
    built = releases.build("1.2.0", tmp_path / "b.pyz")
    state = AgentState(tmp_path / "gw")
    staged = state.releases_dir / "1.2.0-staged.pyz"
    shutil.copyfile(built, staged)
    state.set_current_release("1.2.0", staged, file_sha256(staged)[0])
    port = free_port()
    argv = [
        command("gateway-daemon"), "run", "--id", "gw-disk",
        "--amqp", amqp_url(vhost),
        "--state-dir", str(state.dir), "--listen", f"127.0.0.1:{port}",
        *upgrades.provision("gw-disk", state.dir),
    ]  # fmt: skip

    # As staged: a restart runs the staged release.
    proc = procs.start("gw-disk", argv)
    assert _greeting(port) == "hitless-gateway gw-disk 1.2.0"
    procs.stop(proc)

    # Altered after it was verified: the installed package starts instead, and says why.
    staged.write_bytes(staged.read_bytes() + b"\n# altered\n")
    proc = procs.start("gw-disk-2", argv)
    assert _greeting(port) == f"hitless-gateway gw-disk {INSTALLED}"
    assert "staged_release_refused" in proc.log()
    assert "altered on disk" in proc.log()
