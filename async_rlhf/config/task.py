"""The prompt-source part of the run configuration (`task:`), and per-task defaults."""
from __future__ import annotations

import glob
import os
import re
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from async_rlhf.config.base import Strict, environment_checks
from async_rlhf.config.task_shapes import TASK_SHAPES, TaskShape

# The registry's keys, so that a new task is named once; pydantic's error lists them ("Input should be ...").
if TYPE_CHECKING:  # to the type checker a name; to pydantic the registry's keys, so the error lists them
    TaskName = str
else:
    TaskName = Literal[tuple(TASK_SHAPES)]

# What the validators need to know about a source lives here, not in async_rlhf/tasks/dataset.py (which reads
# the data and imports this config): the dependency runs one way.
EXTENSIONS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
FILE_FORMATS = ("jsonl", "json", "csv", "parquet")  # one file = one split; `split` picks in hub / disk sources
COMPRESSIONS = (".gz", ".bz2", ".xz")  # text files compressed whole, as `datasets` reads them (prompts.jsonl.gz)
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes (a DatasetDict's, a Dataset's)
GLOB_CHARS = ("*", "?", "[")  # a file source may be a pattern, as datasets' data_files is: data/train-*.jsonl


def source_files(path: str) -> list[Path]:
    """The files a file source names: itself, or those its glob pattern matches, in sorted order; [] for none."""
    if any(c in path for c in GLOB_CHARS):
        return [Path(p) for p in sorted(glob.glob(path)) if Path(p).is_file()]
    return [Path(path)] if Path(path).is_file() else []


def source_format(path: str, fmt: str) -> str:
    """The format of a source: explicit, else by extension (under a compression suffix for text formats); a
    directory is `disk` where save_to_disk wrote it, else a `folder` of data files; anything else `hub`."""
    if fmt != "auto":
        return fmt
    name = Path(path)
    suffix = name.suffix.lower()
    if suffix in COMPRESSIONS and name.with_suffix("").suffix.lower() in (".jsonl", ".json", ".csv"):
        suffix = name.with_suffix("").suffix.lower()
    if suffix in EXTENSIONS:
        return EXTENSIONS[suffix]
    if any(c in path for c in GLOB_CHARS):  # no hub name holds one: a pattern's files tell its format
        return pattern_format(path)
    if not name.is_dir():
        return "hub"
    return "disk" if any((name / marker).is_file() for marker in SAVED_MARKERS) else "folder"


def pattern_format(path: str) -> str:
    """The one file format every file a pattern matches has (data/train-*), else `pattern`: none or mixed."""
    kinds = {source_format(str(p), "auto") for p in source_files(path)}
    return kinds.pop() if len(kinds) == 1 and kinds <= set(FILE_FORMATS) else "pattern"


def check_source(key: str, path: str, fmt: str) -> None:
    """What can be told without reading the data: the file is there and its format known."""
    kind = source_format(path, fmt)
    if kind in FILE_FORMATS and not source_files(path):
        what = f"no file matches '{path}'" if any(c in path for c in GLOB_CHARS) else f"file '{path}' not found"
        raise ValueError(f"{key}: {what} (relative paths start at the current directory)")
    if kind == "disk" and not Path(path).is_dir():
        raise ValueError(f"{key}: directory '{path}' not found; give a directory written by Dataset.save_to_disk")
    if kind == "folder" and not Path(path).is_dir():
        raise ValueError(f"{key}: directory '{path}' not found; give a directory of data files")
    if kind == "pattern":
        found = source_files(path)
        what = "matches no file" if not found else f"matches {len(found)} files of no one known format"
        raise ValueError(f"{key}: the pattern '{path}' {what}; end it with the files' extension "
                         f"(data/train-*.jsonl) or set task.dataset.format")
    if kind == "hub" and Path(path).is_file():
        raise ValueError(f"task.dataset.format: cannot tell the format of '{path}' from its extension; "
                         f"set task.dataset.format to jsonl, json, csv or parquet")


def same_source(a: str, b: str) -> bool:
    """Two sources name the same data: equal hub names, paths to the same file or directory, or patterns (or a
    pattern and a file) that match a file in common."""
    if a == b or os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b)):
        return True
    return bool({p.resolve() for p in source_files(a)} & {p.resolve() for p in source_files(b)})


def template_fields(template: str | None) -> list[str]:
    """The columns a template reads: `{question}`, `{row[0]}` and `{obj.attr}` all read their first name."""
    if template is None:
        return []
    names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    return [re.split(r"[.\[]", name)[0] for name in names]


class DatasetConfig(Strict):
    """Your own prompts (task.name=dataset), read through HF `datasets` (async_rlhf/tasks/dataset.py)."""

    path: str = Field(description="a .jsonl/.json/.csv file (or .gz/.bz2/.xz of one), a .parquet file, a "
                                  "save_to_disk directory, or a hub name")
    format: Literal["auto", "jsonl", "json", "csv", "parquet", "disk", "folder", "hub"] = Field(
        "auto", description="auto: from the file extension; a directory is `disk` (save_to_disk's) or a `folder` of "
                            "data files; anything else `hub`"
    )
    split: str = Field("train", description="split to read from a hub dataset or a saved DatasetDict")
    field: str | None = Field(None, description="the key a .json file's rows sit under ({\"data\": [...]}); "
                                                "for every .json source of path and eval_path")
    prompt_column: str = "prompt"
    reference_column: str | None = Field(None, description="reference answer, for reference_* scorers and win-rate")
    meta_columns: list[str] = Field(default_factory=list, description="passed to the reward in Prompt.meta")
    template: str | None = Field(None, description="str.format template over the row, e.g. '{question}\\nanswer:'")
    chat_template: bool = Field(False, description="wrap the prompt as a user turn with the tokenizer's chat template")
    system_prompt: str | None = Field(None, description="a system turn before the user turn (chat_template only)")
    shuffle: bool = Field(True, description="reshuffle every epoch by (seed, epoch); false = file order")
    max_prompt_tokens: int = Field(64, ge=2, description="longer prompts are dropped (or truncated) and counted")
    too_long: Literal["drop", "truncate"] = Field("drop", description="truncate keeps BOS and the last tokens")
    eval_path: str | None = Field(None, description="held-out prompts (same columns); default: eval_fraction of path")
    eval_split: str | None = Field(None, description="split of eval_path to read (hub or saved DatasetDict); "
                                                     "default: split")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="share of path held out by a hash of the prompt text")

    @field_validator("template")
    @classmethod
    def _template(cls, template: str | None) -> str | None:
        try:
            fields = template_fields(template)
        except ValueError as exc:  # str.format's parser: e.g. "expected '}' before end of string"
            raise ValueError(f"task.dataset.template: {exc} in {template!r}; write a column as {{name}} "
                             f"and a literal brace as {{{{ or }}}}") from None
        if any(not f or f.isdigit() for f in fields):
            raise ValueError(f"task.dataset.template: positional field in {template!r}; name a column, e.g. "
                             f"{{question}}")
        return template

    @model_validator(mode="after")
    def _eval(self, info: ValidationInfo) -> "DatasetConfig":
        if environment_checks(info):
            check_source("task.dataset.path", self.path, self.format)
        if self.eval_path is not None and environment_checks(info):
            check_source("task.dataset.eval_path", self.eval_path, self.format)
        self._check_eval_is_held_out()
        self._check_field()
        if self.eval_path is None and self.eval_fraction == 0:
            raise ValueError("task.dataset: no evaluation set; set task.dataset.eval_path or "
                             "task.dataset.eval_fraction > 0")
        if self.system_prompt is not None and not self.chat_template:
            raise ValueError("task.dataset.system_prompt needs task.dataset.chat_template=true")
        return self

    @property
    def eval_source_split(self) -> str:
        return self.eval_split if self.eval_split is not None else self.split

    def _check_field(self) -> None:
        """A key only a single JSON document has: on any other source it would be ignored, and the rows read
        would not be the ones the config means."""
        sources = [self.path] + ([self.eval_path] if self.eval_path is not None else [])
        if self.field is None or any(source_format(s, self.format) == "json" for s in sources):
            return
        raise ValueError(f"task.dataset.field: only a .json file holds its rows under a key, and "
                         f"'{self.path}' is read as {source_format(self.path, self.format)}; unset task.dataset.field")

    def _check_eval_is_held_out(self) -> None:
        """Evaluating on prompts the policy trains on would report memorisation as progress. A file has one
        split (`split` only picks among a hub dataset's or a saved DatasetDict's), so the same file is the
        same rows whatever the splits say."""
        if self.eval_path is None or not same_source(self.path, self.eval_path):
            return
        if source_format(self.path, self.format) in FILE_FORMATS:
            what = (f"shares files with task.dataset.path ('{self.eval_path}', '{self.path}')"
                    if any(c in self.path + self.eval_path for c in GLOB_CHARS) else
                    f"is the train file '{self.eval_path}'")
            raise ValueError(f"task.dataset.eval_path {what}: evaluation must be on held-out prompts; give another "
                             "file, or unset it to hold out task.dataset.eval_fraction")
        if self.eval_source_split == self.split:
            raise ValueError(f"task.dataset.eval_path reads the train split ('{self.eval_path}', split "
                             f"'{self.split}'): "
                             f"evaluation must be on held-out prompts; set task.dataset.eval_split, e.g. test")


class TaskConfig(Strict):
    """The prompt source: an embedded task (async_rlhf/tasks/builtin.py), `sort` digits or `arith`
    multi-step word problems, or `dataset`, your own prompts (task.dataset).

    The digit knobs apply to sort only, the step and operand knobs to arith only.
    """

    name: TaskName = "sort"
    dataset: DatasetConfig | None = Field(None, description="required when name=dataset")
    min_digits: int = Field(4, ge=1, le=32, description="sort: shortest digit string")
    max_digits: int = Field(7, ge=2, le=32, description="sort: longest digit string")
    min_steps: int = Field(2, ge=1, le=6, description="arith: fewest operations (solution lines) per problem")
    max_steps: int = Field(3, ge=1, le=6, description="arith: most operations per problem")
    min_operand: int = Field(1, ge=1, le=49, description="arith: smallest start value / operand")
    max_operand: int = Field(9, ge=1, le=49, description="arith: largest start value / operand (values stay <= 99)")
    eval_prompts: int = Field(128, ge=1, description="size of the eval set (dataset: at most this many)")

    @model_validator(mode="after")
    def _range(self) -> "TaskConfig":
        if (self.name == "dataset") != (self.dataset is not None):
            raise ValueError("task.dataset is required when task.name=dataset, and only then")
        for low, high in (("min_digits", "max_digits"), ("min_steps", "max_steps"), ("min_operand", "max_operand")):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(
                    f"task.{low} ({getattr(self, low)}) must be <= task.{high} ({getattr(self, high)})"
                )
        return self

    @property
    def shape(self) -> TaskShape:
        return TASK_SHAPES[self.name]

    @property
    def max_prompt_tokens(self) -> int:
        """Longest prompt of this task in tokens, BOS included."""
        return self.shape.max_prompt_tokens(self)

    @property
    def max_answer_tokens(self) -> int:
        """Longest correct completion of this task in tokens, EOS included."""
        return self.shape.max_answer_tokens(self)


# Defaults that differ by task, filled in (RunConfig._task_defaults) under every key the config
# leaves unset; the sort task uses the class defaults. The arith warm start needs a third layer
# (with a narrower MLP, to pay for it) and more, smaller updates to learn to copy operands and add
# within ~80 s on 2 cores; its prompts and worked solutions need a longer context.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "arith": {
        "model": {"embedded": {
            "num_layers": 3, "intermediate_size": 256, "sft_batch_size": 32, "sft_steps": 700,
            "sft_correct_fraction": 0.5,
        }},
        "generation": {"max_new_tokens": 40, "max_model_len": 128},
        "reward": {"train": "arith_partial", "gold": "arith_exact"},
    },
}
