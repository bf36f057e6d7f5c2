"""The checked-in generated code is exactly what `make proto` produces from proto/."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "proto").rglob("*.proto"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            "proto",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            *protos,
        ],
        cwd=ROOT,
        check=True,
    )
    fresh = _generated(tmp_path)
    checked_in = _generated(ROOT / "hitless", ROOT)
    assert fresh == checked_in, "generated files differ in name: run `make proto`"
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, ROOT / p, shallow=False)]
    assert stale == [], f"stale generated code in {stale}: run `make proto` and commit"


def _generated(root: Path, relative_to: Path | None = None) -> list[Path]:
    """The generated sources below ``root`` (bytecode caches are no source)."""
    found = (p for p in root.rglob("*_pb2*") if p.suffix in (".py", ".pyi"))
    return sorted(p.relative_to(relative_to or root) for p in found)
