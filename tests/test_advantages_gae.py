"""GAE and its pieces (learners/advantages/gae.py) against hand-worked numbers: last-token one-hot,
KL-shaped token rewards, GAE, whitening. PPO's use of them: tests/test_losses_ppo.py.

Conventions as in tests/test_losses_pg.py: rows are completions, column j is completion token j,
`mask` is 1 on real tokens, padded columns hold junk (99 / -77 / 55) so a missed mask shows.
"""
from __future__ import annotations

import torch

from learners.advantages.gae import gae, kl_shaped_rewards, last_token_onehot, whiten

PAD, REF_PAD, VALUE_PAD = 99.0, -77.0, 55.0
# Two rows of 2 real tokens and one padded column.
MASK = [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]


def t(rows: list[list[float]], pad: float = PAD) -> torch.Tensor:
    """[B, 3] tensor from 2-token rows, junk `pad` in the padded column."""
    return torch.tensor([[*row, pad] for row in rows])


def close(actual: torch.Tensor, expected: list[list[float]]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)


def test_last_token_onehot_finds_each_rows_end():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    close(last_token_onehot(mask), [[0, 0, 1], [1, 0, 0], [0, 0, 0]])


def test_kl_shaped_rewards_hand_worked():
    """beta = 0.5; per-token KL = log mu - log ref on the sampled tokens:
        row 0: [-1 - (-1.5), -1 - (-1)] = [0.5, 0]     reward 1 at its last token (column 1)
        row 1: [-1 - (-1),   -1 - (-3)] = [0,   2]     reward -1 at its last token (column 1)
    r_t = -0.5 KL_t + [t = last] r:  row 0 [-0.25, 1],  row 1 [0, -1 - 1] = [0, -2]."""
    mu = t([[-1.0, -1.0], [-1.0, -1.0]])
    ref = t([[-1.5, -1.0], [-1.0, -3.0]], REF_PAD)
    rewards, kl = kl_shaped_rewards(torch.tensor([1.0, -1.0]), mu, ref, torch.tensor(MASK), beta=0.5)
    close(kl, [[0.5, 0.0, 0.0], [0.0, 2.0, 0.0]])
    close(rewards, [[-0.25, 1.0, 0.0], [0.0, -2.0, 0.0]])


def test_gae_hand_worked():
    """gamma = lam = 0.5, so gamma * lam = 0.25. Row 0 has 3 tokens, row 1 has 2 and a padded column.

    Row 0: r = [0, 0, 1], V = [0.5, 0.25, 0.5]
      t=2: delta = 1 + 0.5*0 - 0.5 = 0.5                      (terminal: V after the end = 0)
           A = 0.5
      t=1: delta = 0 + 0.5*0.5 - 0.25 = 0;     A = 0 + 0.25*0.5 = 0.125
      t=0: delta = 0 + 0.5*0.25 - 0.5 = -0.375; A = -0.375 + 0.25*0.125 = -0.34375
      R = A + V = [0.15625, 0.375, 1.0]
    Row 1: r = [0, -1, junk], V = [1.0, 0.5, junk]
      t=1: delta = -1 + 0 - 0.5 = -1.5;         A = -1.5   (the padding's junk value is not bootstrapped)
      t=0: delta = 0 + 0.5*0.5 - 1.0 = -0.75;  A = -0.75 + 0.25*(-1.5) = -1.125
      R = [-0.125, -1.0, 0]
    """
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, -1.0, PAD]])
    values = torch.tensor([[0.5, 0.25, 0.5], [1.0, 0.5, VALUE_PAD]])
    adv, returns = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    close(adv, [[-0.34375, 0.125, 0.5], [-1.125, -1.5, 0.0]])
    close(returns, [[0.15625, 0.375, 1.0], [-0.125, -1.0, 0.0]])


def test_gae_with_lambda_one_and_no_discount_is_return_minus_value():
    """gamma = lam = 1: A_t = sum_{l >= t} r_l - V_t (the Monte Carlo return minus the baseline)."""
    mask = torch.tensor(MASK)
    adv, returns = gae(t([[-0.25, 1.0], [0.0, -1.0]]), t([[-0.25, 0.0], [-1.0, -1.0]], VALUE_PAD), mask, 1.0, 1.0)
    close(adv, [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    close(returns, [[0.75, 1.0, 0.0], [-1.0, -1.0, 0.0]])


def test_whiten_hand_worked():
    """A = [1, 1 | 0, 0] on the real tokens: mean 0.5, population variance 0.25, std 0.5
    -> (A - 0.5) / 0.5 = [1, 1 | -1, -1]; the padded column (junk 99) stays 0 and is not counted."""
    close(whiten(t([[1.0, 1.0], [0.0, 0.0]]), torch.tensor(MASK)), [[1.0, 1.0, 0.0], [-1.0, -1.0, 0.0]])
    # identical advantages: variance 0, the 1e-8 keeps it finite and the result is 0
    close(whiten(t([[3.0, 3.0], [3.0, 3.0]]), torch.tensor(MASK)), [[0.0] * 3, [0.0] * 3])
