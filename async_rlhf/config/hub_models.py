"""A Hugging Face Hub model id where a checkpoint directory goes (`model.path: HuggingFaceTB/SmolLM2-135M`), as
TRL and vLLM take one: resolved to its snapshot in the Hub's own cache, downloaded first where it is not there.

Before, such an id was taken for a relative directory ("no config.json in '/home/me/HuggingFaceTB/SmolLM2-135M'").
A directory of that name, where there is one, still wins. Only what a checkpoint needs is fetched (config,
weights as safetensors, or as .bin files where it has none, tokenizer files), with the Hub's own settings:
$HF_HOME / $HF_HUB_CACHE, $HF_TOKEN for gated models, HF_HUB_OFFLINE=1 for the cache alone.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, as the Hub spells repository ids
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def is_hub_id(text: str) -> bool:
    """`text` reads as a Hub model id and names nothing on this machine (a directory of that name wins)."""
    return bool(HUB_ID.match(text)) and ".." not in text and not Path(text).exists()


def hub_snapshot(repo_id: str) -> Path:
    """The directory of `repo_id`'s checkpoint in the Hub's cache, downloaded first where it is not cached;
    ValueError, in one line that names both readings of the value, where neither gives one."""
    folder = _snapshot(repo_id, CHECKPOINT_FILES)
    if not any(folder.glob("*.safetensors")):  # an older checkpoint (pythia's first uploads): pytorch_model*.bin
        folder = _snapshot(repo_id, ["*.bin"])
    return folder


def _snapshot(repo_id: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except LocalEntryNotFoundError:  # not cached (yet)
        pass
    here = f"'{repo_id}' is neither a directory here ({Path(repo_id).absolute()})"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ValueError(f"{here} nor in the Hugging Face cache, and HF_HUB_OFFLINE is set; download it where the Hub "
                         "can be reached, or point it at a checkpoint directory")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # the Hub's many errors (not found, gated, no network): the reason is in the text
        raise ValueError(f"{here} nor a model the Hugging Face Hub gave ({hub_reason(exc)}); point it at a checkpoint "
                         "directory, or fix the id") from None


def hub_reason(exc: BaseException) -> str:
    """The first line of the Hub's error, the class's name where it has none, and never a token."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    first = lines[0] if lines else type(exc).__name__
    first = re.sub(r"hf_[A-Za-z0-9]{8,}", "***", first)
    return first if len(first) <= 200 else first[:197] + "..."
