"""StopSignals (pipeline/signals.py): what SIGTERM and Ctrl-C mean in each phase of a run, by hand. The
processes' side (a terminal's Ctrl-C to the whole group, exit 130, nothing left running):
tests/test_driver_exit.py."""
from __future__ import annotations

import re
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from async_rlhf.failures import Interrupted
from async_rlhf.pipeline.control import RunControl
from async_rlhf.pipeline.signals import StopSignals
from async_rlhf.pipeline.state import RunPhase, RunStats


def signals_in(phase: RunPhase) -> StopSignals:
    stats = RunStats()
    stats.phase = phase
    return StopSignals(Path("/runs/a"), stats, RunControl())


def installed(signum: int) -> object:
    """The handler installed for `signum`, inside its guard (cluster/safe_handlers.py)."""
    return getattr(signal.getsignal(signum), "__wrapped__", None)


def test_a_first_ctrl_c_in_the_loop_asks_for_a_checkpoint_and_a_stop_and_a_second_stops_now() -> None:
    signals = signals_in(RunPhase.RUNNING)
    signals.on_sigint(signal.SIGINT, None)
    assert signals.control.stop_requested and len(signals.control.take_checkpoint_requests()) == 1
    with pytest.raises(KeyboardInterrupt):
        signals.on_sigint(signal.SIGINT, None)
    error = signals.error()
    assert isinstance(error, Interrupted) and "again: stopped now" in str(error)
    assert "/runs/a/checkpoints" in str(error) and "`--resume /runs/a`" in str(error)


def test_in_start_up_sigterm_and_ctrl_c_stop_now_and_say_why() -> None:
    for handler, signum, expected in (("on_sigterm", signal.SIGTERM, "SIGTERM during start-up"),
                                      ("on_sigterm", signal.SIGHUP, "SIGHUP during start-up"),
                                      ("on_sigint", signal.SIGINT, "interrupted (Ctrl-C) during start-up")):
        signals = signals_in(RunPhase.STARTING)
        with pytest.raises(KeyboardInterrupt):  # the one exception Ray's blocking calls pass on whole
            getattr(signals, handler)(signum, None)
        assert str(signals.error()).startswith(expected) and not signals.control.stop_requested


def test_a_ctrl_c_before_the_handlers_are_installed_is_a_start_up_interruption() -> None:
    assert str(signals_in(RunPhase.CREATED).error()).startswith("interrupted (Ctrl-C) during start-up")


def test_a_first_ctrl_c_while_the_run_ends_asks_for_nothing() -> None:
    signals = signals_in(RunPhase.STOPPING)
    signals.on_sigint(signal.SIGINT, None)
    assert not signals.control.stop_requested and signals.control.take_checkpoint_requests() == []


def test_install_then_restore_puts_back_the_handlers_a_longer_lived_process_had() -> None:
    runner = signal.signal(signal.SIGINT, signal.default_int_handler)  # a runner in the background ignores it
    try:
        before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        signals = signals_in(RunPhase.RUNNING)
        signals.install()
        assert installed(signal.SIGINT) == signals.on_sigint and installed(signal.SIGTERM) == signals.on_sigterm
        signals.restore()
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    finally:
        signal.signal(signal.SIGINT, runner)


def test_an_ignored_sigint_stays_ignored() -> None:
    # `nohup async-rlhf train ... &`: the shell starts it with SIGINT ignored, and it must stay so.
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        signals = signals_in(RunPhase.RUNNING)
        signals.install()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and installed(signal.SIGTERM) == signals.on_sigterm
        signals.restore()
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_stop_whose_interrupt_was_swallowed_is_raised_again_by_the_run() -> None:
    stop = signals_in(RunPhase.RUNNING)
    stop.raise_pending()  # nothing asked for yet
    stop.on_sigint(signal.SIGINT, None)
    try:  # third-party code that catches everything (tqdm, starting its monitor thread)
        stop.on_sigint(signal.SIGINT, None)
    except BaseException:  # noqa: B036 - what such code does
        pass
    with pytest.raises(KeyboardInterrupt):
        stop.raise_pending()  # the loop's next iteration
    assert isinstance(stop.error(), Interrupted) and "again: stopped now" in str(stop.error())


def test_a_start_up_stop_that_python_dropped_is_kept_unprinted_and_raised_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in CI: a SIGTERM 0 s into a run was raised inside a weakref callback of an import, where Python prints
    "Exception ignored in" and a traceback, and drops it; the run went on to its end, exit 0. Kept by the handler,
    raised again by start_and_run; unprinted. Another callback's error is still printed."""
    import gc
    import weakref

    from async_rlhf.cli.start_up_stop import StartUpStop
    from async_rlhf.failures import StoppedDuringStartUp

    printed: list[BaseException | None] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda event: printed.append(event.exc_value))
    stop = StartUpStop()
    stop.check()  # no signal: nothing

    class Held:
        pass

    def dropped(callback: Callable[[object], object]) -> None:
        held = Held()
        ref = weakref.ref(held, callback)
        del held  # the callback raises; Python drops its exception
        gc.collect()
        assert ref() is None

    with stop.installed():
        dropped(lambda _: stop(signal.SIGTERM, None))
        dropped(lambda _: int("a bug"))
        with pytest.raises(StoppedDuringStartUp):
            stop.check()
    assert [type(exc) for exc in printed] == [ValueError]


def spin(seconds: float = 0.2) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:  # backward jumps: the interpreter runs pending signal handlers at each
        pass


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_start_up_stop_waits_out_the_import_lock_and_is_raised_once_it_is_free(signum: signal.Signals) -> None:
    """CI, stop 47: a SIGTERM 0 s into a run was raised while the main thread held the import lock, in a module
    lock's weakref callback; the lock stayed held, start-up's importer thread hung on its next import, and the
    run with it."""
    import _imp

    from async_rlhf.cli.start_up_stop import StartUpStop
    from async_rlhf.failures import StoppedDuringStartUp

    raised_in_the_lock = True
    runner = signal.signal(signal.SIGINT, signal.default_int_handler)  # a runner in the background ignores it
    try:
        with StartUpStop().installed(), pytest.raises(StoppedDuringStartUp if signum == signal.SIGTERM
                                                      else KeyboardInterrupt):
            _imp.acquire_lock()
            try:
                signal.raise_signal(signum)
                spin()
                raised_in_the_lock = False
            finally:
                _imp.release_lock()
            spin()
    finally:
        signal.signal(signal.SIGINT, runner)
    assert not raised_in_the_lock and not _imp.lock_held()


def test_importlibs_module_lock_code_counts_as_its_bookkeeping() -> None:
    """Where Python drops a handler's exception: a module lock's weakref callback, in importlib._bootstrap."""
    import sys

    from async_rlhf.cluster.safe_handlers import BOOTSTRAP, in_import_bookkeeping

    inside: dict = {}
    exec(compile("import sys\nframe = sys._getframe()", BOOTSTRAP, "exec"), inside)
    assert in_import_bookkeeping(inside["frame"]) and not in_import_bookkeeping(sys._getframe())


def test_the_runs_handlers_raise_a_stop_that_the_start_ups_handler_kept() -> None:
    """Dropped after start_and_run's last check, before the controller installs its own handlers."""
    from async_rlhf.cli.start_up_stop import StartUpStop
    from async_rlhf.failures import StoppedDuringStartUp

    stop = StartUpStop()
    stop.signum = signal.SIGHUP  # as its handler leaves it, the exception dropped
    signals = signals_in(RunPhase.STARTING)
    signals.kept_before = stop.hand_over
    try:
        with pytest.raises(StoppedDuringStartUp, match="SIGHUP during start-up"):
            signals.install()
    finally:
        signals.restore()


def test_once_handed_over_the_start_ups_handler_says_nothing_of_start_up() -> None:
    """Put back as the run shuts down (`StopSignals.restore`): a SIGTERM asks for what is happening, a Ctrl-C
    stops the shutdown."""
    from async_rlhf.cli.start_up_stop import ENDING_INTERRUPTED, StartUpStop

    stop = StartUpStop()
    stop.hand_over()
    stop(signal.SIGTERM, None)
    stop(signal.SIGHUP, None)
    with pytest.raises(KeyboardInterrupt, match=re.escape(ENDING_INTERRUPTED)):
        stop(signal.SIGINT, None)
    stop.check()  # nothing kept
