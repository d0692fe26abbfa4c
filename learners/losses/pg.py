"""Building blocks shared by the policy-gradient losses (rloo, proximal_rloo, grpo, best_of_n_sft).

Tensors follow `LossInputs`: [B, C] per completion token (0 at padding, `mask` 1 on real tokens),
[B] per sequence, `group_ids` [B] a dense batch-local prompt index.

Off-policy handling (`loss.importance_sampling`), shared by every loss that declares
`supports_importance_sampling`:
  * "none": ratios are taken against the behaviour policy mu (the generator's log-probs), as in
    PPO/GRPO, and REINFORCE (rloo) uses no correction at all.
  * "truncated": the decoupled form (Hilton et al. 2022, arXiv 2110.00641; Fu et al. 2025, AReaL,
    arXiv 2505.24298). Ratios are taken against the proximal policy pi_prox = the learner's current
    weights, detached, and the staleness correction moves into a per-token weight
        w_t = min(pi_prox(y_t) / mu(y_t), is_cap)
    that multiplies the policy-gradient term only (not the KL term). Against mu *and* with w the
    correction would be applied twice.
"""
from __future__ import annotations

import torch

from learners.losses.registry import LossInputs, LossParams

GROUP_STD_EPS = 1e-6  # GRPO: keeps all-equal groups (std 0) at advantage 0 instead of 0/0
MAX_LOG_RATIO = 20.0  # exp() stays finite; beyond e^20 the clipped branch is active anyway


def required(tensor: torch.Tensor | None, field: str) -> torch.Tensor:
    """`tensor`, or a loud error naming the `LossInputs` field the learner did not fill."""
    if tensor is None:
        raise ValueError(f"this loss needs LossInputs.{field}; the learner did not provide it")
    return tensor


def seq_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, C] -> [B]: sum over each completion's real tokens."""
    return (values * mask).sum(-1)


def seq_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, C] -> [B]: mean over each completion's real tokens (an empty completion gives 0)."""
    return seq_sum(values, mask) / mask.sum(-1).clamp(min=1.0)


def group_totals(values: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (sum of `values` over the row's group, size of the row's group)."""
    n_groups = int(group_ids.max()) + 1
    sums = values.new_zeros(n_groups).index_add(0, group_ids, values)
    counts = values.new_zeros(n_groups).index_add(0, group_ids, torch.ones_like(values))
    if bool((counts < 2).any()):
        raise ValueError("group baselines need >= 2 samples in every group (select with min_scored >= 2)")
    return sums[group_ids], counts[group_ids]


def leave_one_out_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """A_i = r_i - mean_{j != i in i's group} r_j   (RLOO's baseline: unbiased, no learned critic)."""
    sums, counts = group_totals(rewards, group_ids)
    return rewards - (sums - rewards) / (counts - 1)


def group_normalised_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """A_i = (r_i - mean_g) / (std_g + eps), std with Bessel's correction (as torch.std, TRL, verl)."""
    sums, counts = group_totals(rewards, group_ids)
    centred = rewards - sums / counts
    sq_sums, _ = group_totals(centred**2, group_ids)
    return centred / ((sq_sums / (counts - 1)).sqrt() + GROUP_STD_EPS)


def kl_penalised_rewards(inputs: LossInputs, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(r - beta * KL, KL) per sequence, KL = sum_t (log pi - log ref) on the sampled tokens, detached:
    the penalty is part of the reward, so it steers the policy through the advantage only."""
    kl = seq_sum(inputs.logps.detach() - required(inputs.ref_logps, "ref_logps"), inputs.mask)
    return inputs.rewards - beta * kl, kl


def k3_kl(inputs: LossInputs) -> torch.Tensor:
    """[B, C] per-token k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 >= 0
    (Schulman 2020, "Approximating KL divergence"); unbiased for samples from pi, always >= 0."""
    diff = required(inputs.ref_logps, "ref_logps") - inputs.logps
    return (torch.exp(diff) - diff - 1.0) * inputs.mask


def importance_weights(inputs: LossInputs, params: LossParams) -> torch.Tensor:
    """[B, C] per-token weight of the policy-gradient term: 1, or min(pi_prox / mu, is_cap)."""
    if params.importance_sampling == "none":
        return torch.ones_like(inputs.logps).detach()
    behaviour = required(inputs.behaviour_logps, "behaviour_logps")
    return torch.exp(inputs.logps.detach() - behaviour).clamp(max=params.is_cap)


def policy_log_ratio(inputs: LossInputs, params: LossParams) -> torch.Tensor:
    """[B, C] log pi_theta - log anchor, anchor = mu ("none") or pi_prox, detached ("truncated")."""
    if params.importance_sampling == "none":
        anchor = required(inputs.behaviour_logps, "behaviour_logps")
    else:
        anchor = inputs.logps.detach()
    return (inputs.logps - anchor) * inputs.mask


def clipped_surrogate(log_ratio: torch.Tensor, adv: torch.Tensor, clip_eps: float) -> torch.Tensor:
    """PPO's pessimistic objective (to maximise): min(rho * A, clip(rho, 1 - eps, 1 + eps) * A)."""
    ratio = torch.exp(log_ratio.clamp(max=MAX_LOG_RATIO))
    return torch.min(ratio * adv, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv)


def clip_fraction(log_ratio: torch.Tensor, mask: torch.Tensor, clip_eps: float) -> float:
    """Share of (masked) ratios outside [1 - eps, 1 + eps]: how often the clip could bind."""
    return token_mean(((log_ratio.detach().exp() - 1.0).abs() > clip_eps).float(), mask)


def token_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of `values` over every real token of the batch, as a float (for metrics)."""
    return float((values.detach() * mask).sum() / mask.sum().clamp(min=1.0))


def pg_metrics(inputs: LossInputs, adv: torch.Tensor, params: LossParams) -> dict[str, float]:
    """Diagnostics common to the policy-gradient losses: advantages and how off-policy the batch is."""
    metrics = {"adv_mean": float(adv.detach().mean()), "adv_abs_mean": float(adv.detach().abs().mean())}
    if inputs.behaviour_logps is not None:
        # log pi_theta - log mu per token: 0 on fresh samples (fp32 vLLM matches the learner to 1e-6)
        log_rho = inputs.logps.detach() - inputs.behaviour_logps
        metrics["behaviour_log_ratio"] = token_mean(log_rho, inputs.mask)
        if params.importance_sampling == "truncated":
            metrics["is_weight_mean"] = token_mean(log_rho.exp().clamp(max=params.is_cap), inputs.mask)
            metrics["is_truncated_frac"] = token_mean((log_rho.exp() > params.is_cap).float(), inputs.mask)
    return metrics
