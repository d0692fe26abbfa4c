"""Your own prompts (`task.name: dataset`): read through HF `datasets`, mapped, templated, filtered.

Sources: a .jsonl / .json / .csv / .parquet file, a directory written by `save_to_disk`, or a hub
dataset name (when the machine can reach the hub). Each row becomes a `Prompt`: its text is the
`prompt_column` (or `template.format(**row)`), optionally wrapped as a user turn by the tokenizer's
chat template (a `prompt_column` of conversations, TRL's conversational form, is always rendered by it);
`reference_column` goes to `meta["reference"]`, `meta_columns` to `meta` under their own names, so rule
scorers and the remote reward see them, and so do the columns the run's reward functions in TRL's form take
(`RewardColumns`: the pipeline finds them in their signatures, as TRL would pass them).

Rows are checked once, when the task is built (before any worker starts): empty or malformed rows
are skipped, prompts longer than `max_prompt_tokens` dropped (or truncated), prompts with tokens
the tokenizer does not know (its unk token) dropped; each is counted (`DataStats`).

The train stream is a pure function of (seed, index): index i is row `perm_e[i mod n]` of epoch
`e = i // n`, where `perm_e` is a permutation drawn from (seed, e). A run resumes from any index
without stored state, sees every row once per epoch, and each epoch in a new order.

The eval set is `eval_path` (its `eval_split` for a hub or saved dataset; never the train rows: the
config refuses the train file or split), or the rows whose prompt text hashes below `eval_fraction` (a fixed,
seed-independent hash of the content, so identical prompts never straddle the split).
"""
from __future__ import annotations

import hashlib
import math
import random
from array import array
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any, ClassVar, NamedTuple

from async_rlhf.config.base import ConfigError
from async_rlhf.config.task import DatasetConfig, TaskConfig, template_fields
from async_rlhf.config.task_shapes import TASK_SHAPES
from async_rlhf.rollout import CONVERSATION, EVAL_ID_OFFSET, NO_COLUMNS, Prompt, RewardColumns
from async_rlhf.tasks.chat_turn import ChatTurn, as_conversation
from async_rlhf.tasks.json_rows import key_of_rows
from async_rlhf.tasks.sources import E, load_table

ROWS_PER_BATCH = 1024  # rows read, templated and tokenized together (per-row calls cost 3x at 1M rows)


@dataclass
class DataStats:
    """What happened to the rows of one source (printed at start, saved in summary.json)."""

    source: str
    rows: int = 0
    used: int = 0
    empty: int = 0  # prompt (or a template field) null or blank
    malformed: int = 0  # prompt (or a template field) not text, or the reference missing
    too_long: int = 0  # dropped: longer than max_prompt_tokens
    truncated: int = 0
    unknown_tokens: int = 0  # dropped: the tokenizer maps a character to its unk token
    held_out: int = 0  # rows of this source that went to the eval split

    def describe(self, limit: int) -> str:
        skipped = [f"{self.too_long} longer than {limit} tokens", f"{self.empty} empty", f"{self.malformed} malformed",
                   f"{self.unknown_tokens} with unknown tokens", f"{self.truncated} truncated"]
        counts = ", ".join(s for s in skipped if not s.startswith("0 "))
        return f"{self.rows} rows, {self.used} usable" + (f" ({counts})" if counts else "")


class DataPrint(NamedTuple):
    """A dataset task's prompts, as a resume compares them: a digest of every prompt's tokens and meta (its
    reference, meta_columns and the columns the reward functions take)."""

    digest: str
    train: int
    eval: int


@dataclass(slots=True)
class Row:
    text: str
    token_ids: array  # of int32: a quarter of a list's memory, for datasets of millions of rows
    meta: dict = field(default_factory=dict)


class RowMapper:
    """Turns table rows into prompt rows: column mapping, template, chat template, length limit."""

    def __init__(self, cfg: DatasetConfig, tokenizer: Any, reward_columns: RewardColumns = NO_COLUMNS) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.reward_columns = reward_columns
        self.carried = list(cfg.meta_columns)  # the columns of the file being read that go to Prompt.meta
        self.unk = getattr(tokenizer, "unk_token_id", None)
        if cfg.chat_template and not getattr(tokenizer, "chat_template", None):
            where = getattr(tokenizer, "name_or_path", "") or "the model directory"
            raise ConfigError(f"{E}task.dataset.chat_template: the tokenizer in '{where}' has no chat template; "
                              f"set task.dataset.chat_template=false or add one to its tokenizer_config.json")
        self.chat = ChatTurn(tokenizer, cfg.system_prompt) if cfg.chat_template else None
        self.conversations = self.chat  # made at the first conversation where chat_template is off

    def use_columns(self, columns: list[str], source: str, lone_row: dict | None = None) -> None:
        """Check the columns the config names against a file's, and carry those its rewards take. `lone_row`:
        the file's row where it has only one (a JSON document whose rows sit under a key)."""
        self.check_columns(columns, source, lone_row)
        prompt_column = self.cfg.prompt_column if self.cfg.template is None else None
        taken = [c for c in columns if self.reward_columns.wants(c, prompt_column) and c not in self.cfg.meta_columns]
        self.carried = [*self.cfg.meta_columns, *taken]

    def check_columns(self, columns: list[str], source: str, lone_row: dict | None = None) -> None:
        cfg = self.cfg
        named = [("prompt_column", cfg.prompt_column)] if cfg.template is None else []
        named += [("reference_column", cfg.reference_column)] if cfg.reference_column else []
        named += [("meta_columns", c) for c in cfg.meta_columns]
        named += [("template", f) for f in template_fields(cfg.template)]
        for key, column in named:
            if column not in columns:
                under = key_of_rows(lone_row, column) if lone_row else None
                hint = f"; its rows sit under '{under}': set task.dataset.field={under}" if under else ""
                raise ConfigError(f"{E}task.dataset.{key}: no column '{column}' in '{source}' "
                                  f"(columns: {', '.join(columns)}){hint}")

    def text(self, row: dict) -> tuple[str | None, str]:
        """The prompt text of a row, or None and why: `empty` (null or blank) or `malformed` (not text); a
        conversation comes rendered by the chat template, why `rendered`."""
        template = self.cfg.template
        values = [row[f] for f in template_fields(template)] if template else [row[self.cfg.prompt_column]]
        turns = None if template else as_conversation(values[0])
        if turns is not None:
            return self._rendered(turns)
        if any(_missing(v) or (isinstance(v, str) and not v.strip()) for v in values):
            return None, "empty"
        if any(_as_text(v) is None for v in values):
            return None, "malformed"
        try:
            text = self.cfg.template.format(**row) if self.cfg.template else _as_text(values[0])
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):  # e.g. {n:d} on a text value
            return None, "malformed"
        return (text, "") if text and text.strip() else (None, "empty")

    def _rendered(self, turns: list[dict[str, str]]) -> tuple[str | None, str]:
        """A conversation through the chat template (malformed where the template refuses it, as one whose roles
        do not alternate)."""
        if self.conversations is None:
            if not getattr(self.tokenizer, "chat_template", None):
                where = getattr(self.tokenizer, "name_or_path", "") or "the model directory"
                raise ConfigError(f"{E}task.dataset.prompt_column: '{self.cfg.prompt_column}' holds conversations "
                                  f"(lists of role/content turns) and the tokenizer in '{where}' has no chat "
                                  "template to render them; add one to its tokenizer_config.json, or give plain-"
                                  "text prompts")
            self.conversations = ChatTurn(self.tokenizer, self.cfg.system_prompt)
        try:
            return self.conversations.conversation(turns), "rendered"
        except Exception:  # noqa: BLE001  # jinja's errors, and the template's own raise_exception
            return None, "malformed"

    def checked(self, row: dict, stats: DataStats) -> tuple[str, str, bool] | None:
        """The row's prompt text, its reference and whether the text is rendered by the chat template already
        (a conversation), or None with the reason counted in `stats`."""
        text, why = self.text(row)
        reference = _reference_text(row[self.cfg.reference_column]) if self.cfg.reference_column else ""
        if text is None:
            setattr(stats, why, getattr(stats, why) + 1)
            return None
        if reference is None or (self.cfg.reference_column and not reference.strip()):
            stats.malformed += 1  # a reference scorer could not score it
            return None
        return text, reference, why == "rendered"

    def encode(self, texts: list[str], rendered: list[bool]) -> tuple[list[str], list[list[int]]]:
        """The prompts as the policy sees them, and their token ids: one tokenizer call for the plain texts, one
        for those a chat template wrote (it writes BOS, if any, itself: encoding must not add another)."""
        if self.chat is not None:  # plain texts become user turns: then every text is templated
            texts, rendered = self._wrapped(texts, rendered), [True] * len(texts)
        ids: list[list[int]] = [[] for _ in texts]
        for templated in (False, True):
            rows = [i for i, done in enumerate(rendered) if done == templated]
            for i, row_ids in zip(rows, self.token_ids([texts[i] for i in rows], special=not templated)):
                ids[i] = row_ids
        return texts, ids

    def _wrapped(self, texts: list[str], rendered: list[bool]) -> list[str]:
        assert self.chat is not None  # the caller checks it
        plain = [i for i, done in enumerate(rendered) if not done]
        out = list(texts)
        for i, wrapped in zip(plain, self.chat.wrap([texts[i] for i in plain])):
            out[i] = wrapped
        return out

    def token_ids(self, texts: list[str], special: bool) -> list[list[int]]:
        """What `tokenizer(texts)` gives; straight from the Rust tokenizer when nothing in it would differ
        (a third less time: no offsets, no per-row conversion)."""
        if not texts:
            return []
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or backend.truncation is not None or backend.padding is not None:
            return self.tokenizer(texts, add_special_tokens=special)["input_ids"]
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=special)]

    def map_batch(self, rows: list[dict], first: int, stats: DataStats) -> list[Row]:
        """The usable prompt rows of table rows `first`, `first + 1`, ...; the others counted in `stats`."""
        kept = [(index, row, found) for index, row in enumerate(rows, first)
                if (found := self.checked(row, stats)) is not None]
        texts, ids = self.encode([found[0] for _, _, found in kept], [found[2] for _, _, found in kept])
        mapped = (self.finish(index, row, found[1], text, tokens, stats)
                  for (index, row, found), text, tokens in zip(kept, texts, ids))
        return [r for r in mapped if r is not None]

    def finish(self, index: int, row: dict, reference: str, text: str, ids: list[int],
               stats: DataStats) -> Row | None:
        """A usable prompt row, or None (unknown tokens, too long) with the reason counted in `stats`."""
        if self.unk is not None and self.unk in ids:
            stats.unknown_tokens += 1
            return None
        if len(ids) > self.cfg.max_prompt_tokens:
            if self.cfg.too_long == "drop":
                stats.too_long += 1
                return None
            text, ids = self._truncate(ids)
            stats.truncated += 1
        meta = {"row": index, **{c: row[c] for c in self.carried}}
        if (turns := None if self.cfg.template else as_conversation(row[self.cfg.prompt_column])) is not None:
            meta[CONVERSATION] = turns  # a reward function in TRL's form takes a conversation as its turns
        if self.cfg.reference_column:
            meta["reference"] = reference
        return Row(text, array("i", ids), meta)

    def _truncate(self, ids: list[int]) -> tuple[str, list[int]]:
        """Keep BOS (when the prompt starts with it) and the last tokens: the end of a prompt (the
        question, the chat template's generation prompt) matters most for what comes next."""
        limit = self.cfg.max_prompt_tokens
        bos = getattr(self.tokenizer, "bos_token_id", None)
        head = ids[:1] if bos is not None and ids[0] == bos else []
        kept = head + ids[len(ids) - (limit - len(head)):]
        return self.tokenizer.decode(kept, skip_special_tokens=True), kept


def as_rows(columns: dict[str, list]) -> list[dict]:
    """A slice of a table (its columns) as rows."""
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, list) and not value)


def _as_text(value: Any) -> str | None:
    """Text as is; numbers (e.g. a CSV column of digits) as their str(); anything else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not _missing(value):
        return str(value)
    return None


def _reference_text(value: Any) -> str | None:
    """A reference as text; one in conversational form (TRL's prompt-completion datasets: the completion as a list
    of assistant turns) is its last turn's content."""
    turns = as_conversation(value)
    return turns[-1]["content"] if turns is not None else _as_text(value)


def in_eval_fraction(text: str, fraction: float) -> bool:
    """A fixed hash of the prompt text, uniform in [0, 1), below `fraction`."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64 < fraction


class DatasetTask:
    """Train and eval prompt streams over a user's dataset (the `Task` protocol of builtin.py)."""

    name: ClassVar[str] = "dataset"
    chars: ClassVar[str] = TASK_SHAPES[name].chars  # "": the policy brings its own tokenizer
    context_len: ClassVar[int] = TASK_SHAPES[name].context_len  # the embedded model cannot run this task
    step_end_chars: ClassVar[str] = TASK_SHAPES[name].step_end_chars

    def __init__(self, task_cfg: TaskConfig, tokenizer: Any, seed: int,
                 reward_columns: RewardColumns = NO_COLUMNS) -> None:
        assert task_cfg.dataset is not None  # TaskConfig guarantees it for name=dataset
        self.cfg = task_cfg
        self.data = task_cfg.dataset
        self.tokenizer = tokenizer
        self.seed = seed
        self.mapper = RowMapper(self.data, tokenizer, reward_columns)
        self.stats: list[DataStats] = []
        self.train, self.eval = self._load_splits()

    # ---- the Task protocol's static side (its size bounds: async_rlhf/config/task_shapes.py) --------
    @staticmethod
    def recipe(task_cfg: TaskConfig) -> dict:
        raise ValueError("task.name=dataset has no embedded warm start; use model.source=local")

    def sft_target(self, index: int, correct_fraction: float) -> tuple[Prompt, str]:
        raise ValueError("task.name=dataset has no embedded warm start; use model.source=local")

    # ---- loading --------------------------------------------------------------------------
    def _read(self, path: str, split: str, split_key: str) -> tuple[list[Row], DataStats]:
        table = load_table(path, self.data.format, split, split_key, field=self.data.field)
        self.mapper.use_columns(list(table.column_names), path, table[0] if len(table) == 1 else None)
        stats = DataStats(path, rows=len(table))
        rows: list[Row] = []
        for first in range(0, len(table), ROWS_PER_BATCH):
            rows += self.mapper.map_batch(as_rows(table[first:first + ROWS_PER_BATCH]), first, stats)
        stats.used = len(rows)
        self.stats.append(stats)
        return rows, stats

    def _load_splits(self) -> tuple[list[Row], list[Row]]:
        rows, stats = self._read(self.data.path, self.data.split, "task.dataset.split")
        self._require(rows, stats, "task.dataset.path")
        if self.data.eval_path is not None:
            key = "task.dataset.split" if self.data.eval_split is None else "task.dataset.eval_split"
            evals, eval_stats = self._read(self.data.eval_path, self.data.eval_source_split, key)
            self._require(evals, eval_stats, "task.dataset.eval_path")
            return rows, evals[: self.cfg.eval_prompts]
        held_out = [in_eval_fraction(r.text, self.data.eval_fraction) for r in rows]
        train = [r for r, out in zip(rows, held_out) if not out]
        evals = [r for r, out in zip(rows, held_out) if out]
        stats.held_out = len(evals)
        if not evals:
            raise ConfigError(f"{E}task.dataset.eval_fraction: no prompt of '{self.data.path}' fell in the eval "
                              f"split ({len(rows)} usable); raise it or give task.dataset.eval_path")
        if not train:
            raise ConfigError(f"{E}task.dataset.eval_fraction: every usable prompt of '{self.data.path}' fell in the "
                              f"eval split ({len(rows)} usable); lower it or give task.dataset.eval_path")
        return train, evals[: self.cfg.eval_prompts]

    def _require(self, rows: list[Row], stats: DataStats, key: str) -> None:
        if not rows:
            raise ConfigError(f"{E}{key}: no usable prompts in '{stats.source}' after filtering "
                              f"({stats.describe(self.data.max_prompt_tokens)})")

    def describe(self) -> str:
        """One line for the run's log: what was read and what was skipped."""
        parts = [f"'{s.source}': {s.describe(self.data.max_prompt_tokens)}" for s in self.stats]
        return f"dataset {'; '.join(parts)}; {len(self.train)} train, {len(self.eval)} eval prompts"

    @cached_property
    def _print(self) -> DataPrint:
        digest = hashlib.sha256()
        for row in (*self.train, *self.eval):  # ids, not text: a tokenizer or chat template change shows too
            digest.update(row.token_ids.tobytes())
            digest.update(repr(row.meta).encode())  # the reference and the columns the rewards read
        return DataPrint(digest.hexdigest()[:16], len(self.train), len(self.eval))

    def data_print(self) -> DataPrint:
        return self._print

    # ---- streams --------------------------------------------------------------------------
    def order(self, epoch: int) -> list[int]:
        return _permutation(len(self.train), self.seed, epoch, self.data.shuffle)

    def train_prompt(self, index: int) -> Prompt:
        if not 0 <= index < EVAL_ID_OFFSET:
            raise ValueError(f"train prompt index must be in [0, {EVAL_ID_OFFSET}), got {index}")
        epoch, pos = divmod(index, len(self.train))
        row = self.train[self.order(epoch)[pos]]
        return Prompt(index, row.text, list(row.token_ids), {**row.meta, "epoch": epoch})

    def prompt(self, index: int) -> Prompt:
        return self.train_prompt(index)

    def eval_prompts(self) -> list[Prompt]:
        return [Prompt(EVAL_ID_OFFSET + i, r.text, list(r.token_ids), dict(r.meta)) for i, r in enumerate(self.eval)]


@lru_cache(maxsize=4)  # a pure function: caching only saves redrawing the current epoch's order
def _permutation(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    order = list(range(n))
    if shuffle:
        random.Random(f"dataset:{seed}:{epoch}").shuffle(order)
    return order
