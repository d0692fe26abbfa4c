"""`async-rlhf` command line: train a policy from a YAML config; check a config; watch a run; plot
runs; export the embedded policy as a checkpoint for `model.source: local`; prepare SmolLM2, serve,
train and label reward models (async_rlhf/cli/models.py); run a benchmark."""
from __future__ import annotations

import argparse
import atexit
import os
import shlex
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, TextIO, cast

from async_rlhf.checkpoint.store import Checkpoint, CheckpointStore
from async_rlhf.cli.arguments import flag_values, try_writing, writable_place
from async_rlhf.cli.models import COMMANDS as MODEL_COMMANDS
from async_rlhf.cli.models import add_parsers as add_model_parsers
from async_rlhf.cli.progress import Progress, progress_display
from async_rlhf.cli.start_up_stop import StartUpStop
from async_rlhf.cli.streams import ReaderGoneStream
from async_rlhf.cluster.gc_pause import paused_gc
from async_rlhf.config.base import ConfigError, shown_override
from async_rlhf.config.run import RunConfig, config_yaml, load_config
from async_rlhf.failures import (
    START_UP_INTERRUPTED,
    Interrupted,
    RunError,
    StoppedDuringStartUp,
    failure_line,
    unexpected_line,
)

if TYPE_CHECKING:
    from async_rlhf.pipeline.controller import ServiceStarter

INTERRUPTED = 130  # 128 + SIGINT: the exit status shells expect of a command stopped by Ctrl-C
RAY_ERRORS = "ray_errors.log"  # what Ray's driver reports (worker and raylet deaths), kept out of the terminal
BENCHMARKS = ["async_vs_sync", "dataset_read", "every_config", "generator_path", "learner_precision",
              "learner_settings", "learner_step", "off_policy", "startup", "vineppo_vs_ppo", "vs_trl", "weight_sync"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="async-rlhf", description="Asynchronous RLHF with vLLM, Ray and DeepSpeed.")
    parser.add_argument("--version", action="version", version=f"async-rlhf {metadata.version('async-rlhf')}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run a training job")
    train.add_argument("config", nargs="?", default=None,
                       help="YAML config, e.g. configs/quickstart.yaml (with --resume: default the run's own)")
    train.add_argument("overrides", nargs="*", default=[],
                       help="key.sub=value overrides, e.g. queue.max_staleness=0")
    train.add_argument("--run-dir", type=Path, default=None, help="where outputs go (default runs/<time>)")
    train.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                       help="continue the run in RUN_DIR from its newest valid checkpoint (same config; "
                            "learner.steps may grow)")
    status = sub.add_parser("status", help="print the status of a running job")
    status.add_argument("--url", default=None, help="API URL (default: from --run-dir, else the newest runs/*/api_url)")
    status.add_argument("place", nargs="?", default=None, metavar="RUN_DIR|URL",
                        help="the run's directory (the same as --run-dir), or its API URL (the same as --url)")
    status.add_argument("--run-dir", type=Path, default=None)
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    check = sub.add_parser("check-config", help="validate a config and print it resolved")
    check.add_argument("config")
    check.add_argument("overrides", nargs="*", default=[])
    check.add_argument("--portable", action="store_true",
                       help="check the config alone, not this machine (files, GPUs, packages): for a config "
                            "written for another machine, e.g. configs/paper/ on a laptop")
    plot = sub.add_parser("plot", help="reward, KL, staleness and throughput of several runs on one figure")
    plot.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    plot.add_argument("--out", type=Path, required=True, help="PNG file to write")
    export = sub.add_parser("export-model",
                            help="write the embedded policy as a local HF checkpoint (model.source=local)")
    export.add_argument("out", type=Path, help="new directory for the checkpoint")
    export.add_argument("overrides", nargs="*", default=[],
                        help="task.* and model.embedded.* overrides, e.g. task.name=arith")
    bench = sub.add_parser("bench", help="run a benchmark from bench/ (docs/benchmarks.md); its options follow NAME")
    bench.add_argument("name", choices=BENCHMARKS)
    rest = bench.add_argument("bench_args", nargs=argparse.REMAINDER,
                              help="the benchmark's own options, e.g. --seeds 0 1")
    rest.required = False  # argparse marks a REMAINDER positional required: "required: name, bench_args"
    add_model_parsers(sub)
    return parser


def resolve_run_dir(cfg: RunConfig, cli_dir: Path | None) -> Path:
    run_dir = cli_dir or cfg.run_dir or new_default_run_dir(Path("runs"))
    if (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"config error: run directory '{run_dir}' already holds a run; choose another --run-dir")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"config error: run directory '{run_dir}' is a file; pass --run-dir with a directory")
    try:
        try_writing(run_dir)
    except OSError as exc:
        raise ConfigError(f"config error: cannot use '{run_dir}' as the run directory ({exc.strerror}); pass "
                          "--run-dir with a directory this user can create and write") from None
    return run_dir.resolve()


def new_default_run_dir(parent: Path) -> Path:
    """parent/<date-time>, made here, or -2, -3, ... after it when another run started in the same second (a
    sweep launched in parallel): made with mkdir, which only one process can win for each name."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1, 1000):
        run_dir = parent / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            continue
        except OSError:  # cannot be made at all: resolve_run_dir says why
            return run_dir
    return parent / stamp


def api_starter(cfg: RunConfig) -> "ServiceStarter | None":
    """The HTTP API as the run's service (FastAPI and uvicorn are imported only when it is served)."""
    if not cfg.api.enabled:
        return None
    from async_rlhf.api.app import serve_api

    return serve_api


def train_arguments(config: str | None, overrides: list[str]) -> str:
    """The config and overrides of this `train` as the command that continues it must repeat them (a credential
    as ***, for the user to give again)."""
    return " ".join(shlex.quote(part) for part in [*([config] if config else []), *map(shown_override, overrides)])


def environment_notes(cfg: RunConfig) -> list[str]:
    """A line for each variable of the environment that overrides or sidesteps a setting of the run."""
    notes = []
    if cfg.ray.address is None and os.environ.get("RAY_ADDRESS"):
        notes.append("note: RAY_ADDRESS is set but ray.address is not: this run starts a Ray of its own (set "
                     "ray.address=auto to run on that cluster)")
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        notes.append("note: VLLM_CPU_KVCACHE_SPACE is set: on CPU vLLM sizes each generator's KV cache from it (GiB), "
                     "not from generation.kv_cache_gib; unset it to use the config")
    return notes


def train_source(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The config file `train` was given and its overrides; `train --resume RUN_DIR [key=value ...]` gives none
    (the run's own config.yaml is read), and argparse then takes a first override for the config."""
    config, overrides = args.config, list(args.overrides)
    if args.resume is not None and config is not None and "=" in config and not Path(config).exists():
        config, overrides = None, [config, *overrides]
    if config is None and args.resume is None:
        raise ConfigError("config error: train needs a config file (e.g. configs/quickstart.yaml), or --resume "
                          "RUN_DIR to continue a run with its own")
    return config, overrides


def resume_config(run_dir: Path) -> Path:
    """The config a `train --resume RUN_DIR` without one continues with: the run's own, unless secrets were
    written out of it (they cannot be read back)."""
    from async_rlhf.config.base import load_yaml
    from async_rlhf.config.redaction import redacted_keys
    from async_rlhf.pipeline.resume import REFUSED, saved_config

    path = saved_config(run_dir)
    if hidden := redacted_keys(load_yaml(path.read_text(encoding="utf-8"))):
        raise ConfigError(f"{REFUSED}{path} has {', '.join(hidden)} written as *** (a credential is "
                          f"never saved); pass the config the run started with: async-rlhf train CONFIG --resume "
                          f"{run_dir}")
    return path


def unused_note(cfg: RunConfig) -> str:
    """One line naming the keys set that the run's loss does not read, or ""."""
    unused = cfg.unused_settings()
    return (f"note: {', '.join(unused)} set but not read by loss '{cfg.loss.name}' (docs/losses.md says which loss "
            f"reads each)" if unused else "")


def cmd_train(args: argparse.Namespace) -> int:
    config, overrides = train_source(args)
    cfg = load_config(config or resume_config(args.resume), overrides)
    if config and (note := unused_note(cfg)):  # the run's own config.yaml sets every key: said at its start
        print(f"[async-rlhf] {note}", flush=True)
    for note in environment_notes(cfg):
        print(f"[async-rlhf] {note}", flush=True)
    run_dir, checkpoint = train_target(cfg, args)
    print(f"[async-rlhf] run directory: {run_dir}", flush=True)
    summary = run_reporting_failures(cfg, run_dir, checkpoint, train_arguments(config, overrides))
    if isinstance(summary, int):
        return summary
    print_run_end(summary, run_dir, checkpoint)
    return 0


def train_target(cfg: RunConfig, args: argparse.Namespace) -> tuple[Path, Checkpoint | None]:
    """The run's directory, and the checkpoint that `--resume` continues from (None for a new run)."""
    if args.resume is None:
        return resolve_run_dir(cfg, args.run_dir), None
    if args.run_dir is not None:
        raise ConfigError("config error: --resume RUN_DIR continues the run in RUN_DIR; drop --run-dir")
    from async_rlhf.pipeline.resume import find_resume_point

    checkpoint = find_resume_point(cfg, args.resume)
    print(f"[async-rlhf] resuming {args.resume.resolve()} from {checkpoint.path.name}", flush=True)
    return args.resume.resolve(), checkpoint


def run_reporting_failures(cfg: RunConfig, run_dir: Path, checkpoint: Checkpoint | None,
                           arguments: str) -> dict | int:
    """The run's summary, or the exit code of a run that failed, said on one line."""
    bar = progress_display(cfg.learner.steps, sys.stderr)
    stop = StartUpStop()
    try:
        with stop.installed():
            return start_and_run(cfg, run_dir, checkpoint, bar, stop)
    except (Interrupted, KeyboardInterrupt) as exc:  # Ctrl-C in start-up or twice (a bare one: before the controller)
        bar.close()
        print(f"[async-rlhf] {str(exc) or START_UP_INTERRUPTED}", file=sys.stderr, flush=True)
        return INTERRUPTED
    except (RunError, StoppedDuringStartUp) as exc:
        bar.close()
        print(f"[async-rlhf] run failed: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)  # one line
        return 1
    except ConfigError:  # found while starting (a dataset column, a cluster that cannot place the run): exit 2
        raise
    except Exception as exc:  # a death nothing recovered from: one line, the traceback to RUN_DIR/error.log
        bar.close()
        resumable = bool(CheckpointStore(run_dir / "checkpoints", cfg.checkpoint.keep_last).checkpoints())
        print(failure_line(exc, run_dir, arguments, resumable), file=sys.stderr, flush=True)
        return 1
    finally:
        bar.close()


def print_run_end(summary: dict, run_dir: Path, checkpoint: Checkpoint | None) -> None:
    from async_rlhf.cli.status import summary_figures
    from async_rlhf.pipeline.startup import process_age_s

    ended, steps, gold = summary_figures(summary)
    if checkpoint is not None:  # the training seconds are the whole run's, the launch this process's
        steps += f" (this process from step {checkpoint.step})"
    print(f"[async-rlhf] {ended}: {steps}, {process_age_s():.1f}s since launch; {gold} (bound "
          f"{summary['max_staleness']}), outputs in {run_dir}", flush=True)


def start_and_run(cfg: RunConfig, run_dir: Path, checkpoint: Checkpoint | None, bar: Progress,
                  stop: StartUpStop) -> dict:
    from async_rlhf.pipeline.startup import start_ray_while_importing  # heavy imports only once the config is valid

    with paused_gc():  # the driver's share of the start (gc_pause.py)
        started_ray = start_ray_while_importing(cfg, "async_rlhf.pipeline.controller")
        from async_rlhf.cluster.local_ray import keep_ray_errors_in

        keep_ray_errors_in(run_dir / RAY_ERRORS)  # the run reports each death itself, on one line
        from async_rlhf.pipeline.controller import Controller

        stop.check()
        controller = Controller(cfg, run_dir, progress=bar.update, resume=checkpoint, services=api_starter(cfg))
    controller.started_ray = started_ray  # the Ray started above is the run's: the controller shuts it down
    controller.signals.kept_before = stop.hand_over
    stop.check()
    return controller.run()


def cmd_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides, environment=not args.portable)
    print(config_yaml(cfg), end="")  # secrets as ***
    if note := unused_note(cfg):
        print(f"# {note}")
    # The prompts can be checked with the policy's tokenizer, as train does.
    if cfg.model.source == "local" and cfg.model.path is not None and not args.portable:
        from async_rlhf.tasks.builtin import load_task
        from reward_models.columns import check_reward_columns, reward_columns

        task = load_task(cfg, cfg.model.path, reward_columns(cfg))
        print(f"# {task.describe()}")
        check_reward_columns(cfg, task)  # as train does, before any worker starts
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from async_rlhf.outputs.plots import plot_runs

    if not args.out.is_dir():  # plot_runs says what to give instead of a directory
        writable_place(args.out, "--out", "plot")
    print(plot_runs(args.run_dirs, args.out))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from async_rlhf.policies.embedded import export_embedded

    cfg = load_config(None, args.overrides)
    if not args.out.is_file():  # export_embedded says what to give instead of a file
        writable_place(args.out, "out", "export-model", directory=True)
    print(export_embedded(cfg, args.out, log=lambda msg: print(f"[async-rlhf] {msg}", flush=True)))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from async_rlhf.cli.status import find_run, find_token, find_url, print_ended, print_status

    take_place(args)
    run_dir = status_run_dir(args)
    if args.url and not run_dir:
        return print_status(args.url, find_token(None), as_json=args.json)
    if run_dir and (ended := print_ended(run_dir, args.json)) is not None:
        return ended
    run = find_run(run_dir)
    return print_status(args.url or find_url(run), find_token(run), as_json=args.json)


def take_place(args: argparse.Namespace) -> None:
    """`status URL` is `status --url URL` (as a path, "http://host:port" became "http:/host:port"); `status DIR`
    is `status --run-dir DIR`."""
    place, args.run_dir_arg = args.place, None
    if place is not None and place.startswith(("http://", "https://")):
        if args.url and args.url != place:
            raise ConfigError(f"status error: two API URLs given ({place} and --url {args.url}); pass one")
        args.url = place
    elif place is not None:
        args.run_dir_arg = Path(place)


def status_run_dir(args: argparse.Namespace) -> Path | None:
    """`status RUN_DIR` or `status --run-dir RUN_DIR`."""
    if args.run_dir and args.run_dir_arg and args.run_dir != args.run_dir_arg:
        raise ConfigError(f"status error: two run directories given ({args.run_dir_arg} and --run-dir "
                          f"{args.run_dir}); pass one")
    return args.run_dir or args.run_dir_arg


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    if Path("bench", "__init__.py").is_file() and os.getcwd() not in sys.path:
        # The console script, unlike `python -m`, does not put the checkout on the path; bench/ is not installed.
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(f"bench.{args.name}")
    except ModuleNotFoundError as exc:
        if exc.name not in ("bench", f"bench.{args.name}"):
            raise
        print("async-rlhf bench: the benchmarks live in the source checkout's bench/ folder; run this from the "
              "repository root", file=sys.stderr)
        return 2
    for flag, directory in (("--out", False), ("--runs-dir", True)):  # each script parses its own arguments
        for value in flag_values(args.bench_args, flag):
            writable_place(Path(value), flag, f"bench {args.name}", directory)
    module.main(args.bench_args)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {"train": cmd_train, "check-config": cmd_check, "status": cmd_status, "plot": cmd_plot,
                "export-model": cmd_export, "bench": cmd_bench, **MODEL_COMMANDS}
    try:
        return commands[args.command](args)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2


def entry() -> None:
    """The `async-rlhf` command: main(), then an exit that skips the interpreter's teardown.

    By then every output is written and closed (a run's controller closed its files and sinks, Ray is
    down) and the exit handlers (logging, Ray, W&B) run here as at any exit. What is skipped is only the
    destruction, module by module, of everything torch and transformers imported: about 0.8 s of every
    command's wall clock (docs/benchmarks.md, "Start-up"). main() itself returns, for callers in-process."""
    sys.stdout = cast(TextIO, ReaderGoneStream(sys.stdout))  # `train ... | head`: the run goes on once head exits
    sys.stderr = cast(TextIO, ReaderGoneStream(sys.stderr))
    try:
        code = main()
    except KeyboardInterrupt:  # before a run installs its own handler, or in any other command
        print("\n[async-rlhf] interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        code = INTERRUPTED
    except Exception as exc:  # a bug or an environment problem no command foresaw: one line, never a traceback
        print(unexpected_line(exc, " ".join(sys.argv[1:2]) or "async-rlhf"), file=sys.stderr, flush=True)
        code = 1
    atexit._run_exitfuncs()  # Ray's own among them: a Ray started before the Ctrl-C is shut down here
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
