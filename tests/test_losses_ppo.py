"""PPO against hand-worked numbers: the clipped value loss, the clipped surrogate, and the whole loss with its
gradients; config validation of the PPO keys. GAE and its pieces: tests/test_advantages_gae.py.

Conventions as in tests/test_losses_pg.py: rows are completions, column j is completion token j,
`mask` is 1 on real tokens, padded columns hold junk (99 / -77 / 55) so a missed mask shows.
"""
from __future__ import annotations

import math

import pytest
import torch

from async_rlhf.config.base import ConfigError
from async_rlhf.config.loss import LossConfig
from async_rlhf.config.run import validate_config
from learners.advantages.gae import clipped_value_loss
from learners.loss_traits import builtin_losses
from learners.losses import LOSSES, LossInputs, get_loss
from tests.helpers import present

LN2 = math.log(2.0)
PAD, REF_PAD, VALUE_PAD = 99.0, -77.0, 55.0
# Two rows of 2 real tokens and one padded column.
MASK = [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]


IS_ABLE = ", ".join(sorted(n for n, t in builtin_losses().items() if t.supports_importance_sampling))
EPOCHS_ABLE = ", ".join(sorted(n for n, t in builtin_losses().items() if t.supports_epochs))


def t(rows: list[list[float]], pad: float = PAD) -> torch.Tensor:
    """[B, 3] tensor from 2-token rows, junk `pad` in the padded column."""
    return torch.tensor([[*row, pad] for row in rows])


def close(actual: torch.Tensor, expected: list[list[float]]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)


# The whole-loss example: gamma = lam = 1, beta = 0.5, clip_eps = 0.2, value_clip_eps = 0.5.
#   mu  = [[-1, -1], [-1, -1]];  ref = [[-1.5, -1], [-1, -3]]   -> KL [[0.5, 0], [0, 2]]
#   rewards [1, 0]                                              -> r = [[-0.25, 1], [0, -1]]
#   V_old = [[-0.25, 0], [-1, -1]]  -> A = G - V_old = [[0.75+0.25, 1-0], [-1+1, -1+1]] = [[1, 1], [0, 0]]
#   R = G = [[0.75, 1], [-1, -1]];  whitened A = [[1, 1], [-1, -1]]
#   log pi - log mu = [[ln 2, 0], [-ln 2, 0]]  ->  rho = [[2, 1], [0.5, 1]]
#   surrogate min(rho A, clip(rho, 0.8, 1.2) A) = [[min(2, 1.2), 1], [min(-0.5, -0.8), -1]] = [[1.2, 1], [-0.8, -1]]
#   L_pi = -mean = -(1.2 + 1 - 0.8 - 1) / 4 = -0.1;  clip_frac = 2/4 (rho 2 and 0.5 are out of [0.8, 1.2])
#   d L_pi / d logp = -rho A / 4 on unclipped tokens, 0 on clipped ones: [[0, -0.25], [0, 0.25]]
# Value loss with V = [[0.75, 0.25], [-1, -2]]:
#   (0,0): V - V_old = 1 -> clipped to 0.5, V_c = 0.25: max((0.75-0.75)^2, (0.25-0.75)^2) = 0.25 (clipped; no grad)
#   (0,1): V - V_old = 0.25 inside:  (0.25 - 1)^2 = 0.5625
#   (1,0): V = V_old = R: 0
#   (1,1): V - V_old = -1 -> V_c = -1.5: max((-2+1)^2, (-1.5+1)^2) = max(1, 0.25) = 1 (unclipped)
#   L_V = 1/2 (0.25 + 0.5625 + 0 + 1) / 4 = 0.2265625;  value_clip_frac = 1/4
#   d L_V / d V = (V - R) / 4 where the unclipped branch wins: [[0, -0.1875], [0, -0.25]]
PPO_MU = [[-1.0, -1.0], [-1.0, -1.0]]
PPO_REF = [[-1.5, -1.0], [-1.0, -3.0]]
PPO_LOGPS = [[-1.0 + LN2, -1.0], [-1.0 - LN2, -1.0]]
PPO_OLD_VALUES = [[-0.25, 0.0], [-1.0, -1.0]]
PPO_VALUES = [[0.75, 0.25], [-1.0, -2.0]]
PPO_PARAMS = dict(beta=0.5, clip_eps=0.2, gamma=1.0, lam=1.0, value_clip_eps=0.5)


def ppo_batch() -> LossInputs:
    return LossInputs(logps=t(PPO_LOGPS).requires_grad_(True), mask=torch.tensor(MASK),
                      rewards=torch.tensor([1.0, 0.0]), ref_logps=t(PPO_REF, REF_PAD),
                      behaviour_logps=t(PPO_MU), group_ids=torch.tensor([0, 1]),
                      values=t(PPO_VALUES, VALUE_PAD).requires_grad_(True),
                      old_values=t(PPO_OLD_VALUES, VALUE_PAD))


def test_clipped_value_loss_hand_worked():
    batch = ppo_batch()
    returns = t([[0.75, 1.0], [-1.0, -1.0]], VALUE_PAD)
    values = present(batch.values)
    loss, clipped = clipped_value_loss(values, present(batch.old_values), returns, batch.mask, clip_eps=0.5)
    loss.backward()
    assert loss.item() == pytest.approx(0.2265625, abs=1e-7)
    close(clipped, [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    close(present(values.grad), [[0.0, -0.1875, 0.0], [0.0, -0.25, 0.0]])


def test_ppo_hand_worked():
    batch = ppo_batch()
    loss, metrics = get_loss("ppo").fn(batch, LossConfig(name="ppo", **PPO_PARAMS))
    loss.backward()
    assert metrics["policy_loss"] == pytest.approx(-0.1, abs=1e-6)
    assert metrics["value_loss"] == pytest.approx(0.2265625, abs=1e-6)
    assert loss.item() == pytest.approx(-0.1 + 0.2265625, abs=1e-6)
    assert metrics["clip_frac"] == pytest.approx(0.5)
    assert metrics["value_clip_frac"] == pytest.approx(0.25)
    assert metrics["kl_token"] == pytest.approx((0.5 + 0 + 0 + 2) / 4)
    assert metrics["adv_mean"] == pytest.approx(0.5)  # before whitening: [1, 1, 0, 0]
    assert metrics["return_mean"] == pytest.approx((0.75 + 1 - 1 - 1) / 4)
    close(present(batch.logps.grad), [[0.0, -0.25, 0.0], [0.0, 0.25, 0.0]])
    close(present(present(batch.values).grad), [[0.0, -0.1875, 0.0], [0.0, -0.25, 0.0]])


def test_ppo_kl_is_taken_on_the_behaviour_policy_not_the_current_one():
    """Moving the current log-probs (not mu) changes only the ratio, never the rewards: with the
    ratio at 1 everywhere (logps = mu) the advantages and so the policy loss are those of the
    hand example's A = [[1, 1], [0, 0]] -> surrogate [1, 1, -1, -1] -> L_pi = 0."""
    batch = ppo_batch()
    batch.logps = t(PPO_MU).requires_grad_(True)
    _, metrics = get_loss("ppo").fn(batch, LossConfig(name="ppo", **PPO_PARAMS))
    assert metrics["policy_loss"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["kl_token"] == pytest.approx(0.625)


def test_ppo_needs_the_value_model_inputs():
    batch = ppo_batch()
    batch.values = None
    with pytest.raises(ValueError, match="this loss needs LossInputs.values; the learner did not provide it"):
        get_loss("ppo").fn(batch, LossConfig(name="ppo"))


# --------------------------------------------------------------------- declarations and config


def test_ppo_declarations_and_doc():
    spec = LOSSES["ppo"]
    assert (spec.needs_value_model, spec.needs_reference, spec.supports_epochs) == (True, True, True)
    assert spec.min_samples_per_prompt == 1 and not spec.supports_importance_sampling
    assert all(word in spec.doc for word in ("Schulman", "Ouyang", "GAE", "L_pi", "L_V"))
    assert [n for n, s in LOSSES.items() if s.needs_value_model] == ["ppo"]


def test_ppo_config_defaults_and_k_of_one():
    cfg = validate_config({"loss": {"name": "ppo"}, "generation": {"samples_per_prompt": 1}})
    loss = cfg.loss
    assert (loss.gamma, loss.lam, loss.value_clip_eps, loss.value_lr, loss.ppo_epochs) == (1.0, 0.95, 0.2, None, 1)


@pytest.mark.parametrize("override, message", [
    ({"name": "grpo", "ppo_epochs": 2},
     "config error: loss.ppo_epochs: loss 'grpo' takes one optimizer step per batch; set loss.ppo_epochs=1 "
     f"or use one of: {EPOCHS_ABLE}"),
    ({"name": "ppo", "importance_sampling": "truncated"},
     "config error: loss.importance_sampling: loss 'ppo' does not support 'truncated'; set "
     f"loss.importance_sampling=none or use one of: {IS_ABLE}"),
    ({"name": "ppo", "lam": 1.5}, "config error: loss.lam: Input should be less than or equal to 1 (got 1.5)"),
    ({"name": "ppo", "value_lr": 0}, "config error: loss.value_lr: Input should be greater than 0 (got 0)"),
])
def test_ppo_config_errors_are_one_line(override: dict, message: str):
    with pytest.raises(ConfigError) as err:
        validate_config({"loss": override})
    assert str(err.value) == message


# --------------------------------------------------------------------- inside the real learner


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from tests.test_learner import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("ppo_model"))


def make_learner(model_dir, name: str, **loss):
    from async_rlhf.config.run import RunConfig
    from learners.learner import Learner

    cfg = RunConfig(seed=0, loss={"name": name, "beta": 0.05, **loss}, learner={"lr": 1e-3, "grad_clip": 1.0})
    return Learner(cfg, str(model_dir), threads=2)


def value_params(learner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in learner.value.model.state_dict().items()}


@pytest.mark.integration
def test_only_ppo_gets_a_value_model(tiny_model_dir):
    learner = make_learner(tiny_model_dir, "grpo")
    assert learner.value is None
    with pytest.raises(ValueError, match="^loss 'grpo' has no value model"):
        learner.save_value_model("/nonexistent")


@pytest.mark.integration
def test_ppo_learner_trains_policy_and_value_model_and_checkpoints_it(tiny_model_dir, tmp_path):
    """Six PPO steps on one fixed on-policy batch: the value model (initial V = 0 everywhere, from
    the zero head) fits the returns, the best completions get likelier, and the value model's
    weights and AdamW state round-trip through save_pretrained's value_model/ directory."""
    from learners.logprobs import pack
    from learners.persistence import VALUE_MODEL_DIR
    from tests.test_losses_pg import learner_logp, on_policy_groups

    learner = make_learner(tiny_model_dir, "ppo", lam=1.0)
    groups = on_policy_groups(tiny_model_dir)
    best = [(g.prompt.token_ids, g.completions[-1]) for g in groups[:4]]  # reward 3: the best of each prompt
    before_logp = sum(learner_logp(learner, p, c) for p, c in best)
    before_value = value_params(learner)
    assert all(float(v.abs().sum()) == 0 for k, v in before_value.items() if k.startswith("head."))
    history = [learner.train_step(groups) for _ in range(6)]
    assert all(m["nonfinite"] == 0 and m["optimizer_step"] == 1 for m in history), history
    assert history[0]["value_mean"] == 0.0 and history[0]["value_clip_frac"] == 0.0  # V = V_old in one epoch
    value_losses = [m["value_loss"] for m in history]  # measured: 2.12 -> 1.23, falling at every step
    assert value_losses[-1] < 0.75 * value_losses[0], value_losses
    assert sum(learner_logp(learner, p, c) for p, c in best) > before_logp + 0.5
    after_value = value_params(learner)
    assert all(not torch.equal(before_value[k], after_value[k]) for k in ("head.weight", "head.bias"))
    assert learner.value.steps == 6

    learner.save_pretrained(str(tmp_path / "ckpt"))
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.safetensors")) == ["model.safetensors"]
    restored = make_learner(tiny_model_dir, "ppo", lam=1.0)
    restored.load_value_model(str(tmp_path / "ckpt" / VALUE_MODEL_DIR))
    batch = pack([list(p) for p, _ in best], [c.token_ids for _, c in best]).to(learner.device)
    with torch.no_grad():
        torch.testing.assert_close(restored.value.values(batch), learner.value.values(batch), atol=0, rtol=0)
    assert restored.value.steps == 6
    assert restored.value.optimizer.state_dict()["state"].keys() == learner.value.optimizer.state_dict()["state"].keys()


@pytest.mark.integration
def test_ppo_epochs_take_several_steps_and_make_the_value_clip_bind(tiny_model_dir):
    """Two epochs on one batch: in the first V = V_old and the ratio is 1 (fresh samples), so neither
    clip binds; after one step most values moved by more than value_clip_eps = 1e-3 towards their
    return (measured 0.85 of the tokens) and the ratio left [0.8, 1.2] on many tokens."""
    from tests.test_losses_pg import on_policy_groups

    learner = make_learner(tiny_model_dir, "ppo", ppo_epochs=2, value_clip_eps=1e-3)
    metrics = learner.train_step(on_policy_groups(tiny_model_dir))
    assert (metrics["epochs"], metrics["optimizer_step"], metrics["nonfinite"], metrics["version"]) == (2, 2, 0, 1)
    assert metrics["value_clip_frac"] == 0.0 and metrics["clip_frac"] == 0.0
    assert metrics["last_epoch_value_clip_frac"] > 0.5
    assert metrics["last_epoch_clip_frac"] > 0.0
    assert learner.value.steps == 2
