"""The registered losses on the real pipeline (Ray + vLLM generator + DeepSpeed learner), end to end.

One short asynchronous run per learner path (RUNS_IN: each rides on a run another test makes anyway, since a
pipeline run costs ~15 s of start-up), and the check each of them makes (`assert_raises_train_reward`).

"Moves its own objective": every loss here maximises the proxy reward (DPO/IPO and RLOO/GRPO a
KL-regularised version of it, best-of-N SFT by imitating its best samples), so the check is the
train reward of the learner's own batches: the mean over the last WINDOW steps must beat the mean
over the first WINDOW steps. Per-step losses are not comparable across steps (each step sees fresh
samples, and a policy-gradient surrogate's value is not the objective), the train reward is. At
each config's own learning rate the gain between the first and last 8 of 40 steps was +0.085 to
+0.14 over two runs of each loss, against a noise of ~0.02 on that difference (a step's mean reward
varies by ~0.035). IPO runs with beta 0.1: at the README's 0.5 its target gap (1 / (2 beta) = 1 nat)
keeps it so close to the reference (KL 0.02) that the gain was only +0.04..0.08. A higher learning
rate for shorter runs made the first steps drop (AdamW's first updates are ~lr in size whatever
the gradient). PPO: +0.106 in one run. `vineppo` runs on the arith task (its reasoning steps are solution lines): +0.057
(0.304 -> 0.361), the same in two runs (sampling and MC rollouts are seeded per prompt), in 220-300 s,
most of it the generator's MC sampling; its end-to-end run here is bench vineppo_vs_ppo's smoke test (2 steps,
the MC accounting only).
Measured numbers are in docs/losses.md.
"""
from __future__ import annotations

from learners.losses import LOSSES, select_pairs_batch

STEPS = 40
WINDOW = 8
MIN_GAIN = 0.03
# Where each path through the learner runs end to end: pairs (online_dpo, the quickstart's loss: the async quickstart
# run checks the same gain on it), group baselines (rloo: the run whose generator and reward actor hang), a value
# model (ppo: the run whose learner hangs and is replaced from its checkpoints, so the value model comes back from
# them too), MC values (vineppo, the arith task: bench vineppo_vs_ppo's smoke test, which checks its MC
# accounting). The other losses reuse those paths with another formula; each trains in a real Learner in
# tests/test_losses*.py, and their 40-step pipeline gains are in docs/losses.md.
RUNS_IN = {"online_dpo": "tests/test_end_to_end.py", "rloo": "tests/test_faults.py", "ppo": "tests/test_faults.py",
           "vineppo": "tests/test_bench_smoke.py"}


def learner_path(name: str) -> tuple[bool, bool, bool]:
    """What sets a loss's path through the pipeline and the learner: pairs, a value model, MC values."""
    spec = LOSSES[name]
    return spec.select is select_pairs_batch, spec.needs_value_model, spec.needs_mc_values


def test_every_path_of_a_registered_loss_has_a_run():
    builtin = [name for name, spec in LOSSES.items() if spec.fn.__module__.startswith("learners.losses.")]
    assert {learner_path(name) for name in builtin} == {learner_path(name) for name in RUNS_IN}


def assert_raises_train_reward(name: str, summary: dict, steps: list[dict]) -> None:
    """A STEPS-step run of loss `name` (summary.json, metrics.jsonl) trained every step and moved its own objective."""
    rewards = [s["reward_mean"] for s in steps]
    first, last = mean(rewards[:WINDOW]), mean(rewards[-WINDOW:])
    print(f"{name}: train reward first {WINDOW} {first:.3f} -> last {WINDOW} {last:.3f}, gold "
          f"{summary['initial_gold_reward']:.3f} -> {summary['final_gold_reward']:.3f}, kl {steps[-1]['kl']:.3f}")
    assert summary["steps"] == len(steps) == STEPS
    assert all(s["nonfinite"] == 0 and s["optimizer_step"] == 1 for s in steps), name
    assert summary["max_staleness_seen"] <= 1
    # No check on the sign of a step's KL: it is estimated on samples from the (stale) behaviour
    # policy, not the current one, and dips below 0 by noise when the policy stays close (seen: IPO).
    assert last > first + MIN_GAIN, (name, rewards)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)
