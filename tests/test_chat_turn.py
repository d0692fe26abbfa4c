"""A user turn of a chat template for a whole dataset (async_rlhf/tasks/chat_turn.py): the template rendered
once around a marker only where that gives what rendering every prompt gives, checked against a real
transformers tokenizer's jinja rendering; and a dataset larger than one batch read, templated and tokenized
batch by batch, equal to per-row encoding."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from async_rlhf.config.task import TaskConfig
from async_rlhf.policies.embedded import build_tokenizer
from async_rlhf.tasks import dataset
from async_rlhf.tasks.builtin import make_task
from async_rlhf.tasks.chat_turn import ChatTurn

VERBATIM = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}={{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant={% endif %}")
TRIMMED = VERBATIM.replace("m['content']", "m['content'] | trim")  # Llama 3's templates trim each turn
APART = VERBATIM.replace("{{ m['content'] }}", "{% if 'eggs' in m['content'] %}#{% endif %}{{ m['content'] }}")
TEXTS = ["tom has 3 pens", "ann has 5 cards", " sue has 2 coins \n", "bob has 7 eggs", "max has 9 books"]


@pytest.fixture()
def tokenizer():
    return build_tokenizer("arith")  # characters: digits, a-z, " .,?\n#+-*="


def rendered(tokenizer, template: str, texts: list[str], system: str | None = None) -> list[str]:
    tokenizer.chat_template = template
    turn = ChatTurn(tokenizer, system)
    return [turn.render(t) for t in texts]


@pytest.mark.parametrize("system", [None, "be brief"])
def test_a_template_that_writes_content_verbatim_is_rendered_once(tokenizer, system: str | None) -> None:
    tokenizer.chat_template = VERBATIM
    turn = ChatTurn(tokenizer, system)
    assert turn.substitutes
    assert turn.wrap(TEXTS) == rendered(tokenizer, VERBATIM, TEXTS, system)
    assert turn.wrap(TEXTS)[0] == ("<s>system=be brief\n" if system else "<s>") + "user=tom has 3 pens\nassistant="


def test_a_template_that_changes_content_is_rendered_for_every_prompt(tokenizer) -> None:
    tokenizer.chat_template = TRIMMED
    turn = ChatTurn(tokenizer, None)
    assert not turn.substitutes  # the whitespace probe comes out trimmed
    assert turn.wrap(TEXTS)[2] == "<s>user=sue has 2 coins\nassistant="


def test_a_template_that_treats_some_content_apart_stops_the_shortcut_at_the_first_batch_it_shows_in(
        tokenizer) -> None:
    tokenizer.chat_template = APART  # passes the probes: no probe mentions eggs
    turn = ChatTurn(tokenizer, None)
    assert turn.substitutes
    assert turn.wrap(TEXTS[:3]) == rendered(tokenizer, APART, TEXTS[:3])
    assert turn.wrap(TEXTS[3:]) == rendered(tokenizer, APART, TEXTS[3:])  # its first prompt is rendered and differs
    assert not turn.substitutes and turn.wrap(TEXTS[3:])[0] == "<s>user=#bob has 7 eggs\nassistant="


def test_a_template_without_the_content_in_it_is_rendered_for_every_prompt(tokenizer) -> None:
    template = "{% for m in messages %}{{ m['role'] }}\n{% endfor %}"
    tokenizer.chat_template = template
    turn = ChatTurn(tokenizer, None)
    assert not turn.substitutes and turn.wrap(TEXTS[:1]) == ["user\n"]


def test_rows_across_batches_match_per_row_encoding(tmp_path: Path, tokenizer, monkeypatch) -> None:
    monkeypatch.setattr(dataset, "ROWS_PER_BATCH", 16)
    rows = [{"q": f"row {i} has {i % 7} pens" if i % 9 else "", "a": str(i)} for i in range(100)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer.chat_template = VERBATIM
    cfg = TaskConfig(name="dataset", dataset={"path": str(path), "prompt_column": "q", "reference_column": "a",
                                              "chat_template": True, "eval_fraction": 0.2, "max_prompt_tokens": 64})
    task = make_task(cfg, tokenizer, seed=0)
    assert isinstance(task, dataset.DatasetTask)
    prompts = [task.train_prompt(i) for i in range(len(task.train))] + task.eval_prompts()
    assert sorted(p.meta["row"] for p in prompts) == [i for i in range(100) if i % 9]  # rows 0, 9, ... are empty
    assert task.stats[0].empty == 12
    for p in prompts:
        assert p.text == f"<s>user={rows[p.meta['row']]['q']}\nassistant=" and p.meta["reference"] == str(p.meta["row"])
        assert p.token_ids == list(tokenizer(p.text, add_special_tokens=False)["input_ids"])


def test_a_tokenizer_that_truncates_by_itself_is_called_as_transformers_calls_it(tmp_path: Path, tokenizer) -> None:
    tokenizer.backend_tokenizer.enable_truncation(max_length=4)  # saved in some tokenizer.json files
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"q": f"row {i} has pens"}) + "\n" for i in range(20)))
    task = make_task(TaskConfig(name="dataset", dataset={"path": str(path), "prompt_column": "q"}), tokenizer, 0)
    assert isinstance(task, dataset.DatasetTask)
    prompt = task.train_prompt(0)
    assert len(prompt.token_ids) > 4 and prompt.token_ids == list(tokenizer(prompt.text)["input_ids"])
