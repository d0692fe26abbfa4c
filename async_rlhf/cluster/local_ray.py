"""Starting and stopping the local Ray a run owns.

ray.init() starts Ray's own processes one after the other for seconds; a Ctrl-C in the middle of that
left the dashboard and runtime-env agents running with no raylet (found by hand: still there a minute
later). A SIGTERM there met Ray's own handlers: a sys.exit() inside ray.init(), or, once its core worker
was up, a crash handler that printed a stack dump on the terminal and killed the driver without a word.
So Ctrl-C, SIGTERM and SIGHUP are held (blocked) during ray.init() and go, once it has returned and Ray is
whole, to the handlers the process had before (the run's, or Python's KeyboardInterrupt for Ctrl-C); the
exit handler that ray.init() registered shuts Ray down.

ray.shutdown() stops a local head node's processes one by one, each given up to a second to exit after
SIGTERM. The autoscaler's monitor uses that whole second every time (measured on Ray 2.x: raylet 0.03 s,
GCS 0.02 s, dashboard 0.02 s, log monitor 0.01 s, monitor 1.02 s), a second of every run's wall clock. A
run's local Ray autoscales nothing, so the monitor is killed first and ray.shutdown() then skips it as
exited. Ray's table of its processes is not public API: where it is not found, ray.shutdown() alone does
the work, as before.

A run's local Ray asks nothing of three of the Python processes a head node starts: the autoscaler's monitor (a
fixed set of nodes), the log monitor (workers' output is not sent to the driver: log_to_driver=False) and the
dashboard's API server (include_dashboard=False still starts its job and state API). Together they took 1.5 s of
CPU in the first seconds of every run, when start-up is CPU-bound on a small machine; without them the
quickstart reached its first step 0.6 s sooner (docs/benchmarks.md, start-up). They are not started.

Ray's own processes (GCS, raylet, dashboard) start in a process group of their own: a SIGTERM to the driver's
group (`timeout`, `kill -- -PGID`, a job scheduler's stop) reached them too. The raylet's shutdown then killed the
learner before the driver's checkpoint (seen in CI: "the learner died at step 6 ... Socket closed"), and the GCS
stopped answering. Each keeps Ray's own fate sharing (killed when the driver dies), so a new group leaves nothing
behind; the actors already run in groups of their own.
"""
from __future__ import annotations

import atexit
import contextlib
import inspect
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import ray

AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"  # Ray's token-authentication notices
MONITOR = "monitor"  # ray_constants.PROCESS_TYPE_MONITOR
RAYLET = "raylet"  # ray_constants.PROCESS_TYPE_RAYLET
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
GCS_LOST = "Ray's GCS stopped answering (a cluster's head node died or was stopped, or the GCS was killed)"
GCS_PATIENCE_ENV = "RAY_gcs_rpc_server_reconnect_timeout_s"  # Ray ends a driver whose GCS is gone this long (60 s)
GCS_ASK_S = 2.0  # gcs_answers' timeout: a lost GCS costs each ask this long


class RayLost(RuntimeError):
    """Ray's GCS stopped answering: no worker can be restarted, and Ray's core worker ends this process a minute
    later. Not a RunError: the CLI's line for it says how to continue from the newest checkpoint."""


class InOwnGroupPopen(subprocess.Popen):
    """A Ray head process in a process group of its own (the module docstring says why)."""

    def __init__(self, *args: Any, preexec_fn: Callable[[], None] | None = None, **kwargs: Any) -> None:
        def in_child() -> None:
            if preexec_fn is not None:
                preexec_fn()  # Ray's: SIGINT blocked, killed with its parent
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGHUP})  # held in the driver only

        kwargs["preexec_fn"] = in_child
        super().__init__(*args, **kwargs, process_group=0)


@contextlib.contextmanager
def head_processes_in_own_group() -> Iterator[None]:
    """Ray's processes started inside start in a group of their own; where Ray's process class is not found
    (another Ray version), they start as before."""
    services: Any = ray._private.services  # not public API: read and set by name
    popen = getattr(services, "ConsolePopen", None)  # what Ray starts its processes with
    if popen is None:
        yield
        return
    services.ConsolePopen = InOwnGroupPopen
    try:
        yield
    finally:
        services.ConsolePopen = popen


@contextlib.contextmanager
def without_idle_head_processes() -> Iterator[None]:
    """A head node started inside starts without the three Python processes a run never asks anything of (the
    module docstring says why): the autoscaler's monitor, the log monitor and the dashboard's API server. Where
    Ray's parameter or node class lacks what is set here (another Ray version), it starts them all, as before."""
    params_class: Any = ray._private.parameter.RayParams  # not public API: read and set by name
    node_class: Any = ray._private.node.Node
    if not (hasattr(node_class, "start_api_server") and {"no_monitor", "include_log_monitor"} <= set(
            inspect.signature(params_class.__init__).parameters)):
        yield
        return
    init, api_server = params_class.__init__, node_class.start_api_server

    def lean_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **{**kwargs, "no_monitor": True, "include_log_monitor": False})

    def no_api_server(self: Any, *_args: Any, **_kwargs: Any) -> None:
        self._webui_url = None  # read by ray.init's context: no dashboard to name

    params_class.__init__, node_class.start_api_server = lean_init, no_api_server
    try:
        yield
    finally:
        params_class.__init__, node_class.start_api_server = init, api_server


def init_local_ray(**kwargs: Any) -> None:
    """ray.init(**kwargs), with Ctrl-C, SIGTERM and SIGHUP held until it has returned (the module docstring says
    why).

    A Ray started here turns token authentication on by default and warns on the terminal that it did; the
    warning is left out (it asks nothing of the user). Setting RAY_AUTH_MODE=token here instead would not do:
    the driver reads it once, at `import ray`, so its client would speak without the token the GCS asks for."""
    if kwargs.get("address") in (None, "local"):  # a Ray of the run's own
        logging.getLogger(AUTH_LOGGER).setLevel(logging.ERROR)
    with held_stop_signals(), head_processes_in_own_group(), without_idle_head_processes():
        ray.init(**kwargs)


@contextlib.contextmanager
def held_stop_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP wait until the block ends, and then go to the handlers from before it (the
    module docstring says why). They are blocked in the calling thread and the threads and processes it starts
    meanwhile; one that a thread started before takes is recorded (Ray replaces the SIGTERM recorder with its
    own at the start of ray.init). Meanwhile SIGHUP is ignored, which the processes started keep: a closed
    terminal hangs up the driver's process group, and the run's stop then needs Ray's processes (signals.py)."""
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set from the main thread
        yield
        return
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    held: list[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda number, _frame: held.append(number))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        yield
    finally:
        for signum, handler in handlers.items():  # also takes SIGTERM back from Ray's crash handler
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # one blocked meanwhile is delivered here
    for number in held:
        signal.raise_signal(number)


def keep_ray_errors_in(path: Path) -> None:
    """Ray's driver prints every error its GCS publishes for the job to stdout: a paragraph for each worker
    death, a 40-line state dump when a raylet dies, beside the run's own one-line report of the same event
    (and after a death the run recovered from). In a process the CLI owns they are appended to `path`
    instead. Ray's listener looks its printer up by name at each message; where it is not found (another Ray
    version), Ray prints as before."""
    worker = ray._private.worker
    if not callable(getattr(worker, "print_to_stdstream", None)):
        return

    def to_file(data: dict, ignore_prefix: bool = False) -> None:
        with path.open("a", encoding="utf-8") as out:
            out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} ({data.get('pid', 'ray')})\n")
            out.writelines(f"{line}\n" for line in data.get("lines", []))

    worker.print_to_stdstream = to_file


def head_processes(process_type: str | None = None) -> list[subprocess.Popen]:
    """The local head node's processes of one type, or of every type (None), from Ray's own table; [] where Ray
    keeps none here."""
    node = getattr(ray._private.worker, "_global_node", None)  # set by the ray.init that started this Ray
    table = getattr(node, "all_processes", None)
    if not isinstance(table, dict):
        return []
    infos = [info for kind, kinds in table.items() if process_type in (None, kind) for info in kinds]
    return [info.process for info in infos if isinstance(getattr(info, "process", None), subprocess.Popen)]


def local_raylet_pid() -> int | None:
    """The raylet of the Ray this process started (None for a Ray it only connected to)."""
    raylets = head_processes(RAYLET)
    return raylets[0].pid if raylets else None


def shutdown_local_ray() -> None:
    """ray.shutdown(), with the autoscaler monitor killed first (the module docstring says why). A Ray whose
    GCS no longer answers is killed instead: ray.shutdown() would wait on the GCS forever (see gcs_answers)."""
    _kill(head_processes(MONITOR))  # reaped: ray.shutdown() sees it exited and does not wait on it
    if gcs_answers():
        ray.shutdown()
        return
    _kill(head_processes())  # the actors' workers exit once their raylet is gone
    atexit.unregister(ray.shutdown)  # the exit handler ray.init() registered would wait on the GCS too


def gcs_answers(timeout_s: float = GCS_ASK_S) -> bool:
    """Whether the GCS still serves. A SIGTERM to the driver's whole process group (`timeout`, `kill -- -PGID`, a
    job scheduler) reaches Ray's own processes too: the GCS then stops answering but does not exit, and the
    driver's disconnect in ray.shutdown() waits for its answer (found by hand: `timeout 25 async-rlhf train ...`
    wrote its checkpoint, final/ and summary.json, then hung)."""
    try:
        client: Any = getattr(ray._private.worker.global_worker, "gcs_client", None)  # set by ray.init
        client.internal_kv_get(b"async-rlhf", None, timeout=timeout_s)
    except Exception:  # Ray's RpcError (timed out), or no client here: either way, nothing to wait for
        return False
    return True


def ray_gcs_patience_s() -> float:
    """Seconds Ray's core worker waits for a lost GCS before it ends this process (its setting, else 60)."""
    try:
        return max(0.0, float(os.environ.get(GCS_PATIENCE_ENV, "60")))
    except ValueError:  # Ray would refuse it too; the default is what it then means here
        return 60.0


def require_gcs(consequence: str = "no worker can be restarted") -> None:
    """RayLost if the GCS does not answer. A worker lost with it (a cluster's head node gone, a local GCS killed)
    is never restarted, and the run waited for it until Ray's core worker ended the driver 60 s later with a C++
    line and no way on (found by hand: a `ray start` cluster's GCS SIGKILLed mid-run; the loop sat in a
    generator's restart probe). Asked where a run waits for a restart, so it ends with its own line first; three
    tries, so that a GCS slow under load is not taken for gone. Without a Ray connection there is none to ask."""
    if ray.is_initialized() and not any(gcs_answers() for _ in range(3)):
        raise RayLost(f"{GCS_LOST}, so {consequence}")


class GcsWatch:
    """Whether Ray's GCS has stopped answering, asked every `tick_s` from a daemon thread. A GCS lost while every
    worker still answers (their calls go worker to worker) shows nowhere in the loop: the run trained on until
    Ray's core worker ended the driver 60 s later with a C++ line, its steps since the last checkpoint lost (found
    by hand: a local GCS SIGKILLed mid-run). Lost after a fifth of the time Ray waits for a GCS (about 12 s of its
    60), and three missed answers at least, so that a GCS slow under load is not taken for gone: the run has the
    rest for its step in flight and a checkpoint. A cluster whose GCS restarts (fault tolerance) raises Ray's wait,
    and this one grows with it."""

    def __init__(self, tick_s: float = 2.0) -> None:
        self.tick_s = tick_s
        self.misses = max(3, round(ray_gcs_patience_s() / 5 / (tick_s + GCS_ASK_S)))
        self.missed = 0  # written by the thread only
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="gcs-watch", daemon=True)
        if ray.is_initialized():  # without a Ray connection there is no GCS to ask
            self.thread.start()

    @property
    def lost(self) -> bool:
        return self.missed >= self.misses

    def _watch(self) -> None:
        while not self.lost and not self.stopped.wait(self.tick_s):
            self.missed = 0 if gcs_answers() else self.missed + 1

    def close(self) -> None:
        """Waits out a question in flight (2 s at most): Ray's shutdown must not pull its client from under it."""
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)


def _kill(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=5)
