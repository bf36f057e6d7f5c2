"""The whole path, with real processes: upgradectl -> controller -> RabbitMQ -> gateway
daemons -> gRPC download -> verify -> handoff to the new version -> reports -> database."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

from tests.support.fleet import Fleet
from tests.support.procs import Procs
from tests.support.rabbit import amqp_url
from tests.support.wait import wait_for

BASE = "1.0.0"  # the version of the installed package (pyproject.toml)


class Prober:
    """Connects to a gateway's listener in a loop and records what answers."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.versions: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                    data = sock.recv(256).decode()
            except OSError as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            version = data.split()[-1] if data else "<empty>"
            if not self.versions or self.versions[-1] != version:
                self.versions.append(version)


def test_fleet_upgrades_to_latest_and_no_connection_is_refused(fleet: Fleet) -> None:
    gateways = ["gw-1", "gw-2", "gw-3"]
    for gid in gateways:
        fleet.start_gateway(gid)
    fleet.wait_gateways(dict.fromkeys(gateways, BASE))
    fleet.release("1.1.0")

    probers = [Prober(fleet.gateway_ports[gid]) for gid in gateways]
    for prober in probers:
        prober.__enter__()
    try:
        wait_for(lambda: all(p.versions for p in probers), timeout=10, what="probes answered")
        job = fleet.cli_json("upgrade", "--latest", "--wait", "--yes")
        for prober in probers:
            wait_for(
                lambda p=prober: p.versions[-1] == "1.1.0",
                timeout=10,  # type: ignore[misc]
                what="the listener to answer with the new version",
            )
    finally:
        for prober in probers:
            prober.__exit__()

    assert job["target_version"] == "1.1.0"
    assert job["state"] == "SUCCEEDED"
    assert {g["id"]: g["state"] for g in job["gateways"]} == dict.fromkeys(gateways, "SUCCEEDED")
    assert all(g["from_version"] == BASE and g["to_version"] == "1.1.0" for g in job["gateways"])
    for prober in probers:
        assert prober.errors == [], f"connections failed during the swap: {prober.errors[:5]}"
        assert prober.versions == [BASE, "1.1.0"]
    fleet.wait_gateways(dict.fromkeys(gateways, "1.1.0"))
    status = fleet.cli_json("status", job["job_id"])
    assert status["state"] == "SUCCEEDED"
    assert [g["id"] for g in status["gateways"]] == gateways


def test_upgraded_gateway_upgrades_again(fleet: Fleet) -> None:
    fleet.start_gateway("gw-1")
    fleet.wait_gateways({"gw-1": BASE})
    fleet.release("1.1.0")
    first = fleet.cli_json("upgrade", "--version", "1.1.0", "--wait", "--yes")
    assert first["state"] == "SUCCEEDED"
    assert fleet.greeting("gw-1") == "hitless-gateway gw-1 1.1.0"

    fleet.release("1.2.0")
    second = fleet.cli_json("upgrade", "--latest", "--wait", "--yes")
    assert second["state"] == "SUCCEEDED"
    assert second["gateways"][0]["from_version"] == "1.1.0"
    assert fleet.greeting("gw-1") == "hitless-gateway gw-1 1.2.0"
    fleet.wait_gateways({"gw-1": "1.2.0"})


def test_corrupted_artifact_is_rejected_before_the_swap(fleet: Fleet) -> None:
    # The controller alone here: moving itself first, it would catch the corruption
    # before any gateway sees it (tests/test_controller_upgrade.py).
    fleet.procs.stop(fleet.controller)  # type: ignore[arg-type]
    fleet.start_controller(None, "--no-self-upgrade")
    fleet.start_gateway("gw-1")
    fleet.wait_gateways({"gw-1": BASE})
    fleet.release("1.1.0")
    release = fleet.cli_json("releases", "list")[0]
    blob = fleet.data_dir / "artifacts" / release["sha256"][:2] / release["sha256"]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content: a rotten disk
    blob.write_bytes(bytes(data))

    result = fleet.cli("upgrade", "--version", "1.1.0", "--wait", "--yes", "--json", check=False)
    assert result.returncode == 1, result.stderr
    job = json.loads(result.stdout)
    assert job["state"] == "FAILED"
    (gateway,) = job["gateways"]
    assert gateway["state"] == "FAILED"
    assert "verification failed:" in gateway["error"]
    assert "is not the signed target 'hitless-1.1.0.pyz'" in gateway["error"]
    assert fleet.greeting("gw-1") == f"hitless-gateway gw-1 {BASE}"
    assert fleet.gateways()["gw-1"]["version"] == BASE


def test_unknown_version_is_refused_and_nothing_starts(fleet: Fleet) -> None:
    fleet.start_gateway("gw-1")
    fleet.wait_gateways({"gw-1": BASE})
    fleet.release("1.1.0")
    result = fleet.cli("upgrade", "--version", "9.9.9", "--yes", check=False)
    assert result.returncode == 4
    assert "unknown version 9.9.9; available: 1.1.0" in result.stderr
    status = fleet.cli("status", check=False)
    assert status.returncode == 4
    assert "no upgrade job has run yet" in status.stderr


def test_fleet_upgrade_with_the_controller_on_postgresql(
    vhost: str, tmp_path: Path, procs: Procs, pg_url: str
) -> None:
    fleet = Fleet(procs, tmp_path, amqp_url(vhost))
    fleet.start_controller(pg_url)
    for gid in ("gw-1", "gw-2"):
        fleet.start_gateway(gid)
    fleet.wait_gateways({"gw-1": BASE, "gw-2": BASE})
    fleet.release("1.1.0")
    job = fleet.cli_json("upgrade", "--latest", "--wait", "--yes")
    assert job["state"] == "SUCCEEDED"
    assert [g["state"] for g in job["gateways"]] == ["SUCCEEDED", "SUCCEEDED"]
    fleet.wait_gateways({"gw-1": "1.1.0", "gw-2": "1.1.0"})


def test_downgrade_needs_consent_and_the_same_version_is_nothing_to_do(fleet: Fleet) -> None:
    fleet.start_gateway("gw-1")
    fleet.wait_gateways({"gw-1": BASE})
    fleet.release("1.0.5")
    fleet.release("1.1.0")
    upgraded = fleet.cli_json("upgrade", "--version", "1.1.0", "--wait", "--yes")
    assert upgraded["state"] == "SUCCEEDED"

    same = fleet.cli_json("upgrade", "--version", "1.1.0", "--yes")
    assert same["state"] == "NOTHING_TO_DO"

    refused = fleet.cli("upgrade", "--version", "1.0.5", "--yes", check=False)
    assert refused.returncode == 4
    assert "--allow-downgrade" in refused.stderr
    assert fleet.greeting("gw-1").endswith("1.1.0")

    job = fleet.cli_json("upgrade", "--version", "1.0.5", "--allow-downgrade", "--wait", "--yes")
    assert job["state"] == "SUCCEEDED"
    assert fleet.greeting("gw-1").endswith("1.0.5")
