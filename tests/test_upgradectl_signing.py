"""upgradectl's signing against what the controller serves: what is checked and signed
before anything is sent (the controller's answer to GetTargetsMetadata given directly;
the whole path through a real controller is in ``test_signed_releases``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest

from hitless.trust import keys as trust_keys
from upgradectl import signing
from upgradectl.client import ControllerClient
from upgradectl.errors import Rejected


class _Serving:
    """A controller that serves ``data`` as its current targets (None: none yet)."""

    def __init__(self, data: bytes | None) -> None:
        self.data = data

    def get_targets_metadata(self) -> bytes | None:
        return self.data


def _controller(data: bytes | None) -> ControllerClient:
    return cast(ControllerClient, cast(Any, _Serving(data)))


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    trust_keys.init(tmp_path / "keys")
    return tmp_path / "keys"


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    path = tmp_path / "a.pyz"
    path.write_bytes(b"release 1.0.0")
    return path


def test_an_artifact_the_targets_list_already_is_not_signed_again(
    keys_dir: Path, artifact: Path
) -> None:
    first = signing.sign_release(_controller(None), keys_dir, "1.0.0", artifact)
    assert (first.previous_version, first.version) == (0, 1)

    again = signing.sign_release(_controller(first.data), keys_dir, "1.0.0", artifact)
    assert again.data == first.data
    assert (again.previous_version, again.version) == (1, 1)

    # Another build under the same version is a change: signed as the next version (and
    # refused by the controller as a conflict, since a version names one build).
    artifact.write_bytes(b"release 1.0.0, rebuilt")
    other = signing.sign_release(_controller(first.data), keys_dir, "1.0.0", artifact)
    assert (other.previous_version, other.version) == (1, 2)


def test_a_controller_with_no_targets_after_this_directory_published_is_refused(
    keys_dir: Path, artifact: Path
) -> None:
    first = signing.sign_release(_controller(None), keys_dir, "1.0.0", artifact)
    signing.taken(keys_dir, first.data)

    with pytest.raises(Rejected, match="serves no signed targets, but it took version 1") as caught:
        signing.sign_release(_controller(None), keys_dir, "1.1.0", artifact)
    assert "another controller" in str(caught.value)
    assert "Nothing was signed" in str(caught.value)
    assert (keys_dir / "targets.json").read_bytes() == first.data
