"""A paper config's micro-batch bound on a real GPU (docs/gpu_sizing.md): one learner step of Pythia 410m's shape
with one micro-batch of exactly `learner.max_tokens_per_micro_batch` padded tokens must peak within the estimate
the config's bound was sized by (computed here for one rank, the layout one GPU can hold). Random weights: the
memory depends on the shape, not the values. Needs torch and DeepSpeed on a CUDA GPU of 80 GB or more; skips
otherwise (so in CI, which has none)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from async_rlhf.config.gpu_sizing import GIB, ModelShape, estimate, parse_comment
from async_rlhf.config.run import load_config
from async_rlhf.rollout import Prompt, RolloutGroup
from learners.learner import Learner
from tests.helpers import completion

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "paper" / "tldr_pythia410m.yaml"
BIG_GPU = torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory >= 80 * 10**9
pytestmark = pytest.mark.skipif(not BIG_GPU, reason="needs a CUDA GPU of 80 GB (a paper config's micro-batch)")


def pythia_shape() -> tuple[str, ModelShape]:
    line = next(x for x in CONFIG.read_text().splitlines() if parse_comment(x))
    found = parse_comment(line)
    assert found is not None
    return found


def build_random_pythia_410m(path: Path, shape: ModelShape) -> Path:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(hidden_size=shape.hidden, num_hidden_layers=shape.layers, intermediate_size=shape.mlp,
                           num_attention_heads=16, vocab_size=shape.vocab, max_position_embeddings=2048,
                           pad_token_id=0, eos_token_id=0)
    model: Any = GPTNeoXForCausalLM(config)  # Any: transformers' types miss .to(dtype) on the model
    model.to(torch.bfloat16).save_pretrained(path)
    return path


def full_micro_batch(tokens: int, new_tokens: int, vocab: int) -> list[RolloutGroup]:
    """Pairs whose rows are all `row` tokens long, `tokens` padded tokens in all: one micro-batch at the bound."""
    row, gen = 256, torch.Generator().manual_seed(0)
    groups = []
    for pid in range(tokens // row // 2):
        prompt = torch.randint(1, vocab, (row - new_tokens,), generator=gen).tolist()
        pair = [completion(torch.randint(1, vocab, (new_tokens,), generator=gen).tolist(), float(k), "ok", 0.0)
                for k in range(2)]
        groups.append(RolloutGroup(Prompt(pid, "", prompt), pair, policy_version=0, generator_id=0, created_at=0.0))
    return groups


def test_a_step_at_the_pythia_410m_bound_peaks_within_its_estimate(tmp_path: Path) -> None:
    cfg = load_config(CONFIG, ["learner.num_ranks=1"], environment=False)
    name, shape = pythia_shape()
    tokens = cfg.learner.max_tokens_per_micro_batch or 0
    model_dir = build_random_pythia_410m(tmp_path / name, shape)
    torch.cuda.reset_peak_memory_stats()
    learner = Learner(cfg, str(model_dir))
    metrics = learner.train_step(full_micro_batch(tokens, cfg.generation.max_new_tokens, shape.vocab))
    peak_gib = torch.cuda.max_memory_allocated() / GIB
    predicted = estimate(cfg, shape).peak_gib(tokens)
    print(f"{name}, one rank, ZeRO {cfg.learner.zero_stage}, {tokens} padded tokens: peak {peak_gib:.1f} GiB "
          f"allocated, {torch.cuda.max_memory_reserved() / GIB:.1f} reserved; estimate {predicted:.1f} GiB")
    assert metrics["optimizer_step"] == 1 and metrics["pairs"] == tokens // 512
    assert peak_gib <= predicted
