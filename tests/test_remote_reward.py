"""Remote reward model over real HTTP on localhost: server validation and the client's retries.

Faults are injected by a middleware in front of the real server app (a flaky network and an
overloaded server are exactly what cannot be summoned on demand).
"""
from __future__ import annotations

import asyncio
import random

import httpx
import pytest
from fastapi import Request
from fastapi.responses import JSONResponse

from async_rlhf.api.serving import ThreadedServer
from async_rlhf.config.base import ConfigError
from async_rlhf.config.run import config_yaml, load_config
from async_rlhf.failures import RunError
from reward_models.remote import RemoteRewardClient
from reward_models.server import create_reward_app, rule_batch_scorer
from tests.helpers import QUICKSTART, free_port

ITEMS = [{"prompt": "21>", "response": r, "meta": {"digits": "21", "answer": "12"}} for r in ("12", "21", "1", "")]


def flaky_app(fail_rate: float = 0.0, slow_rate: float = 0.0, slow_s: float = 0.0, seed: int = 0):
    app = create_reward_app("sort_exact", rule_batch_scorer("sort_exact"))
    rng = random.Random(seed)
    app.state.calls = 0

    @app.middleware("http")
    async def faults(request: Request, call_next):
        app.state.calls += 1
        roll = rng.random()
        if roll < fail_rate:
            return JSONResponse(status_code=503, content={"detail": "injected failure"})
        if roll < fail_rate + slow_rate:
            await asyncio.sleep(slow_s)
        return await call_next(request)

    return app


@pytest.fixture
def serve():
    servers = []

    def start(app) -> str:
        server = ThreadedServer(app)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


def test_server_scores_and_validates(serve) -> None:
    url = serve(create_reward_app("sort_exact", rule_batch_scorer("sort_exact")))
    ok = httpx.post(f"{url}/score", json={"items": ITEMS})
    assert ok.json() == {"scores": [1.0, 0.0, 0.0, 0.0], "errors": [None] * 4, "model": "sort_exact"}
    no_columns = {"taken": [], "every": False, "required": []}
    assert httpx.get(f"{url}/healthz").json() == {"ok": True, "model": "sort_exact", "columns": no_columns}
    cases = {
        "missing items": ({}, 422, "items: Field required"),
        "empty batch": ({"items": []}, 422, "items: List should have at least 1 item"),
        "extra key": ({"items": ITEMS, "x": 1}, 422, "x: Extra inputs are not permitted"),
        "wrong type": ({"items": [{"prompt": 1, "response": "1"}]}, 422,
                       "items.0.prompt: Input should be a valid string"),
        "too long": ({"items": [{"prompt": "1", "response": "9" * 20_001}]}, 422, "at most 20000 characters"),
    }
    for name, (body, code, message) in cases.items():
        reply = httpx.post(f"{url}/score", json=body)
        assert reply.status_code == code and message in reply.json()["detail"], name
    huge = httpx.post(f"{url}/score", content=b"x" * (8 * 1024 * 1024 + 1),
                      headers={"Content-Type": "application/json"})
    assert huge.status_code == 413 and "send smaller batches" in huge.json()["detail"]


def test_a_function_of_your_own_is_served_in_either_form(serve) -> None:
    items = [{"prompt": "21>", "response": r, "meta": {"reference": "12", "answer": "12"}} for r in ("12", "1", "1222")]
    url = serve(create_reward_app("own", rule_batch_scorer("examples.rewards:close_and_brief")))
    assert httpx.post(f"{url}/score", json={"items": items}).json()["scores"] == [1.0, 2 / 3, 2 / 3 - 2 * 0.05]
    url = serve(create_reward_app("trl", rule_batch_scorer("examples.rewards:exact_match")))  # TRL's form
    assert httpx.post(f"{url}/score", json={"items": items}).json()["scores"] == [1.0, 0.0, 0.0]


def test_a_failing_item_is_isolated_and_reported(serve) -> None:
    def picky(prompts, responses):
        if "boom" in responses:
            raise ValueError("cannot score 'boom'")
        return [1.0 for _ in responses]

    url = serve(create_reward_app("picky", picky))
    items = [{"prompt": "p", "response": "ok"}, {"prompt": "p", "response": "boom"}]
    body = httpx.post(f"{url}/score", json={"items": items}).json()
    assert body["scores"] == [1.0, None] and body["errors"] == [None, "ValueError: cannot score 'boom'"]
    outcomes = RemoteRewardClient(url).score([{"prompt": "p", "response": "boom", "meta": {}}])
    assert outcomes[0].status == "failed" and "cannot score" in (outcomes[0].error or "")


def test_client_retries_through_30_percent_failures_and_timeouts(serve) -> None:
    app = flaky_app(fail_rate=0.3, slow_rate=0.1, slow_s=1.0, seed=1)
    client = RemoteRewardClient(serve(app), timeout_s=0.5, retries=8, backoff_s=0.01, deadline_s=30)
    results = [client.score(ITEMS) for _ in range(20)]
    assert all([o.score for o in r] == [1.0, 0.0, 0.0, 0.0] for r in results)
    assert client.counts["retries"] > 0 and client.counts["timeouts"] > 0 and client.counts["http_errors"] > 0
    assert client.counts["calls"] == 20 + client.counts["retries"]


def test_client_gives_up_with_a_reason_never_a_zero(serve) -> None:
    down = RemoteRewardClient(serve(flaky_app(fail_rate=1.0)), retries=2, backoff_s=0.01)
    outcomes = down.score(ITEMS)
    assert {o.status for o in outcomes} == {"failed"} and all(o.score is None for o in outcomes)
    assert "HTTP 503" in (outcomes[0].error or "") and down.counts["calls"] == 3
    slow = RemoteRewardClient(serve(flaky_app(slow_rate=1.0, slow_s=2.0)), timeout_s=0.2, retries=1, backoff_s=0.01)
    assert {o.status for o in slow.score(ITEMS)} == {"timed_out"}
    unreachable = RemoteRewardClient("http://127.0.0.1:9", retries=1, backoff_s=0.01)
    assert "unreachable" in (unreachable.score(ITEMS)[0].error or "")


def test_client_does_not_retry_its_own_bad_request_and_respects_the_deadline(serve) -> None:
    url = serve(create_reward_app("sort_exact", rule_batch_scorer("sort_exact")))
    client = RemoteRewardClient(url, retries=5)
    outcome = client.score([{"prompt": "p"}])[0]  # no response field: the server says 422
    assert outcome.status == "failed" and "HTTP 422" in (outcome.error or "") and client.counts["calls"] == 1
    late = RemoteRewardClient(serve(flaky_app(fail_rate=1.0)), retries=50, backoff_s=0.2, deadline_s=1.0)
    late.score(ITEMS)
    assert late.counts["calls"] < 10


def test_a_reward_server_that_does_not_answer_is_said_before_any_worker_starts(tmp_path, capsys) -> None:
    """Found by hand: with the server down the run started every worker and ended 3 steps later."""
    import time

    from async_rlhf.cli.main import main
    from async_rlhf.pipeline.controller import Controller
    from tests.helpers import QUICKSTART

    url = f"http://bob:hunter2@127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Controller, "_start_ray", lambda self: pytest.fail("Ray started for an unreachable reward"))
        code = main(["train", str(QUICKSTART), f"reward.remote.url={url}", "reward.remote.deadline_s=1.5",
                     "api.enabled=false", "--run-dir", str(tmp_path / "run")])
    assert code == 2 and time.monotonic() - started < 60
    out, err = capsys.readouterr()
    host = url.replace("bob:hunter2", "***")
    assert f"waiting up to 1.5s for the reward server at {host} (ConnectError: " in out
    assert err.strip().startswith(f"config error: reward.remote.url: {host} did not answer within 1.5s (ConnectError")
    assert err.strip().endswith("start the reward server first (async-rlhf serve-reward, docs/reward_protocol.md), "
                                "or fix the URL")
    assert "hunter2" not in out + err


def test_a_reward_server_still_starting_gets_its_time_and_any_answer_counts(serve) -> None:
    import threading
    import time

    from reward_models.remote import wait_for_server

    port, told = free_port(), list[str]()
    server = ThreadedServer(create_reward_app("sort_exact", rule_batch_scorer("sort_exact")), port=port)
    threading.Timer(1.0, server.start).start()  # up a second from now
    try:
        assert wait_for_server(f"http://127.0.0.1:{port}", 1.0, 20.0, told.append)[0] is None
    finally:
        time.sleep(0.5)
        server.stop()
    assert len(told) == 1 and "ConnectError" in told[0]  # said once, while it waited
    from fastapi import FastAPI

    bare = serve(FastAPI())  # no /healthz: 404 is an answer, so the server is up
    assert wait_for_server(bare, 1.0, 5.0, told.append) == (None, None) and len(told) == 1


def token_app(token: str):
    """The real reward server behind a bearer-token check, as a hosted inference endpoint is."""
    app = create_reward_app("sort_exact", rule_batch_scorer("sort_exact"))

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if request.headers.get("authorization") != f"Bearer {token}":
            return JSONResponse(status_code=401, content={"detail": "missing or wrong bearer token"})
        return await call_next(request)

    return app


def test_a_server_that_wants_a_bearer_token_gets_it_from_the_variable_token_env_names(
        serve, monkeypatch: pytest.MonkeyPatch) -> None:
    # Only credentials in the URL (basic auth) could be given: a hosted endpoint's API key could not.
    url = serve(token_app("s3cret"))
    refused = RemoteRewardClient(url, retries=3).score(ITEMS)[0]  # a 401 is not retried, and says what the server said
    assert refused.error == ('reward server answered HTTP 401: {"detail":"missing or wrong bearer token"} '
                             "(after 1 calls)")
    monkeypatch.setenv("REWARD_TOKEN", "s3cret")
    assert [o.score for o in RemoteRewardClient(url, token_env="REWARD_TOKEN").score(ITEMS)] == [1.0, 0.0, 0.0, 0.0]
    monkeypatch.delenv("REWARD_TOKEN")
    with pytest.raises(RunError, match=r"^reward.remote.token_env: \$REWARD_TOKEN is not set in the reward actor's"):
        RemoteRewardClient(url, token_env="REWARD_TOKEN")


def test_token_env_is_checked_before_the_run_and_the_token_never_enters_the_config(
        monkeypatch: pytest.MonkeyPatch) -> None:
    remote = ["reward.remote.url=http://127.0.0.1:9", "reward.remote.token_env=REWARD_TOKEN"]
    monkeypatch.delenv("REWARD_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=r"reward.remote.token_env: \$REWARD_TOKEN is not set \(or empty\); export"):
        load_config(QUICKSTART, remote)
    assert load_config(QUICKSTART, remote, environment=False).reward.remote is not None  # another machine's config
    monkeypatch.setenv("REWARD_TOKEN", "s3cret")
    assert "s3cret" not in config_yaml(load_config(QUICKSTART, remote))
