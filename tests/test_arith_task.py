"""The arith task (GSM8K's format in miniature): prompts, worked solutions, rewards, warm start, config."""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from async_rlhf.config.base import ConfigError
from async_rlhf.config.model import EmbeddedModelConfig
from async_rlhf.config.run import load_config
from async_rlhf.config.task import TaskConfig
from async_rlhf.config.task_shapes import TASK_SHAPES
from async_rlhf.policies.embedded import (
    build_tokenizer,
    checkpoint_name,
    ensure_embedded_policy,
    ensure_policy,
    sft_example,
)
from async_rlhf.rollout import Prompt
from async_rlhf.tasks.builtin import (
    EVAL_ID_OFFSET,
    ArithTask,
    SortTask,
    chain,
    in_eval_split,
    make_task,
    slip_for,
    solution_lines,
)
from reward_models.rules import SCORER_TASK, SCORERS, arith_exact, arith_partial
from tests.helpers import ROOT

ARITH_YAML = ROOT / "configs" / "arith.yaml"
LINE = re.compile(r"^(\d+)([+*-])(\d+)=(\d+)$")


def pydantic_choices(names) -> str:
    """How pydantic lists a Literal's values in its error: 'a', 'b' or 'c'."""
    quoted = [f"'{n}'" for n in names]
    return f"{', '.join(quoted[:-1])} or {quoted[-1]}"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("arith")


@pytest.fixture(scope="module")
def task(tok) -> ArithTask:
    return ArithTask(TaskConfig(name="arith"), tok, seed=0)


def arith_prompt(solution: str) -> Prompt:
    answer = solution.rsplit("#### ", 1)[1]
    text = "tom has 3 apples. he buys 4 more. he gives 2 away. how many?\n"
    return Prompt(0, text, [], {"answer": answer, "solution": solution})


def evaluate(line: str) -> tuple[int, int]:
    """(what the line's left side is worth, what it claims)."""
    match = LINE.fullmatch(line)
    assert match is not None, line
    a, sym, n, c = match.groups()
    a, n = int(a), int(n)
    return (a + n if sym == "+" else a - n if sym == "-" else a * n), int(c)


# --- prompts and solutions -----------------------------------------------------------------------

def test_streams_are_deterministic_and_seeded(tok) -> None:
    a, b = ArithTask(TaskConfig(name="arith"), tok, seed=3), ArithTask(TaskConfig(name="arith"), tok, seed=3)
    assert [a.prompt(i) for i in range(20)] == [b.prompt(i) for i in range(20)]
    assert a.eval_prompts() == b.eval_prompts()
    other = ArithTask(TaskConfig(name="arith"), tok, seed=4)
    assert [a.prompt(i).text for i in range(20)] != [other.prompt(i).text for i in range(20)]
    assert a.prompt(7) == a.train_prompt(7) and a.prompt(7).prompt_id == 7
    assert a.eval_prompts()[0].prompt_id == EVAL_ID_OFFSET
    with pytest.raises(ValueError, match="train prompt index"):
        a.train_prompt(EVAL_ID_OFFSET)


def test_hand_checked_problem(task) -> None:
    # The first warm-start problem of seed 0, checked by hand: 6 - 1 = 5, 5 * 2 = 10.
    p = task.sft_target(0, 1.0)[0]
    assert p.text == "sue has 6 eggs. she gives 1 away. she doubles them. how many?\n"
    assert p.meta == {"answer": "10", "solution": "6-1=5\n5*2=10\n#### 10", "key": "6-1*2"}
    assert solution_lines(3, (("+", 4), ("-", 2))) == ["3+4=7", "7-2=5", "#### 5"]


WIDE = TaskConfig(name="arith", min_steps=1, max_steps=6, max_operand=49)


@pytest.mark.parametrize("cfg", [TaskConfig(name="arith"), WIDE])
def test_format_of_prompts_and_solutions(cfg: TaskConfig, tok) -> None:
    task = ArithTask(cfg, tok, seed=0)
    for p in [task.prompt(i) for i in range(300)] + task.eval_prompts()[:50]:
        assert re.fullmatch(r"[a-z]{3} has \d+ [a-z]+\.( [a-z .\d]+\.)+ how many\?\n", p.text), p.text
        assert p.token_ids[0] == tok.bos_token_id and len(p.token_ids) == len(p.text) + 1
        assert len(p.token_ids) <= cfg.max_prompt_tokens
        *steps, final = p.meta["solution"].split("\n")
        assert cfg.min_steps <= len(steps) <= cfg.max_steps and len(steps) == p.text.count(".") - 1
        value = None
        for line in steps:
            worth, claimed = evaluate(line)
            assert worth == claimed and 0 <= claimed <= 99  # every step is right and small
            assert value is None or line.startswith(f"{value}")  # each step starts from the last result
            value = claimed
        assert final == f"#### {value}" == f"#### {p.meta['answer']}"
        assert len(p.meta["solution"]) + 1 <= cfg.max_answer_tokens  # + EOS


def test_eval_split_is_disjoint_by_arithmetic(tok) -> None:
    cfg = TaskConfig(name="arith", min_steps=1, max_steps=2, max_operand=5, eval_prompts=64)  # a small space
    evals = ArithTask(cfg, tok, seed=0).eval_prompts()
    assert all(in_eval_split(p.meta["key"]) for p in evals)
    keys = {p.meta["key"] for p in evals}
    for seed in (0, 1):
        task = ArithTask(cfg, tok, seed)
        assert not keys & {task.prompt(i).meta["key"] for i in range(2000)}
        assert not keys & {task.sft_target(i, 0.5)[0].meta["key"] for i in range(2000)}


def test_make_task_picks_the_task(tok) -> None:
    assert isinstance(make_task(TaskConfig(name="arith"), tok, 0), ArithTask)
    assert isinstance(make_task(TaskConfig(), build_tokenizer(), 0), SortTask)


# --- tokenizer -----------------------------------------------------------------------------------

def test_tokenizer_round_trips_every_character_the_task_emits(task, tok) -> None:
    texts = [task.prompt(i).text for i in range(500)] + [task.sft_target(i, 0.3)[1] for i in range(500)]
    emitted = set("".join(texts))
    assert emitted <= set(ArithTask.chars) and {"\n", "#", "+", "-", "*", "=", " ", ".", "?"} <= emitted
    assert len(tok) == 3 + len(ArithTask.chars) and len(set(ArithTask.chars)) == len(ArithTask.chars)
    for text in [*texts[:50], ArithTask.chars]:
        ids = tok(text)["input_ids"]
        assert len(ids) == len(text) + 1 and tok.pad_token_id not in ids  # nothing unknown
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok("#### 5")["input_ids"][1:] + [tok.eos_token_id], skip_special_tokens=True) == "#### 5"


def test_sort_tokenizer_is_unchanged() -> None:
    sort = build_tokenizer()
    assert len(sort) == 14 and sort("3914>")["input_ids"] == [1, 6, 12, 4, 7, 13]
    assert (sort.pad_token_id, sort.bos_token_id, sort.eos_token_id) == (0, 1, 2)
    arith = build_tokenizer("arith")
    assert (arith.pad_token_id, arith.bos_token_id, arith.eos_token_id) == (0, 1, 2)


# --- rewards -------------------------------------------------------------------------------------

GOLD = "3+4=7\n7-2=5\n#### 5"


def test_exact_reward_hand_examples() -> None:
    p = arith_prompt(GOLD)
    assert arith_exact(p, GOLD) == 1.0
    assert arith_exact(p, "#### 5") == 1.0  # only the final answer counts
    assert arith_exact(p, " 3+4=7\n7-2=5\n#### 5 \n") == 1.0 and arith_exact(p, GOLD + "</s>") == 1.0
    assert arith_exact(p, "####5") == 1.0 and arith_exact(p, "#### 05") == 1.0  # the number, not its spelling
    assert arith_exact(p, "3+4=8\n8-2=6\n#### 6") == 0.0  # wrong answer
    assert arith_exact(p, "3+4=7\n7-2=5") == 0.0  # no "####"
    assert arith_exact(p, "3+4=7\n7-2=5\n5") == 0.0
    assert arith_exact(p, "#### 5 apples") == 0.0 and arith_exact(p, "#### 5\n#### 6") == 0.0  # not exactly a number


@pytest.mark.parametrize(
    "text", ["", "   ", "abc", "####", "#### ", "#### -", "#### ５", "#### ٥", "\x00", "</s>", "#" * 500]
)
def test_garbage_scores_zero(text: str) -> None:
    p = arith_prompt(GOLD)
    assert arith_exact(p, text) == 0.0
    partial = arith_partial(p, text)
    assert isinstance(partial, float) and partial == 0.0


def test_partial_reward_hand_worked() -> None:
    p = arith_prompt(GOLD)  # gold steps: "3+4=7", "7-2=5"; answer 5
    assert arith_partial(p, GOLD) == 1.0
    # First step right, second slipped, wrong answer: 0.5 * 1/2 + 0.5 * 0 = 0.25.
    assert arith_partial(p, "3+4=7\n7-2=6\n#### 6") == pytest.approx(0.25)
    # The slip propagates from step 1: no step matches -> 0.
    assert arith_partial(p, "3+4=8\n8-2=6\n#### 6") == 0.0
    # Right answer without work: 0.5 * 0/2 + 0.5 = 0.5.
    assert arith_partial(p, "#### 5") == pytest.approx(0.5)
    # An extra line costs (matches over the longer count): 0.5 * 2/3 + 0.5.
    assert arith_partial(p, "3+4=7\n7-2=5\n5+0=5\n#### 5") == pytest.approx(0.5 * 2 / 3 + 0.5)
    # Steps right but truncated before the answer: 0.5 * 2/2 = 0.5.
    assert arith_partial(p, "3+4=7\n7-2=5\n") == pytest.approx(0.5)


def test_scorers_are_registered_per_task() -> None:
    assert SCORERS["arith_exact"] is arith_exact and SCORERS["arith_partial"] is arith_partial
    assert set(SCORER_TASK) == set(SCORERS)
    assert {SCORER_TASK[name] for name in ("arith_exact", "arith_partial")} == {"arith"}


# --- warm start ----------------------------------------------------------------------------------

def test_sft_targets_right_or_slipped_once(task) -> None:
    slipped = 0
    for i in range(400):
        prompt, target = task.sft_target(i, 0.4)
        assert task.sft_target(i, 0.4) == (prompt, target)  # deterministic
        if target == prompt.meta["solution"]:
            continue
        slipped += 1
        *lines, final = target.split("\n")
        gold_lines = prompt.meta["solution"].split("\n")[:-1]
        wrong = [j for j, line in enumerate(lines) if evaluate(line)[0] != evaluate(line)[1]]
        assert len(wrong) == 1  # exactly one arithmetic slip ...
        j = wrong[0]
        assert lines[:j] == gold_lines[:j] and abs(evaluate(lines[j])[1] - evaluate(lines[j])[0]) in (1, 2)
        for before, after in zip(lines[j:], lines[j + 1:]):  # ... carried into every later step
            assert after.startswith(before.rsplit("=", 1)[1])
        assert final == f"#### {evaluate(lines[-1])[1]}" != f"#### {prompt.meta['answer']}"
        assert arith_exact(prompt, target) == 0.0 and min(int(x) for x in re.findall(r"\d+", target)) >= 0
    assert 0.5 < slipped / 400 < 0.7  # 1 - 0.4 of them


def test_sft_all_correct_and_example_ids(task, tok) -> None:
    for i in range(50):
        prompt, target = task.sft_target(i, 1.0)
        assert target == prompt.meta["solution"] and arith_exact(prompt, target) == 1.0
    ids, prompt_len = sft_example(task, 0, 1.0)
    assert ids[-1] == tok.eos_token_id and tok.decode(ids[prompt_len:-1]) == task.sft_target(0, 1.0)[1]
    assert ids[:prompt_len] == task.sft_target(0, 1.0)[0].token_ids


def test_slip_keeps_values_non_negative() -> None:
    import random

    rng = random.Random(0)
    ops = (("-", 3), ("-", 4))  # 7 - 3 = 4, 4 - 4 = 0: a slip of -1 or -2 would go negative
    for _ in range(50):
        step, delta = slip_for(7, ops, rng)
        values = chain(7, ops, (step, delta))
        assert min(values) >= 0 and delta != 0 and values[-1] != 0


SMALL = EmbeddedModelConfig(sft_steps=4, sft_batch_size=4)


def test_ensure_policy_builds_and_loads_arith(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task_cfg = TaskConfig(name="arith")
    assert checkpoint_name(SMALL, task_cfg) != checkpoint_name(SMALL, TaskConfig())  # the task is in the hash
    assert checkpoint_name(SMALL, task_cfg) != checkpoint_name(SMALL, TaskConfig(name="arith", max_steps=4))
    assert checkpoint_name(SMALL, task_cfg) == checkpoint_name(SMALL, TaskConfig(name="arith", max_digits=9))
    run: Any = SimpleNamespace(model=SimpleNamespace(source="embedded", embedded=SMALL, cache_dir=tmp_path),
                               task=task_cfg)  # duck-typed RunConfig: only the fields ensure_policy reads
    path = ensure_policy(run, log=lambda m: None)
    assert path == ensure_embedded_policy(SMALL, task_cfg, tmp_path, log=lambda m: None)  # cached
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size == len(tok) == 3 + len(ArithTask.chars)
    assert model.config.max_position_embeddings == ArithTask.context_len
    prompt = ArithTask(task_cfg, tok, seed=0).eval_prompts()[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt.token_ids])).logits
    assert logits.shape == (1, len(prompt.token_ids), len(tok)) and torch.isfinite(logits).all()
    assert '"name": "arith"' in (path / "recipe.json").read_text()


# --- config --------------------------------------------------------------------------------------

def test_arith_config_validates() -> None:
    cfg = load_config(ARITH_YAML)
    assert cfg.task.name == "arith" and cfg.reward.train == "arith_partial" and cfg.reward.gold == "arith_exact"
    assert cfg.task.max_prompt_tokens + cfg.generation.max_new_tokens <= cfg.generation.max_model_len
    assert cfg.generation.max_new_tokens >= cfg.task.max_answer_tokens


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["reward.train=sort_partial"], "reward.train: scorer 'sort_partial' does not score task 'arith'; "
                                        "valid for arith: arith_exact, arith_partial"),
        (["reward.gold=sort_exact"], "reward.gold: scorer 'sort_exact' does not score task 'arith'"),
        (["task.name=sort"], "reward.train: scorer 'arith_partial' does not score task 'sort'; "
                             "valid for sort: sort_exact, sort_partial"),
        (["task.name=chess"], f"task.name: Input should be {pydantic_choices(TASK_SHAPES)} (got 'chess')"),
        (["task.min_steps=4", "task.max_steps=2"], "task.min_steps (4) must be <= task.max_steps (2)"),
        (["task.min_operand=9", "task.max_operand=3"], "task.min_operand (9) must be <= task.max_operand (3)"),
        (["task.max_operand=50"], "task.max_operand: Input should be less than or equal to 49"),
        (["generation.max_model_len=96"], "generation.max_model_len (96) is shorter than the longest prompt"),
        (["generation.max_new_tokens=20"], "generation.max_new_tokens (20) is shorter than the longest correct answer"),
        (["generation.max_model_len=512"], "exceeds the embedded model's context for task 'arith' (256)"),
        (["reward.train=nope"], "reward.train: unknown scorer 'nope'; valid: arith_exact"),
    ],
)
def test_bad_arith_config_is_one_line(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(ARITH_YAML, overrides)
    message = str(err.value)
    assert expected in message and "\n" not in message


def test_arith_gets_its_own_defaults_and_sort_keeps_its_own() -> None:
    arith = load_config(None, ["task.name=arith"])  # nothing else set: TASK_DEFAULTS["arith"] fills in
    assert (arith.reward.train, arith.reward.gold) == ("arith_partial", "arith_exact")
    assert (arith.generation.max_new_tokens, arith.generation.max_model_len) == (40, 128)
    emb = arith.model.embedded
    assert (emb.num_layers, emb.intermediate_size, emb.sft_steps, emb.sft_batch_size) == (3, 256, 700, 32)
    assert emb.hidden_size // emb.num_heads == 64  # vLLM's CPU attention head size
    assert load_config(None, ["task.name=arith", "model.embedded.num_layers=2"]).model.embedded.num_layers == 2
    sort = load_config(None)
    assert sort.model.embedded == EmbeddedModelConfig() and sort.reward.train == "sort_partial"
    # The cached sort policy keeps its name (and so stays valid).
    assert checkpoint_name(sort.model.embedded, sort.task) == "embedded-8da39cd4996e8aa7"


def test_sort_config_checks_count_bos_and_answer() -> None:
    # Sort: BOS + 7 digits + ">" = 9 prompt tokens; 7 digits + EOS = 8 answer tokens.
    assert TaskConfig().max_prompt_tokens == 9 and TaskConfig().max_answer_tokens == 8
    with pytest.raises(ConfigError, match=r"generation.max_new_tokens \(7\) is shorter than the longest correct"):
        load_config(None, ["generation.max_new_tokens=7"])
