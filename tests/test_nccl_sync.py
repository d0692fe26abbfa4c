"""The NCCL transport's logic that needs no GPU: locations, rank layout, version rules, the timeout,
the ZeRO-aware weight stream (a real DeepSpeed engine and vLLM's own WeightSource class, on CPU),
the engine options and the config rules. The broadcast itself needs CUDA: tests/gpu/."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from actors.generator import engine_options
from async_rlhf.config.base import ConfigError
from async_rlhf.config.generation import GenerationConfig
from async_rlhf.config.run import RunConfig, load_config
from async_rlhf.weights.broker import VersionError, WeightSyncBroker
from async_rlhf.weights.nccl import (
    NcclLayout,
    NcclTransport,
    WeightSyncTimeout,
    check_generator_version,
    check_next_version,
    nccl_version,
    run_with_timeout,
)
from tests.test_learner import build_model_dir


def test_broker_publishes_nccl_locations_in_order() -> None:
    broker = WeightSyncBroker(NcclTransport(), keep_versions=2)
    assert broker.staging_location(1) == "nccl://v1"
    ref = broker.publish(1)
    assert (ref.version, ref.transport, ref.location) == (1, "nccl", "nccl://v1")
    assert nccl_version(ref.location) == 1 and nccl_version("/dev/shm/run/v1") is None
    with pytest.raises(VersionError):
        broker.publish(3)
    with pytest.raises(ValueError, match="malformed pushed weight location 'nccl://latest'"):
        nccl_version("nccl://latest")


def test_layout_gives_each_generator_its_own_ranks() -> None:
    layout = NcclLayout(num_generators=3, tensor_parallel_size=2)
    assert layout.world_size == 7
    assert [layout.rank_offset(i) for i in range(3)] == [1, 3, 5]  # workers 1-2, 3-4, 5-6; learner 0
    with pytest.raises(IndexError):
        layout.rank_offset(3)


def test_versions_never_go_backwards() -> None:
    check_next_version(0, 1)
    check_next_version(4, 4)  # a resend
    check_next_version(0, 7)  # a resume jumps to its checkpoint's version
    with pytest.raises(VersionError, match="asked to send version 2 but version 3 was sent already"):
        check_next_version(3, 2)
    check_generator_version(5, 5, 0)
    check_generator_version(6, 5, 0)  # the push of 6 reached it ahead of a batch leased with 5: sampled as 6
    with pytest.raises(VersionError,
                       match="generator 1 holds weights version 4 but was asked to sample with version 5"):
        check_generator_version(4, 5, 1)


def test_a_stuck_sync_fails_with_a_reason_instead_of_hanging() -> None:
    assert run_with_timeout(lambda: 42, 5.0, "quick") == 42
    never = threading.Event()
    start = time.monotonic()
    with pytest.raises(WeightSyncTimeout, match=r"NCCL broadcast of weights version 3 did not finish within "
                                                r"weight_sync.timeout_s=0.2s; a generator may have died"):
        run_with_timeout(lambda: never.wait(30), 0.2, "NCCL broadcast of weights version 3")
    assert time.monotonic() - start < 5
    stuck = [t for t in threading.enumerate() if t.name == "weight-sync"]
    assert stuck and all(t.daemon for t in stuck)  # a stuck NCCL call does not hold up the process's exit
    never.set()
    with pytest.raises(ZeroDivisionError):  # the callee's own error comes through unchanged
        run_with_timeout(lambda: 1 / 0, 5.0, "failing")


@pytest.mark.integration
@pytest.mark.parametrize("stage", [0, 3])
def test_weight_source_streams_whole_hf_tensors(tmp_path, stage) -> None:
    """vLLM's WeightSource contract (metadata agrees with iteration, whole tensors) under ZeRO 0 and 3."""
    from learners.learner import Learner
    from learners.weight_sender import policy_weight_source

    model_dir = build_model_dir(tmp_path / "model")
    learner = Learner(RunConfig(learner={"zero_stage": stage}), str(model_dir), threads=2)
    source = policy_weight_source(learner.policy, stage)
    meta = source.metadata()
    pairs = list(source)
    original = load_file(str(model_dir / "model.safetensors"))
    assert [m.name for m in meta] == [name for name, _ in pairs] == list(dict(learner.policy.named_parameters()))
    assert {m.name for m in meta} == set(original)  # untied model: every checkpoint tensor, HF names
    for m, (name, tensor) in zip(meta, pairs):
        assert tuple(tensor.shape) == m.shape == tuple(original[name].shape) and tensor.dtype == m.dtype
        assert torch.equal(tensor.cpu(), original[name])  # no step taken yet: the checkpoint's values
    assert [n for n, _ in source] == [m.name for m in meta]  # re-iterable: a fresh pass per version


def test_engine_options_on_cpu_and_cuda() -> None:
    gen = GenerationConfig(tensor_parallel_size=4, gpu_memory_utilization=0.6)
    assert engine_options(gen, cuda=False) == {"enforce_eager": True, "enable_chunked_prefill": False,
                                               "distributed_executor_backend": "uni",
                                               "logprobs_mode": "processed_logprobs", "max_num_seqs": 256,
                                               "kv_cache_memory_bytes": 2**30,  # no config.json to size it
                                               "weight_transfer_config": {"backend": "shm"}}
    assert engine_options(gen, cuda=True, weight_transport="nccl") == {
        "tensor_parallel_size": 4, "logprobs_mode": "processed_logprobs", "gpu_memory_utilization": 0.6,
        "distributed_executor_backend": "mp",
        "weight_transfer_config": {"backend": "nccl"}}
    assert engine_options(GenerationConfig(), cuda=True)["weight_transfer_config"] == {"backend": "shm"}


def test_gpu_settings_are_checked_where_the_gpus_are() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the CPU-only errors do not apply")
    with pytest.raises(ConfigError, match="weight_sync.transport: nccl needs CUDA GPUs and none is visible; "
                                          "use weight_sync.transport=shm on CPU"):
        load_config(None, ["weight_sync.transport=nccl"])
    with pytest.raises(ConfigError, match=r"generation.tensor_parallel_size \(2\) needs CUDA GPUs"):
        load_config(None, ["generation.tensor_parallel_size=2"])
    # On a cluster the driver may have no GPU: the workers check at start. Portable checks skip it too.
    assert load_config(None, ["weight_sync.transport=nccl", "ray.address=auto"]).weight_sync.transport == "nccl"
    assert load_config(None, ["model.dtype=bfloat16"], environment=False).model.dtype == "bfloat16"
    with pytest.raises(ConfigError, match=r"generation.prompts_per_step \(16\) must be a multiple of "
                                          r"learner.num_ranks \(3\)"):
        load_config(None, ["learner.num_ranks=3"], environment=False)


def test_ipc_locations_name_their_version() -> None:
    transport = NcclTransport("ipc")
    assert transport.name == "ipc" and transport.commit(4) == "ipc://v4"
    assert nccl_version("ipc://v4") == 4


@pytest.mark.parametrize("transport", ["ipc", "nccl", "shm"])
def test_only_an_ipc_generator_lets_vllm_carry_cuda_tensor_handles_to_its_engine_core(
        transport: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's real msgpack encoder (its channel to a GPU engine-core process) refuses the torch types that CUDA IPC
    handles are made of, unless VLLM_ALLOW_INSECURE_SERIALIZATION is set before the engine starts. The engine
    itself needs a GPU: the encoder is what is checked here."""
    from vllm import envs
    from vllm.v1.serial_utils import MsgpackEncoder

    from actors.generator import set_engine_env

    for key in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_LOGGING_LEVEL", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        monkeypatch.setenv(key, "")  # restored after the test
    monkeypatch.delenv("VLLM_ALLOW_INSECURE_SERIALIZATION", raising=False)
    if envs._is_envs_cache_enabled():  # an engine built in this process froze the variables
        monkeypatch.setattr(envs, "__getattr__", getattr(envs.__getattr__, "__wrapped__"))  # noqa: B009
    handle_parts = {"tensor_class": torch.Tensor, "storage_class": torch.UntypedStorage, "dtype": torch.bfloat16}
    with pytest.raises(TypeError, match="VLLM_ALLOW_INSECURE_SERIALIZATION"):
        MsgpackEncoder().encode(handle_parts)
    set_engine_env([0], cuda=True, weight_transport=transport)
    if transport == "ipc":
        assert MsgpackEncoder().encode(handle_parts)
    else:  # nccl and shm send plain values: pickle stays refused
        with pytest.raises(TypeError):
            MsgpackEncoder().encode(handle_parts)


def test_a_model_transformers_converted_at_load_is_refused_for_pushed_weights(tmp_path, random_policies) -> None:
    """Real transformers: a tiny Mixtral loads with fused experts (`mlp.experts.gate_up_proj`), names vLLM's Mixtral
    loader does not know, so a push would not apply; a Llama loads under its checkpoint's names and is pushed."""
    from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

    from async_rlhf.failures import RunError
    from async_rlhf.weights.nccl import check_pushable

    config = MixtralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1,
                           head_dim=8)
    MixtralForCausalLM(config).save_pretrained(tmp_path / "mixtral")
    mixtral = AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral")
    with pytest.raises(RunError, match=r"weight_sync.transport=nccl pushes .* this mixtral checkpoint at load .* "
                                       r"use weight_sync.transport=shm"):
        check_pushable(mixtral, "nccl")
    check_pushable(AutoModelForCausalLM.from_pretrained(random_policies[0]), "ipc")  # a Llama: nothing converted


def test_a_push_waits_for_the_optimizer_steps_kernels_before_vllm_reads_the_parameters(monkeypatch) -> None:
    # GPU only (CUDA mocked here): vLLM packs each chunk on its own non-blocking streams (packed_tensor.py), which
    # do not wait for the stream the optimizer step ran on, so the sender must.
    from learners.weight_sender import PushedWeightSender

    order: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: SimpleNamespace(synchronize=lambda: order.append("sync")))
    sender = PushedWeightSender()
    sender.engine = SimpleNamespace(send_weights=lambda: order.append("send"))
    sender.client = SimpleNamespace(version=0)  # type: ignore[assignment]  # the push reads only its version
    sender.timeout_s, sender.sent = 5.0, 0
    sender.send(1)
    assert order == ["sync", "send"] and sender.sent == 1
