"""Best-of-N supervised fine-tuning on the policy's own samples (rejection sampling / expert iteration)."""
from __future__ import annotations

import torch

from async_rlhf.rollout import RolloutGroup, scored_reward
from learners.losses.registry import LossInputs, LossParams, Selection, register_loss, select_groups


def select_best(groups: list[RolloutGroup]) -> Selection:
    """One row per prompt: its highest-reward scored completion (the first one on ties).

    Groups with no scored completion are skipped and counted as `skipped_failed`. Only the winners
    are forwarded, so the learner does not spend a forward pass on the K - 1 losers.
    """
    sel = select_groups(groups, min_scored=1)
    best: dict[int, int] = {}  # group index -> row of its best completion so far
    for row, (gid, comp) in enumerate(zip(sel.group_ids, sel.completions)):
        if gid not in best or scored_reward(comp) > scored_reward(sel.completions[best[gid]]):  # first wins ties
            best[gid] = row
    rows = sorted(best.values())
    return Selection(prompts=[sel.prompts[r] for r in rows], completions=[sel.completions[r] for r in rows],
                     stats={**sel.stats, "samples": len(rows)}, group_ids=[sel.group_ids[r] for r in rows])


@register_loss("best_of_n_sft", select=select_best, min_samples_per_prompt=1, needs_reference=False)
def best_of_n_sft(inputs: LossInputs, params: LossParams) -> tuple[torch.Tensor, dict[str, float]]:
    """Best-of-N SFT: negative log-likelihood of each prompt's best completion, mean per token:

        y*_g = argmax_{i in g} r_i        (first on ties; failed rewards never count)
        L = -sum_{g,t} log pi(y*_g,t) / sum_g |y*_g|

    The token mean over the whole batch is the usual SFT normalisation (longer winners weigh more).
    Dong et al. 2023, "RAFT: Reward rAnked FineTuning for Generative Foundation Model Alignment"
    (arXiv 2304.06767); the "best-of-2 SFT" baseline of Noukhovitch et al. 2025, "Asynchronous
    RLHF" (arXiv 2410.18252). Needs K >= 1 scored sample per prompt (K = 1 is plain SFT on the
    policy's own samples); no reference, no behaviour log-probs; loss.beta is unused.
    """
    nll = -(inputs.logps * inputs.mask).sum() / inputs.mask.sum().clamp(min=1.0)
    return nll, {"best_reward_mean": float(inputs.rewards.mean())}
