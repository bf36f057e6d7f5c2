"""Every command's process exits without the interpreter's final collections
(``hitless.heap.freeze_at_exit``), and an exit still does what it must."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Registered before the command's main runs, so it runs after that main's own atexit
# handler (atexit runs handlers last registered first): what it prints is what the
# interpreter's final collections were left with.
_PROBE = textwrap.dedent(
    """\
    import atexit, gc, sys
    atexit.register(lambda: print("frozen", gc.get_freeze_count(), file=sys.stderr))
    from {module} import main
    sys.argv = [{command!r}, "--help"]
    try:
        main()
    except SystemExit:
        pass
    """
)


def _frozen_at_exit(module: str, command: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE.format(module=module, command=command)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert f"usage: {command}" in done.stdout, done.stdout + done.stderr
    line = [x for x in done.stderr.splitlines() if x.startswith("frozen ")]
    assert line, done.stderr
    return int(line[-1].split()[1])


@pytest.mark.parametrize(
    ("module", "command"),
    [
        ("gateway_daemon.cli", "gateway-daemon"),
        ("controller_svc.cli", "controller-svc"),
        ("upgradectl.cli", "upgradectl"),
        ("notifier.cli", "notifier"),
    ],
)
def test_a_command_exits_with_its_heap_frozen(module: str, command: str) -> None:
    # Tens of thousands of objects (grpc, protobuf, ...) are left out of the final
    # collections; without freeze_at_exit the count is 0.
    assert _frozen_at_exit(module, command) > 10_000


def test_an_exit_still_joins_threads_runs_handlers_and_flushes(tmp_path: Path) -> None:
    # What freeze_at_exit promises an exit still does. (Objects only a collection would
    # free, such as a module's globals, are not finalized: files are closed explicitly.)
    script = textwrap.dedent(
        """\
        import atexit, logging, sys, threading, weakref
        from hitless import heap

        heap.freeze_at_exit()

        class Resource:
            pass

        def make_resource():  # a function: this module's globals are now in a cycle
            return Resource()

        kept = make_resource()
        weakref.finalize(kept, sys.stdout.write, "finalizer ran\\n")
        atexit.register(lambda: sys.stdout.write("handler ran\\n"))
        handler = logging.FileHandler(sys.argv[1], delay=True)
        logging.getLogger("probe").addHandler(handler)
        logging.getLogger("probe").warning("logged")  # flushed by logging's atexit handler
        sys.stderr.write("unflushed")  # no newline: flushed at exit
        # A non-daemon thread still to run when the script ends.
        threading.Timer(0.3, lambda: sys.stdout.write("thread done\\n")).start()
        """
    )
    log = tmp_path / "probe.log"
    done = subprocess.run(
        [sys.executable, "-c", script, str(log)], capture_output=True, text=True, timeout=60,
        check=True,
    )  # fmt: skip
    assert done.stdout.splitlines() == ["thread done", "handler ran", "finalizer ran"]
    assert done.stderr == "unflushed"
    assert log.read_text() == "logged\n"
