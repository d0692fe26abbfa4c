"""Cores by load (resources.balance_cores): hand-computed windows, and the learner's real affinity."""
from __future__ import annotations

import os

import pytest

from async_rlhf.cluster.resources import CoreBalancer, core_balancer, plan_cores
from async_rlhf.config.run import RunConfig


def balancer() -> CoreBalancer:
    return CoreBalancer(own=[1], every=[0, 1], window_s=2.0, window_steps=2, margin=0.25)


def test_a_learner_bound_window_gives_the_learner_every_core_and_a_generator_bound_one_takes_it_back() -> None:
    b = balancer()
    # 4 s of loop: learner busy 3.8 s (0.95), the one generator 1.2 s (0.30): 0.65 > 0.25.
    assert b.observe(4.0, 3.8, 1.2, 5, 1) == [0, 1] and b.wide and b.moves == 1
    # next 4 s: learner 2.0 s (0.5), generator 3.6 s (0.9): the generators are the bottleneck now.
    assert b.observe(8.0, 5.8, 4.8, 10, 1) == [1] and not b.wide and b.moves == 2


def test_within_the_margin_or_a_short_window_nothing_moves() -> None:
    b = balancer()
    assert b.observe(1.5, 1.5, 0.0, 5, 1) is None  # under window_s: not judged, not consumed
    assert b.observe(4.0, 2.4, 1.6, 5, 1) is None  # 0.6 vs 0.4: within 0.25
    assert b.observe(8.0, 6.3, 2.0, 6, 1) is None  # one step since the last window: not judged yet
    assert b.observe(9.0, 7.2, 2.1, 7, 1) == [0, 1]  # 5 s, 2 steps: 0.96 vs 0.1


def test_generator_load_is_per_generator() -> None:
    b = CoreBalancer(own=[2, 3], every=[0, 1, 2, 3])
    # Two generators busy 3.2 s each of 4 s (0.8) against a learner at 0.9: balanced, stays.
    assert b.observe(4.0, 3.6, 6.4, 4, 2) is None


def test_only_a_pinned_single_rank_cpu_plan_is_balanced() -> None:
    cfg = RunConfig(resources={"balance_cores": True})
    plan = plan_cores(cfg, [0, 1])
    made = core_balancer(cfg, plan)
    assert plan.pinned and made is not None and (made.own, made.every) == ([1], [0, 1])
    assert core_balancer(cfg, plan_cores(cfg, [0, 1], gpus=True)) is None
    assert core_balancer(RunConfig(resources={"balance_cores": False}), plan) is None
    sync = RunConfig(queue={"max_staleness": 0}, resources={"balance_cores": True})
    assert core_balancer(sync, plan_cores(sync, [0, 1])) is None


def affinity_and_threads(_learner) -> tuple[list[int], int]:
    import torch

    return sorted(os.sched_getaffinity(0)), torch.get_num_threads()


@pytest.mark.integration
def test_the_learner_moves_onto_the_cores_it_is_given(ray_local, random_policies) -> None:
    """A real Learner actor: set_cores changes its affinity and torch's thread count."""
    from learners.learner import Learner

    cores = sorted(os.sched_getaffinity(0))
    learner = ray_local.remote(Learner).options(num_cpus=0).remote(RunConfig(), str(random_policies[0]), cores[:1], 1)
    assert ray_local.get(learner.__ray_call__.remote(affinity_and_threads)) == (cores[:1], 1)
    ray_local.get(learner.set_cores.remote(cores))
    assert ray_local.get(learner.__ray_call__.remote(affinity_and_threads)) == (cores, len(cores))
    ray_local.kill(learner)
