"""Commands that arrive late never undo newer ones, with a real controller, broker and
gateways: the controller plans against the version a gateway will run once its unfinished
job is done, and a gateway refuses a command older than one it took, or one that would take
it back to an older version than it runs by then."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from controller_svc.signing import Trust
from hitless.bus import codec
from hitless.v1 import bus_pb2
from tests.support.fleet import Fleet
from tests.support.rabbit import Management
from tests.support.wait import wait_for

BASE = "1.0.0"
_FINAL = ("SUCCEEDED", "FAILED", "ROLLED_BACK")


@pytest.fixture
def gw2_offline(fleet: Fleet) -> Fleet:
    """gw-1 and gw-2 known on BASE, gw-2 stopped; releases 1.1.0 and 1.2.0 published. The
    controller stays on its version (its own upgrade has tests of its own)."""
    assert fleet.controller is not None
    fleet.procs.stop(fleet.controller)
    fleet.start_controller(None, "--no-self-upgrade")
    gw2 = fleet.start_gateway("gw-2")
    fleet.start_gateway("gw-1")
    fleet.wait_gateways({"gw-1": BASE, "gw-2": BASE})
    fleet.procs.stop(gw2)
    fleet.release("1.1.0")
    fleet.release("1.2.0")
    return fleet


def _job(fleet: Fleet, job_id: str, state: str) -> dict[str, Any]:
    return wait_for(
        lambda: (s := fleet.cli_json("status", job_id))["state"] == state and s,
        timeout=90,
        what=f"job {job_id} {state}",
        describe=lambda: f"{fleet.cli_json('status', job_id)}\n{fleet.procs.dump_logs()}",
    )


def test_an_older_release_queued_behind_a_newer_one_needs_allow_downgrade(
    gw2_offline: Fleet,
) -> None:
    fleet = gw2_offline
    newer = fleet.cli_json("upgrade", "--version", "1.2.0", "--gateways", "gw-2", "--yes")
    result = fleet.cli(
        "upgrade", "--version", "1.1.0", "--gateways", "gw-2", "--yes", "--json", check=False
    )
    assert result.returncode == 4, result.stderr
    assert "GATEWAY  FROM                   TO     ACTION" in result.stderr
    assert "gw-2     1.0.0 (1.2.0 pending)  1.1.0  DOWNGRADE" in result.stderr
    assert (
        "release 1.1.0 would downgrade gw-2 from 1.0.0 (1.2.0 once its unfinished job is "
        "done); nothing was started: add --allow-downgrade"
    ) in result.stderr
    assert len(fleet.cli_json("jobs", "list")) == 1, "the refused job must not exist"

    fleet.start_gateway("gw-2")
    _job(fleet, newer["job_id"], "SUCCEEDED")
    fleet.wait_gateways({"gw-2": "1.2.0"})


def test_an_allowed_downgrade_queued_behind_a_newer_release_supersedes_it(
    gw2_offline: Fleet,
) -> None:
    """The later job wins: the newer release's command, not yet taken, is SUPERSEDED and
    never runs, so gw-2 makes one swap, to what the operator asked for last."""
    fleet = gw2_offline
    newer = fleet.cli_json("upgrade", "--version", "1.2.0", "--gateways", "gw-2", "--yes")
    older = fleet.cli_json(
        "upgrade", "--version", "1.1.0", "--gateways", "gw-2", "--yes", "--allow-downgrade"
    )
    fleet.start_gateway("gw-2")
    (gateway,) = _job(fleet, older["job_id"], "SUCCEEDED")["gateways"]
    assert (gateway["from_version"], gateway["to_version"]) == ("1.0.0", "1.1.0")
    (superseded,) = _job(fleet, newer["job_id"], "FAILED")["gateways"]
    assert superseded["state"] == "SUPERSEDED"
    assert superseded["error"] == f"superseded by job {older['job_id']} (to 1.1.0)"
    fleet.wait_gateways({"gw-2": "1.1.0"})


class _Reports:
    """A queue of this test's own on the reports exchange, to read what a gateway says."""

    def __init__(self, rabbit: Management, vhost: str, gateway_id: str) -> None:
        self._rabbit, self._vhost = rabbit, vhost
        self.name = f"test.reports.{uuid.uuid4().hex[:8]}"
        rabbit.request("PUT", f"/queues/{vhost}/{self.name}", {"durable": False})
        rabbit.request(
            "POST",
            f"/bindings/{vhost}/e/hitless.reports/q/{self.name}",
            {"routing_key": f"gateway.{gateway_id}.status"},
        )

    def final(self, command_id: str) -> dict[str, Any] | None:
        """The report that ended ``command_id``, with its state as a plain name."""
        for message in self._rabbit.get_messages(self._vhost, self.name, count=200):
            report = json.loads(message["payload"])
            state = report.get("state", "").removeprefix("GATEWAY_JOB_STATE_")
            if report.get("command_id") == command_id and state in _FINAL:
                return {**report, "state": state}
        return None

    def wait_final(self, command_id: str, what: str) -> dict[str, Any]:
        return wait_for(lambda: self.final(command_id), timeout=30, what=f"gw-1's answer to {what}")


def _command(fleet: Fleet, version: str) -> bus_pb2.UpgradeCommand:
    release = next(r for r in fleet.cli_json("releases", "list") if r["version"] == version)
    command = bus_pb2.UpgradeCommand(
        command_id=str(uuid.uuid4()),
        job_id=f"late-{uuid.uuid4().hex[:8]}",
        gateway_id="gw-1",
        target_version=version,
        artifact_sha256=release["sha256"],
        artifact_size=release["size"],
    )
    command.deadline.FromDatetime(datetime.now(UTC) + timedelta(minutes=10))
    return command


def _send(
    fleet: Fleet,
    rabbit: Management,
    vhost: str,
    command: bus_pb2.UpgradeCommand,
    issued_at: datetime,
    *,
    allow_downgrade: bool = False,
) -> None:
    """Publish ``command`` to gw-1 as a controller does: signed with its command key, with
    when its job was issued and whether it allows a downgrade."""
    signer = Trust(fleet.root / "signer-tuf", fleet.keys.root_json.read_bytes(), fleet.keys.online)
    headers = signer.command_headers(command, issued_at, allow_downgrade=allow_downgrade)
    body = codec.encode(command).decode()
    assert rabbit.publish(
        vhost, "hitless.commands", "gateway.gw-1", body,
        message_id=command.command_id, headers=headers,
    )  # fmt: skip


def test_a_gateway_refuses_a_late_command_that_would_undo_a_newer_one(
    gw2_offline: Fleet, rabbit: Management, vhost: str
) -> None:
    """Commands planned against what the controller knew then, delivered after gw-1 took a
    newer job: neither runs, each says why, and gw-1 keeps the newer release."""
    fleet = gw2_offline
    reports = _Reports(rabbit, vhost, "gw-1")
    before = datetime.now(UTC) - timedelta(seconds=1)
    job = fleet.cli_json("upgrade", "--version", "1.2.0", "--gateways", "gw-1", "--yes", "--wait")
    assert job["state"] == "SUCCEEDED"
    fleet.wait_gateways({"gw-1": "1.2.0"})

    downgrade = _command(fleet, "1.1.0")
    _send(fleet, rabbit, vhost, downgrade, datetime.now(UTC))
    superseded = _command(fleet, "1.1.0")
    _send(fleet, rabbit, vhost, superseded, before, allow_downgrade=True)

    said = reports.wait_final(downgrade.command_id, "the downgrade")
    assert said["state"] == "FAILED"
    assert "this gateway runs 1.2.0 by now, and 1.1.0 is older" in said["error"]
    said = reports.wait_final(superseded.command_id, "the superseded command")
    assert said["state"] == "FAILED"
    newer = f"superseded: this gateway already took a newer command (job {job['job_id']}"
    assert newer in said["error"]
    # A command without the signed copy (from an older controller, or forged) is not run
    # at all: tests/test_signed_upgrades.py.
    assert fleet.greeting("gw-1") == "hitless-gateway gw-1 1.2.0"
    assert fleet.gateways()["gw-1"]["version"] == "1.2.0"
