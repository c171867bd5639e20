"""Process settings a rewrite needs while it runs: recursion limit, garbage collector."""

from __future__ import annotations

import contextlib
import gc
import sys


@contextlib.contextmanager
def recursion_limit(at_least: int):
    """Raises Python's recursion limit to `at_least` inside the block."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, at_least))
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


@contextlib.contextmanager
def gc_paused():
    """Pauses Python's cyclic garbage collector inside the block.

    A rewrite keeps everything it allocates (layers, nodes, tensors), so the
    full collections its allocations trigger rescan a growing heap for
    nothing: about 0.5 s of a 2,000-layer rewrite, and the part of its time
    that grew faster than the number of layers (benchmarks/scale.py).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
