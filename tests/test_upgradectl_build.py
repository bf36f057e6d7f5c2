"""Release artifacts built for real, and run for real in fresh interpreters."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from hitless.errors import ConfigError
from upgradectl.build import PACKAGES, build_release, compile_sources
from upgradectl.cli import main
from upgradectl.errors import BuildError, ExitCode

VERSION = "7.3.1"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("release") / "hitless.pyz"
    built = build_release(VERSION, path)
    data = path.read_bytes()
    assert built.size == len(data)
    assert built.sha256 == hashlib.sha256(data).hexdigest()
    return path


def _python(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_artifact_holds_every_package_the_stamp_and_an_entry_point(artifact: Path) -> None:
    with zipfile.ZipFile(artifact) as zf:
        names = set(zf.namelist())
        release = zf.read("hitless/RELEASE").decode()
    for package in PACKAGES:
        assert f"{package}/__init__.py" in names, f"{package} missing from {sorted(names)}"
    assert "hitless/v1/controller_pb2.py" in names
    assert "upgradectl/cli.py" in names
    assert "__main__.py" in names
    assert release.strip() == VERSION
    assert not [n for n in names if "__pycache__" in n]
    # Each module's bytecode beside its source, and no other: unchecked hash-based pycs
    # (PEP 552 flags 0b01) of this interpreter's Python version.
    sources = {n for n in names if n.endswith(".py")}
    assert {n for n in names if n.endswith(".pyc")} == {n + "c" for n in sources}
    with zipfile.ZipFile(artifact) as zf:
        headers = {zf.read(n + "c")[:8] for n in sources}
    assert headers == {importlib.util.MAGIC_NUMBER + (1).to_bytes(4, "little")}


def test_a_release_runs_its_modules_from_their_bytecode_and_shows_their_source(
    artifact: Path, tmp_path: Path
) -> None:
    code = (
        f"import sys, traceback; sys.path.insert(0, {str(artifact)!r})\n"
        "import gateway_daemon.agent as agent\n"
        "print(agent.__file__, agent.Agent.handle.__code__.co_filename)\n"
        "from hitless import semver\n"
        "try:\n"
        "    semver.parse('not-a-version')\n"
        "except Exception:\n"
        "    traceback.print_exc()\n"
    )
    proc = _python("-c", code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    where, compiled_as = proc.stdout.split()
    assert where == f"{artifact}/gateway_daemon/agent.pyc"
    assert compiled_as == "<release>/gateway_daemon/agent.py"
    # A traceback names the module by its path in the release and quotes its source.
    lines = proc.stderr.splitlines()
    frame = next(i for i, line in enumerate(lines) if 'File "<release>/hitless/semver.py"' in line)
    assert lines[frame + 1].strip(), proc.stderr


def test_another_python_version_runs_a_release_from_its_sources(
    artifact: Path, tmp_path: Path
) -> None:
    """Bytecode of another Python version (another magic number) is passed over, and the
    modules are compiled from their sources as before."""
    other = tmp_path / "other-python.pyz"
    with zipfile.ZipFile(artifact) as src, zipfile.ZipFile(other, "w") as out:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith(".pyc"):
                data = b"\x00\x00\r\n" + data[4:]
            out.writestr(info, data)
    code = (
        f"import sys; sys.path.insert(0, {str(other)!r})\n"
        "import gateway_daemon.agent as agent\n"
        "print(agent.Agent.handle.__code__.co_filename)\n"
    )
    proc = _python("-c", code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{other}/gateway_daemon/agent.py"
    proc = _python(str(other), "--version", cwd=tmp_path)
    assert (proc.returncode, proc.stdout.strip()) == (0, VERSION), proc.stderr


def test_artifact_runs_upgradectl(artifact: Path, tmp_path: Path) -> None:
    proc = _python(str(artifact), "upgradectl", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "usage: upgradectl" in proc.stdout
    assert "releases" in proc.stdout


def test_artifact_reports_its_version_and_rejects_unknown_commands(
    artifact: Path, tmp_path: Path
) -> None:
    proc = _python(str(artifact), "--version", cwd=tmp_path)
    assert (proc.returncode, proc.stdout.strip()) == (0, VERSION), proc.stderr
    proc = _python(str(artifact), "frobnicate", cwd=tmp_path)
    assert proc.returncode == 2
    assert "gateway-daemon" in proc.stderr


def test_stamp_shadows_the_installed_package(artifact: Path, tmp_path: Path) -> None:
    code = (
        f"import sys; sys.path.insert(0, {str(artifact)!r}); "
        "from hitless import version; print(version.current()); print(version.__file__)"
    )
    proc = _python("-c", code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    current, where = proc.stdout.split()
    assert current == VERSION
    assert where.startswith(str(artifact)), f"hitless.version came from {where}"


def test_builds_are_reproducible_from_source_and_from_inside_a_release(
    artifact: Path, tmp_path: Path
) -> None:
    again = tmp_path / "again.pyz"
    build_release(VERSION, again)
    assert again.read_bytes() == artifact.read_bytes()

    # The release builds its successor from its own zipped code: same code, same bytes.
    from_release = tmp_path / "from-release.pyz"
    proc = _python(
        str(artifact),
        "upgradectl",
        "releases",
        "build",
        "--version",
        VERSION,
        "-o",
        str(from_release),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert from_release.read_bytes() == artifact.read_bytes()


def test_another_version_differs_only_in_its_stamp(artifact: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.pyz"
    build_release("7.4.0", other)
    with zipfile.ZipFile(artifact) as a, zipfile.ZipFile(other) as b:
        assert a.namelist() == b.namelist()
        differing = [n for n in a.namelist() if a.read(n) != b.read(n)]
    assert differing == ["hitless/RELEASE"]


def test_bad_version_is_a_usage_error_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bad.pyz"
    with pytest.raises(ConfigError):
        build_release("1.2", out)
    code = main(["releases", "build", "--version", "v1.2", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == ExitCode.USAGE
    assert "upgradectl: error: invalid version 'v1.2': expected MAJOR.MINOR.PATCH" in err
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_is_reported_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["releases", "build", "--version", VERSION, "-o", str(tmp_path / "no" / "x")])
    err = capsys.readouterr().err
    assert code == ExitCode.INTERNAL
    assert err.startswith("upgradectl: error: cannot write ")
    assert "Traceback" not in err


def test_build_says_the_artifact_is_not_signed_yet_and_how_it_gets_signed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hitless 7.3.1.pyz"
    assert main(["releases", "build", "--version", VERSION, "-o", str(out)]) == ExitCode.OK
    lines = capsys.readouterr().out.splitlines()
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert lines[0].startswith(f"built '{out}': release {VERSION}, ")
    assert lines[0].endswith(f", sha256 {digest}")
    assert lines[1].startswith("not signed yet: gateways and the controller take it only once ")
    # The command to paste, the path quoted for the shell.
    assert lines[2] == (
        f"  upgradectl releases publish --version {VERSION} --artifact '{out}' --keys DIR"
    )


def test_a_module_that_does_not_compile_fails_the_build_and_says_which() -> None:
    with pytest.raises(BuildError, match=r"gateway_daemon/broken\.py"):
        compile_sources({"gateway_daemon/broken.py": b"def broken(:\n"})


def test_modules_in_the_working_directory_do_not_reach_the_compiler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "tempfile.py").write_text("raise RuntimeError('a local tempfile.py ran')\n")
    monkeypatch.chdir(tmp_path)
    compiled = compile_sources({"hitless/example.py": b"X = 1\n"})
    assert list(compiled) == ["hitless/example.pyc"]
