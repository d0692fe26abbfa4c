"""Python's cyclic garbage collector paused while a role starts.

Importing vLLM, DeepSpeed and transformers and loading models makes hundreds of thousands of long-lived objects
(modules, classes, pydantic schemas, parameters), and every few hundred allocations the collector walks the young
ones and, each time the heap has grown by a quarter, all of them: 1-2 s of a generator's start on a CPU and about a
third of a learner's (docs/benchmarks.md, Start-up). Paused, the start makes no collection; one collection of
the young generations at its end frees the cycles it left, so a process that starts many roles (a test) does not
keep them. Only the young ones: everything made during the pause is young, and a full collection would walk the
whole heap of a long-lived process (0.36 s for 1.5M objects, against 6 ms).
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def paused_gc() -> Iterator[None]:
    """No automatic collection inside; on the way out one collection of the young generations, and the
    collector enabled again if it was (a pause nested in another leaves both to the outer one). Also a decorator:
    `@paused_gc()`."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.collect(1)
            gc.enable()
