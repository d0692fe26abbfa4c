"""Signal handlers that raise (a stop now), kept out of the import system's own bookkeeping.

A Python signal handler runs in the main thread at whichever bytecode it has reached, and its exception is
raised there. Inside importlib's bookkeeping that does harm:
- between `_imp.acquire_lock()` and the `try` that releases it, the global import lock stays held for good:
  every other thread's next import then waits forever. CI, stop 47: a SIGTERM 0 s into a run landed in
  the weakref callback of a module lock; start-up's importer thread (pipeline/startup.py) hung on its next
  import, and the run with it, until the test's 120 s ran out;
- inside that weakref callback, Python drops the exception ("Exception ignored in: ... _get_module_lock").
There the handler returns at once, and the signal is sent again RESEND_S later, once the bookkeeping is done
(the lock is taken for microseconds at a time). Not at once: Python would run the handler again inside itself,
over and over. Sent by a bare thread: a `threading` one takes the threading module's own lock, which the
interrupted code may hold.
"""
from __future__ import annotations

import _imp
import _thread
import functools
import os
import time
from types import FrameType
from typing import Any, Callable

SignalHandler = Callable[[int, FrameType | None], Any]
BOOTSTRAP = "<frozen importlib._bootstrap>"  # module locks and their callbacks (not _bootstrap_external)
RESEND_S = 0.005


def in_import_bookkeeping(frame: FrameType | None) -> bool:
    """True while the global import lock is held (by any thread: then only for microseconds) or the main
    thread runs importlib's module-lock code."""
    return _imp.lock_held() or (frame is not None and frame.f_code.co_filename == BOOTSTRAP)


def outside_import_bookkeeping(handler: SignalHandler) -> SignalHandler:
    """`handler`, run only where its exception can be raised (the module docstring says why)."""

    @functools.wraps(handler)
    def guarded(signum: int, frame: FrameType | None) -> Any:
        if in_import_bookkeeping(frame):
            _thread.start_new_thread(send_again, (signum,))
            return None
        return handler(signum, frame)

    return guarded


def send_again(signum: int) -> None:
    time.sleep(RESEND_S)
    os.kill(os.getpid(), signum)  # to the process: the main thread runs the handler, as for the first
