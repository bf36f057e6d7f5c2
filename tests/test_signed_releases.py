"""Signed releases through the whole product: upgradectl signs where the release is built,
the real controller takes only what the targets key signed, yanking stops a release
everywhere, a rotated targets key reaches gateways without re-provisioning, and a forged
command on the broker becomes a security event for the admins; a controller restart runs a
staged release only while it is the file that was verified."""

from __future__ import annotations

import base64
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from controller_svc.selfupgrade import record_release
from controller_svc.signing import Trust
from hitless.bus import codec, topology
from hitless.digest import file_sha256
from hitless.trust import keys
from hitless.v1 import bus_pb2, controller_pb2
from tests.support.fleet import Fleet
from tests.support.rabbit import Management
from tests.support.stamped import stamped
from tests.support.wait import wait_for

BASE = "1.0.0"
REJECTED = 4


def _stored(fleet: Fleet) -> list[str]:
    """The artifact files the controller keeps."""
    store = fleet.data_dir / "artifacts"
    return sorted(p.name for p in store.glob("??/*"))


def _releases(fleet: Fleet) -> dict[str, dict[str, object]]:
    return {r["version"]: r for r in fleet.cli_json("releases", "list")}


def test_a_release_without_signed_metadata_is_refused_and_nothing_is_stored(
    fleet: Fleet, tmp_path: Path
) -> None:
    artifact = tmp_path / "a.pyz"
    artifact.write_bytes(stamped("1.1.0"))
    before = (_releases(fleet), _stored(fleet))
    result = fleet.cli(
        "releases", "publish", "--version", "1.1.0", "--artifact", str(artifact), check=False
    )
    assert result.returncode == REJECTED, result.stderr
    assert "without signed targets metadata" in result.stderr
    assert "--keys" in result.stderr
    assert (_releases(fleet), _stored(fleet)) == before


def test_a_release_signed_by_a_key_root_does_not_name_is_refused(
    fleet: Fleet, tmp_path: Path
) -> None:
    artifact = tmp_path / "a.pyz"
    artifact.write_bytes(stamped("1.1.0"))
    other = keys.init(tmp_path / "other-keys")
    before = (_releases(fleet), _stored(fleet))
    result = fleet.cli(
        "releases", "publish", "--version", "1.1.0", "--artifact", str(artifact),
        "--keys", str(other.dir), check=False,
    )  # fmt: skip
    assert result.returncode == REJECTED, result.stderr
    assert keys.load_signer(other.key("targets")).public_key.keyid in result.stderr
    assert (_releases(fleet), _stored(fleet)) == before


def test_signed_releases_are_listed_as_signed_and_a_yanked_one_is_refused_everywhere(
    fleet: Fleet,
) -> None:
    fleet.start_gateway("gw-1")
    fleet.wait_gateways({"gw-1": BASE})
    fleet.release("1.1.0")
    fleet.release("1.2.0")
    listed = _releases(fleet)
    assert listed["1.1.0"]["signing"] == listed["1.2.0"]["signing"] == "SIGNED"

    fleet.cli("releases", "yank", "1.2.0", "--keys", str(fleet.keys.dir), "--yes")
    listed = _releases(fleet)
    assert (listed["1.1.0"]["signing"], listed["1.2.0"]["signing"]) == ("SIGNED", "YANKED")

    # Naming it: refused before any command goes out.
    result = fleet.cli("upgrade", "--version", "1.2.0", "--yes", check=False)
    assert result.returncode == REJECTED, result.stderr
    assert "release 1.2.0 was yanked" in result.stderr
    # "The latest" is the newest release still signed.
    job = json.loads(fleet.cli("upgrade", "--latest", "--yes", "--wait", "--json").stdout)
    assert job["target_version"] == "1.1.0"
    fleet.wait_gateways({"gw-1": "1.1.0"})


def test_a_rotated_targets_key_reaches_gateways_without_re_provisioning(fleet: Fleet) -> None:
    fleet.start_gateway("gw-1")
    fleet.wait_gateways({"gw-1": BASE})
    fleet.release("1.1.0")
    old_targets_key = keys.load_signer(fleet.keys.key("targets")).public_key.keyid

    fleet.cli("keys", "rotate", "--dir", str(fleet.keys.dir), "--roles", "targets")
    assert keys.load_signer(fleet.keys.key("targets")).public_key.keyid != old_targets_key
    fleet.release("1.2.0")  # signed with the new targets key only
    assert _releases(fleet)["1.1.0"]["signing"] == "SIGNED"  # re-signed with the rotation

    fleet.cli("upgrade", "--version", "1.2.0", "--yes", "--wait")
    fleet.wait_gateways({"gw-1": "1.2.0"})


def test_a_forged_command_on_the_broker_is_a_security_event(
    fleet: Fleet, tmp_path: Path, vhost: str
) -> None:
    fleet.start_gateway("gw-1")
    fleet.wait_gateways({"gw-1": BASE})
    fleet.release("1.1.0")
    other = keys.init(tmp_path / "attacker-keys")
    forger = Trust(tmp_path / "attacker-tuf", other.root_json.read_bytes(), other.online)
    command = bus_pb2.UpgradeCommand(
        command_id="forged-1", job_id="forged-job", gateway_id="gw-1", target_version="1.1.0"
    )
    command.deadline.FromDatetime(datetime(2099, 1, 1, tzinfo=UTC))
    headers = forger.command_headers(command, datetime.now(UTC), allow_downgrade=True)
    # Anyone who can publish on hitless.commands, here from the management HTTP API.
    management = Management()
    assert management.publish(
        vhost, topology.COMMANDS.name, topology.command_key("gw-1"),
        codec.encode(command).decode(), headers=headers, message_id="forged-1",
    )  # fmt: skip

    def refusal_event() -> bus_pb2.Event | None:
        for message in management.get_messages(vhost, topology.NOTIFIER_EVENTS.name):
            event = codec.decode(bus_pb2.Event, message["payload"].encode())
            if event.WhichOneof("kind") == "command_refused":
                return event
        return None

    event = wait_for(refusal_event, timeout=30, what="the security event for the admins")
    refused = event.command_refused
    assert (refused.gateway_id, refused.kind, refused.command_id) == (
        "gw-1",
        "unknown-key",
        "forged-1",
    )
    assert fleet.gateways()["gw-1"]["version"] == BASE
    assert fleet.greeting("gw-1") == f"hitless-gateway gw-1 {BASE}"


def test_a_staged_controller_release_altered_on_disk_is_not_run(
    fleet: Fleet, tmp_path: Path
) -> None:
    built = tmp_path / "hitless-1.2.0.pyz"
    fleet.cli("releases", "build", "--version", "1.2.0", "-o", str(built))
    staged = fleet.data_dir / "releases" / "1.2.0-staged.pyz"
    staged.parent.mkdir(exist_ok=True)
    shutil.copyfile(built, staged)
    assert fleet.controller is not None
    fleet.procs.stop(fleet.controller)
    record_release(fleet.data_dir, "1.2.0", staged, file_sha256(staged)[0])

    # As staged: a restarted controller runs the release its last upgrade staged.
    fleet.start_controller()
    info = fleet.stub().GetController(controller_pb2.GetControllerRequest(), timeout=10)
    assert info.version == "1.2.0"
    assert fleet.controller is not None
    fleet.procs.stop(fleet.controller)

    # Altered since: the installed version starts instead, and says why.
    staged.write_bytes(staged.read_bytes() + b"\n# altered\n")
    proc = fleet.start_controller()
    info = fleet.stub().GetController(controller_pb2.GetControllerRequest(), timeout=10)
    assert info.version == BASE
    assert "staged_release_refused" in proc.log()
    assert "altered on disk" in proc.log()


def test_signing_on_top_of_a_rolled_back_repository_is_refused(
    fleet: Fleet, tmp_path: Path
) -> None:
    fleet.release("1.1.0")
    backup = tmp_path / "tuf-backup"
    shutil.copytree(fleet.data_dir / "tuf", backup)
    fleet.release("1.2.0")
    fleet.cli("releases", "yank", "1.2.0", "--keys", str(fleet.keys.dir), "--yes")
    taken = (fleet.keys.dir / "targets.json").read_bytes()

    # The controller's repository restored from before the yank (a backup, or someone
    # holding its online keys): it serves targets version 1 again.
    assert fleet.controller is not None
    fleet.procs.stop(fleet.controller)
    shutil.rmtree(fleet.data_dir / "tuf")
    shutil.copytree(backup, fleet.data_dir / "tuf")
    fleet.start_controller()

    artifact = tmp_path / "c.pyz"
    fleet.cli("releases", "build", "--version", "1.3.0", "-o", str(artifact))
    publish = ("releases", "publish", "--version", "1.3.0", "--artifact", str(artifact))
    result = fleet.cli(*publish, "--keys", str(fleet.keys.dir), check=False)
    assert result.returncode == REJECTED, result.stderr
    assert "serves targets version 1, but it took version 3" in result.stderr
    assert "Nothing was signed" in result.stderr
    assert (fleet.keys.dir / "targets.json").read_bytes() == taken
    assert "1.3.0" not in _releases(fleet)

    # The release manager decides to go on from what the controller serves.
    (fleet.keys.dir / "targets.json").rename(tmp_path / "targets-seen.json")
    fleet.cli(*publish, "--keys", str(fleet.keys.dir))
    assert _releases(fleet)["1.3.0"]["signing"] == "SIGNED"


def test_publishing_a_release_again_signs_nothing_new_and_later_publishes_go_on(
    fleet: Fleet, tmp_path: Path
) -> None:
    """The same publish run twice (a retry after a lost answer, as the README advises):
    the controller takes no new targets for a release it lists, so the key directory must
    not remember a version the controller never took, or every later publish is refused
    as a rollback."""
    artifact = tmp_path / "r.pyz"
    fleet.cli("releases", "build", "--version", "1.1.0", "-o", str(artifact))
    publish = ("releases", "publish", "--version", "1.1.0", "--artifact", str(artifact))
    fleet.cli(*publish, "--keys", str(fleet.keys.dir))
    taken = (fleet.keys.dir / "targets.json").read_bytes()

    again = fleet.cli(*publish, "--keys", str(fleet.keys.dir))
    assert "already: targets version 1 lists" in again.stdout, again.stdout
    assert "nothing new was signed" in again.stdout
    assert (fleet.keys.dir / "targets.json").read_bytes() == taken
    served = fleet.stub().GetTargetsMetadata(controller_pb2.GetTargetsMetadataRequest(), timeout=30)
    assert served.version == 1

    fleet.release("1.2.0")
    assert _releases(fleet)["1.2.0"]["signing"] == "SIGNED"
    assert json.loads((fleet.keys.dir / "targets.json").read_bytes())["signed"]["version"] == 2


def test_a_command_altered_on_its_way_fails_its_gateway_with_the_reason(
    fleet: Fleet, vhost: str
) -> None:
    """The controller's own command, its signed copy altered in the gateway's queue: the
    gateway refuses it (a security event) and status shows that gateway FAILED with why,
    instead of a job waiting for its deadline."""
    gateway = fleet.start_gateway("gw-1")
    fleet.wait_gateways({"gw-1": BASE})
    fleet.procs.stop(gateway)
    fleet.release("1.1.0")
    job_id = fleet.cli_json("upgrade", "--version", "1.1.0", "--yes", "--no-precheck")["job_id"]
    management = Management()
    queue = topology.gateway_queue("gw-1").name
    taken = wait_for(
        lambda: management.request(
            "POST",
            f"/queues/{quote(vhost, safe='')}/{quote(queue, safe='')}/get",
            {"count": 1, "ackmode": "ack_requeue_false", "encoding": "auto"},
        ),
        timeout=30,
        what="the controller's command in gw-1's queue",
    )
    (message,) = taken
    headers = dict(message["properties"]["headers"])
    signed = bus_pb2.UpgradeCommand.FromString(
        base64.b64decode(headers[topology.SIGNED_COMMAND_HEADER])
    )
    signed.target_version = "9.9.9"
    headers[topology.SIGNED_COMMAND_HEADER] = base64.b64encode(
        signed.SerializeToString(deterministic=True)
    ).decode()
    assert management.publish(
        vhost, topology.COMMANDS.name, topology.command_key("gw-1"), message["payload"],
        headers=headers, message_id=message["properties"]["message_id"],
    )  # fmt: skip

    fleet.start_gateway("gw-1")
    done = wait_for(
        lambda: (s := fleet.cli_json("status", job_id))["state"] == "FAILED" and s,
        timeout=60,
        what="the job to end with the refusal",
    )
    (row,) = done["gateways"]
    assert row["state"] == "FAILED"
    assert row["error"].startswith("the gateway refused the command (bad-signature): "), row
    fleet.wait_gateways({"gw-1": BASE})
