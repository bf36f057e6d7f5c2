"""Jobs published by admins to the hitless.jobs exchange, through the broker's real
management HTTP API (as the management UI does), handled by a real controller.

A job runs only when its user_id names a broker user an admin allowed (``upgradectl jobs
allow-publisher USER``): each test publishes as a broker user of its own, allowed first
unless the test is about one that is not."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from hitless.bus import topology
from hitless.bus.amqp import ORIGINAL_USER_HEADER
from hitless.v1 import controller_pb2, controller_pb2_grpc
from tests.support.fleet import Fleet, bearer
from tests.support.procs import command
from tests.support.rabbit import Management
from tests.support.wait import wait_for
from upgradectl.errors import ExitCode

BASE = "1.0.0"
USER_PREFIX = "jobs-test-"


@dataclass
class BrokerUser:
    """A broker user with full rights on the test's vhost, publishing jobs through the
    management API as itself."""

    name: str
    api: Management
    vhost: str

    def publish(self, body: str, *, user_id: bool = True, **properties: Any) -> None:
        """Publish a job to hitless.jobs, with user_id set to this user (RabbitMQ checks it
        against the login) unless ``user_id`` is False."""
        if user_id:
            properties["user_id"] = self.name
        routed = self.api.publish(self.vhost, "hitless.jobs", "upgrade", body, **properties)
        assert routed, "the job was not routed to the controller's jobs queue"


@pytest.fixture
def broker_users(rabbit: Management, vhost: str) -> Iterator[Callable[[], BrokerUser]]:
    """Makes broker users of this test's own (name prefix jobs-test-), removed afterwards."""
    made: list[str] = []

    def make() -> BrokerUser:
        name, password = f"{USER_PREFIX}{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
        rabbit.request("PUT", f"/users/{name}", {"password": password, "tags": "management"})
        made.append(name)
        rabbit.request(
            "PUT", f"/permissions/{vhost}/{name}",
            {"configure": ".*", "write": ".*", "read": ".*"},
        )  # fmt: skip
        return BrokerUser(name, Management(user=name, password=password), vhost)

    yield make
    for name in made:
        rabbit.request("DELETE", f"/users/{name}")


@pytest.fixture
def publisher(fleet: Fleet, broker_users: Callable[[], BrokerUser]) -> BrokerUser:
    """A broker user the admin allowed to publish management jobs."""
    user = broker_users()
    request = controller_pb2.PublisherRequest(user=user.name)
    allowed = fleet.stub().AllowPublisher(request, timeout=10)
    assert allowed.user == user.name
    return user


@pytest.fixture
def stranger(broker_users: Callable[[], BrokerUser]) -> BrokerUser:
    """A broker user that may write to the jobs exchange but was never allowed."""
    return broker_users()


def _publish_vpn_release(fleet: Fleet, version: str) -> None:
    """A release whose notes say it restarts the VPN service."""
    artifact = fleet.root / f"release-{version}.pyz"
    fleet.cli("releases", "build", "--version", version, "-o", str(artifact))

    def parts() -> Iterator[controller_pb2.PublishReleaseRequest]:
        yield controller_pb2.PublishReleaseRequest(
            metadata=controller_pb2.ReleaseMetadata(
                version=version,
                notes="Restarts the VPN service.",
                restarts_vpn_service=True,
                targets_metadata=fleet.signed_targets(version, artifact),
            )
        )
        yield controller_pb2.PublishReleaseRequest(chunk=artifact.read_bytes())

    fleet.stub().PublishRelease(parts(), timeout=30)


def _management_jobs(fleet: Fleet) -> list[controller_pb2.Job]:
    jobs = fleet.stub().ListJobs(controller_pb2.ListJobsRequest(), timeout=10).jobs
    return [j for j in jobs if j.source == "management"]


def _rejected(fleet: Fleet) -> list[controller_pb2.RejectedJob]:
    request = controller_pb2.ListRejectedJobsRequest()
    return list(fleet.stub().ListRejectedJobs(request, timeout=10).jobs)


def _dead_letters(rabbit: Management, vhost: str) -> dict[str, dict[str, Any]]:
    return {
        m["properties"]["message_id"]: m
        for m in rabbit.get_messages(vhost, "hitless.dead", count=100)
        if m["properties"].get("message_id")
    }


@pytest.fixture
def two_gateways(fleet: Fleet) -> Fleet:
    for gid in ("gw-1", "gw-2"):
        fleet.start_gateway(gid)
    fleet.wait_gateways({"gw-1": BASE, "gw-2": BASE})
    return fleet


def test_a_valid_job_runs_like_one_from_the_cli(two_gateways: Fleet, publisher: BrokerUser) -> None:
    fleet = two_gateways
    fleet.release("1.1.0")
    body = json.dumps({"action": "upgrade", "version": "1.1.0", "gateways": ["gw-1"]})
    publisher.publish(body, message_id="job-1")

    job = wait_for(lambda: _management_jobs(fleet), timeout=15, what="the job recorded")[0]
    assert job.requested_by == publisher.name
    assert [g.gateway_id for g in job.gateways] == ["gw-1"]
    status = wait_for(
        lambda: (s := fleet.cli_json("status", job.job_id))["state"] == "SUCCEEDED" and s,
        timeout=60,
        what="the management job to succeed",
    )
    assert status["gateways"][0]["to_version"] == "1.1.0"
    assert fleet.greeting("gw-1").endswith("1.1.0")
    assert fleet.greeting("gw-2").endswith(BASE)


def test_a_job_rolls_out_in_the_waves_it_names(two_gateways: Fleet, publisher: BrokerUser) -> None:
    fleet = two_gateways
    fleet.release("1.1.0")
    body = json.dumps(
        {
            "action": "upgrade", "target": "latest", "waves": "1,100%", "max_failures": "0",
            "soak_seconds": 1,
        }
    )  # fmt: skip
    publisher.publish(body, message_id="waves-1")

    job = wait_for(lambda: _management_jobs(fleet), timeout=15, what="the job recorded")[0]
    assert (job.waves, job.max_failures, job.wave_count) == ("1,100%", "0", 2)
    assert job.soak_seconds == 1
    assert {g.gateway_id: g.wave for g in job.gateways} == {"gw-1": 1, "gw-2": 2}
    status = wait_for(
        lambda: (s := fleet.cli_json("status", job.job_id))["state"] == "SUCCEEDED" and s,
        timeout=90,
        what="the rollout to succeed",
    )
    assert status["gateway_waves"] == {"gw-1": 1, "gw-2": 2}
    assert all(g["health"].endswith("1 s of 1 s") for g in status["gateways"]), status
    assert fleet.greeting("gw-2").endswith("1.1.0")


def test_the_same_job_published_twice_runs_once(two_gateways: Fleet, publisher: BrokerUser) -> None:
    fleet = two_gateways
    fleet.release("1.1.0")
    body = json.dumps({"action": "upgrade", "target": "latest"})
    for _ in range(2):
        publisher.publish(body, message_id="same-id")
    # The jobs queue is consumed in order: once a refused marker published after both
    # copies is handled, so are they.
    marker = json.dumps({"action": "reboot"})
    publisher.publish(marker, message_id="marker")
    wait_for(
        lambda: any(r.message_id == "marker" for r in _rejected(fleet)),
        timeout=30,
        what="the marker handled",
    )
    jobs = _management_jobs(fleet)
    assert len(jobs) == 1, f"the duplicate ran again: {jobs}"
    assert sorted(g.gateway_id for g in jobs[0].gateways) == ["gw-1", "gw-2"]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("{not json", "not a valid job"),
        ('{"action": "upgrade", "target": "latest", "colour": "red"}', "colour"),
        ('{"action": "upgrade", "target": "latest", "gateways": "gw-1"}', "gateways"),
        ('{"action": "reboot", "target": "latest"}', "unknown action 'reboot'"),
        ('{"action": "upgrade", "version": "9.9.9"}', "unknown version 9.9.9; available: 1.1.0"),
        (
            '{"action": "upgrade", "target": "latest", "gateways": ["gw-9"]}',
            "unknown gateway(s): gw-9",
        ),
        ('{"action": "upgrade", "version": "2.0.0"}', "restarts the VPN service"),
        (
            '{"action": "upgrade", "target": "latest", "waves": "1"}',
            "--waves ends at 1 of the job's 2 gateways: end with 100%",
        ),
        ('{"action": "upgrade", "target": "latest", "max_failures": "some"}', "--max-failures"),
    ],
    ids=[
        "malformed",
        "unknown-field",
        "wrong-type",
        "unknown-action",
        "unknown-version",
        "unknown-gateway",
        "vpn-without-consent",
        "waves-short-of-all",
        "max-failures-no-number",
    ],
)
def test_a_bad_job_is_dead_lettered_with_its_reason(
    two_gateways: Fleet,
    rabbit: Management,
    vhost: str,
    publisher: BrokerUser,
    body: str,
    reason: str,
) -> None:
    fleet = two_gateways
    fleet.release("1.1.0")
    if "2.0.0" in body:
        _publish_vpn_release(fleet, "2.0.0")
    publisher.publish(body, message_id="bad-1")

    dead = wait_for(
        lambda: _dead_letters(rabbit, vhost).get("bad-1"), timeout=15, what="the job dead-lettered"
    )
    header = dead["properties"]["headers"]["x-hitless-reason"]
    assert reason in header
    assert dead["payload"] == body, "the body must be dead-lettered untouched"
    rejected = _rejected(fleet)
    assert [(r.message_id, r.body) for r in rejected] == [("bad-1", body)]
    assert reason in rejected[0].reason
    assert _management_jobs(fleet) == []
    # The admins are told: a job.rejected event waits for the notifier.
    events = [
        json.loads(m["payload"])
        for m in rabbit.get_messages(vhost, "hitless.notifier.events")
        if m["routing_key"] == "job.rejected"
    ]
    assert [e["job_rejected"]["message_id"] for e in events] == ["bad-1"]
    assert events[0]["event_id"] == "rejected:bad-1"


def test_a_job_without_message_id_is_refused(two_gateways: Fleet, publisher: BrokerUser) -> None:
    fleet = two_gateways
    fleet.release("1.1.0")
    body = json.dumps({"action": "upgrade", "target": "latest"})
    publisher.publish(body)
    rejected = wait_for(
        lambda: _rejected(fleet),
        timeout=15,
        what="the job refused",
    )
    assert "no message_id property" in rejected[0].reason
    assert _management_jobs(fleet) == []


def test_vpn_release_runs_with_consent(two_gateways: Fleet, publisher: BrokerUser) -> None:
    fleet = two_gateways
    _publish_vpn_release(fleet, "2.0.0")
    body = json.dumps(
        {
            "action": "upgrade",
            "version": "2.0.0",
            "gateways": ["gw-2"],
            "accept_vpn_disruption": True,
        }
    )
    publisher.publish(body, message_id="vpn-ok")
    job = wait_for(lambda: _management_jobs(fleet), timeout=15, what="the job recorded")[0]
    wait_for(
        lambda: fleet.cli_json("status", job.job_id)["state"] == "SUCCEEDED",
        timeout=60,
        what="the VPN release installed",
    )


@pytest.fixture
def one_gateway(fleet: Fleet) -> Fleet:
    """A gateway on BASE and release 1.1.0 published: a job to 1.1.0 is valid."""
    fleet.start_gateway("gw-1")
    fleet.wait_gateways({"gw-1": BASE})
    fleet.release("1.1.0")
    return fleet


def _publishers(fleet: Fleet) -> list[str]:
    request = controller_pb2.ListPublishersRequest()
    return [p.user for p in fleet.stub().ListPublishers(request, timeout=10).publishers]


def _audit_rows(fleet: Fleet, action: str) -> list[controller_pb2.AuditEvent]:
    events = fleet.stub().ListAudit(controller_pb2.ListAuditRequest(), timeout=10).events
    return [e for e in events if e.action == action]


def test_a_job_from_a_user_not_allowed_is_rejected_and_starts_nothing(
    one_gateway: Fleet,
    rabbit: Management,
    vhost: str,
    publisher: BrokerUser,
    stranger: BrokerUser,
) -> None:
    fleet = one_gateway
    body = json.dumps({"action": "upgrade", "version": "1.1.0"})
    stranger.publish(body, message_id="from-stranger")

    (rejected,) = wait_for(lambda: _rejected(fleet), timeout=15, what="the job rejected")
    assert (rejected.message_id, rejected.user_id, rejected.body) == (
        "from-stranger", stranger.name, body,
    )  # fmt: skip
    assert f"broker user {stranger.name!r} may not publish management jobs" in rejected.reason
    assert f"upgradectl jobs allow-publisher {stranger.name}" in rejected.reason
    dead = wait_for(
        lambda: _dead_letters(rabbit, vhost).get("from-stranger"),
        timeout=15,
        what="the job dead-lettered",
    )
    assert dead["payload"] == body, "the body must be dead-lettered untouched"
    headers = dead["properties"]["headers"]
    assert rejected.reason in headers[topology.REASON_HEADER]
    # Dead-lettered as the controller's own user: the stranger's user_id is a header.
    assert "user_id" not in dead["properties"]
    assert headers[ORIGINAL_USER_HEADER] == stranger.name
    (row,) = wait_for(
        lambda: _audit_rows(fleet, "ManagementJob"), timeout=15, what="the job's audit row"
    )
    assert row.actor == f"broker:{stranger.name}"
    assert row.outcome.startswith("REJECTED: broker user"), row.outcome
    events = [
        json.loads(m["payload"])
        for m in rabbit.get_messages(vhost, topology.NOTIFIER_EVENTS.name)
        if m["routing_key"] == topology.JOB_REJECTED
    ]
    assert [e["job_rejected"]["user_id"] for e in events] == [stranger.name]
    # Nothing changed: no job, the same publishers, the gateway on its version.
    assert _management_jobs(fleet) == []
    assert _publishers(fleet) == [publisher.name]
    assert fleet.gateways()["gw-1"]["version"] == BASE
    assert rabbit.get_messages(vhost, topology.CONTROLLER_JOBS.name) == []

    # The same job from the allowed publisher is accepted: only who sent it was wrong.
    publisher.publish(body, message_id="from-publisher")
    (job,) = wait_for(lambda: _management_jobs(fleet), timeout=15, what="the job accepted")
    assert job.requested_by == publisher.name
    assert len(_rejected(fleet)) == 1


def test_a_job_without_user_id_is_rejected(one_gateway: Fleet, publisher: BrokerUser) -> None:
    """Even from an allowed publisher's login: without user_id the broker vouches for no
    one."""
    fleet = one_gateway
    body = json.dumps({"action": "upgrade", "version": "1.1.0"})
    publisher.publish(body, user_id=False, message_id="anonymous")

    (rejected,) = wait_for(lambda: _rejected(fleet), timeout=15, what="the job rejected")
    assert rejected.message_id == "anonymous" and rejected.user_id == ""
    assert "no user_id property" in rejected.reason
    assert "upgradectl jobs allow-publisher USER" in rejected.reason
    (row,) = wait_for(
        lambda: _audit_rows(fleet, "ManagementJob"), timeout=15, what="the job's audit row"
    )
    assert row.actor == "broker:unknown" and row.outcome.startswith("REJECTED: ")
    assert _management_jobs(fleet) == []


def test_allow_then_disallow_a_publisher_with_upgradectl(
    one_gateway: Fleet, stranger: BrokerUser
) -> None:
    fleet = one_gateway
    name = stranger.name
    assert fleet.cli_json("jobs", "publishers") == []
    shown = fleet.cli("jobs", "publishers").stdout
    assert "no broker user may publish management jobs" in shown

    allowed = fleet.cli("jobs", "allow-publisher", name).stdout
    assert f"broker user {name} may publish management jobs" in allowed
    (listed,) = fleet.cli_json("jobs", "publishers")
    assert (listed["user"], listed["allowed_by"]) == (name, "token:bootstrap-admin")
    assert listed["allowed_at"].endswith("Z")
    again = fleet.cli_json("jobs", "publishers")
    fleet.cli("jobs", "allow-publisher", name)
    assert fleet.cli_json("jobs", "publishers") == again, "allowing twice changes nothing"
    table = fleet.cli("jobs", "publishers").stdout
    assert table.splitlines()[0].split() == ["USER", "ALLOWED", "BY"] and name in table

    body = json.dumps({"action": "upgrade", "version": "1.1.0"})
    stranger.publish(body, message_id="while-allowed")
    (job,) = wait_for(lambda: _management_jobs(fleet), timeout=15, what="the job accepted")
    assert job.requested_by == name
    wait_for(
        lambda: fleet.cli_json("status", job.job_id)["state"] == "SUCCEEDED",
        timeout=60,
        what="the accepted job to succeed",
    )

    removed = fleet.cli("jobs", "disallow-publisher", name).stdout
    assert f"broker user {name} may no longer publish management jobs" in removed
    assert fleet.cli_json("jobs", "publishers") == []
    stranger.publish(body, message_id="after-disallow")
    (rejected,) = wait_for(lambda: _rejected(fleet), timeout=15, what="the job rejected")
    assert rejected.message_id == "after-disallow"
    assert f"broker user {name!r} may not publish" in rejected.reason
    assert len(_management_jobs(fleet)) == 1

    twice = fleet.cli("jobs", "disallow-publisher", name, check=False)
    assert twice.returncode == ExitCode.REJECTED, twice
    assert f"broker user {name!r} is not an allowed publisher" in twice.stderr
    assert "no broker user is allowed" in twice.stderr
    rows = [
        (e.action, e.actor, e.outcome.split(":")[0])
        for action in ("AllowPublisher", "DisallowPublisher")
        for e in _audit_rows(fleet, action)
    ]
    admin = "token:bootstrap-admin"
    assert sorted(rows) == sorted(
        [("AllowPublisher", admin, "OK")] * 2
        + [("DisallowPublisher", admin, "OK"), ("DisallowPublisher", admin, "NOT_FOUND")]
    )


@pytest.mark.parametrize(
    ("user", "complaint"),
    [
        ("", "no broker user given"),
        (" ops", "starts or ends with a space"),
        ("ops\x1b[2J", "control or invisible characters"),
        ("ops\u202e", "control or invisible characters"),
        ("é" * 128, "256 bytes of UTF-8"),
    ],
    ids=["empty", "space", "escape", "bidi-override", "too-long"],
)
def test_a_user_name_no_job_could_carry_is_refused(fleet: Fleet, user: str, complaint: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        fleet.stub().AllowPublisher(controller_pb2.PublisherRequest(user=user), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert complaint in (caught.value.details() or "")
    assert _publishers(fleet) == []


def test_an_operator_may_not_change_or_list_the_publishers(
    fleet: Fleet, publisher: BrokerUser, stranger: BrokerUser
) -> None:
    created = fleet.stub().CreateToken(
        controller_pb2.CreateTokenRequest(name="ops", role="operator"), timeout=10
    )
    channel = grpc.intercept_channel(fleet.channel(), bearer(created.secret))
    with channel:
        operator = controller_pb2_grpc.ControllerStub(channel)
        calls = [
            ("AllowPublisher", controller_pb2.PublisherRequest(user=stranger.name)),
            ("DisallowPublisher", controller_pb2.PublisherRequest(user=publisher.name)),
            ("ListPublishers", controller_pb2.ListPublishersRequest()),
        ]
        for method, request in calls:
            with pytest.raises(grpc.RpcError) as caught:
                getattr(operator, method)(request, timeout=10)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, method
            details = caught.value.details() or ""
            assert f"token:ops has the role operator, and {method} needs admin" in details
    result = subprocess.run(
        [command("upgradectl"), "jobs", "allow-publisher", stranger.name],
        env={**os.environ, **fleet.env, "HITLESS_TOKEN": created.secret},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == ExitCode.REJECTED, result
    assert "needs admin" in result.stderr
    assert _publishers(fleet) == [publisher.name], "nothing changed"
    for action, user in (("AllowPublisher", stranger), ("DisallowPublisher", publisher)):
        refused = [e for e in _audit_rows(fleet, action) if e.actor == "token:ops"]
        assert refused and all(e.outcome.startswith("PERMISSION_DENIED") for e in refused)
        assert all(user.name in e.detail for e in refused)
