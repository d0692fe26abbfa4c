"""ShmSlotRing: hand-computed layout, one file per slot written in place, views without copies."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from async_rlhf.failures import RunError
from async_rlhf.weights.shm_ring import ShmSlotRing, SlotLayout
from async_rlhf.weights.slot_location import parse_slot_location, slot_location


def test_layout_aligns_every_tensor_to_a_cache_line() -> None:
    state = {"a": torch.zeros(3, dtype=torch.float32), "b": torch.zeros(2, 5, dtype=torch.bfloat16),
             "c": torch.zeros(16, dtype=torch.float32)}
    layout = SlotLayout.of(state)
    # a: 12 bytes at 0 -> b at 64 (20 bytes) -> c at 128 (64 bytes) -> 192 in all
    assert [(t.name, t.offset, t.nbytes) for t in layout.tensors] == [("a", 0, 12), ("b", 64, 20), ("c", 128, 64)]
    assert layout.nbytes == 192 and SlotLayout.from_json(layout.to_json()) == layout


def test_write_then_read_in_another_ring_object_and_rewrite_in_place(tmp_path: Path) -> None:
    state = {"w": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.ones(5, dtype=torch.bfloat16)}
    writer = ShmSlotRing(tmp_path)
    writer.write(1, state)
    inode = (tmp_path / "slot-1.bin").stat().st_ino
    reader = ShmSlotRing(tmp_path)  # a generator's process maps the same files
    views = reader.read(1)
    assert torch.equal(views["w"], state["w"]) and torch.equal(views["b"], state["b"])
    writer.write(1, {"w": state["w"] * 10, "b": state["b"] * 2})
    assert (tmp_path / "slot-1.bin").stat().st_ino == inode  # the same touched file, overwritten
    assert torch.equal(views["w"], state["w"] * 10)  # views, not copies: the broker must not reuse a leased slot


def test_a_changed_model_is_refused(tmp_path: Path) -> None:
    ring = ShmSlotRing(tmp_path)
    ring.write(0, {"w": torch.zeros(4)})
    with pytest.raises(ValueError, match="changed names, dtypes or shapes"):
        ring.write(1, {"w": torch.zeros(5)})


def test_locations_round_trip_and_other_schemes_are_not_slots(tmp_path: Path) -> None:
    assert parse_slot_location(slot_location(tmp_path, 7)) == (tmp_path, 7)
    assert parse_slot_location("nccl://v3") is None and parse_slot_location(str(tmp_path)) is None
    with pytest.raises(ValueError, match="malformed shm slot location"):
        parse_slot_location("shm-slot:///dev/shm/x")


def test_a_full_tmpfs_is_a_one_line_error_naming_the_room_not_a_sigbus(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # A full tmpfs cannot be made here without mount privileges, so the kernel's answer to the allocation is
    # stood in for. Without the allocation (a sparse file) the first touch of a page past the tmpfs's room
    # was a SIGBUS that killed the learner with no message.
    def no_room(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    ring = ShmSlotRing(tmp_path / "async-rlhf-run")
    with pytest.raises(RunError, match=rf"^weight_sync: no room in {tmp_path} for a weight slot of 4 MiB \(\d+ MiB "
                                       r"free there\); give it more room \(in Docker: --shm-size\), or set "
                                       r"weight_sync.shm_root to a larger tmpfs$"):
        ring.write(0, {"w": torch.zeros(1024, 1024)})


def test_a_slot_never_written_is_refused_not_read_as_zeros(tmp_path: Path) -> None:
    ShmSlotRing(tmp_path).write(0, {"w": torch.ones(4)})
    reader = ShmSlotRing(tmp_path)
    with pytest.raises(FileNotFoundError, match="weight slot 1 under .* was never written whole"):
        reader.read(1)  # before: a new file of zeros, loaded by the generator as weights
    assert not (tmp_path / "slot-1.bin").exists() and torch.equal(reader.read(0)["w"], torch.ones(4))
