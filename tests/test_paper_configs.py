"""configs/paper/ (the seed paper's set-ups for GPU clusters) validate on a CPU machine with no network:
the config alone is checked (environment=False), not the files, GPUs and hub they need at run time."""
from __future__ import annotations

from pathlib import Path

import pytest

from async_rlhf.cli import main
from async_rlhf.config import load_config

PAPER = sorted((Path(__file__).parents[1] / "configs" / "paper").glob("*.yaml"))


def test_every_paper_config_is_there() -> None:
    assert [p.name for p in PAPER] == ["gsm8k_rho1b_vineppo.yaml", "norobots_llama3.1_8b.yaml",
                                       "tldr_pythia1b.yaml", "tldr_pythia2.8b.yaml", "tldr_pythia410m.yaml"]


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_config_validates_without_gpu_files_or_network(path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # validation must never reach the hub
    cfg = load_config(path, environment=False)
    assert cfg.weight_sync.transport == "nccl" and cfg.model.dtype == "bfloat16" and cfg.ray.address == "auto"
    assert cfg.generation.prompts_per_step % cfg.learner.num_ranks == 0
    assert cfg.generation.num_generators * cfg.generation.tensor_parallel_size + cfg.learner.num_ranks <= 8


def test_llama_8b_layout_is_one_generator_and_seven_learner_gpus() -> None:
    cfg = load_config(PAPER[1], environment=False)
    assert (cfg.generation.num_generators, cfg.generation.tensor_parallel_size, cfg.learner.num_ranks) == (1, 1, 7)
    assert cfg.learner.zero_stage == 3 and cfg.learner.gradient_checkpointing


def test_check_config_portable_flag(capsys) -> None:
    assert main(["check-config", str(PAPER[-1]), "--portable"]) == 0
    assert "num_ranks: 4" in capsys.readouterr().out
    assert main(["check-config", str(PAPER[-1])]) == 2  # here: no checkpoint, no GPU
    assert "model.path: no config.json in" in capsys.readouterr().err
