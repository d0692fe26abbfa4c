"""VinePPO: PPO's token-level clipped surrogate with Monte Carlo step advantages and no critic."""
from __future__ import annotations

import torch

from async_rlhf.rollout import Completion, RolloutGroup
from learners.losses.pg import (
    clip_fraction,
    clipped_surrogate,
    importance_weights,
    k3_kl,
    pg_metrics,
    policy_log_ratio,
    required,
    token_mean,
)
from learners.losses.registry import LossInputs, LossParams, Selection, register_loss


def select_valued(groups: list[RolloutGroup]) -> Selection:
    """Every completion with an ok reward and MC advantages, rows of one group adjacent.

    Counted apart: `skipped_failed` (reward failed, timed out or pending) and `skipped_unvalued`
    (scored, but a state's K_mc continuation rewards all failed, so its value is unknown).
    """
    prompts: list[list[int]] = []
    completions: list[Completion] = []
    group_ids: list[int] = []
    stats = {"groups": 0, "samples": 0, "skipped_failed": 0, "skipped_unvalued": 0}
    for group in groups:
        scored = group.scored
        valued = [c for c in scored if c.advantages is not None]
        stats["skipped_failed"] += len(group.completions) - len(scored)
        stats["skipped_unvalued"] += len(scored) - len(valued)
        if not valued:
            continue
        prompts += [list(group.prompt.token_ids)] * len(valued)
        completions += valued
        group_ids += [stats["groups"]] * len(valued)
        stats["groups"] += 1
    stats["samples"] = len(completions)
    return Selection(prompts=prompts, completions=completions, stats=stats, group_ids=group_ids)


@register_loss("vineppo", min_samples_per_prompt=1, needs_reference=True, select=select_valued,
               supports_importance_sampling=True, needs_mc_values=True, needs_behaviour_logprobs=True)
def vineppo(inputs: LossInputs, params: LossParams) -> tuple[torch.Tensor, dict[str, float]]:
    """VinePPO: PPO without a critic; each token takes its reasoning step's Monte Carlo advantage.

        V(s)    = 1/K_mc sum_k R(continuation_k of s)         sampled by the generators (mc_values.k_mc)
        A_i     = r_i + V(s_{i+1}) - V(s_i)                    reward only at the end, V(terminal) = 0
        A_t     = A_i for every token t of step i              (LossInputs.advantages, detached)
        rho_t   = pi(y_t) / mu(y_t)                            mu = behaviour policy (generator)
        k3_t    = exp(ref - log pi) - (ref - log pi) - 1       per token, >= 0
        L = sum_t [ -w_t min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t) + beta k3_t ] / (number of tokens)

    Token-level mean over the whole batch (PPO's masked mean): every token weighs the same. The KL
    is the k3 term in the loss, not a penalty in the reward: the MC values are mean rewards of
    continuations sampled on the generators, which have no reference model, so a per-token KL in
    the reward would be missing from V. beta = loss.beta, eps = loss.clip_eps; advantages are not
    whitened. w = 1 without importance sampling; with loss.importance_sampling=truncated the ratio is
    taken against the current weights (detached) and w_t = min(pi / mu, loss.is_cap) (pg.py).
    Kazemnejad et al. 2024, "VinePPO: Unlocking RL Potential For LLM Reasoning Through Refined
    Credit Assignment" (arXiv 2410.01679). Needs MC values, the reference and the behaviour log-probs.
    """
    adv = required(inputs.advantages, "advantages").detach()
    log_ratio = policy_log_ratio(inputs, params)
    surrogate = importance_weights(inputs, params) * clipped_surrogate(log_ratio, adv, params.clip_eps)
    kl = k3_kl(inputs)
    tokens = inputs.mask.sum().clamp(min=1.0)
    loss = ((-surrogate + params.beta * kl) * inputs.mask).sum() / tokens
    metrics = {"k3_kl": token_mean(kl, inputs.mask),
               "clip_frac": clip_fraction(log_ratio, inputs.mask, params.clip_eps)}
    return loss, {**metrics, **pg_metrics(inputs, adv[inputs.mask > 0], params)}
