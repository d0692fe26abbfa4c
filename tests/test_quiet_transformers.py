"""A model our own process loads or saves (export-model, prepare, serve-reward, a first run's warm start, the
benchmarks) adds nothing to the terminal: no "Loading weights" or "Writing model shards" bar, no DeepSpeed guess of
the accelerator, and leaves the process as it was. Run in a fresh interpreter: DeepSpeed warns only at its first
import, which pytest's process has had."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SAVE_AND_LOAD = """
import os, sys
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging
from async_rlhf.policies.quiet_transformers import quiet_transformers
model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2, vocab_size=50))
with {block}:
    model.save_pretrained(sys.argv[1])
    LlamaForCausalLM.from_pretrained(sys.argv[1])
print("DS_ACCELERATOR" in os.environ, hf_logging.is_progress_bar_enabled())
"""


def save_and_load(out: Path, block: str) -> subprocess.Popen:
    env_free = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    return subprocess.Popen([sys.executable, "-c", SAVE_AND_LOAD.format(block=block), str(out)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env_free)


def test_a_load_and_save_inside_quiet_transformers_print_nothing_and_leave_the_process_as_it_was(
        tmp_path: Path) -> None:
    quiet = save_and_load(tmp_path / "quiet", "quiet_transformers()")
    plain = save_and_load(tmp_path / "plain", "__import__('contextlib').nullcontext()")  # what was printed before
    (quiet_out, quiet_err), (plain_out, plain_err) = quiet.communicate(timeout=300), plain.communicate(timeout=300)
    assert quiet.returncode == 0, quiet_err[-2000:]
    assert quiet_err == "" and quiet_out.split() == ["False", "True"]
    assert (tmp_path / "quiet" / "model.safetensors").is_file()
    assert "Writing model shards" in plain_err and "Loading weights" in plain_err
    assert "Setting accelerator to CPU" in plain_out  # DeepSpeed's logger writes to stdout
