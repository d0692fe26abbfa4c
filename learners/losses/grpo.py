"""GRPO: group-normalised advantages, token-level clipped ratio, k3 KL to the reference."""
from __future__ import annotations

import torch

from learners.losses.pg import (
    clip_fraction,
    clipped_surrogate,
    group_normalised_advantages,
    importance_weights,
    k3_kl,
    pg_metrics,
    policy_log_ratio,
    required,
    seq_mean,
)
from learners.losses.registry import LossInputs, LossParams, register_loss


@register_loss("grpo", min_samples_per_prompt=2, needs_reference=True, supports_importance_sampling=True,
               needs_behaviour_logprobs=True)
def grpo(inputs: LossInputs, params: LossParams) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO (outcome supervision), token-level clipped surrogate with a k3 KL penalty:

        A_i     = (r_i - mean_g r) / (std_g r + 1e-6)      over the scored samples of i's prompt,
                                                           std with Bessel's correction
        rho_i,t = pi(y_i,t) / mu(y_i,t)                    mu = behaviour policy (generator)
        k3_i,t  = exp(ref - log pi) - (ref - log pi) - 1   per token, >= 0
        L = mean_i (1/|y_i|) sum_t [ -w_i,t min(rho A_i, clip(rho, 1 - eps, 1 + eps) A_i) + beta k3_i,t ]

    Normalisation as in the paper: mean over each sequence's tokens, then mean over sequences (so
    every completion weighs the same whatever its length). beta = loss.beta, eps = loss.clip_eps.
    w = 1 without importance sampling; with loss.importance_sampling=truncated the ratio is taken
    against the current weights (detached) and w_i,t = min(pi / mu, loss.is_cap) (pg.py).
    Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language
    Models" (arXiv 2402.03300). Needs K >= 2, the reference and the behaviour log-probs.
    """
    adv = group_normalised_advantages(inputs.rewards, required(inputs.group_ids, "group_ids")).detach()
    log_ratio = policy_log_ratio(inputs, params)
    surrogate = importance_weights(inputs, params) * clipped_surrogate(log_ratio, adv[:, None], params.clip_eps)
    kl = k3_kl(inputs)
    loss = seq_mean(-surrogate + params.beta * kl, inputs.mask).mean()
    metrics = {"k3_kl": float(seq_mean(kl.detach(), inputs.mask).mean()),
               "clip_frac": clip_fraction(log_ratio, inputs.mask, params.clip_eps)}
    return loss, {**metrics, **pg_metrics(inputs, adv, params)}
