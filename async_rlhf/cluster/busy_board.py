"""BusyBoard: whether each generator is sampling right now, read by the learner that borrows their cores.

With pinned cores a learner-bound run trains on one core while the generator's core idles between its
calls (SmolLM2 on 2 cores: the generator samples ~5 s of every ~18 s step). The board is one 8-byte slot
per generator in a shared-memory file on the node: the generator writes BUSY when a call starts and the
time (CLOCK_MONOTONIC, one clock for every process of the node) when it ends. Reading it costs a memory
load, so the learner asks between layers (learners/core_lending.py) and trains on every core only while
no generator has sampled for `idle_s`. A generator killed mid-call leaves its slot BUSY until its restarted
actor's first call ends: the learner stays on its own cores meanwhile (the pinned plan).
"""
from __future__ import annotations

import math
import mmap
import os
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BUSY = math.inf  # a slot's value while its generator samples
_SLOT = struct.Struct("d")


class BusyBoard:
    def __init__(self, slots: int, fd: int) -> None:
        self.slots = slots
        self._map = mmap.mmap(fd, slots * _SLOT.size)
        os.close(fd)

    @classmethod
    def create(cls, path: Path, generators: int) -> BusyBoard:
        """A board for `generators` generators, each idle since now (the driver, before the actors start)."""
        fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o600)
        os.ftruncate(fd, generators * _SLOT.size)
        board = cls(generators, fd)
        for index in range(generators):
            board.mark(index, busy=False)
        return board

    @classmethod
    def attach(cls, path: str | Path) -> BusyBoard:
        fd = os.open(path, os.O_RDWR)
        return cls(os.fstat(fd).st_size // _SLOT.size, fd)

    def mark(self, index: int, busy: bool) -> None:
        _SLOT.pack_into(self._map, index * _SLOT.size, BUSY if busy else time.monotonic())

    @contextmanager
    def busy(self, index: int) -> Iterator[None]:
        """Marks generator `index` busy for the block, idle after it (also when the block raises)."""
        self.mark(index, busy=True)
        try:
            yield
        finally:
            self.mark(index, busy=False)

    def idle_for(self) -> float:
        """Seconds since the last generator finished sampling; 0 while any of them samples."""
        ends = [_SLOT.unpack_from(self._map, i * _SLOT.size)[0] for i in range(self.slots)]
        return max(0.0, time.monotonic() - max(ends)) if ends else math.inf

    def close(self) -> None:
        self._map.close()
