"""Random faults in real runs: each run gets 1-3 faults at random seconds after launch (start-up, loop and end
alike), each a SIGKILL, a SIGSTOP, or a SIGSTOP with a SIGCONT 3-20 s later, of a random worker (the learner, a
generator, the reward actor). A run passes when it exits 0 with every step logged once, a summary and no
traceback; anything else is printed as CHECK with its last line (a one-line failure may be right: read it).

    .venv/bin/python scripts/chaos.py OUT FIRST_SEED END_SEED [--configs C ...] [--steps N] [--within S]
        [--set KEY=VALUE ...]

It finds the workers by their Ray process names (`ray::Learner` ...): run nothing else with Ray on the machine
meanwhile. Session 39 ran 54 runs over the six quickstart losses, arith_vineppo and byo_example (docs/reliability.md).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROLES = {"learner": "ray::Learner", "generator": "ray::GeneratorActor", "reward": "ray::RewardService"}
QUICKSTARTS = ["configs/quickstart.yaml", "configs/quickstart_ppo.yaml", "configs/quickstart_grpo.yaml",
               "configs/quickstart_rloo.yaml", "configs/quickstart_proximal_rloo.yaml",
               "configs/quickstart_best_of_n_sft.yaml"]
Fault = tuple[float, str, str]  # seconds after launch, role, KILL / STOP / STOPCONT


def pids(role: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", ROLES[role]], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if int(p) != os.getpid()]


def steps_of(run: Path) -> list[int]:
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return [json.loads(line)["step"] for line in lines if line.strip()]


def plan(rng: random.Random, within_s: float) -> list[Fault]:
    times = sorted(round(rng.uniform(1, within_s), 1) for _ in range(rng.choice([1, 2, 3])))
    return [(t, rng.choice(list(ROLES)), rng.choice(["KILL", "STOP", "STOPCONT"])) for t in times]


def strike(rng: random.Random, fault: Fault, resumes: list[tuple[float, int]]) -> str:
    """Send one fault to a random process of its role; a STOPCONT's SIGCONT is queued in `resumes`."""
    _, role, how = fault
    targets = pids(role)
    if targets:
        victim = rng.choice(targets)
        os.kill(victim, signal.SIGKILL if how == "KILL" else signal.SIGSTOP)
        if how == "STOPCONT":
            resumes.append((time.time() + rng.uniform(3, 20), victim))
    return f"{how} {role} {targets}"


def resume_due(resumes: list[tuple[float, int]]) -> None:
    for when, victim in [r for r in resumes if r[0] <= time.time()]:
        resumes.remove((when, victim))
        try:
            os.kill(victim, signal.SIGCONT)
        except ProcessLookupError:  # killed meanwhile (by the run's hang check)
            pass


def drive(proc: subprocess.Popen, rng: random.Random, faults: list[Fault], limit_s: float) -> None:
    started, pending = time.time(), list(faults)
    resumes: list[tuple[float, int]] = []
    while proc.poll() is None and time.time() - started < limit_s:
        time.sleep(0.2)
        while pending and time.time() - started >= pending[0][0]:
            print(f"  {time.time() - started:5.1f}s {strike(rng, pending.pop(0), resumes)}", flush=True)
        resume_due(resumes)
    for _, victim in resumes:  # the run ended first: nothing stays stopped
        try:
            os.kill(victim, signal.SIGCONT)
        except ProcessLookupError:
            pass


def verdict(run: Path, log: Path, steps: int, returncode: int | None) -> str:
    text, got = log.read_text(), steps_of(run)
    whole = sorted(got) == list(range(1, steps + 1)) and (run / "summary.json").exists()
    return "OK" if returncode == 0 and whole and "Traceback" not in text else "CHECK"


def one_run(args: argparse.Namespace, seed: int) -> None:
    rng = random.Random(seed)
    config, run, log = args.configs[seed % len(args.configs)], args.out / f"run{seed}", args.out / f"run{seed}.log"
    faults = plan(rng, args.within)
    cmd = [str(Path(sys.executable).parent / "async-rlhf"), "train", config, f"learner.steps={args.steps}",
           f"seed={seed}", "learner.stall_timeout_s=40", "generation.hang_timeout_s=5", "checkpoint.every=5",
           *args.set, "--run-dir", str(run)]
    started = time.time()
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
        drive(proc, rng, faults, limit_s=900)
        if proc.poll() is None:
            proc.kill()
        returncode = proc.wait()
    last = [line for line in log.read_text().splitlines() if line.strip() and "it/s]" not in line][-1:]
    print(f"{verdict(run, log, args.steps, returncode)} seed {seed} {config} faults {faults} exit {returncode} "
          f"{time.time() - started:.0f}s: {last[0] if last else ''}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("first_seed", type=int)
    parser.add_argument("end_seed", type=int)
    parser.add_argument("--configs", nargs="+", default=QUICKSTARTS)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--within", type=float, default=25.0, help="faults fall in this many seconds after launch")
    parser.add_argument("--set", nargs="*", default=["eval.every=10"], help="config overrides for every run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in range(args.first_seed, args.end_seed):
        one_run(args, seed)


if __name__ == "__main__":
    main()
