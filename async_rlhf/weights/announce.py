"""Announcements of published versions to the generators on this node, so that each prepares the next one
beside sampling (`ShadowWeights`) before the call that asks for it arrives.

A generator runs its calls one at a time and the next one is already queued behind the chunk it samples, so
nothing sent through Ray reaches it mid-chunk. The broker instead writes a line per published version into a
FIFO per generator under the ring's root (the shm transport is one node by design), `announce-<id>.fifo`,
which its generator holds open for reading and writing (so that opening never blocks and a read never ends).
A generator not listening (not started, restarting, dead) or behind (its pipe full) is skipped: an
announcement is only a hint; the version is loaded in the call either way.
"""
from __future__ import annotations

import errno
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

STOP = b"stop"


def fifo_path(root: Path, generator_id: int) -> Path:
    return root / f"announce-{generator_id}.fifo"


def version_tag(lineage: int, version: int) -> str:
    return f"{lineage}:{version}"


def announce(root: Path, slot: int, tag: str) -> None:
    """Tell every generator listening under `root` that version `tag` is in `slot`."""
    for path in root.glob("announce-*.fifo"):
        _send(path, f"{slot} {tag}\n".encode())


def _send(path: Path, line: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO: nobody holds it open (a generator restarting or gone); ENOENT: removed meanwhile
        return
    try:
        os.write(fd, line)  # shorter than PIPE_BUF: whole or not at all
    except OSError as exc:
        if exc.errno != errno.EAGAIN:  # EAGAIN: a pipe full of lines its reader has not taken yet
            raise
    finally:
        os.close(fd)


class AnnouncementReader:
    """A generator's listener: a thread that hands the newest announced (slot, tag) to `prepare`, on `cores`
    (the ones this process may use: the engine's own thread is bound to the generator's core)."""

    def __init__(self, root: Path, generator_id: int, prepare: Callable[[int, str], object],
                 cores: set[int]) -> None:
        path = fifo_path(root, generator_id)
        try:
            os.mkfifo(path, 0o600)
        except FileExistsError:  # a restarted generator's, or another run's that used this root
            pass
        self.fd = os.open(path, os.O_RDWR)
        self.generator_id, self.prepare, self.cores = generator_id, prepare, cores
        self.thread = threading.Thread(target=self._run, name="weight-announcements", daemon=True)
        self.thread.start()

    def close(self) -> None:
        os.write(self.fd, STOP + b"\n")  # wakes a read in progress (closing the descriptor would not)
        self.thread.join(timeout=5)
        os.close(self.fd)

    def _run(self) -> None:
        os.sched_setaffinity(0, self.cores)
        try:
            while (line := self._newest()) != STOP:
                slot, tag = line.split()
                self.prepare(int(slot), tag.decode())
        except Exception as exc:  # noqa: BLE001  # a hint that failed: every version still loads in its call
            print(f"[async-rlhf] generator {self.generator_id}: preparing the next weights beside sampling failed "
                  f"({type(exc).__name__}: {exc}); each version loads in its own call from now on",
                  file=sys.stderr, flush=True)

    def _newest(self) -> bytes:
        """The last line of what arrived (older versions are not worth preparing), waiting for one. Each line is
        written whole (one write under PIPE_BUF), so a read ends on a line's end."""
        received = os.read(self.fd, 4096)
        while not received.endswith(b"\n"):
            received += os.read(self.fd, 4096)
        lines = received.split()
        return STOP if STOP in lines else b" ".join(received.strip().split(b"\n")[-1].split())
