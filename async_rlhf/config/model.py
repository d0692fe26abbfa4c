"""The `model:` section: which policy a run starts from (embedded tiny Llama or a local HF checkpoint)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from async_rlhf.config.base import Strict, environment_checks
from async_rlhf.config.pretrained_names import checkpoint_path
from async_rlhf.config.weights_files import check_weights


class EmbeddedModelConfig(Strict):
    """A tiny Llama built locally and warm-started by supervised learning on the task."""

    hidden_size: int = Field(128, ge=16)
    intermediate_size: int = Field(512, ge=16)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(2, ge=1)
    sft_steps: int = Field(400, ge=0)
    sft_batch_size: int = Field(64, ge=1)
    sft_lr: float = Field(2e-3, gt=0)
    sft_correct_fraction: float = Field(
        0.4, gt=0, le=1, description="share of supervised targets that are correct; the rest are corrupted"
    )
    seed: int = Field(0, ge=0, lt=2**32, description="the warm start's own seed (its weights and its prompts)")

    @model_validator(mode="after")
    def _heads(self) -> "EmbeddedModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.embedded.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.embedded.num_heads ({self.num_heads})"
            )
        return self


# Any one of these makes a directory loadable by AutoTokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


# Heads that make a checkpoint something other than a language model that generates (transformers' class names).
NOT_GENERATIVE = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMaskedLM",
                  "ForMultipleChoice", "ForNextSentencePrediction")
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt")  # transformers' formats, sharded or not


def _check_checkpoint(key: str, path: Path, tokenizer: bool) -> None:
    if not (path / "config.json").is_file():
        raise ValueError(f"{key}: no config.json in '{path}'; point it at an HF checkpoint directory")
    if tokenizer and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{key}: no tokenizer in '{path}' (none of {', '.join(TOKENIZER_FILES)}); "
                         f"save it there with tokenizer.save_pretrained")
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_FILES):
        raise ValueError(f"{key}: no weights in '{path}' (no .safetensors or .bin file); download or save the "
                         "checkpoint again, with its weights")
    config = _read_config(key, path)
    _check_generative(key, path, config)
    if tokenizer:
        _check_vocabulary_fits(key, path, config)
    check_weights(key, path, "download or save the checkpoint again")


def _read_config(key: str, path: Path) -> dict:
    try:
        config = json.loads((path / "config.json").read_text())
    except (ValueError, OSError):
        config = None
    if not isinstance(config, dict):
        raise ValueError(f"{key}: '{path / 'config.json'}' is not a JSON object; download or save the checkpoint "
                         "again")
    return config


def _check_generative(key: str, path: Path, config: dict) -> None:
    """A reward model or an encoder loads as a causal LM with a new, random head (transformers only warns), or
    reaches vLLM, which refuses to generate with it after the whole start-up."""
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list):
        architectures = []
    if config.get("is_encoder_decoder") is True:  # T5, BART: the learner and generator run decoder-only models
        named = f"a {architectures[0]}" if architectures and isinstance(architectures[0], str) else "a model"
        raise ValueError(f"{key}: '{path}' holds {named}, an encoder-decoder (config.json is_encoder_decoder); "
                         "training runs decoder-only causal language models: point it at one (e.g. a Llama, Qwen "
                         "or GPT-2 checkpoint)")
    heads = [a for a in architectures if isinstance(a, str) and _not_generative(a)]
    if architectures and len(heads) == len(architectures):
        raise ValueError(f"{key}: '{path}' holds a {heads[0]} (config.json architectures), not a causal language "
                         "model; point it at a policy checkpoint (a reward model goes in reward.learned.path)")


def _check_vocabulary_fits(key: str, path: Path, config: dict) -> None:
    """Token ids the tokenizer writes must have rows in the model's embeddings: a tokenizer given tokens without
    `resize_token_embeddings` started the whole run and failed in the learner's first step ("index out of range")."""
    size, top = config.get("vocab_size"), _largest_token_id(path)
    if isinstance(size, int) and top is not None and top >= size:
        raise ValueError(f"{key}: the tokenizer in '{path}' writes token ids up to {top}, but the model's "
                         f"embeddings hold {size} (config.json vocab_size); resize its embeddings to the tokenizer "
                         "(model.resize_token_embeddings(len(tokenizer))) and save it again")


def _largest_token_id(path: Path) -> int | None:
    """The largest id in tokenizer.json (its vocabulary and added tokens), None where there is none to read."""
    try:
        tokenizer = json.loads((path / "tokenizer.json").read_text())
        vocab = tokenizer["model"]["vocab"]
        ids = list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1]
        ids += [token["id"] for token in tokenizer.get("added_tokens") or []]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    ids = [i for i in ids if isinstance(i, int)]
    return max(ids) if ids else None


def _check_same_vocabulary(policy: Path, reference: Path) -> None:
    """The KL to the reference compares the two models' log-probabilities of the same token ids, so the reference
    must read ids as the policy's tokenizer writes them; another tokenizer's model trains without any error, on a
    KL that means nothing. Compared where both directories hold a tokenizer.json (its base vocabulary: tokens
    added on top, such as a chat model's, may differ)."""
    vocabularies = [_vocabulary(path) for path in (policy, reference)]
    if None not in vocabularies and vocabularies[0] != vocabularies[1]:
        sizes = " and ".join(str(len(v)) for v in vocabularies if v is not None)
        raise ValueError(f"model.reference_path: its tokenizer's vocabulary differs from model.path's ({sizes} "
                         "tokens); the reference must share the policy's tokenizer")


def _vocabulary(path: Path) -> dict | list | None:
    try:
        vocab = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]
    except (OSError, ValueError, KeyError, TypeError):  # no tokenizer.json, or one of another layout
        return None
    return vocab if isinstance(vocab, (dict, list)) else None


def _not_generative(architecture: str) -> bool:
    bare = architecture.endswith("Model") and not architecture.endswith("LMHeadModel")  # e.g. LlamaModel: no head
    return bare or architecture.endswith(NOT_GENERATIVE)


GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg")  # NVIDIA, ROCm, WSL2


def cuda_available() -> bool:
    """torch's answer, asked only where a GPU's device file exists: importing torch costs seconds, and
    without any of these files torch finds no GPU either (check-config stays light on a CPU machine)."""
    if not any(Path(f).exists() for f in GPU_DEVICE_FILES):
        return False
    import torch

    return torch.cuda.is_available()


class ModelConfig(Strict):
    source: Literal["embedded", "local"] = "embedded"
    path: Path | None = Field(None, description="HF causal-LM checkpoint directory (with its tokenizer) when "
                                                "source=local")
    reference_path: Path | None = Field(None, description="frozen reference model (same tokenizer); default: path")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="weights of policy, reference and generators: auto = float32 on CPU, bfloat16 on GPU"
    )
    embedded: EmbeddedModelConfig = EmbeddedModelConfig()
    cache_dir: Path | None = Field(
        None, description="default: $ASYNC_RLHF_CACHE, else $XDG_CACHE_HOME/async-rlhf, else ~/.cache/async-rlhf")

    @field_validator("path", "reference_path")
    @classmethod
    def _absolute(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        # A registered name (e.g. smollm2) is its prepared cache directory (--portable: prepared where it runs).
        return None if path is None else checkpoint_path(f"model.{info.field_name}", path, environment_checks(info))

    @model_validator(mode="after")
    def _path(self, info: ValidationInfo) -> "ModelConfig":
        if self.source == "local" and self.path is None:
            raise ValueError("model.path is required when model.source=local (an HF checkpoint directory)")
        if self.path is not None and self.source != "local":  # the embedded model was trained, the path ignored
            raise ValueError("model.path is set but model.source is 'embedded' (the built-in tiny model), which would "
                             "ignore it; set model.source=local to train from model.path, or drop model.path")
        if self.reference_path is not None and self.source != "local":
            raise ValueError("model.reference_path needs model.source=local")
        if not environment_checks(info):
            return self
        if self.path is not None and self.source == "local":
            _check_checkpoint("model.path", self.path, tokenizer=True)
        if self.reference_path is not None:
            _check_checkpoint("model.reference_path", self.reference_path, tokenizer=False)
            if self.path is not None:
                _check_same_vocabulary(self.path, self.reference_path)
        return self

    @property
    def torch_dtype(self) -> str:
        """The dtype name that learner and generators load with (auto resolved here)."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if cuda_available() else "float32"
