"""Per-token advantage building blocks: KL-shaped token rewards, GAE, whitening, clipped value loss.

Used by the `ppo` loss (learners/losses/ppo.py), and usable by any loss that has per-token values or
advantages. Tensors follow `LossInputs`: [B, C] per completion token, 0 at padding, `mask` 1 on real
tokens. Every completion is treated as terminal after its last real token (V = 0 there): the reward
is the scorer's verdict on the finished text, also for completions cut at max_new_tokens.
"""
from __future__ import annotations

import torch

WHITEN_EPS = 1e-8  # keeps a batch of identical advantages (variance 0) finite


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the real tokens of the whole batch (a scalar tensor; 0 if none)."""
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def last_token_onehot(mask: torch.Tensor) -> torch.Tensor:
    """[B, C] 1.0 at each row's last real token (rows are right-padded), 0 elsewhere."""
    lengths = mask.sum(-1).long()
    onehot = torch.zeros_like(mask)
    rows = torch.nonzero(lengths > 0).squeeze(-1)
    onehot[rows, lengths[rows] - 1] = 1.0
    return onehot


def kl_shaped_rewards(rewards: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor,
                      mask: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, C] token rewards, [B, C] per-token KL) with r_t = -beta (logp_t - ref_t) + [t = last] r.

    Ouyang et al. 2022 (InstructGPT): the KL penalty to the reference is paid on every token and the
    reward model's score arrives on the last one. `logps` should be the sampling policy's (fixed per
    batch), so the rewards do not move while the batch is trained on.
    """
    kl = (logps - ref_logps).detach() * mask
    return -beta * kl + rewards[:, None] * last_token_onehot(mask), kl


def gae(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both [B, C] and 0 at padding, by generalised advantage estimation:

        delta_t = r_t + gamma V_{t+1} - V_t          V after the last real token = 0 (terminal)
        A_t     = delta_t + gamma lam A_{t+1}        (A after the last token = 0)
        R_t     = A_t + V_t                           the value target

    Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
    Estimation" (arXiv 1506.02438). `values` are detached: advantages are targets, not paths for grad.
    """
    values = values.detach() * mask
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):  # C is short (tokens of a completion); B is vectorised
        real = mask[:, t]
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = (delta + gamma * lam * next_adv) * real
        advantages[:, t] = adv_t
        # Padding passes "terminal" (0, 0) back to the last real token.
        next_value, next_adv = values[:, t] * real, adv_t
    return advantages, (advantages + values) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the real tokens of the batch (population variance), 0 at padding."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(var + WHITEN_EPS) * mask


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, [B, C] clipped?) with loss = 1/2 masked_mean max((V - R)^2, (V_old + clip(V - V_old, +-eps) - R)^2).

    The pessimistic value loss of PPO's reference implementation (OpenAI baselines, ppo2): a value
    that moved more than eps from the value before this batch's update gets no further pull.
    """
    clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    unclipped_err, clipped_err = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_err, clipped_err), mask)
    return loss, (clipped_err > unclipped_err).float() * mask
