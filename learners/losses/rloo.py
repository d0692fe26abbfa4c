"""REINFORCE with a leave-one-out baseline (RLOO) and its proximal (clipped) variant.

Both train on every scored completion of each prompt (K >= 2) and share the advantage:

    KL_i = sum_t (log pi(y_i,t) - log ref(y_i,t))      detached, on the sampled tokens
    r'_i = r_i - beta * KL_i                           the KL penalty lives in the sequence reward
    A_i  = r'_i - 1/(K_g - 1) * sum_{j != i, j in g} r'_j   (K_g scored samples of i's prompt)

`loss.beta` is the KL coefficient: the same beta as DPO's, which is the KL-regularised objective
max E[r] - beta KL(pi || ref) that DPO solves in closed form. Log-probs are sequence sums.
"""
from __future__ import annotations

import torch

from learners.losses.pg import (
    clip_fraction,
    clipped_surrogate,
    importance_weights,
    kl_penalised_rewards,
    leave_one_out_advantages,
    pg_metrics,
    policy_log_ratio,
    required,
    seq_sum,
)
from learners.losses.registry import LossInputs, LossParams, register_loss


def rloo_advantages(inputs: LossInputs, params: LossParams) -> tuple[torch.Tensor, dict[str, float]]:
    """(A [B], metrics): leave-one-out advantages of the KL-penalised sequence rewards."""
    rewards, kl = kl_penalised_rewards(inputs, params.beta)
    adv = leave_one_out_advantages(rewards, required(inputs.group_ids, "group_ids"))
    metrics = {"kl_seq": float(kl.mean()), "penalised_reward": float(rewards.mean())}
    return adv.detach(), {**metrics, **pg_metrics(inputs, adv, params)}


@register_loss("rloo", min_samples_per_prompt=2, needs_reference=True, supports_importance_sampling=True)
def rloo(inputs: LossInputs, params: LossParams) -> tuple[torch.Tensor, dict[str, float]]:
    """RLOO: REINFORCE with the leave-one-out baseline, averaged over sequences:

        L = -mean_i A_i * sum_t w_i,t * log pi(y_i,t)

    w = 1 without importance sampling; with loss.importance_sampling=truncated,
    w_i,t = min(pi(y_i,t) / mu(y_i,t), loss.is_cap) (detached) corrects for stale samples.
    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
    Human Feedback in LLMs" (arXiv 2402.14740); baseline from Kool et al. 2019, "Buy 4 REINFORCE
    Samples, Get a Baseline for Free!". Needs K >= 2 scored samples per prompt and the reference.
    """
    adv, metrics = rloo_advantages(inputs, params)
    weighted_logp = seq_sum(importance_weights(inputs, params) * inputs.logps, inputs.mask)
    return -(adv * weighted_logp).mean(), metrics


@register_loss("proximal_rloo", min_samples_per_prompt=2, needs_reference=True,
               supports_importance_sampling=True, needs_behaviour_logprobs=True)
def proximal_rloo(inputs: LossInputs, params: LossParams) -> tuple[torch.Tensor, dict[str, float]]:
    """Proximal RLOO: RLOO's advantage with a PPO-clipped *sequence-level* ratio, averaged over sequences:

        rho_i = exp( sum_t log pi(y_i,t) - log mu(y_i,t) )        mu = behaviour policy (generator)
        L = -mean_i min( rho_i A_i, clip(rho_i, 1 - eps, 1 + eps) A_i )      eps = loss.clip_eps

    With loss.importance_sampling=truncated the ratio is taken against the current weights
    (detached) and log rho_i = sum_t w_i,t (log pi - log pi_detached): value 0, gradient
    sum_t w_i,t grad log pi, i.e. one step equals truncated-IS RLOO (see learners/losses/pg.py).
    Noukhovitch et al. 2025, "Asynchronous RLHF: Faster and More Efficient Off-Policy RL for
    Language Models" (arXiv 2410.18252), section on off-policy RLOO. Needs K >= 2, the reference
    and the behaviour log-probs.
    """
    adv, metrics = rloo_advantages(inputs, params)
    token_log_ratio = importance_weights(inputs, params) * policy_log_ratio(inputs, params)
    log_ratio = seq_sum(token_log_ratio, inputs.mask)
    loss = -clipped_surrogate(log_ratio, adv, params.clip_eps).mean()
    return loss, {**metrics, "clip_frac": clip_fraction(log_ratio, torch.ones_like(adv), params.clip_eps)}
