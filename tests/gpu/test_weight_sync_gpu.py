"""GPU acceptance of the pushed weight transports, chosen by the GPU count (`scripts/gpu_check.sh`):
2+ GPUs -> `nccl` (learner and generator on GPUs of their own), 1 GPU -> `ipc` (both on the one GPU, in
one placement bundle, fractional Ray GPUs, memory split 0.45 / 0.45). Skips without a CUDA GPU.
`GPU_CHECK_TRANSPORT` forces one (e.g. `ipc` on a 2-GPU machine).

1. A short async run through the CLI with that transport.
2. A learner step, a sync of that version, then the generator's greedy output must equal HF greedy
   decoding of the learner's weights token for token (float32, so kernels agree).
Sync time, generation tokens/s, transport and GPU count go to $GPU_CHECK_OUT (default runs/gpu_check.json).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
TRANSPORT = os.environ.get("GPU_CHECK_TRANSPORT") or ("nccl" if GPUS >= 2 else "ipc")
NEEDS = {"nccl": 2, "ipc": 1}  # NCCL cannot put two ranks on one GPU; ipc shares one
SHARED_SPLIT = ["generation.gpu_memory_utilization=0.45", "learner.gpu_memory_fraction=0.45"]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    GPUS < NEEDS.get(TRANSPORT, 1), reason=f"weight_sync.transport={TRANSPORT} needs {NEEDS.get(TRANSPORT, 1)} CUDA "
                                           f"GPU(s), found {GPUS}")]
OUT = Path(os.environ.get("GPU_CHECK_OUT", ROOT / "runs" / "gpu_check.json"))


def _overrides() -> list[str]:
    return [f"weight_sync.transport={TRANSPORT}", "model.dtype=float32", *(SHARED_SPLIT if TRANSPORT == "ipc" else [])]


def _record(key: str, value: dict) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(OUT.read_text()) if OUT.is_file() else {}
    data.update({"transport": TRANSPORT, "gpus": GPUS, "device": torch.cuda.get_device_name(0), key: value})
    OUT.write_text(json.dumps(data, indent=2))


def test_short_async_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "async_rlhf.cli", "train", str(ROOT / "configs" / "quickstart.yaml"), *_overrides(),
           "learner.steps=6", "queue.max_staleness=1", "task.eval_prompts=32", "--run-dir", str(run)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["max_staleness_seen"] <= 1
    _record("async_run", {k: summary.get(k) for k in ("steps", "wall_s", "gen_busy_s", "learn_busy_s", "publish_s",
                                                      "weight_sync_s", "episodes", "max_staleness_seen")})


def test_greedy_output_after_a_sync_matches_hf(tmp_path: Path) -> None:
    import ray

    from actors.generator import GeneratorActor
    from async_rlhf.cluster.placement import generator_options, learner_options
    from async_rlhf.config.run import RunConfig
    from async_rlhf.rollout import Prompt
    from async_rlhf.weights.broker import WeightRef
    from learners.learner import Learner
    from tests.test_learner import build_model_dir, synthetic_groups

    model_dir = build_model_dir(tmp_path / "model")
    shared = TRANSPORT == "ipc"
    cfg = RunConfig(model={"dtype": "float32"}, weight_sync={"transport": TRANSPORT},
                    learner={"lr": 1e-2, **({"gpu_memory_fraction": 0.45} if shared else {})},
                    generation={"gpu_memory_utilization": 0.45} if shared else {})
    ray.init(num_gpus=NEEDS[TRANSPORT], include_dashboard=False, log_to_driver=False)
    try:  # the placement the controller uses: for ipc one bundle, both actors on its GPU
        # Any: Ray's types do not carry the actor class through .options().remote().
        learner: Any = ray.remote(Learner).options(**learner_options(cfg)).remote(cfg, str(model_dir))
        gen: Any = ray.remote(GeneratorActor).options(**generator_options(cfg)[0]).remote(
            0, str(model_dir), cfg.generation, 0, None, "float32", TRANSPORT)
        ray.get(learner.connect_generators.remote([gen], 1), timeout=300)
        ray.get(learner.train_step.remote(synthetic_groups()))
        start = time.perf_counter()
        ray.get(learner.save_weights.remote(f"{TRANSPORT}://v1"), timeout=300)
        sync_s = time.perf_counter() - start
        ray.get(learner.save_pretrained.remote(str(tmp_path / "v1")))
        prompts = [Prompt(i, "", [1, 3 + i, 4 + i, 13]) for i in range(8)]
        ref = WeightRef(1, TRANSPORT, f"{TRANSPORT}://v1")
        result = ray.get(gen.generate.remote(prompts, weights=ref, n=1, temperature=0.0))
        many = ray.get(gen.generate.remote(prompts * 32, weights=ref, n=4, temperature=1.0))
    finally:
        ray.shutdown()
    assert result.policy_version == 1 and result.sync_s == 0.0  # pushed before use, not pulled
    hf = _hf_greedy(tmp_path / "v1", prompts, cfg.generation.max_new_tokens)
    assert [g.completions[0].token_ids for g in result.groups] == hf
    _record("sync", {"sync_s": sync_s, "params": _param_count(model_dir), "gen_tokens_per_s": many.tokens / many.gen_s})


def _hf_greedy(path: Path, prompts: list, max_new_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    # Any: transformers' types miss .cuda() on the loaded model.
    model: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model = model.cuda().eval()
    outs = []
    for p in prompts:
        ids = torch.tensor([p.token_ids], device="cuda")
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=2, pad_token_id=0)
        outs.append(out[0, len(p.token_ids):].tolist())
    return outs


def _param_count(model_dir: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(str(model_dir / "model.safetensors")).values())
