"""HTTP status and control for a running job: FastAPI, served by uvicorn in a thread of the driver.

Reads (`/healthz`, `/status`, `/queue`, `/history`, `/metrics`, `/`) are open when bound to
loopback; `/control/*` always needs `Authorization: Bearer <token>`. Control endpoints only post
commands to `RunControl`; the controller loop applies them at safe points.
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
import secrets
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from async_rlhf.api.errors import internal_error, log_server_to
from async_rlhf.api.metrics import prometheus_text
from async_rlhf.api.serving import ThreadedServer
from async_rlhf.config.base import ConfigError
from async_rlhf.config.run import RunConfig
from async_rlhf.config.runtime import API_TOKEN_ENV, ApiConfig
from async_rlhf.failures import what_died
from async_rlhf.outputs.recorder import json_ready
from async_rlhf.pipeline.control import RunControl
from async_rlhf.pipeline.status import Health, Status, health_of, status_of
from async_rlhf.pipeline.view import RunView

CHECKPOINT_TIMEOUT_S = 300.0
MAX_BODY_BYTES = 4096  # control bodies are a few bytes
# /history pages: a step record is ~0.8 kB, so a long run's whole metrics.jsonl (100k steps: 80 MB) is never one answer
HISTORY_PAGE, HISTORY_MAX = 1000, 10000
PAGE = Path(__file__).with_name("web") / "index.html"
ERROR_LOG = "api_errors.log"  # in the run directory: the API's own tracebacks and uvicorn's warnings


# ---- response and request models (/status and /healthz: pipeline/status.py) ------------------------------
# Status and Health, the status document, are declared once, in async_rlhf/pipeline/status.py.
class QueueInfo(BaseModel):
    depth: int
    capacity: int
    max_staleness: int
    produced: int
    consumed: int
    dropped_stale: int
    failed_reward: int
    staleness_histogram: dict[str, int]
    max_staleness_seen: int
    oldest_age_s: float


class History(BaseModel):
    steps: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    next_since: int = Field(description="`since` for the next page: the steps so far in this answer and before it")
    more: bool = Field(description="steps past this page are logged already (ask again with next_since)")


class MaxStalenessRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_staleness: int = Field(ge=0, le=64, strict=True,  # strict: true, "3" and 3.0 are refused, not coerced
                               description="new bound N; 0 = synchronous")


class ControlResult(BaseModel):
    ok: bool
    action: Literal["pause", "resume", "stop", "checkpoint", "max_staleness"]
    phase: str
    detail: dict[str, Any] = {}


# ---- the app --------------------------------------------------------------------------------
def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _check_token(expected: str, creds: HTTPAuthorizationCredentials | None) -> None:
    if creds is None:
        raise HTTPException(401, "missing 'Authorization: Bearer <token>' header (token: run_dir/api_token)",
                            headers={"WWW-Authenticate": "Bearer"})
    if not secrets.compare_digest(creds.credentials.encode(), expected.encode()):
        raise HTTPException(403, "wrong bearer token (see run_dir/api_token or $ASYNC_RLHF_API_TOKEN)")


def refusal(request: Request, creds: HTTPAuthorizationCredentials | None) -> JSONResponse | None:
    """What is refused before FastAPI reads a body: one over MAX_BODY_BYTES (it would be held and parsed in the
    driver, beside the loop), one of unknown length, and a control call without the token (the routes check it
    again; without this, a bad body was parsed, and answered 422, before the token was looked at)."""
    length = request.headers.get("content-length")
    if length is None and "chunked" in request.headers.get("transfer-encoding", "").lower():
        return JSONResponse(status_code=411, content={"detail": f"send a Content-Length (at most {MAX_BODY_BYTES} "
                                                                f"bytes)"})
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
        return JSONResponse(status_code=413, content={"detail": f"request body over {MAX_BODY_BYTES} bytes; a "
                                                                f"control body is like {{\"max_staleness\": 2}}"})
    if request.method in ("POST", "PUT", "PATCH") and request.url.path.startswith("/control/"):
        try:
            _check_token(request.app.state.token, creds)
        except HTTPException as exc:
            return JSONResponse(status_code=exc.status_code, content={"detail": exc.detail}, headers=exc.headers)
    return None


def create_app(view: RunView, control: RunControl, token: str, open_reads: bool,
               error_log: Path | None = None) -> FastAPI:
    """The run's API: reads from `view`, commands posted to `control` (the loop applies them). An error of its own
    is answered 500 and said as one line naming `error_log` (api/errors.py)."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.view = view
        app.state.control = control
        app.state.token = token
        yield

    app = FastAPI(title="async-rlhf", version="0.1.0", lifespan=lifespan,
                  description="Status, metrics and control of an asynchronous RLHF run.")
    bearer = HTTPBearer(auto_error=False)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        refused = refusal(request, await bearer(request))  # the header only: the body is not read
        return refused if refused is not None else await call_next(request)

    def control_auth(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        _check_token(request.app.state.token, creds)

    def read_auth(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not open_reads:
            _check_token(request.app.state.token, creds)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            reason = first.get("ctx", {}).get("error", "cannot be parsed")
            message = f"request body is not valid JSON ({reason}); send e.g. {{\"max_staleness\": 2}}"
        else:
            where = ".".join(str(p) for p in first["loc"])
            message = f"{where}: {first['msg']}"
        return JSONResponse(status_code=422, content={"detail": message,
                                                      "errors": json_ready(jsonable_encoder(exc.errors()))})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail
        if exc.status_code == 404:
            detail = f"no such path {request.url.path}; the API is described at /docs and /openapi.json"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}; see /docs"
        return JSONResponse(status_code=exc.status_code, content={"detail": detail}, headers=exc.headers)

    if error_log is not None:
        app.add_exception_handler(Exception, internal_error(error_log))
    _add_read_routes(app, read_auth)
    _add_control_routes(app, control_auth)
    return app


def _view(request: Request) -> RunView:
    return request.app.state.view


def _control(request: Request) -> RunControl:
    return request.app.state.control


def _add_read_routes(app: FastAPI, auth: Any) -> None:
    @app.get("/healthz", response_model=Health, response_model_exclude_none=True, dependencies=[Depends(auth)],
             responses={503: {"model": Health, "description": "a component is down or the loop is stuck"}})
    def healthz(request: Request) -> JSONResponse:
        """HTTP 503 when not ok: probes and load balancers read the status code, not the body."""
        health = health_of(_view(request))
        return JSONResponse(jsonable_encoder(health, exclude_none=True), status_code=200 if health.ok else 503)

    @app.get("/status", response_model=Status, dependencies=[Depends(auth)])
    def status(request: Request) -> Status:
        return status_of(_view(request))

    @app.get("/queue", response_model=QueueInfo, dependencies=[Depends(auth)])
    def queue(request: Request) -> dict:
        return _view(request).queue_snapshot()

    @app.get("/history", response_model=History, dependencies=[Depends(auth)])
    def history(request: Request, since: int = Query(0, ge=0, description="skip the first `since` steps"),
                limit: int = Query(HISTORY_PAGE, ge=1, le=HISTORY_MAX, description="at most this many steps")) -> dict:
        return _view(request).history(since, limit)

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(auth)])
    def metrics(request: Request) -> PlainTextResponse:
        return PlainTextResponse(prometheus_text(_view(request)), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text())


def _add_control_routes(app: FastAPI, auth: Any) -> None:
    def result(request: Request, action: str, **detail: Any) -> dict:
        return {"ok": True, "action": action, "phase": _view(request).phase.value, "detail": detail}

    @app.post("/control/pause", response_model=ControlResult, dependencies=[Depends(auth)])
    def pause(request: Request) -> dict:
        _control(request).pause()
        return result(request, "pause", paused=True)

    @app.post("/control/resume", response_model=ControlResult, dependencies=[Depends(auth)])
    def resume(request: Request) -> dict:
        _control(request).resume()
        return result(request, "resume", paused=False)

    @app.post("/control/stop", response_model=ControlResult, dependencies=[Depends(auth)])
    def stop(request: Request) -> dict:
        _control(request).request_stop()
        return result(request, "stop", stopping=True)

    @app.put("/control/max_staleness", response_model=ControlResult, dependencies=[Depends(auth)],
             responses={409: {"description": "queue.staleness_mode=fixed: the delay is fixed for the run"}})
    def max_staleness(request: Request, body: MaxStalenessRequest) -> dict:
        if _view(request).staleness_mode == "fixed":  # the broker keeps only the N + 2 versions it needs
            raise HTTPException(409, "queue.staleness_mode=fixed: max_staleness is the run's fixed delay and "
                                     "cannot change while it runs; start a new run (or use staleness_mode=bound)")
        _control(request).request_max_staleness(body.max_staleness)
        return result(request, "max_staleness", requested=body.max_staleness)

    @app.post("/control/checkpoint", response_model=ControlResult, dependencies=[Depends(auth)],
              responses={409: {"description": "the run ended before the checkpoint"}, 504: {"description": "timeout"}})
    async def checkpoint(request: Request) -> dict:
        phase = _view(request).phase
        if phase.ended:
            raise HTTPException(409, f"run is {phase.value}; no checkpoint can be taken")
        future = _control(request).request_checkpoint()
        try:
            done = await asyncio.wait_for(asyncio.wrap_future(future), CHECKPOINT_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise HTTPException(504, f"checkpoint not written within {CHECKPOINT_TIMEOUT_S:.0f}s") from None
        except Exception as exc:  # the run ended first (409), or the write failed (500: a full disk, a worker's error)
            ended = type(exc) is RuntimeError  # ours (fail_pending_checkpoints); a worker's error may subclass it
            raise HTTPException(409 if ended else 500, str(exc) if ended else what_died(exc)) from None
        return result(request, "checkpoint", **done)


# ---- serving ----------------------------------------------------------------------------------
def resolve_token(cfg: ApiConfig, run_dir: Path) -> str:
    """Token from config, else the environment, else a new one written to run_dir/api_token (0600)."""
    token = cfg.token or os.environ.get(API_TOKEN_ENV)
    if not token:
        token = secrets.token_urlsafe(24)
        write_token(token, run_dir)
    return token


def write_token(token: str, run_dir: Path) -> None:
    fd = os.open(run_dir / "api_token", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")


class ApiServer:
    """The run's API on a ThreadedServer; the URL is written to run_dir/api_url."""

    def __init__(self, view: RunView, control: RunControl, cfg: ApiConfig, run_dir: Path) -> None:
        token = resolve_token(cfg, run_dir)
        app = create_app(view, control, token, open_reads=_is_loopback(cfg.host), error_log=run_dir / ERROR_LOG)
        self.server = ThreadedServer(app, cfg.host, cfg.port)
        log_server_to(run_dir / ERROR_LOG)  # after uvicorn's own logging set-up (its Config's)
        self.run_dir = run_dir
        self.url = ""
        # a token made here is in run_dir/api_token; one of the config's or the environment's is in no file
        self.made_token = "" if cfg.token or os.environ.get(API_TOKEN_ENV) else token

    def start(self) -> str:
        try:
            self.url = self.server.start()
        except OSError as exc:  # e.g. the port is taken: before any worker starts, so nothing is lost
            config = self.server.server.config
            raise ConfigError(f"config error: api: cannot serve on {config.host}:{config.port} ({exc.strerror}); set "
                              "api.host and api.port to an address this machine can serve (api.port=0: any free "
                              "port), or api.enabled=false") from None
        self.write_files()
        return self.url

    def write_files(self) -> None:
        """run_dir/api_token (a token made here) and api_url (once serving); again if the directory was made
        again (RunDirKeeper)."""
        if self.made_token:
            write_token(self.made_token, self.run_dir)
        if self.url:
            (self.run_dir / "api_url").write_text(self.url + "\n")

    def stop(self) -> None:
        self.server.stop()


def serve_api(cfg: RunConfig, run_dir: Path, view: RunView, control: RunControl) -> ApiServer:
    """The controller's service starter (pipeline.controller.ServiceStarter): the API, started and announced."""
    api = ApiServer(view, control, cfg.api, run_dir)
    url = api.start()
    where = f"in {run_dir / 'api_token'} unless set by api.token or ${API_TOKEN_ENV}"
    needs = (f"control token {where}" if _is_loopback(cfg.api.host)
             else f"reads and control need the token {where}; the page: {url}/#token=TOKEN")
    print(f"[async-rlhf] status and control at {url} ({needs})", flush=True)
    return api
