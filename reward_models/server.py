"""`async-rlhf serve-reward`: a reward model behind HTTP, speaking reward_models/protocol.py."""
from __future__ import annotations

import math
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from async_rlhf.outputs.recorder import json_ready
from async_rlhf.rollout import Prompt
from reward_models.columns import NO_SERVED, ServedColumns
from reward_models.protocol import MAX_BODY_BYTES, ScoreRequest, ScoreResponse
from reward_models.user_scorer import USER_RAISES, as_batch, resolve_scorer

BatchScorer = Callable[[list[Prompt], list[str]], list[float]]


def rule_scorer(name: str) -> tuple[BatchScorer, ServedColumns]:
    """A registered scorer or a user's "pkg.module:function" (UserCodeError, one line, otherwise), with the
    dataset columns it takes (a function in TRL's form: those it names)."""
    scorer = resolve_scorer(name, "serve-reward")
    return as_batch(scorer), ServedColumns.of(scorer)


def rule_batch_scorer(name: str) -> BatchScorer:
    return rule_scorer(name)[0]


def _score_each(scorer: BatchScorer, prompts: list[Prompt], responses: list[str]
                ) -> tuple[list[float | None], list[str | None]]:
    """Score the batch; if the batch call fails, fall back to one item at a time to isolate the bad item."""
    try:
        values = [float(v) for v in scorer(prompts, responses)]
        return ([v if math.isfinite(v) else None for v in values],
                [None if math.isfinite(v) else f"non-finite score {v}" for v in values])
    except USER_RAISES:
        scores: list[float | None] = []
        errors: list[str | None] = []
        for p, r in zip(prompts, responses):
            try:
                scores.append(float(scorer([p], [r])[0]))
                errors.append(None)
            except USER_RAISES as exc:  # reported per item; the server keeps serving
                scores.append(None)
                errors.append(f"{type(exc).__name__}: {exc}")
        return scores, errors


def create_reward_app(name: str, scorer: BatchScorer, columns: ServedColumns = NO_SERVED) -> FastAPI:
    """`columns`: what /healthz says the scorer takes of the prompts' data, so that a run's prompts carry it."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.scorer, app.state.name, app.state.columns = scorer, name, columns
        yield

    app = FastAPI(title="async-rlhf reward model", lifespan=lifespan)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
            detail = f"request body over {MAX_BODY_BYTES} bytes; send smaller batches"
            return JSONResponse(status_code=413, content={"detail": detail})
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return JSONResponse(status_code=422,
                            content={"detail": f"{where}: {first['msg']}",
                                     "errors": json_ready(jsonable_encoder(exc.errors()))})  # NaN, inf: null

    @app.get("/healthz")
    def healthz(request: Request) -> dict:
        return {"ok": True, "model": request.app.state.name, "columns": request.app.state.columns.answer()}

    @app.post("/score", response_model=ScoreResponse)
    def score(request: Request, body: ScoreRequest) -> dict:
        prompts = [Prompt(i, item.prompt, [], item.meta) for i, item in enumerate(body.items)]
        scores, errors = _score_each(request.app.state.scorer, prompts, [item.response for item in body.items])
        return {"scores": scores, "errors": errors, "model": request.app.state.name}

    return app
