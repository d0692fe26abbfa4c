"""`learner.lr_schedule` and `learner.warmup_steps`: the learning rate of each learner step.

The shapes are Hugging Face's (TRL's `lr_scheduler_type`): a linear warm-up over the first `warmup_steps`
steps, then constant, linear to zero or a half cosine to zero at `learner.steps`. Two differences: the first
warm-up step trains at lr / warmup_steps instead of 0 (a step at lr 0 costs a whole generation and learns
nothing), and the rate is a function of the learner's step count alone, set on the optimizers before each step:
a resumed run or a replaced learner (which restore that count) continue the schedule exactly, with no scheduler
state to save. PPO's `ppo_epochs` optimizer steps on one batch share its rate. A run resumed with more
`learner.steps` stretches the schedule to them (the rate moves to where the new length puts that step).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

SHAPES = ("constant", "linear", "cosine")


def lr_factor(step: int, total: int, warmup: int, shape: str) -> float:
    """The share of the base learning rate for 0-based learner step `step` of `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if shape == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)  # 0 right after the warm-up; the last step stays below 1
    if shape == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizers: Iterable[tuple[torch.optim.Optimizer, float]], factor: float) -> None:
    """Each optimizer's groups at its base rate times `factor` (DeepSpeed's ZeRO optimizers step the torch
    optimizer they wrap, whose groups these are)."""
    for optimizer, base in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = base * factor
