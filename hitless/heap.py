"""The interpreter's heap when a process exits.

When CPython exits (``Py_FinalizeEx``) it runs full garbage collections over every object
still alive while it tears its modules down: work for a process about to be gone, and most
of what exiting costs here. The product's processes import grpc, protobuf, python-tuf,
cryptography and pika, tens of thousands of tracked objects. In ``bench/fleet.py`` with 30
gateways, ``perf`` put about half of an old gateway agent's CPU in these collections,
after its handoff, while the fleet's new versions were starting on the same cores (README,
"An exit without the final collections"; docs/benchmarks.md).
"""

from __future__ import annotations

import atexit
import gc


def freeze_at_exit() -> None:
    """Have this process's exit skip collecting what is alive then.

    At exit, as an ``atexit`` handler (so after the interpreter has joined the non-daemon
    threads, and before it clears the modules), every tracked object moves to the permanent
    generation (``gc.freeze``), which the interpreter's final collections pass over.

    What an exit still does: join the non-daemon threads, run the other ``atexit`` handlers
    (``logging``'s flush and close, ``weakref.finalize`` callbacks) and flush stdout and
    stderr. What it no longer does: finalize the objects only a collection would free,
    among them the globals of most modules (a module's dict and its functions refer to
    each other) and cyclic garbage not yet collected. A file left open there is not
    flushed, a temporary file not removed, a database connection not closed. So whatever
    must happen at exit is done explicitly, as the product's processes do: files are
    flushed or closed where they are written, connections closed in ``finally`` blocks.

    Call it at the start of a command's ``main``; a second call registers no second
    handler. In a process that goes on after ``main`` returns (a test calling ``main``),
    the freeze happens when that process exits, with the same effect on it.
    """
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
