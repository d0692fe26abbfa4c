"""The embedded tasks: `sort` (sort a string of digits) and `arith` (multi-step word problems).

sort: a prompt is the digits followed by ">" (e.g. "3914>"); the correct completion is the sorted
digits ("1349") followed by EOS.

arith (GSM8K's format in miniature): a prompt is a short story of small-number operations,
    "tom has 3 apples. he buys 4 more. he gives 2 away. how many?\n"
and the correct completion works it out one step per line and ends with the answer after "####":
    "3+4=7\n7-2=5\n#### 5" followed by EOS.

Every prompt is a pure function of (seed, stream, index), so a prompt stream can be resumed from
an index after a restart without storing any state.

Train and eval are disjoint by *content*, not just by seed: a fixed, seed-independent hash splits
the space of problems (sort: the digit string; arith: the arithmetic chain such as "3+4-2", so the
names and objects of the story do not matter) into an eval bucket and a train bucket. That keeps
eval unseen by the SFT warm start (which uses its own seed) and by RL training, whatever seeds
either uses.

Both tasks follow the `Task` protocol; `make_task` picks one by `task.name`, which may also be
`dataset`: the user's own prompts (async_rlhf/tasks/dataset.py).
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from async_rlhf.config.base import ConfigError
from async_rlhf.config.run import RunConfig
from async_rlhf.config.task import TaskConfig
from async_rlhf.config.task_shapes import (
    ANSWER_MARK,
    MAX_VALUE,
    MULTIPLY,
    NAMES,
    OBJECTS,
    QUESTION,
    SEPARATOR,
    TASK_SHAPES,
    TEMPLATES,
)
from async_rlhf.rollout import EVAL_ID_OFFSET, NO_COLUMNS, Prompt, RewardColumns
from async_rlhf.tasks.dataset import DataPrint, DatasetTask

if TYPE_CHECKING:  # transformers is heavy; the task only calls the tokenizer
    from transformers import PreTrainedTokenizerBase

Stream = Literal["train", "eval", "sft"]  # sft: the warm start's own train-split stream

EVAL_BUCKETS = 10  # 1 in EVAL_BUCKETS problems is reserved for evaluation
_MAX_DRAWS = 10_000  # rejection sampling bound; expected draws are ~1.1 (train) and ~10 (eval)


def in_eval_split(key: str) -> bool:
    """True when the problem with canonical form `key` belongs to the eval split (stable everywhere)."""
    return hashlib.sha256(key.encode()).digest()[0] % EVAL_BUCKETS == 0


def is_eval_digits(digits: str) -> bool:
    """True when `digits` belongs to the sort task's eval split."""
    return in_eval_split(digits)


class Task(Protocol):
    """What the controller, the warm start and the config checks need from an embedded task.

    Class attributes describe the task without building it, copied from its `TaskShape`
    (async_rlhf/config/task_shapes.py, which the config validates against): `chars` are the characters
    its tokenizer needs (besides PAD, BOS, EOS), `context_len` the positions of its embedded model.
    Step boundaries for VinePPO come from `step_end_chars`.
    """

    name: ClassVar[str]
    chars: ClassVar[str]
    context_len: ClassVar[int]
    step_end_chars: ClassVar[str]  # a step ends after any of these characters ("" = one step)
    cfg: TaskConfig
    tokenizer: Any
    seed: int

    def __init__(self, task_cfg: TaskConfig, tokenizer: Any, seed: int) -> None: ...

    @staticmethod
    def recipe(task_cfg: TaskConfig) -> dict:
        """What of the task config (and the task's data version) determines the warm-start weights."""
        ...

    def train_prompt(self, index: int) -> Prompt:
        """Prompt `index` of the train stream (a pure function of seed and index); `prompt` is an alias."""
        ...

    def eval_prompts(self) -> list[Prompt]:
        """The fixed held-out set, disjoint from every train and warm-start prompt."""
        ...

    def sft_target(self, index: int, correct_fraction: float) -> tuple[Prompt, str]:
        """A warm-start example of the sft stream: its prompt and target text (EOS not included)."""
        ...

    def describe(self) -> str:
        """One line for the run's log: where the prompts come from."""
        ...

    def data_print(self) -> DataPrint | None:
        """What identifies prompts read from files, which a resume must find unchanged; None where the config
        alone makes them (a resume checks the config)."""
        ...


def _stream_rng(task: str, seed: int, stream: Stream, index: int) -> random.Random:
    # str seeds are hashed with SHA-512 by `random`, so this is stable across runs and hosts.
    return random.Random(f"{task}:{seed}:{stream}:{index}")


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])  # the tokenizer adds BOS (embedded.build_tokenizer does)


# --- sort ---------------------------------------------------------------------------------------

def sorted_answer(digits: str) -> str:
    return "".join(sorted(digits))


def corrupt(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: swap two adjacent differing digits, drop one, or duplicate one."""
    swappable = [i for i in range(len(answer) - 1) if answer[i] != answer[i + 1]]
    kind = rng.choice(["swap", "swap", "drop", "dup"]) if swappable else rng.choice(["drop", "dup"])
    if kind == "swap":
        i = rng.choice(swappable)
        return answer[:i] + answer[i + 1] + answer[i] + answer[i + 2:]
    i = rng.randrange(len(answer))
    if kind == "drop" and len(answer) > 1:
        return answer[:i] + answer[i + 1:]
    return answer[:i] + answer[i] + answer[i:]  # duplicate (also the fallback for 1-digit answers)


class _PromptStreams:
    """Train and eval prompt streams shared by the tasks: a task supplies `item` and `make_prompt`."""

    cfg: TaskConfig

    def item(self, index: int, stream: Stream = "train") -> Any:
        raise NotImplementedError

    def make_prompt(self, prompt_id: int, item: Any) -> Prompt:
        raise NotImplementedError

    def train_prompt(self, index: int) -> Prompt:
        if not 0 <= index < EVAL_ID_OFFSET:
            raise ValueError(f"train prompt index must be in [0, {EVAL_ID_OFFSET}), got {index}")
        return self.make_prompt(index, self.item(index, "train"))

    def prompt(self, index: int) -> Prompt:  # the stream the generators consume
        return self.train_prompt(index)

    def eval_prompt(self, index: int) -> Prompt:
        return self.make_prompt(EVAL_ID_OFFSET + index, self.item(index, "eval"))

    def eval_prompts(self) -> list[Prompt]:
        """The fixed eval set: task_cfg.eval_prompts prompts, disjoint from every train prompt."""
        return [self.eval_prompt(i) for i in range(self.cfg.eval_prompts)]

    def describe(self) -> str:
        return f"task {self.cfg.name}: train prompts drawn on the fly, {self.cfg.eval_prompts} eval prompts"

    def data_print(self) -> None:
        return None  # drawn from the task config and seed


class SortTask(_PromptStreams):
    """Deterministic prompt streams for the digit-sorting task."""

    name: ClassVar[str] = "sort"
    chars: ClassVar[str] = TASK_SHAPES[name].chars
    context_len: ClassVar[int] = TASK_SHAPES[name].context_len
    step_end_chars: ClassVar[str] = TASK_SHAPES[name].step_end_chars  # "": one step, the whole answer

    def __init__(self, task_cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> None:
        if task_cfg.max_digits < 2:  # no 1-digit string hashes into the eval split
            raise ValueError(f"task.max_digits must be >= 2 for a disjoint eval split (got {task_cfg.max_digits})")
        self.cfg = task_cfg
        self.tokenizer = tokenizer  # must add BOS itself (embedded.build_tokenizer does)
        self.seed = seed

    @staticmethod
    def recipe(task_cfg: TaskConfig) -> dict:
        """What of the task determines the warm-start weights (kept as it was: cached hashes hold)."""
        return {"name": task_cfg.name, "min_digits": task_cfg.min_digits, "max_digits": task_cfg.max_digits}

    def digits(self, index: int, stream: Stream = "train") -> str:
        """The digit string for prompt `index` of `stream`, drawn until it falls in that split."""
        rng = _stream_rng("sort", self.seed, stream, index)
        want_eval = stream == "eval"
        for _ in range(_MAX_DRAWS):
            n = rng.randint(self.cfg.min_digits, self.cfg.max_digits)
            digits = "".join(rng.choice("0123456789") for _ in range(n))
            if is_eval_digits(digits) == want_eval:
                return digits
        raise RuntimeError(f"no {stream} prompt found for index {index}")  # unreachable in practice

    def make_prompt(self, prompt_id: int, digits: str) -> Prompt:
        text = digits + SEPARATOR
        meta = {"digits": digits, "answer": sorted_answer(digits)}
        return Prompt(prompt_id, text, _encode(self.tokenizer, text), meta)

    def item(self, index: int, stream: Stream = "train") -> str:
        return self.digits(index, stream)

    def sft_target(self, index: int, correct_fraction: float) -> tuple[Prompt, str]:
        """Sorted digits with probability `correct_fraction`, else a plausible corruption of them."""
        prompt = self.make_prompt(index, self.digits(index, "sft"))
        rng = random.Random(f"sft-target:{self.seed}:{index}")
        answer = prompt.meta["answer"]
        return prompt, answer if rng.random() < correct_fraction else corrupt(answer, rng)


# --- arith --------------------------------------------------------------------------------------

# The story's texts (NAMES, OBJECTS, TEMPLATES, ...) are in async_rlhf/config/task_shapes.py: the config
# bounds a prompt's length by them.
OP_WEIGHTS = {"+": 2, "-": 2, "*": 1}
ARITH_DATA_VERSION = 1  # bump when problems or warm-start targets change (enters the cache hash)


@dataclass(frozen=True)
class ArithProblem:
    """A start value and a chain of operations, with the story that tells them."""

    start: int
    ops: tuple[tuple[str, int], ...]  # (symbol, operand), symbol in "+-*"
    text: str

    @property
    def key(self) -> str:
        """Canonical arithmetic of the problem, e.g. "3+4-2" (what the eval split hashes)."""
        return str(self.start) + "".join(f"{sym}{n}" for sym, n in self.ops)


def apply_op(value: int, sym: str, n: int) -> int:
    return value + n if sym == "+" else value - n if sym == "-" else value * n


def chain(start: int, ops: tuple[tuple[str, int], ...], slip: tuple[int, int] | None = None) -> list[int]:
    """The values after each op; `slip=(step, delta)` adds delta to that step's result, and the
    error propagates through the later steps as it would in a real worked solution."""
    values, value = [], start
    for i, (sym, n) in enumerate(ops):
        value = apply_op(value, sym, n) + (slip[1] if slip and slip[0] == i else 0)
        values.append(value)
    return values


def solution_lines(start: int, ops: tuple[tuple[str, int], ...], slip: tuple[int, int] | None = None) -> list[str]:
    """One "a+b=c" line per op, then "#### c" (e.g. ["3+4=7", "7-2=5", "#### 5"])."""
    values = chain(start, ops, slip)
    before = [start, *values[:-1]]
    lines = [f"{a}{sym}{n}={c}" for a, (sym, n), c in zip(before, ops, values)]
    return lines + [f"{ANSWER_MARK} {values[-1] if values else start}"]


def slip_for(start: int, ops: tuple[tuple[str, int], ...], rng: random.Random) -> tuple[int, int]:
    """An arithmetic slip (off by 1 or 2 in one step) that keeps every later value >= 0."""
    step, delta = rng.randrange(len(ops)), rng.choice([1, 2]) * rng.choice([1, -1])
    return (step, delta) if min(chain(start, ops, (step, delta))) >= 0 else (step, abs(delta))


class ArithTask(_PromptStreams):
    """Deterministic prompt streams of multi-step arithmetic word problems with small numbers."""

    name: ClassVar[str] = "arith"
    chars: ClassVar[str] = TASK_SHAPES[name].chars
    context_len: ClassVar[int] = TASK_SHAPES[name].context_len
    step_end_chars: ClassVar[str] = TASK_SHAPES[name].step_end_chars  # one step per line; "#### n" is the last

    def __init__(self, task_cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> None:
        self.cfg = task_cfg
        self.tokenizer = tokenizer  # must add BOS itself (embedded.build_tokenizer does)
        self.seed = seed

    @staticmethod
    def recipe(task_cfg: TaskConfig) -> dict:
        return {"name": "arith", "data_version": ARITH_DATA_VERSION,
                **task_cfg.model_dump(include={"min_steps", "max_steps", "min_operand", "max_operand"})}

    def draw(self, rng: random.Random) -> ArithProblem:
        """One problem: name, object, start value, then feasible operations told as sentences."""
        lo, hi = self.cfg.min_operand, self.cfg.max_operand
        name, pronoun = rng.choice(NAMES)
        start = value = rng.randint(min(max(lo, 2), hi), hi)  # "has 1 apples" reads badly: start at 2 when we can
        sentences, ops = [f"{name} has {start} {rng.choice(OBJECTS)}."], []
        for _ in range(rng.randint(self.cfg.min_steps, self.cfg.max_steps)):
            sym, n, template = self._next_op(value, rng)
            ops.append((sym, n))
            sentences.append(template.format(p=pronoun, n=n))
            value = apply_op(value, sym, n)
        return ArithProblem(start, tuple(ops), " ".join(sentences) + QUESTION)

    def _next_op(self, value: int, rng: random.Random) -> tuple[str, int, str]:
        """A feasible operation (results stay in [0, MAX_VALUE]), weighted + : - : * = 2 : 2 : 1."""
        lo, hi = self.cfg.min_operand, self.cfg.max_operand
        feasible = {"+": value + lo <= MAX_VALUE, "-": value >= lo, "*": 1 <= value <= MAX_VALUE // 2}
        # Never empty: value < lo implies value + lo < 2 * lo <= MAX_VALUE (task.max_operand <= 49).
        choices = [sym for sym, ok in feasible.items() if ok]
        sym = rng.choices(choices, weights=[OP_WEIGHTS[c] for c in choices])[0]
        if sym == "*":
            n = rng.choice([f for f in MULTIPLY if value * f <= MAX_VALUE])
            return sym, n, MULTIPLY[n]
        n = rng.randint(lo, min(hi, MAX_VALUE - value) if sym == "+" else min(hi, value))
        return sym, n, rng.choice(TEMPLATES[sym])

    def problem(self, index: int, stream: Stream = "train") -> ArithProblem:
        """Problem `index` of `stream`, drawn until its arithmetic falls in that split."""
        rng = _stream_rng("arith", self.seed, stream, index)
        want_eval = stream == "eval"
        for _ in range(_MAX_DRAWS):
            problem = self.draw(rng)
            if in_eval_split(problem.key) == want_eval:
                return problem
        raise RuntimeError(f"no {stream} arith problem found for index {index}; widen task.*_steps / task.*_operand")

    def make_prompt(self, prompt_id: int, problem: ArithProblem) -> Prompt:
        lines = solution_lines(problem.start, problem.ops)
        answer = lines[-1].removeprefix(ANSWER_MARK).strip()
        meta = {"answer": answer, "solution": "\n".join(lines), "key": problem.key}
        return Prompt(prompt_id, problem.text, _encode(self.tokenizer, problem.text), meta)

    def item(self, index: int, stream: Stream = "train") -> ArithProblem:
        return self.problem(index, stream)

    def sft_target(self, index: int, correct_fraction: float) -> tuple[Prompt, str]:
        """The worked solution with probability `correct_fraction`, else one with a slip that propagates."""
        problem = self.problem(index, "sft")
        rng = random.Random(f"arith-sft-target:{self.seed}:{index}")
        slip = None if rng.random() < correct_fraction else slip_for(problem.start, problem.ops, rng)
        return self.make_prompt(index, problem), "\n".join(solution_lines(problem.start, problem.ops, slip))


def _task_classes(*classes: type[Task]) -> dict[str, type[Task]]:
    """The prompt streams of every task of the registry (TASK_SHAPES), by name; a shape without a class
    (or the reverse) fails at import, not in the middle of a run."""
    found = {cls.name: cls for cls in classes}
    if set(found) != set(TASK_SHAPES):
        raise RuntimeError(f"task classes {sorted(found)} do not match the task shapes {sorted(TASK_SHAPES)}")
    return found


TASKS: dict[str, type[Task]] = _task_classes(SortTask, ArithTask, DatasetTask)


def task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise ValueError(f"task.name: unknown task '{name}'; valid names: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def make_task(task_cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> Task:
    """The task named by `task_cfg.name`, drawing its prompts with `seed`."""
    return task_class(task_cfg.name)(task_cfg, tokenizer, seed)


# Tokenizer classes that are transformers' generic tokenizers-library wrapper (the embedded policy's, any
# checkpoint saved from a bare tokenizer.json): loaded by that class directly, without AutoTokenizer, whose
# import pulls in transformers' model-loading machinery (torch._dynamo, accelerate: ~2 s of a run's start-up).
GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def tokenizer_class_name(model_dir: str | Path) -> str | None:
    """`tokenizer_class` of the directory's tokenizer_config.json, None when unreadable or unset."""
    try:
        found = json.loads((Path(model_dir) / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):  # AutoTokenizer reports what is wrong with the directory
        return None
    return found if isinstance(found, str) else None


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    """The policy's tokenizer; it must know its EOS token (completions end there)."""
    try:
        tokenizer = _tokenizer_loader(model_dir).from_pretrained(str(model_dir))
    except Exception as exc:  # transformers raises many types; the user needs the directory and the reason
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"config error: model.path: cannot load the tokenizer in '{model_dir}': {reason}") from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"config error: model.path: the tokenizer in '{model_dir}' has no eos_token; set one in its "
                          f"tokenizer_config.json so that completions can end")
    return tokenizer


def _tokenizer_loader(model_dir: str | Path) -> Any:  # Any: AutoTokenizer or a tokenizer class, both .from_pretrained
    if tokenizer_class_name(model_dir) in GENERIC_TOKENIZERS:
        from transformers import PreTrainedTokenizerFast  # what AutoTokenizer resolves these names to

        return PreTrainedTokenizerFast
    from transformers import AutoTokenizer

    return AutoTokenizer


def load_task(cfg: RunConfig, model_dir: str | Path, reward_columns: RewardColumns = NO_COLUMNS) -> Task:
    """The run's task with the policy's tokenizer (a dataset task reads and checks its rows here, and its prompts
    carry the columns its reward functions take)."""
    tokenizer = load_tokenizer(model_dir)
    if cfg.task.name == DatasetTask.name:  # the embedded tasks carry their answers themselves
        return DatasetTask(cfg.task, tokenizer, cfg.seed, reward_columns)
    return make_task(cfg.task, tokenizer, cfg.seed)
