"""The driver's stop signals from `train`'s start until the run's own handlers (pipeline/signals.py) take over.

A SIGTERM while the policy downloads or Ray starts was Ray's sys.exit() or Python's default, a silent exit;
a Ctrl-C there was Python's KeyboardInterrupt, two words and no reason. Now each is one line, as during the
rest of start-up. A stop raised where Python drops exceptions (a weakref callback: "Exception ignored in"
and a traceback on the terminal) is kept: unprinted, and raised again where start-up passes `check`
(seen in CI, session 31: a SIGTERM dropped inside an import's callback, and the run went on to its end).
"""
from __future__ import annotations

import contextlib
import signal
import sys
from types import FrameType
from typing import Any, Iterator

from async_rlhf.cluster.safe_handlers import outside_import_bookkeeping
from async_rlhf.failures import StoppedDuringStartUp

ENDING_INTERRUPTED = "interrupted (Ctrl-C) while the run shut down"


class StartUpStop:
    """SIGTERM and SIGHUP raise StoppedDuringStartUp (a BaseException, so no `except Exception` swallows it),
    Ctrl-C KeyboardInterrupt (the one exception Ray's blocking calls pass on whole); each is kept for `check`.
    Its handlers are back once the run's own are put back, as the run shuts down: then a SIGTERM or SIGHUP asks
    for what is already happening, and a Ctrl-C stops the shutdown, without a word of start-up."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.handed_over = False

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        if not self.handed_over:
            self.signum = signum
            raise stop_for(signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt(ENDING_INTERRUPTED)

    def check(self) -> None:
        if self.signum is not None:
            raise stop_for(self.signum)

    def hand_over(self) -> None:
        """Called as the run's own handlers are installed (`StopSignals.kept_before`): a kept stop is raised."""
        self.check()
        self.handed_over = True

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """For SIGTERM, SIGINT and SIGHUP (one ignored, as `nohup` does, stays so), each raising only outside
        the import system's bookkeeping (cluster/safe_handlers.py), and a dropped stop unprinted; put back after."""
        previous = {signum: signal.signal(signum, outside_import_bookkeeping(self))
                    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
                    if signal.getsignal(signum) is not signal.SIG_IGN}
        hook = sys.unraisablehook
        sys.unraisablehook = dropped_stops_unprinted(hook)
        try:
            yield
        finally:
            sys.unraisablehook = hook
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def dropped_stops_unprinted(hook: Any) -> Any:
    """`hook` (sys.unraisablehook) for everything but a stop's own exception: whoever raised it keeps it and
    raises it again (`StartUpStop.check`; the run's `StopSignals.raise_pending`)."""

    def unraisable(event: Any) -> None:
        if not isinstance(event.exc_value, (StoppedDuringStartUp, KeyboardInterrupt)):
            hook(event)

    return unraisable


def stop_for(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else StoppedDuringStartUp(signum)
