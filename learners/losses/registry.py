"""The loss registry and the generic data a loss declares, receives and returns.

A loss is two functions plus a few declarations, bundled in a `LossSpec`:
  * `select(groups) -> Selection`: which sequences (prompt + completion) to train on, picked from
    rollout groups, plus counters of what was skipped and the batch-local group index of each row.
    Pairwise losses pick (chosen, rejected); group losses (RLOO, GRPO) take every scored completion
    (`select_groups`, the default selector).
  * `fn(inputs, params) -> (loss, metrics)`: a pure function on tensors. The learner forwards the
    selected sequences through the policy (and the frozen reference) and hands the per-token
    log-probs of the completion tokens in a `LossInputs`; the loss reduces them as it likes.
  * `min_samples_per_prompt` (config validation, and the group selector's minimum of scored
    completions), `needs_reference` (reference log-probs), `supports_importance_sampling` (the loss
    applies `loss.importance_sampling`; config validation refuses it for the others),
    `needs_value_model` (the learner builds a value model and fills `values` / `old_values`),
    `supports_epochs` (the loss stays right over several optimizer steps on one batch, because its
    anchors - behaviour log-probs, old values - are fixed before the first: `loss.ppo_epochs`).
    `needs_mc_values` (the generators estimate VinePPO's Monte Carlo values and the learner passes
    per-token `advantages`), `needs_behaviour_logprobs` (the loss takes ratios to the behaviour
    policy even with loss.importance_sampling=none: config validation refuses generation.top_p < 1,
    whose truncated distribution the learner cannot reproduce).
The learner knows nothing about any particular loss: it runs select -> forward -> fn -> step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Literal, Protocol

import torch

from async_rlhf.rollout import Completion, RolloutGroup, scored_reward


class LossParams(Protocol):
    """Hyper-parameters a loss reads; `async_rlhf.config.run.LossConfig` satisfies it (docs/losses.md)."""

    beta: float  # KL-to-reference coefficient (DPO's beta, RLOO's KL penalty, GRPO's k3 weight)
    clip_eps: float  # PPO-style clip range of the ratio (proximal_rloo, grpo)
    importance_sampling: Literal["none", "truncated"]
    is_cap: float  # truncation of the per-token importance weight
    gamma: float  # ppo: discount of GAE
    lam: float  # ppo: GAE's lambda
    value_clip_eps: float  # ppo: clip range of the value around the old value


@dataclass
class Selection:
    """Sequences a loss trains on. Row i is prompts[i] followed by completions[i].token_ids.

    Pairwise selectors lay rows out as [chosen_0..chosen_{n-1}, rejected_0..rejected_{n-1}].
    `group_ids[i]` is a dense batch-local index (0..G-1) of the rollout group row i came from, so a
    loss can compute per-prompt baselines; left empty, every row is its own group.
    """

    prompts: list[list[int]]
    completions: list[Completion]
    stats: dict[str, int] = field(default_factory=dict)
    group_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.group_ids:
            self.group_ids = list(range(len(self.completions)))
        if len(self.group_ids) != len(self.completions):
            raise ValueError(f"Selection has {len(self.group_ids)} group ids for {len(self.completions)} rows")

    def __len__(self) -> int:
        return len(self.completions)


@dataclass
class LossInputs:
    """What the learner computed for a `Selection`, as tensors of shape [B] or [B, C].

    C is the longest completion in the batch; positions past a completion's end hold 0 in the
    log-prob tensors and 0 in `mask`, so `(logps * mask).sum(-1)` is a sequence log-prob.
    """

    logps: torch.Tensor  # [B, C] policy log-prob of each completion token (carries grad)
    mask: torch.Tensor  # [B, C] 1.0 on real completion tokens
    rewards: torch.Tensor  # [B]
    ref_logps: torch.Tensor | None = None  # [B, C] frozen reference; set when needs_reference
    # [B, C] log-prob of each token under the policy version that sampled it (Completion.logprobs,
    # returned by vLLM), 0 at padding: the denominator of importance ratios.
    behaviour_logps: torch.Tensor | None = None
    group_ids: torch.Tensor | None = None  # [B] long, Selection.group_ids
    # Set when the spec declares needs_value_model: [B, C] V(prompt, y_<t) of the state before each
    # completion token, with grad (`values`), and the same before this batch's first update, detached.
    values: torch.Tensor | None = None
    old_values: torch.Tensor | None = None
    # [B, C] per-token advantage from Monte Carlo values (Completion.advantages), 0 at padding;
    # set when the spec declares needs_mc_values.
    advantages: torch.Tensor | None = None


LossFn = Callable[[LossInputs, LossParams], tuple[torch.Tensor, dict[str, float]]]
Selector = Callable[[list[RolloutGroup]], Selection]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: see the module docstring for the role of each field."""

    name: str
    fn: LossFn
    min_samples_per_prompt: int
    needs_reference: bool
    doc: str
    select: Selector
    supports_importance_sampling: bool = False
    needs_value_model: bool = False
    supports_epochs: bool = False
    needs_mc_values: bool = False
    needs_behaviour_logprobs: bool = False


LOSSES: dict[str, LossSpec] = {}


def register_loss(
    name: str, *, min_samples_per_prompt: int, needs_reference: bool, select: Selector | None = None,
    supports_importance_sampling: bool = False, needs_value_model: bool = False, supports_epochs: bool = False,
    needs_mc_values: bool = False, needs_behaviour_logprobs: bool = False,
) -> Callable[[LossFn], LossFn]:
    """Decorator registering `fn` under `name`; its docstring becomes the spec's `doc`.

    `select` defaults to `select_groups` keeping groups with >= min_samples_per_prompt scored
    completions: what a per-prompt baseline needs is what K must be, so one number says both.
    """
    chosen = select or partial(select_groups, min_scored=min_samples_per_prompt)

    def wrap(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss '{name}' is already registered (by {LOSSES[name].fn.__module__})")
        LOSSES[name] = LossSpec(
            name=name,
            fn=fn,
            min_samples_per_prompt=min_samples_per_prompt,
            needs_reference=needs_reference,
            doc=(fn.__doc__ or "").strip(),
            select=chosen,
            supports_importance_sampling=supports_importance_sampling,
            needs_value_model=needs_value_model,
            supports_epochs=supports_epochs,
            needs_mc_values=needs_mc_values,
            needs_behaviour_logprobs=needs_behaviour_logprobs,
        )
        return fn

    return wrap


def get_loss(name: str) -> LossSpec:
    """The spec registered under `name`; unknown names fail with the list of valid ones."""
    if name not in LOSSES:
        raise KeyError(f"unknown loss '{name}'; valid names: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


# ---------------------------------------------------------------- pair selection (DPO family)


@dataclass
class Pair:
    """A preference pair from one prompt: chosen has a strictly higher reward than rejected."""

    prompt: list[int]
    chosen: Completion
    rejected: Completion


def _best_and_worst(group: RolloutGroup) -> tuple[Completion, Completion] | str:
    """(highest, lowest) scored completion, or the reason the group gives no pair."""
    scored = group.scored  # failed / timed-out / pending rewards are never used
    if len(scored) < 2:
        return "skipped_failed"
    # max/min keep the first of equal rewards: deterministic, and completions are i.i.d. anyway.
    chosen = max(scored, key=scored_reward)
    rejected = min(scored, key=scored_reward)
    if chosen.reward == rejected.reward:
        return "skipped_ties"
    return chosen, rejected


def select_pairs(groups: list[RolloutGroup]) -> tuple[list[Pair], dict[str, int]]:
    """Per prompt: chosen = highest-reward, rejected = lowest-reward scored completion.

    Groups with fewer than 2 scored completions count as `skipped_failed`; groups whose scored
    rewards are all equal count as `skipped_ties` (no preference signal).
    """
    pairs: list[Pair] = []
    stats = {"pairs": 0, "skipped_ties": 0, "skipped_failed": 0}
    for group in groups:
        picked = _best_and_worst(group)
        if isinstance(picked, str):
            stats[picked] += 1
            continue
        pairs.append(Pair(prompt=list(group.prompt.token_ids), chosen=picked[0], rejected=picked[1]))
    stats["pairs"] = len(pairs)
    return pairs, stats


def select_pairs_batch(groups: list[RolloutGroup]) -> Selection:
    """`select_pairs` laid out for the learner: all chosen rows first, then all rejected rows."""
    pairs, stats = select_pairs(groups)
    prompts = [p.prompt for p in pairs] * 2
    completions = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    return Selection(prompts=prompts, completions=completions, stats=stats,
                     group_ids=list(range(len(pairs))) * 2)


def split_pairs(seq_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a [2n] per-row tensor laid out by `select_pairs_batch` into (chosen [n], rejected [n])."""
    n = seq_values.shape[0] // 2
    return seq_values[:n], seq_values[n:]


# ---------------------------------------------------------------- group selection (RLOO, GRPO, ...)


def select_groups(groups: list[RolloutGroup], min_scored: int = 2) -> Selection:
    """Every scored completion of each group, rows of one group adjacent, tagged with its group index.

    Groups with fewer than `min_scored` scored completions are skipped and counted as
    `skipped_failed` (a leave-one-out or group-normalised baseline needs at least two samples).
    Failed / timed-out / pending rewards are never used.
    """
    prompts: list[list[int]] = []
    completions: list[Completion] = []
    group_ids: list[int] = []
    kept = 0  # dense group index: the number of groups kept so far
    for group in groups:
        scored = group.scored
        if len(scored) < min_scored:
            continue
        prompts += [list(group.prompt.token_ids)] * len(scored)
        completions += scored
        group_ids += [kept] * len(scored)
        kept += 1
    stats = {"groups": kept, "samples": len(completions), "skipped_failed": len(groups) - kept}
    return Selection(prompts=prompts, completions=completions, stats=stats, group_ids=group_ids)
