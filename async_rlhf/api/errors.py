"""The API's own failures stay off the run's terminal.

`PUT /control/max_staleness` with `{"max_staleness": 1e309}` (or NaN) answered 500 and printed two uvicorn
tracebacks on the run's terminal: the 422 that pydantic's error makes echoes the input, and JSON has no infinity.
Errors now carry such inputs as null, as every JSON of the run does (`outputs/recorder.py json_ready`). An error of
the API's own is answered 500 with one line, said once on the terminal as that line, its traceback in
run_dir/api_errors.log with uvicorn's other messages (a malformed HTTP request's warning included): the run goes
on either way.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Awaitable, Callable

from fastapi import Request
from fastapi.responses import JSONResponse

from async_rlhf.failures import what_died

SERVER_LOGGERS = ("uvicorn.error", "uvicorn.asgi")  # uvicorn's tracebacks and warnings (its access log is off)


def log_server_to(path: Path) -> None:
    """uvicorn's messages to `path` (made at the first one) instead of the terminal."""
    handler = logging.FileHandler(path, delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    for name in SERVER_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False


def internal_error(log: Path) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    """The handler of an error of the API's own: 500 with one line, and that line on the terminal."""
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        line = (f"the HTTP API failed on {request.method} {request.url.path} ({what_died(exc)}); the run goes on; "
                f"traceback in {log}")
        print(f"[async-rlhf] {line}", file=sys.stderr, flush=True)
        return JSONResponse(status_code=500, content={"detail": line})
    return handle
