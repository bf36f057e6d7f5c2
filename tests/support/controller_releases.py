"""Releases whose controller fails, for inline controller upgrade tests."""

from __future__ import annotations

from pathlib import Path

from alembic.script import ScriptDirectory

from controller_svc.db import alembic_config
from tests.support import releases
from upgradectl.build import build_release


def _head() -> str:
    """The newest revision of the code under test, for a broken one to follow."""
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


# What to add to a release for each way its controller breaks: file -> appended text
# (a file the release does not have is created).
BROKEN = {
    "crash": {
        "controller_svc/app.py": '\nraise RuntimeError("this controller crashes at start")\n'
    },
    "bad-migration": {
        "migrations/versions/0099_broken.py": (
            '"""A revision that fails."""\n'
            'revision = "0099"\n'
            f'down_revision = "{_head()}"\n'
            "branch_labels = None\n"
            "depends_on = None\n\n\n"
            "def upgrade() -> None:\n"
            "    from alembic import op\n\n"
            '    op.execute("CREATE TABLE half_done (id INTEGER)")\n'
            '    raise RuntimeError("this migration fails half way")\n'
        )
    },
}


def build(version: str, output: Path, broken: str) -> Path:
    """Release ``version`` at ``output`` whose controller breaks as ``broken`` says."""
    build_release(version, output)
    releases.append(output, BROKEN[broken])
    return output
