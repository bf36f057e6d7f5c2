"""The controller's trust root and online keys, as an operator gives them, and its own
upgrade refused for a release that does not verify (issue 10's contract)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from hitless.trust import keys
from hitless.v1 import controller_pb2
from tests.support.fleet import Fleet
from tests.support.procs import command, free_port
from tests.support.rabbit import amqp_url

BASE = "1.0.0"  # the version of the installed package


def test_a_controller_without_a_trust_root_does_not_start(vhost: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HITLESS_TRUST_ROOT"}
    data = tmp_path / "data"
    done = _serve(vhost, data, env=env)
    assert done.returncode == 2, done.stderr
    assert "the controller needs a trust root: give --trust-root FILE" in done.stderr
    assert "or set HITLESS_TRUST_ROOT" in done.stderr
    assert not (data / "controller.db").exists()


def test_the_trust_root_from_the_environment_and_online_keys_kept_elsewhere(
    fleet: Fleet, tmp_path: Path
) -> None:
    """The controller host holds root.json and online/ only; here online/ is moved away
    from beside root.json, so the controller signs with what --online-keys names or
    with nothing."""
    fleet.procs.stop(fleet.controller)  # type: ignore[arg-type]
    elsewhere = tmp_path / "controller-keys"
    shutil.move(fleet.keys.dir / "online", elsewhere)
    fleet.start_controller(None, "--online-keys", str(elsewhere), trust_root_in_env=True)
    fleet.release("1.1.0")
    (listed,) = fleet.cli_json("releases", "list")
    assert (listed["version"], listed["signing"]) == ("1.1.0", "SIGNED")


def _refused(fleet: Fleet, version: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as refused:
        fleet.stub().UpgradeController(
            controller_pb2.UpgradeControllerRequest(version=version), timeout=120
        )
    return refused.value


def test_the_controller_refuses_to_move_to_a_yanked_or_altered_release(fleet: Fleet) -> None:
    fleet.release("1.1.0")
    fleet.cli("releases", "yank", "1.1.0", "--keys", str(fleet.keys.dir), "--yes")
    yanked = _refused(fleet, "1.1.0")
    assert yanked.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "1.1.0" in (yanked.details() or "") and "yanked" in (yanked.details() or "")

    fleet.release("1.2.0")
    release = next(r for r in fleet.cli_json("releases", "list") if r["version"] == "1.2.0")
    blob = fleet.data_dir / "artifacts" / release["sha256"][:2] / release["sha256"]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    altered = _refused(fleet, "1.2.0")
    assert "did not stage 1.2.0" in (altered.details() or ""), altered.details()

    info = fleet.stub().GetController(controller_pb2.GetControllerRequest(), timeout=10)
    assert info.version == BASE
    assert not list((fleet.data_dir / "releases").glob("1.2.0-*.pyz"))


def test_a_controller_that_fails_to_start_closes_its_database(vhost: str, tmp_path: Path) -> None:
    # It migrates its database, then finds no broker management API where it was told:
    # its exit must still close the database (SQLite then removes its -wal and -shm
    # files). Exiting without the interpreter's final collections (hitless.heap), only
    # an explicit close does.
    data = tmp_path / "data"
    done = _serve(
        vhost, data,
        "--trust-root", str(keys.init(tmp_path / "keys").root_json),
        "--broker-api", f"http://guest:guest@127.0.0.1:{free_port()}/",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "management" in done.stderr, done.stderr
    assert (data / "controller.db").exists()
    left = sorted(p.name for p in data.iterdir() if p.name.startswith("controller.db"))
    assert left == ["controller.db"], left


def _serve(
    vhost: str, data: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``controller-svc serve`` on ``data`` with ``extra`` arguments, run until it exits
    (the tests here give it what makes it exit)."""
    argv = [
        command("controller-svc"), "serve",
        "--listen", f"127.0.0.1:{free_port()}",
        "--data-dir", str(data),
        "--amqp", amqp_url(vhost),
        *extra,
    ]  # fmt: skip
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
