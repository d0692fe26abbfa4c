"""PPO for language models: a learned value model, GAE over tokens, KL to the reference in the reward."""
from __future__ import annotations

import torch

from learners.advantages.gae import clipped_value_loss, gae, kl_shaped_rewards, masked_mean, whiten
from learners.losses.pg import clip_fraction, clipped_surrogate, policy_log_ratio, required, token_mean
from learners.losses.registry import LossInputs, LossParams, register_loss


@register_loss("ppo", min_samples_per_prompt=1, needs_reference=True, needs_value_model=True,
               supports_epochs=True, needs_behaviour_logprobs=True)
def ppo(inputs: LossInputs, params: LossParams) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO with a value model, per token (the RLHF recipe of Ouyang et al. 2022):

        r_t     = -beta (log mu(y_t) - log ref(y_t)) + [t = last] r       KL paid per token, score at the end
        delta_t = r_t + gamma V_old(s_{t+1}) - V_old(s_t),   V_old after the last token = 0
        A_t     = sum_l (gamma lam)^l delta_{t+l}     (GAE),   R_t = A_t + V_old(s_t)
        Â_t     = (A_t - mean A) / sqrt(var A + 1e-8)          whitened over the batch's tokens
        rho_t   = pi(y_t) / mu(y_t)                            mu = behaviour policy (generator)
        L_pi    = -mean_t min(rho_t Â_t, clip(rho_t, 1 - eps, 1 + eps) Â_t)
        L_V     = 1/2 mean_t max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)
        L       = L_pi + L_V                                    means over every real token of the batch

    s_t = (prompt, y_<t) is the state before token t; V is a separate value model (the policy's
    initial weights with a fresh scalar head, its own AdamW), so L_V only trains V and L_pi only pi.
    mu's log-probs are the generators' (the "old" policy of PPO is whatever version sampled the
    batch); V_old is the value model before this batch's first update (a no-grad pass).
    beta = loss.beta, eps = loss.clip_eps, gamma = loss.gamma, lam = loss.lam,
    eps_v = loss.value_clip_eps. Schulman et al. 2017, "Proximal Policy Optimization Algorithms"
    (arXiv 1707.06347); GAE: Schulman et al. 2016 (arXiv 1506.02438); per-token KL in the reward:
    Ouyang et al. 2022, "Training language models to follow instructions with human feedback"
    (arXiv 2203.02155); asynchronous off-policy PPO: Noukhovitch et al. 2025 (arXiv 2410.18252).
    Needs K >= 1, the reference, the behaviour log-probs and the value model.
    """
    mask = inputs.mask
    behaviour = required(inputs.behaviour_logps, "behaviour_logps")
    old_values = required(inputs.old_values, "old_values").detach()
    token_rewards, kl = kl_shaped_rewards(inputs.rewards, behaviour, required(inputs.ref_logps, "ref_logps"),
                                          mask, params.beta)
    advantages, returns = gae(token_rewards, old_values, mask, params.gamma, params.lam)
    log_ratio = policy_log_ratio(inputs, params)  # against mu: ppo does not take importance_sampling
    surrogate = clipped_surrogate(log_ratio, whiten(advantages, mask), params.clip_eps)
    policy_loss = -masked_mean(surrogate, mask)
    values = required(inputs.values, "values")
    value_loss, value_clipped = clipped_value_loss(values, old_values, returns, mask, params.value_clip_eps)
    metrics = {
        "policy_loss": float(policy_loss.detach()), "value_loss": float(value_loss.detach()),
        "clip_frac": clip_fraction(log_ratio, mask, params.clip_eps),
        "value_clip_frac": token_mean(value_clipped, mask), "kl_token": token_mean(kl, mask),
        "adv_mean": token_mean(advantages, mask), "value_mean": token_mean(values, mask),
        "return_mean": token_mean(returns, mask),
        "behaviour_log_ratio": token_mean(inputs.logps.detach() - behaviour, mask),
    }
    return policy_loss + value_loss, metrics
