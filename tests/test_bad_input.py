"""Bad input, table-driven: each case asserts the exact one-line message a user sees.

Config cases go through `load_config` (what `async-rlhf train` and `check-config` call before any
worker starts; the CLI prints the message and exits 2, see tests/test_config.py). HTTP and reward
server cases are in tests/test_api.py and tests/test_remote_reward.py; run-directory and status
cases are here.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest

from async_rlhf.cli.main import main
from async_rlhf.config.base import ConfigError
from async_rlhf.config.run import load_config
from async_rlhf.outputs.run_lock import RunDirLock
from learners.loss_traits import builtin_losses
from reward_models.rules import SCORERS
from tests.helpers import QUICKSTART

E = "config error: "
# Named from the declarations, not listed: a new loss that supports it joins the message and this test alike.
IS_ABLE = ", ".join(sorted(n for n, t in builtin_losses().items() if t.supports_importance_sampling))

CONFIG_CASES = [
    ("learner.steps=0", "learner.steps: Input should be greater than or equal to 1 (got 0)"),
    ("learner.lr=-1", "learner.lr: Input should be greater than 0 (got -1)"),
    ("generation.temperature=-0.5", "generation.temperature: Input should be greater than or equal to 0 (got -0.5)"),
    ("generation.top_p=0", "generation.top_p: Input should be greater than 0 (got 0)"),
    ('generation.stop=["</answer>", ""]', "generation.stop: an empty string would end every completion at once; "
                                          "give the text that ends one, e.g. ['</answer>']"),
    ("generation.num_generators=0", "generation.num_generators: Input should be greater than or equal to 1 (got 0)"),
    ("api.port=70000", "api.port: Input should be less than or equal to 65535 (got 70000)"),
    ("api.token=short", "api.token: String should have at least 16 characters"),
    ("weight_sync.transport=ftp", "weight_sync.transport: Input should be 'shm', 'nccl' or 'ipc' (got 'ftp')"),
    ("resources.pin_cores=always", "resources.pin_cores: Input should be 'auto' or 'off' (got 'always')"),
    ("loss.importance_sampling=full", "loss.importance_sampling: Input should be 'none' or 'truncated' (got 'full')"),
    ("loss.clip_eps=1.5", "loss.clip_eps: Input should be less than 1 (got 1.5)"),
    ("queue.capacity=4", "queue.capacity (4) must hold one step's generation.prompts_per_step (16) groups"),
    ("queue.max_staleness=-1", "queue.max_staleness: Input should be greater than or equal to 0 (got -1)"),
    ("loss.import_path=nope.mod:fn",
     "loss.import_path: module 'nope.mod' not found (No module named 'nope'); "
     "it must be importable from sys.path or the current directory"),
    ("loss.import_path=json:nothing", "loss.import_path: module 'json' has no attribute 'nothing'"),
    ("loss.import_path=json", "loss.import_path: 'json' is not of the form 'pkg.module:function'"),
    ("reward.train=nope", f"reward.train: unknown scorer 'nope'; valid: {', '.join(sorted(SCORERS))}, or "
                          "'pkg.module:function' of your own (fn(prompt, text) -> float, or TRL's "
                          "fn(completions, **kwargs) -> list[float])"),
    ("reward.gold=json:nothing", "reward.gold: module 'json' has no attribute 'nothing'"),
    ("reward.train=os.path:exists", "reward.train: 'os.path:exists' must accept two positional arguments "
                                    "(prompt, text); its signature is (path); or, in TRL's form, take a parameter "
                                    "named completions"),
    ("reward.train=nope.mod:fn", "reward.train: module 'nope.mod' not found (No module named 'nope'); "
                                 "it must be importable from sys.path or the current directory"),
    ("learner.zero_stage=two", "learner.zero_stage: Input should be 0, 1, 2 or 3 (got 'two')"),
    ("seed=abc", "seed: Input should be a valid integer, unable to parse string as an integer (got 'abc')"),
    ("eval.every=-1", "eval.every: Input should be greater than or equal to 0 (got -1)"),
    ("learner.max_nonfinite_steps=0",
     "learner.max_nonfinite_steps: Input should be greater than or equal to 1 (got 0)"),
    ("loss.importance_sampling=truncated",
     "loss.importance_sampling: loss 'online_dpo' does not support 'truncated'; set loss.importance_sampling=none "
     f"or use one of: {IS_ABLE}"),
    ("generation=5", "generation: Input should be a valid dictionary or instance of GenerationConfig (got 5)"),
    ("learner.stall_timeout_s=0", "learner.stall_timeout_s: Input should be greater than 0 (got 0)"),
    ("loss.beta=0", "loss.beta: Input should be greater than 0 (got 0)"),
    ("generation.max_restarts=-1", "generation.max_restarts: Input should be greater than or equal to 0 (got -1)"),
    ("learner.weight_decay=-0.1", "learner.weight_decay: Input should be greater than or equal to 0 (got -0.1)"),
    ("api.enabled=maybe", "api.enabled: Input should be a valid boolean, unable to interpret input (got 'maybe')"),
    ("queue.max_staleness=1.5",
     "queue.max_staleness: Input should be a valid integer, got a number with a fractional part (got 1.5)"),
    ("checkpoint.every=-2", "checkpoint.every: Input should be greater than or equal to 0 (got -2)"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last: Input should be greater than or equal to 1 (got 0)"),
    ("learner.lr=inf", "learner.lr: Input should be a finite number (got 'inf')"),
    ("loss.beta=nan", "loss.beta: Input should be a finite number (got 'nan')"),
    ("seed=-1", "seed: Input should be greater than or equal to 0 (got -1)"),
    ("generation.temperature=0.001", "generation.temperature (0.001) is below 0.01, which vLLM would sample with "
                                     "instead; set 0 for greedy sampling or at least 0.01"),
    ("generation.temperature=0", "generation.temperature=0 is greedy sampling: the 4 samples of each prompt would all "
                                 "be the same; set generation.temperature > 0 (e.g. 1.0)"),
]


def test_greedy_monte_carlo_continuations_are_refused() -> None:
    base = ["generation.temperature=0", "generation.samples_per_prompt=1"]
    with pytest.raises(ConfigError, match=r"the 4 Monte Carlo continuations of each state \(mc_values.k_mc\)"):
        load_config(QUICKSTART, base + ["loss.name=vineppo"])
    assert load_config(QUICKSTART, base + ["loss.name=ppo"]).generation.temperature == 0  # one greedy sample: fine


@pytest.mark.parametrize(("override", "message"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_messages_are_exact(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, [override])
    assert str(err.value) == E + message


TRUNCATED_SAMPLING = ("generation.top_p=0.9 reshapes the sampling distribution, which loss '{}' cannot take ratios "
                      "to (the learner takes log-probs of the whole softmax); set generation.top_p=1")


@pytest.mark.parametrize("loss", sorted(n for n, t in builtin_losses().items() if t.needs_behaviour_logprobs))
def test_top_p_with_behaviour_ratios_is_refused(loss: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, [f"loss.name={loss}", "generation.top_p=0.9", "generation.samples_per_prompt=2"])
    assert str(err.value) == E + TRUNCATED_SAMPLING.format(loss)


def test_top_k_min_p_and_a_repetition_penalty_with_behaviour_ratios_are_refused_together() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, ["loss.name=grpo", "generation.top_k=20", "generation.min_p=0.05",
                                 "generation.repetition_penalty=1.1"])
    assert str(err.value) == E + (
        "generation.top_k=20, generation.min_p=0.05, generation.repetition_penalty=1.1 reshape the sampling "
        "distribution, which loss 'grpo' cannot take ratios to (the learner takes log-probs of the whole softmax); "
        "set generation.top_k=0, generation.min_p=0, generation.repetition_penalty=1")


def test_top_p_without_ratios_or_when_greedy_is_accepted() -> None:
    load_config(QUICKSTART, ["generation.top_p=0.9", "generation.top_k=5", "generation.min_p=0.1",
                             "generation.repetition_penalty=1.2"])  # online_dpo: no behaviour log-probs
    load_config(QUICKSTART, ["loss.name=ppo", "generation.samples_per_prompt=1", "generation.top_p=0.9",
                             "generation.temperature=0"])  # one greedy sample: top_p has nothing to truncate
    with pytest.raises(ConfigError, match="generation.repetition_penalty=1.2 reshapes"):  # applied when greedy too
        load_config(QUICKSTART, ["loss.name=ppo", "generation.samples_per_prompt=1", "generation.temperature=0",
                                 "generation.repetition_penalty=1.2"])


def test_there_are_at_least_thirty_cases_in_this_file() -> None:
    assert len(CONFIG_CASES) + 4 + len(RESUME_CASES) >= 30  # + the run-directory / CLI / resume cases below


def test_secret_token_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, ["api.token=my-secret"])
    assert "my-secret" not in str(err.value)


def test_run_dir_that_already_holds_a_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert main(["train", str(QUICKSTART), "--run-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"config error: run directory '{tmp_path}' already holds a run; choose another --run-dir")


def test_malformed_override(capsys: pytest.CaptureFixture) -> None:
    assert main(["check-config", str(QUICKSTART), "learner.lr"]) == 2
    assert capsys.readouterr().err.strip() == (
        "config error: override 'learner.lr' is not of the form key.sub=value (e.g. queue.max_staleness=0)")


def test_status_without_a_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["status", "--run-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"status error: no run has served its API from {tmp_path} (no api_url there); if one is starting there, try "
        "again in a moment, else pass a run's directory")


def test_status_of_a_run_without_its_api_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Found by hand: a run with api.enabled=false, asked by its directory, was "no api_url in DIR; pass --url
    http://HOST:PORT or --run-dir DIR", the directory it was given."""
    lock = RunDirLock(tmp_path)
    lock.acquire()  # a run going on there
    (tmp_path / "config.yaml").write_text("api:\n  enabled: true\n")
    assert main(["status", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"status error: the run in {tmp_path} is starting and its HTTP API is not up yet; try again in a moment")
    (tmp_path / "config.yaml").write_text("api:\n  enabled: false\n")
    assert main(["status", str(tmp_path)]) == 2  # no step yet
    assert capsys.readouterr().err.strip() == (
        f"status error: the run in {tmp_path} runs with its HTTP API off (api.enabled=false), which status asks; its "
        f"steps so far are in {tmp_path / 'metrics.jsonl'}")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3')  # the last line being written
    assert main(["status", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"{tmp_path / 'metrics.jsonl'} (the last: step 2)")
    lock.release()


def test_status_of_a_run_that_has_ended_says_how_it_ended(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Before: "cannot reach http://...; is the run still going?" for every run that had ended, however it ended.
    (tmp_path / "api_url").write_text("http://127.0.0.1:9\n")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "checkpoints" / "step-000040").mkdir(parents=True)
    (tmp_path / "error.log").write_text("Traceback ...\n")
    lock = RunDirLock(tmp_path)
    lock.acquire()  # a run still going: its API is asked (and here does not answer)
    assert main(["status", "--run-dir", str(tmp_path)]) == 1
    assert "status error: cannot reach http://127.0.0.1:9 (" in capsys.readouterr().err
    lock.release()  # the process ended without a summary: failed or killed
    assert main(["status", "--run-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"status error: the run in {tmp_path} is not running and wrote no summary.json: it failed or was killed (its "
        f"traceback: {tmp_path / 'error.log'}); `async-rlhf train --resume {tmp_path}` continues it from step-000040")
    summary = {"stopped_early": True, "steps": 40, "wall_s": 7.25, "initial_gold_reward": 0.555,
               "final_gold_reward": None, "max_staleness_seen": 1}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert main(["status", str(tmp_path)]) == 0  # the run's directory as the argument (before: "unrecognized")
    assert capsys.readouterr().out.strip() == (
        f"run {tmp_path.name} has ended (stopped early): 40 steps in 7.2s of training; gold reward 0.555 -> -, max "
        f"staleness seen 1; outputs in {tmp_path}")
    for damaged, error in (("{\"steps\": 4", "JSONDecodeError"), ('{"steps": 40}', "KeyError: 'stopped_early'")):
        (tmp_path / "summary.json").write_text(damaged)  # before: "status failed: JSONDecodeError" + a traceback file
        assert main(["status", "--run-dir", str(tmp_path)]) == 1
        assert capsys.readouterr().err.startswith(
            f"status error: {tmp_path / 'summary.json'} cannot be read as a run's summary ({error}")
    assert main(["status", str(tmp_path), "--run-dir", str(tmp_path / "other")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"status error: two run directories given ({tmp_path} and --run-dir {tmp_path / 'other'}); pass one")
    assert main(["status", "--run-dir", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"status error: no directory {tmp_path / 'nothing'}; pass --run-dir a run's directory (runs/<time>/)")


def test_status_of_a_run_that_is_gone(capsys: pytest.CaptureFixture) -> None:
    assert main(["status", "--url", "http://127.0.0.1:9"]) == 1
    assert capsys.readouterr().err.startswith("status error: cannot reach http://127.0.0.1:9 (")


# ---- your own data and model (task.name=dataset, model.source=local) ---------------------------------

BYO = Path(__file__).resolve().parents[1] / "configs" / "byo_example.yaml"
TRAIN_JSONL = "examples/data/sort_train.jsonl"


@pytest.fixture
def tokenizer_dir(tmp_path: Path) -> Path:
    """A checkpoint directory as far as config and tokenizer checks look: config.json, a real tokenizer and a
    (whole, tiny) weights file."""
    import torch
    from safetensors.torch import save_file

    from async_rlhf.policies.embedded import build_tokenizer

    out = tmp_path / "ckpt"
    build_tokenizer("sort").save_pretrained(out)
    (out / "config.json").write_text("{}")
    save_file({"w": torch.zeros(4, 4)}, str(out / "model.safetensors"))
    return out


def byo(model_dir: Path, *overrides: str):
    return load_config(BYO, [f"model.path={model_dir}", "logging.wandb=false", "logging.tensorboard=false", *overrides])


def byo_message(model_dir: Path, *overrides: str) -> str:
    from async_rlhf.tasks.builtin import load_task

    with pytest.raises(ConfigError) as err:
        cfg = byo(model_dir, *overrides)
        load_task(cfg, model_dir)  # what the controller does before any worker starts
    return str(err.value)


def test_missing_prompt_file(tokenizer_dir: Path) -> None:
    assert byo_message(tokenizer_dir, "task.dataset.path=examples/data/nope.jsonl") == E + (
        "task.dataset.path: file 'examples/data/nope.jsonl' not found (relative paths start at the current directory)")


def test_missing_eval_file(tokenizer_dir: Path) -> None:
    assert byo_message(tokenizer_dir, "task.dataset.eval_path=held_out.csv") == E + (
        "task.dataset.eval_path: file 'held_out.csv' not found (relative paths start at the current directory)")


def test_a_broken_jsonl_line_is_named_by_its_line(tokenizer_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    broken = tmp_path / "prompts.jsonl"
    broken.write_text('{"question": "3914", "answer": "1349"}\n{"question": \n')
    assert byo_message(tokenizer_dir, f"task.dataset.path={broken}") == E + (  # Arrow's own said "in row 1"
        f"task.dataset: cannot read '{broken}' as jsonl: line 2: not valid JSON (Expecting value at column 14); fix "
        "the file, or point task.dataset.path at another")
    assert capsys.readouterr().err == ""  # datasets' own log line about it is not printed before ours


def test_an_empty_prompt_file(tokenizer_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "prompts.csv").write_text("")
    assert byo_message(tokenizer_dir, f"task.dataset.path={tmp_path}/prompts.csv") == E + (
        f"task.dataset: '{tmp_path}/prompts.csv' is empty; fix the file, or point task.dataset.path at another")


def test_file_of_unknown_format(tokenizer_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "prompts.txt").write_text("3914\n")
    assert byo_message(tokenizer_dir, f"task.dataset.path={tmp_path}/prompts.txt") == E + (
        f"task.dataset.format: cannot tell the format of '{tmp_path}/prompts.txt' from its extension; "
        "set task.dataset.format to jsonl, json, csv or parquet")


def test_unknown_prompt_column(tokenizer_dir: Path) -> None:
    assert byo_message(tokenizer_dir, "task.dataset.template=null", "task.dataset.prompt_column=text") == E + (
        f"task.dataset.prompt_column: no column 'text' in '{TRAIN_JSONL}' (columns: question, answer, source)")


def test_unknown_reference_and_template_columns(tokenizer_dir: Path) -> None:
    assert byo_message(tokenizer_dir, "task.dataset.reference_column=solution") == E + (
        f"task.dataset.reference_column: no column 'solution' in '{TRAIN_JSONL}' (columns: question, answer, source)")
    assert byo_message(tokenizer_dir, "task.dataset.template={digits}>") == E + (
        f"task.dataset.template: no column 'digits' in '{TRAIN_JSONL}' (columns: question, answer, source)")


def test_nothing_left_after_filtering(tokenizer_dir: Path) -> None:
    assert byo_message(tokenizer_dir, "task.dataset.max_prompt_tokens=4") == E + (
        f"task.dataset.path: no usable prompts in '{TRAIN_JSONL}' after filtering (240 rows, 0 usable "
        "(237 longer than 4 tokens, 1 empty, 1 malformed, 1 with unknown tokens))")


def test_model_directory_without_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError) as err:
        byo(tmp_path)
    assert str(err.value) == E + (
        f"model.path: no tokenizer in '{tmp_path}' (none of tokenizer.json, tokenizer_config.json, tokenizer.model, "
        "vocab.json); save it there with tokenizer.save_pretrained")


def test_chat_template_asked_for_but_missing(tokenizer_dir: Path) -> None:
    assert byo_message(tokenizer_dir, "task.dataset.chat_template=true") == E + (
        f"task.dataset.chat_template: the tokenizer in '{tokenizer_dir}' has no chat template; "
        "set task.dataset.chat_template=false or add one to its tokenizer_config.json")


def test_tokenizer_without_eos(tokenizer_dir: Path) -> None:
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": None}))
    assert byo_message(tokenizer_dir) == E + (
        f"model.path: the tokenizer in '{tokenizer_dir}' has no eos_token; set one in its tokenizer_config.json "
        "so that completions can end")


DATA_CONFIG_CASES = [
    ("model.source=embedded", "model.path is set but model.source is 'embedded' (the built-in tiny model), which would "
     "ignore it; set model.source=local to train from model.path, or drop model.path"),
    ("task.dataset.reference_column=null", "reward.gold: scorer 'reference_exact' compares with a reference "
     "answer; set task.dataset.reference_column"),
    ("reward.gold=sort_exact", "reward.gold: scorer 'sort_exact' does not score task 'dataset'; valid for dataset: "
     "reference_contains, reference_exact, reference_final, reference_similarity, vader_compound"),
    ("task.name=sort", "task.dataset is required when task.name=dataset, and only then"),
    ("task.dataset.eval_path=null", "task.dataset: no evaluation set; set task.dataset.eval_path or "
     "task.dataset.eval_fraction > 0"),
    (f"task.dataset.eval_path=./{TRAIN_JSONL}", f"task.dataset.eval_path is the train file './{TRAIN_JSONL}': "
     "evaluation must be on held-out prompts; give another file, or unset it to hold out task.dataset.eval_fraction"),
    ("task.dataset.system_prompt=hi", "task.dataset.system_prompt needs task.dataset.chat_template=true"),
    ("task.dataset.too_long=cut", "task.dataset.too_long: Input should be 'drop' or 'truncate' (got 'cut')"),
    ("model.dtype=float16", "model.dtype: Input should be 'auto', 'float32' or 'bfloat16' (got 'float16')"),
    ("task.dataset.template={question", "task.dataset.template: expected '}' before end of string in '{question'; "
     "write a column as {name} and a literal brace as {{ or }}"),
    ("task.dataset.template={}>", "task.dataset.template: positional field in '{}>'; name a column, e.g. {question}"),
    ("logging.wandb_mode=cloud", "logging.wandb_mode: Input should be 'offline' or 'online' (got 'cloud')"),
]


@pytest.mark.parametrize(("override", "message"), DATA_CONFIG_CASES, ids=[c[0] for c in DATA_CONFIG_CASES])
def test_data_config_messages_are_exact(tokenizer_dir: Path, override: str, message: str) -> None:
    overrides = [override, "task.dataset.eval_fraction=0"] if "eval_path" in override else [override]
    with pytest.raises(ConfigError) as err:
        byo(tokenizer_dir, *overrides)
    assert str(err.value) == E + message


def test_a_dataset_task_needs_a_local_model(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text('{"q": "hello"}\n' * 40)
    config = tmp_path / "run.yaml"
    config.write_text(f"task: {{name: dataset, dataset: {{path: {tmp_path / 'p.jsonl'}, prompt_column: q}}}}\n"
                      "reward: {train: vader_compound, gold: vader_compound}\n")
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert "task.name=dataset needs model.source=local and model.path (the embedded model knows only its own tasks; " \
           "`async-rlhf export-model DIR` writes it as a checkpoint)" in str(err.value)


def test_bfloat16_on_a_machine_without_gpu(tokenizer_dir: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: bfloat16 is allowed")
    with pytest.raises(ConfigError) as err:
        byo(tokenizer_dir, "model.dtype=bfloat16")
    assert str(err.value) == E + ("model.dtype: bfloat16 needs a GPU and none is visible; "
                                  "use model.dtype=float32 (or auto) on CPU")


def test_train_with_a_bad_column_exits_2_before_any_worker(tokenizer_dir: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from async_rlhf.pipeline.controller import Controller

    # Ray may already run in this pytest process (session fixture): check the call, not the state.
    monkeypatch.setattr(Controller, "_start_ray", lambda self: pytest.fail("Ray started for a run that cannot train"))
    args = ["train", str(BYO), f"model.path={tokenizer_dir}", "task.dataset.reference_column=gold", "api.enabled=false",
            "--run-dir", str(tmp_path / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"no column 'gold' in '{TRAIN_JSONL}' (columns: question, answer, source)")


def test_plot_of_a_directory_that_holds_no_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"plot error: no metrics.jsonl in '{tmp_path}'; pass run directories written by async-rlhf train")


def test_missing_split_of_a_saved_dataset(tokenizer_dir: Path, tmp_path: Path) -> None:
    import datasets

    saved = tmp_path / "saved"
    rows = datasets.Dataset.from_list([{"question": "21", "answer": "12"}])
    datasets.DatasetDict({"train": rows}).save_to_disk(str(saved))
    assert byo_message(tokenizer_dir, f"task.dataset.path={saved}", "task.dataset.split=test") == E + (
        f"task.dataset.split: no split 'test' in '{saved}' (splits: train)")


def test_context_longer_than_the_local_model(tokenizer_dir: Path) -> None:
    (tokenizer_dir / "config.json").write_text(json.dumps({"max_position_embeddings": 32}))
    with pytest.raises(ConfigError) as err:
        byo(tokenizer_dir)
    assert str(err.value) == E + (
        f"generation.max_model_len (64) exceeds the max_position_embeddings (32) of model.path '{tokenizer_dir}'")


def test_check_config_reads_the_prompts_too(tokenizer_dir: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["check-config", str(BYO), f"model.path={tokenizer_dir}", "logging.wandb=false"]
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"# dataset '{TRAIN_JSONL}': 240 rows, 236 usable (")
    assert main([*args, "task.dataset.prompt_column=text", "task.dataset.template=null"]) == 2
    capsys.readouterr()
    # A reward function that takes a column the file lacks: refused here as train refuses it, before any worker.
    assert main([*args, "reward.train=tests.test_reward_service:trl_level_only", "reward.train_weights=[1]"]) == 2
    assert "'tests.test_reward_service:trl_level_only' takes level, which the prompts do not carry" in (
        capsys.readouterr().err)


def test_export_model_into_a_directory_that_is_not_empty(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "weights.bin").write_text("x")
    assert main(["export-model", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"config error: export-model: '{tmp_path}' already exists and is not empty; choose a new directory")


# ---- train --resume RUN_DIR: refused before anything starts, one line, exit 2 -------------------

def earlier_run(root: Path, overrides: Sequence[str] = (), summary_steps: int | None = None,
                checkpoint_step: int | None = None) -> Path:
    """A run directory as an earlier run leaves it: config.yaml, maybe summary.json and a checkpoint."""
    from async_rlhf.checkpoint.store import CheckpointStore
    from async_rlhf.config.run import dump_config

    run = root / "run"
    run.mkdir()
    dump_config(load_config(QUICKSTART, list(overrides)), run / "config.yaml")
    if summary_steps is not None:
        (run / "summary.json").write_text(f'{{"steps": {summary_steps}}}')
    if checkpoint_step is not None:
        CheckpointStore(run / "checkpoints", 3).write(checkpoint_step, lambda d: (d / "w").write_text("w"))
    return run


RESUME_CASES = [
    ("missing", lambda t: t / "nope", [],
     "config error: --resume: run directory '{run}' not found; pass the directory of an earlier run"),
    ("not a run", lambda t: t, [],
     "config error: --resume: '{run}' holds no run (no config.yaml); pass the directory of an earlier run"),
    ("task changed", lambda t: earlier_run(t, checkpoint_step=2), ["task.max_digits=8"],
     "config error: --resume: task.max_digits is 8 but the run used 7; a resumed run must keep it "
     "(start a new run to change it)"),
    ("loss changed", lambda t: earlier_run(t, checkpoint_step=2), ["loss.name=rloo"],
     'config error: --resume: loss.name is "rloo" but the run used "online_dpo"; a resumed run must keep it '
     "(start a new run to change it)"),
    ("seed changed", lambda t: earlier_run(t, checkpoint_step=2), ["seed=1"],
     "config error: --resume: seed is 1 but the run used 0; a resumed run must keep it (start a new run to change it)"),
    ("finished", lambda t: earlier_run(t, summary_steps=200, checkpoint_step=200), [],
     "config error: --resume: run '{run}' already finished (200 of learner.steps=200); raise learner.steps to "
     "train further"),
    ("checkpoint beyond the end", lambda t: earlier_run(t, ["learner.steps=20"], checkpoint_step=12),
     ["learner.steps=10"],
     "config error: --resume: the newest valid checkpoint in '{run}/checkpoints' is at step 12, beyond "
     "learner.steps=10; raise learner.steps to at least 12"),
    ("no checkpoint", lambda t: earlier_run(t), [],
     "config error: --resume: no valid checkpoint in '{run}/checkpoints'; start a new run (set checkpoint.every so "
     "that runs write them)"),
]


@pytest.mark.parametrize(("make", "overrides", "message"), [c[1:] for c in RESUME_CASES],
                         ids=[c[0] for c in RESUME_CASES])
def test_resume_refusals_are_exact(tmp_path: Path, capsys: pytest.CaptureFixture, make, overrides, message) -> None:
    run = make(tmp_path)
    assert main(["train", str(QUICKSTART), *overrides, "--resume", str(run)]) == 2
    assert capsys.readouterr().err.strip() == message.format(run=run)


def test_resume_without_a_config_reads_the_runs_own(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Before: `train --resume RUN_DIR`, which `status` itself suggests, failed "the following arguments are
    # required: config". Now the run's config.yaml is read; a first override is not taken for the config.
    run = earlier_run(tmp_path, ["learner.steps=20"], checkpoint_step=12)
    assert main(["train", "--resume", str(run), "learner.steps=10"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"config error: --resume: the newest valid checkpoint in '{run}/checkpoints' is at step 12, beyond "
        "learner.steps=10; raise learner.steps to at least 12")
    assert main(["train"]) == 2
    assert capsys.readouterr().err.strip() == (
        "config error: train needs a config file (e.g. configs/quickstart.yaml), or --resume RUN_DIR to continue a "
        "run with its own")
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(
        "remote: null", "remote:\n    url: http://***@scorer.internal/score"))  # saved with its password hidden
    assert main(["train", "--resume", str(run)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"config error: --resume: {run / 'config.yaml'} has reward.remote.url written as *** (a credential is never "
        f"saved); pass the config the run started with: async-rlhf train CONFIG --resume {run}")


def test_resume_with_only_damaged_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = earlier_run(tmp_path, checkpoint_step=4)
    (run / "checkpoints" / "step-000004" / "w").write_text("")
    assert main(["train", str(QUICKSTART), "--resume", str(run)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "[async-rlhf] warning: checkpoint step-000004 is not usable: w has 0 bytes, the manifest says 1; "
        "falling back to the previous one",
        f"config error: --resume: no valid checkpoint in '{run}/checkpoints'; start a new run (set "
        "checkpoint.every so that runs write them)",
    ]


def test_resume_with_a_damaged_summary_goes_by_the_newest_checkpoint(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    # Before: "train failed: JSONDecodeError ..." and a traceback file.
    run = earlier_run(tmp_path, checkpoint_step=400)
    (run / "summary.json").write_text("{\"steps\": 4")  # cut short
    assert main(["train", str(QUICKSTART), "learner.steps=300", "--resume", str(run)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"[async-rlhf] warning: {run / 'summary.json'} cannot be read (JSONDecodeError: Expecting ',' delimiter: "
        "line 1 column 12 (char 11)); going by the newest checkpoint",
        f"config error: --resume: the newest valid checkpoint in '{run}/checkpoints' is at step 400, beyond "
        "learner.steps=300; raise learner.steps to at least 400",
    ]


def test_resume_and_run_dir_together(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", str(QUICKSTART), "--resume", str(tmp_path), "--run-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        "config error: --resume RUN_DIR continues the run in RUN_DIR; drop --run-dir")


TRANSPORT_CASES = [
    (["weight_sync.transport=ipc", "generation.num_generators=2"],
     "weight_sync.transport=ipc shares one GPU between one generator and one learner rank (got "
     "generation.num_generators=2, learner.num_ranks=1, generation.tensor_parallel_size=1); use "
     "weight_sync.transport=nccl across GPUs or nodes"),
    (["weight_sync.transport=ipc", "generation.tensor_parallel_size=2"],
     "weight_sync.transport=ipc shares one GPU between one generator and one learner rank (got "
     "generation.num_generators=1, learner.num_ranks=1, generation.tensor_parallel_size=2); use "
     "weight_sync.transport=nccl across GPUs or nodes"),
    (["weight_sync.transport=ipc"],
     "generation.gpu_memory_utilization (0.9) + learner.gpu_memory_fraction (0.45) exceed 0.95 of the one GPU "
     "they share (weight_sync.transport=ipc); lower one of them, e.g. generation.gpu_memory_utilization=0.45"),
]


@pytest.mark.parametrize(("overrides", "message"), TRANSPORT_CASES, ids=[" ".join(c[0]) for c in TRANSPORT_CASES])
def test_transport_placement_messages_are_exact(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, overrides, environment=False)
    assert str(err.value) == E + message


def test_ipc_with_a_split_that_fits_validates() -> None:
    cfg = load_config(QUICKSTART, ["weight_sync.transport=ipc", "generation.gpu_memory_utilization=0.45"],
                      environment=False)
    assert cfg.learner.gpu_memory_fraction == 0.45


SHARED_SPLIT = ["generation.gpu_memory_utilization=0.45"]  # a memory split the ipc config check accepts
CLUSTER_CASES = [
    ("shm", 0, 2, "weight_sync.transport=shm shares weights through one node's /dev/shm but the Ray cluster has "
                  "2 nodes; use weight_sync.transport=nccl across nodes"),
    ("nccl", 1, 1, "weight_sync.transport=nccl needs the generator and the learner on separate GPUs but the Ray "
                   "cluster has 1 GPU; use weight_sync.transport=ipc to share one GPU"),
    ("ipc", 0, 1, "weight_sync.transport=ipc sends weights from GPU to GPU but the Ray cluster has no GPU; use "
                  "weight_sync.transport=shm on CPU"),
    ("shm", 1, 1, "the run needs 2 GPUs (generation.num_generators x generation.tensor_parallel_size + "
                  "learner.num_ranks) and the Ray cluster has 1"),
]


@pytest.mark.parametrize(("transport", "gpus", "nodes", "message"), CLUSTER_CASES,
                         ids=[c[0] + str(c[1]) for c in CLUSTER_CASES])
def test_cluster_checks_at_start(transport: str, gpus: int, nodes: int, message: str) -> None:
    from async_rlhf.cluster.placement import check_cluster

    cfg = load_config(QUICKSTART, [f"weight_sync.transport={transport}", *SHARED_SPLIT], environment=False)
    with pytest.raises(ConfigError) as err:
        check_cluster(cfg, gpus, nodes)
    assert str(err.value) == E + message


def test_cluster_checks_pass_where_the_transport_fits() -> None:
    from async_rlhf.cluster.placement import check_cluster

    ipc = load_config(QUICKSTART, ["weight_sync.transport=ipc", "generation.gpu_memory_utilization=0.4"],
                      environment=False)
    check_cluster(ipc, 1, 1)
    check_cluster(load_config(QUICKSTART, ["weight_sync.transport=nccl"], environment=False), 2, 2)
    check_cluster(load_config(QUICKSTART, environment=False), 0, 1)  # CPU: shm on one node


def test_cores_are_pinned_only_on_cpu() -> None:
    from async_rlhf.cluster.resources import plan_cores

    cfg = load_config(QUICKSTART, environment=False)
    assert plan_cores(cfg, [0, 1, 2, 3]).pinned
    gpu = plan_cores(cfg, [0, 1, 2, 3], gpus=True)
    assert not gpu.pinned and gpu.generator_cores == [[]] * cfg.generation.num_generators


@pytest.mark.parametrize(("transport", "gpus", "nodes", "message"), CLUSTER_CASES,
                         ids=[c[0] + str(c[1]) for c in CLUSTER_CASES])
def test_train_refused_by_the_cluster_exits_2_with_one_line(ray_local, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch, transport: str, gpus: int,
                                                           nodes: int, message: str) -> None:
    """The real CLI and controller start-up on the session's Ray (so `train` starts none of its own); only the
    cluster's GPU and node counts are mocked, as this machine has no GPU and one node. `ray.address` set makes
    the driver skip its own CUDA check, as on a cluster, so the start-time check is the one that refuses."""
    from async_rlhf.cluster import placement
    from async_rlhf.pipeline.controller import Controller

    monkeypatch.setattr(placement, "cluster_counts", lambda: (gpus, nodes, 64))
    monkeypatch.setattr(Controller, "_build_components",
                        lambda self, policy_dir: pytest.fail("workers started for a run the cluster cannot hold"))
    args = ["train", str(QUICKSTART), f"weight_sync.transport={transport}", *SHARED_SPLIT, "ray.address=auto",
            "api.enabled=false", "--run-dir", str(tmp_path / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [E + message] and "Traceback" not in err


def test_a_ray_with_too_few_cpus_is_refused_at_start_not_waited_on(ray_local, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The session's real 2-CPU Ray and two generators + a learner (3 CPUs): the actors would wait forever."""
    from async_rlhf.pipeline.controller import Controller

    monkeypatch.setattr(Controller, "_build_components",
                        lambda self, policy_dir: pytest.fail("workers started for a run the cluster cannot hold"))
    args = ["train", str(QUICKSTART), "generation.num_generators=2", "api.enabled=false", "--run-dir",
            str(tmp_path / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [E + "the run needs 3 Ray CPUs (one per generator and per learner rank) and the Ray "
                                "cluster has 2; give Ray more (ray.init(num_cpus=...), `ray start --num-cpus`) or "
                                "lower generation.num_generators or learner.num_ranks"]


@pytest.mark.parametrize(("damage", "why"), [
    (lambda raw: raw[:-10], "truncated or damaged: its header describes 64 bytes of tensors, it holds 54"),
    (lambda raw: raw[:5], "5 bytes, not a safetensors file (truncated or overwritten)"),
    (lambda raw: b"\x10" + b"\x00" * 7 + b"not json at all!" + raw[24:], "its header is not a safetensors header "
                                                                         "(overwritten or damaged)"),
])
def test_a_damaged_weights_file_in_the_model_directory(tokenizer_dir: Path, damage, why: str) -> None:
    import torch
    from safetensors.torch import save_file

    weights = tokenizer_dir / "model.safetensors"
    save_file({"w": torch.zeros(4, 4)}, str(weights))  # 64 bytes of float32 after the header
    assert byo(tokenizer_dir).model.path == tokenizer_dir  # whole: accepted
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(ConfigError) as err:
        byo(tokenizer_dir)
    assert str(err.value) == E + f"model.path: '{weights}': {why}; download or save the checkpoint again"


@pytest.mark.parametrize("architecture", ["LlamaForSequenceClassification", "LlamaModel", "BertForMaskedLM"])
def test_a_checkpoint_that_does_not_generate_is_refused_as_policy_or_reference(tokenizer_dir: Path,
                                                                               architecture: str) -> None:
    """Found by hand: a reward model as model.path started the whole run and failed in vLLM's first generate;
    as model.reference_path it trained against a causal LM with a random head, with no word said."""
    (tokenizer_dir / "config.json").write_text(json.dumps({"architectures": [architecture]}))
    why = (f"'{tokenizer_dir}' holds a {architecture} (config.json architectures), not a causal language model; "
           "point it at a policy checkpoint (a reward model goes in reward.learned.path)")
    with pytest.raises(ConfigError) as err:
        byo(tokenizer_dir)
    assert str(err.value) == E + f"model.path: {why}"
    policy = tokenizer_dir.parent / "policy"
    shutil.copytree(tokenizer_dir, policy)
    (policy / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ConfigError) as err:
        byo(policy, f"model.reference_path={tokenizer_dir}")
    assert str(err.value) == E + f"model.reference_path: {why}"
    (policy / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    assert byo(policy).model.path == policy  # generative heads pass, LMHeadModel included


def test_an_encoder_decoder_is_refused_before_any_worker(tokenizer_dir: Path) -> None:
    """Found by hand: a T5 checkpoint started the whole run and failed in the generator's start with transformers'
    "Argument position_ids not found in the forward method of T5Stack"."""
    (tokenizer_dir / "config.json").write_text(json.dumps({"architectures": ["T5ForConditionalGeneration"],
                                                           "is_encoder_decoder": True}))
    with pytest.raises(ConfigError) as err:
        byo(tokenizer_dir)
    assert str(err.value) == E + (f"model.path: '{tokenizer_dir}' holds a T5ForConditionalGeneration, an "
                                  "encoder-decoder (config.json is_encoder_decoder); training runs decoder-only "
                                  "causal language models: point it at one (e.g. a Llama, Qwen or GPT-2 checkpoint)")


@pytest.mark.parametrize("vocab_size", [10, 13])
def test_a_tokenizer_with_ids_beyond_the_embeddings_is_refused(tokenizer_dir: Path, vocab_size: int) -> None:
    """Found by hand: a tokenizer given tokens without resize_token_embeddings started the whole run and failed in
    the learner's first step with "IndexError: index out of range in self". The sort tokenizer's ids go up to 13."""
    (tokenizer_dir / "config.json").write_text(json.dumps({"vocab_size": vocab_size}))
    with pytest.raises(ConfigError) as err:
        byo(tokenizer_dir)
    assert str(err.value) == E + (f"model.path: the tokenizer in '{tokenizer_dir}' writes token ids up to 13, but the "
                                  f"model's embeddings hold {vocab_size} (config.json vocab_size); resize its "
                                  "embeddings to the tokenizer (model.resize_token_embeddings(len(tokenizer))) and "
                                  "save it again")
    (tokenizer_dir / "config.json").write_text(json.dumps({"vocab_size": 14}))
    assert byo(tokenizer_dir).model.path == tokenizer_dir  # as many rows as ids (or more, as padded vocabularies)


def test_a_checkpoint_without_weights_is_refused_before_any_worker(tokenizer_dir: Path) -> None:
    (tokenizer_dir / "model.safetensors").unlink()
    with pytest.raises(ConfigError) as err:
        byo(tokenizer_dir)
    assert str(err.value) == E + (f"model.path: no weights in '{tokenizer_dir}' (no .safetensors or .bin file); "
                                  "download or save the checkpoint again, with its weights")


def test_a_reference_with_another_tokenizer_is_refused(tokenizer_dir: Path) -> None:
    """Found by hand: SmolLM2 as the reference of the sort policy trained 3 steps without a word, on a KL between
    token ids that mean different things to the two models."""
    from async_rlhf.policies.embedded import build_tokenizer

    other = tokenizer_dir.parent / "other"
    shutil.copytree(tokenizer_dir, other)
    build_tokenizer("arith").save_pretrained(other)
    sizes = [len(json.loads((d / "tokenizer.json").read_text())["model"]["vocab"]) for d in (tokenizer_dir, other)]
    with pytest.raises(ConfigError) as err:
        byo(tokenizer_dir, f"model.reference_path={other}")
    assert str(err.value) == E + (f"model.reference_path: its tokenizer's vocabulary differs from model.path's "
                                  f"({sizes[0]} and {sizes[1]} tokens); the reference must share the policy's "
                                  "tokenizer")
    same = tokenizer_dir.parent / "same"
    shutil.copytree(tokenizer_dir, same)
    assert byo(tokenizer_dir, f"model.reference_path={same}").model.reference_path == same
