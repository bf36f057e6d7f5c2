"""One bad input stops nothing for anyone else, on a real controller, broker and gateways:
a forged announcement, a gateway id the broker cannot carry, a job the broker will not
take back under the controller's login, an artifact that is another version."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from controller_svc import db
from controller_svc.repository import Repository
from controller_svc.signing import Trust
from controller_svc.store import ArtifactStore
from hitless.bus import topology
from hitless.bus.topology import REPORTS
from hitless.config import BusConfig, ControllerConfig, HostPort
from hitless.digest import file_sha256
from hitless.errors import ConfigError
from hitless.trust import release
from hitless.v1 import controller_pb2
from tests.support.fleet import Fleet
from tests.support.rabbit import Management
from tests.support.wait import wait_for

BASE = "1.0.0"
LONG_ID = "x" * 250


def _repository(fleet: Fleet) -> Repository:
    """The controller's own database, as an earlier controller version left it."""
    return Repository(db.make_engine(f"sqlite:///{fleet.data_dir / 'controller.db'}"))


def _dead_letters(rabbit: Management, vhost: str) -> list[dict[str, object]]:
    return rabbit.get_messages(vhost, topology.DEAD_LETTERS.name, count=100)


def test_forged_announcements_are_dead_lettered_and_the_gateway_named_is_untouched(
    fleet: Fleet, rabbit: Management, vhost: str
) -> None:
    """Announcements not sent by the gateway they name: from a user that is no gateway's
    (even naming a real gateway, or ids the bus cannot carry), and from one gateway's user
    naming another in the body. Then a gateway's own user with values out of range."""
    fleet.start_gateway("gw-1")
    fleet.wait_gateways({"gw-1": BASE})
    before = fleet.gateways()["gw-1"]
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    forged = (("gw-1", "as-gw-1"), (LONG_ID, "long"), ("gw.1", "dotted"), ("gw-é", "accented"))
    for gid, message_id in forged:
        body = json.dumps({"gateway_id": gid, "version": "9.9.9", "at": now})
        assert rabbit.publish(
            vhost, "hitless.reports", "gateway.gw-1.hello", body, message_id=message_id
        )
    with fleet.as_gateway("gw-a") as publisher:
        other = {"gateway_id": "gw-1", "version": "9.9.9", "at": now}
        publisher.publish(
            REPORTS, "gateway.gw-a.hello", json.dumps(other).encode(), message_id="body"
        )
    with fleet.as_gateway("gw-v") as publisher:
        version = {"gateway_id": "gw-v", "version": "1." * 40 + "0", "at": now}
        publisher.publish(
            REPORTS, "gateway.gw-v.hello", json.dumps(version).encode(), message_id="v"
        )
    with fleet.as_gateway("gw-n") as publisher:
        negative = {"gateway_id": "gw-n", "version": BASE, "at": now, "vpn_sessions": -5}
        publisher.publish(
            REPORTS, "gateway.gw-n.heartbeat", json.dumps(negative).encode(), message_id="negative"
        )

    def reasons() -> dict[str, str] | None:
        found = {
            m["properties"]["message_id"]: m["properties"]["headers"][topology.REASON_HEADER]
            for m in _dead_letters(rabbit, vhost)
        }
        return found if len(found) == 7 else None

    found = wait_for(reasons, timeout=15, what="seven refused announcements dead-lettered")
    for message_id in ("as-gw-1", "long", "dotted", "accented"):
        assert (
            "published by broker user (no user_id), which is no gateway's user" in found[message_id]
        ), found
    assert "gateway gw-a's broker user sent a hello naming gateway 'gw-1'" in found["body"]
    assert "is not MAJOR.MINOR.PATCH" in found["v"]
    assert "-5 VPN sessions is outside 0 to 1000000" in found["negative"]
    assert list(fleet.gateways()) == ["gw-1"], "nothing refused may be recorded"
    assert fleet.gateways()["gw-1"]["version"] == before["version"] == BASE


def test_a_gateway_the_broker_cannot_address_fails_alone(
    fleet: Fleet, rabbit: Management, vhost: str
) -> None:
    """A gateway recorded before ids were checked: its command cannot be sent. The job
    still runs for everyone else, says why that one FAILED, and keeps its command."""
    fleet.start_gateway("gw-1")
    fleet.wait_gateways({"gw-1": BASE})
    _repository(fleet).record_gateway_seen(LONG_ID, BASE, datetime.now(UTC))
    fleet.release("1.1.0")

    result = fleet.cli("upgrade", "--latest", "--yes", "--wait", "--json", check=False)
    assert result.returncode == 1, result.stderr  # the job ended without every gateway
    job = json.loads(result.stdout)
    assert job["state"] == "PARTIAL"
    gateways = {g["id"]: g for g in job["gateways"]}
    assert gateways["gw-1"]["state"] == "SUCCEEDED"
    bad = gateways[LONG_ID]
    assert bad["state"] == "FAILED"
    assert "could not send the command: invalid gateway id" in bad["error"]
    (dead,) = _dead_letters(rabbit, vhost)
    command = json.loads(str(dead["payload"]))
    assert command["gateway_id"] == LONG_ID and command["target_version"] == "1.1.0"
    assert "invalid gateway id" in dead["properties"]["headers"][topology.REASON_HEADER]  # type: ignore[index]

    # A controller restarted on that database serves at once, and jobs go on.
    assert fleet.controller is not None
    fleet.procs.stop(fleet.controller)
    fleet.start_controller()
    fleet.release("1.2.0")
    again = fleet.cli("upgrade", "--latest", "--gateways", "gw-1", "--yes", "--wait", "--json")
    assert json.loads(again.stdout)["state"] == "SUCCEEDED"


@pytest.fixture
def ui_user(rabbit: Management, vhost: str) -> Iterator[Management]:
    """An admin who publishes jobs from the management UI under a broker user of their
    own (not the controller's), removed afterwards."""
    name, password = f"ops-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    rabbit.request("PUT", f"/users/{name}", {"password": password, "tags": "management"})
    rabbit.request(
        "PUT", f"/permissions/{vhost}/{name}", {"configure": ".*", "write": ".*", "read": ".*"}
    )
    try:
        yield Management(user=name, password=password)
    finally:
        rabbit.request("DELETE", f"/users/{name}")


def test_a_refused_management_job_with_user_id_does_not_wedge_the_queue(
    fleet: Fleet, rabbit: Management, vhost: str, ui_user: Management
) -> None:
    fleet.start_gateway("gw-1")
    fleet.wait_gateways({"gw-1": BASE})
    fleet.release("0.9.0")
    user = ui_user.request("GET", "/whoami")["name"]
    fleet.stub().AllowPublisher(controller_pb2.PublisherRequest(user=user), timeout=10)
    downgrade = json.dumps({"action": "upgrade", "version": "0.9.0"})
    assert ui_user.publish(vhost, "hitless.jobs", "upgrade", downgrade, message_id="down",
                           user_id=user)  # fmt: skip

    rejected = wait_for(
        lambda: fleet.cli_json("jobs", "rejected"), timeout=15, what="the downgrade refused"
    )
    assert [(r["message_id"], r["user_id"]) for r in rejected] == [("down", user)]
    assert "a downgrade needs --allow-downgrade" in rejected[0]["reason"]
    (dead,) = wait_for(
        lambda: _dead_letters(rabbit, vhost), timeout=15, what="the refused job dead-lettered"
    )
    assert dead["payload"] == downgrade
    assert dead["properties"]["headers"]["x-hitless-original-user-id"] == user  # type: ignore[index]

    # The next job from the same admin runs.
    fleet.release("1.1.0")
    upgrade = json.dumps({"action": "upgrade", "version": "1.1.0"})
    assert ui_user.publish(vhost, "hitless.jobs", "upgrade", upgrade, message_id="up",
                           user_id=user)  # fmt: skip
    job = wait_for(
        lambda: [j for j in fleet.cli_json("jobs", "list") if j["source"] == "management"],
        timeout=15,
        what="the next job accepted",
    )[0]
    wait_for(
        lambda: fleet.cli_json("status", job["job_id"])["state"] == "SUCCEEDED",
        timeout=60,
        what="the next job to succeed",
    )
    assert rabbit.get_messages(vhost, topology.CONTROLLER_JOBS.name) == []
    assert len(fleet.cli_json("jobs", "rejected")) == 1, "the refused job was handled again"


def test_an_artifact_of_another_version_is_refused_at_publish(fleet: Fleet) -> None:
    artifact = fleet.root / "built-as-1.3.0.pyz"
    fleet.cli("releases", "build", "--version", "1.3.0", "-o", str(artifact))
    result = fleet.cli(
        "releases", "publish", "--version", "7.4.0", "--artifact", str(artifact),
        "--keys", str(fleet.keys.dir), check=False,
    )  # fmt: skip
    assert result.returncode == 4, result.stderr
    assert "the artifact for release 7.4.0 carries the version stamp '1.3.0'" in result.stderr
    assert fleet.cli_json("releases", "list") == []
    stored = [p for p in (fleet.data_dir / "artifacts").rglob("*") if p.is_file()]
    assert [p for p in stored if ".incoming" not in p.parts] == [], "nothing may be stored"


def test_a_gateway_refuses_an_artifact_of_another_version(fleet: Fleet, tmp_path: Path) -> None:
    """A release recorded before publishing checked stamps: the gateway checks again, and
    says FAILED instead of SUCCEEDED on the version it had."""
    fleet.start_gateway("gw-1")
    fleet.wait_gateways({"gw-1": BASE})
    artifact = tmp_path / "built-as-1.3.0.pyz"
    fleet.cli("releases", "build", "--version", "1.3.0", "-o", str(artifact))
    stored = ArtifactStore(fleet.data_dir / "artifacts").put(
        [artifact.read_bytes()], expected_sha256=file_sha256(artifact)[0]
    )
    _repository(fleet).add_release("7.4.0", stored.sha256, stored.size, "", datetime.now(UTC))
    # Signed by the release manager as 7.4.0 all the same: only the stamp tells.
    trust = Trust(fleet.data_dir / "tuf", fleet.keys.root_json.read_bytes(), fleet.keys.online)
    current, _ = trust.targets()
    trust.accept(
        release.sign_targets(
            current or None, fleet.keys.dir, add={release.target_name("7.4.0"): artifact}
        )
    )

    # The controller moves first, and finds itself on 1.3.0: nothing goes to the fleet.
    upgrade = ("upgrade", "--version", "7.4.0", "--yes", "--wait", "--json")
    result = fleet.cli(*upgrade, check=False)
    assert result.returncode == 1, result.stderr
    (gateway,) = json.loads(result.stdout)["gateways"]
    assert gateway["state"] == "FAILED"
    assert "the new controller runs 1.3.0, not 7.4.0" in gateway["error"]

    # A controller that does not move itself: the gateway checks the stamp.
    assert fleet.controller is not None
    fleet.procs.stop(fleet.controller)
    fleet.start_controller(None, "--no-self-upgrade")
    result = fleet.cli(*upgrade, check=False)
    assert result.returncode == 1, result.stderr
    (gateway,) = json.loads(result.stdout)["gateways"]
    assert gateway["state"] == "FAILED"
    assert "the artifact of release 7.4.0 carries the stamp '1.3.0'" in gateway["error"]
    assert fleet.greeting("gw-1") == f"hitless-gateway gw-1 {BASE}"
    assert fleet.gateways()["gw-1"]["version"] == BASE
    staged = fleet.root / "gw-1" / "releases"
    assert not staged.exists() or not any(staged.iterdir()), "nothing may be staged"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"gateway_ids": ["y" * 250]}, "invalid gateway id"),
        ({"gateway_ids": ["gw.1"]}, "invalid gateway id 'gw.1'"),
        ({"request_id": "r" * 200}, "invalid request id"),
        ({"request_id": "has space"}, "invalid request id 'has space'"),
        ({"deadline_seconds": 2**31 - 1}, "invalid deadline of 2147483647s"),
    ],
    ids=["long-gateway", "dotted-gateway", "long-request", "spaced-request", "huge-deadline"],
)
def test_start_upgrade_refuses_what_the_bus_or_database_cannot_carry(
    fleet: Fleet, fields: dict[str, object], message: str
) -> None:
    fleet.start_gateway("gw-1")
    fleet.wait_gateways({"gw-1": BASE})
    fleet.release("1.1.0")
    request = controller_pb2.StartUpgradeRequest(latest=True, **fields)  # type: ignore[arg-type]
    with pytest.raises(grpc.RpcError) as info:
        fleet.stub().StartUpgrade(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (info.value.details() or "")
    assert fleet.cli_json("jobs", "list") == []


@pytest.mark.postgres
def test_a_job_with_a_message_id_too_long_to_keep_is_refused_and_recorded(
    fleet: Fleet, rabbit: Management, vhost: str, pg_url: str
) -> None:
    """On PostgreSQL, whose columns hold 128 characters: the refusal is recorded all the
    same (under a key that fits), announced, and the next job runs."""
    assert fleet.controller is not None
    fleet.procs.stop(fleet.controller)
    fleet.start_controller(pg_url)
    long_id = "m" * 200
    body = json.dumps({"action": "upgrade", "target": "latest"})
    fleet.stub().AllowPublisher(controller_pb2.PublisherRequest(user="guest"), timeout=10)
    assert rabbit.publish(
        vhost, "hitless.jobs", "upgrade", body, message_id=long_id, user_id="guest"
    )
    (rejected,) = wait_for(
        lambda: fleet.cli_json("jobs", "rejected"), timeout=15, what="the job refused"
    )
    assert "invalid message_id 'mmmm" in rejected["reason"]
    assert rejected["message_id"].startswith("m" * 60 + "...sha256:")
    assert rabbit.get_messages(vhost, topology.CONTROLLER_JOBS.name) == []


@pytest.mark.parametrize("seconds", [0, -1, 8 * 24 * 3600, 1e12])
def test_a_feed_interval_the_controller_cannot_wait_is_refused_at_start(seconds: float) -> None:
    """A huge interval once started a controller whose feed thread died on its first wait."""
    with pytest.raises(ConfigError, match="invalid feed interval"):
        ControllerConfig(
            listen=HostPort("127.0.0.1", 0),
            db_url="sqlite:///x.db",
            bus=BusConfig(),
            data_dir=Path("/tmp"),
            feed_interval_s=seconds,
        )
