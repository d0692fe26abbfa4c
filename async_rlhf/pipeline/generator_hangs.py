"""A generator that is alive but answers nothing: a wedged engine, a stopped process, a collective that never
completes. Ray restarts a generator that dies, but not one that hangs, so the run waited for
`learner.stall_timeout_s` and then ended. A busy generator silent for longer than `generation.hang_timeout_s`
(default: half of the stall timeout, `RunConfig.generator_hang_timeout_s`), and than `HANG_FACTOR` times the longest
any generator has taken to answer, is killed instead: Ray restarts it and its prompts go out again, exactly as after
a crash (pipeline/generators.py), within `generation.max_restarts`.
"""
from __future__ import annotations

import sys
import time

import ray

from async_rlhf.pipeline.generators import GeneratorPool
from async_rlhf.pipeline.state import GeneratorSlot

HANG_FACTOR = 10.0  # an evaluation queued ahead of a chunk, or a bigger batch, takes a few times a chunk, not 10


class GeneratorHangs:
    def __init__(self, pool: GeneratorPool, timeout_s: float) -> None:
        self.pool = pool
        self.timeout_s = timeout_s

    @property
    def limit_s(self) -> float:
        return max(self.timeout_s, HANG_FACTOR * self.pool.longest_silence_s)

    def check(self, frozen_s: float) -> None:
        """Kill every busy generator silent past the limit. `frozen_s`: time this process itself was stopped
        since the last check, which no generator's silence includes."""
        now = time.monotonic()
        for slot in self.pool.slots:
            slot.answered_at += frozen_s
            if slot.chunks and not slot.recovering and now - slot.answered_at > self.limit_s:
                self._restart(slot, now - slot.answered_at)

    def _restart(self, slot: GeneratorSlot, silent_s: float) -> None:
        print(f"[async-rlhf] generator {slot.generator_id} has answered nothing for {silent_s:.0f}s with "
              f"{len(slot.chunks)} chunk(s) in flight (generation.hang_timeout_s={self.timeout_s:g}; the longest "
              f"answer so far took {self.pool.longest_silence_s:.1f}s): killing it so that Ray restarts it; its "
              f"prompts will be re-issued", file=sys.stderr, flush=True)
        slot.answered_at = time.monotonic()  # its chunks now fail as after a crash: said once
        ray.kill(slot.handle, no_restart=False)
