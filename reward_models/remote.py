"""RemoteRewardClient: scores through an HTTP reward model with timeouts, retries and a deadline.

Timeouts, connection errors, 429 and 5xx are retried with exponential back-off (with jitter) until
`retries` or `deadline_s` runs out; other 4xx are the caller's bug and are not retried. Whatever
still has no score is reported as failed or timed out, with the reason, never as a reward.
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

import httpx

from async_rlhf.failures import RunError
from async_rlhf.rollout import RewardStatus


@dataclass
class Outcome:
    score: float | None
    status: RewardStatus
    error: str | None = None


MAX_REPLY_BYTES = 16 << 20  # a reply past this is refused unread by the parser, not trusted


def _outcome(score: object, error: object) -> Outcome:
    """One item's result from whatever the server put there: only a finite real number is a reward."""
    if score is None:
        return Outcome(None, "failed", str(error) if error else "no score")
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        return Outcome(None, "failed", f"non-numeric score {_short(score)}")
    if not math.isfinite(score):
        return Outcome(None, "failed", f"non-finite score {score}")
    return Outcome(float(score), "ok")


def _reply_problem(resp: httpx.Response, n: int) -> str | None:
    """Why a 200 reply cannot be read as n scores, or None when its shape is right."""
    kind = resp.headers.get("content-type", "")
    if "json" not in kind:
        return f"content type '{kind or 'none'}', expected application/json"
    if len(resp.content) > MAX_REPLY_BYTES:
        return f"{len(resp.content)} bytes, more than {MAX_REPLY_BYTES}"
    try:
        body = resp.json()
    except ValueError as exc:
        return f"not JSON ({exc})"
    if not isinstance(body, dict) or not isinstance(body.get("scores"), list):
        return f"expected an object with a 'scores' list, got {_short(body)}"
    if len(body["scores"]) != n:
        return f"{len(body['scores'])} scores for {n} items"
    errors = body.get("errors")
    if errors is not None and (not isinstance(errors, list) or len(errors) != n):
        return f"'errors' must be a list of {n} entries, got {_short(errors)}"
    return None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def wait_for_server(url: str, timeout_s: float, deadline_s: float, waiting: Callable[[str], None],
                    headers: dict[str, str] | None = None) -> tuple[str | None, Any]:
    """(None, its /healthz answer's JSON, or None) once the server at `url` answers HTTP at all (any status: a
    server without /healthz is up too), else (why not, None) after `deadline_s` (connection refused, timed out,
    ...). `waiting` is told the first failure, so that a server still starting up gets its time and a forgotten
    one is said at once. `headers`: the bearer token, for a server that wants it on every call."""
    end = time.monotonic() + deadline_s
    told = False
    while True:
        try:
            answer = httpx.get(f"{url.rstrip('/')}/healthz", timeout=min(timeout_s, deadline_s), headers=headers)
            return None, _json(answer)
        except httpx.HTTPError as exc:
            text = str(exc)
            quotes_url = "://" in text or "@" in text  # its credentials must not be echoed
            why = type(exc).__name__ if quotes_url or not text else f"{type(exc).__name__}: {text}"
        if time.monotonic() + 0.5 > end:
            return why, None
        if not told:
            waiting(why)
            told = True
        time.sleep(0.5)


def _json(resp: httpx.Response) -> Any:
    try:
        return resp.json() if resp.status_code == 200 else None
    except ValueError:  # not JSON: a server of another kind, up all the same
        return None


def bearer(token_env: str | None) -> dict[str, str]:
    """The Authorization header from the variable `token_env` names, read in this process (the reward actor's:
    the token travels in no config, argument or log); none without one."""
    if token_env is None:
        return {}
    token = os.environ.get(token_env)
    if not token:
        raise RunError(f"reward.remote.token_env: ${token_env} is not set in the reward actor's process; export it "
                       "where the run's Ray workers start (on a cluster: on every node, before `ray start`)")
    return {"Authorization": f"Bearer {token}"}


class RemoteRewardClient:
    def __init__(self, url: str, timeout_s: float = 10.0, retries: int = 4, backoff_s: float = 0.5,
                 deadline_s: float = 60.0, seed: int = 0, token_env: str | None = None) -> None:
        self.url = url.rstrip("/") + "/score"
        self.timeout_s, self.retries, self.backoff_s, self.deadline_s = timeout_s, retries, backoff_s, deadline_s
        self.client = httpx.Client(timeout=timeout_s, headers=bearer(token_env))
        self.rng = random.Random(seed)
        self.counts = {"calls": 0, "retries": 0, "timeouts": 0, "http_errors": 0}

    def score(self, items: list[dict]) -> list[Outcome]:
        deadline = time.monotonic() + self.deadline_s
        last: Outcome = Outcome(None, "failed", "no attempt made")
        calls = 0
        for attempt in range(self.retries + 1):
            if attempt:
                self.counts["retries"] += 1
                pause = self.backoff_s * 2 ** (attempt - 1) * (0.5 + self.rng.random())
                if time.monotonic() + pause >= deadline:
                    break
                time.sleep(pause)
            result, calls = self._attempt(items), calls + 1
            if isinstance(result, list):
                return result
            last, retryable = result
            if not retryable:
                break
        return [Outcome(None, last.status, f"{last.error} (after {calls} calls)") for _ in items]

    def _attempt(self, items: list[dict]) -> list[Outcome] | tuple[Outcome, bool]:
        self.counts["calls"] += 1
        try:
            resp = self.client.post(self.url, json={"items": items})
        except httpx.TimeoutException:
            self.counts["timeouts"] += 1
            return Outcome(None, "timed_out", f"reward server did not answer within {self.timeout_s:g}s"), True
        except httpx.TransportError as exc:
            return Outcome(None, "failed", f"reward server unreachable: {type(exc).__name__}"), True
        if resp.status_code != 200:
            self.counts["http_errors"] += 1
            retryable = resp.status_code == 429 or resp.status_code >= 500
            reason = f"reward server answered HTTP {resp.status_code}: {resp.text[:200]}"
            return Outcome(None, "failed", reason), retryable
        return self._parse(resp, len(items))

    @staticmethod
    def _parse(resp: httpx.Response, n: int) -> list[Outcome] | tuple[Outcome, bool]:
        problem = _reply_problem(resp, n)
        if problem is not None:
            return Outcome(None, "failed", f"malformed reward server reply: {problem}"), False
        body = resp.json()
        errors = body.get("errors") or [None] * n
        return [_outcome(s, e) for s, e in zip(body["scores"], errors)]

    def close(self) -> None:
        self.client.close()
