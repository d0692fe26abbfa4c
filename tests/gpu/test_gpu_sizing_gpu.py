"""The paper configs' micro-batch bounds on a real GPU (docs/gpu_sizing.md): one learner step of each config's
model shape, with one micro-batch of exactly `learner.max_tokens_per_micro_batch` padded tokens and the config's
own loss, ZeRO stage and checkpointing, must peak within the estimate the bound was sized by, computed here for
one rank (the layout one GPU can hold). A model whose states do not fit one GPU on one rank is built with fewer
layers, and its estimate uses that shape: the per-token terms (checkpointing, the vocabulary's logits) are the
ones under test. Random weights: the memory depends on the shape, not the values. Needs torch and DeepSpeed on a
CUDA GPU of 80 GB or more; skips otherwise (so in CI, which has none)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from async_rlhf.config.gpu_sizing import GIB, ModelShape, estimate, parse_comment
from async_rlhf.config.run import RunConfig, load_config
from async_rlhf.rollout import Completion, Prompt, RolloutGroup
from learners.learner import Learner

ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT / "configs" / "paper"
CONFIGS = sorted(p.stem for p in PAPER.glob("*.yaml"))
BIG_GPU = torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory >= 80 * 10**9
pytestmark = pytest.mark.skipif(not BIG_GPU, reason="needs a CUDA GPU of 80 GB (a paper config's micro-batch)")
GPU_SHARE = 0.85  # of the whole GPU: the most a reduced model's estimate may take


def config_shape(stem: str) -> tuple[str, ModelShape]:
    found = [parse_comment(x) for x in (PAPER / f"{stem}.yaml").read_text().splitlines()]
    return next(x for x in found if x is not None)


def fitting_layers(cfg: RunConfig, shape: ModelShape, tokens: int, gpu_gib: float) -> int:
    """The most layers (at most the model's) whose one-rank estimate stays under GPU_SHARE of this GPU."""
    embeddings = 2 * shape.vocab * shape.hidden
    per_layer = (shape.params - embeddings) / shape.layers
    for layers in range(shape.layers, 0, -1):
        smaller = ModelShape(embeddings + layers * per_layer, shape.hidden, layers, shape.mlp, shape.vocab)
        if estimate(cfg, smaller, gpu_gib).peak_gib(tokens) <= GPU_SHARE * gpu_gib:
            return layers
    raise AssertionError(f"not even one layer of {shape} fits a {gpu_gib:.0f} GiB GPU")


def build_random_model(path: Path, name: str, shape: ModelShape, layers: int, device: str = "cuda") -> int:
    """A bf16 model of the family `name` names with `layers` layers, saved to `path`; its parameter count."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    common: dict[str, Any] = dict(hidden_size=shape.hidden, num_hidden_layers=layers, intermediate_size=shape.mlp,
                  vocab_size=shape.vocab, max_position_embeddings=4096, pad_token_id=0, eos_token_id=0)
    with torch.device(device):  # random init on the GPU: seconds, where the CPU takes minutes for billions
        if "pythia" in name:
            model: Any = GPTNeoXForCausalLM(GPTNeoXConfig(num_attention_heads=shape.hidden // 128, **common))
        else:  # Llama 3.1 and rho-1b (TinyLlama's shape): grouped-query attention, untied head
            model = LlamaForCausalLM(LlamaConfig(num_attention_heads=32, num_key_value_heads=8,
                                                 tie_word_embeddings=False, **common))
    model.to(torch.bfloat16).save_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    return params


def one_micro_batch(cfg: RunConfig, tokens: int, vocab: int) -> list[RolloutGroup]:
    """Whole groups of the config's size whose rows are all `row` tokens: `tokens` padded tokens in all."""
    k, new = cfg.generation.samples_per_prompt, cfg.generation.max_new_tokens
    row = 1024 if new >= 512 else 512
    assert tokens % (row * k) == 0, f"{tokens} tokens are not whole groups of {k} rows of {row}"
    gen, groups = torch.Generator().manual_seed(0), []
    for pid in range(tokens // (row * k)):
        prompt = torch.randint(1, vocab, (row - new,), generator=gen).tolist()
        rows = [sampled(torch.randint(1, vocab, (new,), generator=gen).tolist(), float(j)) for j in range(k)]
        groups.append(RolloutGroup(Prompt(pid, "", prompt), rows, policy_version=0, generator_id=0, created_at=0.0))
    return groups


def sampled(ids: list[int], reward: float) -> Completion:
    """A scored completion, with the per-token values VinePPO's loss reads (ignored by the others)."""
    return Completion(token_ids=ids, text="", logprobs=[-0.5] * len(ids), finish_reason="length", reward=reward,
                      reward_status="ok", step_ends=[len(ids)], advantages=[reward - 0.5] * len(ids))


@pytest.mark.parametrize("stem", CONFIGS)
def test_a_step_at_the_bound_peaks_within_its_estimate(stem: str, tmp_path: Path) -> None:
    cfg = load_config(PAPER / f"{stem}.yaml", ["learner.num_ranks=1"], environment=False)
    name, shape = config_shape(stem)
    tokens = cfg.learner.max_tokens_per_micro_batch or 0
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / GIB
    layers = fitting_layers(cfg, shape, tokens, gpu_gib)
    params = build_random_model(tmp_path / name, name, shape, layers)
    built = ModelShape(params, shape.hidden, layers, shape.mlp, shape.vocab)
    torch.cuda.reset_peak_memory_stats()
    learner = Learner(cfg, str(tmp_path / name))
    metrics = learner.train_step(one_micro_batch(cfg, tokens, shape.vocab))
    peak_gib = torch.cuda.max_memory_allocated() / GIB
    predicted = estimate(cfg, built).peak_gib(tokens)
    print(f"{name} ({layers} of {shape.layers} layers, {params / 1e9:.2f}B params), one rank, ZeRO "
          f"{cfg.learner.zero_stage}, checkpointing {cfg.learner.gradient_checkpointing}, {cfg.loss.name}, {tokens} "
          f"padded tokens: peak {peak_gib:.1f} GiB allocated, {torch.cuda.max_memory_reserved() / GIB:.1f} reserved; "
          f"estimate {predicted:.1f} GiB")
    assert metrics["optimizer_step"] >= 1
    assert peak_gib <= predicted
