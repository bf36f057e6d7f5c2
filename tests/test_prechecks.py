"""Pre-checks with real processes: upgradectl -> controller -> RabbitMQ -> gateway daemons
and back. A dry run shows each gateway's answer and starts nothing; a real start leaves a
gateway whose pre-check found a problem out of the job (SKIPPED, with the problem) unless
--force; a gateway that does not answer is not held against the job."""

from __future__ import annotations

import json

from tests.support.fleet import Fleet
from tests.support.tmpfs import tiny_filesystem
from tests.support.wait import wait_for

BASE = "1.0.0"  # the version of the installed package (pyproject.toml)


def test_a_dry_run_shows_each_gateways_precheck_and_starts_nothing(fleet: Fleet) -> None:
    away = fleet.start_gateway("gw-away")
    fleet.start_gateway("gw-1")
    fleet.wait_gateways({"gw-away": BASE, "gw-1": BASE})
    fleet.procs.stop(away)
    fleet.release("1.1.0")

    plan = fleet.cli_json("upgrade", "--latest", "--dry-run")
    checks = {g["id"]: g for g in plan["gateways"]}
    assert checks["gw-1"]["precheck"] == "ok", checks
    assert checks["gw-1"]["free_bytes"] > 0
    assert checks["gw-away"]["precheck"] == "", checks  # no answer: it is offline
    shown = fleet.cli("upgrade", "--latest", "--dry-run").stdout
    assert "PRE-CHECK" in shown and "dry run: nothing was started" in shown, shown
    assert "no answer (offline, busy" in shown
    assert fleet.cli_json("jobs", "list") == []


def test_a_gateway_whose_precheck_fails_is_left_out_unless_forced(fleet: Fleet) -> None:
    with tiny_filesystem(fleet.root / "gw-small", "600k"):
        fleet.start_gateway("gw-small")
        fleet.start_gateway("gw-1")
        fleet.wait_gateways({"gw-small": BASE, "gw-1": BASE})
        fleet.release("1.1.0")

        plan = fleet.cli_json("upgrade", "--latest", "--dry-run")
        small = next(g for g in plan["gateways"] if g["id"] == "gw-small")
        assert "free in" in small["precheck"] and "need" in small["precheck"], small

        started = fleet.cli("upgrade", "--latest", "--wait", "--yes", "--json", check=False)
        assert started.returncode == 1, started.stderr  # PARTIAL: not every gateway upgraded
        job = json.loads(started.stdout)
        rows = {g["id"]: g for g in job["gateways"]}
        assert rows["gw-1"]["state"] == "SUCCEEDED", job
        assert rows["gw-small"]["state"] == "SKIPPED", job
        assert rows["gw-small"]["error"].startswith("pre-check: only"), job
        assert job["state"] == "PARTIAL"
        assert fleet.greeting("gw-small").endswith(BASE)

        # Every gateway failing: nothing starts, and the CLI says why.
        refused = fleet.cli("upgrade", "--latest", "--gateways", "gw-small", "--yes", check=False)
        assert refused.returncode == 4, refused.stderr
        assert "every gateway failed its pre-check" in refused.stderr
        assert "--force" in refused.stderr
        jobs = fleet.cli_json("jobs", "list")
        assert len(jobs) == 1, "the refused upgrade must not exist"

        # --force starts it anyway (the pre-check's margin, twice the artifact, is more
        # than the swap itself may need): it runs, and ends as its own try says.
        forced = fleet.cli(
            "upgrade", "--latest", "--gateways", "gw-small", "--force", "--wait", "--yes",
            "--json", check=False,
        )  # fmt: skip
        (row,) = json.loads(forced.stdout)["gateways"]
        assert row["state"] in ("SUCCEEDED", "FAILED"), row
        if row["state"] == "FAILED":
            # The disk filled during the download: the gateway says so, it is not retried.
            assert "No space left on device" in row["error"], row
            assert "free space there" in row["error"], row
        serving = "1.1.0" if row["state"] == "SUCCEEDED" else BASE
        wait_for(
            lambda: fleet.greeting("gw-small").endswith(serving),
            timeout=30,
            what=f"gw-small serving {serving}",
        )
