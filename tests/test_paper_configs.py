"""configs/paper/ (the seed paper's set-ups for GPU clusters) validate on a CPU machine with no network:
the config alone is checked (environment=False), not the files, GPUs and hub they need at run time."""
from __future__ import annotations

from pathlib import Path

import pytest

from async_rlhf.cli.main import main
from async_rlhf.config.base import ConfigError
from async_rlhf.config.gpu_sizing import (
    ModelShape,
    activation_bytes_per_token,
    comment_line,
    estimate,
    parse_comment,
    state_bytes_per_param,
)
from async_rlhf.config.run import RunConfig, load_config
from async_rlhf.config.task import FILE_FORMATS, same_source, source_format
from tests.helpers import QUICKSTART

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


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_config_validates_portable(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by hand: `check-config --portable configs/smollm2_gold_proxy.yaml` looked for its reward model's files
    (written by the run it is the last step of) on this machine. And on a machine whose model cache is empty (a
    fresh CI machine) it failed until `prepare smollm2` had run: a prepared model is prepared where the run is."""
    monkeypatch.setenv("ASYNC_RLHF_CACHE", str(tmp_path / "empty-cache"))
    load_config(path, environment=False)


def test_llama_8b_layout_is_one_generator_and_seven_learner_gpus() -> None:
    cfg = load_config(PAPER[1], environment=False)
    assert (cfg.generation.num_generators, cfg.generation.tensor_parallel_size, cfg.learner.num_ranks) == (1, 1, 7)
    assert cfg.learner.zero_stage == 3 and cfg.learner.gradient_checkpointing


def test_check_config_portable_flag(capsys) -> None:
    assert main(["check-config", str(PAPER[-1]), "--portable"]) == 0
    assert "num_ranks: 4" in capsys.readouterr().out
    assert main(["check-config", str(PAPER[-1])]) == 2  # here: no checkpoint, no GPU
    assert "is neither a directory here (" in capsys.readouterr().err  # read as a Hub id too: one line names both


# ---- held-out evaluation ---------------------------------------------------------------------------

def _train_and_eval_sources(cfg: RunConfig) -> tuple[tuple[str, str], tuple[str, str] | None]:
    """(source, split) of the train prompts and of the eval prompts (None: a hashed fraction of the train file)."""
    data = cfg.task.dataset
    assert data is not None
    one_split = source_format(data.path, data.format) in FILE_FORMATS  # a file is one split whatever `split` says
    train = (data.path, "" if one_split else data.split)
    if data.eval_path is None:
        return train, None
    return train, (data.eval_path, "" if one_split else data.eval_source_split)


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_config_evaluates_on_prompts_it_never_trains_on(path: Path) -> None:
    cfg = load_config(path, environment=False)
    train, held_out = _train_and_eval_sources(cfg)
    if held_out is None:  # rows hashed below eval_fraction leave the train stream (tests/test_prompt_data.py)
        assert cfg.task.dataset is not None and cfg.task.dataset.eval_fraction > 0
    else:
        assert not (same_source(train[0], held_out[0]) and train[1] == held_out[1]), (train, held_out)


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_pointing_a_paper_config_at_its_train_split_for_evaluation_is_refused(path: Path) -> None:
    data = load_config(path, environment=False).task.dataset
    assert data is not None  # every paper config trains on a dataset
    leak = [f"task.dataset.eval_path={data.path}", f"task.dataset.eval_split={data.split}"]
    with pytest.raises(ConfigError, match="evaluation must be on held-out prompts"):
        load_config(path, leak, environment=False)


# ---- GPU memory: learner.max_tokens_per_micro_batch on an 80 GB GPU (docs/gpu_sizing.md) ------------

def _estimate_line(path: Path) -> tuple[str, str, ModelShape]:
    """The config's one estimate line, which must sit right above its max_tokens_per_micro_batch."""
    lines = path.read_text().splitlines()
    found = [(i, parsed) for i, line in enumerate(lines) if (parsed := parse_comment(line)) is not None]
    assert len(found) == 1, f"{path.name}: expected one '# memory/rank' line, found {len(found)}"
    i, (name, shape) = found[0]
    assert lines[i + 1].strip().startswith("max_tokens_per_micro_batch:")
    return lines[i].strip(), name, shape


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_config_micro_batch_bound_fits_an_80gb_gpu(path: Path) -> None:
    cfg = load_config(path, environment=False)
    line, name, shape = _estimate_line(path)
    bound, est = cfg.learner.max_tokens_per_micro_batch, estimate(cfg, shape, gpu_gib=80)
    assert bound is not None
    assert line == comment_line(cfg, name, shape)  # the numbers written in the config are this config's
    assert bound <= est.max_tokens and est.peak_gib(bound) <= est.usable_gib
    # A group is never cut: one group of the longest rows must fit the bound, or it would exceed it alone.
    assert cfg.generation.samples_per_prompt * cfg.generation.max_model_len <= bound


def test_zero_stages_partition_states_as_the_zero_paper_says() -> None:
    # bf16 weights 2 + fp32 gradients 4 + fp32 master and AdamW moments 12, over 4 ranks
    assert [state_bytes_per_param(stage, 4) for stage in (0, 1, 2, 3)] == [18, 2 + 4 + 3, 2 + 1 + 3, 18 / 4]


def test_activation_and_logit_bytes_per_token_by_hand() -> None:
    shape = ModelShape(params=1e6, hidden=8, layers=3, mlp=32, vocab=100)
    layer = 2 * (8 * 8 + 4 * 32)  # 384 bytes per layer and token
    assert activation_bytes_per_token(shape, checkpointing=False) == 3 * layer + 14 * 100
    assert activation_bytes_per_token(shape, checkpointing=True) == 3 * 2 * 8 + layer + 14 * 100


def test_shared_gpu_gives_the_learner_only_its_fraction() -> None:
    shape = ModelShape(params=1.35e8, hidden=576, layers=30, mlp=1536, vocab=49152)  # SmolLM2-135M
    overrides = ["weight_sync.transport=ipc", "generation.gpu_memory_utilization=0.5",
                 "learner.gpu_memory_fraction=0.4"]
    shared = estimate(load_config(QUICKSTART, overrides, environment=False), shape, gpu_gib=80)
    alone = estimate(load_config(QUICKSTART, environment=False), shape, gpu_gib=80)
    assert shared.usable_gib == pytest.approx(0.4 * alone.usable_gib)  # vLLM holds the rest of the GPU
    assert shared.max_tokens < 0.4 * alone.max_tokens
