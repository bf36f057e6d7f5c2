"""The two databases the controller supports, for tests parametrized over both."""

from __future__ import annotations

from pathlib import Path

import pytest

# Pass as ``params`` of a fixture; the PostgreSQL case carries the ``postgres`` marker.
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of the kind ``request.param`` names."""
    if request.param == "sqlite":
        # A subdirectory that does not exist yet: make_engine must create it.
        return f"sqlite:///{tmp_path / 'data' / 'controller.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url
