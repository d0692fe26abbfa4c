"""The sort task, its scorers and the character-level tokenizer, with hand-worked numbers."""
from __future__ import annotations

import json

import pytest

from async_rlhf.config.base import ConfigError
from async_rlhf.config.task import TaskConfig
from async_rlhf.config.task_shapes import TASK_SHAPES
from async_rlhf.policies.embedded import build_tokenizer
from async_rlhf.rollout import Prompt
from async_rlhf.tasks.builtin import (
    EVAL_ID_OFFSET,
    GENERIC_TOKENIZERS,
    TASKS,
    SortTask,
    _tokenizer_loader,
    is_eval_digits,
    load_tokenizer,
    tokenizer_class_name,
)
from reward_models.rules import SCORER_TASK, SCORERS, sort_exact, sort_partial


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def sort_prompt(digits: str) -> Prompt:
    return Prompt(0, digits + ">", [], {"digits": digits, "answer": "".join(sorted(digits))})


# --- tokenizer -----------------------------------------------------------------------------

def test_tokenizer_ids_and_specials(tok) -> None:
    assert len(tok) == 14
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    # BOS is prepended; "0".."9" are ids 3..12 and ">" is 13.
    assert tok("3914>")["input_ids"] == [1, 6, 12, 4, 7, 13]


def test_tokenizer_round_trip(tok) -> None:
    for text in ["0123456789>", "3914>1349", "7", "99>"]:
        ids = tok(text)["input_ids"]
        assert len(ids) == len(text) + 1
        assert tok.decode(ids, skip_special_tokens=True) == text
    # A completion as a generator returns it: digits then EOS, which decoding drops.
    assert tok.decode([4, 6, 7, 12, 2], skip_special_tokens=True) == "1349"


def test_tokenizer_reloads_identically(tok, tmp_path) -> None:
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("3914>")["input_ids"] == tok("3914>")["input_ids"]
    assert again.eos_token_id == tok.eos_token_id and again.pad_token_id == tok.pad_token_id


def test_load_tokenizer_reads_a_generic_tokenizer_as_autotokenizer_does(tok, tmp_path) -> None:
    """The embedded policy's class is loaded directly (start-up: no AutoTokenizer import), with the result
    AutoTokenizer gives; any other class still goes through AutoTokenizer."""
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    assert tokenizer_class_name(tmp_path) in GENERIC_TOKENIZERS
    direct, auto = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert type(direct) is type(auto)
    for text in ["3914>", "0123456789>1", "7"]:
        assert direct(text)["input_ids"] == auto(text)["input_ids"]
    same = ("bos_token_id", "eos_token_id", "pad_token_id", "padding_side", "model_max_length")
    assert [getattr(direct, k) for k in same] == [getattr(auto, k) for k in same]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "GPT2Tokenizer"}))
    assert _tokenizer_loader(tmp_path) is AutoTokenizer


def test_load_tokenizer_of_a_broken_generic_tokenizer_is_one_line(tok, tmp_path) -> None:
    tok.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"cannot load the tokenizer in .*") as err:
        load_tokenizer(tmp_path)
    assert "\n" not in str(err.value)


# --- task ----------------------------------------------------------------------------------

def test_prompts_are_deterministic_by_index(tok) -> None:
    a, b = SortTask(TaskConfig(), tok, seed=3), SortTask(TaskConfig(), tok, seed=3)
    stream = [a.prompt(i) for i in range(50)]
    # Resuming at index 37 on a fresh object gives exactly what the first stream had there.
    assert b.prompt(37) == stream[37]
    assert [b.train_prompt(i) for i in range(50)] == stream
    other_seed = SortTask(TaskConfig(), tok, seed=4)
    assert [p.text for p in stream] != [other_seed.prompt(i).text for i in range(50)]


def test_prompt_contents(tok) -> None:
    cfg = TaskConfig(min_digits=3, max_digits=5)
    task = SortTask(cfg, tok, seed=0)
    lengths = set()
    for i in range(300):
        p = task.prompt(i)
        digits = p.meta["digits"]
        lengths.add(len(digits))
        assert p.prompt_id == i and p.text == digits + ">"
        assert p.meta["answer"] == "".join(sorted(digits))
        assert p.token_ids == tok(p.text)["input_ids"] and p.token_ids[0] == tok.bos_token_id
    assert lengths == {3, 4, 5}


def test_eval_disjoint_from_train(tok) -> None:
    cfg = TaskConfig(min_digits=2, max_digits=4, eval_prompts=64)  # a small space makes collisions likely
    evals = SortTask(cfg, tok, seed=0).eval_prompts()
    assert len(evals) == 64 and all(is_eval_digits(p.meta["digits"]) for p in evals)
    eval_digits = {p.meta["digits"] for p in evals}
    for seed in (0, 1):  # the split is by content, so no train seed reaches the eval set
        train = {SortTask(cfg, tok, seed).prompt(i).meta["digits"] for i in range(3000)}
        assert not train & eval_digits
    assert min(p.prompt_id for p in evals) >= EVAL_ID_OFFSET
    assert evals == SortTask(cfg, tok, seed=0).eval_prompts()  # the eval set is fixed


def test_rejects_single_digit_task(tok) -> None:
    with pytest.raises(ValueError, match="max_digits"):
        SortTask(TaskConfig(min_digits=1, max_digits=1), tok, seed=0)


# --- scorers -------------------------------------------------------------------------------

def test_exact_answer_scores_one() -> None:
    p = sort_prompt("3914")
    assert sort_exact(p, "1349") == 1.0 and sort_partial(p, "1349") == 1.0
    assert sort_exact(p, " 1349\n") == 1.0 and sort_exact(p, "1349</s>") == 1.0


def test_partial_credit_hand_worked() -> None:
    p = sort_prompt("3914")  # answer 1349
    # Adjacent swap: 2/4 positions, same multiset, not ordered -> 0.6*0.5 + 0.2 = 0.5
    assert sort_partial(p, "1439") == pytest.approx(0.5)
    # Dropped digit: 3/4 positions, wrong multiset, ordered -> 0.6*0.75 + 0.2 = 0.65
    assert sort_partial(p, "134") == pytest.approx(0.65)
    # Duplicated digit: 3/5 positions (longer length counts), ordered -> 0.6*0.6 + 0.2 = 0.56
    assert sort_partial(p, "13449") == pytest.approx(0.56)
    # Unsorted echo of the input: 0/4 positions, same multiset -> 0.2
    assert sort_partial(p, "3914") == pytest.approx(0.2)
    for text in ("1439", "134", "13449", "3914"):
        assert sort_exact(p, text) == 0.0


@pytest.mark.parametrize("text", ["", "   ", "abc", "13>49", "1349" * 100, "١٣٤٩", "\x00", "</s>"])
def test_garbage_scores_cleanly(text: str) -> None:
    p = sort_prompt("3914")
    partial = sort_partial(p, text)
    assert isinstance(partial, float) and 0.0 <= partial < 1.0
    assert sort_exact(p, text) == 0.0


def test_garbage_hand_worked() -> None:
    p = sort_prompt("3914")
    assert sort_partial(p, "") == 0.0
    assert sort_partial(p, "abc") == 0.0
    assert sort_partial(p, "1349" * 100) == pytest.approx(0.6 * 4 / 400)  # prefix matches; not ordered
    assert sort_partial(p, "١٣٤٩") == 0.0  # Arabic-Indic digits are not digits of the answer


def test_scorer_registry() -> None:
    registered = {k: SCORERS[k] for k in ("sort_partial", "sort_exact")}
    assert registered == {"sort_partial": sort_partial, "sort_exact": sort_exact}


def test_every_scorer_scores_a_registered_task_and_every_task_has_one() -> None:
    assert set(SCORER_TASK.values()) == set(TASK_SHAPES)


def test_task_classes_match_the_task_registry() -> None:
    """The config knows a task by its shape; the prompt streams are a class per shape, with its attributes."""
    assert set(TASKS) == set(TASK_SHAPES)
    for name, cls in TASKS.items():
        shape = TASK_SHAPES[name]
        assert (cls.name, cls.chars, cls.context_len, cls.step_end_chars) == (
            shape.name, shape.chars, shape.context_len, shape.step_end_chars)
