"""The static side of each task: its name, vocabulary, embedded context and the longest prompt and answer a
task config allows. The config checks a run against these without building the task; the prompt streams
(async_rlhf/tasks/) take their texts and class attributes from here, so each is written once and the
dependency runs one way (tasks -> config).

`TASK_SHAPES` is the registry of task names: `task.name` accepts exactly its keys, and
async_rlhf/tasks/builtin.py maps each key to the class that draws the prompts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol


class TaskKnobs(Protocol):
    """The fields of `TaskConfig` (async_rlhf/config/task.py, which imports this module) the bounds read."""

    max_digits: int
    max_steps: int
    max_operand: int
    dataset: Any

# --- sort ---------------------------------------------------------------------------------------
SEPARATOR = ">"

# --- arith --------------------------------------------------------------------------------------
MAX_VALUE = 99  # every number in a problem (start, intermediate, answer) stays in [0, MAX_VALUE]
ANSWER_MARK = "####"
QUESTION = " how many?\n"
NAMES = (("tom", "he"), ("ann", "she"), ("bob", "he"), ("sue", "she"), ("max", "he"), ("eva", "she"))
OBJECTS = ("apples", "pens", "cards", "eggs", "books", "coins", "shells", "stamps")
TEMPLATES = {  # {p}: pronoun, {n}: operand
    "+": ("{p} buys {n} more.", "{p} finds {n} more.", "{p} gets {n} more."),
    "-": ("{p} gives {n} away.", "{p} loses {n}.", "{p} sells {n}."),
}
MULTIPLY = {2: "{p} doubles them.", 3: "{p} triples them."}

TokenBound = Callable[[TaskKnobs], int]


@dataclass(frozen=True)
class TaskShape:
    """What a task is before it is built (the `Task` protocol's class attributes and size bounds)."""

    name: str
    chars: str  # characters its embedded tokenizer needs besides PAD, BOS, EOS ("" = the policy's own)
    context_len: int  # positions of its embedded model (0: no embedded model runs it)
    step_end_chars: str  # a VinePPO step ends after any of these characters ("" = one step)
    max_prompt_tokens: TokenBound  # longest prompt in tokens, BOS included (checked against max_model_len)
    max_answer_tokens: TokenBound  # longest correct completion in tokens, EOS included


def _sort_prompt_tokens(task_cfg: TaskKnobs) -> int:
    return 1 + task_cfg.max_digits + len(SEPARATOR)  # BOS + digits + ">"


def _sort_answer_tokens(task_cfg: TaskKnobs) -> int:
    return task_cfg.max_digits + 1  # sorted digits + EOS


def _arith_prompt_tokens(task_cfg: TaskKnobs) -> int:
    """An upper bound on BOS + the longest story over every name, object, template and number."""
    n = "9" * len(str(task_cfg.max_operand))
    header = max(len(f"{name} has {n} {obj}.") for name, _ in NAMES for obj in OBJECTS)
    sentences = [t for ts in TEMPLATES.values() for t in ts] + list(MULTIPLY.values())
    step = max(len(" " + t.format(p=p, n=n)) for t in sentences for _, p in NAMES)
    return 1 + header + task_cfg.max_steps * step + len(QUESTION)


def _arith_answer_tokens(task_cfg: TaskKnobs) -> int:
    """An upper bound on the gold solution: per step "99+50=99\\n", then "#### 99" and EOS."""
    step = 2 * len(str(MAX_VALUE)) + len(str(task_cfg.max_operand)) + 3
    return task_cfg.max_steps * step + len(ANSWER_MARK) + 1 + len(str(MAX_VALUE)) + 1


def _dataset_prompt_tokens(task_cfg: TaskKnobs) -> int:
    assert task_cfg.dataset is not None  # TaskConfig guarantees it for name=dataset
    return task_cfg.dataset.max_prompt_tokens


def _dataset_answer_tokens(task_cfg: TaskKnobs) -> int:
    return 1  # unknown for free text: only EOS must fit


# Ordered as task.name's schema lists them (its error message names them in this order).
TASK_SHAPES: dict[str, TaskShape] = {
    # 64 positions: the longest prompt (BOS + 32 digits + ">") still leaves room for a completion.
    "sort": TaskShape("sort", "0123456789" + SEPARATOR, 64, "", _sort_prompt_tokens, _sort_answer_tokens),
    # 256 positions: 6 steps with 2-digit operands, prompt ~140 + solution ~64 tokens; one step per line.
    "arith": TaskShape("arith", "0123456789abcdefghijklmnopqrstuvwxyz .,?\n#+-*=", 256, "\n",
                       _arith_prompt_tokens, _arith_answer_tokens),
    "dataset": TaskShape("dataset", "", 0, "\n", _dataset_prompt_tokens, _dataset_answer_tokens),
}
