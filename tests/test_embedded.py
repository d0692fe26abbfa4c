"""The embedded policy: built locally, cached by recipe hash, loadable with plain transformers."""
from __future__ import annotations

import random
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from async_rlhf.config.base import ConfigError
from async_rlhf.config.model import EmbeddedModelConfig
from async_rlhf.config.pretrained_names import cache_root
from async_rlhf.config.task import TaskConfig
from async_rlhf.policies.embedded import (
    build_tokenizer,
    checkpoint_name,
    collate,
    corrupt,
    ensure_embedded_policy,
    ensure_policy,
)

# A few steps only: these tests check plumbing, not quality (see docs for the tuned defaults).
SMALL = EmbeddedModelConfig(sft_steps=8, sft_batch_size=8)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    cache = tmp_path_factory.mktemp("cache")
    return cache, ensure_embedded_policy(SMALL, TaskConfig(), cache, log=lambda msg: None)


def test_checkpoint_loads_with_transformers(built) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache, path = built
    assert path.parent == cache / "models" and path.name.startswith("embedded-")
    assert {"config.json", "model.safetensors", "tokenizer.json", "recipe.json"} <= {p.name for p in path.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.tie_word_embeddings is False
    assert model.config.hidden_size // model.config.num_attention_heads == 64  # vLLM CPU attention
    assert model.config.vocab_size == len(tok) == 14
    ids = torch.tensor([tok("3914>")["input_ids"]])
    assert ids[0, 0].item() == tok.bos_token_id
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 6, 14) and torch.isfinite(logits).all()


def test_second_call_is_a_cache_hit(built) -> None:
    cache, path = built
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    messages: list[str] = []
    start = time.perf_counter()
    again = ensure_embedded_policy(SMALL, TaskConfig(), cache, log=messages.append)
    assert again == path and time.perf_counter() - start < 1.0
    assert messages == []  # nothing was built
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in (cache / "models").iterdir() if p.name.startswith(".tmp")]  # no half checkpoints


def test_cache_key_covers_what_determines_weights() -> None:
    base = checkpoint_name(SMALL, TaskConfig())
    assert checkpoint_name(SMALL.model_copy(update={"seed": 1}), TaskConfig()) != base
    assert checkpoint_name(SMALL.model_copy(update={"sft_correct_fraction": 0.9}), TaskConfig()) != base
    assert checkpoint_name(SMALL, TaskConfig(max_digits=8)) != base
    assert checkpoint_name(SMALL, TaskConfig(eval_prompts=7)) == base  # eval size does not change weights


def test_different_config_builds_a_different_dir(built) -> None:
    cache, path = built
    other = ensure_embedded_policy(SMALL.model_copy(update={"seed": 1}), TaskConfig(), cache, log=lambda m: None)
    assert other != path and (other / "config.json").is_file()


def test_build_is_deterministic(built, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    _, path = built
    fresh = ensure_embedded_policy(SMALL, TaskConfig(), tmp_path, log=lambda m: None)
    assert fresh.name == path.name
    a, b = load_file(path / "model.safetensors"), load_file(fresh / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ensure_policy_uses_run_config_fields(built, tmp_path: Path) -> None:
    cache, path = built
    # Duck-typed RunConfig: only the fields ensure_policy reads.
    embedded: Any = SimpleNamespace(model=SimpleNamespace(source="embedded", embedded=SMALL, cache_dir=cache),
                                    task=TaskConfig())
    assert ensure_policy(embedded, log=lambda m: None) == path
    local: Any = SimpleNamespace(model=SimpleNamespace(source="local", path=tmp_path, embedded=SMALL, cache_dir=cache))
    assert ensure_policy(local) == tmp_path


def test_the_embedded_policy_is_cached_where_prepared_models_are_read_at_call_time(monkeypatch,
                                                                                    tmp_path: Path) -> None:
    # Before, $ASYNC_RLHF_CACHE moved `prepare`'s models but not the embedded policies.
    monkeypatch.setenv("ASYNC_RLHF_CACHE", str(tmp_path / "mine"))
    run: Any = SimpleNamespace(model=SimpleNamespace(source="embedded", embedded=SMALL, cache_dir=None),
                               task=TaskConfig())
    assert ensure_policy(run, log=lambda m: None).parent == tmp_path / "mine" / "models"
    monkeypatch.delenv("ASYNC_RLHF_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "async-rlhf"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "async-rlhf"


def test_corruptions_are_plausible_mistakes() -> None:
    rng = random.Random(0)
    for answer in ["1349", "0023448", "1111", "7", "19"]:
        for _ in range(50):
            wrong = corrupt(answer, rng)
            assert wrong != answer and set(wrong) <= set(answer)
            same_digits = sorted(wrong) == sorted(answer)  # adjacent swap
            assert same_digits or abs(len(wrong) - len(answer)) == 1  # dropped or duplicated digit


def test_collate_masks_the_prompt() -> None:
    tok = build_tokenizer()
    prompt = tok("31>")["input_ids"]  # [<s>, 3, 1, >]
    seq = prompt + tok.convert_tokens_to_ids(["1", "3"]) + [tok.eos_token_id]
    ids, mask, labels = collate([(seq, len(prompt)), (seq[:-1], len(prompt))])
    assert ids.shape == (2, 7) and mask[1].tolist() == [1] * 6 + [0]
    assert labels[0].tolist() == [-100] * 4 + seq[4:]
    assert labels[1].tolist() == [-100] * 4 + seq[4:6] + [-100]


def test_a_damaged_cached_policy_is_built_again(built, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file

    _, path = built
    cache = tmp_path / "cache"
    shutil.copytree(path.parent, cache / "models")
    weights = cache / "models" / path.name / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # an interrupted copy, a full disk
    messages: list[str] = []
    again = ensure_embedded_policy(SMALL, TaskConfig(), cache, log=messages.append)
    assert again == cache / "models" / path.name
    tensors = (path / "model.safetensors").stat().st_size - len(header(path))  # the bytes the header describes
    assert messages[0] == (f"the cached embedded policy is damaged ('{weights}': truncated or damaged: its header "
                           f"describes {tensors} bytes of tensors, it holds {tensors - 100}); building it again")
    a, b = load_file(path / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same recipe, built whole again


def header(path: Path) -> bytes:
    """The 8-byte length and the JSON header of a checkpoint's model.safetensors."""
    raw = (path / "model.safetensors").read_bytes()
    return raw[:8 + int.from_bytes(raw[:8], "little")]


def test_a_cache_that_cannot_be_written_is_a_config_error_naming_the_setting(tmp_path: Path) -> None:
    # XDG_CACHE_HOME on a read-only or missing mount: the run died with "FileNotFoundError: ... '/proc/nope'".
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError) as caught:
        ensure_embedded_policy(SMALL, TaskConfig(), blocker / "cache", log=lambda msg: None)
    assert str(caught.value) == (
        f"config error: model.cache_dir: cannot write the embedded policy's cache in '{blocker / 'cache' / 'models'}' "
        "(Not a directory); set model.cache_dir (or $XDG_CACHE_HOME) to a writable directory")
