"""`async-rlhf sample-pairs` end to end (the real vLLM engine in the command's own process, the gold scorer), and
the capture that keeps that engine's start-up output off the terminal."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from async_rlhf.config.run import load_config
from async_rlhf.outputs.captured_output import output_to
from tests.helpers import QUICKSTART, ROOT, cli_command, read_jsonl


def test_output_to_sends_fds_1_and_2_to_the_file_and_gives_them_back_after_an_error(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "engine.log"
    with pytest.raises(RuntimeError), output_to(log):  # fds, as a library's native code writes (pytest owns print)
        os.write(1, b"out\n")
        os.write(2, b"err\n")
        raise RuntimeError("the engine failed")
    os.write(1, b"ours again\n")
    assert log.read_text() == "out\nerr\n"
    assert capfd.readouterr().out == "ours again\n"


@pytest.mark.slow
def test_sample_pairs_writes_gold_labelled_pairs_and_only_its_own_lines(tmp_path: Path) -> None:
    from async_rlhf.policies.embedded import ensure_policy

    policy = ensure_policy(load_config(QUICKSTART), log=lambda m: None)  # the sort warm start (cached)
    out = tmp_path / "pairs.jsonl"
    done = subprocess.run(cli_command("sample-pairs", str(QUICKSTART), "model.source=local", f"model.path={policy}",
                                      "--out", str(out), "--prompts", "16", "--samples", "4"),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == ""
    *lines, last = done.stdout.strip().splitlines()
    assert all(line.startswith("[async-rlhf] sample-pairs: ") for line in lines), done.stdout
    summary = json.loads(last)
    pairs = read_jsonl(out)
    assert summary["pairs"] == len(pairs) >= 1 and summary["pairs"] + summary["ties"] == summary["prompts"] == 16
    assert all(p["chosen_score"] > p["rejected_score"] and p["prompt"].endswith(">") for p in pairs)
    assert out.with_name("pairs.jsonl.engine.log").read_text().strip()  # the engine's start-up lines, kept
