"""ShmSlotRing: whole weight versions in preallocated, already-touched shared-memory slots.

Why slots instead of a file per version: a copy into fresh memory costs ~6x a copy into memory already
touched (page faults; docs/benchmarks.md "Weight sync"). Each slot is one file of the model's size under
a tmpfs root, created and zero-filled once, then overwritten in place by every version that reuses it.
The tensors sit at fixed offsets (`SlotLayout`, written once to `layout.json`), so a reader maps the
file and takes views: no parsing, no copy until the engine loads them.

Which slot a version goes to, and when a slot may be overwritten, is the broker's business (it never
hands out a slot that is leased or still kept): the ring itself only writes and reads.
"""
from __future__ import annotations

import errno
import json
import mmap
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from async_rlhf.failures import RunError

ALIGN = 64  # bytes: every tensor starts on a cache line
LAYOUT_FILE = "layout.json"


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lives inside a slot."""

    name: str
    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()


@dataclass(frozen=True)
class SlotLayout:
    tensors: tuple[TensorSlot, ...]
    nbytes: int

    @classmethod
    def of(cls, state: dict[str, torch.Tensor]) -> SlotLayout:
        """Tensors in `state` order, each at the next aligned offset."""
        tensors, offset = [], 0
        for name, tensor in state.items():
            slot = TensorSlot(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), offset)
            tensors.append(slot)
            offset = _aligned(offset + slot.nbytes)
        return cls(tuple(tensors), max(offset, ALIGN))

    def to_json(self) -> str:
        return json.dumps({"nbytes": self.nbytes, "tensors": [[t.name, t.dtype, list(t.shape), t.offset]
                                                               for t in self.tensors]})

    @classmethod
    def from_json(cls, text: str) -> SlotLayout:
        raw = json.loads(text)
        return cls(tuple(TensorSlot(n, d, tuple(s), o) for n, d, s, o in raw["tensors"]), raw["nbytes"])

    def matches(self, state: dict[str, torch.Tensor]) -> bool:
        return self == SlotLayout.of(state)


def _aligned(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN


class ShmSlotRing:
    """The slots under one root, mapped in this process. The learner writes, generators read."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.layout: SlotLayout | None = None
        self._maps: dict[int, tuple[mmap.mmap, dict[str, torch.Tensor]]] = {}

    # ---- the learner's side
    def write(self, slot: int, state: dict[str, torch.Tensor]) -> None:
        """Copy `state` into `slot` in place (one copy, into touched memory)."""
        views = self._views(slot, self._writer_layout(state))
        for name, tensor in state.items():
            views[name].copy_(tensor)

    def _writer_layout(self, state: dict[str, torch.Tensor]) -> SlotLayout:
        if self.layout is None:
            self.layout = SlotLayout.of(state)
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / (LAYOUT_FILE + ".partial")
            tmp.write_text(self.layout.to_json())
            os.replace(tmp, self.root / LAYOUT_FILE)  # a reader never sees half a layout
        elif not self.layout.matches(state):
            raise ValueError(f"weights under {self.root} changed names, dtypes or shapes since the first version")
        return self.layout

    # ---- a generator's side
    def read(self, slot: int) -> dict[str, torch.Tensor]:
        """Views of `slot`'s tensors (no copy: valid until the broker lets the slot be reused). A slot the learner
        never wrote is an error: mapping it would have made a file of zeros, loaded as weights without a word."""
        if self.layout is None:
            self.layout = SlotLayout.from_json((self.root / LAYOUT_FILE).read_text())
        path = self._path(slot)
        if slot not in self._maps and (not path.is_file() or path.stat().st_size != self.layout.nbytes):
            raise FileNotFoundError(f"weight slot {slot} under {self.root} was never written whole")
        return self._views(slot, self.layout)

    def _path(self, slot: int) -> Path:
        return self.root / f"slot-{slot}.bin"

    def _views(self, slot: int, layout: SlotLayout) -> dict[str, torch.Tensor]:
        if slot not in self._maps:
            self._maps[slot] = self._map(slot, layout)
        return self._maps[slot][1]

    def _map(self, slot: int, layout: SlotLayout) -> tuple[mmap.mmap, dict[str, torch.Tensor]]:
        path = self._path(slot)
        fresh = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if fresh or os.fstat(fd).st_size != layout.nbytes:
                reserve(fd, layout.nbytes, self.root)
            buffer = mmap.mmap(fd, layout.nbytes)
        finally:
            os.close(fd)
        flat = torch.frombuffer(buffer, dtype=torch.uint8)
        if fresh:
            flat.zero_()  # touch every page now, once, so no version pays the page faults
        return buffer, {t.name: _view(flat, t) for t in layout.tensors}

    def close(self) -> None:
        """Drop this process's mappings (the files stay; the broker's owner removes the root)."""
        self._maps.clear()  # an mmap with live tensor views cannot be closed explicitly; GC unmaps it


def reserve(fd: int, nbytes: int, root: Path) -> None:
    """Size a slot file with its pages allocated now. A sparse file (ftruncate alone) on a full tmpfs is
    only found out when a page is first touched, by SIGBUS, which kills the process with no message."""
    os.ftruncate(fd, nbytes)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        free = shutil.disk_usage(root).free
        raise RunError(f"weight_sync: no room in {root.parent} for a weight slot of {nbytes / 2**20:.0f} MiB "
                       f"({free / 2**20:.0f} MiB free there); give it more room (in Docker: --shm-size), or set "
                       "weight_sync.shm_root to a larger tmpfs") from None


def _view(flat: torch.Tensor, t: TensorSlot) -> torch.Tensor:
    return flat[t.offset:t.offset + t.nbytes].view(getattr(torch, t.dtype)).view(t.shape)
