"""The bus loses nothing: a broker restart in the middle of an upgrade, and a command for
a gateway that is away past the job's deadline."""

from __future__ import annotations

import subprocess
import threading

import pytest

from hitless.v1 import common_pb2, controller_pb2
from tests.support.fleet import Fleet
from tests.support.proxy import CuttingProxy
from tests.support.rabbit import Management
from tests.support.wait import wait_for

BASE = "1.0.0"


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


@pytest.mark.broker_restart
def test_an_upgrade_survives_a_broker_restart(fleet: Fleet, rabbit: Management) -> None:
    gateways = ["gw-1", "gw-2", "gw-3"]
    # The fleet alone: this is about the broker, not the controller's own upgrade.
    fleet.procs.stop(fleet.controller)  # type: ignore[arg-type]
    fleet.start_controller(None, "--no-self-upgrade")
    # Downloads go through a proxy held shut, so every gateway is mid-upgrade
    # (DOWNLOADING) while the broker restarts.
    gate = threading.Event()
    with CuttingProxy(("127.0.0.1", fleet.gateway_port), gate=gate) as proxy:
        for gid in gateways:
            fleet.start_gateway(gid, controller=f"127.0.0.1:{proxy.port}")
        fleet.wait_gateways(dict.fromkeys(gateways, BASE))
        fleet.release("1.1.0")
        # No pre-check: it would find the downloads held shut and leave every gateway out.
        job = fleet.cli_json("upgrade", "--latest", "--yes", "--no-precheck")
        wait_for(
            lambda: all(
                g["state"] == "DOWNLOADING"
                for g in fleet.cli_json("status", job["job_id"])["gateways"]
            ),
            timeout=30,
            what="every gateway downloading",
        )
        try:
            _rabbitmqctl("stop_app")
        finally:
            _rabbitmqctl("start_app")
            gate.set()
        wait_for(rabbit.available, timeout=60, what="the management API back")
        # The downloads go through the proxy: it stays until the job has finished.
        status = wait_for(
            lambda: (s := fleet.cli_json("status", job["job_id"]))["state"] == "SUCCEEDED" and s,
            timeout=90,
            what="the job to finish after the restart",
            interval=0.5,
            describe=fleet.procs.dump_logs,
        )
    assert [g["state"] for g in status["gateways"]] == ["SUCCEEDED"] * 3
    fleet.wait_gateways(dict.fromkeys(gateways, "1.1.0"), timeout=60)
    for proc in fleet.procs.started():
        if proc.name in gateways:
            assert '"bus_unreachable"' in proc.log(), f"{proc.name} never lost the broker"
    # Every gateway's own reports reached the database, not only a final state.
    request = controller_pb2.WatchJobRequest(job_id=job["job_id"])
    events = list(fleet.stub().WatchJob(request, timeout=30))
    for gid in gateways:
        seen = {e.gateway_state for e in events if e.gateway_id == gid}
        wanted = {common_pb2.GATEWAY_JOB_STATE_SWAPPING, common_pb2.GATEWAY_JOB_STATE_SUCCEEDED}
        assert wanted <= seen, f"{gid}: reports missing, saw states {sorted(seen)}"


def test_an_offline_gateway_becomes_unreachable_and_never_runs_the_stale_command(
    fleet: Fleet,
) -> None:
    away = fleet.start_gateway("gw-away")
    fleet.start_gateway("gw-1")
    fleet.wait_gateways({"gw-away": BASE, "gw-1": BASE})
    fleet.procs.stop(away)
    fleet.release("1.1.0")

    request = controller_pb2.StartUpgradeRequest(latest=True, deadline_seconds=15)
    job_id = fleet.stub().StartUpgrade(request, timeout=30).job_id
    status = wait_for(
        lambda: (s := fleet.cli_json("status", job_id))["state"] in ("PARTIAL", "FAILED") and s,
        timeout=60,
        what="the job to finish",
        interval=0.5,
    )
    by_id = {g["id"]: g for g in status["gateways"]}
    assert status["state"] == "PARTIAL"
    assert by_id["gw-1"]["state"] == "SUCCEEDED"
    assert by_id["gw-away"]["state"] == "UNREACHABLE"
    assert "expired before the gateway took it" in by_id["gw-away"]["error"]

    back = fleet.start_gateway("gw-away")
    wait_for(
        lambda: (
            back.log().count('"gateway_serving"') >= 2
            and '"bus_consuming"' in back.log().split('"gateway_serving"')[-1]
        ),
        timeout=30,
        what="the gateway back and consuming",
    )
    fleet.wait_gateways({"gw-away": BASE})
    assert fleet.greeting("gw-away").endswith(BASE)
    assert '"upgrade_started"' not in back.log()
