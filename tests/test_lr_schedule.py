"""learner.lr_schedule / learner.warmup_steps: hand-computed rates, the config's check, and the real learner
(DeepSpeed's engine) training at them, resumed exactly."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from async_rlhf.config.base import ConfigError
from async_rlhf.config.run import RunConfig, load_config
from learners.learner import Learner
from learners.lr_schedule import lr_factor
from tests.helpers import QUICKSTART
from tests.test_learner import build_model_dir, make_cfg, synthetic_groups


@pytest.mark.parametrize(("shape", "expected"), [
    # 6 steps, 2 of warm-up: 1/2, 2/2, then (T - s) / (T - w) for linear, the half cosine for cosine.
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),
    ("cosine", [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]),
])
def test_the_factor_of_each_step(shape: str, expected: list[float]) -> None:
    assert [lr_factor(step, 6, 2, shape) for step in range(6)] == pytest.approx(expected)


def test_no_warmup_starts_at_the_full_rate_and_no_step_trains_at_zero() -> None:
    assert lr_factor(0, 4, 0, "linear") == 1.0 and lr_factor(3, 4, 0, "linear") == 0.25
    assert min(lr_factor(s, 10, 3, "cosine") for s in range(10)) > 0


def test_a_warmup_as_long_as_the_run_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"learner.warmup_steps \(200\) must be below learner.steps \(200\)"):
        load_config(QUICKSTART, ["learner.warmup_steps=200"])
    with pytest.raises(ConfigError, match="learner.lr_schedule: Input should be 'constant', 'linear' or 'cosine'"):
        load_config(QUICKSTART, ["learner.lr_schedule=step"])


def scheduled(stage: int) -> RunConfig:
    cfg = make_cfg(lr=1e-3, zero_stage=stage)
    return cfg.model_copy(update={"learner": cfg.learner.model_copy(
        update={"steps": 4, "warmup_steps": 1, "lr_schedule": "linear"})})


@pytest.mark.parametrize("stage", [0, 2])
def test_the_learner_trains_at_the_scheduled_rate_and_a_restored_one_goes_on_with_it(tmp_path: Path, stage: int):
    model_dir = build_model_dir(tmp_path / "model")
    learner = Learner(scheduled(stage), str(model_dir), threads=2)
    rates = [learner.train_step(synthetic_groups())["lr"] for _ in range(2)]
    assert rates == pytest.approx([1e-3, 1e-3]) and learner.engine.get_lr() == pytest.approx([1e-3])
    learner.save_state(str(tmp_path / "state"))
    rates.append(learner.train_step(synthetic_groups())["lr"])
    # What DeepSpeed's optimizer stepped with: the engine reads the rate from the optimizer it wraps.
    assert rates[-1] == pytest.approx(1e-3 * 2 / 3) and learner.engine.get_lr() == pytest.approx([rates[-1]])
    resumed = Learner(scheduled(stage), str(model_dir), threads=2)
    resumed.load_state(str(tmp_path / "state"))
    assert resumed.train_step(synthetic_groups())["lr"] == pytest.approx(rates[-1])
    after, want = resumed.policy.state_dict(), learner.policy.state_dict()
    assert all(k in after and (after[k] == want[k]).all() for k in want)  # the same update: the rate reached it
