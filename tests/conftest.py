"""Shared fixtures: one local Ray instance for the integration tests, tiny real models."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """A 2-CPU local Ray instance, like the CI machine."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def random_policies(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two differently initialised tiny Llamas with the embedded tokenizer, as HF checkpoints."""
    import torch

    from async_rlhf.config import EmbeddedModelConfig
    from async_rlhf.embedded import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("policies")
    tokenizer = build_tokenizer()
    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model(EmbeddedModelConfig(), len(tokenizer))
        out = root / f"seed{seed}"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        dirs.append(out)
    return dirs[0], dirs[1]
