"""Kill a whole run (SIGKILL to the driver's process group: Ray and vLLM die with it) at a random step,
then `train --resume`: same steps, same prompts each trained once, no step logged twice; and, resumed
from an earlier checkpoint of a deterministic run, the very same weights as that run."""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, cli_command, train_command

pytestmark = pytest.mark.slow
PER_STEP = 16
TIMING_KEYS = {"elapsed_s", "step_s", "gen_tokens_per_s", "queue_depth"}  # wall-clock figures, not results
SECRET = "s3cret-api-token-0123456789"  # api.token: must reach no file of the run and no output


def command(run_dir: Path, overrides: list[str], resume: bool = False) -> list[str]:
    return train_command(run_dir, "eval.every=0", "task.eval_prompts=16", "api.enabled=false", *overrides,
                         resume=resume)


def run_to_end(run_dir: Path, overrides: list[str], resume: bool = False) -> str:
    return run_command(command(run_dir, overrides, resume))


def run_command(args: list[str]) -> str:
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def evals_without_clock(run_dir: Path) -> list[dict]:
    """eval.jsonl without the wall-clock fields, which differ between any two runs."""
    records = [json.loads(line) for line in lines(run_dir / "eval.jsonl")]
    clock = ("wall_s", "eval_s", "eval_gen_s", "eval_blocking_s", "eval_blocking_before_s")
    return [{k: v for k, v in r.items() if k not in clock} for r in records]


def run_and_kill(run_dir: Path, overrides: list[str], at_step: int) -> None:
    """Start a run in its own session and SIGKILL its whole process group once `at_step` is logged."""
    proc = subprocess.Popen(command(run_dir, overrides), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while len(lines(run_dir / "metrics.jsonl")) < at_step:
            assert proc.poll() is None and time.monotonic() < deadline, "run ended or stalled before the kill"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 60
    while _group_alive(proc.pid):  # Ray's processes share the driver's fate (and its group)
        assert time.monotonic() < deadline, "processes of the killed run are still alive"
        time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in lines(run_dir / "metrics.jsonl")]


def results(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records(run_dir)]


def test_killed_async_run_resumes_from_the_previous_checkpoint_when_the_latest_is_corrupt(tmp_path: Path) -> None:
    steps, kill_at = 8, random.randint(5, 7)  # checkpoints at 2 and 4 exist by then
    overrides = [f"learner.steps={steps}", "queue.max_staleness=1", "checkpoint.every=2", "checkpoint.keep_last=2",
                 f"api.token={SECRET}"]
    run_dir = tmp_path / f"resume-async-{os.getpid()}"
    run_and_kill(run_dir, overrides, kill_at)
    # A kill during a checkpoint's write leaves step-N.partial: never a checkpoint, removed by the resumed run.
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.endswith(".partial"))
    assert len(before) == 2 and all(n.startswith("step-") for n in before), before  # keep_last=2
    latest, previous = run_dir / "checkpoints" / before[-1], run_dir / "checkpoints" / before[0]
    with (previous / "controller_state.pkl").open("rb") as fh:
        queued = len(pickle.load(fh).queued)
    # The largest state file: the optimizer's (ZeRO 1-2), or the module's with the optimizer in it (ZeRO 0).
    states = max((latest / "learner" / "engines" / "policy").glob("*states.pt"), key=lambda p: p.stat().st_size)
    states.write_bytes(states.read_bytes()[:100])  # truncated, as by a full disk

    err = run_to_end(run_dir, overrides, resume=True)  # config.yaml holds the token as ***: resume still works
    assert SECRET not in err and "api.token" not in err
    assert not [p for p in run_dir.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert "token: '***'" in (run_dir / "config.yaml").read_text()
    assert f"checkpoint {latest.name} is not usable: learner/engines/policy/{states.name} has 100 bytes" in err
    assert f"resumed from {previous} at step {int(previous.name[5:])}" in err
    recs = records(run_dir)
    assert [r["step"] for r in recs] == list(range(1, steps + 1))  # none repeated, none missing
    trained = sorted(pid for r in recs for pid in r["prompt_ids"])
    assert trained == list(range(steps * PER_STEP))  # every prompt once, like an uninterrupted run
    assert all(r["staleness_max"] <= 1 for r in recs)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps and summary["episodes"] == steps * PER_STEP * 4
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000006", "step-000008"]
    assert queued > 0  # the resumed queue was not empty: its groups were trained, none regenerated or lost
    assert not list(Path("/dev/shm").glob(f"async-rlhf-{run_dir.name}-*"))  # the killed run's weights removed
    print(f"killed at step {kill_at}; resumed from {previous.name} with {queued} queued groups")


def interrupted_copy(run_dir: Path, dest: Path, keep_step: int) -> None:
    """`dest` as a run interrupted right after checkpoint `keep_step` would leave it: the run's files
    and checkpoints up to there, no summary and no final model (the killed-run case is tested above)."""
    shutil.copytree(run_dir, dest)
    for path in [dest / "summary.json", dest / "final", dest / "weights_location"]:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    for ckpt in (dest / "checkpoints").iterdir():
        if int(ckpt.name[5:]) > keep_step:
            shutil.rmtree(ckpt)


def check_synchronous_run(run_dir: Path, steps: int, ray) -> None:
    """A max_staleness=0 run is the synchronous baseline: nothing stale, no core pinning, no generation
    overlapping a learner step, and its final policy loads in transformers and in vLLM."""
    from transformers import AutoModelForCausalLM

    from actors.generator import GeneratorActor
    from async_rlhf.config.generation import GenerationConfig
    from async_rlhf.rollout import Prompt

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps and summary["max_staleness_seen"] == 0
    assert summary["staleness_histogram"] == {"0": steps * PER_STEP} and summary["cores_pinned"] is False
    events = [json.loads(line) for line in lines(run_dir / "timeline.jsonl")]
    learn = [e for e in events if e["kind"] == "learn"]
    assert [e["version"] for e in learn] == list(range(1, steps + 1))
    for gen in (e for e in events if e["kind"] == "generation"):
        assert all(gen["end"] <= step["start"] + 0.01 or gen["start"] >= step["end"] - 0.01 for step in learn), gen
    AutoModelForCausalLM.from_pretrained(run_dir / "final")
    actor = ray.remote(GeneratorActor).options(num_cpus=1).remote(0, str(run_dir / "final"), GenerationConfig())
    result = ray.get(actor.generate.remote([Prompt(0, "321>", [1, 6, 5, 4, 13])], n=2))
    assert len(result.groups[0].completions) == 2
    ray.kill(actor)


def test_deterministic_resume_gives_identical_weights(tmp_path: Path, ray_local) -> None:
    """Resumed from an earlier checkpoint of a deterministic run (max_staleness=0), the rest of the
    run repeats exactly: same weights bit for bit, same per-step results, same evals. The straight run
    doubles as the synchronous baseline's end-to-end check."""
    import torch
    from safetensors.torch import load_file

    steps, keep_step = 6, random.choice([2, 4])
    overrides = [f"learner.steps={steps}", "queue.max_staleness=0", "generation.num_generators=1",
                 "checkpoint.every=2", "checkpoint.keep_last=3"]
    straight, resumed = tmp_path / f"straight-{os.getpid()}", tmp_path / f"resumed-{os.getpid()}"
    run_to_end(straight, overrides)
    check_synchronous_run(straight, steps, ray_local)
    interrupted_copy(straight, resumed, keep_step)
    err = run_command(cli_command("train", "--resume", str(resumed)))  # with the run's own config.yaml
    assert f"at step {keep_step}" in err and f"{steps} steps in " in err
    assert f"(this process from step {keep_step}), " in err  # the training seconds are both processes'
    want = load_file(str(straight / "final" / "model.safetensors"))
    got = load_file(str(resumed / "final" / "model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert results(resumed) == results(straight)  # losses, rewards, KL, prompt ids: step by step
    assert evals_without_clock(resumed) == evals_without_clock(straight)
