"""The interpreter's heap when a process exits.

When CPython exits (``Py_FinalizeEx``) it runs full garbage collections over every object
still alive while it tears its modules down: work for a process about to be gone, and most
of what exiting costs here. The product's processes import grpc, protobuf, python-tuf,
cryptography and pika, tens of thousands of tracked objects; in ``make bench-fleet`` an
old gateway agent spent about half of its CPU of the whole upgrade in these collections
after the handoff, while the fleet's new versions were starting on the same cores (README,
"Benchmark: fleet scale").
"""

from __future__ import annotations

import atexit
import gc


def freeze_at_exit() -> None:
    """Have this process's exit skip collecting what is alive then.

    At exit, as an ``atexit`` handler (so after the interpreter has joined the non-daemon
    threads, and before it clears the modules), every tracked object moves to the permanent
    generation (``gc.freeze``), which the interpreter's final collections pass over. What
    an exit must do still happens: threads joined, the other ``atexit`` handlers run
    (logging's flush among them), files closed as their last reference goes. Cyclic
    garbage alive at that moment is not collected; nothing of it outlives the process.

    Call it at the start of a command's ``main``. Calling it again changes nothing (one
    handler). In a process that goes on after ``main`` returns (a test calling ``main``),
    nothing happens until that process exits.
    """
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
