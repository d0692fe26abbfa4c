"""The learner's half of the GPU path, on one CUDA GPU with torch and DeepSpeed alone (no vLLM, no Ray):
what a GPU learner does before its weights reach vLLM. Skips without a CUDA GPU (so in CI, which has none).

1. DeepSpeed on the CUDA accelerator trains the policy (float32 and bfloat16; DPO, and PPO with its value
   model): every tensor on the GPU, finite losses, the weights move.
2. The learner's tempered log-probabilities on the GPU equal the CPU's for the same weights (float32), so
   `logprob_gap` means the same on both.
3. The `ipc` transport's learner side: the policy's own CUDA parameters, exported with torch's CUDA IPC
   reduction (what vLLM's unpacked IPC trainer engine sends), rebuild in another process as the same values,
   before and after an optimizer step.
4. With `ipc` the learner keeps to `learner.gpu_memory_fraction` of the shared GPU.
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from async_rlhf.config.run import RunConfig
from async_rlhf.weights.nccl import gathered_parameters, parameter_metadata
from learners.learner import Learner, load_causal_lm
from learners.logprobs import completion_logprobs, pack
from tests.test_learner import build_model_dir, synthetic_groups

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the learner's GPU path)")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("model"))


def gpu_cfg(dtype: str, loss: str = "online_dpo", zero_stage: int | None = None, transport: str = "nccl") -> RunConfig:
    # ipc: the generator's share of the GPU leaves the learner its default 0.45 (the split the config checks).
    generation = {"gpu_memory_utilization": 0.45} if transport == "ipc" else {}
    stage = {} if zero_stage is None else {"zero_stage": zero_stage}  # unset: the learner's default for it
    return RunConfig(seed=0, model={"dtype": dtype}, loss={"name": loss, "beta": 0.1}, generation=generation,
                     learner={"lr": 1e-2, "grad_clip": 1.0, **stage},
                     weight_sync={"transport": transport})


def host_copy(learner: Learner) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().clone() for k, v in learner.policy.state_dict().items()}


@pytest.mark.parametrize(("dtype", "loss"), [("float32", "online_dpo"), ("bfloat16", "online_dpo"),
                                             ("float32", "ppo")])
def test_learner_trains_on_the_gpu(model_dir: Path, dtype: str, loss: str) -> None:
    learner = Learner(gpu_cfg(dtype, loss), str(model_dir))
    before = host_copy(learner)
    history = [learner.train_step(synthetic_groups()) for _ in range(3)]
    assert learner.device.type == "cuda"
    assert all(p.is_cuda and p.dtype == getattr(torch, dtype) for p in learner.policy.parameters())
    assert all(p.is_cuda for p in learner.reference.parameters())
    assert [m["version"] for m in history] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) and m["optimizer_step"] == 1 for m in history)
    after = host_copy(learner)
    assert all(not torch.equal(before[k], after[k]) for k in before)


def test_gpu_logprobs_equal_the_cpu_ones_at_a_temperature(model_dir: Path) -> None:
    model = load_causal_lm(model_dir, "float32").eval()
    batch = pack([[1, 4, 5], [1, 9], [1, 3, 3, 3, 7]], [[6, 7, 2], [8, 9, 10, 11, 12, 2], [2]])
    with torch.no_grad():
        on_cpu = completion_logprobs(model, batch, temperature=0.7)
        on_gpu = completion_logprobs(model.cuda(), batch.to("cuda"), temperature=0.7).cpu()
    torch.testing.assert_close(on_gpu, on_cpu, atol=1e-4, rtol=0)


def rebuild_in_this_process(handles: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """What vLLM's IPC worker engine does with an unpacked update: `rebuild_cuda_tensor` with the
    storage's device index replaced by this process's device (args[6]), then a copy out."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    out = {}
    for name, args in handles.items():
        local = list(args)
        local[6] = torch.cuda.current_device()
        out[name] = rebuild_cuda_tensor(*local).float().cpu()
    return out


def ipc_handles(learner: Learner) -> tuple[dict[str, tuple], dict[str, torch.Tensor]]:
    from torch.multiprocessing.reductions import reduce_tensor

    tensors = dict(gathered_parameters(learner.policy, learner.cfg.learner.zero_stage))
    return {name: reduce_tensor(t)[1] for name, t in tensors.items()}, tensors


@pytest.mark.parametrize(("dtype", "zero_stage"), [("float32", 0), ("bfloat16", 2), ("bfloat16", 3)])
def test_ipc_export_of_the_policy_rebuilds_in_another_process(model_dir: Path, dtype: str, zero_stage: int) -> None:
    # ZeRO-3: each parameter is gathered (a copy), and the copies must live until the other side has read them.
    learner = Learner(gpu_cfg(dtype, zero_stage=zero_stage, transport="ipc"), str(model_dir))
    shapes = {name: shape for name, _, shape in parameter_metadata(learner.policy)}
    spawn = torch.multiprocessing.get_context("spawn")
    with spawn.Pool(1) as other:
        for _ in range(2):  # version 0, then after a step (handles are sent anew with every update)
            handles, tensors = ipc_handles(learner)
            seen = other.apply(rebuild_in_this_process, (handles,))
            assert set(seen) == set(shapes)
            for name, tensor in tensors.items():
                assert tuple(seen[name].shape) == shapes[name]
                assert torch.equal(seen[name], tensor.float().cpu()), name
            del handles, tensors
            learner.train_step(synthetic_groups())
        other.close()  # let the other process exit and release its handles (terminate would not)
        other.join()


FRACTION_PROBE = """
import sys, torch
from learners.learner import Learner
from tests.gpu.test_learner_gpu import gpu_cfg
Learner(gpu_cfg("bfloat16", transport="ipc"), sys.argv[1])
total = torch.cuda.get_device_properties(0).total_memory
share = 0.45  # learner.gpu_memory_fraction's default
try:
    torch.empty(int(total * (share + 0.1)), dtype=torch.uint8, device="cuda")
    print("allocated past the share")
except torch.OutOfMemoryError:
    torch.empty(int(total * (share - 0.1)), dtype=torch.uint8, device="cuda")
    print("refused past the share, allowed inside it")
"""


def test_ipc_learner_keeps_to_its_share_of_the_gpu(model_dir: Path) -> None:
    # A process of its own: the fraction is per process and would bind the other tests here.
    proc = subprocess.run([sys.executable, "-c", FRACTION_PROBE, str(model_dir)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "refused past the share, allowed inside it"
