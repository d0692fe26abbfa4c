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


def save_and_load(out: Path, block: str) -> subprocess.CompletedProcess:
    env_free = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    return subprocess.run([sys.executable, "-c", SAVE_AND_LOAD.format(block=block), str(out)], capture_output=True,
                          text=True, timeout=300, env=env_free)


def test_a_load_and_save_inside_quiet_transformers_print_nothing_and_leave_the_process_as_it_was(
        tmp_path: Path) -> None:
    quiet = save_and_load(tmp_path / "quiet", "quiet_transformers()")
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert quiet.stderr == "" and quiet.stdout.split() == ["False", "True"]
    assert (tmp_path / "quiet" / "model.safetensors").is_file()
    plain = save_and_load(tmp_path / "plain", "__import__('contextlib').nullcontext()")  # what the saves printed before
    assert "Writing model shards" in plain.stderr and "Loading weights" in plain.stderr
    assert "Setting accelerator to CPU" in plain.stdout  # DeepSpeed's logger writes to stdout
