"""Stand-in actors for the tests of the loop's roles: generators, scorers and learners that are slow, stuck or dying.

Each Ray actor starts in a fresh worker that imports its class's module: kept here, apart from the test modules,
they import no torch, vLLM or Ray internals (0.9 s a worker instead of 2.3 s; the suite starts dozens).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import TYPE_CHECKING

from actors.generation_result import GenerationResult
from async_rlhf.rollout import Completion, Prompt, RolloutGroup

if TYPE_CHECKING:
    from async_rlhf.weights.broker import WeightRef

SAMPLE_S = 0.5  # the stand-in generator's time per evaluation sample


class SlowGenerator:
    def generate(self, prompts: list[Prompt], weights: WeightRef | None, n: int = 1,
                 temperature: float | None = None) -> GenerationResult:
        started = time.time()
        time.sleep(SAMPLE_S)
        version = weights.version if weights is not None else 0
        groups = [RolloutGroup(p, [Completion([5], "5", [-0.5], "stop")], version, 0, time.time()) for p in prompts]
        return GenerationResult(groups, 0, version, SAMPLE_S, 0.0, started, len(prompts))

    def info(self) -> dict:
        return {"pid": os.getpid()}


class Scorer:
    def __init__(self, marker: str = "") -> None:
        self.marker = marker

    def score(self, groups: list[RolloutGroup], role: str = "train") -> list[RolloutGroup]:
        done = [dataclasses.replace(c, reward=1.0, reward_status="ok") for g in groups for c in g.completions]
        return [dataclasses.replace(g, completions=[c]) for g, c in zip(groups, done)]

    def health(self) -> dict:
        return {"pid": os.getpid()}


class DiesInItsFirstScore(Scorer):
    """A reward actor that dies in its first scoring call (once per test: `marker`); Ray starts it again."""

    def score(self, groups: list[RolloutGroup], role: str = "train") -> list[RolloutGroup]:
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return super().score(groups, role)


class StoppedGenerator(SlowGenerator):
    """Generator 0 stopped (SIGSTOP) once its sample is in: a probe of it never answers."""

    def info(self) -> dict:
        time.sleep(3600)
        return {}


class SlowStartGenerator(SlowGenerator):
    """A generator whose every start takes 2 s (the real one's vLLM engine takes longer): restarted, Ray keeps it
    RESTARTING meanwhile."""

    def __init__(self) -> None:
        time.sleep(2.0)


class KLLearner:
    def sampled_kl_to_reference(self, groups: list[RolloutGroup], temperature: float) -> float:
        return 0.25


class SlowKLLearner(KLLearner):
    def sampled_kl_to_reference(self, groups: list[RolloutGroup], temperature: float) -> float:
        time.sleep(SAMPLE_S)
        return 0.25


class HungKLLearner(KLLearner):
    def sampled_kl_to_reference(self, groups: list[RolloutGroup], temperature: float) -> float:
        time.sleep(3600)  # a stopped learner, as far as the driver can tell
        return 0.25


class Pingable:
    def ping(self) -> int:
        return 1


class SlowLearner:
    """`save_pretrained` answers after `delay_s`: a learner stopped mid-call, as far as the driver can tell."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def save_pretrained(self, path: str) -> str:
        time.sleep(self.delay_s)
        return path


class FailsToStart:
    def __init__(self) -> None:
        raise ValueError("header too large in model.safetensors")


class Stuck:
    def pid(self) -> int:
        return os.getpid()

    def generate(self) -> None:
        time.sleep(3600)  # a call that never answers


class StuckReward:
    def health(self) -> dict:
        return {"pid": os.getpid()}

    def score(self, groups: list) -> list:
        time.sleep(3600)  # a scorer that never returns
        return groups


class StartsStuck(StuckReward):
    """A reward actor (or, by its `info`, a generator) whose next start hangs in its `__init__` for good once the
    file `marker` exists (a restart's model load that never ends); that start takes the file, so the one after
    it starts as usual."""

    def __init__(self, marker: str) -> None:
        if os.path.exists(marker):
            os.remove(marker)
            time.sleep(3600)

    def info(self) -> dict:
        return self.health()


class Sequential:  # a generator's calls run one after another, in the order they were sent
    def call(self, i: int) -> int:
        return i
