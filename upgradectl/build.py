"""Building a release artifact: a zipapp of the product's own code, stamped with a version.

The artifact holds the packages hitless, gateway_daemon, controller_svc, notifier,
upgradectl and migrations exactly as the running code has them (read through
``importlib.resources``, so building works from the source tree and from inside another
release), a ``hitless/RELEASE`` file with the version (``hitless.version.current`` reads
it), and a ``__main__.py`` that runs one of the product's commands::

    python app.pyz gateway-daemon ARGS...     gateway_daemon.cli:main
    python app.pyz controller-svc ARGS...     controller_svc.cli:main
    python app.pyz notifier ARGS...           notifier.cli:main
    python app.pyz upgradectl ARGS...         upgradectl.cli:main

Third-party dependencies (pika, grpcio, protobuf, sqlalchemy, alembic, structlog, ...) are
not inside: they come from the interpreter that runs the zipapp, which must have the
project's dependencies installed. A release that needs a new dependency says so in its
notes.

Each module's bytecode travels beside its source (``pkg/mod.pyc`` next to ``pkg/mod.py``,
the layout ``zipimport`` looks in first), so the processes a release starts do not compile
it again each time: on a gateway every upgrade starts two of them at once, and compiling
the modules they import from source took about a third of their start (the README's
"Bytecode in the release"). The ``.pyc`` files are unchecked hash-based pycs (PEP 552),
written by ``py_compile`` with ``optimize=0``: ``zipimport`` takes them without reading
the source again (nor checking it: a ``.py`` changed inside a built artifact is not what
runs; a published artifact is checked against its signed sha256 anyway). They carry the
building interpreter's magic number; an interpreter of another Python version finds the
number different and compiles the source as before (``zipimport`` passes over bytecode
whose magic number is not its own). The code objects name their file ``<release>/pkg/mod.py``
(``RELEASE_FILES``): a path that exists nowhere, so a traceback's source lines come from
the release itself (``linecache`` asks the module's loader), never from a file of the
same relative name in the working directory.

The build is reproducible: entries are sorted and carry a fixed timestamp and mode, and the
bytecode is compiled in a fresh interpreter (marshal marks the objects it meets more than
once by their reference counts, so its bytes depend on the state of the process that
compiles), so the same version built from the same code by the same CPython release has
the same sha256 wherever it is built.
"""

from __future__ import annotations

import importlib
import marshal
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from hitless import semver
from hitless.digest import file_sha256
from hitless.version import STAMP_PATH
from upgradectl.errors import BuildError

PACKAGES = ("hitless", "gateway_daemon", "controller_svc", "notifier", "upgradectl", "migrations")
SHEBANG = b"#!/usr/bin/env python3\n"
# The earliest instant a zip entry can carry; any fixed value makes builds repeatable.
FIXED_DATE_TIME = (1980, 1, 1, 0, 0, 0)
FILE_MODE = 0o644
_SKIP_DIRS = frozenset({"__pycache__"})
_SKIP_SUFFIXES = (".pyc", ".pyo")

MAIN_PY = '''\
"""Entry point of a hitless release: python app.pyz COMMAND [ARGS...]."""

import importlib
import sys

COMMANDS = {
    "gateway-daemon": "gateway_daemon.cli",
    "controller-svc": "controller_svc.cli",
    "notifier": "notifier.cli",
    "upgradectl": "upgradectl.cli",
}


def _run() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "--version":
        from hitless import version

        print(version.current())
        sys.exit(0)
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        names = ", ".join(sorted(COMMANDS))
        print(f"usage: {sys.argv[0]} COMMAND [ARGS...]; COMMAND is one of {names}, "
              "or --version", file=sys.stderr)
        sys.exit(2)
    command, args = sys.argv[1], sys.argv[2:]
    # Each command names itself in its own usage messages.
    sys.argv = [command, *args]
    main = importlib.import_module(COMMANDS[command]).main
    sys.exit(main(args))


_run()
'''


@dataclass(frozen=True)
class Built:
    """What was written: the artifact's sha256 (lowercase hex) and size in bytes."""

    sha256: str
    size: int


def build_release(version: str, output: Path) -> Built:
    """Write the release artifact for ``version`` to ``output``, atomically.

    Raises ConfigError for a malformed version and BuildError when a package of the product
    is missing from the running code, a module does not compile (``compile_sources``) or
    the file cannot be written.
    """
    stamped = str(semver.parse(version))
    entries = dict(_collect())
    entries[STAMP_PATH] = f"{stamped}\n".encode()
    entries["__main__.py"] = MAIN_PY.encode()
    entries.update(compile_sources({n: d for n, d in entries.items() if n.endswith(".py")}))

    output = output.expanduser()
    directory = output.parent if str(output.parent) else Path(".")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", dir=directory)
    except OSError as exc:
        raise BuildError(f"cannot write {output}: {exc.strerror or exc}") from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(SHEBANG)
            with zipfile.ZipFile(fh, "w") as zf:
                for name in sorted(entries):
                    info = zipfile.ZipInfo(name, date_time=FIXED_DATE_TIME)
                    info.compress_type = zipfile.ZIP_DEFLATED
                    info.external_attr = (0o100000 | FILE_MODE) << 16
                    info.create_system = 3  # Unix, so the mode above means what it says
                    zf.writestr(info, entries[name], compresslevel=9)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.chmod(0o755)
        os.replace(tmp, output)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"cannot write {output}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Built(*file_sha256(output))


# Run by ``compile_sources`` in a fresh interpreter: sources in (a marshalled dict of path
# -> bytes on stdin), pycs out (the same on stdout). ``-S``: no site packages, so every
# build starts from the same interpreter state; ``-P``: nothing imported from the working
# directory (a local tempfile.py would otherwise shadow the standard library's).
_COMPILER = """\
import marshal, os, py_compile, sys, tempfile
sources = marshal.load(sys.stdin.buffer)
compiled = {}
with tempfile.TemporaryDirectory() as tmp:
    source, pyc = os.path.join(tmp, "module.py"), os.path.join(tmp, "module.pyc")
    for name in sorted(sources):
        with open(source, "wb") as fh:
            fh.write(sources[name])
        try:
            py_compile.compile(
                source, cfile=pyc, dfile=sys.argv[1] + name, doraise=True, optimize=0,
                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
            )
        except py_compile.PyCompileError as exc:
            sys.exit(f"{name}: {exc.exc_type_name}: {exc.exc_value}")
        with open(pyc, "rb") as fh:
            compiled[name[:-3] + ".pyc"] = fh.read()
marshal.dump(compiled, sys.stdout.buffer)
"""
# How long compiling every module of a release may take (about a second here).
COMPILE_TIMEOUT_S = 120.0
# What the release's code objects name their files under (module docstring).
RELEASE_FILES = "<release>/"


def compile_sources(sources: dict[str, bytes]) -> dict[str, bytes]:
    """The bytecode of each Python source in ``sources`` (archive path -> source), keyed by
    the path of its ``.pyc`` beside it: compiled by this interpreter's ``py_compile`` in a
    fresh process (module docstring), with this environment less its PYTHON* variables
    and PYTHONHASHSEED=0. The code objects name their file ``RELEASE_FILES`` + the
    archive path (``<release>/pkg/mod.py``).

    Raises BuildError when a source does not compile or the compiler cannot run.
    """
    try:
        proc = subprocess.run(
            [sys.executable, "-S", "-P", "-c", _COMPILER, RELEASE_FILES],
            input=marshal.dumps(sources),
            capture_output=True,
            cwd=tempfile.gettempdir(),
            env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
            | {"PYTHONHASHSEED": "0"},
            timeout=COMPILE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(
            f"cannot compile the release's modules with {sys.executable}: {exc}"
        ) from exc
    if proc.returncode != 0:
        why = proc.stderr.decode(errors="replace").strip().splitlines()
        raise BuildError(
            f"cannot compile the release's modules: {why[-1] if why else proc.returncode}"
        )
    compiled: dict[str, bytes] = marshal.loads(proc.stdout)
    return compiled


def _collect() -> Iterator[tuple[str, bytes]]:
    """Every file of every product package, keyed by its path inside the archive."""
    for package in PACKAGES:
        try:
            module = importlib.import_module(package)
        except ImportError as exc:
            raise BuildError(
                f"cannot build a release: package {package!r} is missing from the running "
                f"code ({exc}); build from a complete source tree or release"
            ) from exc
        if getattr(module, "__file__", None) is None:
            # A namespace package means the import system did not find the real one, e.g.
            # an editable install made before the package had an __init__.py.
            raise BuildError(
                f"cannot build a release: {package!r} imports as a namespace package, not "
                f"from its own directory; reinstall the project (pip install -e .) or build "
                f"from the source tree's root"
            )
        try:
            root = resources.files(package)
        except OSError as exc:
            raise BuildError(f"cannot read package {package!r}: {exc}") from exc
        for name, data in _walk(root, package):
            # The running code's own stamp is replaced by the new version's.
            if name != STAMP_PATH:
                yield name, data


def _walk(node: Traversable, prefix: str) -> Iterator[tuple[str, bytes]]:
    for child in node.iterdir():
        name = child.name
        if name.startswith("."):
            continue  # editor and tool droppings, never part of the product
        if child.is_dir():
            if name not in _SKIP_DIRS:
                yield from _walk(child, f"{prefix}/{name}")
        elif child.is_file() and not name.endswith(_SKIP_SUFFIXES):
            yield f"{prefix}/{name}", child.read_bytes()
