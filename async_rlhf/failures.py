"""One line for a run that cannot go on: what died, where its log is, and how to continue.

The full traceback goes to RUN_DIR/error.log; the terminal gets a sentence (exit 1), never a traceback.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Iterator

LOGS_NOTE = "Ray's logs: "  # note_ray_logs
START_UP = "stopped before the first step, nothing to checkpoint; start the run again (or --resume RUN_DIR, " \
           "whose checkpoints are untouched)"
START_UP_INTERRUPTED = f"interrupted (Ctrl-C) during start-up: {START_UP}"


class RunError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


class Interrupted(RunError):
    """The user stopped the run (Ctrl-C) before it could wind down; the CLI exits 130, as shells expect."""


class StoppedDuringStartUp(BaseException):
    """SIGTERM or SIGHUP before the run's own handlers exist (cli/start_up_stop.py). A BaseException, as
    KeyboardInterrupt is, so that no `except Exception` on its way swallows it (one did: the run went on to its end)."""

    def __init__(self, signum: int) -> None:
        super().__init__(start_up_stop(signum))


def start_up_stop(signum: int) -> str:
    """SIGTERM or SIGHUP before the first step: nothing to save, so the run stops now."""
    return f"{signal.Signals(signum).name} during start-up: {START_UP}"


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """An OSError inside names `path`: a write that fails (a full disk) does not say which file it was."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def ray_logs(exc: BaseException | None = None) -> str:
    """The logs directory of the Ray session this process is in: a cluster's own, or a local Ray's under
    $RAY_TMPDIR, where a fixed /tmp/ray/session_latest sent users to another session's logs. Read from Ray's
    state without importing Ray (this module is imported before it). Once Ray is down, the one noted on `exc`
    while it was up (note_ray_logs), else a local Ray's default."""
    noted = [note for note in getattr(exc, "__notes__", []) if note.startswith(LOGS_NOTE)]
    if noted:
        return noted[-1].removeprefix(LOGS_NOTE)
    node = getattr(sys.modules.get("ray._private.worker"), "_global_node", None)
    logs = getattr(node, "get_logs_dir_path", None)
    if callable(logs):
        return str(logs())
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"  # Ray's own order
    return os.path.join(base, "ray", "session_latest", "logs")


def note_ray_logs(exc: BaseException) -> None:
    """Keep the session's logs directory on an error that ends the run, for the line said after Ray is down."""
    exc.add_note(LOGS_NOTE + ray_logs())


def what_died(exc: BaseException) -> str:
    """A Ray actor's death named by its class and pid; any other error by its type and first line."""
    if low_memory(exc):
        return memory_line(exc)
    text = str(exc)
    actor = re.search(r"class_name: (\w+)", text)
    if actor is not None:
        pid = re.search(r"pid: (\d+)", text)
        logs = ray_logs(exc)
        where = f" (pid {pid.group(1)}; its log is under {logs})" if pid else f" (logs under {logs})"
        return f"the {actor.group(1)} actor died{where}"
    if start_failed(exc):
        return _failed_start(text)
    cause = worker_error(exc)
    if cause is not None:  # a worker's own error (a RayTaskError): it, and the call that raised it
        call = re.search(r"ray::([\w.]+)\(", text)
        return f"{first_line(cause)} (in {call.group(1) if call else 'a worker'})"
    return first_line(exc)


def low_memory(exc: BaseException) -> bool:
    """Ray's memory monitor killed the call's worker: the node was short of memory, whoever's memory it was
    (ray.exceptions.OutOfMemoryError, told by name: this module does not import Ray)."""
    return any(c.__name__ == "OutOfMemoryError" and c.__module__ == "ray.exceptions" for c in type(exc).__mro__)


def memory_line(exc: BaseException) -> str:
    """Ray's paragraph as one line: 'Ray killed workers of the run: the node ran low on memory (6.14GB used /
    23.54GB limit; Ray kills above RAY_memory_usage_threshold, 0.95 by default)'."""
    used = re.search(r"was ([\d.]+\s*\w+ used / [\d.]+\s*\w+) limit", str(exc))
    figures = f"{used.group(1)} limit; " if used else ""
    return (f"Ray killed workers of the run: the node ran low on memory ({figures}Ray kills above "
            f"RAY_memory_usage_threshold, 0.95 by default)")


def start_failed(exc: BaseException) -> bool:
    """An actor whose __init__ raised (Ray keeps only the text): started again, it would raise again."""
    return "raised in its creation task" in str(exc)


def worker_error(exc: BaseException) -> BaseException | None:
    """The error a Ray worker raised, which `ray.get` re-raises wrapped (a RayTaskError's `cause`); else None."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else None


def _failed_start(text: str) -> str:
    """'the Learner actor could not start: SafetensorError: ...' from an ActorDiedError's text, which ends with the
    traceback of the error its __init__ raised (module path dropped)."""
    call = re.search(r"ray::(\w+)\.__init__", text)
    name, sep, message = _raised(text).partition(": ")
    error = f"{name.rsplit('.', 1)[-1]}{sep}{message}"
    return f"the {call.group(1) if call else 'an'} actor could not start: {error}"


def _raised(text: str) -> str:
    """A traceback's error line: the first unindented line after its last frame (a message may go on over more
    lines, which may end with a link), or the text's last line where it holds no frame. A pydantic error (vLLM
    checks its engine arguments with pydantic) gets its first reason: its header only counts and names the class."""
    lines = [line for line in text.splitlines() if line.strip()]
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    after = lines[frames[-1] + 1:] if frames else []
    header = next((i for i, line in enumerate(after) if not line.startswith(" ")), None)
    if header is None:
        return lines[-1].strip()
    raised = after[header]
    if re.search(r": \d+ validation errors? for \w+$", raised):
        return f"{raised.partition(': ')[0]}: {_first_reason(after[header + 1:])}"
    return raised


def _first_reason(lines: list[str]) -> str:
    """'field: reason' from the lines under a pydantic error's header: the field on a line of its own (none for a
    model's own check), the reason indented below it with '[type=..., input_value=...]' after it."""
    reason = next((i for i, line in enumerate(lines) if line.startswith(" ")), None)
    if reason is None:
        return "; ".join(line.strip() for line in lines)
    text = re.sub(r" \[type=.*$", "", lines[reason].strip().removeprefix("Value error, "))
    return ": ".join([*(line.strip() for line in lines[:reason]), text])


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def node_crashed(exc: BaseException) -> bool:
    """Ray's own words for an actor lost with its node (the raylet killed, or out of memory), not by itself."""
    return "node has crashed" in str(exc)


def failure_line(exc: BaseException, run_dir: Path, arguments: str, resumable: bool) -> str:
    """Writes the traceback to run_dir/error.log and returns the sentence for the terminal: how to continue
    from the newest checkpoint, or, where none was written (`resumable` False), that the run starts over.
    `arguments`: the config and overrides the run was started with."""
    first = f"free space on the disk of {run_dir}, then " if disk_full(exc) else ""
    if low_memory(exc):
        first = ("free memory on the node (other processes), or give the run less (generation.kv_cache_gib, "
                 "learner.max_tokens_per_micro_batch), then ")
    resume = f"--resume {shlex.quote(str(run_dir))}"
    command = " ".join(part for part in ("async-rlhf train", arguments, resume) if part)  # `arguments` "": a resume
    then = (f"continue with `{command}` (from its newest checkpoint)" if resumable
            else f"start it again with `async-rlhf train {arguments}` (it wrote no checkpoint to continue from)")
    return f"[async-rlhf] run failed: {what_died(exc)}; {write_traceback(exc, run_dir / 'error.log')}; {first}{then}"


def disk_full(exc: BaseException) -> bool:
    """No space (or quota) left, raised here or inside a worker (a RayTaskError's `cause`); libraries that
    wrap the OSError (safetensors, torch.save) keep only its text."""
    cause = worker_error(exc) or exc
    if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(os.strerror(code) in str(cause) for code in (errno.ENOSPC, errno.EDQUOT))


def room_on_disk(path: Path) -> str:
    """'N MB free on its disk' for the disk of `path` (a directory that exists), or why it cannot be read: a full
    disk often says so obscurely (a library's own error, an unnamed file)."""
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.1f} MB free on its disk"
    except OSError as exc:  # the run directory itself gone or unreadable
        return f"its disk cannot be read ({exc.strerror})"


def unexpected_line(exc: BaseException, command: str) -> str:
    """For an error outside a run's own handling (any command): the traceback to a file in the temp
    directory, and the sentence for the terminal."""
    log = Path(tempfile.gettempdir()) / f"async-rlhf-error-{os.getpid()}.log"
    return f"[async-rlhf] {command} failed: {what_died(exc)}; {write_traceback(exc, log)}"


def write_traceback(exc: BaseException, log: Path) -> str:
    """`traceback in LOG`, or why none was written (the directory itself may be the problem: full disk,
    permissions)."""
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(traceback.format_exception(exc)))
        return f"traceback in {log}"
    except OSError as err:
        return f"no traceback written ({err})"
