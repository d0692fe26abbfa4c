"""Base pieces shared by the config modules: the one-line error and the strict model."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration problem, explained in one line."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
