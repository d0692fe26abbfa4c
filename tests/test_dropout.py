"""Dropout off in what the learner trains: its log-probs are then the sampling policy's (no dropout in vLLM)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from async_rlhf.config.run import RunConfig
from learners.dropout import disable_dropout
from learners.learner import Learner
from learners.logprobs import completion_logprobs, pack
from tests.test_learner import VOCAB, make_cfg, save_word_tokenizer

PROMPTS = [[1, 4, 5], [1, 9], [1, 3, 3, 3, 7]]
COMPLETIONS = [[6, 7, 2], [8, 9, 10, 11, 12, 2], [2]]


def tiny_opt():
    """OPT keeps its rates as floats (attention `dropout`, layer `dropout`, `layerdrop`)."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                    vocab_size=VOCAB, max_position_embeddings=64, word_embed_proj_dim=32,
                                    dropout=0.1, attention_dropout=0.1, layerdrop=0.5))


def gpt2_dir(path: Path) -> Path:
    """GPT-2 as its checkpoints ship it: dropout 0.1 in nn.Dropout modules (embeddings, attention, residuals)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=VOCAB, bos_token_id=1,
                               eos_token_id=2, pad_token_id=0)).save_pretrained(path)
    return save_word_tokenizer(path)


def logprobs(model) -> torch.Tensor:
    with torch.no_grad():
        return completion_logprobs(model, pack(PROMPTS, COMPLETIONS))


def test_a_model_in_train_mode_without_dropout_gives_its_eval_mode_log_probs() -> None:
    model = tiny_opt()
    evaluated = logprobs(model.eval())
    assert not torch.equal(logprobs(model.train()), evaluated)  # the rates are live: the test bites
    assert disable_dropout(model) > 0
    assert torch.equal(logprobs(model.train()), evaluated)
    assert model.config.dropout == 0.1 and model.config.layerdrop == 0.5  # a saved checkpoint keeps the user's


@pytest.mark.integration
@pytest.mark.parametrize("disable", [True, False])
def test_the_learner_trains_gpt2_without_dropout_unless_told(tmp_path: Path, disable: bool) -> None:
    """The policy in the learner's train mode against the reference (the same weights, eval mode): equal with
    dropout off; with learner.disable_dropout=false GPT-2's 0.1 is kept and they differ."""
    cfg = RunConfig.model_validate({**make_cfg().model_dump(), "learner": {"disable_dropout": disable}})
    learner = Learner(cfg, str(gpt2_dir(tmp_path / "gpt2")), threads=1)
    learner.engine.train()
    assert torch.allclose(logprobs(learner.engine), logprobs(learner.reference), atol=1e-6) == disable
