"""Split one learner step's rollout groups into micro-batches bounded by padded tokens.

The unit is the rollout group, never a row: a pairwise selector (DPO) needs a group's chosen and
rejected together and a per-prompt baseline (RLOO, GRPO) needs all of a group's samples. A
micro-batch is a contiguous run of groups; its cost is what its forward costs, rows x the
longest prompt+completion row (the batch is right-padded to that width).

Selectors must decide each group on its own (all the registered ones do: `select_groups`,
`select_pairs_batch`): the learner sizes a group by selecting it alone, then selects each
micro-batch's groups together, and the step's stats are the sums of the micro-batches' stats.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from learners.logprobs import PackedBatch, gap_metrics
from learners.losses import Selection


@dataclass(frozen=True)
class GroupSize:
    """What a group adds to a micro-batch: its selected rows and its longest row (0 if no rows)."""

    rows: int
    width: int

    @classmethod
    def of(cls, selection: Selection) -> "GroupSize":
        """The size of one group's selection (the group selected alone)."""
        widths = [len(p) + len(c.token_ids) for p, c in zip(selection.prompts, selection.completions)]
        return cls(rows=len(widths), width=max(widths, default=0))


def padded_tokens(sizes: list[GroupSize]) -> int:
    """Tokens a forward of these groups together costs: rows x longest row, padding included."""
    return sum(s.rows for s in sizes) * max((s.width for s in sizes), default=0)


def split_by_tokens(sizes: list[GroupSize], max_tokens: int | None) -> list[range]:
    """Contiguous chunks of group indices whose padded tokens stay <= max_tokens (None: one chunk).

    Greedy in order: a group that would push the current chunk over the budget starts a new one.
    A group over the budget on its own becomes its own chunk (groups are never cut; no error).
    Groups without rows (ties, failed rewards) never start a chunk: they ride along with their
    neighbour, so every chunk has rows unless no group has any.
    """
    if max_tokens is None or not sizes:
        return [range(len(sizes))]
    chunks: list[range] = []
    start = 0
    for i, size in enumerate(sizes):
        current = sizes[start:i]
        has_rows = any(s.rows for s in current)
        if has_rows and size.rows and padded_tokens(current + [size]) > max_tokens:
            chunks.append(range(start, i))
            start = i
    chunks.append(range(start, len(sizes)))
    return chunks


def _best_cut(sizes: list[GroupSize], chunk: range) -> tuple[int, int] | None:
    """(cost of the larger half, cut index) of the cut of `chunk` that minimises the larger half;
    None when fewer than two of its groups have rows (cutting would leave a chunk without rows)."""
    with_rows = [i for i in chunk if sizes[i].rows]
    if len(with_rows) < 2:
        return None
    # Cut just before a row-bearing group (not the first), so both halves keep rows.
    cuts = [(max(padded_tokens(sizes[chunk.start:i]), padded_tokens(sizes[i:chunk.stop])), i)
            for i in with_rows[1:]]
    return min(cuts)


def split_further(sizes: list[GroupSize], chunks: list[range], count: int) -> list[range]:
    """`chunks` cut into up to `count` chunks (more ranks agreed on more micro-batches than this one has).

    Repeatedly halves the most expensive chunk that can still be cut (at its most even cut), so
    order and contiguity are kept and no chunk grows. Stops early when no chunk has two groups
    with rows left: the caller pads the rest with zero-weight passes.
    """
    chunks = list(chunks)
    while len(chunks) < count:
        candidates = [(padded_tokens(sizes[c.start:c.stop]), k, best[1]) for k, c in enumerate(chunks)
                      if (best := _best_cut(sizes, c)) is not None]
        if not candidates:
            break
        _, k, cut = max(candidates, key=lambda t: (t[0], -t[1]))  # ties: the earliest chunk
        chunk = chunks[k]
        chunks[k:k + 1] = [range(chunk.start, cut), range(cut, chunk.stop)]
    return chunks


def sum_stats(selections: list[Selection]) -> dict[str, int]:
    """The step's selection counters: each micro-batch's, summed key by key."""
    total: dict[str, int] = {}
    for selection in selections:
        for key, value in selection.stats.items():
            total[key] = total.get(key, 0) + value
    return total


@dataclass
class MicroBatch:
    """One forward/backward pass of a step: a selection, packed, with its share of the step's rows.

    `weight` scales the micro-batch's loss so the accumulated gradient of a loss that averages over
    rows (sequences or pairs) is the whole step's; 0 marks a padding pass (ranks agreed on more
    passes than this rank has micro-batches: it repeats one of its own at zero weight). The
    reference log-probs and old values are filled before the first update and kept across epochs.
    """

    selection: Selection
    batch: PackedBatch
    weight: float
    ref_logps: torch.Tensor | None = None
    old_values: torch.Tensor | None = None


def weigh(selections: list[Selection], count: int) -> list[tuple[Selection, float]]:
    """The selections with rows, each with its share of the step's rows, padded to `count` passes
    with zero-weight repeats of the first (a rank needing them has at least one: ranks agreed that
    every rank has rows)."""
    real = [s for s in selections if len(s)]
    total = sum(len(s) for s in real)
    weighted = [(s, len(s) / total) for s in real]
    return weighted + [(real[0], 0.0)] * (count - len(real))


def combine_metrics(passes: list[dict]) -> dict:
    """One epoch's metrics from its passes: measures (loss, kl, the loss's metrics) averaged with
    the passes' row weights, token counts summed, padding passes (weight 0) left out of both;
    logprob_gap token-weighted (a mean over tokens, not rows)."""
    real = [p for p in passes if p["weight"] > 0]
    measures = {}
    for key in dict.fromkeys(k for p in real for k in p["measures"]):  # ordered union of the keys
        having = [p for p in real if key in p["measures"]]
        measures[key] = sum(p["weight"] * p["measures"][key] for p in having) / sum(p["weight"] for p in having)
    return {**measures, **gap_metrics([p["gap"] for p in real if p.get("gap")]),
            "train_tokens": sum(p["train_tokens"] for p in real),
            "forward_tokens": sum(p["forward_tokens"] for p in real),
            "micro_batches": len(passes),
            "nonfinite_micro_batches": sum(not p["finite"] for p in passes)}
