"""LineLog: an append-only JSON-lines file (metrics.jsonl, eval.jsonl, timeline.jsonl) that a full disk does not
end the run with.

A run whose disk filled failed at its next metrics line ("No space left on device"), and one without a checkpoint
lost all its training, though the final save would have waited for space (pipeline/final_save.py). Lines that
cannot be written for want of space (or quota) are held in memory, in order, and written with the next line once
space is back; a line cut short by the failed write is cut off the file first, so every line on disk is whole and
each line lands where its offset says. Said once when the disk fills, and once when the held lines are written.
Any other error fails the write as before.
"""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

from async_rlhf.failures import disk_full, naming, room_on_disk
from async_rlhf.outputs.run_dir_keeper import RunDirKeeper

HELD_LIMIT = 256 * 2**20  # bytes held in memory before a full disk ends the run after all


class DiskNotice:
    """One warning for every log of a run while its disk is full (shared by its LineLogs)."""

    def __init__(self) -> None:
        self.full: set[Path] = set()  # the logs holding lines now

    def filled(self, path: Path) -> None:
        if not self.full:
            say(f"warning: the disk of {path.parent} is full ({room_on_disk(path.parent)}): the run's log lines are "
                f"held in memory until space is freed, and the run goes on (checkpoints are skipped meanwhile; the "
                f"final save waits for space)")
        self.full.add(path)

    def freed(self, path: Path) -> None:
        self.full.discard(path)
        if not self.full:
            say(f"space is back on the disk of {path.parent}: the held log lines are written")


class LineLog:
    def __init__(self, path: Path, notice: DiskNotice | None = None, keeper: RunDirKeeper | None = None) -> None:
        self.path = path
        self.notice = notice or DiskNotice()
        self.keeper = keeper  # the run directory made again if it was removed, before each line
        self.held: list[bytes] = []
        self.sync_to_disk()
        if keeper is not None:
            keeper.remakes.append(self.sync_to_disk)  # the file made again starts empty

    def sync_to_disk(self) -> None:
        """Take the file as it is now (it may have been rewritten: a resume keeps its first lines)."""
        self.held.clear()
        self.on_disk = self.path.stat().st_size if self.path.is_file() else 0
        self.end = self.on_disk  # where the next line starts, held lines counted

    def append(self, line: str) -> int:
        """Append one line (without its newline); returns the byte offset where it starts."""
        if self.keeper is not None:
            self.keeper.ensure()
        start, data = self.end, line.encode() + b"\n"
        self.held.append(data)
        self.end += len(data)
        self.write_held()
        return start

    @property
    def holding(self) -> bool:
        return bool(self.held)

    def write_held(self) -> None:
        """Write the held lines, if the disk takes them now."""
        if not self.held:
            return
        blob = b"".join(self.held)
        try:
            with naming(self.path), self.path.open("ab") as fh:
                fh.write(blob)
        except OSError as exc:
            if not disk_full(exc) or len(blob) > HELD_LIMIT:
                raise
            if self.path.is_file():
                os.truncate(self.path, self.on_disk)  # a line cut short goes: every line on disk is whole
            self.notice.filled(self.path)
            return
        self.on_disk += len(blob)
        self.held.clear()
        if self.path in self.notice.full:
            self.notice.freed(self.path)

    def require_on_disk(self) -> None:
        """Raises while lines are held: what counts the lines (a checkpoint) must not count ones not on disk."""
        self.write_held()
        if self.held:
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: {len(self.held)} lines of {self.path.name} "
                                        f"are held in memory", str(self.path))


def say(text: str) -> None:
    print(f"[async-rlhf] {text}", file=sys.stderr, flush=True)
