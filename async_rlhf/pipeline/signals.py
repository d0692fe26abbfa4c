"""SIGTERM, SIGHUP and Ctrl-C (SIGINT) in a run's driver: stop at a safe point with a checkpoint, or stop now.

A terminal's Ctrl-C reaches the driver and Ray's own processes (its process group); Ray blocks SIGINT in
those, and each actor runs in a process group of its own, so only the driver acts on it. The first Ctrl-C
of a training run is a SIGTERM: a checkpoint at the next safe point, then the usual end (final evaluation,
final/ and summary.json). A second one, or one during start-up (nothing trained yet), stops now: the run
shuts its workers and Ray down and the CLI exits 130, one line, no traceback.
"""
from __future__ import annotations

import shlex
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Callable, NoReturn, Union

from async_rlhf.cluster.safe_handlers import outside_import_bookkeeping
from async_rlhf.failures import START_UP_INTERRUPTED, Interrupted, RunError, start_up_stop
from async_rlhf.pipeline.control import RunControl
from async_rlhf.pipeline.state import RunPhase, RunStats

Handler = Union[Callable[[int, Any], Any], int, signal.Handlers, None]  # what signal.signal() returns


class StopSignals:
    """The driver's SIGTERM, SIGHUP and SIGINT handlers for one run."""

    def __init__(self, run_dir: Path, stats: RunStats, control: RunControl) -> None:
        self.run_dir = run_dir
        self.stats = stats
        self.control = control
        self.interrupts = 0
        self.pending: RunError | None = None  # the stop a handler asked for, raised by the run
        self.previous: dict[int, Handler] = {}
        self.kept_before: Callable[[], None] = lambda: None  # raises a stop the handlers before these kept

    def install(self) -> None:
        """After ray.init, which sets its own SIGTERM handler in the driver; only possible from the main
        thread (a controller run inside a thread, as in tests, keeps the defaults)."""
        if threading.current_thread() is not threading.main_thread():
            return
        self.previous = {}
        stop, interrupt = self.on_sigterm, self.on_sigint
        for signum, handler in ((signal.SIGTERM, stop), (signal.SIGINT, interrupt), (signal.SIGHUP, stop)):
            if signum == signal.SIGTERM or signal.getsignal(signum) is not signal.SIG_IGN:  # `nohup ... &`: kept
                self.previous[signum] = signal.signal(signum, outside_import_bookkeeping(handler))
        self.kept_before()  # one Python dropped where it was raised (cli/start_up_stop.py): raised now, not lost

    def restore(self) -> None:
        """The handlers from before install(): a process that runs several runs (a benchmark) must not keep
        sending its Ctrl-C to a run that has ended."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def on_sigterm(self, signum: int, _frame: FrameType | None) -> None:
        """SIGTERM (preemption) or SIGHUP (the terminal closed: its lines are dropped, cli/streams.py)."""
        if self.stats.phase is RunPhase.STARTING:  # nothing trained yet: engines and a first eval only delay it
            self._stop_now(RunError(start_up_stop(signum)))
        self.control.terminate()

    def on_sigint(self, _signum: int, _frame: FrameType | None) -> None:
        self.interrupts += 1
        if self.stats.phase is RunPhase.STARTING or self.interrupts > 1:
            self._stop_now(self.interrupted())
        if self.stats.phase is RunPhase.STOPPING:  # already past the last step: the final evaluation and save
            print("\n[async-rlhf] Ctrl-C: the run is already ending (final evaluation and save); Ctrl-C again "
                  "stops now, without them", file=sys.stderr, flush=True)
            return
        print("\n[async-rlhf] Ctrl-C: checkpointing at the next safe point, then stopping after the final "
              "evaluation (Ctrl-C again stops now)", file=sys.stderr, flush=True)
        self.control.terminate()

    def _stop_now(self, error: RunError) -> NoReturn:
        """Raised as KeyboardInterrupt, the one exception Ray's blocking calls pass on whole (another one
        raised inside them comes out as a SystemError); the run turns it back into `error`."""
        self.pending = error
        raise KeyboardInterrupt

    def raise_pending(self) -> None:
        """Raise again a stop that a handler asked for but that never reached the run: its KeyboardInterrupt
        landed in code that swallows exceptions (seen: tqdm creating the progress bar turned it into a
        RuntimeError it caught, and the run went on to a normal end after a second Ctrl-C)."""
        if self.pending is not None:
            raise KeyboardInterrupt

    def error(self) -> RunError:
        """What a KeyboardInterrupt that ended the run means: a stop asked for above, or a Ctrl-C before
        install() (policy and task set-up), when Python's own handler raised it."""
        return self.pending or self.interrupted()

    def interrupted(self) -> Interrupted:
        if self.stats.phase in (RunPhase.CREATED, RunPhase.STARTING):
            return Interrupted(START_UP_INTERRUPTED)
        resume = f"--resume {shlex.quote(str(self.run_dir))}"
        return Interrupted(f"interrupted (Ctrl-C) again: stopped now, without the final evaluation; the checkpoints "
                           f"written so far are in {self.run_dir / 'checkpoints'} (`{resume}` continues from the "
                           "newest)")
