"""A Hugging Face Hub model id as `model.path` (config/hub_models.py): resolved to its snapshot in the Hub's own
cache, the layout huggingface_hub itself reads (a real `snapshot_download`, offline: this machine has no network,
so the cache is laid out here as a download leaves it); a directory of the same name wins; an id neither cached
nor downloadable is one line naming both readings."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from async_rlhf.config.base import ConfigError
from async_rlhf.config.hub_models import hub_reason, is_hub_id
from async_rlhf.config.run import load_config
from tests.helpers import QUICKSTART

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cached(cache: Path, repo_id: str, checkpoint: Path) -> Path:
    """`repo_id` in a Hub cache, as `snapshot_download` leaves it: refs/main names the commit, snapshots/<commit>/
    holds the files."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(checkpoint, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return repo / "snapshots" / COMMIT


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, random_policies: tuple[Path, Path]) -> Path:
    """`owner/tiny-llama` in a Hub cache of its own; the snapshot's directory."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never the network, whatever this machine has
    monkeypatch.chdir(tmp_path)
    return cached(tmp_path / "hub", "owner/tiny-llama", random_policies[0])


def local(*overrides: str) -> list[str]:
    return ["model.source=local", *overrides]


def test_a_hub_id_is_its_snapshot_in_the_hub_cache(hub_cache: Path) -> None:
    cfg = load_config(QUICKSTART, local("model.path=owner/tiny-llama", "model.reference_path=owner/tiny-llama"))
    assert cfg.model.path == cfg.model.reference_path == hub_cache.resolve()
    portable = load_config(QUICKSTART, local("model.path=owner/tiny-llama"), environment=False)
    assert str(portable.model.path) == "owner/tiny-llama"  # resolved where it runs


def test_a_checkpoint_without_safetensors_is_fetched_with_its_bin_weights(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub itself stands in here (this machine has no network): a repository of config.json and
    pytorch_model.bin, as older uploads are, gives each `snapshot_download` the files its patterns match."""
    import fnmatch

    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from async_rlhf.config.hub_models import hub_snapshot

    repository = {"config.json": "{}", "pytorch_model.bin": "weights", "training_args.bin": "args"}
    asked: list[list[str]] = []

    def snapshot_download(repo_id: str, allow_patterns: list[str], local_files_only: bool = False) -> str:
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        asked.append(allow_patterns)
        folder = tmp_path / repo_id
        folder.mkdir(parents=True, exist_ok=True)
        for name in (n for n in repository if any(fnmatch.fnmatch(n, p) for p in allow_patterns)):
            (folder / name).write_text(repository[name])
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    folder = hub_snapshot("owner/older")
    assert (folder / "pytorch_model.bin").is_file() and len(asked) == 2 and "*.safetensors" in asked[0]
    assert asked[1] == ["*.bin"]


def test_a_learned_reward_model_by_its_hub_id(hub_cache: Path, tiny_rm: Path) -> None:
    snapshot = cached(hub_cache.parents[2], "owner/tiny-rm", tiny_rm)
    cfg = load_config(QUICKSTART, ["reward.learned.path=owner/tiny-rm"])
    assert cfg.reward.learned is not None and cfg.reward.learned.path == snapshot.resolve()
    with pytest.raises(ConfigError, match=r"^config error: reward.learned.path: 'owner/nothing' is neither a "):
        load_config(QUICKSTART, ["reward.learned.path=owner/nothing"])


def test_a_directory_of_the_same_name_wins_over_the_hub(hub_cache: Path, random_policies: tuple[Path, Path]) -> None:
    shutil.copytree(random_policies[1], Path("owner") / "tiny-llama")
    assert not is_hub_id("owner/tiny-llama")
    cfg = load_config(QUICKSTART, local("model.path=owner/tiny-llama"))
    assert cfg.model.path == (Path.cwd() / "owner" / "tiny-llama")


def test_an_id_neither_here_nor_in_the_cache_is_one_line(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as offline:
        load_config(QUICKSTART, local("model.path=owner/other"))
    assert str(offline.value) == (
        f"config error: model.path: 'owner/other' is neither a directory here ({Path.cwd() / 'owner' / 'other'}) nor "
        "in the Hugging Face cache, and HF_HUB_OFFLINE is set; download it where the Hub can be reached, or point it "
        "at a checkpoint directory")
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # a Hub refusing at once
    with pytest.raises(ConfigError) as unreachable:
        load_config(QUICKSTART, local("model.path=owner/other"))
    said = str(unreachable.value)
    assert said.startswith(f"config error: model.path: 'owner/other' is neither a directory here "
                           f"({Path.cwd() / 'owner' / 'other'}) nor a model the Hugging Face Hub gave (")
    assert said.endswith("; point it at a checkpoint directory, or fix the id")
    assert len(said.splitlines()) == 1


def test_what_reads_as_a_hub_id() -> None:
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M") and is_hub_id("models/llama-3.1-8b")
    assert not any(is_hub_id(text) for text in ("smollm2", "/abs/dir", "./rel/dir", "a/b/c", "../up", "a/..", "-x/y"))
    assert hub_reason(RuntimeError("401 for hf_abcdefghijklmnop\nmore")) == "401 for ***"
    assert hub_reason(RuntimeError()) == "RuntimeError"
