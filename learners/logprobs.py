"""Per-token log-probs of completion tokens, shared by the policy pass (with grad) and the reference pass.

Layout: each row is prompt + completion, right-padded to the longest row. Right padding keeps every
real token at the position it had during generation (0..len-1), so no position_ids are needed, and
the causal mask already stops real tokens from seeing the padding after them.
Output is aligned with the completion: column j is token j of the completion, which is also how
`Completion.logprobs` (behaviour log-probs from the generator) is laid out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from async_rlhf.rollout import Completion


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [B, T] long, right-padded prompt + completion
    attention_mask: torch.Tensor  # [B, T] long, 1 on real tokens
    prompt_lens: torch.Tensor  # [B] long
    completion_mask: torch.Tensor  # [B, C] float, 1 on real completion tokens

    def to(self, device: torch.device | str) -> "PackedBatch":
        return PackedBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask,
                                                    self.prompt_lens, self.completion_mask)))

    @property
    def num_completion_tokens(self) -> int:
        return int(self.completion_mask.sum())

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int = 0) -> PackedBatch:
    """Right-pad prompt+completion rows. `pad_id` only has to be a valid id: it is masked everywhere."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (it predicts the first completion token)")
    rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
    width = max(len(r) for r in rows)
    c_width = max(len(c) for c in completions)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), c_width), dtype=torch.float32)
    for i, (row, comp) in enumerate(zip(rows, completions)):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
        completion_mask[i, : len(comp)] = 1.0
    prompt_lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    return PackedBatch(input_ids, attention_mask, prompt_lens, completion_mask)


def completion_positions(batch: PackedBatch, device: torch.device | str) -> torch.Tensor:
    """[B, C] sequence position whose output belongs to completion token j: p + j - 1 (p = prompt length).

    Logits there predict token j; a value head there scores the state before token j. Padding
    columns point somewhere valid (clamped) and must be masked by the caller.
    """
    steps = torch.arange(batch.completion_mask.shape[1], device=device)
    pos = (batch.prompt_lens.to(device) - 1)[:, None] + steps[None, :]
    return pos.clamp(max=batch.input_ids.shape[1] - 1)


def logprob_temperature(temperature: float) -> float:
    """The divisor of the logits: the sampling temperature, 1 for greedy (0), as vLLM's sampler does
    (its logprobs of a greedy request are the untempered softmax)."""
    return temperature if temperature > 0 else 1.0


def completion_logprobs(model: Callable[..., Any], batch: PackedBatch, temperature: float = 1.0) -> torch.Tensor:
    """[B, C] log p_T(completion token j | prompt, completion[:j]) in float32, 0 at padding.

    p_T = softmax(logits / T), the distribution the generator sampled from at `temperature` T
    (generation.temperature), so ratios to the behaviour log-probs compare like with like.
    `model` is anything called as model(input_ids=, attention_mask=, logits_to_keep=K) returning the
    `.logits` [B, K, V] of the last K positions (an HF causal LM or a DeepSpeed engine wrapping one).
    Grad flows when the caller allows it.
    """
    width = batch.input_ids.shape[1]
    # Logits only from the first position that predicts a completion token on: the LM head over the
    # prompts' positions is thrown away (about a tenth of a SmolLM2 step, measured).
    first = int(batch.prompt_lens.min()) - 1
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   logits_to_keep=width - first).logits
    vocab = logits.shape[-1]
    pos = completion_positions(batch, logits.device)
    # Gather only the needed positions before the softmax normaliser: O(B*C*V) instead of O(B*T*V).
    picked = logits.gather(1, (pos - first)[..., None].expand(-1, -1, vocab)).float()
    picked = picked / logprob_temperature(temperature)
    targets = batch.input_ids.to(logits.device).gather(1, (pos + 1).clamp(max=width - 1))
    logp = picked.gather(-1, targets[..., None]).squeeze(-1) - picked.logsumexp(-1)
    mask = batch.completion_mask.to(logits.device) > 0
    return torch.where(mask, logp, torch.zeros_like(logp))


def behaviour_logprobs(completions: list[Completion], width: int) -> torch.Tensor:
    """[B, width] `Completion.logprobs` (the sampling policy's log-prob of each token), 0 at padding.

    Laid out like `completion_logprobs`, so `logps - behaviour` is a per-token log importance ratio.
    A completion whose logprobs do not match its tokens would misalign every ratio: refused.
    """
    out = torch.zeros((len(completions), width), dtype=torch.float32)
    for i, comp in enumerate(completions):
        if len(comp.logprobs) != len(comp.token_ids):
            raise ValueError(f"completion {i} has {len(comp.logprobs)} behaviour logprobs for "
                             f"{len(comp.token_ids)} tokens; the generator must return one per sampled token")
        out[i, : len(comp.logprobs)] = torch.tensor(comp.logprobs, dtype=torch.float32)
    return out


def mc_advantages(completions: list[Completion], width: int) -> torch.Tensor:
    """[B, width] `Completion.advantages` (VinePPO's per-token advantages), 0 at padding.

    The loss's selector keeps only completions that have them; one missing or misaligned is refused.
    """
    out = torch.zeros((len(completions), width), dtype=torch.float32)
    for i, comp in enumerate(completions):
        if comp.advantages is None or len(comp.advantages) != len(comp.token_ids):
            got = "none" if comp.advantages is None else len(comp.advantages)
            raise ValueError(f"completion {i} has {got} MC advantages for {len(comp.token_ids)} tokens")
        out[i, : len(comp.advantages)] = torch.tensor(comp.advantages, dtype=torch.float32)
    return out


def gap_sums(logps: torch.Tensor, behaviour: torch.Tensor, mask: torch.Tensor, fresh: torch.Tensor) -> dict[str, float]:
    """Sums behind `logprob_gap` (mean |learner - behaviour| log-prob per trained token) and
    `logprob_gap_fresh` (the same over rows sampled by the learner's current version, `fresh` [B]
    bool): sums, not means, so micro-batches combine token-weighted."""
    gap = (logps.detach() - behaviour).abs() * mask
    fresh_mask = mask * fresh[:, None].to(mask.dtype)
    return {"gap_sum": float(gap.sum()), "gap_tokens": float(mask.sum()),
            "gap_fresh_sum": float((gap * fresh_mask).sum()), "gap_fresh_tokens": float(fresh_mask.sum())}


def gap_metrics(sums: list[dict[str, float]]) -> dict[str, float]:
    """`logprob_gap` and `logprob_gap_fresh` from micro-batches' `gap_sums`; NaN where no token counts."""
    total = {k: sum(s[k] for s in sums) for k in ("gap_sum", "gap_tokens", "gap_fresh_sum", "gap_fresh_tokens")}
    return {"logprob_gap": _ratio(total["gap_sum"], total["gap_tokens"]),
            "logprob_gap_fresh": _ratio(total["gap_fresh_sum"], total["gap_fresh_tokens"])}


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


def sampled_kl(reference: Callable[..., Any], batch: PackedBatch, completions: list[Completion],
               temperature: float) -> float:
    """Sum over the batch's completion tokens of log mu(y_t) - log ref_T(y_t): mu's log-probs are those the
    generator reported when it sampled (`Completion.logprobs`, of its sampling distribution at `temperature`;
    greedy: untempered), the reference's at the same temperature. Summed per completion and averaged, a
    sample estimate of the sampling weights' KL to the reference that needs only the frozen reference."""
    ref = completion_logprobs(reference, batch, temperature if temperature > 0 else 1.0)
    sampled = behaviour_logprobs(completions, ref.shape[1]).to(ref.device)
    return float(((sampled - ref) * batch.completion_mask.to(ref.device)).sum())
