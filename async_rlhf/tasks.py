"""The embedded task: sort a string of digits.

A prompt is the digits followed by ">" (e.g. "3914>"); the correct completion is the sorted
digits ("1349") followed by EOS. Every prompt is a pure function of (seed, stream, index), so a
prompt stream can be resumed from an index after a restart without storing any state.

Train and eval are disjoint by *content*, not just by seed: a fixed, seed-independent hash splits
the space of digit strings into an eval bucket and a train bucket. That keeps eval unseen by the
SFT warm start (which uses its own seed) and by RL training, whatever seeds either uses.
"""
from __future__ import annotations

import hashlib
import random
from typing import TYPE_CHECKING, Literal

from async_rlhf.config import TaskConfig
from async_rlhf.rollout import Prompt

if TYPE_CHECKING:  # transformers is heavy; the task only calls the tokenizer
    from transformers import PreTrainedTokenizerBase

Stream = Literal["train", "eval", "sft"]  # sft: the warm start's own train-split stream

SEPARATOR = ">"
EVAL_BUCKETS = 10  # 1 in EVAL_BUCKETS digit strings is reserved for evaluation
EVAL_ID_OFFSET = 1_000_000_000  # eval prompt ids live apart from train ids (train index < this)
_MAX_DRAWS = 10_000  # rejection sampling bound; expected draws are ~1.1 (train) and ~10 (eval)


def is_eval_digits(digits: str) -> bool:
    """True when `digits` belongs to the eval split (stable across processes and Python versions)."""
    return hashlib.sha256(digits.encode()).digest()[0] % EVAL_BUCKETS == 0


def sorted_answer(digits: str) -> str:
    return "".join(sorted(digits))


class SortTask:
    """Deterministic prompt streams for the digit-sorting task."""

    def __init__(self, task_cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> None:
        if task_cfg.max_digits < 2:  # no 1-digit string hashes into the eval split
            raise ValueError(f"task.max_digits must be >= 2 for a disjoint eval split (got {task_cfg.max_digits})")
        self.cfg = task_cfg
        self.tokenizer = tokenizer  # must add BOS itself (embedded.build_tokenizer does)
        self.seed = seed

    def digits(self, index: int, stream: Stream = "train") -> str:
        """The digit string for prompt `index` of `stream`, drawn until it falls in that split."""
        # str seeds are hashed with SHA-512 by `random`, so this is stable across runs and hosts.
        rng = random.Random(f"sort:{self.seed}:{stream}:{index}")
        want_eval = stream == "eval"
        for _ in range(_MAX_DRAWS):
            n = rng.randint(self.cfg.min_digits, self.cfg.max_digits)
            digits = "".join(rng.choice("0123456789") for _ in range(n))
            if is_eval_digits(digits) == want_eval:
                return digits
        raise RuntimeError(f"no {stream} prompt found for index {index}")  # unreachable in practice

    def make_prompt(self, prompt_id: int, digits: str) -> Prompt:
        text = digits + SEPARATOR
        token_ids = list(self.tokenizer(text)["input_ids"])
        return Prompt(prompt_id, text, token_ids, {"digits": digits, "answer": sorted_answer(digits)})

    def train_prompt(self, index: int) -> Prompt:
        if not 0 <= index < EVAL_ID_OFFSET:
            raise ValueError(f"train prompt index must be in [0, {EVAL_ID_OFFSET}), got {index}")
        return self.make_prompt(index, self.digits(index, "train"))

    prompt = train_prompt  # the stream the generators consume

    def eval_prompt(self, index: int) -> Prompt:
        return self.make_prompt(EVAL_ID_OFFSET + index, self.digits(index, "eval"))

    def eval_prompts(self) -> list[Prompt]:
        """The fixed eval set: task_cfg.eval_prompts prompts, disjoint from every train prompt."""
        return [self.eval_prompt(i) for i in range(self.cfg.eval_prompts)]
