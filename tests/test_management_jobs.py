"""Jobs published by admins to the hitless.jobs exchange, through the broker's real
management HTTP API (as the management UI does), handled by a real controller."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from hitless.v1 import controller_pb2
from tests.support.fleet import Fleet
from tests.support.rabbit import Management
from tests.support.wait import wait_for

BASE = "1.0.0"


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


def _dead_letters(rabbit: Management, vhost: str) -> dict[str, dict[str, object]]:
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


def test_a_valid_job_runs_like_one_from_the_cli(
    two_gateways: Fleet, rabbit: Management, vhost: str
) -> None:
    fleet = two_gateways
    fleet.release("1.1.0")
    body = json.dumps({"action": "upgrade", "version": "1.1.0", "gateways": ["gw-1"]})
    assert rabbit.publish(
        vhost, "hitless.jobs", "upgrade", body, message_id="job-1", user_id="guest"
    )

    job = wait_for(lambda: _management_jobs(fleet), timeout=15, what="the job recorded")[0]
    assert job.requested_by == "guest"
    assert [g.gateway_id for g in job.gateways] == ["gw-1"]
    status = wait_for(
        lambda: (s := fleet.cli_json("status", job.job_id))["state"] == "SUCCEEDED" and s,
        timeout=60,
        what="the management job to succeed",
    )
    assert status["gateways"][0]["to_version"] == "1.1.0"
    assert fleet.greeting("gw-1").endswith("1.1.0")
    assert fleet.greeting("gw-2").endswith(BASE)


def test_the_same_job_published_twice_runs_once(
    two_gateways: Fleet, rabbit: Management, vhost: str
) -> None:
    fleet = two_gateways
    fleet.release("1.1.0")
    body = json.dumps({"action": "upgrade", "target": "latest"})
    for _ in range(2):
        assert rabbit.publish(vhost, "hitless.jobs", "upgrade", body, message_id="same-id")
    # The jobs queue is consumed in order: once a refused marker published after both
    # copies is handled, so are they.
    marker = json.dumps({"action": "reboot"})
    assert rabbit.publish(vhost, "hitless.jobs", "upgrade", marker, message_id="marker")
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
    ],
    ids=[
        "malformed",
        "unknown-field",
        "wrong-type",
        "unknown-action",
        "unknown-version",
        "unknown-gateway",
        "vpn-without-consent",
    ],
)
def test_a_bad_job_is_dead_lettered_with_its_reason(
    two_gateways: Fleet, rabbit: Management, vhost: str, body: str, reason: str
) -> None:
    fleet = two_gateways
    fleet.release("1.1.0")
    if "2.0.0" in body:
        _publish_vpn_release(fleet, "2.0.0")
    assert rabbit.publish(vhost, "hitless.jobs", "upgrade", body, message_id="bad-1")

    dead = wait_for(
        lambda: _dead_letters(rabbit, vhost).get("bad-1"), timeout=15, what="the job dead-lettered"
    )
    header = dead["properties"]["headers"]["x-hitless-reason"]  # type: ignore[index]
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


def test_a_job_without_message_id_is_refused(
    two_gateways: Fleet, rabbit: Management, vhost: str
) -> None:
    fleet = two_gateways
    fleet.release("1.1.0")
    body = json.dumps({"action": "upgrade", "target": "latest"})
    assert rabbit.publish(vhost, "hitless.jobs", "upgrade", body)
    rejected = wait_for(
        lambda: _rejected(fleet),
        timeout=15,
        what="the job refused",
    )
    assert "no message_id property" in rejected[0].reason
    assert _management_jobs(fleet) == []


def test_vpn_release_runs_with_consent(two_gateways: Fleet, rabbit: Management, vhost: str) -> None:
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
    assert rabbit.publish(vhost, "hitless.jobs", "upgrade", body, message_id="vpn-ok")
    job = wait_for(lambda: _management_jobs(fleet), timeout=15, what="the job recorded")[0]
    wait_for(
        lambda: fleet.cli_json("status", job.job_id)["state"] == "SUCCEEDED",
        timeout=60,
        what="the VPN release installed",
    )
