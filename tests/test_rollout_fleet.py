"""Rollouts with real processes: upgradectl -> controller -> RabbitMQ -> gateway daemons.
A canary that fails aborts the job before its next wave; an operator pauses, resumes and
cancels from the CLI; a gateway that takes a withdrawn command later never runs it."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hitless.bus import topology
from hitless.v1 import common_pb2, controller_pb2
from tests.support import fault_releases
from tests.support.fleet import Fleet
from tests.support.rabbit import Management
from tests.support.wait import wait_for

BASE = "1.0.0"  # the version of the installed package (pyproject.toml)


def _corrupt_release(fleet: Fleet, version: str) -> None:
    """Publish ``version`` and rot its stored artifact (same size, other bytes), so every
    gateway's verification of it fails."""
    fleet.release(version)
    release = next(r for r in fleet.cli_json("releases", "list") if r["version"] == version)
    blob = fleet.data_dir / "artifacts" / release["sha256"][:2] / release["sha256"]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))


def test_a_failing_canary_aborts_the_rollout_and_the_next_wave_never_starts(
    fleet: Fleet,
) -> None:
    # The controller alone, as in test_corrupted_artifact_is_rejected_before_the_swap: one
    # moving itself first would catch the corruption before any gateway sees it.
    fleet.procs.stop(fleet.controller)  # type: ignore[arg-type]
    fleet.start_controller(None, "--no-self-upgrade")
    gateways = ["gw-1", "gw-2", "gw-3"]
    procs = {gid: fleet.start_gateway(gid) for gid in gateways}
    fleet.wait_gateways(dict.fromkeys(gateways, BASE))
    _corrupt_release(fleet, "1.1.0")

    result = fleet.cli(
        "upgrade", "--version", "1.1.0", "--waves", "1,100%", "--max-failures", "0",
        "--wait", "--yes", "--json", check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    job = json.loads(result.stdout)
    assert job["state"] == "ABORTED", job
    states = {g["id"]: g["state"] for g in job["gateways"]}
    assert states == {"gw-1": "FAILED", "gw-2": "SKIPPED", "gw-3": "SKIPPED"}
    assert job["gateway_waves"] == {"gw-1": 1, "gw-2": 2, "gw-3": 2}
    assert "stopped in wave 1 of 2" in job["stop_reason"]
    assert "verification failed" in job["stop_reason"]
    for gid in ("gw-2", "gw-3"):
        assert '"upgrade_started"' not in procs[gid].log(), f"{gid} was started"
        assert fleet.greeting(gid).endswith(BASE)
    listed = next(j for j in fleet.cli_json("jobs", "list") if j["job_id"] == job["job_id"])
    assert listed["state"] == "ABORTED" and "wave 1 of 2" in listed["stop_reason"]


def test_an_operator_pauses_resumes_and_cancels_from_the_cli(
    fleet: Fleet, rabbit: Management, vhost: str
) -> None:
    """gw-away is offline, so its command waits in its queue and, with --max-parallel 1,
    holds the one place in flight: nothing else moves while the operator steers."""
    # The controller stays on its version, so the job's first command goes out at once.
    fleet.procs.stop(fleet.controller)  # type: ignore[arg-type]
    fleet.start_controller(None, "--no-self-upgrade")
    away = fleet.start_gateway("gw-away")
    fleet.start_gateway("gw-b")
    fleet.wait_gateways({"gw-away": BASE, "gw-b": BASE})
    fleet.procs.stop(away)
    fleet.release("1.1.0")

    started = fleet.cli_json(
        "upgrade", "--version", "1.1.0", "--max-parallel", "1", "--deadline", "600", "--yes",
        "--no-precheck",
    )  # fmt: skip
    job_id = started["job_id"]
    assert started["max_parallel"] == 1
    queue = topology.gateway_queue("gw-away").name
    wait_for(
        lambda: len(rabbit.get_messages(vhost, queue)) == 1,
        timeout=30,
        what="gw-away's command waiting in its queue",
    )

    paused = fleet.cli_json("jobs", "pause", job_id)
    assert paused["state"] == "PAUSED" and paused["stop_reason"].startswith("paused by ")
    assert fleet.cli_json("status", job_id)["state"] == "PAUSED"
    resumed = fleet.cli_json("jobs", "resume", job_id)
    assert resumed["state"] == "RUNNING"

    cancelled = fleet.cli_json("jobs", "cancel", job_id, "--reason", "maintenance moved")
    assert cancelled["state"] == "CANCELLED", cancelled
    assert {g["state"] for g in cancelled["gateways"]} == {"CANCELLED"}
    assert "maintenance moved" in cancelled["stop_reason"]

    again = fleet.cli("jobs", "resume", job_id, check=False)
    assert again.returncode != 0
    assert "cannot move from CANCELLED to RUNNING" in again.stderr, again.stderr
    missing = fleet.cli("jobs", "pause", "no-such-job", check=False)
    assert missing.returncode != 0 and "no job no-such-job" in missing.stderr, missing.stderr

    # gw-away comes back and finds the withdrawn command in its queue: it never runs it.
    back = fleet.start_gateway("gw-away")
    wait_for(
        lambda: (
            '"bus_consuming"' in back.log().split('"gateway_serving"')[-1]
            and "withdrawn" in back.log()
        ),
        timeout=60,
        what="gw-away to take the withdrawn command and refuse it",
        describe=back.log,
    )
    assert fleet.greeting("gw-away").endswith(BASE)
    assert fleet.greeting("gw-b").endswith(BASE)
    final = fleet.cli_json("status", job_id)
    assert final["state"] == "CANCELLED"
    assert {g["state"] for g in final["gateways"]} == {"CANCELLED"}


def test_three_jobs_for_an_offline_gateway_end_in_one_swap_to_the_newest(fleet: Fleet) -> None:
    # The controller stays on its version: its own moves to each release are tested in
    # tests/test_controller_upgrade.py, and a second one while the first runs is refused.
    fleet.procs.stop(fleet.controller)  # type: ignore[arg-type]
    fleet.start_controller(None, "--no-self-upgrade")
    away = fleet.start_gateway("gw-1")
    fleet.wait_gateways({"gw-1": BASE})
    fleet.procs.stop(away)
    jobs = []
    for version in ("1.1.0", "1.2.0", "1.3.0"):
        fleet.release(version)
        jobs.append(fleet.cli_json("upgrade", "--version", version, "--yes")["job_id"])
    for older, newer in itertools.pairwise(jobs):
        (row,) = fleet.cli_json("status", older)["gateways"]
        assert row["state"] == "SUPERSEDED", json.dumps(row)
        assert row["error"].startswith(f"superseded by job {newer}")

    back = fleet.start_gateway("gw-1")
    fleet.wait_gateways({"gw-1": "1.3.0"}, timeout=90)
    last = wait_for(
        lambda: (s := fleet.cli_json("status", jobs[-1]))["state"] == "SUCCEEDED" and s,
        timeout=60,
        what="the newest job to succeed",
    )
    # One swap, straight from the installed version: the two older commands were refused
    # their release by the controller, and never ran.
    assert last["gateways"][0]["from_version"] == BASE
    assert back.log().count("was withdrawn") == 2, back.log()
    for older in jobs[:-1]:
        (row,) = fleet.cli_json("status", older)["gateways"]
        assert row["state"] == "SUPERSEDED"


def test_a_job_waits_for_its_not_before_then_runs(fleet: Fleet) -> None:
    gateway = fleet.start_gateway("gw-1")
    fleet.wait_gateways({"gw-1": BASE})
    fleet.release("1.1.0")
    opens = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=6)

    job = fleet.cli_json(
        "upgrade", "--version", "1.1.0", "--not-before", opens.isoformat(), "--yes"
    )
    assert job["state"] == "PENDING", job
    assert job["not_before"] == opens.isoformat().replace("+00:00", "Z")
    assert job["starts_at"] is not None
    shown = fleet.cli("status", job["job_id"]).stdout
    assert "waits: its first gateway starts at" in shown, shown

    done = wait_for(
        lambda: (s := fleet.cli_json("status", job["job_id"]))["state"] == "SUCCEEDED" and s,
        timeout=90,
        what="the job to run once its time came",
    )
    assert done["starts_at"] is None
    started = next(
        json.loads(line) for line in gateway.log().splitlines() if '"upgrade_started"' in line
    )
    assert datetime.fromisoformat(started["timestamp"]) >= opens, started


def test_high_availability_peers_are_never_in_flight_together(fleet: Fleet) -> None:
    fleet.start_gateway("gw-a", None, "--ha-peer", "gw-b")
    fleet.start_gateway("gw-b", None, "--ha-peer", "gw-a")
    fleet.wait_gateways({"gw-a": BASE, "gw-b": BASE})
    listed = {g["id"]: g for g in fleet.cli_json("gateways", "list")}
    assert (listed["gw-a"]["ha_peer"], listed["gw-b"]["ha_peer"]) == ("gw-b", "gw-a")
    assert "HA PEER" in fleet.cli("gateways", "list").stdout
    fleet.release("1.1.0")

    job = fleet.cli_json("upgrade", "--version", "1.1.0", "--wait", "--yes")
    assert job["state"] == "SUCCEEDED", job
    assert job["gateway_waves"] == {"gw-a": 1, "gw-b": 2}
    request = controller_pb2.WatchJobRequest(job_id=job["job_id"])
    events = list(fleet.stub().WatchJob(request, timeout=30))
    moving = {
        common_pb2.GATEWAY_JOB_STATE_DOWNLOADING,
        common_pb2.GATEWAY_JOB_STATE_VERIFYING,
        common_pb2.GATEWAY_JOB_STATE_SWAPPING,
    }
    a_done = next(
        e.seq
        for e in events
        if e.gateway_id == "gw-a" and e.gateway_state == common_pb2.GATEWAY_JOB_STATE_SUCCEEDED
    )
    b_moves = [e.seq for e in events if e.gateway_id == "gw-b" and e.gateway_state in moving]
    assert b_moves and min(b_moves) > a_done, (a_done, b_moves)


def test_a_two_hop_path_takes_an_old_gateway_through_the_release_between(
    fleet: Fleet,
) -> None:
    gateway = fleet.start_gateway("gw-1")
    fleet.wait_gateways({"gw-1": BASE})
    fleet.release("1.1.0")
    fleet.release("1.2.0", min_from="1.1.0")
    listed = {r["version"]: r["min_from"] for r in fleet.cli_json("releases", "list")}
    assert listed == {"1.2.0": "1.1.0", "1.1.0": None}
    # The controller moves itself in one step: from below min_from it is refused, and
    # nothing starts.
    refused = fleet.cli("upgrade", "--version", "1.2.0", "--yes", "--no-precheck", check=False)
    assert refused.returncode == 4, refused.stderr
    assert f"the controller runs {BASE}, and release 1.2.0 upgrades only from 1.1.0 on" in (
        refused.stderr
    )
    assert fleet.cli_json("jobs", "list") == []

    # The controller stays on its version: the path is the gateways'.
    fleet.procs.stop(fleet.controller)  # type: ignore[arg-type]
    fleet.start_controller(None, "--no-self-upgrade")

    plan = fleet.cli("upgrade", "--version", "1.2.0", "--dry-run", "--no-precheck").stdout
    assert "1.2.0 via 1.1.0" in plan, plan
    job = fleet.cli_json("upgrade", "--version", "1.2.0", "--wait", "--yes", "--no-precheck")
    assert job["state"] == "SUCCEEDED", job
    (row,) = job["gateways"]
    assert (row["from_version"], row["to_version"]) == ("1.1.0", "1.2.0")
    assert (row["path"], row["hop"]) == (["1.1.0", "1.2.0"], 2)
    assert fleet.greeting("gw-1").endswith("1.2.0")
    # Two swaps, each its own command: one to the release between, then the target.
    log = gateway.log()
    assert log.count('"upgrade_started"') == 2, log
    hops = [
        json.loads(line)["target_version"]
        for line in log.splitlines()
        if '"upgrade_started"' in line
    ]
    assert hops == ["1.1.0", "1.2.0"], hops


def test_a_canary_whose_soak_sees_drops_rise_hands_back_and_aborts_the_rollout(
    fleet: Fleet, tmp_path: Path
) -> None:
    fleet.procs.stop(fleet.controller)  # type: ignore[arg-type]
    fleet.start_controller(None, "--no-self-upgrade")
    gateways = ["gw-1", "gw-2"]
    procs = {gid: fleet.start_gateway(gid) for gid in gateways}
    fleet.wait_gateways(dict.fromkeys(gateways, BASE))
    artifact = fault_releases.build("1.1.0", tmp_path / "drops.pyz", "drops-in-soak")
    fleet.cli(
        "releases", "publish", "--version", "1.1.0", "--artifact", str(artifact),
        "--keys", str(fleet.keys.dir),
    )  # fmt: skip

    result = fleet.cli(
        "upgrade", "--version", "1.1.0", "--waves", "1,100%", "--max-failures", "0",
        "--soak", "3s", "--wait", "--yes", "--json", "--no-precheck", check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    job = json.loads(result.stdout)
    assert job["state"] == "ABORTED", job
    assert job["soak_seconds"] == 3
    rows = {g["id"]: g for g in job["gateways"]}
    assert (rows["gw-1"]["state"], rows["gw-2"]["state"]) == ("ROLLED_BACK", "SKIPPED")
    assert rows["gw-1"]["error"].startswith(
        "soak: dropped 500 of 1000 datagrams during the soak (50.0%), the version before 0.0%"
    ), rows["gw-1"]
    assert "stopped in wave 1 of 2" in job["stop_reason"]
    # gw-1 went to 1.1.0 and back, and serves its version; gw-2 never started.
    fleet.wait_gateways({"gw-1": BASE, "gw-2": BASE})
    assert fleet.greeting("gw-1").endswith(BASE)
    assert procs["gw-1"].log().count('"gateway_serving"') == 3
    assert '"upgrade_started"' not in procs["gw-2"].log()


def test_a_controller_restarted_in_the_middle_of_a_rollout_carries_it_on(fleet: Fleet) -> None:
    """The canary soaks while the controller is stopped; its report waits in the reports
    queue, and the next controller takes it and starts the second wave."""
    fleet.procs.stop(fleet.controller)  # type: ignore[arg-type]
    fleet.start_controller(None, "--no-self-upgrade")
    fleet.start_gateway("gw-1")
    second = fleet.start_gateway("gw-2")
    fleet.wait_gateways({"gw-1": BASE, "gw-2": BASE})
    fleet.release("1.1.0")
    job_id = fleet.cli_json(
        "upgrade", "--version", "1.1.0", "--waves", "1,100%", "--soak", "6s", "--yes",
        "--no-precheck",
    )["job_id"]  # fmt: skip
    wait_for(
        lambda: fleet.cli_json("status", job_id)["gateways"][0]["state"] == "SOAKING",
        timeout=60,
        what="the canary to soak",
    )
    fleet.procs.stop(fleet.controller)  # type: ignore[arg-type]
    assert '"upgrade_started"' not in second.log()
    fleet.start_controller(None, "--no-self-upgrade")
    done = wait_for(
        lambda: (s := fleet.cli_json("status", job_id))["state"] == "SUCCEEDED" and s,
        timeout=90,
        what="the rollout to finish under the next controller",
    )
    assert [g["state"] for g in done["gateways"]] == ["SUCCEEDED", "SUCCEEDED"]
    assert done["gateway_waves"] == {"gw-1": 1, "gw-2": 2}
    fleet.wait_gateways({"gw-1": "1.1.0", "gw-2": "1.1.0"})
