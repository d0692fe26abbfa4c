"""Base pieces shared by the config modules: the one-line error and the strict model."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationInfo


class ConfigError(ValueError):
    """A configuration problem, explained in one line."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def environment_checks(info: ValidationInfo) -> bool:
    """Whether to check this machine (files present, CUDA visible, packages installed) besides the config.

    False when validating a config written for another machine (`check-config --portable`, the CI check
    of configs/paper/): those checks then happen when the run starts on the machine it was written for.
    """
    return bool((info.context or {}).get("environment", True))
