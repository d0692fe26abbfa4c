"""VinePPO's Monte Carlo value and advantage estimator, the pure parts (Kazemnejad et al., arXiv 2410.01679).

VinePPO is PPO without a critic: the value of a state (a prompt plus a prefix of a response) is
the mean reward of K_mc continuations sampled from that state by the policy that produced the
response. This module holds everything that needs no model:

1. split a completion into reasoning steps (`StepSplitter`; newline-delimited by default):
       ends = (e_1, ..., e_S), step i = token_ids[e_{i-1}:e_i], e_0 = 0, e_S = len(token_ids);
2. the states to estimate, per response with S steps:
       s_0 = prompt,   s_i = prompt + token_ids[:e_i]   for i = 1 .. S-1
   (the state after the last step is terminal: V = 0, no rollouts), gathered over a batch with
   identical states (same policy version, prompt ids and prefix ids) estimated once;
3. from the MC values V(s) = mean_k R(continuation_k of s), the step advantages with reward only
   at the end and gamma = 1,
       A_i = r_i + V(s_{i+1}) - V(s_i),   r_i = 0 for i < S-1,   r_{S-1} = R,   V(s_S) = 0,
   i.e. A_i = V(s_{i+1}) - V(s_i) for i < S-1 and A_{S-1} = R - V(s_{S-1}); and per-token
   advantages, each token taking its step's advantage.

Besides the formulas, what the estimator asks of a generator call and gets back (`MCRequest`, `MCBatch`:
one rollout group per unique state, sampled in the same `GeneratorActor.generate` call as the responses,
so by the same weights) and the continuations' seeds: the generator (actors/generator.py, a worker) imports
them from here, not from the pipeline. The pipeline's bookkeeping (attaching advantages to a batch, cost
counters) is in async_rlhf/pipeline/vineppo.py, the clipped loss in learners/losses/vineppo.py.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from async_rlhf.rollout import RolloutGroup, scored_reward

StepSplitter = Callable[[Sequence[int]], list[int]]  # completion token ids -> exclusive step ends


def delimiter_splitter(delimiter_ids: Collection[int]) -> StepSplitter:
    """A splitter ending a step after every delimiter token (e.g. the newline token).

    Step i holds the tokens up to and including the i-th delimiter; the last step runs to the
    end of the completion (EOS included when present). A completion ending in a delimiter has no
    empty trailing step; an empty completion has no steps; no delimiter gives one step.
    """
    delimiters = frozenset(delimiter_ids)

    def split(token_ids: Sequence[int]) -> list[int]:
        ends = [i + 1 for i, tok in enumerate(token_ids) if tok in delimiters]
        if token_ids and (not ends or ends[-1] != len(token_ids)):
            ends.append(len(token_ids))
        return ends

    return split


@dataclass(frozen=True)
class StepSplit:
    """One response split into steps: step i is token_ids[ends[i-1]:ends[i]] (ends[-1] = length)."""

    prompt_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    ends: tuple[int, ...]
    policy_version: int = 0  # the weights that sampled the response; continuations must use them

    def __post_init__(self) -> None:
        bounds = (0, *self.ends)
        if any(a >= b for a, b in zip(bounds, bounds[1:])) or (self.ends and self.ends[-1] != len(self.token_ids)):
            raise ValueError(f"step ends {self.ends} must increase strictly and end at {len(self.token_ids)}")
        if not self.ends and self.token_ids:
            raise ValueError("a non-empty completion needs at least one step")

    @property
    def num_steps(self) -> int:
        return len(self.ends)


def split_response(
    prompt_ids: Sequence[int], token_ids: Sequence[int], splitter: StepSplitter, policy_version: int = 0
) -> StepSplit:
    """Split one response (its prompt ids and completion ids) with `splitter`."""
    return StepSplit(tuple(prompt_ids), tuple(token_ids), tuple(splitter(token_ids)), policy_version)


@dataclass(frozen=True)
class State:
    """A state to estimate: prompt + generated prefix, under the weights `policy_version`."""

    policy_version: int
    prompt_ids: tuple[int, ...]
    prefix_ids: tuple[int, ...]

    @property
    def token_ids(self) -> list[int]:
        """What the generator continues from (prompt ids as the prompt, then the prefix)."""
        return [*self.prompt_ids, *self.prefix_ids]

    def remaining_tokens(self, max_new_tokens: int) -> int:
        """Continuation budget so that prefix + continuation fits the response's own budget."""
        return max_new_tokens - len(self.prefix_ids)


def step_states(split: StepSplit) -> list[State]:
    """s_0 = prompt and s_i = prompt + steps[:i] for i = 1 .. S-1 (S states; terminal left out)."""
    starts = (0, *split.ends[:-1]) if split.ends else ()  # s_i's prefix ends where step i starts
    return [State(split.policy_version, split.prompt_ids, split.token_ids[:start]) for start in starts]


@dataclass
class MCStates:
    """The unique states of a batch, and for each response the index of each s_i among them."""

    states: list[State] = field(default_factory=list)
    index: list[list[int]] = field(default_factory=list)  # index[r][i] -> states position of s_i of response r
    owner: list[int] = field(default_factory=list)  # owner[j]: first response with state j (for its Prompt)


def gather_states(splits: Sequence[StepSplit]) -> MCStates:
    """All states of a batch, each unique (version, prompt ids, prefix ids) kept once.

    Responses to the same prompt share s_0; two responses with the same first line share s_1;
    the same prompt text under two prompt ids shares its states too (same ids, same value).
    """
    out, seen = MCStates(), {}
    for r, split in enumerate(splits):
        row = []
        for state in step_states(split):
            if state not in seen:
                seen[state] = len(out.states)
                out.states.append(state)
                out.owner.append(r)
            row.append(seen[state])
        out.index.append(row)
    return out


def mc_value(continuation_rewards: Sequence[float]) -> float:
    """V(s) = (1/K) * sum_k R_k: the mean reward of the K_mc continuations sampled from s."""
    if not continuation_rewards:
        raise ValueError("an MC value needs at least one continuation reward")
    return sum(continuation_rewards) / len(continuation_rewards)


def step_advantages(values: Sequence[float], reward: float) -> list[float]:
    """A_i = r_i + V(s_{i+1}) - V(s_i), with r_i = 0 but r_{S-1} = reward, and V(s_S) = 0.

    `values` are V(s_0) .. V(s_{S-1}); one step gives [reward - V(s_0)]; no step gives [].
    """
    nexts = [*values[1:], 0.0]  # V(s_{i+1}); the terminal state is worth 0
    rewards = [0.0] * (len(values) - 1) + [reward] if values else []
    return [r + v_next - v for r, v_next, v in zip(rewards, nexts, values)]


def token_advantages(ends: Sequence[int], advantages: Sequence[float]) -> list[float]:
    """Per-token advantages: token t of step i (ends[i-1] <= t < ends[i]) takes A_i."""
    if len(ends) != len(advantages):
        raise ValueError(f"{len(ends)} steps but {len(advantages)} advantages")
    out: list[float] = []
    start = 0
    for end, adv in zip(ends, advantages):
        out.extend([adv] * (end - start))
        start = end
    return out


def batch_advantages(
    splits: Sequence[StepSplit], mc: MCStates, state_values: Sequence[float], rewards: Sequence[float]
) -> list[list[float]]:
    """Per-token advantages of every response, aligned with its completion's token_ids.

    `state_values[j]` is the MC value of `mc.states[j]`; `rewards[r]` the reward of response r.
    """
    if len(state_values) != len(mc.states) or not len(rewards) == len(splits) == len(mc.index):
        raise ValueError("need one value per unique state and one reward per response")
    out = []
    for split, row, reward in zip(splits, mc.index, rewards):
        values = [state_values[j] for j in row]
        out.append(token_advantages(split.ends, step_advantages(values, reward)))
    return out


# ---------------------------------------------------------------- what a generator call samples for the estimator


@dataclass(frozen=True)
class MCRequest:
    """Asked of a generator call besides its responses: K_mc continuations of every unique state."""

    k_mc: int
    delimiter_ids: tuple[int, ...]  # a step ends after any of these tokens (empty: one step)


def continuation_seed(seed: int, prompt_id: int, prefix_ids: Sequence[int]) -> int:
    """Sampling seed of a state's continuations: a pure function of the run seed, the owning prompt
    and the prefix, so a re-issued or regenerated batch draws the same rollouts; salted apart from
    the responses' own per-prompt seed (else s_0's continuations would repeat the responses)."""
    key = f"mc:{seed}:{prompt_id}:{','.join(map(str, prefix_ids))}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big") % (2**31 - 1)


@dataclass
class MCBatch:
    """The MC rollouts of one generation call.

    `rollouts[j]` holds the K_mc continuations of unique state j as a RolloutGroup of its owner's
    prompt; each Completion is the whole response prefix + continuation (its `text` is what the
    RewardService scores; no behaviour log-probs: they never reach the learner). `index[r]` gives
    the positions of s_0 .. s_{S-1} of response r, responses numbered over the call's groups and
    completions in order.
    """

    rollouts: list[RolloutGroup]
    index: list[list[int]]
    gen_s: float  # time inside vLLM sampling the continuations
    tokens: int  # continuation tokens sampled

    @property
    def num_rollouts(self) -> int:
        return sum(len(g.completions) for g in self.rollouts)


def state_values(rollouts: Sequence[RolloutGroup]) -> list[float | None]:
    """V(s) per state: the mean reward of its continuations whose reward is ok. A failed or timed-out
    reward is left out, never counted as a value; a state with no ok continuation has no value (None)."""
    out: list[float | None] = []
    for group in rollouts:
        rewards = [scored_reward(c) for c in group.scored]
        out.append(mc_value(rewards) if rewards else None)
    return out
