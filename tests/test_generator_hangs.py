"""A generator that hangs (pipeline/generator_hangs.py): which are killed, when, and that Ray then restarts them.

A stand-in actor holds the generator's place (a real one starts vLLM, which takes seconds and tells nothing more
here); the kill and Ray's restart of it are real. tests/test_faults.py hangs a real generator in a real run."""
from __future__ import annotations

import os
import time
from types import SimpleNamespace
from typing import Any, cast

import pytest

from async_rlhf.pipeline.generator_hangs import HANG_FACTOR, GeneratorHangs
from async_rlhf.pipeline.generators import GeneratorPool
from async_rlhf.pipeline.state import Chunk, GeneratorSlot


class Stuck:
    def pid(self) -> int:
        return os.getpid()


def pool_of(slots: list[GeneratorSlot], longest_silence_s: float = 0.0) -> GeneratorPool:
    return cast(GeneratorPool, SimpleNamespace(slots=slots, longest_silence_s=longest_silence_s))


def busy_slot(handle: Any, silent_s: float, generator_id: int = 0) -> GeneratorSlot:
    slot = GeneratorSlot(handle, generator_id)
    slot.chunks.append(Chunk(ref=None, prompts=[], leased_version=None))
    slot.answered_at = time.monotonic() - silent_s
    return slot


def test_a_busy_generator_silent_past_the_timeout_is_killed_and_ray_restarts_it(ray_local,
                                                                                capsys: pytest.CaptureFixture) -> None:
    actor = ray_local.remote(num_cpus=0, max_restarts=1)(Stuck).remote()
    before = ray_local.get(actor.pid.remote())
    slot = busy_slot(actor, silent_s=12.0)
    GeneratorHangs(pool_of([slot], longest_silence_s=0.2), timeout_s=10.0).check(frozen_s=0.0)
    said = capsys.readouterr().err
    assert said.startswith("[async-rlhf] generator 0 has answered nothing for 12s with 1 chunk(s) in flight "
                           "(generation.hang_timeout_s=10; the longest answer so far took 0.2s): killing it")
    deadline, after = time.monotonic() + 60, before
    while after == before:  # ray.kill returns at once; calls fail while the actor restarts
        assert time.monotonic() < deadline, "not restarted"
        try:
            after = ray_local.get(actor.pid.remote(), timeout=5)
        except Exception:
            time.sleep(0.2)
    assert time.monotonic() - slot.answered_at < 5  # said once: the clock starts again


class Untouchable:
    """A handle that fails the test if anything tries to kill it."""

    def __reduce__(self) -> Any:
        raise AssertionError("killed")


@pytest.mark.parametrize("case", ["idle", "recovering", "within the timeout", "within 10x the longest answer",
                                  "the driver was frozen"])
def test_what_is_not_a_hang(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    killed: list[Any] = []
    monkeypatch.setattr("async_rlhf.pipeline.generator_hangs.ray.kill", lambda handle, **_: killed.append(handle))
    slot, longest, frozen = busy_slot(Untouchable(), silent_s=30.0), 0.5, 0.0
    if case == "idle":
        slot.chunks.clear()
    elif case == "recovering":
        slot.recovering = True  # already dead: Ray is restarting it
    elif case == "within the timeout":
        slot.answered_at = time.monotonic() - 5.0
    elif case == "within 10x the longest answer":
        longest = 30.0 / HANG_FACTOR + 1.0  # big batches answer slowly, and always did
    else:
        frozen = 25.0  # this process was stopped for 25 of the 30 s: the generator was silent 5 s
    GeneratorHangs(pool_of([slot], longest), timeout_s=10.0).check(frozen_s=frozen)
    assert killed == []
