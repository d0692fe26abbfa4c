"""Pairwise preference losses on (chosen, rejected) completions of the same prompt: online DPO and IPO.

Notation (per pair):   pi_c, pi_r   = log pi_theta(y | x)  of the chosen / rejected completion
                       ref_c, ref_r = log pi_ref(y | x)    under the frozen reference policy
                       h = (pi_c - ref_c) - (pi_r - ref_r)   (difference of log-ratios)
Each log-prob is the SUM of per-token log-probs over the completion tokens only (prompt tokens and
padding excluded), i.e. the log-probability of the whole sequence. That is the DPO paper's quantity;
IPO is sometimes run on per-token means instead, which rescales h by the length and changes the
meaning of the 1/(2 beta) target. We use sums for both so that beta means the same thing in both.

"Online" means the pairs come from the current (or a few-versions-old) policy's own samples, ranked by
the reward model, instead of from a fixed preference dataset.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from learners.losses.registry import LossInputs, LossParams, register_loss, select_pairs_batch, split_pairs


def dpo_sigmoid_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair sigmoid DPO loss  -log sigmoid(beta * h),  h = chosen_logratio - rejected_logratio."""
    return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))


def ipo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair IPO loss  (h - 1/(2 beta))^2,  h = chosen_logratio - rejected_logratio."""
    return (chosen_logratios - rejected_logratios - 1.0 / (2.0 * beta)) ** 2


def pair_logratios(inputs: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(pi_c - ref_c, pi_r - ref_r) per pair, from rows laid out by `select_pairs_batch`."""
    if inputs.ref_logps is None:
        raise ValueError("pairwise preference losses need reference log-probs (LossInputs.ref_logps)")
    seq = ((inputs.logps - inputs.ref_logps) * inputs.mask).sum(-1)
    return split_pairs(seq)


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor, beta: float) -> dict[str, float]:
    """Implicit-reward diagnostics: r(y) = beta * (log pi(y) - log ref(y)) as in the DPO paper."""
    chosen, rejected = chosen.detach(), rejected.detach()
    return {
        "reward_margin": float((beta * (chosen - rejected)).mean()),
        "reward_accuracy": float((chosen > rejected).float().mean()),
        "chosen_logratio": float(chosen.mean()),
        "rejected_logratio": float(rejected.mean()),
    }


@register_loss("online_dpo", select=select_pairs_batch, min_samples_per_prompt=2, needs_reference=True)
def online_dpo(inputs: LossInputs, params: LossParams) -> tuple[torch.Tensor, dict[str, float]]:
    """Online DPO with the sigmoid loss, averaged over pairs:

        L = -mean log sigmoid( beta * ((pi_c - ref_c) - (pi_r - ref_r)) )

    DPO: Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
    Reward Model" (arXiv 2305.18290). Online variant (pairs sampled from the policy, ranked by a
    reward model): Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"
    (arXiv 2402.04792); used asynchronously/off-policy in Noukhovitch et al. 2025, "Asynchronous
    RLHF" (arXiv 2410.18252), where it was the most staleness-robust loss.
    Pairs: best- vs worst-reward scored completion of each prompt. Log-probs are sequence sums.
    """
    chosen, rejected = pair_logratios(inputs)
    loss = dpo_sigmoid_loss(chosen, rejected, params.beta).mean()
    return loss, pair_metrics(chosen, rejected, params.beta)


@register_loss("ipo", select=select_pairs_batch, min_samples_per_prompt=2, needs_reference=True)
def ipo(inputs: LossInputs, params: LossParams) -> tuple[torch.Tensor, dict[str, float]]:
    """IPO (identity preference optimisation), averaged over pairs:

        L = mean ( (pi_c - ref_c) - (pi_r - ref_r) - 1/(2 beta) )^2

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences" (arXiv 2310.12036). Regresses the log-ratio gap to 1/(2 beta) instead of pushing
    it to infinity, so it does not over-fit deterministic preferences. Log-probs are sequence sums.
    """
    chosen, rejected = pair_logratios(inputs)
    loss = ipo_loss(chosen, rejected, params.beta).mean()
    return loss, pair_metrics(chosen, rejected, params.beta)
