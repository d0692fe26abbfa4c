"""Announcements of published versions through a generator's FIFO: the newest reaches its listener's thread,
nobody listening costs the broker nothing, and a prepare that fails is said once, not raised."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from async_rlhf.weights.announce import AnnouncementReader, announce, fifo_path
from async_rlhf.weights.broker import SharedMemoryTransport, WeightSyncBroker
from tests.helpers import publish_state


class Prepared:
    def __init__(self, hold: threading.Event | None = None) -> None:
        self.calls: list[tuple[int, str]] = []
        self.hold = hold

    def __call__(self, slot: int, tag: str) -> None:
        if self.hold is not None:
            self.hold.wait(5)
        self.calls.append((slot, tag))

    def wait_for(self, count: int) -> list[tuple[int, str]]:
        deadline = time.monotonic() + 5
        while len(self.calls) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.calls


def test_the_broker_announces_each_published_version_to_the_listening_generator(tmp_path: Path) -> None:
    import torch

    broker = WeightSyncBroker(SharedMemoryTransport(tmp_path / "shm"), keep_versions=2)
    state = {"w": torch.zeros(4)}
    publish_state(broker, 1, state)  # nobody listens yet: skipped
    prepared = Prepared()
    reader = AnnouncementReader(tmp_path / "shm", 0, prepared, os.sched_getaffinity(0))
    publish_state(broker, 2, state)
    assert prepared.wait_for(1) == [(1, "0:2")]  # version 1 still holds slot 0 (keep_versions=2)
    broker.roll_back(5)
    publish_state(broker, 5, state)
    assert prepared.wait_for(2)[1] == (0, "1:5")  # a rollback's new lineage is in the tag
    reader.close()
    assert not reader.thread.is_alive()


def test_lines_that_arrive_while_a_prepare_runs_leave_only_the_newest_to_prepare(tmp_path: Path) -> None:
    hold = threading.Event()
    prepared = Prepared(hold)
    reader = AnnouncementReader(tmp_path, 3, prepared, os.sched_getaffinity(0))
    announce(tmp_path, 0, "0:1")
    time.sleep(0.1)  # taken, and held in its prepare
    for version in (2, 3, 4):
        announce(tmp_path, version % 2, f"0:{version}")
    hold.set()
    assert prepared.wait_for(2) == [(0, "0:1"), (0, "0:4")]
    reader.close()


def test_a_generator_gone_or_behind_costs_the_announcer_nothing(tmp_path: Path) -> None:
    os.mkfifo(fifo_path(tmp_path, 0))  # a generator's, from before its process died: nobody holds it open
    started = time.monotonic()
    announce(tmp_path, 0, "0:1")
    hold = threading.Event()
    reader = AnnouncementReader(tmp_path, 1, Prepared(hold), os.sched_getaffinity(0))
    for version in range(20000):  # far more than its pipe holds while its thread is held
        announce(tmp_path, 0, f"0:{version}")
    assert time.monotonic() - started < 30
    hold.set()
    reader.close()


def test_a_prepare_that_fails_is_said_once_and_the_thread_ends(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    def fails(slot: int, tag: str) -> None:
        raise OSError("slot 0 was never written whole")

    reader = AnnouncementReader(tmp_path, 2, fails, os.sched_getaffinity(0))
    announce(tmp_path, 0, "0:1")
    reader.thread.join(5)
    assert not reader.thread.is_alive()
    assert capsys.readouterr().err == (
        "[async-rlhf] generator 2: preparing the next weights beside sampling failed (OSError: slot 0 was never "
        "written whole); each version loads in its own call from now on\n")
    announce(tmp_path, 0, "0:2")  # its pipe fills up unread, and then each line is skipped
    reader.close()
