"""Reading a user's dataset: seconds and peak memory to build a `task.name: dataset` task from a large JSONL file.

    async-rlhf bench dataset_read [--rows 200000] [--model DIR] [--no-chat] [--max-prompt-tokens N] [--runs 2]
                                  [--checkout DIR ...] [--out FILE]

The file has `--rows` rows of 5-30 words each (about a third over `max_prompt_tokens` 64 with SmolLM2's
tokenizer and chat template), written once. Each measurement is a fresh process (its peak RSS is the task's)
that loads the tokenizer of `--model` (default: the embedded character tokenizer with a one-line chat template, so no
download) and then times building the task: read, template, tokenize, filter, split. Several checkouts
(`--checkout`, put first on PYTHONPATH) alternate run by run, so a before/after pair sees the same load.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from async_rlhf.cli.arguments import positive_int
from bench.common import bar_plot, write_result

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a movie film plot actor scene music story director ending great awful slow funny dark long short".split()
CHAT = ("{% for m in messages %}{{ m['role'] }}={{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}bot={% endif %}")
CHILD = """
import json, resource, sys, time
from async_rlhf.config.task import TaskConfig
from async_rlhf.tasks.builtin import load_tokenizer, make_task
path, model, chat, limit = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
tokenizer = load_tokenizer(model)
cfg = TaskConfig(name="dataset", eval_prompts=160, dataset={"path": path, "prompt_column": "prompt",
                 "chat_template": chat, "max_prompt_tokens": limit, "eval_fraction": 0.05})
start = time.perf_counter()
task = make_task(cfg, tokenizer, 0)
seconds = time.perf_counter() - start
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": round(seconds, 2), "peak_mb": round(peak_mb), "train": len(task.train)}))
"""


def write_rows(path: Path, rows: int) -> None:
    draw = random.Random(0)
    with path.open("w") as fh:
        for i in range(rows):
            words = " ".join(draw.choice(WORDS) for _ in range(draw.randint(5, 30)))
            fh.write(json.dumps({"prompt": f"write a review of film {i}, {words}"}) + "\n")


def char_model(out: Path) -> Path:
    """The embedded character tokenizer, lower-case letters included, with a chat template, as a directory."""
    from async_rlhf.policies.embedded import build_tokenizer

    tokenizer = build_tokenizer("arith")
    tokenizer.chat_template = CHAT
    tokenizer.save_pretrained(out)
    return out


def measure(checkout: Path, data: Path, model: Path, args: argparse.Namespace) -> dict:
    limit = args.max_prompt_tokens or (64 if args.model else 256)  # a character is a token of the embedded one
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    cmd = [sys.executable, "-c", CHILD, str(data), str(model), "0" if args.no_chat else "1", str(limit)]
    proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"bench dataset_read: the run in {checkout} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return {"checkout": str(checkout), **json.loads(proc.stdout.strip().splitlines()[-1])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=positive_int, default=200_000)
    parser.add_argument("--model", type=Path, default=None, help="an HF model directory (its tokenizer)")
    parser.add_argument("--no-chat", action="store_true", help="the prompts as they are, no chat template")
    parser.add_argument("--max-prompt-tokens", type=positive_int, default=None, help="default: 64, 256 without --model")
    parser.add_argument("--runs", type=positive_int, default=2)
    parser.add_argument("--checkout", type=Path, nargs="+", default=[ROOT])
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results/bench_dataset_read")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dataset-read-") as scratch:
        data = Path(scratch, "rows.jsonl")
        write_rows(data, args.rows)
        model = args.model or char_model(Path(scratch, "tokenizer"))
        rows = [measure(c.resolve(), data, model, args) for _ in range(args.runs) for c in args.checkout]
    summary = {str(c.resolve()): {key: statistics.median(r[key] for r in rows if r["checkout"] == str(c.resolve()))
                                  for key in ("seconds", "peak_mb")} for c in args.checkout}
    for checkout, median in summary.items():
        print(f"{checkout}: {median['seconds']:.1f} s, peak {median['peak_mb']:.0f} MB (median of {args.runs})")
    png = write_result(args.out, {"rows": args.rows, "model": str(args.model or "embedded characters"),
                                  "chat_template": not args.no_chat, "median": summary, "runs": rows})
    bar_plot(png, f"building a dataset task of {args.rows} rows", [Path(c).name or c for c in summary],
             [m["seconds"] for m in summary.values()], "seconds")


if __name__ == "__main__":
    main()
