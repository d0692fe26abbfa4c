"""The controller's part of a checkpoint, round-tripped without workers: everything comes back."""
from __future__ import annotations

import random
import shutil
from collections import Counter, deque
from pathlib import Path

import numpy as np
import pytest

from async_rlhf.checkpoint.input_prints import input_prints
from async_rlhf.checkpoint.store import Checkpoint
from async_rlhf.config.base import ConfigError
from async_rlhf.config.run import RunConfig
from async_rlhf.config.task import TaskConfig
from async_rlhf.pipeline.controller import Controller
from async_rlhf.pipeline.resume import (
    capture,
    check_same_inputs,
    config_difference,
    load_snapshot,
    restore,
    save_snapshot,
)
from async_rlhf.policies.embedded import build_tokenizer
from async_rlhf.rollout import Prompt
from async_rlhf.tasks.builtin import SortTask
from async_rlhf.tasks.dataset import DatasetTask
from tests.helpers import make_group


def busy_controller(run_dir: Path) -> Controller:
    c = Controller(RunConfig(api={"enabled": False}), run_dir)
    c.parts.task = SortTask(c.cfg.task, build_tokenizer("sort"), seed=0)
    c.state.steps_taken, c.state.next_prompt = 7, 160
    c.state.nonfinite_total, c.state.nonfinite_run = 2, 1
    c.state.reward_signal_seen = True  # the no-signal notice then says the task may be learned
    for pid in (144, 145):
        c.queue.put(make_group(version=6, prompt_id=pid))
    c.queue.counters.dropped_stale, c.queue.counters.staleness = 3, Counter({0: 50, 1: 62})
    c.state.reissue.append(([Prompt(150, "x", [1, 2])], 5))  # with the version it was sampled with
    c.stats.reward_counts.update(ok=400, failed=5)
    c.timing.add("gen_busy_s", 12.5)
    c.queue.max_staleness = 2  # changed over HTTP during the run
    for step in range(1, 8):
        c.recorder.log_step({"step": step})
    c.recorder.log_eval({"version": 0})
    return c


def test_controller_state_round_trips(tmp_path: Path) -> None:
    before = busy_controller(tmp_path)
    random.seed(5)
    np.random.seed(5)
    save_snapshot(capture(before), tmp_path)
    expected = (random.random(), np.random.rand())
    before.recorder.log_step({"step": 8})  # logged after the checkpoint, then the run was killed

    after = Controller(RunConfig(api={"enabled": False}), tmp_path)
    restore(after, load_snapshot(tmp_path))
    st = after.state
    assert (st.steps_taken, st.next_prompt, st.nonfinite_total, st.nonfinite_run) == (7, 160, 2, 1)
    assert st.reward_signal_seen
    assert [(g.prompt.prompt_id, g.policy_version) for g in after.queue.items()] == [(144, 6), (145, 6)]
    assert st.reissue == deque([([Prompt(150, "x", [1, 2])], 7)])  # only the restored version is published
    assert st.outstanding == 3  # two queued + one to re-issue: the gate counts them as issued
    q = after.queue.counters
    assert (q.produced, q.dropped_stale, q.staleness) == (2, 3, Counter({0: 50, 1: 62}))
    assert after.stats.reward_counts == {"ok": 400, "failed": 5, "timed_out": 0}
    assert after.timing.get("gen_busy_s") == 12.5
    assert after.control.take_max_staleness() == 2
    assert [r["step"] for r in after.recorder.steps] == list(range(1, 8)) and len(after.recorder.evals) == 1
    assert (random.random(), np.random.rand()) == expected


def test_config_difference_allows_more_steps_only() -> None:
    base = RunConfig()
    longer = base.model_copy(update={"learner": base.learner.model_copy(update={"steps": 500})})
    assert config_difference(base, longer) is None
    assert config_difference(base, RunConfig(eval={"every": 5}, api={"port": 8000}, checkpoint={"every": 10})) is None
    assert config_difference(base, RunConfig(learner={"lr": 3e-4})) == "learner.lr is 0.0003 but the run used 0.0001"
    assert (config_difference(base, RunConfig(queue={"max_staleness": 0}))
            == "queue.max_staleness is 0 but the run used 1")
    assert config_difference(base, RunConfig(reward={"remote": {"url": "http://h:1"}})) == (
        'reward.remote is {"url": "http://h:1", "timeout_s": 10.0, "retries": 4, "backoff_s": 0.5, "deadline_s": 60.0, '
        '"token_env": null} but the run used null')


def test_a_resume_over_dataset_files_changed_since_the_checkpoint_is_refused(tmp_path: Path) -> None:
    """The stream resumes by index: over other rows it would train prompts twice or never, without a word."""
    rows = tmp_path / "rows.jsonl"

    def task_of(*answers: str) -> DatasetTask:
        rows.write_text("".join(f'{{"question": "{i}{i}1", "answer": "{a}"}}\n' for i, a in enumerate(answers)))
        data = {"path": str(rows), "template": "{question}>", "reference_column": "answer", "eval_fraction": 0.3}
        return DatasetTask(TaskConfig(name="dataset", dataset=data), build_tokenizer("sort"), 0)

    answers = [f"1{i}{i}" for i in range(12)]
    c = Controller(RunConfig(api={"enabled": False}), tmp_path / "run")
    c.parts.task = task_of(*answers)
    save_snapshot(capture(c), tmp_path)
    checkpoint = Checkpoint(tmp_path, 20)
    check_same_inputs(checkpoint, c.cfg, task_of(*answers))  # the same files: resumed
    with pytest.raises(ConfigError) as err:
        check_same_inputs(checkpoint, c.cfg, task_of(*answers[:-1], "999"))  # one reference answer corrected
    assert str(err.value).startswith("config error: --resume: task.dataset's prompts changed since the run's step 20 "
                                     "(as many prompts (")
    with pytest.raises(ConfigError) as err:
        check_same_inputs(checkpoint, c.cfg, task_of(*answers, "111"))  # a row added
    assert " train and " in str(err.value) and str(err.value).endswith("put them back, or start a new run")
    (tmp_path / "sort").mkdir()
    save_snapshot(capture(busy_controller(tmp_path / "sort")), tmp_path)  # an embedded task: its config says all
    check_same_inputs(checkpoint, c.cfg, SortTask(TaskConfig(), build_tokenizer("sort"), seed=0))


def test_a_resume_whose_model_directory_was_overwritten_is_refused(tmp_path: Path, random_policies) -> None:
    """The reference model is loaded from model.path again on resume: an SFT model trained again into the same
    directory would change the KL for the rest of the run without a word."""
    model = tmp_path / "sft"
    shutil.copytree(random_policies[0], model)
    c = Controller(RunConfig(api={"enabled": False}, model={"source": "local", "path": str(model)}), tmp_path / "run")
    c.parts.task = SortTask(c.cfg.task, build_tokenizer("sort"), seed=0)
    c.parts.inputs = input_prints(c.cfg)  # as ComponentBuilder.build reads them at the run's start
    save_snapshot(capture(c), tmp_path)
    checkpoint = Checkpoint(tmp_path, 30)
    (model / "README.md").write_text("notes")  # not a model file
    check_same_inputs(checkpoint, c.cfg, c.parts.task)
    shutil.copy(random_policies[1] / "model.safetensors", model / "model.safetensors")  # the same size, new weights
    with pytest.raises(ConfigError) as err:
        check_same_inputs(checkpoint, c.cfg, c.parts.task)
    assert str(err.value) == (f"config error: --resume: the contents of model.path ('{model}') changed since the "
                              "run's step 30 (a resume loads its reference model, or reward model, from there again); "
                              "an exact resume needs the same model: put it back, or start a new run")
