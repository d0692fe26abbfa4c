"""Your own prompts (task.name=dataset): every source format through a real `datasets` load, column
mapping, templates (str.format and a tokenizer's chat template), filtering with counts, the eval
split, and a train stream that is a pure function of (seed, index) over reshuffled epochs."""
from __future__ import annotations

import bz2
import errno
import gzip
import json
import lzma
from pathlib import Path

import pytest

from async_rlhf.config.base import ConfigError
from async_rlhf.config.task import DatasetConfig, TaskConfig, source_format
from async_rlhf.policies.embedded import build_tokenizer
from async_rlhf.rollout import EVAL_ID_OFFSET
from async_rlhf.tasks.builtin import make_task
from async_rlhf.tasks.dataset import DatasetTask, in_eval_fraction
from async_rlhf.tasks.sources import cache_problem, load_table
from tests.helpers import token_ids

ROWS = [
    {"question": "tom has 3 pens", "answer": "3", "level": 1},
    {"question": "ann has 5 cards", "answer": "5", "level": 2},
    {"question": "bob has 7 eggs", "answer": "7", "level": 1},
    {"question": "sue has 2 coins", "answer": "2", "level": 3},
    {"question": "max has 9 books", "answer": "9", "level": 2},
]
CHAT = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}={{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant={% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("arith")  # characters: digits, a-z, " .,?\n#+-*="


def write(path: Path, rows: list[dict]) -> Path:
    """`rows` in the format named by the file's extension, or a save_to_disk directory."""
    import datasets

    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    elif path.suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
    return path


def task_cfg(path: Path | str, eval_prompts: int = 128, **dataset) -> TaskConfig:
    dataset = {"path": str(path), "prompt_column": "question", "eval_fraction": 0.5, **dataset}
    return TaskConfig(name="dataset", eval_prompts=eval_prompts, dataset=dataset)


def dataset_task(cfg: TaskConfig, tokenizer, seed: int) -> DatasetTask:
    task = make_task(cfg, tokenizer, seed)
    assert isinstance(task, DatasetTask)
    return task


def dataset_of(cfg: TaskConfig) -> DatasetConfig:
    assert cfg.dataset is not None  # task_cfg always sets one
    return cfg.dataset


def all_prompts(task: DatasetTask) -> list:
    return [task.train_prompt(i) for i in range(len(task.train))] + task.eval_prompts()


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.json", "rows.csv", "rows.parquet", "saved"])
def test_every_format_gives_the_same_prompts(tmp_path: Path, tokenizer, name: str) -> None:
    source = write(tmp_path / name, ROWS)
    cfg = task_cfg(source, reference_column="answer", meta_columns=["level"])
    task = dataset_task(cfg, tokenizer, seed=0)
    assert isinstance(task, DatasetTask)
    got = sorted((p.text, p.meta["reference"], p.meta["level"]) for p in all_prompts(task))
    assert got == sorted((r["question"], r["answer"], r["level"]) for r in ROWS)
    assert task.stats[0].rows == task.stats[0].used == len(ROWS)


def test_source_format_is_told_by_extension_or_directory(tmp_path: Path) -> None:
    assert source_format("a/b.JSONL", "auto") == "jsonl"
    assert source_format(str(tmp_path), "auto") == "folder"  # of data files: what `datasets` reads as a folder
    assert source_format(str(write(tmp_path / "saved", ROWS)), "auto") == "disk"  # save_to_disk's
    assert source_format("org/name", "auto") == "hub"
    assert source_format("x.txt", "csv") == "csv"
    told = [source_format(f"a/b.{ext}", "auto") for ext in ("jsonl.gz", "csv.XZ", "json.bz2")]
    assert told == ["jsonl", "csv", "json"]
    assert source_format("a/b.parquet.gz", "auto") == source_format("a/b.gz", "auto") == "hub"  # not told by name


def test_a_glob_pattern_reads_every_file_it_matches(tmp_path: Path, tokenizer) -> None:
    """As datasets' data_files takes one (`data/train-*.jsonl`): it was refused as a file not found."""
    for i in range(2):
        write(tmp_path / f"train-{i}.jsonl", ROWS[2 * i:2 * i + 2])
    write(tmp_path / "test.jsonl", ROWS[4:])
    pattern = str(tmp_path / "train-*.jsonl")
    task = dataset_task(task_cfg(pattern, eval_path=str(tmp_path / "test.jsonl")), tokenizer, seed=0)
    assert sorted(p.text for p in (task.train_prompt(i) for i in range(len(task.train)))) == sorted(
        str(r["question"]) for r in ROWS[:4])
    with pytest.raises(ValueError, match=r"task.dataset.path: no file matches '.*train-\*.json' \(relative"):
        task_cfg(str(tmp_path / "train-*.json"))
    with pytest.raises(ValueError, match=r"task.dataset.eval_path shares files with task.dataset.path"):
        task_cfg(pattern, eval_path=str(tmp_path / "train-1.jsonl"))
    (tmp_path / "train-1.jsonl").write_text('{"question": "ok"}\n{"question": oops}\n')
    with pytest.raises(ConfigError) as caught:
        load_table(pattern, "auto", "train")
    assert f"as jsonl: {tmp_path / 'train-1.jsonl'} line 2: not valid JSON (Expecting value at column 14)" in str(
        caught.value)


def test_a_pattern_without_an_extension_takes_its_files_format(tmp_path: Path, tokenizer) -> None:
    """`data/train-*` was taken for a hub name ("Couldn't find any data file"): no hub name holds a `*`."""
    write(tmp_path / "train-0.jsonl", ROWS[:2])
    write(tmp_path / "train-1.jsonl", ROWS[2:4])
    pattern = str(tmp_path / "train-*")
    assert source_format(pattern, "auto") == "jsonl"
    assert len(load_table(pattern, "auto", "train")) == 4
    with pytest.raises(ValueError, match=r"pattern '.*nothing-\*' matches no file; end it with the files' ext"):
        task_cfg(str(tmp_path / "nothing-*"))
    (tmp_path / "train-2.csv").write_text("question,answer\n1,2\n")
    with pytest.raises(ValueError, match=r"matches 3 files of no one known format; .* or set task.dataset.format"):
        task_cfg(pattern)
    (tmp_path / "train-2.csv").unlink()
    (tmp_path / "train-1.jsonl").write_text('{"prompt": "1 2"}\n')  # other columns than train-0's
    with pytest.raises(ConfigError, match=r"the files it matches have different columns \(.*train-0.jsonl: "
                                          r"question, answer, level; .*train-1.jsonl: prompt\); fix the file"):
        load_table(pattern, "auto", "train")


def test_a_folder_of_data_files_is_read_with_its_files_names_as_splits(tmp_path: Path, tokenizer) -> None:
    """A dataset repository downloaded as it is (`data/train-0.jsonl`, `data/test.jsonl`) was taken for a
    save_to_disk directory and refused ("neither a `Dataset` directory nor a `DatasetDict` directory")."""
    (tmp_path / "repo" / "data").mkdir(parents=True)
    write(tmp_path / "repo" / "data" / "train-0.jsonl", ROWS[:2])
    write(tmp_path / "repo" / "data" / "train-1.jsonl", ROWS[2:4])
    write(tmp_path / "repo" / "data" / "test.jsonl", ROWS[4:])
    repo = str(tmp_path / "repo")
    task = dataset_task(task_cfg(repo, eval_path=repo, eval_split="test"), tokenizer, seed=0)
    assert sorted(p.text for p in (task.train_prompt(i) for i in range(len(task.train)))) == sorted(
        str(r["question"]) for r in ROWS[:4])
    assert [p.text for p in task.eval_prompts()] == [ROWS[4]["question"]]
    with pytest.raises(ConfigError, match=r"task.dataset.split: no split 'validation' in '.*repo' \(splits: "):
        dataset_task(task_cfg(repo, split="validation"), tokenizer, seed=0)
    with pytest.raises(ValueError, match="task.dataset.eval_path reads the train split"):
        task_cfg(repo, eval_path=repo)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "prepare.py").write_text("print(1)\n")
    with pytest.raises(ConfigError, match=r"cannot read '.*notes' as folder: .*; give it .jsonl, .json, .csv or "
                                          r".parquet files of one kind, or point task.dataset.path at another"):
        load_table(str(tmp_path / "notes"), "auto", "train")


@pytest.mark.parametrize("opener", [gzip.open, bz2.open, lzma.open])
def test_a_compressed_text_file_gives_the_prompts_of_the_plain_one(tmp_path: Path, tokenizer, opener) -> None:
    plain = write(tmp_path / "rows.jsonl", ROWS)
    packed = tmp_path / f"rows.jsonl.{ {gzip.open: 'gz', bz2.open: 'bz2', lzma.open: 'xz'}[opener] }"
    with opener(packed, "wb") as fh:
        fh.write(plain.read_bytes())
    prompts = [sorted(p.text for p in all_prompts(dataset_task(task_cfg(source), tokenizer, seed=0)))
               for source in (plain, packed)]
    assert prompts[0] == prompts[1] and len(prompts[0]) == len(ROWS)


def test_a_compressed_file_that_does_not_decompress_is_named(tmp_path: Path) -> None:
    good = gzip.compress(b'{"question": "tom has 3 pens"}\n' * 100)
    cases = {"cut.jsonl.gz": good[:40], "plain.jsonl.gz": b'{"question": "x"}\n', "latin.jsonl.gz": gzip.compress(
        b'{"question": "x"}\n{"question": "caf\xe9"}\n')}
    reasons = {}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConfigError) as caught:
            load_table(str(tmp_path / name), "auto", "train")
        reasons[name] = str(caught.value)
    assert "cannot decompress" in reasons["cut.jsonl.gz"] and "end-of-stream" in reasons["cut.jsonl.gz"]
    assert "cannot decompress" in reasons["plain.jsonl.gz"] and "Not a gzipped file" in reasons["plain.jsonl.gz"]
    assert "line 2 of" in reasons["latin.jsonl.gz"] and "is not UTF-8 text" in reasons["latin.jsonl.gz"]


@pytest.mark.parametrize(("name", "text"), [("blank.jsonl", "\n \n\n"), ("empty.json", "[]"), ("header.csv", "q\n")])
def test_a_file_without_rows_says_so(tmp_path: Path, name: str, text: str) -> None:
    (tmp_path / name).write_text(text)  # datasets said 'Instruction "train" corresponds to no data!'
    with pytest.raises(ConfigError) as caught:
        load_table(str(tmp_path / name), "auto", "train")
    assert str(caught.value) == (f"config error: task.dataset: '{tmp_path / name}' has no rows; fix the file, or point "
                                 "task.dataset.path at another")


def test_columns_template_and_token_ids(tmp_path: Path, tokenizer) -> None:
    source = write(tmp_path / "rows.jsonl", ROWS)
    cfg = task_cfg(source, template="{question}. how many?\n", reference_column="answer", eval_fraction=0.01,
                   eval_path=None)
    dataset_of(cfg).eval_path = str(write(tmp_path / "eval.jsonl", ROWS[:2]))
    task = dataset_task(cfg, tokenizer, seed=0)
    prompt = next(p for p in all_prompts(task) if p.meta["row"] == 1 and p.prompt_id < EVAL_ID_OFFSET)
    assert prompt.text == "ann has 5 cards. how many?\n"
    assert prompt.token_ids == list(tokenizer(prompt.text)["input_ids"])  # BOS first, as vLLM receives it
    assert prompt.meta == {"row": 1, "reference": "5", "epoch": 0}
    assert [p.prompt_id for p in task.eval_prompts()] == [EVAL_ID_OFFSET, EVAL_ID_OFFSET + 1]
    assert len(task.train) == len(ROWS)  # with eval_path, every row of path trains


def test_chat_template_wraps_the_prompt_once(tmp_path: Path, tokenizer) -> None:
    reloaded = with_chat_template(tokenizer, tmp_path / "tok")  # the template travels with the checkpoint
    source = write(tmp_path / "rows.jsonl", ROWS)
    cfg = task_cfg(source, chat_template=True, system_prompt="be brief", max_prompt_tokens=128)
    prompt = dataset_task(cfg, reloaded, seed=0).eval_prompts()[0]
    question = next(r["question"] for r in ROWS if f"user={r['question']}\n" in prompt.text)
    assert prompt.text == f"<s>system=be brief\nuser={question}\nassistant="
    assert prompt.token_ids[:2] != [reloaded.bos_token_id] * 2  # the template's BOS, not a second one
    assert prompt.token_ids == [reloaded.bos_token_id] + token_ids(reloaded, list(prompt.text[3:]))


def with_chat_template(tokenizer, path: Path):
    """The module's tokenizer with CHAT as its template, saved and loaded as a checkpoint's would be."""
    from transformers import AutoTokenizer

    tokenizer.chat_template = CHAT
    tokenizer.save_pretrained(path)
    tokenizer.chat_template = None
    return AutoTokenizer.from_pretrained(path)


def test_conversational_prompts_are_rendered_by_the_chat_template(tmp_path: Path, tokenizer) -> None:
    """TRL's conversational form: the prompt column holds role/content turns. Found by hand: every such row was
    counted malformed and the run refused to start ("no usable prompts")."""
    chat = with_chat_template(tokenizer, tmp_path / "tok")
    rows = [{"question": [{"role": "user", "content": r["question"]}],
             "answer": [{"role": "assistant", "content": r["answer"]}]} for r in ROWS]  # prompt-completion form
    rows += [{"question": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "who has 2 pens"}],
              "answer": [{"role": "assistant", "content": "2"}]},
             {"question": [], "answer": [{"role": "assistant", "content": "1"}]},  # empty
             {"question": [{"role": "user"}], "answer": [{"role": "assistant", "content": "1"}]}]  # malformed
    source = write(tmp_path / "rows.jsonl", rows)
    for system_prompt in (None, "be kind"):
        cfg = task_cfg(source, max_prompt_tokens=128, chat_template=system_prompt is not None,
                       system_prompt=system_prompt, reference_column="answer")
        task = dataset_task(cfg, chat, seed=0)
        stats = task.stats[0]
        assert (stats.rows, stats.used, stats.empty, stats.malformed) == (8, 6, 1, 1)
        added = f"system={system_prompt}\n" if system_prompt else ""
        want = {f"<s>{added}user={r['question']}\nassistant=" for r in ROWS}
        want.add("<s>system=be brief\nuser=who has 2 pens\nassistant=")  # its own system turn is kept
        prompts = all_prompts(task)
        assert {p.text for p in prompts} == want
        assert all(p.token_ids == [chat.bos_token_id] + token_ids(chat, list(p.text[3:])) for p in prompts)
        assert all(p.meta["reference"] in p.text for p in prompts)  # the completion's text: the digit asked about
        # TRL's reward functions take a conversational prompt as its turns, as in the data (reward_models/user_scorer)
        turns = sorted(json.dumps(p.meta["prompt"]) for p in prompts)
        assert turns == sorted(json.dumps(r["question"]) for r in rows[:6])  # the usable rows' own turns
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path / "plain")
    with pytest.raises(ConfigError) as err:
        dataset_task(task_cfg(source), AutoTokenizer.from_pretrained(tmp_path / "plain"), seed=0)
    assert str(err.value) == ("config error: task.dataset.prompt_column: 'question' holds conversations (lists of "
                              f"role/content turns) and the tokenizer in '{tmp_path / 'plain'}' has no chat "
                              "template to render them; add one to its tokenizer_config.json, or give plain-text "
                              "prompts")


def test_rows_are_filtered_and_counted(tmp_path: Path, tokenizer) -> None:
    rows = ROWS + [
        {"question": "", "answer": "1", "level": 1},  # empty
        {"question": None, "answer": "1", "level": 1},  # empty (null)
        {"question": "eva has 4 shells", "answer": None, "level": 1},  # no reference: malformed
        {"question": "TOM HAS 3", "answer": "3", "level": 1},  # capitals: unknown to the tokenizer
        {"question": "tom has " + "1" * 40, "answer": "1", "level": 1},  # too long
    ]
    source = write(tmp_path / "rows.jsonl", rows)
    task = dataset_task(task_cfg(source, reference_column="answer", max_prompt_tokens=24), tokenizer, seed=0)
    stats = task.stats[0]
    counts = (stats.rows, stats.used, stats.empty, stats.malformed, stats.unknown_tokens, stats.too_long)
    assert counts == (10, 5, 2, 1, 1, 1)
    assert "10 rows, 5 usable (1 longer than 24 tokens, 2 empty, 1 malformed, 1 with unknown tokens)" in task.describe()


def test_too_long_prompts_can_be_truncated_keeping_bos_and_the_end(tmp_path: Path, tokenizer) -> None:
    source = write(tmp_path / "rows.jsonl", [{"question": "abcdefghijklmnop how many?"}] * 3)
    cfg = task_cfg(source, max_prompt_tokens=12, too_long="truncate", eval_fraction=0.5)
    # Identical rows hash to one side of eval_fraction: a copy is the eval file (never the train file itself).
    dataset_of(cfg).eval_path = str(write(tmp_path / "eval.jsonl", [{"question": "abcdefghijklmnop how many?"}]))
    task = dataset_task(cfg, tokenizer, seed=0)
    prompt = task.train_prompt(0)
    assert len(prompt.token_ids) == 12 and prompt.token_ids[0] == tokenizer.bos_token_id
    assert prompt.text == "p how many?" and task.stats[0].truncated == 3


def test_train_stream_is_resumable_and_reshuffled_per_epoch(tmp_path: Path, tokenizer) -> None:
    rows = [{"question": f"row {i}"} for i in range(40)]
    cfg = task_cfg(write(tmp_path / "rows.jsonl", rows), eval_fraction=0.2)
    first, resumed = dataset_task(cfg, tokenizer, seed=3), dataset_task(cfg, tokenizer, seed=3)
    n = len(first.train)
    stream = [first.train_prompt(i) for i in range(3 * n)]
    assert [resumed.train_prompt(i) for i in range(2 * n + 5, 2 * n - 5, -1)] == stream[2 * n - 4:2 * n + 6][::-1]
    epochs = [[p.meta["row"] for p in stream[e * n:(e + 1) * n]] for e in range(3)]
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs)  # every train row once per epoch
    assert epochs[0] != epochs[1] != epochs[2]  # each epoch in its own order
    assert [p.meta["epoch"] for p in stream[n - 1:n + 1]] == [0, 1]
    other = dataset_task(cfg, tokenizer, seed=4)
    assert [other.train_prompt(i).meta["row"] for i in range(n)] != epochs[0]
    dataset_of(cfg).shuffle = False
    assert [dataset_task(cfg, tokenizer, 3).train_prompt(i).meta["row"] for i in range(n)] == sorted(epochs[0])


def test_eval_split_is_by_content_and_disjoint(tmp_path: Path, tokenizer) -> None:
    rows = [{"question": f"row {i}"} for i in range(200)]
    cfg = task_cfg(write(tmp_path / "rows.jsonl", rows), eval_fraction=0.25, eval_prompts=30)
    task_a, task_b = dataset_task(cfg, tokenizer, seed=0), dataset_task(cfg, tokenizer, seed=99)
    evals = {p.text for p in task_a.eval_prompts()}
    assert evals == {p.text for p in task_b.eval_prompts()}  # independent of the seed
    assert len(evals) == 30  # task.eval_prompts caps it
    held_out = {r["question"] for r in rows if in_eval_fraction(r["question"], 0.25)}
    assert 30 < len(held_out) < 70 and evals <= held_out
    assert not held_out & {task_a.train_prompt(i).text for i in range(len(task_a.train))}


def test_a_row_the_template_cannot_format_is_malformed(tmp_path: Path, tokenizer) -> None:
    rows = [{"n": "3"}, {"n": "x"}, {"n": "5"}]
    cfg = task_cfg(write(tmp_path / "rows.jsonl", rows), template="{n:0>2} pens", eval_fraction=0.5)
    dataset_of(cfg).template = "{n:d} pens"  # a text column formatted as an integer: every row fails
    with pytest.raises(ConfigError) as err:
        dataset_task(cfg, tokenizer, seed=0)
    assert "3 rows, 0 usable (3 malformed)" in str(err.value)
    dataset_of(cfg).template = "{n:0>2} pens"
    task = dataset_task(cfg, tokenizer, seed=0)
    assert sorted(p.text for p in all_prompts(task)) == ["03 pens", "05 pens", "0x pens"]


@pytest.mark.parametrize(("suffix", "bad_line"), [(".jsonl", 4), (".csv", 5)])  # a CSV header is a line of its own
def test_a_file_that_is_not_utf8_is_named_with_its_first_bad_line(tmp_path: Path, suffix: str, bad_line: int) -> None:
    # A file saved as Latin-1: the JSON loader took its bytes and the run died with a UnicodeDecodeError traceback
    # when row 51 was read. The check reads in 1 MiB chunks: "é" is split across the first boundary (still UTF-8).
    path = tmp_path / f"prompts{suffix}"
    head = b'{"q": "' if suffix == ".jsonl" else b"q\n"
    filler = b"x" * ((1 << 20) - len(head) - 1)
    good = head + filler + "é".encode() + (b'"}\n' if suffix == ".jsonl" else b"\n")
    path.write_bytes(good + b"2\n3\ncaf\xe9\n5\n")
    assert good.index("é".encode()) == (1 << 20) - 1
    with pytest.raises(ConfigError) as caught:
        load_table(str(path), "auto", "train")
    assert str(caught.value) == (
        f"config error: task.dataset: line {bad_line} of '{path}' is not UTF-8 text (invalid continuation byte); save "
        "the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or point task.dataset.path at another")


ROW = '{"question": "3914", "answer": "1349"}\n'


@pytest.mark.parametrize(("name", "text", "where"), [
    # Arrow's own: "JSON parse error: Invalid value. in row 60000", counted from 0
    ("far.jsonl", ROW * 60000 + '{"question": oops}\n' + ROW,
     "line 60001: not valid JSON (Expecting value at column 14)"),
    ("cut.jsonl.gz", ROW + '{"question": "12", "answer": \n', "line 2: not valid JSON (Expecting value at column 30)"),
    ("array.jsonl", ROW + "\n" + "[1, 2]\n", "line 3: a JSON array, not an object of columns"),
    ("first.jsonl", '"just text"\n' + ROW, "line 1: a JSON string, not an object of columns"),
    # one document over many lines: json's own line and column ("Expecting ',' delimiter")
    ("pretty.json", '[\n  {"question": "1"},\n  {"question": "2" "answer": "2"}\n]\n',
     "line 3: not valid JSON (Expecting ',' delimiter at column 20)"),
])
def test_a_json_file_that_is_not_rows_is_named_by_its_first_bad_line(tmp_path: Path, name: str, text: str,
                                                                     where: str) -> None:
    path = tmp_path / name
    data = text.encode()
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    with pytest.raises(ConfigError) as caught:
        load_table(str(path), "auto", "train")
    kind = "json" if name.endswith(".json") else "jsonl"
    assert str(caught.value) == (f"config error: task.dataset: cannot read '{path}' as {kind}: {where}; fix the file, "
                                 "or point task.dataset.path at another")


def test_rows_under_a_key_of_a_json_document_are_read_with_field(tmp_path: Path, tokenizer) -> None:
    """SQuAD-style files: `{"version": ..., "data": [rows]}` (or the columns under the key). Read whole, the
    document was one row of columns `version, data`, refused as a missing column: that line now names the key."""
    plain = dataset_task(task_cfg(write(tmp_path / "rows.jsonl", ROWS)), tokenizer, seed=0)
    keyed = tmp_path / "keyed.json.gz"
    keyed.write_bytes(gzip.compress(json.dumps({"version": "1.0", "data": ROWS}).encode()))
    columns = tmp_path / "columns.json"
    columns.write_text(json.dumps({"data": {key: [r[key] for r in ROWS] for key in ROWS[0]}}))
    for source in (keyed, columns):
        task = dataset_task(task_cfg(source, field="data"), tokenizer, seed=0)
        assert [(p.text, p.token_ids) for p in all_prompts(task)] == [(p.text, p.token_ids) for p in all_prompts(plain)]
    with pytest.raises(ConfigError) as caught:
        dataset_task(task_cfg(keyed), tokenizer, seed=0)
    assert str(caught.value) == (f"config error: task.dataset.prompt_column: no column 'question' in '{keyed}' "
                                 "(columns: version, data); its rows sit under 'data': set task.dataset.field=data")


@pytest.mark.parametrize(("document", "problem"), [
    ({"version": "1.0", "data": ROWS}, "its keys: version, data"),
    ({"rows": "see rows.jsonl"}, "the key holds a JSON string, not rows"),
    (ROWS, "the file is a JSON array, not an object with keys"),
])
def test_a_field_without_rows_under_it_is_named(tmp_path: Path, document: object, problem: str) -> None:
    path = tmp_path / "doc.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ConfigError) as caught:
        load_table(str(path), "auto", "train", field="rows")
    assert str(caught.value) == (f"config error: task.dataset.field: no rows under key 'rows' in '{path}' ({problem}); "
                                 "set it to the key the rows sit under, or unset it for a file of rows")


def test_field_on_a_source_that_is_no_json_document_is_refused(tmp_path: Path) -> None:
    source = write(tmp_path / "rows.jsonl", ROWS)
    with pytest.raises(ValueError, match="task.dataset.field: only a .json file holds its rows under a key, and "
                                         f"'{source}' is read as jsonl; unset task.dataset.field"):
        task_cfg(source, field="data")
    assert dataset_of(task_cfg(source, field="data", eval_path=str(write(tmp_path / "e.json", ROWS)))).field == "data"


def test_a_datasets_cache_that_cannot_be_written_is_named_not_the_file(tmp_path: Path, monkeypatch) -> None:
    import datasets

    # datasets writes an Arrow copy of every file it reads to its cache; an unwritable one was reported as the
    # data file's problem ("cannot read 'prompts.jsonl' as jsonl: [Errno 2] ...; fix the file").
    source = write(tmp_path / "rows.jsonl", ROWS)
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "a_file" / "cache"))
    with pytest.raises(ConfigError) as caught:
        load_table(str(source), "auto", "train")
    assert str(caught.value) == (
        f"config error: task.dataset: cannot write the datasets cache while reading '{source}' (Not a directory: "
        f"'{tmp_path / 'a_file' / 'cache'}'); set $HF_DATASETS_CACHE to a writable directory with room for an "
        "Arrow copy of the data")


def test_only_errors_of_the_cache_or_a_full_disk_are_the_caches() -> None:
    cache = "/data/hf/datasets"
    assert cache_problem(OSError(errno.ENOSPC, "No space left on device"), cache) == (
        "No space left on device: '/data/hf/datasets'")
    assert cache_problem(PermissionError(errno.EACCES, "Permission denied", "/data/hf/datasets/json/x.lock"), cache)
    assert cache_problem(FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/hf"), cache)
    assert cache_problem(FileNotFoundError(errno.ENOENT, "No such file", "/work/rows.jsonl"), cache) is None
    assert cache_problem(ConnectionError("hub unreachable"), cache) is None  # an OSError, but no path of the cache
    assert cache_problem(ValueError("JSON parse error"), cache) is None
