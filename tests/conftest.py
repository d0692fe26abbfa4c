"""Shared fixtures: one local Ray instance for the integration tests, tiny real models."""
from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import mount_tmpfs

# Separable on purpose: the chosen responses are sorted digits, the rejected reversed ones.
PAIRS = [{"prompt": f"{d}>", "chosen": "".join(sorted(d)), "rejected": "".join(sorted(d, reverse=True))}
         for d in ("3142", "9071", "5523", "8164", "2719", "6604", "7385", "1928", "4450", "3697", "8812", "5067")]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory: pytest.TempPathFactory):
    """A 2-CPU local Ray instance, like the CI machine. Its workers' temporary files go to a pytest directory:
    a GeneratorActor a test starts itself has no run directory for vLLM's process-group file (a run's
    generators keep theirs in the run's scratch, actors/generator.py temp_files_in), and killed engines
    never remove it."""
    import ray

    scratch = tmp_path_factory.mktemp("ray-workers-tmp")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TMPDIR": str(scratch)}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def random_policies(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two differently initialised tiny Llamas with the embedded tokenizer, as HF checkpoints."""
    import torch

    from async_rlhf.config.model import EmbeddedModelConfig
    from async_rlhf.policies.embedded import build_model, build_tokenizer

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


@pytest.fixture(scope="session")
def tiny_rm(random_policies: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from reward_models.training import RewardTrainingArgs, train_reward_model

    """A tiny reward model trained by TRL's RewardTrainer (train-rm's code) on PAIRS."""
    root = tmp_path_factory.mktemp("rm")
    pairs = write_jsonl(root / "pairs.jsonl", PAIRS)
    args = RewardTrainingArgs(str(pairs), random_policies[0], root / "rm", epochs=8, lr=3e-3, batch_size=4,
                              max_length=32, eval_fraction=0.0, threads=2)
    metrics = train_reward_model(args, log=lambda _: None)
    assert metrics["pairs"] == len(PAIRS)
    return root / "rm"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB disk, all but ~48 kB of it taken by `filler` (remove it to free space; tests/helpers.py fill_disk
    takes the rest). Skipped where this process may not mount one."""
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "1m"):
        pytest.skip("needs a tmpfs of its own (root with mount) to fill")
    try:
        (disk / "filler").write_bytes(bytes(1_000_000))
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
