"""The controller moves to a new release inline: no failed call, jobs carry on across it,
and a broken new version leaves the old one in charge."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from hitless.config import HostPort
from hitless.v1 import controller_pb2
from tests.support import controller_releases
from tests.support.fleet import Fleet
from tests.support.proxy import CuttingProxy
from tests.support.wait import wait_for
from upgradectl.client import ControllerClient
from upgradectl.credentials import Credentials
from upgradectl.errors import CliError

BASE = "1.0.0"


class Caller:
    """Calls ListGateways and GetJob in a loop, with WatchJob open, the way upgradectl
    does (retrying on UNAVAILABLE, resuming the stream); counts what fails anyway."""

    def __init__(self, fleet: Fleet, job_id: str) -> None:
        host, port = fleet.controller_address.split(":")
        self.client = ControllerClient(
            HostPort(host, int(port)),
            timeout=10,
            ca_cert=fleet.ca_cert.read_bytes(),
            credentials=Credentials(fleet.token, "the fleet's admin token"),
        )
        self.job_id = job_id
        self.calls = 0
        self.failures: list[str] = []
        self.events = 0
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, daemon=True),
            threading.Thread(target=self._watch, daemon=True),
        ]

    def __enter__(self) -> Caller:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        self.client.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.client.list_gateways()
                self.client.get_job(self.job_id)
                self.calls += 2
            except CliError as exc:
                self.failures.append(str(exc))

    def _watch(self) -> None:
        try:
            for _ in self.client.watch_job(self.job_id, 0):
                self.events += 1
        except CliError as exc:
            self.failures.append(f"watch: {exc}")


def _controller(fleet: Fleet) -> controller_pb2.ControllerInfo:
    return fleet.stub().GetController(controller_pb2.GetControllerRequest(), timeout=10)


def _serving_pid(fleet: Fleet) -> int | None:
    """The pid answering now, or None while a hand-over turns calls away (a raw stub
    does not retry as upgradectl does)."""
    try:
        return _controller(fleet).pid
    except grpc.RpcError as exc:
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            return None
        raise


def _upgrade_controller(fleet: Fleet, version: str) -> controller_pb2.ControllerInfo:
    request = controller_pb2.UpgradeControllerRequest(version=version)
    return fleet.stub().UpgradeController(request, timeout=120)


@pytest.fixture
def stalled_fleet(fleet: Fleet) -> Iterator[tuple[Fleet, threading.Event]]:
    """Two gateways whose downloads hang until the test opens the gate."""
    gate = threading.Event()
    with CuttingProxy(("127.0.0.1", fleet.gateway_port), gate=gate) as proxy:
        for gid in ("gw-1", "gw-2"):
            fleet.start_gateway(gid, controller=f"127.0.0.1:{proxy.port}")
        fleet.wait_gateways({"gw-1": BASE, "gw-2": BASE})
        try:
            yield fleet, gate
        finally:
            gate.set()


def test_a_job_runs_on_across_controller_upgrades_with_no_failed_call(
    stalled_fleet: tuple[Fleet, threading.Event],
) -> None:
    fleet, gate = stalled_fleet
    before = _controller(fleet)
    fleet.release("1.1.0")
    fleet.release("1.2.0")
    # The plan says so before anything starts.
    plan = fleet.cli_json("upgrade", "--version", "1.1.0", "--dry-run")
    assert plan["controller_from"] == before.version
    states = [(g["id"], g["state"]) for g in plan["gateways"]]
    assert states == [("gw-1", "ONLINE"), ("gw-2", "ONLINE")]
    # The job moves the controller to 1.1.0 first, then the gateways start downloading
    # (and stall at the gate; their pre-checks would report the gate shut, so none).
    job = fleet.cli_json("upgrade", "--version", "1.1.0", "--yes", "--no-precheck")
    wait_for(
        lambda: all(
            g["state"] == "DOWNLOADING" for g in fleet.cli_json("status", job["job_id"])["gateways"]
        ),
        timeout=60,
        what="the gateways downloading from the upgraded controller",
        describe=fleet.procs.dump_logs,
    )
    wait_for(
        lambda: _serving_pid(fleet) not in (None, before.pid),
        timeout=30,
        what="the upgraded controller answering",
    )
    assert _controller(fleet).version == "1.1.0"

    with Caller(fleet, job["job_id"]) as caller:
        wait_for(lambda: caller.calls > 20, timeout=10, what="calls flowing")
        second = _upgrade_controller(fleet, "1.2.0")  # mid-job, mid-download
        assert second.version == "1.2.0"
        wait_for(
            lambda: _serving_pid(fleet) == second.pid,
            timeout=10,
            what="every call served by the new controller",
        )
        calls_at_swap = caller.calls
        gate.set()
        status = wait_for(
            lambda: (s := fleet.cli_json("status", job["job_id"]))["state"] == "SUCCEEDED" and s,
            timeout=60,
            what="the job to finish under the new controller",
            describe=fleet.procs.dump_logs,
        )
        wait_for(lambda: caller.calls > calls_at_swap + 20, timeout=10, what="more calls")
    assert caller.failures == [], caller.failures[:5]
    assert caller.events > 0
    assert [g["state"] for g in status["gateways"]] == ["SUCCEEDED", "SUCCEEDED"]
    fleet.wait_gateways({"gw-1": "1.1.0", "gw-2": "1.1.0"})
    assert fleet.controller is not None and fleet.controller.popen.poll() == 0, (
        "the first controller should have handed over and exited cleanly"
    )


@pytest.mark.parametrize(
    ("broken", "why"),
    [
        ("crash", "RuntimeError: this controller crashes at start"),
        ("bad-migration", "this migration fails half way"),
    ],
)
def test_a_broken_controller_release_leaves_the_old_one_in_charge(
    fleet: Fleet, tmp_path: Path, broken: str, why: str
) -> None:
    fleet.start_gateway("gw-1")
    fleet.wait_gateways({"gw-1": BASE})
    before = _controller(fleet)
    artifact = controller_releases.build("1.1.0", tmp_path / "broken.pyz", broken)
    fleet.cli(
        "releases", "publish", "--version", "1.1.0", "--artifact", str(artifact),
        "--keys", str(fleet.keys.dir),
    )  # fmt: skip

    result = fleet.cli("upgrade", "--latest", "--yes", "--wait", "--json", check=False)
    assert result.returncode == 1, result.stderr
    job = json.loads(result.stdout)
    assert job["state"] == "FAILED"
    (gateway,) = job["gateways"]
    assert "the controller could not move to 1.1.0" in gateway["error"]
    assert why in gateway["error"]
    after = _controller(fleet)
    assert (after.version, after.pid) == (before.version, before.pid)
    assert fleet.greeting("gw-1").endswith(BASE), "no gateway may be touched"
    # The old controller's schema is intact and it keeps working on it.
    assert [r["version"] for r in fleet.cli_json("releases", "list")] == ["1.1.0"]
    with pytest.raises(grpc.RpcError) as info:
        _upgrade_controller(fleet, "1.1.0")
    assert why in (info.value.details() or "")
    assert _controller(fleet).pid == before.pid
