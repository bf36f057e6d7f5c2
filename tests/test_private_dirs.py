"""Where a gateway and the controller keep state, releases, downloads and keys is private
(0700), also when an earlier release made those directories with the default mode."""

from __future__ import annotations

from pathlib import Path

from gateway_daemon.state import AgentState
from hitless.private import private_dir


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_a_new_directory_is_made_private(tmp_path: Path) -> None:
    made = private_dir(tmp_path / "a" / "b")
    assert made == tmp_path / "a" / "b"
    assert _mode(made) == 0o700


def test_an_existing_directory_is_tightened_and_its_parent_left_alone(tmp_path: Path) -> None:
    parent = tmp_path / "var"
    (parent / "state").mkdir(parents=True)
    parent.chmod(0o755)
    (parent / "state").chmod(0o755)
    private_dir(parent / "state")
    assert _mode(parent / "state") == 0o700
    assert _mode(parent) == 0o755


def test_a_gateway_state_directory_from_an_earlier_release_becomes_private(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    for sub in ("", "releases", "downloads"):
        (state / sub).mkdir(parents=True, exist_ok=True)
        (state / sub).chmod(0o755)
    (state / "agent.json").write_text('{"current": null, "outcomes": {}}')
    AgentState(state)
    assert {sub: _mode(state / sub) for sub in ("", "releases", "downloads")} == {
        "": 0o700,
        "releases": 0o700,
        "downloads": 0o700,
    }
    assert (state / "agent.json").read_text() == '{"current": null, "outcomes": {}}'
