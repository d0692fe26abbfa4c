"""The JSON protocol between the trainer and a remote reward model (see docs/reward_protocol.md).

POST /score   {"items": [{"prompt": str, "response": str, "meta": {...}}, ...]}
          ->  {"scores": [float | null, ...], "errors": [str | null, ...], "model": str}
A null score carries its reason in `errors` at the same index; the trainer never turns it into 0.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MAX_ITEMS = 512
MAX_CHARS = 20_000  # per prompt and per response
MAX_BODY_BYTES = 8 * 1024 * 1024


class ScoreItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(max_length=MAX_CHARS)
    response: str = Field(max_length=MAX_CHARS)
    meta: dict = Field(default_factory=dict, description="task data a rule scorer needs, e.g. the answer")


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[ScoreItem] = Field(min_length=1, max_length=MAX_ITEMS)


class ScoreResponse(BaseModel):
    scores: list[float | None]
    errors: list[str | None]
    model: str
