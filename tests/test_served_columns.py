"""The dataset columns a reward server's function takes reach the run's prompts (`reward.remote`): the server
says them in its /healthz answer, the run reads them before its prompts, and a column its function requires
that the prompts lack is refused before any worker starts. Over real HTTP on localhost, with the real server app
and the real dataset task."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from async_rlhf.api.serving import ThreadedServer
from async_rlhf.config.run import load_config
from async_rlhf.config.task import TaskConfig
from async_rlhf.pipeline.startup import check_reward_server
from async_rlhf.policies.embedded import build_tokenizer
from async_rlhf.rollout import RewardColumns
from async_rlhf.tasks.dataset import DatasetTask
from reward_models.columns import NO_SERVED, ServedColumns, reward_columns
from reward_models.remote import RemoteRewardClient, wait_for_server
from reward_models.server import create_reward_app, rule_scorer
from tests.helpers import QUICKSTART, one_line_error


def graded(completions, answer, **kwargs):  # TRL's form: names the column it compares with
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


def needs_solution(completions, solution, hint=None):
    return [float(c == s) for c, s in zip(completions, solution)]


@pytest.fixture
def served():
    servers: list[ThreadedServer] = []

    def start(function: str) -> str:
        servers.append(ThreadedServer(create_reward_app(function, *rule_scorer(function))))
        return servers[-1].start()

    yield start
    for server in servers:
        server.stop()


def test_the_columns_a_served_function_names_are_carried_by_the_prompts(served, tmp_path: Path) -> None:
    url = served("tests.test_served_columns:graded")
    why, health = wait_for_server(url, 5.0, 10.0, print)
    assert why is None and health["columns"] == {"taken": ["answer"], "every": True, "required": ["answer"]}
    cfg = load_config(QUICKSTART, [f"reward.remote.url={url}"])
    columns = check_reward_server(cfg, log=print)
    assert reward_columns(cfg, columns) == RewardColumns(frozenset({"answer"}), True)
    rows = [{"question": "tom has 3 pens", "answer": "3", "level": 1}, {"question": "ann has 5", "answer": "5"}] * 4
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task_cfg = TaskConfig(name="dataset", dataset={"path": str(tmp_path / "rows.jsonl"), "prompt_column": "question",
                                                   "eval_fraction": 0.5})
    # prompt_column set: `every` carries all but the prompt's column, as TRL passes them
    prompts = DatasetTask(task_cfg, build_tokenizer("arith"), 0, reward_columns(cfg, columns)).eval_prompts()
    assert all(p.meta["answer"] in ("3", "5") and "question" not in p.meta for p in prompts)
    items = [{"prompt": p.text, "response": r, "meta": p.meta} for p in prompts for r in ("3", "5")]
    scores = [o.score for o in RemoteRewardClient(url).score(items)]
    assert scores == [float(p.meta["answer"] == r) for p in prompts for r in ("3", "5")]
    assert 0 < scores.count(1.0) < len(items)


def test_a_column_the_served_function_requires_and_the_prompts_lack_stops_the_run_before_ray(
        served, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from async_rlhf.pipeline.controller import Controller

    url = served("tests.test_served_columns:needs_solution")
    monkeypatch.setattr(Controller, "_start_ray", lambda self: pytest.fail("Ray started for a reward that cannot run"))
    err = one_line_error(capsys, ["train", str(QUICKSTART), f"reward.remote.url={url}", "api.enabled=false",
                                  "--run-dir", str(tmp_path / "run")], 2, "config error: ")
    assert err == ("config error: reward.remote.url: the reward server's function takes solution, which the prompts "
                   "do not carry (their data: answer, digits); give the dataset that column (train and eval files "
                   "alike), or serve a function that does without it")


def test_a_server_that_wants_a_bearer_token_is_asked_for_its_columns_with_it(
        served, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi import Request
    from fastapi.responses import JSONResponse

    app = create_reward_app("graded", *rule_scorer("tests.test_served_columns:graded"))

    @app.middleware("http")
    async def auth(request: Request, call_next):  # as a hosted endpoint checks every call
        if request.headers.get("authorization") != "Bearer s3cret":
            return JSONResponse(status_code=401, content={"detail": "missing or wrong bearer token"})
        return await call_next(request)

    server = ThreadedServer(app)
    url = server.start()
    try:
        assert wait_for_server(url, 5.0, 10.0, print) == (None, None)  # up, but says nothing without the token
        monkeypatch.setenv("REWARD_TOKEN", "s3cret")
        cfg = load_config(QUICKSTART, [f"reward.remote.url={url}", "reward.remote.token_env=REWARD_TOKEN"])
        assert check_reward_server(cfg, log=print).required == {"answer"}
    finally:
        server.stop()


@pytest.mark.parametrize("health", [
    None, {"ok": True}, {"ok": True, "columns": "answer"}, {"columns": {"taken": "answer"}},
    {"columns": {"taken": [1]}}, {"columns": {"required": ["x", None]}}, ["columns"],
])
def test_a_server_that_says_no_columns_or_malformed_ones_takes_none(health: object) -> None:
    assert ServedColumns.read(health) == NO_SERVED


def test_a_served_learned_model_or_rule_takes_no_column() -> None:
    assert rule_scorer("sort_exact")[1] == NO_SERVED
    assert ServedColumns.read({"columns": NO_SERVED.answer()}) == NO_SERVED
