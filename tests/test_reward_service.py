"""RewardService with rule scorers and functions of your own ("pkg.module:function", the functions below): a
failing or hanging scorer is reported as a failure with its reason, never as a reward of 0."""
from __future__ import annotations

import asyncio
import math
import re
import time
from pathlib import Path
from typing import Any

import pytest

from async_rlhf.config.task import TaskConfig
from async_rlhf.rollout import CONVERSATION
from reward_models.service import RewardService
from reward_models.user_scorer import as_batch, resolve_scorer
from tests.helpers import make_group


def raising(prompt, text):
    raise RuntimeError("reward model crashed")


def not_a_number(prompt, text):
    return math.nan


def slow(prompt, text):
    time.sleep(0.05)
    return 0.5


def statuses(groups) -> list[tuple]:
    return [(c.reward, c.reward_status) for g in groups for c in g.completions]


def test_rule_scorer_scores_the_sort_task() -> None:
    group = make_group(0, rewards=[None, None])
    group.prompt.meta = {"digits": "21", "answer": "12"}
    group.completions[0].text, group.completions[1].text = "12", "21"
    scored = RewardService({"train": "sort_partial", "gold": "sort_exact"}).score([group], "gold")
    assert statuses(scored) == [(1.0, "ok"), (0.0, "ok")]


def returns_none(prompt, text):
    return None


def returns_a_string(prompt, text):
    return "0.5"


def returns_a_list(prompt, text):
    return [0.5, 0.25]


def exits(prompt, text):  # a script's habit: ended the scoring thread, and its batch was said to have timed out
    raise SystemExit(3)


def interrupted(prompt, text):
    raise KeyboardInterrupt


def returns_numpy(prompt, text):
    import numpy as np

    return np.float32(0.25)


def own(name: str) -> str:
    """A user's own scorer, named as in a config (reward_models/user_scorer.py)."""
    return f"{__name__}:{name}"


@pytest.mark.parametrize(("name", "error"), [
    ("raising", "RuntimeError: reward model crashed"),
    ("not_a_number", "scorer returned non-finite value nan"),
    ("returns_none", "TypeError: the scorer returned NoneType None, not a number"),
    ("returns_a_string", "TypeError: the scorer returned str '0.5', not a number"),
    ("returns_a_list", "TypeError: the scorer returned list [0.5, 0.25], not a number"),
    ("exits", "SystemExit: the function called sys.exit(3); return a number instead"),
    ("interrupted", "KeyboardInterrupt"),
])
def test_failures_are_failures_not_zero(name: str, error: str) -> None:
    svc = RewardService({"train": own(name)})
    groups = svc.score([make_group(0, rewards=[None, None])])
    for c in groups[0].completions:
        assert c.reward is None and c.reward_status == "failed" and error in (c.reward_error or "")
    assert groups[0].scored == [] and svc.health()["failed"] == 2


def test_a_numpy_number_is_a_reward() -> None:
    groups = RewardService({"train": own("returns_numpy")}).score([make_group(0, rewards=[None])])
    assert statuses(groups) == [(0.25, "ok")]


def test_deadline_marks_the_rest_timed_out() -> None:
    svc = RewardService({"train": own("slow")}, timeout_s=0.12)
    groups = svc.score([make_group(0, rewards=[None] * 6)])
    got = [c.reward_status for c in groups[0].completions]
    # The first is scored before the deadline, the last after it; once timed out, always timed out.
    assert got[0] == "ok" and got[-1] == "timed_out"
    assert got == sorted(got, key=lambda s: s == "timed_out")
    assert all(c.reward is None for c in groups[0].completions if c.reward_status == "timed_out")


STARTED: list[float] = []  # never_returns's calls


def never_returns(prompt, text):
    STARTED.append(time.monotonic())
    time.sleep(30)  # a network call without a timeout, say
    return 1.0


def test_a_scorer_that_never_returns_times_its_batches_out_and_never_runs_twice_at_once() -> None:
    svc = RewardService({"train": own("never_returns"), "gold": own("returns_numpy")}, timeout_s=0.3)
    start = time.monotonic()
    for _ in range(2):  # the second batch finds the scorer still busy with the first: waited for, not doubled
        groups = svc.score([make_group(0, rewards=[None, None])])
        assert statuses(groups) == [(None, "timed_out")] * 2
        assert groups[0].completions[0].reward_error == "reward batch exceeded reward.timeout_s=0.3"
    assert time.monotonic() - start < 10  # before: the call returned when the scorer did, after 30 s
    assert svc.health()["timed_out"] == 4 and len(STARTED) == 1  # one call, still running: no second thread
    # The other role's scorer is not held up by it (an evaluation's gold beside a hung train reward).
    assert statuses(svc.score([make_group(0, rewards=[None])], "gold")) == [(0.25, "ok")]


# TRL's form (GRPOTrainer's reward_funcs): one call per batch, the prompts' meta as keyword columns.
def trl_exact(prompts, completions, reference, **kwargs):
    assert prompts == ["21>"] * len(completions) and kwargs["digits"] == ["21"] * len(completions)
    return [float(c == r) for c, r in zip(completions, reference)]


def trl_lengths(prompts, completions):  # takes no columns: none is passed
    return [len(c) for c in completions]


def trl_partly_none(prompts, completions, **kwargs):
    return [None] + [1.0] * (len(completions) - 1)


def trl_one_value(prompts, completions, **kwargs):
    return [1.0]


def trl_numpy(prompts, completions, **kwargs):  # TRL iterates what it gets: an array, a tensor, a generator
    import numpy as np

    return np.array([len(c) for c in completions], dtype=np.float32)


def trl_tensor(prompts, completions, **kwargs):
    import torch

    return torch.tensor([float(len(c)) for c in completions])


def trl_generator(prompts, completions, **kwargs):
    return (len(c) for c in completions)


def trl_matrix(prompts, completions, **kwargs):
    import numpy as np

    return np.ones((len(completions), 2))


def trl_raising(prompts, completions, **kwargs):
    raise RuntimeError("judge unreachable")


async def trl_exits(prompts, completions, **kwargs):
    raise SystemExit("bye")


def batch(*texts: str):
    group = make_group(0, rewards=[None] * len(texts))
    group.prompt.meta = {"reference": "12", "digits": "21", "answer": "12"}
    for completion, text in zip(group.completions, texts):
        completion.text = text
    return [group]


@pytest.mark.parametrize(("name", "expected"), [
    ("trl_exact", [(1.0, "ok", None), (0.0, "ok", None)]),
    ("trl_lengths", [(2.0, "ok", None), (3.0, "ok", None)]),
    ("trl_partly_none", [(None, "failed", "TypeError: the scorer returned NoneType None, not a number"),
                         (1.0, "ok", None)]),
    ("trl_one_value", [(None, "failed", "TypeError: 'tests.test_reward_service:trl_one_value' returned 1 values for "
                                        "2 completions; a batched reward returns a list with one number per "
                                        "completion")] * 2),
    ("trl_raising", [(None, "failed", "RuntimeError: judge unreachable")] * 2),
    ("trl_exits", [(None, "failed", "SystemExit: the function called sys.exit('bye'); return a number instead")] * 2),
    ("trl_numpy", [(2.0, "ok", None), (3.0, "ok", None)]),
    ("trl_tensor", [(2.0, "ok", None), (3.0, "ok", None)]),
    ("trl_generator", [(2.0, "ok", None), (3.0, "ok", None)]),
    ("trl_matrix", [(None, "failed", "TypeError: 'tests.test_reward_service:trl_matrix' returned ndarray for 2 "
                                     "completions; a batched reward returns a list with one number per "
                                     "completion")] * 2),
])
def test_a_reward_function_in_trls_form_scores_a_batch_in_one_call(name: str, expected: list) -> None:
    groups = RewardService({"train": own(name)}).score(batch("12", "213"))
    assert [(c.reward, c.reward_status, c.reward_error) for c in groups[0].completions] == expected


def test_several_rewards_are_summed_with_their_weights_and_one_failing_fails_the_item() -> None:
    # TRL's reward_funcs + reward_weights: a rule, a per-completion function and one in TRL's form.
    spec = [("sort_exact", 2.0), (own("returns_numpy"), 0.5), (own("trl_lengths"), -0.1)]
    groups = RewardService({"train": spec}).score(batch("12", "213"))  # sort answer of "21" is "12"
    assert [c.reward for c in groups[0].completions] == pytest.approx([2.0 + 0.125 - 0.2, 0.125 - 0.3])
    assert groups[0].completions[1].reward_parts == pytest.approx(  # each one's own value, for the step's means
        {"sort_exact": 0.0, own("returns_numpy"): 0.25, own("trl_lengths"): 3.0})
    failing = [("sort_exact", 1.0), (own("trl_raising"), 1.0)]
    groups = RewardService({"train": failing}).score(batch("12", "213"))
    assert statuses(groups) == [(None, "failed")] * 2
    assert groups[0].completions[0].reward_error == f"{own('trl_raising')}: RuntimeError: judge unreachable"


def test_in_a_sum_none_means_that_reward_does_not_apply_as_in_trl() -> None:
    """TRL sums its reward functions with nansum, a None read as NaN: a function that does not apply to a
    completion (a math check on a code task) returns None for it. Before, the completion failed."""
    spec = [("sort_exact", 1.0), (own("trl_partly_none"), 2.0)]
    groups = RewardService({"train": spec}).score(batch("12", "213"))
    assert statuses(groups) == [(1.0, "ok"), (0.0 + 2.0, "ok")]  # "12": 1 + (None); "213": 0 + 2 x 1
    assert [c.reward_parts for c in groups[0].completions] == [{"sort_exact": 1.0},
                                                               {"sort_exact": 0.0, own("trl_partly_none"): 1.0}]
    groups = RewardService({"train": [(own("returns_none"), 1.0), (own("trl_partly_none"), 1.0)]}).score(
        batch("12", "213"))
    assert statuses(groups) == [(None, "failed"), (1.0, "ok")]
    assert groups[0].completions[0].reward_error == ("every reward of the sum returned None: none applies to this "
                                                     "completion")


def trl_usual(completions, **kwargs):  # TRL's docs' signature: no `prompts`; everything comes by keyword
    assert kwargs["prompts"] == ["21>"] * len(completions) and kwargs["reference"] == ["12"] * len(completions)
    return [len(text) + len(ids) for text, ids in zip(completions, kwargs["completion_ids"])]


def trl_chat(prompts, completions, reference, **kwargs):
    assert "prompt" not in kwargs  # the turns are `prompts`, as TRL passes them
    assert prompts == [[{"role": "user", "content": "sort 21"}]] * len(completions)
    return [float(c == [{"role": "assistant", "content": r}]) for c, r in zip(completions, reference)]


def trl_needs_level(completions, level, **kwargs):
    return [float(x) for x in level]


def trl_level_only(completions, level):
    return [float(x) for x in level]


def test_trls_usual_signature_gets_what_trl_gives_by_keyword() -> None:
    groups = batch("12", "213")
    groups[0].completions[1].token_ids = [3, 4, 5]
    assert statuses(RewardService({"train": own("trl_usual")}).score(groups)) == [(4.0, "ok"), (6.0, "ok")]


def trl_curriculum(completions, trainer_state, log_metric, log_extra):  # required: TRL always gives them
    share = trainer_state.global_step / trainer_state.max_steps
    log_metric("share", share)
    log_metric("epoch", trainer_state.epoch)
    log_metric("not a number", "n/a")  # not kept
    log_extra("length", [len(text) for text in completions])  # taken: no completions table here
    return [share] * len(completions)


def trl_logs_twice(completions, **kwargs):
    kwargs["log_metric"]("share", 1.0)
    return [0.0] * len(completions)


def test_a_trl_function_gets_the_runs_state_and_what_it_logs_reaches_the_steps_record() -> None:
    """trainer_state at the sampling weights' version: 8 of 32 steps of 16 prompts, over a 64-prompt dataset, is
    epoch 2; log_metric's values are averaged over the batch's calls, each group of the batch carries them, and a
    step averages them over its groups (TRL averages them over a logging step)."""
    from async_rlhf.pipeline.summary import reward_logged_means
    from reward_models.trl_context import ScoringRun

    run = ScoringRun(max_steps=32, prompts_per_step=16, epoch_prompts=64)
    sums = RewardService({"train": [(own("trl_curriculum"), 1.0), (own("trl_logs_twice"), 1.0)]}, run=run)
    groups = batch("12", "213")
    groups[0].policy_version = 8
    assert statuses(sums.score(groups)) == [(0.25, "ok"), (0.25, "ok")]
    assert groups[0].reward_logged == {"share": (0.25 + 1.0) / 2, "epoch": 2.0}
    other = batch("12")
    RewardService({"train": own("trl_curriculum")}, run=run).score(other)  # version 0
    assert reward_logged_means(groups + other + batch("1")) == {"reward_log/share": 0.625 / 2,
                                                                 "reward_log/epoch": 1.0}


def test_a_conversational_prompt_reaches_a_trl_function_as_turns_and_its_completion_as_an_assistant_turn() -> None:
    groups = batch("12", "213")
    groups[0].prompt.meta[CONVERSATION] = [{"role": "user", "content": "sort 21"}]  # DatasetTask sets it so
    assert statuses(RewardService({"train": own("trl_chat")}).score(groups)) == [(1.0, "ok"), (0.0, "ok")]


def test_a_column_the_prompts_do_not_carry_is_named_in_the_batch() -> None:
    groups = RewardService({"train": own("trl_needs_level")}).score(batch("12"))
    assert groups[0].completions[0].reward_error == (
        f"TypeError: '{own('trl_needs_level')}' takes level, which this batch does not give (its prompts' data: "
        "answer, digits, reference)")


def dataset_for_reward(rows: Path, train: str) -> tuple[Any, Any]:
    """The run's config with `train` as its reward, and the task its start builds (load_task's columns)."""
    from async_rlhf.config.run import load_config
    from async_rlhf.policies.embedded import build_tokenizer
    from async_rlhf.tasks.dataset import DatasetTask
    from reward_models.columns import reward_columns
    from tests.helpers import QUICKSTART

    cfg = load_config(QUICKSTART, [f"reward.train={train}"])
    data = {"path": str(rows), "prompt_column": "question", "eval_fraction": 0.5}
    return cfg, DatasetTask(TaskConfig(name="dataset", dataset=data), build_tokenizer("arith"), 0, reward_columns(cfg))


def test_the_prompts_carry_the_columns_trl_functions_take_and_one_the_dataset_lacks_is_refused(tmp_path: Path) -> None:
    """TRL passes a dataset's columns to its reward functions: here the prompts carry those a function names
    (every one but the prompt's for **kwargs), without task.dataset.meta_columns; one the file lacks is refused
    before any worker starts."""
    from async_rlhf.config.base import ConfigError
    from reward_models.columns import check_reward_columns

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"question": "tom has 3 pens", "level": 2, "source": "a"}\n'
                    '{"question": "ann has 5 cards", "level": 1, "source": "b"}\n')
    for train, carried in ((own("trl_level_only"), {"level"}), (own("trl_usual"), {"level", "source"}),
                           (own("trl_curriculum"), set()), ("sort_partial", set())):
        cfg, task = dataset_for_reward(rows, train)
        check_reward_columns(cfg, task)
        prompts = (task.train_prompt(0), *task.eval_prompts())
        assert all(p.meta.keys() - {"row", "epoch"} == carried for p in prompts), train
    rows.write_text('{"question": "tom has 3 pens"}\n{"question": "ann has 5 cards"}\n')
    cfg, task = dataset_for_reward(rows, own("trl_needs_level"))
    with pytest.raises(ConfigError) as err:
        check_reward_columns(cfg, task)
    assert str(err.value) == (f"config error: reward.train: '{own('trl_needs_level')}' takes level, which the "
                              "prompts do not carry (their data: row); give the dataset that column (train "
                              "and eval files alike), or the parameter a default")


def test_several_train_rewards_in_the_config() -> None:
    from async_rlhf.config.base import ConfigError
    from async_rlhf.config.run import load_config
    from tests.helpers import QUICKSTART

    cfg = load_config(QUICKSTART, [f"reward.train=[sort_partial, {own('slow')}]", "reward.train_weights=[1, 0.5]"])
    assert cfg.reward.train_scorer == [("sort_partial", 1.0), (own("slow"), 0.5)]
    assert cfg.reward.train_description == f"scorers 1 x 'sort_partial' + 0.5 x '{own('slow')}'"
    assert load_config(QUICKSTART, ["reward.train=[sort_partial, sort_exact]"]).reward.train_scorer == [
        ("sort_partial", 1.0), ("sort_exact", 1.0)]
    assert load_config(QUICKSTART, ["reward.train_weights=[3]"]).reward.train_scorer == [("sort_partial", 3.0)]
    for overrides, message in [
        (["reward.train=[sort_partial, sort_exact]", "reward.train_weights=[1]"],
         "reward.train_weights has 1 weight(s) for 2 train reward(s); give one per name in reward.train"),
        (["reward.train=[]"], "reward.train: an empty list; name one reward or more"),
        (["reward.train=[sort_partial, arith_exact]"], "reward.train: scorer 'arith_exact' does not score task "
                                                       "'sort'"),
        (["reward.train_weights=[.nan]"], "reward.train_weights.0: Input should be a finite number (got nan)"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(QUICKSTART, overrides)


IN_FLIGHT = {"now": 0, "most": 0}


async def judged(prompt, text):  # a judge behind a network call, written `async def`
    IN_FLIGHT["now"] += 1
    IN_FLIGHT["most"] = max(IN_FLIGHT["most"], IN_FLIGHT["now"])
    await asyncio.sleep(0.05)
    IN_FLIGHT["now"] -= 1
    if text == "bad":
        raise RuntimeError("judge refused")
    return float(text == "12")


async def trl_judged(completions, **kwargs):  # TRL awaits async reward functions too
    await asyncio.sleep(0.01)
    return [len(text) for text in completions]


def test_async_reward_functions_are_awaited_and_one_batchs_calls_run_at_once() -> None:
    groups = RewardService({"train": own("judged")}).score(batch("12", "213", "bad", "12"))
    assert statuses(groups) == [(1.0, "ok"), (0.0, "ok"), (None, "failed"), (1.0, "ok")]
    assert groups[0].completions[2].reward_error == "RuntimeError: judge refused"  # its own, not the batch's
    assert IN_FLIGHT["most"] == 4  # every completion's call at once, not one after another
    assert statuses(RewardService({"train": own("trl_judged")}).score(batch("12", "213"))) == [(2.0, "ok"),
                                                                                              (3.0, "ok")]
    served = as_batch(resolve_scorer(own("judged"), "serve-reward"))  # the reward server's call raises it
    with pytest.raises(RuntimeError, match="judge refused"):
        served([batch("bad")[0].prompt], ["bad"])


def test_unknown_scorer_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown scorer"):
        RewardService({"train": "nope"})


def test_a_function_is_imported_by_the_config_check_but_under_portable_only_its_form_is_read() -> None:
    from async_rlhf.config.base import ConfigError
    from async_rlhf.config.run import load_config
    from tests.helpers import QUICKSTART

    assert load_config(QUICKSTART, [f"reward.train={own('slow')}"]).reward.train == own("slow")
    with pytest.raises(ConfigError, match="reward.train: module 'elsewhere_only' not found"):
        load_config(QUICKSTART, ["reward.train=elsewhere_only:score"])
    load_config(QUICKSTART, ["reward.train=elsewhere_only:score"], environment=False)  # on the cluster it is for
    with pytest.raises(ConfigError, match="reward.gold: ':score' is not of the form 'pkg.module:function'"):
        load_config(QUICKSTART, ["reward.gold=:score"], environment=False)
