"""The DeepSpeed learner on a tiny real Llama (CPU, gloo, ZeRO): training, publishing, log-probs."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from async_rlhf.config.run import RunConfig
from async_rlhf.rollout import Completion, Prompt, RewardStatus, RolloutGroup
from learners.learner import Learner
from learners.logprobs import completion_logprobs, pack
from tests.helpers import completion as make_completion
from tests.helpers import present

pytestmark = pytest.mark.integration  # real DeepSpeed engine (gloo, CPU) on a tiny Llama
VOCAB = 16


def build_model_dir(path: Path, tied: bool = False) -> Path:
    """A 2-layer Llama (random init, seed 0) and a word-level tokenizer saved as an HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_hidden_layers=2,
                         vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=tied,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path)
    return save_word_tokenizer(path)


def save_word_tokenizer(path: Path) -> Path:
    """A word-level tokenizer of VOCAB ids (pad 0, bos 1, eos 2, digits, three symbols) saved into `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{str(d): 3 + d for d in range(10)}, "|": 13, "x": 14, "y": 15}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)
    return path


def make_cfg(lr: float = 1e-3, zero_stage: int = 2, loss: str = "online_dpo") -> RunConfig:
    # float32 named, not `auto`: on a GPU machine too (these tests run there as well), the numbers are float32's.
    return RunConfig(seed=0, model={"dtype": "float32"}, loss={"name": loss, "beta": 0.1},
                     learner={"lr": lr, "zero_stage": zero_stage, "grad_clip": 1.0})


def completion(ids: list[int], reward: float | None, status: RewardStatus = "ok") -> Completion:
    return make_completion(ids, reward, status, logprob=0.0)


def synthetic_groups() -> list[RolloutGroup]:
    """4 prompts x 4 completions of different lengths with distinct rewards, + a tied and a failed group."""
    gen = torch.Generator().manual_seed(1)
    groups = []
    for pid in range(4):
        prompt = [1] + torch.randint(3, VOCAB, (3 + pid,), generator=gen).tolist()
        comps = [completion(torch.randint(3, VOCAB, (2 + k,), generator=gen).tolist() + [2], float(k))
                 for k in range(4)]
        groups.append(RolloutGroup(Prompt(pid, "", prompt), comps, policy_version=0, generator_id=0,
                                   created_at=0.0))
    tied = [completion([5, 6, 2], 1.0), completion([7, 2], 1.0)]
    failed = [completion([5, 2], 3.0), completion([8, 2], None, "failed")]
    groups.append(RolloutGroup(Prompt(10, "", [1, 4, 4]), tied, 0, 0, 0.0))
    groups.append(RolloutGroup(Prompt(11, "", [1, 9]), failed, 0, 0, 0.0))
    return groups


def params_snapshot(learner: Learner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in learner.policy.state_dict().items()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def trained(model_dir):
    """A learner after 6 DPO steps on the fixed batch, and the metrics of each step."""
    learner = Learner(make_cfg(), str(model_dir), threads=2)
    history = [learner.train_step(synthetic_groups()) for _ in range(6)]
    return learner, history


# ------------------------------------------------------------------ training


def test_dpo_steps_lower_loss_and_raise_margin(trained):
    _, history = trained
    first, last = history[0], history[-1]
    assert [m["version"] for m in history] == [1, 2, 3, 4, 5, 6]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference before step 1
    assert first["kl"] == pytest.approx(0.0, abs=1e-6) and first["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert last["loss"] < first["loss"] - 0.05
    assert last["reward_margin"] > 0.05 and last["reward_accuracy"] == 1.0
    losses = [m["loss"] for m in history]
    assert all(b < a for a, b in zip(losses, losses[1:]))  # same batch every step: monotone at this lr
    for m in history:
        assert (m["pairs"], m["skipped_ties"], m["skipped_failed"]) == (4, 1, 1)
        assert m["nonfinite"] == 0 and m["optimizer_step"] == 1
    # completion k has 2+k random tokens + EOS. chosen = k=3 (6 tokens), rejected = k=0 (3 tokens), 4 prompts
    assert first["train_tokens"] == 4 * (6 + 3)


def test_kl_to_reference(model_dir, trained):
    learner, _ = trained
    assert learner.kl_to_reference(synthetic_groups()) != pytest.approx(0.0, abs=1e-3)
    assert math.isnan(learner.kl_to_reference([]))


def with_policy_logprobs(learner: Learner, groups: list[RolloutGroup]) -> list[RolloutGroup]:
    """`groups` as if `learner`'s policy had sampled them: each completion carries its log-probs."""
    out = []
    for g in groups:
        batch = pack([list(g.prompt.token_ids)] * len(g.completions), [c.token_ids for c in g.completions])
        batch = batch.to(learner.device)
        with torch.no_grad():
            logps = completion_logprobs(learner.policy, batch)
        comps = [dataclasses.replace(c, logprobs=logps[i, :len(c.token_ids)].tolist())
                 for i, c in enumerate(g.completions)]
        out.append(dataclasses.replace(g, completions=comps))
    return out


def test_sampled_kl_is_the_policy_kl_when_the_policy_sampled(trained):
    """An evaluation's KL from the generator's log-probs equals the learner's own while it holds the sampling
    weights (later it is still that version's, where kl_to_reference would measure the learner's newer one)."""
    learner, _ = trained
    sampled = with_policy_logprobs(learner, synthetic_groups())
    expected = learner.kl_to_reference(synthetic_groups())
    assert learner.sampled_kl_to_reference(sampled, 1.0) == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert math.isnan(learner.sampled_kl_to_reference([], 1.0))


def test_zero_pairs_still_advances_version_without_update(model_dir):
    learner = Learner(make_cfg(), str(model_dir), threads=2)
    assert learner.kl_to_reference(synthetic_groups()) == pytest.approx(0.0, abs=1e-6)
    before = params_snapshot(learner)
    metrics = learner.train_step(synthetic_groups()[4:])  # only the tied and the failed group
    assert metrics["version"] == learner.version == 1
    assert (metrics["pairs"], metrics["skipped_ties"], metrics["skipped_failed"]) == (0, 1, 1)
    assert metrics["optimizer_step"] == 0 and metrics["train_tokens"] == 0
    assert all(torch.equal(before[k], v) for k, v in learner.policy.state_dict().items())

    # A non-finite loss is reported and skipped, never applied.
    spec = learner.spec
    learner.spec = dataclasses.replace(spec, fn=lambda inputs, p: (inputs.logps.sum() * math.nan, {}))
    metrics = learner.train_step(synthetic_groups())
    learner.spec = spec
    assert metrics["nonfinite"] == 1 and metrics["optimizer_step"] == 0 and metrics["version"] == 2
    assert all(torch.equal(before[k], v) for k, v in learner.policy.state_dict().items())
    assert learner.train_step(synthetic_groups())["optimizer_step"] == 1  # and training goes on


@pytest.mark.parametrize("stage", [0, 1])
def test_other_zero_stages_update_the_module(model_dir, stage):
    # Stage 2 is covered by `trained`; with ZeRO-1/2 the optimizer owns fp32 partitions, so check the
    # HF module (what save_weights reads) really receives the update.
    learner = Learner(make_cfg(zero_stage=stage), str(model_dir), threads=2)
    before = params_snapshot(learner)
    learner.train_step(synthetic_groups())
    after = learner.policy.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert learner.train_step(synthetic_groups())["reward_margin"] > 0


def test_bfloat16_autocast_computes_in_bf16_on_float32_weights(model_dir, trained):
    """learner.autocast=bfloat16: the policy's and the reference's layers compute in bfloat16, the weights
    (and so the optimizer and the published files) stay float32, and training follows the float32 learner."""
    cfg = make_cfg()
    cfg.learner.autocast = "bfloat16"
    learner = Learner(cfg, str(model_dir), threads=2)
    seen: list[tuple[str, torch.dtype]] = []
    for name, model in (("policy", learner.policy), ("reference", learner.reference)):
        model.model.layers[0].mlp.register_forward_hook(lambda _m, _a, out, n=name: seen.append((n, out.dtype)))
    history = [learner.train_step(synthetic_groups()) for _ in range(6)]
    assert sorted(set(seen)) == [("policy", torch.bfloat16), ("reference", torch.bfloat16)] and len(seen) == 12
    assert {p.dtype for p in learner.policy.parameters()} == {torch.float32}
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # same weights, same rounding: ratio 0
    float32 = [m["loss"] for m in trained[1]]
    losses = [m["loss"] for m in history]
    assert losses[-1] < losses[0] - 0.05
    assert losses == pytest.approx(float32, abs=0.02), (losses, float32)


# ------------------------------------------------------------------ publishing


def test_save_weights_matches_state_dict_and_save_pretrained_names(trained, tmp_path):
    learner, _ = trained
    learner.save_weights(str(tmp_path / "w"))
    learner.save_pretrained(str(tmp_path / "full"))
    saved = load_file(str(tmp_path / "w" / "model.safetensors"))
    state = learner.policy.state_dict()
    assert set(saved) == set(state)
    assert all(torch.equal(saved[k], state[k].cpu()) for k in state)
    assert set(saved) == set(load_file(str(tmp_path / "full" / "model.safetensors")))
    assert [p.name for p in (tmp_path / "w").iterdir()] == ["model.safetensors"]  # no temp file left
    # safetensors wrote it -rw------- (a private temporary file renamed): readable as the umask says, like config.json
    full = tmp_path / "full"
    assert (full / "model.safetensors").stat().st_mode & 0o777 == (full / "config.json").stat().st_mode & 0o777


def test_save_weights_tied_embeddings_named_like_save_pretrained(tmp_path):
    learner = Learner(make_cfg(), str(build_model_dir(tmp_path / "tied", tied=True)), threads=2)
    learner.train_step(synthetic_groups())
    learner.save_weights(str(tmp_path / "w"))
    learner.save_pretrained(str(tmp_path / "full"))
    saved = load_file(str(tmp_path / "w" / "model.safetensors"))
    assert "lm_head.weight" not in saved
    assert set(saved) == set(load_file(str(tmp_path / "full" / "model.safetensors")))
    assert torch.equal(saved["model.embed_tokens.weight"], learner.policy.lm_head.weight.detach().cpu())


def test_save_pretrained_reloads_with_identical_logits(model_dir, trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    learner, _ = trained
    learner.save_pretrained(str(tmp_path))
    # On the learner's device: the same kernels, so equal logits mean equal weights.
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).to(learner.device).eval()
    original = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(learner.device).eval()
    ids = torch.tensor([[1, 4, 5, 6, 7, 8, 2], [1, 9, 9, 3, 14, 15, 2]], device=learner.device)
    learner.policy.eval()
    with torch.no_grad():
        expected = learner.policy(input_ids=ids).logits
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
        assert not torch.allclose(original(input_ids=ids).logits, expected)  # training did change it
    assert AutoTokenizer.from_pretrained(str(tmp_path))("1 2 |").input_ids == [4, 5, 13]


# ------------------------------------------------------------------ log-probs helper


def test_completion_logprobs_match_direct_forward(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    prompts = [[1, 4, 5], [1, 9], [1, 3, 3, 3, 7]]
    completions = [[6, 7, 2], [8, 9, 10, 11, 12, 2], [2]]
    with torch.no_grad():
        got = completion_logprobs(model, pack(prompts, completions, pad_id=0))
        assert got.shape == (3, 6)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            # Independent reference: one unpadded row, full log_softmax, read token t at position t-1.
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0], dim=-1)
            expected = torch.stack([logp[len(p) - 1 + j, tok] for j, tok in enumerate(c)])
            torch.testing.assert_close(got[i, : len(c)], expected, atol=1e-5, rtol=1e-5)
            assert torch.all(got[i, len(c):] == 0)


def test_reference_path_loads_another_reference(model_dir, tmp_path):
    """model.reference_path: KL is measured against that model, not the policy's own start."""
    from transformers import LlamaForCausalLM

    other = LlamaForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        other.lm_head.weight.add_(torch.randn(other.lm_head.weight.shape, generator=torch.Generator().manual_seed(3)))
    other.save_pretrained(tmp_path / "reference")
    base = make_cfg().model_dump()
    cfg = RunConfig.model_validate({**base, "model": {"source": "local", "path": str(model_dir), "dtype": "float32",
                                                      "reference_path": str(tmp_path / "reference")}})
    learner = Learner(cfg, str(model_dir), threads=2)
    assert torch.equal(learner.reference.lm_head.weight.cpu(), other.lm_head.weight)
    assert abs(learner.kl_to_reference(synthetic_groups())) > 1e-3  # version 0: the policy is still model_dir
    same = Learner(make_cfg(), str(model_dir), threads=2)
    assert same.kl_to_reference(synthetic_groups()) == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize(("stage", "loss"), [(0, "online_dpo"), (1, "online_dpo"), (2, "online_dpo"), (2, "ppo")])
def test_save_state_then_load_state_continues_bit_for_bit(model_dir, tmp_path, stage, loss):
    """Module, AdamW moments (ZeRO partitions), step counters and RNG all come back: three more
    steps after a restore give exactly the weights of three more steps without one (with ppo, the
    value model and its optimizer too)."""
    learner = Learner(make_cfg(zero_stage=stage, loss=loss), str(model_dir), threads=2)
    for _ in range(2):
        learner.train_step(synthetic_groups())
    learner.save_state(str(tmp_path / "state"))
    expected_rng = torch.rand(3)
    for _ in range(3):
        learner.train_step(synthetic_groups())
    resumed = Learner(make_cfg(zero_stage=stage, loss=loss), str(model_dir), threads=2)
    assert resumed.load_state(str(tmp_path / "state")) == 2 and resumed.version == 2
    assert torch.equal(torch.rand(3), expected_rng)
    for _ in range(3):
        resumed.train_step(synthetic_groups())
    after, want = resumed.policy.state_dict(), learner.policy.state_dict()
    assert all(torch.equal(after[k], want[k]) for k in want)
    saved = ["engines", "learner_state.pkl", "reference.pt"] + (["value_model"] if loss == "ppo" else [])
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == saved
    if loss == "ppo":
        v_after, v_want = present(resumed.value).model.state_dict(), present(learner.value).model.state_dict()
        assert all(torch.equal(v_after[k], v_want[k]) for k in v_want)


def test_the_cpu_learner_builds_no_deepspeed_op(tmp_path):
    """DeepSpeed's CPU comm backend would compile its shared-memory op with g++ at the learner's start (27 s on
    2 cores on a fresh machine, and a C++ compiler needed): a fresh extension cache stays empty."""
    import os
    import subprocess
    import sys

    code = ("from learners.distributed import init_distributed; init_distributed(); "
            "import deepspeed.comm.comm as c; print('shm op', c.cdb.shm_comm_op)")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"), "DS_ACCELERATOR": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "shm op None" in out.stdout
    assert not list(tmp_path.glob("extensions/**/*.so"))
