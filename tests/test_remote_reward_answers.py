"""Every shape of unusable answer from a remote reward model, served over real HTTP on localhost, marks
the items failed with a reason: never a crash, never a reward."""
from __future__ import annotations

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from async_rlhf.api.serving import ThreadedServer
from reward_models import remote
from reward_models.remote import RemoteRewardClient

ITEMS: list[dict] = [{"prompt": "21>", "response": r, "meta": {}} for r in ("12", "21", "1")]
JSON = "application/json"

# (name, what the server answers, what the first item's reason must say)
ANSWERS = [
    ("strings", JSONResponse({"scores": ["0.5", "high", "1"]}), "non-numeric score '0.5'"),
    ("booleans", JSONResponse({"scores": [True, False, True]}), "non-numeric score True"),
    ("objects", JSONResponse({"scores": [{"v": 1}, [1], None]}), "non-numeric score {'v': 1}"),
    ("nan", Response('{"scores": [NaN, Infinity, -Infinity]}', media_type=JSON), "non-finite score nan"),
    ("short list", JSONResponse({"scores": [0.1]}), "1 scores for 3 items"),
    ("long list", JSONResponse({"scores": [0.1, 0.2, 0.3, 0.4]}), "4 scores for 3 items"),
    ("no scores", JSONResponse({"score": [1, 2, 3]}), "expected an object with a 'scores' list"),
    ("scores not a list", JSONResponse({"scores": "1,2,3"}), "expected an object with a 'scores' list"),
    ("a list body", JSONResponse([0.1, 0.2, 0.3]), "expected an object with a 'scores' list"),
    ("bad errors", JSONResponse({"scores": [1, 2, 3], "errors": "oops"}), "'errors' must be a list of 3 entries"),
    ("html page", PlainTextResponse("<html><body>502 Bad Gateway</body></html>", media_type="text/html"),
     "content type 'text/html"),
    ("not json", Response("{scores: [1, 2", media_type=JSON), "not JSON"),
    ("no content type", Response(b'{"scores": [1, 2, 3]}', media_type=None), "content type 'none'"),
]


@pytest.fixture(scope="module")
def server():
    app = FastAPI()
    app.state.answer = None

    @app.post("/score")
    async def score(request: Request):
        return app.state.answer

    running = ThreadedServer(app)
    url = running.start()
    yield app, url
    running.stop()


@pytest.mark.parametrize("name,answer,reason", ANSWERS, ids=[a[0] for a in ANSWERS])
def test_an_unusable_answer_fails_every_item_with_its_reason(server, name: str, answer: Response, reason: str) -> None:
    app, url = server
    app.state.answer = answer
    outcomes = RemoteRewardClient(url, retries=0).score(ITEMS)
    assert len(outcomes) == len(ITEMS)
    assert all(o.score is None and o.status == "failed" for o in outcomes), outcomes
    assert reason in (outcomes[0].error or ""), outcomes[0].error


def test_a_reply_past_its_size_is_refused(server, monkeypatch: pytest.MonkeyPatch) -> None:
    app, url = server
    app.state.answer = JSONResponse({"scores": [0.1, 0.2, 0.3], "pad": "x" * 2000})
    monkeypatch.setattr(remote, "MAX_REPLY_BYTES", 1000)  # a small limit instead of a 16 MiB reply
    outcome = RemoteRewardClient(url, retries=0).score(ITEMS)[0]
    assert outcome.status == "failed" and "more than 1000" in (outcome.error or "")


def test_mixed_answers_keep_the_usable_scores(server) -> None:
    app, url = server
    app.state.answer = JSONResponse({"scores": [0.25, "x", None], "errors": [None, None, "model overloaded"]})
    ok, bad, missing = RemoteRewardClient(url, retries=0).score(ITEMS)
    assert (ok.status, ok.score) == ("ok", 0.25)
    assert bad.status == "failed" and "non-numeric score 'x'" in (bad.error or "")
    assert missing.status == "failed" and missing.error == "model overloaded"
